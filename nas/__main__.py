"""``python -m nas`` is the ``nas`` command."""

from nas.faces.cli.main import main

main()
