"""`nas plot` and `nas ui`: look at a study's results as figures, in a file or in a browser.

Registered on the main app by ``nas.faces.cli.main`` (``register(app)``). Both only read the database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nas.faces.cli.common import DbOpt, console, db_url, err_console

# Help as strings, not docstrings: the help shows a paragraph's line breaks as they are written.
PLOT_HELP = (
    "Write a study's figures to one self-contained HTML page (plotly.js embedded: it opens offline).\n\n"
    "The page holds the Pareto front (BPB against decode latency; hover a point for its architecture and for where "
    "each figure came from, measured on a device or estimated by its latency model; a cross marks a trial over a "
    "budget), a three-objective view, the hypervolume of the front over time, each objective against each search "
    "dimension, and the front as a table. --compare draws other studies on the same axes.\n\n"
    "Examples:\n\n"
    "  nas plot tiny-host --out tiny.html\n"
    "  nas plot tiny-host --out tiny.html --color n_layers --png\n"
    "  nas plot gqa_small-jetson --out cmp.html --compare gqa_small-jetson-random"
)
UI_HELP = (
    "Serve a read-only web page of the studies in the database.\n\n"
    "Each study's page has its Pareto plots and a sortable trial table (filter by feasibility and latency label); "
    "click a point or a row for the trial's spec, measurement with provenance, training curve and the `nas export` "
    "command for it. An open study page updates itself while a search runs. It listens on 127.0.0.1 unless --host "
    "says otherwise, and has no login.\n\n"
    "It answers only a request that names it as it is served (its Host header): the --host address, localhost, "
    "127.0.0.1 or [::1], at --port; anything else gets a 400. So another web site open in your browser cannot read "
    "the results by pointing its own domain at 127.0.0.1 (DNS rebinding). --allow-host NAME adds a name (NAME:PORT "
    "at that port only), e.g. the machine's name when --host 0.0.0.0 serves other machines, or a reverse proxy's.\n\n"
    "Examples:\n\n"
    "  nas ui                                  # then open http://127.0.0.1:8000\n"
    "  nas ui --db postgresql://host/nas --port 8080\n"
    "  nas ui --host 0.0.0.0 --allow-host gpu-box.lan:8000\n"
    "  optuna-dashboard sqlite:///nas.db       # Optuna's own view of the same studies"
)


def register(app: typer.Typer) -> None:
    """Add ``plot`` and ``ui`` to ``app``."""
    app.command("plot", help=PLOT_HELP)(plot)
    app.command("ui", help=UI_HELP)(ui)


def plot(
    study: Annotated[str, typer.Argument(help="Study name (see `nas studies`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write, e.g. pareto.html.")],
    db: DbOpt = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="Another study to draw on the same axes (repeat for more): fronts and hypervolume "
            "against one reference point."
        ),
    ] = None,
    color: Annotated[
        str | None,
        typer.Option(
            help="Colour the Pareto plot's points by this figure (val_bpb, decode_ms, prefill_ms, "
            "peak_memory_mb, model_mb, params) or spec field (n_layers, attention, ...). Default: the "
            "study's third objective, else params."
        ),
    ] = None,
    png: Annotated[
        bool,
        typer.Option(
            help="Also write each figure as a PNG beside the page (OUT-pareto.png, ...), drawn by the "
            "system's Chromium."
        ),
    ] = False,
    max_points: Annotated[
        int,
        typer.Option(
            help="Draw at most this many trials besides the front, the running and the failed ones (an "
            "even sample of the rest), so that a page of a very large study stays light; the figures say "
            "when they are thinned."
        ),
    ] = 3000,
) -> None:
    """Write a study's figures to one self-contained HTML page (help: PLOT_HELP)."""
    from nas.faces import plots
    from nas.spec.errors import NasError
    from nas.store import Store

    if out.suffix.lower() not in (".html", ".htm"):
        raise NasError(f"--out {out}: give an .html file (add --png for images beside it)")
    if not out.parent.resolve().is_dir():
        raise NasError(f"--out {out}: the folder {out.parent} does not exist")
    if max_points < 1:
        raise NasError("--max-points must be at least 1")
    specs = plots.SpecCache()  # compared studies may share architectures: each is read once
    with Store(db_url(db), upgrade=False) as store:
        data = plots.load_study(store, study, max_points=max_points, cache=specs)
        others = [plots.load_study(store, name, max_points=max_points, cache=specs) for name in compare or []]
    if color is not None and color not in plots.FIGURES and not any(p.spec and color in p.spec for p in data.points):
        raise NasError(f"--color {color!r}: not a figure ({', '.join(plots.FIGURES)}) nor a field of the specs")
    plots.write_page(out, data, compare=others, color=color)
    console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opens offline): "
                  f"{len(data.points)} trials of {study}")  # fmt: skip
    if png:
        figures = plots.study_figures(data, color=color)
        if others:
            figures["compare"] = plots.compare_figure([data, *others])
        for name, fig in figures.items():
            path = out.with_name(f"{out.stem}-{name}.png")
            plots.write_png(path, fig)
            console.print(f"wrote {path}")


def ui(
    db: DbOpt = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. The page has no login: keep 127.0.0.1 unless every machine "
            "that can reach the address may read the results."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    refresh: Annotated[float, typer.Option(help="Seconds between an open study page's checks for new trials.")] = 5.0,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="NAME",
            help="Also answer requests for this host name or address (NAME:PORT: at that port only); repeat for "
            "more. By default only the --host address, localhost, 127.0.0.1 and [::1] at --port are answered.",
        ),
    ] = None,
) -> None:
    """Serve a read-only web page of the studies in the database (help: UI_HELP)."""
    from nas.faces.web.app import create_app
    from nas.faces.web.hosts import default_hosts
    from nas.spec.errors import NasError

    if not 0 < port < 65536:
        raise NasError(f"--port {port}: give a port between 1 and 65535")
    if refresh <= 0:
        raise NasError("--refresh must be more than 0 seconds")
    hosts = [*default_hosts(host, port), *(allow_host or [])]
    # opens the database now: a bad URL (or --allow-host) fails here, in one line
    app = create_app(db_url(db), refresh_s=refresh, host=host, port=port, allowed_hosts=hosts)
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]listening on {host}: the page has no login; anyone who can reach it can read "
                          "the results[/yellow]")  # fmt: skip
        if not allow_host:
            err_console.print(f"[yellow]other machines must open it by the address {host}; --allow-host NAME lets "
                              "them use a name[/yellow]")  # fmt: skip
    console.print(f"nas ui: http://{'[' + host + ']' if ':' in host else host}:{port}/ (read-only, {db_url(db)}); "
                  "Ctrl-C stops it", highlight=False)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
