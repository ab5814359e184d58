"""Values that stages hand to the search and the store: latency statistics and measurements.

Plain data, importable without torch or ONNX Runtime. A measurement always carries its label
(where the figure came from) and its provenance (what it was taken on), so that a figure can be
trusted, compared or re-taken later.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

MEASURED_LOCAL = "measured:local"
ESTIMATED_MODEL = "estimated:model"
"""A figure from the target device's own latency model (fitted to points measured on it)."""
ESTIMATED_ROOFLINE = "estimated:roofline"
"""The earlier estimate (this host's timing scaled by a bandwidth ratio): no longer written, but
rows of older databases keep it and stay displayable."""
ESTIMATED_LABELS = (ESTIMATED_MODEL, ESTIMATED_ROOFLINE)


def is_estimated(label: str | None) -> bool:
    """Whether a figure was estimated rather than measured (any ``estimated:<how>``)."""
    return bool(label) and str(label).startswith("estimated:")


def beats_bigram(bpb: float | None, baselines: dict[str, Any] | None) -> bool | None:
    """Whether a BPB is below the bigram baseline of its own tokenizer (``baselines["bigram_bpb"]``,
    on the same validation text); None when either is missing. A model that is not has learned
    nothing that counting pairs of tokens would not: every view flags it by this one rule."""
    bigram = (baselines or {}).get("bigram_bpb")
    return None if bigram is None or bpb is None else bpb < bigram


def measured_on(node: str) -> str:
    """The label of a figure measured on a Ray node that advertises a device."""
    return f"measured:{node}"


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds over repeats taken after warm-up: the median and the spread around it."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    """Coefficient of variation (stdev / mean) of the repeats: the figure's repeatability."""
    repeats_ms: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float] | tuple[float, ...]) -> LatencyStats:
        xs = sorted(float(x) for x in samples_ms)
        if not xs:
            raise ValueError("no latency samples")
        mean = statistics.fmean(xs)
        stdev = statistics.stdev(xs) if len(xs) > 1 else 0.0
        q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
        return cls(median_ms=statistics.median(xs), p10_ms=q[0], p90_ms=q[-1], mean_ms=mean,
                   cv=stdev / mean if mean > 0 else 0.0, repeats_ms=tuple(samples_ms))

    @classmethod
    def of_median(cls, median_ms: float, p10_ms: float | None = None, p90_ms: float | None = None) -> LatencyStats:
        """A figure known by its median (and perhaps its spread) but not its repeats: a published
        measurement, or a row written without them."""
        return cls(median_ms=median_ms, p10_ms=median_ms if p10_ms is None else p10_ms,
                   p90_ms=median_ms if p90_ms is None else p90_ms, mean_ms=median_ms, cv=0.0, repeats_ms=())

    def scaled(self, factor: float) -> LatencyStats:
        """The same distribution scaled (an estimate keeps the host's relative spread)."""
        return LatencyStats.from_samples([x * factor for x in self.repeats_ms])


@dataclass(frozen=True)
class Measurement:
    """Latency and memory of one deployed model (an arch at its bitwidth) on one profile."""

    arch_id: str
    profile: str
    bitwidth: int
    label: str
    """``measured:local``, ``measured:<node>`` or ``estimated:model`` (``estimated:roofline`` in old rows)."""
    prefill: LatencyStats
    """One prefill of the profile's prompt (batch, prompt_tokens)."""
    decode: LatencyStats
    """One decode step (per token) with context_tokens already in the KV cache."""
    peak_memory_bytes: int | None
    """Peak resident memory (VmHWM) of the inference process, runtime included; None where it
    could not be read (never 0, which would meet every memory budget)."""
    model_bytes: int
    """Size of every file of the deployed model (the .onnx and its external data)."""
    workload: dict[str, Any] = field(default_factory=dict)
    """prompt_tokens, context_tokens, batch, warmup, repeats: what was run."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where and how: CPU model, threads, execution provider, library versions, node; for an
    estimate, the host measurement and the factors it was scaled by."""

    @property
    def decode_ms(self) -> float:
        return self.decode.median_ms

    @property
    def prefill_ms(self) -> float:
        return self.prefill.median_ms

    @property
    def peak_memory_mb(self) -> float | None:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20

    @property
    def model_mb(self) -> float:
        return self.model_bytes / 2**20

    def figures(self) -> dict[str, float]:
        """The figures a study optimizes or budgets, by the names objectives and plots use; a
        figure that was not taken is absent."""
        out = {"decode_ms": self.decode_ms, "prefill_ms": self.prefill_ms, "model_mb": self.model_mb}
        if self.peak_memory_mb is not None:
            out["peak_memory_mb"] = self.peak_memory_mb
        return out

    def spreads(self) -> dict[str, tuple[float, float]]:
        """(p10, p90) of each latency figure over its repeats."""
        return {"decode_ms": (self.decode.p10_ms, self.decode.p90_ms),
                "prefill_ms": (self.prefill.p10_ms, self.prefill.p90_ms)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        d = dict(d)
        for key in ("prefill", "decode"):
            s = dict(d[key])
            s["repeats_ms"] = tuple(s["repeats_ms"])
            d[key] = LatencyStats(**s)
        return cls(**d)
