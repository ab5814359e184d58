"""What every `nas` command file shares: the ``--db`` option and its default.

A module of its own because ``nas.faces.cli.main`` imports the other command files (``cli_export``,
``cli_browse``) at its end to register them, so they cannot import from it.
"""

from __future__ import annotations

from typing import Annotated

import typer

DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default: sqlite:///nas.db in the working "
                                                        "directory; postgresql://... for several workers).")]


def db_url(url: str | None) -> str:
    """``--db`` as given, or the default: sqlite:///nas.db in the working directory."""
    from nas.store import default_db_url

    return url or default_db_url()
