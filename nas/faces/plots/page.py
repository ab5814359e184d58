"""One self-contained HTML page of a study (``nas plot``): every figure, the facts and the front as a
table, with plotly.js embedded once, so the file opens offline, from a file or an email attachment.
The web page uses the same CSS and the same facts (:data:`PAGE_CSS`, :func:`study_facts`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from nas.faces.plots.data import FIGURES, SHORT, StudyData
from nas.faces.plots.figures import compare_figure, fmt, study_figures

PAGE_CSS = """
:root { --fg:#1d2430; --muted:#5b6573; --line:#e3e7ee; --bg:#f6f8fb; --accent:#1f5fbf; --front:#d62728; }
* { box-sizing: border-box; }
body { margin:0; font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color:var(--fg);
       background:var(--bg); font-size:14px; line-height:1.45; }
header.top { background:#18212f; color:#fff; padding:10px 24px; display:flex; gap:18px; align-items:baseline; }
header.top a { color:#fff; text-decoration:none; } header.top .brand { font-weight:700; font-size:17px; }
header.top .where { color:#aab4c3; font-size:12px; margin-left:auto; }
main { max-width: 1280px; margin: 0 auto; padding: 18px 24px 40px; }
h1 { font-size: 22px; margin: 4px 0 2px; } h2 { font-size: 17px; margin: 0 0 8px; }
.muted { color: var(--muted); } .small { font-size: 12px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 16px; margin:14px 0; }
.facts { display:flex; flex-wrap:wrap; gap:6px 22px; margin:6px 0 0; }
.facts div b { display:block; font-size:11px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted);
               font-weight:600; }
.pill { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; background:#eef1f6; }
.pill.complete { background:#e3f3e6; color:#1b6b2a; } .pill.failed { background:#fde7e7; color:#a11; }
.pill.infeasible { background:#fff1d6; color:#8a5a00; } .pill.running { background:#e5eefc; color:#1f5fbf; }
.pill.front { background:#fde2e2; color:var(--front); font-weight:600; }
table.data { border-collapse: collapse; width: 100%; font-size: 13px; }
table.data th, table.data td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
                               vertical-align: top; }
table.data th { background:#f1f4f8; font-weight:600; white-space:nowrap; position: sticky; top: 0; }
table.data td.num, table.data th.num { text-align:right; font-variant-numeric: tabular-nums; }
table.data tr.clickable:hover { background:#f3f7ff; cursor:pointer; }
table.data tr.on-front td:first-child { border-left: 3px solid var(--front); }
a { color: var(--accent); }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
pre { background:#f3f5f8; border:1px solid var(--line); border-radius:6px; padding:10px; overflow:auto; }
.figure { min-height: 300px; }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; }
"""



CAPTIONS = {
    "pareto": "Hover a point for its architecture and where each figure came from; drag to zoom, "
    "double-click to reset. Circle: measured; diamond: estimated (the device's latency model); cross: over a budget.",
    "pareto3d": "Drag to turn. Red points are non-dominated in all three objectives.",
    "hypervolume": "Area dominated by the feasible front, as the search went on: higher is better.",
    "dimensions": "Each dimension that varied, against the objective; a clear slope or gap suggests it matters. "
    "At short training budgets a second seed moves BPB about as much.",
}
"""What a reader of the page needs to know to read each figure, under it."""


def page_html(
    data: StudyData, figures: dict[str, go.Figure], *, compared: go.Figure | None = None, generated_by: str = "nas plot"
) -> str:
    """One HTML page with every figure and plotly.js embedded once: it opens offline, from a file
    or an email attachment, with nothing fetched from a CDN."""
    s = data.study
    parts = []
    for i, (name, fig) in enumerate({**figures, **({"compare": compared} if compared else {})}.items()):
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        caption = f"<p class='muted small'>{html.escape(CAPTIONS[name])}</p>" if name in CAPTIONS else ""
        parts.append(f"<section class='card' id='{name}'>{div}{caption}</section>")
        if i == 0:
            parts.append(_front_table(data))
    facts = _facts(data)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(s.name)} · nas</title>
<style>{PAGE_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header class="top"><span class="brand">nas</span><span>study {html.escape(s.name)}</span>
<span class="where">{html.escape(data.db)}</span></header>
<main>
<h1>{html.escape(s.name)}</h1>
<div class="muted">{html.escape(s.space)} on {html.escape(s.profile)} ·
objectives {html.escape(", ".join(f"{o.name} ({o.direction})" for o in s.objectives))}</div>
<div class="card"><div class="facts">{facts}</div></div>
{"".join(parts)}
<footer>Made by <code>{html.escape(generated_by)}</code> at {when} from {html.escape(data.db)}.
plotly.js is embedded: this file needs no network.</footer>
</main></body></html>
"""


def study_facts(data: StudyData) -> list[tuple[str, str]]:
    """The study's facts as (name, value) pairs: trials by state, budgets, sampler, seed, date. The
    page written here and the web page show the same list."""
    s = data.study
    c = s.trial_counts
    items = [
        ("trials", f"{s.n_trials:,}"),
        *((state, f"{c.get(state, 0):,}") for state in ("complete", "infeasible", "failed", "running")),
        ("on the front", str(sum(p.on_front for p in data.points))),
    ]
    tokens = s.train_config.get("tokens")
    if tokens:
        items.append(("training budget", f"{int(tokens):,} tokens"))
    items += [(f"{SHORT.get(k, k)} budget", f"{v:g}") for k, v in sorted(data.budgets.items())]
    n = data.noise
    if n is not None and n.std is not None:
        items.append(("BPB seed spread", f"±{n.std:.4f} ({len(n.seeds)} seeds of trial {n.trial_number}'s "
                                         f"architecture at {n.tokens:,} tokens)"))
    elif n is not None:
        items.append(("BPB seed spread", f"being measured ({len(n.seeds)} seed so far)"))
    bigram = [p for p in data.points if p.state == "complete" and p.beats_bigram is False]
    if bigram:
        items.append(("not below bigram", f"{len(bigram)} complete trial(s)"))
    items += [
        ("sampler", str(s.extra.get("sampler", "–"))),
        ("seed", str(s.seed)),
        ("created", s.created_at.strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return items


def _facts(data: StudyData) -> str:
    return "".join(f"<div><b>{html.escape(k)}</b>{html.escape(v)}</div>" for k, v in study_facts(data))


def _front_table(data: StudyData) -> str:
    front = sorted((p for p in data.points if p.on_front), key=lambda p: p.figures.get("val_bpb", math.inf))
    if not front:
        return ""
    head = "".join(f"<th class='num'>{html.escape(SHORT[k])}</th>" for k in FIGURES)
    rows = []
    for p in front:
        cells = "".join(f"<td class='num'>{fmt(p.figures.get(k), k)}</td>" for k in FIGURES)
        rows.append(
            f"<tr><td>{p.number}</td><td>{html.escape(p.summary or '')}</td>{cells}"
            f"<td>{html.escape(p.label or '–')}</td></tr>"
        )
    return (
        f"<section class='card'><h2>The front: {len(front)} trials</h2><table class='data'><tr><th>#</th>"
        f"<th>architecture</th>{head}<th>latency from</th></tr>{''.join(rows)}</table></section>"
    )


def write_page(path: Path, data: StudyData, *, compare: Sequence[StudyData] = (), color: str | None = None) -> Path:
    """Write the study's page to ``path`` (HTML, self-contained)."""
    figures = study_figures(data, color=color)
    compared = compare_figure([data, *compare]) if compare else None
    path.write_text(page_html(data, figures, compared=compared), encoding="utf-8")
    return path

