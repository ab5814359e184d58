"""What the store hands out: frozen plain values, detached from any session.

Callers (the search, the CLI, the web page) hold these across long stretches of work; an ORM
object would tie them to a session that must stay open and would load lazily behind their back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.results import LatencyStats, Measurement, beats_bigram

if TYPE_CHECKING:
    from nas.spec.profile import CalibrationPoint


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (it stores no zone); ours are all UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, kw_only=True)
class ArchitectureRow:
    arch_id: str
    spec: ArchSpec
    summary: str
    params: int
    non_embedding_params: int
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class MeasurementRow:
    """Latency in milliseconds: the median, its p10/p90 spread and the raw repeats."""

    id: int
    arch_id: str
    profile: str
    bitwidth: int
    label: str
    """``measured:local``, ``measured:<node>`` or ``estimated:model`` (``estimated:roofline`` in old rows)."""
    prefill_ms: float | None
    prefill_p10_ms: float | None
    prefill_p90_ms: float | None
    prefill_repeats_ms: tuple[float, ...]
    decode_ms_per_token: float | None
    decode_p10_ms: float | None
    decode_p90_ms: float | None
    decode_repeats_ms: tuple[float, ...]
    peak_memory_bytes: int | None
    model_bytes: int | None
    workload: dict[str, Any]
    provenance: dict[str, Any]
    error: str | None
    """Why the measurement failed; None for a successful one."""
    created_at: datetime

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def measured(self) -> bool:
        """Taken on the device itself, as opposed to estimated."""
        return self.label.startswith("measured:")

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the machine its figures rest on: its own, or for an estimate the
        host measurement's it was made beside (None for rows written before fingerprints)."""
        host = self.provenance.get("host")
        fp = self.provenance.get("fingerprint") or (host.get("fingerprint") if isinstance(host, Mapping) else None)
        return fp if isinstance(fp, str) else None

    def to_measurement(self) -> Measurement:
        """The measurement as the stages made it (its repeats give back its statistics); a row
        written from figures alone keeps its median, p10 and p90."""
        if not self.ok or self.prefill_ms is None or self.decode_ms_per_token is None:
            raise NasError(f"measurement {self.id} failed ({self.error}): it has no figures")

        def stats(repeats: tuple[float, ...], median: float, p10: float | None, p90: float | None) -> LatencyStats:
            return LatencyStats.from_samples(repeats) if repeats else LatencyStats.of_median(median, p10, p90)

        return Measurement(
            arch_id=self.arch_id, profile=self.profile, bitwidth=self.bitwidth, label=self.label,
            prefill=stats(self.prefill_repeats_ms, self.prefill_ms, self.prefill_p10_ms, self.prefill_p90_ms),
            decode=stats(self.decode_repeats_ms, self.decode_ms_per_token, self.decode_p10_ms, self.decode_p90_ms),
            peak_memory_bytes=self.peak_memory_bytes, model_bytes=self.model_bytes or 0,
            workload=self.workload, provenance=self.provenance,
        )

    def summary(self) -> dict[str, Any]:
        """The row as plain JSON-able data: its figures under the names objectives use, their
        p10/p90, and where they came from. What `nas show --json`, the web API and an exported
        winner's manifest write."""
        out: dict[str, Any] = {"id": self.id, "label": self.label, "profile": self.profile,
                               "bitwidth": self.bitwidth, "error": self.error}
        figures: dict[str, Any] = {"decode_ms": None, "prefill_ms": None, "peak_memory_mb": None, "model_mb": None}
        if self.ok and self.prefill_ms is not None and self.decode_ms_per_token is not None:
            m = self.to_measurement()
            figures.update(m.figures())
            for key, (p10, p90) in m.spreads().items():
                out[key.replace("_ms", "_p10_ms")], out[key.replace("_ms", "_p90_ms")] = p10, p90
        out.update(figures, peak_memory_bytes=self.peak_memory_bytes, model_bytes=self.model_bytes,
                   workload=self.workload, provenance=self.provenance, created_at=self.created_at.isoformat())
        return out


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str
    """Either "minimize" or "maximize"."""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True, kw_only=True)
class StudyRow:
    id: int
    name: str
    optuna_study_id: int | None
    space: str
    profile: str
    corpus_fingerprint: str | None
    train_config: dict[str, Any]
    objectives: tuple[Objective, ...]
    seed: int | None
    code_version: str | None
    created_at: datetime
    extra: dict[str, Any]
    trial_counts: dict[str, int] = field(default_factory=dict)
    """Trials by state (running, complete, failed, infeasible), every state present."""

    @property
    def n_trials(self) -> int:
        return sum(self.trial_counts.values())


@dataclass(frozen=True, kw_only=True)
class TrialRow:
    id: int
    study_id: int
    study: str
    number: int
    """Optuna's trial number within the study."""
    optuna_trial_id: int | None
    arch_id: str | None
    arch_summary: str | None
    measurement_id: int | None
    state: str
    failed_stage: str | None
    failure_reason: str | None
    val_bpb: float | None
    baselines: dict[str, Any] | None
    train: dict[str, Any] | None
    curve: list[Any] | None
    objectives: dict[str, float] | None
    constraints: dict[str, float] | None
    artifact_dir: str | None
    worker: str | None
    started_at: datetime
    finished_at: datetime | None

    @property
    def feasible(self) -> bool:
        """Every constraint value is <= 0 (Optuna's convention); a missing value is not."""
        return all(v is not None and v <= 0 for v in (self.constraints or {}).values())

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def beats_bigram(self) -> bool | None:
        """BPB below its tokenizer's bigram baseline (``nas.spec.results.beats_bigram``)."""
        return beats_bigram(self.val_bpb, self.baselines)


@dataclass(frozen=True, kw_only=True)
class RungRow:
    """A trial's result at one rung: its validation bits per byte after ``tokens`` tokens.

    ``state`` and ``measurement_id`` are the trial's as the row was read (a rung is recorded
    while the trial runs; it may have finished or failed since), so that a rung decision can
    see, next to each score, whether that trial is still going and what it measured.
    """

    id: int
    trial_id: int
    study_id: int
    study: str
    number: int
    """The trial's number within the study (Optuna's)."""
    rung: int
    tokens: int
    """Tokens trained when scored."""
    val_bpb: float
    seconds: float
    """Training seconds so far, this rung's included."""
    state: str
    measurement_id: int | None
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class NoiseRow:
    """A study's seed spread of BPB: its reference architecture trained to ``tokens`` under each
    of ``seeds``, scored as a trial is. ``std`` is the sample standard deviation of ``bpbs`` (None
    with fewer than two seeds): the error bar of every BPB in the study, and the gap below which
    two trials' BPBs are within noise of each other."""

    study: str
    arch_id: str
    tokens: int
    seeds: tuple[int, ...]
    bpbs: tuple[float, ...]
    trial_number: int | None
    """The trial whose own run is one of the seeds."""

    @property
    def std(self) -> float | None:
        if len(self.bpbs) < 2:
            return None
        mean = sum(self.bpbs) / len(self.bpbs)
        return (sum((b - mean) ** 2 for b in self.bpbs) / (len(self.bpbs) - 1)) ** 0.5

    NOISE_GAP = 2.0
    """Two BPBs closer than this many seed standard deviations are within noise of each other:
    the difference of two seeds' BPBs has a spread of about 1.4 std, so a gap under 2 std is one a
    reseed alone would often make."""

    def within(self, bpbs: Mapping[int, float]) -> dict[int, list[int]]:
        """For each trial number of ``bpbs`` (e.g. the front's), the others whose BPB is within
        noise of its own (empty lists without a spread)."""
        std = self.std
        if std is None:
            return {n: [] for n in bpbs}
        gap = self.NOISE_GAP * std
        return {n: [m for m, b in bpbs.items() if m != n and abs(b - a) < gap] for n, a in bpbs.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"arch_id": self.arch_id, "tokens": self.tokens, "seeds": list(self.seeds), "bpbs": list(self.bpbs),
                "trial_number": self.trial_number, "std": self.std, "within_noise_gap": self.NOISE_GAP}


@dataclass(frozen=True, kw_only=True)
class CalibrationRow:
    """One reference architecture measured on a device (``nas devices calibrate --device``)."""

    id: int
    run: str
    """Groups the points of one invocation."""
    profile: str
    device_fingerprint: str
    arch_id: str
    spec: ArchSpec
    label: str
    node: str
    decode_ms: float
    prefill_ms: float
    peak_memory_bytes: int | None
    model_bytes: int | None
    workload: dict[str, Any]
    device_facts: dict[str, Any]
    provenance: dict[str, Any]
    created_at: datetime

    def to_point(self, board: str) -> CalibrationPoint:
        """The row as a calibration point of the device's latency model; ``board`` names the
        device (the profile's ``device.name``)."""
        from nas.spec.calibration import calibration_point

        return calibration_point(
            spec=self.spec, decode_ms=self.decode_ms, prefill_ms=self.prefill_ms, workload=self.workload,
            peak_memory_bytes=self.peak_memory_bytes, model_bytes=self.model_bytes, facts=self.device_facts,
            fingerprint=self.device_fingerprint, node=self.node, created=self.created_at.isoformat(timespec="seconds"),
            run=self.run, board=board,
        )
