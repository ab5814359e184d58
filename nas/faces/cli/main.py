"""The `nas` command line: the app, its command files, and how errors reach the user.

Each command reads values, starts work through the search, the stages or the winner, and prints
with rich. The commands live in files by what they do: ``catalog`` (spaces, sample, devices),
``run`` (trial, measure, search), ``results`` (studies, pareto, show, db), ``winner`` (export,
train) and ``browse`` (plot, ui).

Errors a user can fix (NasError) become one line on stderr and exit code 2; torch and the other
heavy stages are imported inside the commands that need them, so `nas spaces` starts fast.
"""

from __future__ import annotations

import sys

import typer

from nas.faces.cli import browse, catalog, results, run, winner
from nas.faces.cli.common import err_console
from nas.spec.errors import NasError

app = typer.Typer(
    name="nas",
    help=(
        "Hardware-aware architecture search for small decoder-only language models.\n\n"
        "Start with `nas spaces` (what can be searched), `nas sample --space tiny` (what an "
        "architecture looks like) and `nas trial --space tiny` (train one briefly and score it)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# In the order `nas --help` lists them.
for _commands in (catalog, run, results, winner, browse):
    _commands.register(app)


def main() -> None:
    # Standalone mode lets click report usage errors (exit 2) and --help; our own errors come
    # out of it as NasError and get one line, no traceback.
    try:
        app()
    except NasError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
