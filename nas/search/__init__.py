"""The search: stages composed into the trial flow, the study loop, and the Ray executor.

``pipeline`` is the hardware half of a trial (export, quantize, measure or estimate); ``trial``
runs one trial top to bottom; ``study`` is a worker of a study (Optuna, recovery, the loop);
``ray_executor`` runs the same trials as Ray Tune trials.

May import: ``nas.spec``, ``nas.stages``, ``nas.store`` and ``nas.search``.
"""
