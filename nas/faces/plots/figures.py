"""Plotly figures of a study (:class:`StudyData`), in one house style (:func:`styled`).

:func:`pareto_figure` (BPB against decode latency), :func:`pareto3d_figure`,
:func:`hypervolume_figure`, :func:`dimensions_figure` and :func:`compare_figure`. Every point's
hover says where its latency came from (``measured:local``, ``measured:<node>``,
``estimated:model``); the marker's shape says it too (circle measured, diamond estimated), and a
cross marks a trial over a budget.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nas.faces.plots.data import FIGURES, SHORT, StudyData, TrialPoint, applies
from nas.faces.plots.hypervolume import hypervolume_history, reference_point
from nas.store import non_dominated

FRONT_COLOUR = "#d62728"
FEASIBLE_COLOUR = "#1f77b4"
INFEASIBLE_COLOUR = "#7f7f7f"
STUDY_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


def styled(fig: go.Figure, title: str, *, height: int = 560, subtitle: str = "") -> go.Figure:
    """The house style: title and subtitle at the top left, legend at the top right, white template."""
    text = f"{html.escape(title)}<br><sup>{html.escape(subtitle)}</sup>" if subtitle else html.escape(title)
    # Top to bottom, in pixels: title and subtitle, then the legend on a row of its own, then the
    # plot area. Beside the title the legend would run into a long subtitle; above the plot area
    # it would cover subplot titles; the mode bar's icons take the top right corner.
    legend_top = 62 if subtitle else 40
    fig.update_layout(
        title={"text": text, "x": 0.01, "xanchor": "left", "yref": "container",
               "y": 1 - (30 if subtitle else 22) / height, "yanchor": "middle", "font": {"size": 17}},
        template="plotly_white",
        height=height,
        font={"family": FONT, "size": 13},
        margin={"l": 70, "r": 30, "t": legend_top + 50, "b": 60},
        hoverlabel={"align": "left"},
        legend={"orientation": "h", "yref": "container", "yanchor": "top", "y": 1 - legend_top / height,
                "xanchor": "left", "x": 0.0},
        uirevision="keep",  # a refresh with new trials keeps the user's zoom
    )  # fmt: skip
    return fig


def fmt(value: float | None, figure: str = "") -> str:
    """A figure as a table shows it: 4 significant digits, thousands separated, params as k or M."""
    if value is None or not math.isfinite(value):
        return "–"
    if figure == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.3g}"


def hover_text(p: TrialPoint, extra: str = "") -> str:
    """What a point says about itself: the trial, its architecture, each figure with its source."""
    lines = [
        f"<b>trial {p.number}</b> · {p.state}{' · on the front' if p.on_front else ''}",
        html.escape(p.summary or "(no architecture)"),
    ]
    f = p.figures
    if "val_bpb" in f:
        trained = f" after {fmt(p.bpb_tokens)} tokens" if p.bpb_tokens else ""
        lines.append(f"BPB {f['val_bpb']:.4f}{trained} <i>(quantized model, ONNX Runtime, validation split)</i>")
        if "bigram_bpb" in p.baselines:
            b = p.baselines
            verdict = "" if p.beats_bigram else " · <b style='color:#b00'>not below its bigram baseline</b>"
            lines.append(f"baselines of its tokenizer: bigram {b['bigram_bpb']:.4f}, unigram "
                         f"{b.get('unigram_bpb', float('nan')):.4f}{verdict}")
    where = html.escape((p.label or "no measurement") + (f" · fingerprint {p.fingerprint}" if p.fingerprint else ""))
    if "decode_ms" in f:
        lo, hi = p.spread.get("decode_ms", (None, None))
        band = f" (p10 {fmt(lo)}, p90 {fmt(hi)})" if lo is not None else ""
        lines.append(f"decode {f['decode_ms']:.4g} ms/token{band} <i>{where}</i>")
    if "prefill_ms" in f:
        lines.append(f"prefill {f['prefill_ms']:.4g} ms <i>{where}</i>")
    if p.newer:
        n = p.newer
        lines.append(f"measured again {n['created_at']:%Y-%m-%d %H:%M}: decode {n['decode_ms']:.4g} ms/token, "
                     f"prefill {n['prefill_ms']:.4g} ms <i>{html.escape(n['label'])}"
                     f"{' · fingerprint ' + html.escape(n['fingerprint']) if n['fingerprint'] else ''}</i> "
                     f"(the point is placed by the figures it was scored with)")
    mem = [f"{SHORT[k]} {fmt(f[k], k)}" for k in ("peak_memory_mb", "model_mb", "params") if k in f]
    if mem:
        lines.append(" · ".join(mem))
    if p.reason and p.state != "complete":
        lines.append(f"<span style='color:#b00'>{html.escape((p.stage or '') + ': ' + p.reason)[:160]}</span>")
    over = [k for k, v in p.constraints.items() if v is None or v > 0]
    if over:
        lines.append("over budget: " + ", ".join(html.escape(k) for k in over))
    if extra:
        lines.append(extra)
    return "<br>".join(lines)


def _symbol(p: TrialPoint) -> str:
    if p.over_budget:
        return "x"
    if p.label is None:
        return "square"
    return "circle" if p.label.startswith("measured:") else "diamond"


def _colour_values(points: Sequence[TrialPoint], color: str) -> tuple[list[Any], bool]:
    """Colour values and whether they are numbers (a colour bar) or categories (a legend)."""
    values = [p.figures.get(color, (p.spec or {}).get(color)) for p in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
    return values, numeric


def default_colour(data: StudyData, x: str, y: str) -> str:
    """The study's next objective after the two on the axes, else the parameter count."""
    return next((o for o in data.objective_names if o not in (x, y)), "params")


def pareto_figure(data: StudyData, *, x: str = "decode_ms", y: str = "val_bpb", color: str | None = None) -> go.Figure:
    """Quality against latency: every complete trial, the front as a staircase, budgets as lines.

    Feasible trials are filled markers coloured by ``color`` (another objective, a measured figure
    or a spec field such as ``n_layers`` or ``attention``); the shape says where the latency came
    from (circle measured, diamond estimated, square unmeasured); trials on the study's stored
    front have a red ring, and the red staircase is the front in these two axes. A cross marks a
    trial over a budget: complete ones where they lie, the ones rejected after measuring (never
    trained, so without a BPB) on the strip below at their measured latency.
    """
    color = color or default_colour(data, x, y)
    complete = [p for p in data.points if p.state == "complete" and x in p.figures and y in p.figures]
    rejected = [p for p in data.points if p.state == "infeasible" and x in p.figures and y not in p.figures]
    # A strip below for the trials rejected when measured, only when there are any: an empty
    # second row would carry the shared x axis and its labels away from the points.
    rows = 2 if rejected else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=[0.86, 0.14] if rejected else None,
                        vertical_spacing=0.03)  # fmt: skip
    feasible = [p for p in complete if p.feasible]
    shown_colourbar = _add_feasible(fig, feasible, x, y, color, data.bpb_std)
    front = _front_line(feasible, x, y, (data.direction(x), data.direction(y)))
    if front:
        fig.add_trace(_staircase(front, FRONT_COLOUR, mode="lines", name="Pareto front"), row=1, col=1)
    _add_over_budget(fig, [p for p in complete if not p.feasible], rejected, x, y)
    budget = data.budgets.get(x)
    xs = [p.figures[x] for p in complete + rejected]
    subtitle = (_pareto_subtitle(data, complete, rejected) + _add_budget_line(fig, budget, x, xs, rows)
                + (_add_baseline_lines(fig, data, [p.figures[y] for p in complete]) if y == "val_bpb" else ""))
    if shown_colourbar:
        fig.update_layout(
            coloraxis={
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": SHORT.get(color, color)}, "thickness": 14},
            }
        )
    fig.update_yaxes(title_text=FIGURES.get(y, y), row=1, col=1)
    if rejected:
        fig.update_yaxes(showgrid=False, row=2, col=1)
    fig.update_xaxes(title_text=FIGURES.get(x, x), row=rows, col=1)
    if xs:
        # The range covers the points (and a budget line in view), not the p10-p90 bars: on a busy
        # machine one slow repeat would otherwise squeeze every point into a corner.
        lo, hi = min(xs), max(xs + ([budget] if budget is not None and budget <= 1.5 * max(xs) else []))
        pad = 0.06 * (hi - lo) or 0.1 * abs(hi) or 1.0
        fig.update_xaxes(range=[lo - pad, hi + pad], row=rows, col=1)
    return styled(fig, f"{data.name}: {SHORT.get(y, y)} against {SHORT.get(x, x)}", height=600, subtitle=subtitle)


def _noise_bars(points: Sequence[TrialPoint], axis: str, std: float | None) -> dict[str, Any] | None:
    """The study's seed spread of BPB as a +-1 std bar on each point's BPB."""
    if axis != "val_bpb" or std is None:
        return None
    return {"type": "constant", "value": std, "thickness": 1, "width": 3, "color": "rgba(80,80,80,0.45)"}


def _add_feasible(fig: go.Figure, feasible: list[TrialPoint], x: str, y: str, color: str,
                  std: float | None = None) -> bool:
    """The feasible trials, one trace per latency source (and per colour, when ``color`` is a
    category, so the legend names it); whether they use the colour bar."""
    values, numeric = _colour_values(feasible, color)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(feasible):
        kind = "estimated" if (p.label or "").startswith("estimated:") else "measured" if p.label else "unmeasured"
        key = kind if numeric else f"{color}={values[i]} · {kind}"
        groups.setdefault(key, []).append(i)
    palette = {v: STUDY_COLOURS[i % len(STUDY_COLOURS)] for i, v in enumerate(sorted({repr(v) for v in values}))}
    shown_colourbar = False
    for key, idx in groups.items():
        pts = [feasible[i] for i in idx]
        marker: dict[str, Any] = {
            "size": 10,
            "symbol": [_symbol(p) for p in pts],
            "line": {
                "width": [2.5 if p.on_front else 0.5 for p in pts],
                "color": [FRONT_COLOUR if p.on_front else "white" for p in pts],
            },
        }
        if numeric and any(values[i] is not None for i in idx):
            marker.update(color=[values[i] for i in idx], coloraxis="coloraxis")
            shown_colourbar = True
        elif not numeric:
            marker["color"] = palette[repr(values[idx[0]])]
        else:
            marker["color"] = FEASIBLE_COLOUR
        fig.add_trace(go.Scatter(
            x=[p.figures[x] for p in pts], y=[p.figures[y] for p in pts], mode="markers", name=key,
            marker=marker, error_x=_spread_bars(pts, x), error_y=_noise_bars(pts, y, std),
            customdata=[p.number for p in pts],
            text=[hover_text(p, f"{color}: {fmt(v) if numeric else v}" if v is not None else "")
                  for p, v in zip(pts, [values[i] for i in idx], strict=True)],
            hovertemplate="%{text}<extra></extra>",
        ), row=1, col=1)  # fmt: skip
    return shown_colourbar


def _add_over_budget(fig: go.Figure, over: list[TrialPoint], rejected: list[TrialPoint], x: str, y: str) -> None:
    """Crosses: complete trials over a budget where they lie, the trials rejected when measured
    on the strip below (row 2)."""
    if over:
        fig.add_trace(go.Scatter(
            x=[p.figures[x] for p in over], y=[p.figures[y] for p in over], mode="markers", name="over a budget",
            marker={"symbol": "x", "size": 10, "color": INFEASIBLE_COLOUR}, customdata=[p.number for p in over],
            text=[hover_text(p) for p in over], hovertemplate="%{text}<extra></extra>",
        ), row=1, col=1)  # fmt: skip
    if rejected:
        fig.add_trace(go.Scatter(
            x=[p.figures[x] for p in rejected], y=["not trained"] * len(rejected), mode="markers",
            name="over a budget when measured (not trained)",
            marker={"symbol": "x", "size": 9, "color": INFEASIBLE_COLOUR}, customdata=[p.number for p in rejected],
            text=[hover_text(p) for p in rejected], hovertemplate="%{text}<extra></extra>",
        ), row=2, col=1)  # fmt: skip


def _add_budget_line(fig: go.Figure, budget: float | None, x: str, xs: list[float], rows: int) -> str:
    """The x budget as a dashed line when it is near the points, else said in the subtitle: the
    returned text."""
    said = ""
    if budget is not None and xs and budget <= 1.5 * max(xs):
        for row in range(1, rows + 1):
            fig.add_vline(x=budget, line={"dash": "dash", "color": "#444", "width": 1}, row=row, col=1)  # type: ignore[arg-type]
        fig.add_annotation(
            x=budget,
            y=1,
            yref="y domain",
            text=f"budget {budget:g}",
            showarrow=False,
            xanchor="left",
            font={"size": 11, "color": "#444"},
            row=1,
            col=1,
        )
    elif budget is not None:
        said = f" · {SHORT.get(x, x)} budget {budget:g} (beyond the points)"
    return said

def _add_baseline_lines(fig: go.Figure, data: StudyData, ys: list[float]) -> str:
    """Each tokenizer's n-gram baselines as dotted lines of BPB (what counting pairs, or single
    tokens, of that tokenizer achieves): a model above its bigram line has learned nothing more.
    A unigram line far above the points is said in the returned subtitle text instead, so that it
    does not squeeze them."""
    said: list[str] = []
    top = max(ys) if ys else None
    for vocab, unigram, bigram in data.baselines():
        name = f"V{vocab}" if vocab else "its tokenizer"
        for kind, value, dash in (("bigram", bigram, "dot"), ("unigram", unigram, "dashdot")):
            if kind == "unigram" and (top is None or value > top + 0.5 * (top - min(ys) + 0.1)):
                said.append(f"unigram {name} {value:.3f}")
                continue
            fig.add_hline(y=value, line={"dash": dash, "color": "#888", "width": 1}, row=1, col=1)  # type: ignore[arg-type]
            fig.add_annotation(x=1, xref="x domain", y=value, text=f"{kind} {name} {value:.3f}", showarrow=False,
                               xanchor="right", yanchor="bottom", font={"size": 10, "color": "#666"}, row=1, col=1)
    flagged = sum(p.beats_bigram is False for p in data.points if p.state == "complete")
    text = " · dotted: bigram baselines" if data.baselines() else ""
    if data.noise is not None and data.noise.std is not None:
        close = sum(bool(v) for v in data.within_noise().values())
        text += (f" · BPB bars: ±{data.noise.std:.4f}, the seed spread ({len(data.noise.seeds)} seeds at "
                 f"{data.noise.tokens:,} tokens)")
        if close:
            text += f"; {close} front points within noise of another"
    if flagged:
        text += f" · {flagged} trial(s) not below their bigram baseline"
    if said:
        text += " · above the plot: " + ", ".join(said)
    return text


def _pareto_subtitle(data: StudyData, complete: list[TrialPoint], rejected: list[TrialPoint]) -> str:
    c = data.study.trial_counts
    front = sum(p.on_front for p in data.points)
    labels = sorted({p.label for p in complete if p.label})
    text = f"{len(complete)} complete trials plotted, {front} on the front"
    if labels:
        text += " · latency " + ", ".join(labels)
    unplotted = c.get("infeasible", 0) - len(rejected)
    if unplotted > 0:
        text += f" · {unplotted} infeasible before measuring"
    if c.get("failed"):
        text += f" · {c['failed']} failed"
    if c.get("running"):
        text += f" · {c['running']} running"
    if len(data.points) < data.study.n_trials:
        text += f" · thinned: {len(data.points)} of {data.study.n_trials} trials read"
    return text


def _spread_bars(points: Sequence[TrialPoint], x: str) -> dict[str, Any] | None:
    if not any(x in p.spread for p in points):
        return None
    lo = [p.figures[x] - p.spread[x][0] if x in p.spread else 0.0 for p in points]
    hi = [p.spread[x][1] - p.figures[x] if x in p.spread else 0.0 for p in points]
    return {
        "type": "data",
        "symmetric": False,
        "array": [max(v, 0.0) for v in hi],
        "arrayminus": [max(v, 0.0) for v in lo],
        "thickness": 1,
        "width": 0,
        "color": "rgba(80,80,80,0.35)",
    }


def _front_line(points: Sequence[TrialPoint], x: str, y: str, dirs: tuple[str, str]) -> list[tuple[float, float]]:
    """The non-dominated points in (x, y), sorted by x: the staircase drawn through them."""
    if not points:
        return []
    values = np.array([[p.figures[x], p.figures[y]] for p in points])
    front = values[non_dominated(values, dirs)]
    return sorted({(float(a), float(b)) for a, b in front})


def _staircase(front: list[tuple[float, float]], colour: str, **style: Any) -> go.Scatter:
    """A front in two axes as the staircase through its points (from :func:`_front_line`); no
    hover, since the points under it have theirs."""
    return go.Scatter(
        x=[a for a, _ in front],
        y=[b for _, b in front],
        line={"color": colour, "width": 2, "shape": "hv"},
        hoverinfo="skip",
        **style,
    )


def pareto3d_figure(data: StudyData, objectives: Sequence[str] | None = None) -> go.Figure:
    """Three objectives at once: the study's own when it has three or more, else BPB, decode
    latency and peak memory (the budget that binds first on small devices). Red points are on the
    front of these three, computed here; grey ones are dominated; crosses are over a budget."""
    names = list(objectives or [])
    if not names:
        names = data.objective_names[:3]
        for extra in ("decode_ms", "val_bpb", "peak_memory_mb", "params"):
            if len(names) < 3 and extra not in names:
                names.append(extra)
    x, y, z = names[:3]
    pts = [p for p in data.points if p.state == "complete" and all(k in p.figures for k in (x, y, z))]
    feasible = [p for p in pts if p.feasible]
    on_front = np.zeros(len(feasible), dtype=bool)
    if feasible:
        values = np.array([[p.figures[k] for k in (x, y, z)] for p in feasible])
        on_front = non_dominated(values, [data.direction(k) for k in (x, y, z)])
    fig = go.Figure()
    for name, group, colour, size in (
        ("dominated", [p for p, f in zip(feasible, on_front, strict=True) if not f], "#9aa9b8", 4),
        ("front in these three", [p for p, f in zip(feasible, on_front, strict=True) if f], FRONT_COLOUR, 6),
        ("over a budget", [p for p in pts if not p.feasible], INFEASIBLE_COLOUR, 4),
    ):
        if not group:
            continue
        fig.add_trace(go.Scatter3d(
            x=[p.figures[x] for p in group], y=[p.figures[y] for p in group], z=[p.figures[z] for p in group],
            mode="markers", name=name, customdata=[p.number for p in group],
            marker={"size": size, "color": colour, "symbol": "x" if name == "over a budget" else "circle",
                    "line": {"width": 0}},
            text=[hover_text(p) for p in group], hovertemplate="%{text}<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(
        scene={
            "xaxis": {"title": {"text": SHORT.get(x, x)}},
            "yaxis": {"title": {"text": SHORT.get(y, y)}},
            "zaxis": {"title": {"text": SHORT.get(z, z)}},
            "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}},
        }
    )
    sub = f"{int(on_front.sum())} of {len(feasible)} feasible trials on the front of {', '.join((x, y, z))}"
    return styled(fig, f"{data.name}: three objectives", height=600, subtitle=sub)


def hypervolume_figure(
    data: StudyData, *, x: str = "decode_ms", y: str = "val_bpb", reference: Sequence[float] | None = None
) -> go.Figure:
    """Hypervolume of the feasible front in (x, y) against wall-clock time since the first trial
    started: the search-efficiency figure. The reference point is stated in the
    subtitle; compare studies only with the same one (:func:`compare_figure` does)."""
    rows, ref = hypervolume_history(data, x, y, reference)
    fig = go.Figure()
    if rows:
        fig.add_trace(go.Scatter(
            x=[r["minutes"] for r in rows], y=[r["hypervolume"] for r in rows], mode="lines+markers",
            line={"shape": "hv", "color": FEASIBLE_COLOUR}, name="hypervolume",
            marker={"size": 7, "color": [FEASIBLE_COLOUR if r["state"] == "complete" else "#bbb" for r in rows]},
            customdata=[r["number"] for r in rows],
            hovertemplate="after trial %{customdata} (%{x:.1f} min): %{y:.4g}<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(title_text="minutes since the first trial started", rangemode="tozero")
    fig.update_yaxes(title_text=f"hypervolume ({SHORT.get(x, x)} × {SHORT.get(y, y)})", rangemode="tozero")
    sub = (
        f"reference point: {SHORT.get(x, x)} {ref[0]:.4g}, {SHORT.get(y, y)} {ref[1]:.4g} "
        "(worst feasible value + 10% of the range)"
        if ref and reference is None
        else f"reference point: {SHORT.get(x, x)} {ref[0]:.4g}, {SHORT.get(y, y)} {ref[1]:.4g}"
        if ref
        else "no complete feasible trial yet"
    )
    return styled(fig, f"{data.name}: hypervolume over time", height=420, subtitle=sub)


def dimensions_figure(data: StudyData, objective: str = "val_bpb", columns: int = 4) -> go.Figure:
    """The objective against each search dimension that varied, one panel per dimension, feasible
    complete trials only (red: on the front). A dimension that applies to some architectures only
    (kv heads for GQA, latent rank for MLA, repeats for layer sharing) shows just those."""
    dims = data.dimensions()
    pts = [p for p in data.feasible() if p.spec is not None and objective in p.figures]
    if not dims or not pts:
        fig = go.Figure()
        fig.add_annotation(
            text="no search dimension varied among the complete trials yet"
            if pts
            else "no complete feasible trial yet",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
        return styled(fig, f"{data.name}: {SHORT.get(objective, objective)} by search dimension", height=300)
    rows = math.ceil(len(dims) / columns)
    fig = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=dims,
        shared_yaxes=True,
        horizontal_spacing=0.03,
        vertical_spacing=min(0.5 / rows, 0.12),
    )
    for i, dim in enumerate(dims):
        _add_dimension_panel(fig, pts, dim, objective, row=i // columns + 1, col=i % columns + 1)
    for on_front, colour in ((False, FEASIBLE_COLOUR), (True, FRONT_COLOUR)):
        # A box trace's legend entry would be an empty box: a marker says what the colours mean.
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker={"color": colour, "size": 8},
                                 name="on the front" if on_front else "feasible", legendgroup=str(on_front)),
                      row=1, col=1)  # fmt: skip
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text=SHORT.get(objective, objective), row=r, col=1)
    fig.update_annotations(font={"size": 12})
    return styled(
        fig,
        f"{data.name}: {SHORT.get(objective, objective)} by search dimension",
        height=120 + 230 * rows,
        subtitle=f"{len(pts)} feasible complete trials; red: on the front",
    )


def _add_dimension_panel(
    fig: go.Figure, pts: list[TrialPoint], dim: str, objective: str, *, row: int, col: int
) -> None:
    """One panel of :func:`dimensions_figure`: ``objective`` against the values of ``dim``, among
    the trials it applies to, in the values' order."""
    sub = [p for p in pts if applies(dim, p.spec)]  # type: ignore[arg-type]
    raw = sorted({p.spec[dim] for p in sub}, key=lambda v: (isinstance(v, str), v))  # type: ignore[index]
    order = [str(v) for v in raw]
    for on_front, colour in ((False, FEASIBLE_COLOUR), (True, FRONT_COLOUR)):
        group = [p for p in sub if p.on_front == on_front]
        if not group:
            continue
        fig.add_trace(go.Box(
            x=[str(p.spec[dim]) for p in group], y=[p.figures[objective] for p in group],  # type: ignore[index]
            boxpoints="all", jitter=0.35, pointpos=0, fillcolor="rgba(0,0,0,0)", line={"width": 0},
            marker={"color": colour, "size": 6, "opacity": 0.8}, name="on the front" if on_front else "feasible",
            legendgroup=str(on_front), showlegend=False, customdata=[p.number for p in group],
            # A short hover: each trial is in every panel, and the full text in each would make
            # a large study's figure many megabytes. The Pareto figure has the full story.
            hovertemplate=f"trial %{{customdata}}<br>{html.escape(dim)} %{{x}}: "
                          f"{SHORT.get(objective, objective)} %{{y:.4g}}<extra></extra>",
        ), row=row, col=col)  # fmt: skip
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order, row=row, col=col)


def compare_figure(studies: Sequence[StudyData], *, x: str = "decode_ms", y: str = "val_bpb") -> go.Figure:
    """Several studies on the same axes: their fronts (left) and their hypervolume over time
    (right), all against one reference point taken over every study's feasible trials, so the
    curves can be compared (e.g. TPE against random search with the same budget)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.09,
        subplot_titles=(f"{SHORT.get(y, y)} against {SHORT.get(x, x)}", "hypervolume over time"),
    )
    dirs = (studies[0].direction(x), studies[0].direction(y)) if studies else ("minimize", "minimize")
    every = [[p.figures[x], p.figures[y]] for d in studies for p in d.feasible() if x in p.figures and y in p.figures]
    ref = reference_point(np.array(every), dirs) if every else None
    for i, d in enumerate(studies):
        _add_compared_study(fig, d, STUDY_COLOURS[i % len(STUDY_COLOURS)], x, y, dirs, ref)
    fig.update_xaxes(title_text=FIGURES.get(x, x), row=1, col=1)
    fig.update_yaxes(title_text=FIGURES.get(y, y), row=1, col=1)
    fig.update_xaxes(title_text="minutes since each study's first trial", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text="hypervolume", rangemode="tozero", row=1, col=2)
    sub = (
        f"common reference point: {SHORT.get(x, x)} {ref[0]:.4g}, {SHORT.get(y, y)} {ref[1]:.4g} "
        "(worst feasible value over all these studies + 10% of the range)"
        if ref
        else "no feasible trial yet"
    )
    return styled(fig, "Studies compared: " + ", ".join(d.name for d in studies), height=520, subtitle=sub)


def _add_compared_study(
    fig: go.Figure, d: StudyData, colour: str, x: str, y: str, dirs: tuple[str, str], ref: list[float] | None
) -> None:
    """One study of :func:`compare_figure` in its colour: its feasible trials and front (left),
    its hypervolume against the common reference point ``ref`` (right)."""
    pts = [p for p in d.feasible() if x in p.figures and y in p.figures]
    fig.add_trace(go.Scatter(
        x=[p.figures[x] for p in pts], y=[p.figures[y] for p in pts], mode="markers", name=d.name,
        legendgroup=d.name, marker={"color": colour, "size": 7, "opacity": 0.45,
                                    "symbol": [_symbol(p) for p in pts]},
        customdata=[p.number for p in pts], text=[f"<b>{html.escape(d.name)}</b><br>" + hover_text(p) for p in pts],
        hovertemplate="%{text}<extra></extra>",
    ), row=1, col=1)  # fmt: skip
    front = _front_line(pts, x, y, dirs)
    if front:
        fig.add_trace(
            _staircase(front, colour, mode="lines+markers", name=f"{d.name} front", legendgroup=d.name,
                       showlegend=False, marker={"size": 8}),
            row=1, col=1,
        )  # fmt: skip
    if ref is not None:
        rows, _ = hypervolume_history(d, x, y, ref)
        fig.add_trace(go.Scatter(
            x=[r["minutes"] for r in rows], y=[r["hypervolume"] for r in rows], mode="lines", name=d.name,
            legendgroup=d.name, showlegend=False, line={"color": colour, "width": 2, "shape": "hv"},
            customdata=[r["number"] for r in rows],
            hovertemplate=f"{html.escape(d.name)} after trial %{{customdata}} (%{{x:.1f}} min): %{{y:.4g}}"
                          "<extra></extra>",
        ), row=1, col=2)  # fmt: skip


def study_figures(data: StudyData, *, color: str | None = None) -> dict[str, go.Figure]:
    """Every figure of one study, by the name the web page and the HTML page use."""
    return {
        "pareto": pareto_figure(data, color=color),
        "pareto3d": pareto3d_figure(data),
        "hypervolume": hypervolume_figure(data),
        "dimensions": dimensions_figure(data),
    }

