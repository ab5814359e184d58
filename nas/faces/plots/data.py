"""Reading a study for its figures: one :class:`TrialPoint` per trial, in a :class:`StudyData`.

The CLI, the web page and the tests share this one reading, so a figure means the same wherever
it is drawn. Everything comes through :class:`nas.store.Store` (no SQL here).

The specs of the trials' architectures are read one query per architecture, so they are kept in
a :class:`SpecCache` that the caller owns: the web page keeps one for its life, ``nas plot`` one
per call. Nothing here holds state between calls on its own.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from nas.spec.results import beats_bigram
from nas.store import NoiseRow, Store, StudyRow, TrialRow

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
    bpb_tokens: int | None = None
    """Tokens the scored model was trained on: with rungs, a trial may have stopped early."""
    baselines: dict[str, float] = field(default_factory=dict)
    """``unigram_bpb`` and ``bigram_bpb`` of the trial's own tokenizer on the same validation
    text (what counting alone achieves), and its ``vocab_size`` where the search stored it."""
    fingerprint: str | None = None
    """The fingerprint of the machine its latency figures rest on (an estimate's: the host's)."""
    newer: dict[str, Any] | None = None
    """A measurement of its architecture taken after the one it was scored with (``nas
    remeasure``): label, fingerprint, decode_ms, prefill_ms, created_at. Front trials only."""

    @property
    def beats_bigram(self) -> bool | None:
        """Whether the trial's BPB is below its tokenizer's bigram baseline (None: either is
        missing). A trial that is not has learned nothing that counting pairs would not."""
        return beats_bigram(self.figures.get("val_bpb"), self.baselines)

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
    noise: NoiseRow | None = None
    """The study's seed spread of BPB (``nas.search.noise``), None before it is measured."""

    @property
    def has_rungs(self) -> bool:
        """Whether the study's trials may have stopped at different budgets (rungs)."""
        return int((self.study.extra.get("rungs") or {}).get("count", 1)) > 1

    @property
    def bpb_std(self) -> float | None:
        return self.noise.std if self.noise is not None else None

    def within_noise(self) -> dict[int, list[int]]:
        """Front trials whose BPBs are within noise of each other (``NoiseRow.within``)."""
        front = {p.number: p.figures["val_bpb"] for p in self.points if p.on_front and "val_bpb" in p.figures}
        return self.noise.within(front) if self.noise is not None else {n: [] for n in front}

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

    def baselines(self) -> list[tuple[int | None, float, float]]:
        """(vocab size or None, unigram BPB, bigram BPB) of each tokenizer the trials used, by
        bigram BPB: the reference lines of the quality axis."""
        seen: dict[tuple[float, float], int | None] = {}
        for p in self.points:
            b = p.baselines
            if "unigram_bpb" in b and "bigram_bpb" in b:
                key = (b["unigram_bpb"], b["bigram_bpb"])
                vocab = int(b["vocab_size"]) if "vocab_size" in b else None
                seen[key] = seen.get(key) or vocab
        return sorted(((v, u, bg) for (u, bg), v in seen.items()), key=lambda r: r[2])

    def dimensions(self) -> list[str]:
        """Spec fields that take more than one value among the loaded specs, in the spec's order."""
        specs = [p.spec for p in self.points if p.spec]
        if not specs:
            return []
        out = []
        for name in specs[0]:
            values = {repr(s.get(name)) for s in specs if applies(name, s)}
            if len(values) > 1:
                out.append(name)
        return out


class SpecCache:
    """arch_id -> the spec's fields, for the ``size`` architectures used most recently.

    An arch_id is the hash of the spec's canonical form, so the same id means the same spec in any
    database and an entry never goes stale: the bound is only there because the web page's cache
    lives as long as the server, over every study it is asked for. 10,000 specs take about 5 MiB.
    Safe to share between the web page's request threads.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._specs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, store: Store, arch_id: str | None) -> dict[str, Any] | None:
        """The fields of architecture ``arch_id`` (None for a trial without one), read from
        ``store`` only when this cache does not hold them."""
        if arch_id is None:
            return None
        with self._lock:
            spec = self._specs.get(arch_id)
            if spec is not None:
                self._specs.move_to_end(arch_id)
                return spec
        # Read outside the lock: two threads may read the same spec once each, which is harmless,
        # where one slow query under the lock would hold up every other request.
        spec = store.get_architecture(arch_id=arch_id).spec.to_dict()
        with self._lock:
            self._specs[arch_id] = spec
            self._specs.move_to_end(arch_id)
            while len(self._specs) > self.size:
                self._specs.popitem(last=False)
        return spec


def load_study(
    store: Store, name: str, *, specs: bool = True, max_points: int | None = None, cache: SpecCache | None = None
) -> StudyData:
    """Read study ``name`` through the store: trials, their measurements, the front, the budgets.

    Three queries whatever the size (trials, front, the profile's measurements), two per front
    trial (a newer measurement of its architecture), plus one per
    architecture that ``cache`` does not hold when ``specs`` (the dimension figure and colouring by
    a spec field need them; the Pareto figure does not). Without a ``cache`` the specs are kept for
    this call only. ``max_points`` keeps the front, the running and the failed trials, and thins
    the others evenly to that many, for a page that must stay fast on a large study (the figures'
    subtitles say so).
    """
    cache = SpecCache() if cache is None else cache  # (an empty cache is falsy: it has a length)
    study = store.get_study(name=name)
    trials = store.trials(study=name)
    front = {t.number for t in store.pareto(study=name)}
    wanted = {t.measurement_id for t in trials if t.measurement_id is not None}
    measurements = {m.id: m for m in store.measurements(ids=wanted)} if wanted else {}
    if max_points is not None:
        trials = _thin(trials, front, max_points)
    points = []
    for t in trials:
        spec = cache.spec(store, t.arch_id) if specs else None
        point = _point(t, measurements.get(t.measurement_id), spec, t.number in front)  # type: ignore[arg-type]
        if point.on_front and t.measurement_id is not None:  # a query per front trial: the front is small
            point = replace(point, newer=_newer(store.newer_measurement(id=t.measurement_id)))
        points.append(point)
    return StudyData(study=study, points=points, budgets=_budgets(points), db=store.url, noise=store.noise(study=name))


def thinned(
    store: Store, data: StudyData, max_points: int, *, specs: bool = True, cache: SpecCache | None = None
) -> StudyData:
    """``data`` thinned as :func:`load_study` thins (front, running and failed kept, an even sample
    of the rest), with the specs of the kept points filled in when ``specs`` (through ``cache``,
    as there). The budgets stay those of every trial. For a page that reads a large study once,
    for its table, and draws a sample of it."""
    cache = SpecCache() if cache is None else cache  # (an empty cache is falsy: it has a length)
    front = {p.number for p in data.points if p.on_front}
    points = _thin(data.points, front, max_points)
    if specs:
        points = [
            p if p.spec is not None or p.arch_id is None else replace(p, spec=cache.spec(store, p.arch_id))
            for p in points
        ]
    return replace(data, points=points)


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
        measurement = m.to_measurement()
        figures.update(measurement.figures())
        spread.update(measurement.spreads())
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
        started_at=t.started_at, finished_at=t.finished_at, bpb_tokens=(t.train or {}).get("tokens"),
        baselines=_baselines(t, spec), fingerprint=m.fingerprint if m is not None else None,
    )  # fmt: skip


def _newer(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"label": row.label, "fingerprint": row.fingerprint, "decode_ms": row.decode_ms_per_token,
            "prefill_ms": row.prefill_ms, "created_at": row.created_at}


def _baselines(t: TrialRow, spec: dict[str, Any] | None) -> dict[str, float]:
    out = {k: float(v) for k, v in (t.baselines or {}).items()
           if k in ("unigram_bpb", "bigram_bpb", "vocab_size") and isinstance(v, int | float) and math.isfinite(v)}
    if "vocab_size" not in out and spec is not None:  # trials stored before the vocabulary was kept beside them
        out["vocab_size"] = float(spec["vocab_size"])
    return out


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


def applies(name: str, spec: dict[str, Any]) -> bool:
    """Whether spec field ``name`` means something for ``spec`` (see :data:`APPLIES`)."""
    rule = APPLIES.get(name)
    return rule is None or spec.get(rule[0]) in rule[1]
