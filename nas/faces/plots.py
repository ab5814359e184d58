"""Plotly figures of a study, read through the store's API (no SQL here, no torch, no ONNX Runtime).

Two steps, so that the CLI, the web page and the tests share one reading of the data:

1. :func:`load_study` reads a study through :class:`nas.store.Store` into :class:`StudyData`:
   one :class:`TrialPoint` per trial with every figure it has (objectives, the latency spread of
   its measurement and the measurement's label, the spec's fields) and the budgets the study ran
   under, recovered from the stored constraint values (figure minus budget), so a plot shows the
   budget the study really had even if the profile's YAML has changed since.
2. The ``*_figure`` functions turn that value into ``plotly.graph_objects.Figure`` objects:
   :func:`pareto_figure` (BPB against decode latency), :func:`pareto3d_figure`,
   :func:`hypervolume_figure`, :func:`dimensions_figure` and :func:`compare_figure`.

Every point's hover says where its latency came from (``measured:local``, ``measured:<node>``,
``estimated:roofline``); the marker's shape says it too (circle measured, diamond estimated), and a
cross marks a trial over a budget. :func:`page_html` puts the figures on one self-contained page
with plotly.js embedded, so the file opens offline.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nas.store import Store, StudyRow, TrialRow, non_dominated

MIB = 2**20

# What each figure is, for axis titles and hovers. Every one of them is lower-is-better.
FIGURES: dict[str, str] = {
    "val_bpb": "validation BPB (quantized, ONNX Runtime)",
    "decode_ms": "decode latency (ms/token, median)",
    "prefill_ms": "prefill latency (ms, median)",
    "peak_memory_mb": "peak memory (MiB)",
    "model_mb": "model size (MiB)",
    "params": "parameters",
}
SHORT: dict[str, str] = {
    "val_bpb": "BPB", "decode_ms": "decode ms/token", "prefill_ms": "prefill ms", "peak_memory_mb": "peak MiB",
    "model_mb": "model MiB", "params": "params",
}  # fmt: skip
# Constraint keys (as the search writes them) -> the figure each one bounds.
BUDGET_OF = {
    "decode_ms_per_token": "decode_ms",
    "prefill_ms": "prefill_ms",
    "peak_memory_mb": "peak_memory_mb",
    "model_mb": "model_mb",
}
# Spec fields that only mean something for some architectures: a panel of the dimension figure
# shows them only where they apply, or an MHA model's "latent rank 0" would look like a choice.
APPLIES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "n_kv_heads": ("attention", ("gqa",)),
    "mla_latent_rank": ("attention", ("mla",)),
    "mla_rope_dim": ("attention", ("mla",)),
    "share_repeat": ("layer_sharing", ("block_repeat",)),
}
FRONT_COLOUR = "#d62728"
FEASIBLE_COLOUR = "#1f77b4"
INFEASIBLE_COLOUR = "#7f7f7f"
STUDY_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


# --- reading a study ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrialPoint:
    """One trial as the figures see it."""

    number: int
    state: str
    """running, complete, failed or infeasible (as the store has it)."""
    feasible: bool
    """Complete and within every budget: only these take part in a front."""
    on_front: bool
    """On the study's stored Pareto front (``Store.pareto``)."""
    summary: str | None
    arch_id: str | None
    label: str | None
    """Where the latency figures came from, e.g. ``measured:local``; None without a measurement."""
    figures: dict[str, float]
    """val_bpb, decode_ms, prefill_ms, peak_memory_mb, model_mb, params: whichever it has."""
    spread: dict[str, tuple[float, float]]
    """p10 and p90 of decode_ms and prefill_ms, where measured."""
    spec: dict[str, Any] | None
    """The ArchSpec's fields, when loaded with ``specs=True``."""
    stage: str | None
    reason: str | None
    constraints: dict[str, float | None]
    started_at: datetime
    finished_at: datetime | None

    @property
    def over_budget(self) -> bool:
        """Judged and found over a budget (an invalid draw has no budget verdict)."""
        return any(v is None or v > 0 for v in self.constraints.values())


@dataclass(frozen=True, kw_only=True)
class StudyData:
    study: StudyRow
    points: list[TrialPoint]
    budgets: dict[str, float] = field(default_factory=dict)
    """figure -> the budget on it (e.g. decode_ms -> 10.0), recovered from constraint values."""
    db: str = ""

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.study.objectives]

    def direction(self, figure: str) -> str:
        """The study's direction for an objective; every other figure we plot is minimized."""
        return next((o.direction for o in self.study.objectives if o.name == figure), "minimize")

    def feasible(self) -> list[TrialPoint]:
        return [p for p in self.points if p.feasible]

    def dimensions(self) -> list[str]:
        """Spec fields that take more than one value among the loaded specs, in the spec's order."""
        specs = [p.spec for p in self.points if p.spec]
        if not specs:
            return []
        out = []
        for name in specs[0]:
            values = {repr(s.get(name)) for s in specs if _applies(name, s)}
            if len(values) > 1:
                out.append(name)
        return out


_ARCH_CACHE: dict[str, dict[str, Any]] = {}
"""arch_id -> spec fields. An arch_id is the hash of the spec's canonical form, so the same id
means the same spec in any database: safe to keep for the life of the process (the web page)."""


def load_study(store: Store, name: str, *, specs: bool = True, max_points: int | None = None) -> StudyData:
    """Read study ``name`` through the store: trials, their measurements, the front, the budgets.

    Three queries whatever the size (trials, front, the profile's measurements), plus one per
    architecture not seen before when ``specs`` (the dimension figure and colouring by a spec field
    need them; the Pareto figure does not). ``max_points`` keeps the front, the running and the
    failed trials, and thins the others evenly to that many, for a page that must stay fast on a
    large study (the figures' subtitles say so).
    """
    study = store.get_study(name=name)
    trials = store.trials(study=name)
    front = {t.number for t in store.pareto(study=name)}
    wanted = {t.measurement_id for t in trials if t.measurement_id is not None}
    measurements = {m.id: m for m in store.measurements(ids=wanted)} if wanted else {}
    if max_points is not None:
        trials = _thin(trials, front, max_points)
    points = []
    for t in trials:
        spec = _spec_of(store, t.arch_id) if specs else None
        points.append(_point(t, measurements.get(t.measurement_id), spec, t.number in front))  # type: ignore[arg-type]
    return StudyData(study=study, points=points, budgets=_budgets(points), db=store.url)


def thinned(store: Store, data: StudyData, max_points: int, *, specs: bool = True) -> StudyData:
    """``data`` thinned as :func:`load_study` thins (front, running and failed kept, an even sample
    of the rest), with the specs of the kept points filled in when ``specs``. The budgets stay
    those of every trial. For a page that reads a large study once, for its table, and draws a
    sample of it."""
    front = {p.number for p in data.points if p.on_front}
    points = _thin(data.points, front, max_points)
    if specs:
        points = [
            p if p.spec is not None or p.arch_id is None else replace(p, spec=_spec_of(store, p.arch_id))
            for p in points
        ]
    return replace(data, points=points)


def _spec_of(store: Store, arch_id: str | None) -> dict[str, Any] | None:
    if arch_id is None:
        return None
    spec = _ARCH_CACHE.get(arch_id)
    if spec is None:
        spec = store.get_architecture(arch_id=arch_id).spec.to_dict()
        _ARCH_CACHE[arch_id] = spec
    return spec


def _thin(trials: list[Any], front: set[int], max_points: int) -> list[Any]:
    """Keep the front, the running and the failed trials (few, and not plotted), and an even
    sample of the others (complete and infeasible, in trial order) up to ``max_points``."""
    rest = [t for t in trials if t.state in ("complete", "infeasible") and t.number not in front]
    if len(rest) <= max_points:
        return trials
    keep = {rest[int(i)].number for i in np.linspace(0, len(rest) - 1, max_points)} if max_points > 0 else set()
    return [t for t in trials if t.state in ("running", "failed") or t.number in front or t.number in keep]


def _point(t: TrialRow, m: Any, spec: dict[str, Any] | None, on_front: bool) -> TrialPoint:
    figures: dict[str, float] = {}
    spread: dict[str, tuple[float, float]] = {}
    if m is not None and m.ok:
        # The measurement is where the latency figures come from; the trial's objectives copy them.
        for key, value in (
            ("decode_ms", m.decode_ms_per_token),
            ("prefill_ms", m.prefill_ms),
            ("peak_memory_mb", None if m.peak_memory_bytes is None else m.peak_memory_bytes / MIB),
            ("model_mb", None if m.model_bytes is None else m.model_bytes / MIB),
        ):
            if value is not None:
                figures[key] = float(value)
        if m.decode_p10_ms is not None and m.decode_p90_ms is not None:
            spread["decode_ms"] = (m.decode_p10_ms, m.decode_p90_ms)
        if m.prefill_p10_ms is not None and m.prefill_p90_ms is not None:
            spread["prefill_ms"] = (m.prefill_p10_ms, m.prefill_p90_ms)
    for key, value in (t.objectives or {}).items():
        if value is not None and math.isfinite(value):
            figures.setdefault(key, float(value))
    if t.val_bpb is not None:
        figures["val_bpb"] = float(t.val_bpb)
    if spec is not None and "params" not in figures:
        from nas.spec.arch import ArchSpec

        figures["params"] = float(ArchSpec.from_dict(spec).params())
    return TrialPoint(
        number=t.number, state=t.state, feasible=t.state == "complete" and t.feasible, on_front=on_front,
        summary=t.arch_summary, arch_id=t.arch_id, label=m.label if m is not None else None, figures=figures,
        spread=spread, spec=spec, stage=t.failed_stage, reason=t.failure_reason, constraints=dict(t.constraints or {}),
        started_at=t.started_at, finished_at=t.finished_at,
    )  # fmt: skip


def _budgets(points: Sequence[TrialPoint]) -> dict[str, float]:
    """Each budget as figure minus its constraint value, the median over the trials that have both
    (they agree up to rounding: the search writes constraint = figure - budget)."""
    seen: dict[str, list[float]] = {}
    for p in points:
        for key, c in p.constraints.items():
            figure = BUDGET_OF.get(key)
            if figure and c is not None and figure in p.figures:
                seen.setdefault(figure, []).append(p.figures[figure] - c)
    return {k: float(np.median(v)) for k, v in seen.items()}


def _applies(name: str, spec: dict[str, Any]) -> bool:
    rule = APPLIES.get(name)
    return rule is None or spec.get(rule[0]) in rule[1]


# --- hypervolume ---------------------------------------------------------------------------------------
def hypervolume_2d(
    points: Iterable[Sequence[float]], reference: Sequence[float], directions: Sequence[str] = ("minimize", "minimize")
) -> float:
    """The area dominated by ``points`` and bounded by ``reference``, in two objectives.

    Optuna's own hypervolume is private (NOTES.md), so it is computed here: sort by the first
    objective and add, for each point that improves the second, the strip it newly covers. Points
    that do not strictly beat the reference in both objectives add nothing. Maximized objectives
    are negated first, so the reference must lie below every point that should count.
    """
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    pts = np.asarray(list(points), dtype=float).reshape(-1, 2) * sign
    ref = np.asarray(reference, dtype=float) * sign
    pts = pts[np.all(pts < ref, axis=1) & np.all(np.isfinite(pts), axis=1)]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def reference_point(values: np.ndarray, directions: Sequence[str]) -> list[float]:
    """The worst value seen in each objective, pushed out by a tenth of the range seen (or a tenth
    of its size when every value is the same), so that the worst points still add a little area."""
    vals = np.asarray(values, dtype=float).reshape(-1, len(directions))
    ref = []
    for i, d in enumerate(directions):
        col = vals[:, i]
        span = float(col.max() - col.min()) or abs(float(col.max())) or 1.0
        ref.append(float(col.max() + 0.1 * span) if d == "minimize" else float(col.min() - 0.1 * span))
    return ref


def hypervolume_history(
    data: StudyData, x: str = "decode_ms", y: str = "val_bpb", reference: Sequence[float] | None = None
) -> tuple[list[dict[str, Any]], list[float]]:
    """The hypervolume of the feasible front after each trial finished, in finishing order.

    Returns one row per finished trial (number, minutes since the study's first trial started,
    hypervolume) and the reference point used (default: :func:`reference_point` of this study).
    """
    dirs = (data.direction(x), data.direction(y))
    done = sorted((p for p in data.points if p.finished_at is not None), key=lambda p: (p.finished_at, p.number))
    usable = [p for p in done if p.feasible and x in p.figures and y in p.figures]
    if reference is None:
        if not usable:
            return [], []
        reference = reference_point(np.array([[p.figures[x], p.figures[y]] for p in usable]), dirs)
    start = min((p.started_at for p in data.points), default=None)
    front: list[tuple[float, float]] = []
    rows, hv = [], 0.0
    for p in done:
        if p.feasible and x in p.figures and y in p.figures:
            candidate = (p.figures[x], p.figures[y])
            pts = np.array([*front, candidate])
            front = [tuple(r) for r in pts[non_dominated(pts, dirs)]]  # type: ignore[misc]
            hv = hypervolume_2d(front, reference, dirs)
        minutes = (p.finished_at - start).total_seconds() / 60 if start and p.finished_at else 0.0
        rows.append({"number": p.number, "minutes": minutes, "hypervolume": hv, "state": p.state})
    return rows, list(reference)


# --- figures ---------------------------------------------------------------------------------------------
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
        lines.append(f"BPB {f['val_bpb']:.4f} <i>(quantized model, ONNX Runtime, validation split)</i>")
    where = html.escape(p.label or "no measurement")
    if "decode_ms" in f:
        lo, hi = p.spread.get("decode_ms", (None, None))
        band = f" (p10 {fmt(lo)}, p90 {fmt(hi)})" if lo is not None else ""
        lines.append(f"decode {f['decode_ms']:.4g} ms/token{band} <i>{where}</i>")
    if "prefill_ms" in f:
        lines.append(f"prefill {f['prefill_ms']:.4g} ms <i>{where}</i>")
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
            marker=marker, error_x=_spread_bars(pts, x), customdata=[p.number for p in pts],
            text=[hover_text(p, f"{color}: {fmt(v) if numeric else v}" if v is not None else "")
                  for p, v in zip(pts, [values[i] for i in idx], strict=True)],
            hovertemplate="%{text}<extra></extra>",
        ), row=1, col=1)  # fmt: skip
    front = _front_line(feasible, x, y, (data.direction(x), data.direction(y)))
    if front:
        fig.add_trace(
            go.Scatter(
                x=[a for a, _ in front],
                y=[b for _, b in front],
                mode="lines",
                name="Pareto front",
                line={"color": FRONT_COLOUR, "width": 2, "shape": "hv"},
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
    over = [p for p in complete if not p.feasible]
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
    subtitle = _pareto_subtitle(data, complete, rejected)
    budget = data.budgets.get(x)
    xs = [p.figures[x] for p in complete + rejected]
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
        subtitle += f" · {SHORT.get(x, x)} budget {budget:g} (beyond the points)"
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
    started: the search-efficiency figure of DESIGN.md. The reference point is stated in the
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
        row, col = i // columns + 1, i % columns + 1
        sub = [p for p in pts if _applies(dim, p.spec)]  # type: ignore[arg-type]
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
        colour = STUDY_COLOURS[i % len(STUDY_COLOURS)]
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
                go.Scatter(
                    x=[a for a, _ in front],
                    y=[b for _, b in front],
                    mode="lines+markers",
                    name=f"{d.name} front",
                    legendgroup=d.name,
                    showlegend=False,
                    line={"color": colour, "width": 2, "shape": "hv"},
                    marker={"size": 8},
                    hoverinfo="skip",
                ),
                row=1,
                col=1,
            )
        if ref is not None:
            rows, _ = hypervolume_history(d, x, y, ref)
            fig.add_trace(go.Scatter(
                x=[r["minutes"] for r in rows], y=[r["hypervolume"] for r in rows], mode="lines", name=d.name,
                legendgroup=d.name, showlegend=False, line={"color": colour, "width": 2, "shape": "hv"},
                customdata=[r["number"] for r in rows],
                hovertemplate=f"{html.escape(d.name)} after trial %{{customdata}} (%{{x:.1f}} min): %{{y:.4g}}"
                              "<extra></extra>",
            ), row=1, col=2)  # fmt: skip
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


def study_figures(data: StudyData, *, color: str | None = None) -> dict[str, go.Figure]:
    """Every figure of one study, by the name the web page and the HTML page use."""
    return {
        "pareto": pareto_figure(data, color=color),
        "pareto3d": pareto3d_figure(data),
        "hypervolume": hypervolume_figure(data),
        "dimensions": dimensions_figure(data),
    }


# --- a self-contained page -------------------------------------------------------------------------------
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


def page_html(
    data: StudyData, figures: dict[str, go.Figure], *, compared: go.Figure | None = None, generated_by: str = "nas plot"
) -> str:
    """One HTML page with every figure and plotly.js embedded once: it opens offline, from a file
    or an email attachment, with nothing fetched from a CDN."""
    from plotly.offline import get_plotlyjs

    s = data.study
    captions = {
        "pareto": "Hover a point for its architecture and where each figure came from; drag to zoom, "
        "double-click to reset. Circle: measured; diamond: estimated by the roofline; cross: over a budget.",
        "pareto3d": "Drag to turn. Red points are non-dominated in all three objectives.",
        "hypervolume": "Area dominated by the feasible front, as the search went on: higher is better.",
        "dimensions": "Each dimension that varied, against the objective; a clear slope or gap suggests it matters. "
        "At short training budgets a second seed moves BPB about as much (NOTES.md).",
    }
    parts = []
    for i, (name, fig) in enumerate({**figures, **({"compare": compared} if compared else {})}.items()):
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        caption = f"<p class='muted small'>{html.escape(captions[name])}</p>" if name in captions else ""
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


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless and quiet on a closed network (NOTES.md): without these it stalls on update checks.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str:
    """The Chromium binary: ``$NAS_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on the PATH."""
    import os
    import shutil

    from nas.spec.errors import NasError

    wanted = os.environ.get("NAS_CHROMIUM")
    if wanted:
        if not (Path(wanted).is_file() and os.access(wanted, os.X_OK)):
            raise NasError(f"NAS_CHROMIUM={wanted}: not an executable file")
        return wanted
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise NasError(
        "--png needs Chromium: install it (Debian: `apt-get install chromium`) or set NAS_CHROMIUM "
        "to its path; the HTML page needs nothing"
    )


def write_png(
    path: Path, figure: go.Figure, *, width: int = 1200, height: int | None = None, timeout_s: float = 90.0
) -> Path:
    """A static PNG of one figure, drawn by the system's Chromium (headless, offline) with the
    plotly.js of the plotly package: the HTML page's own renderer, and no kaleido, whose browser
    download cannot work on a closed network. Twice the pixels, for a sharp image.

    The page draws the figure, asks plotly for its image (``Plotly.toImage``, which also reads back
    3-D WebGL scenes, where a screenshot of the window caught them blank) and writes the data URL
    into the document, which Chromium prints with ``--dump-dom``.
    """
    import base64
    import json
    import re
    import subprocess
    import tempfile

    from plotly.offline import get_plotlyjs

    from nas.spec.errors import NasError

    chromium = find_chromium()
    height = int(height or figure.layout.height or 600)
    fig = go.Figure(figure).update_layout(width=width, height=height)
    spec = fig.to_plotly_json()
    script = (
        "const spec = " + json.dumps(spec, cls=_plotly_encoder()) + ";\n"
        "Plotly.newPlot('fig', spec.data, spec.layout, {staticPlot: true})"
        f".then(gd => Plotly.toImage(gd, {{format: 'png', width: {width}, height: {height}, scale: 2}}))"
        ".then(url => { document.getElementById('out').textContent = url; })"
        ".catch(e => { document.getElementById('out').textContent = 'error: ' + e; });"
    )
    script = script.replace("</", "<\\/")  # hover text may hold "</b>": keep it from closing the script
    page = (f"<!doctype html><html><head><meta charset='utf-8'><script>{get_plotlyjs()}</script></head><body>"
            f"<div id='fig' style='width:{width}px;height:{height}px'></div><pre id='out'></pre>"
            f"<script>{script}</script></body></html>")  # fmt: skip
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="nas-png-") as tmp:
        html_file = Path(tmp) / "figure.html"
        html_file.write_text(page, encoding="utf-8")
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               "--virtual-time-budget=15000", "--dump-dom", html_file.as_uri()]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NasError(f"{chromium} did not draw the figure within {timeout_s:g} s") from None
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", r.stdout, re.S)
    out = found.group(1).strip() if found else ""
    if r.returncode != 0 or not out.startswith("data:image/png;base64,"):
        why = out or ((r.stderr or "").strip().splitlines() or ["no output"])[-1]
        raise NasError(f"{chromium} could not draw {path.name} (exit {r.returncode}): {why[:300]}")
    path.write_bytes(base64.b64decode(out.split(",", 1)[1]))
    return path


def _plotly_encoder() -> type:
    from plotly.utils import PlotlyJSONEncoder

    return PlotlyJSONEncoder
