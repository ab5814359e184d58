"""nas: hardware-aware architecture search for small decoder-only language models.

The package is layered; each layer may import only the layers above it in this list, and each
folder's ``__init__`` says the same (``tests/test_layers.py`` checks it, statically and in a
fresh interpreter):

- ``nas.spec``    values: ArchSpec, search spaces, hardware profiles, settings, results, errors.
                  Plain data; no torch, no ONNX Runtime, no database.
- ``nas.stages``  model, data, train, export, measure, estimate, score, hf: values in, values out.
- ``nas.store``   the database (SQLAlchemy models, a narrow API); values only.
- ``nas.search``  the trial flow over the stages, the study loop, the Ray executor.
- ``nas.winner``  a study's winner as a folder, and its full training.
- ``nas.faces``   what a person uses: the CLI, the web page, the plots.

``nas.stages`` and ``nas.store`` are side by side: neither imports the other.
"""
