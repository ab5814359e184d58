"""Values: what every other layer passes around.

ArchSpec (``arch``), search spaces and their expressions (``space``, ``expr``), hardware profiles
(``profile``), run settings (``settings``), measurements and latency statistics (``results``),
the exception root (``errors``) and how definition files are read and written (``files``).

May import: ``nas.spec`` only, and no torch, ONNX Runtime or database driver, so that the store,
the web page and ``nas spaces`` start fast.
"""
