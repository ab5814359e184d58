"""Measurements for tests that write the store directly: built as a stage builds them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nas.spec.results import LatencyStats, Measurement


def measurement(
    arch_id: str, *, profile: str = "host", bitwidth: int = 32, label: str = "measured:local",
    prefill_ms: float | None = None, decode_ms: float | None = None,
    prefill_repeats_ms: Sequence[float] = (), decode_repeats_ms: Sequence[float] = (),
    peak_memory_bytes: int | None = None, model_bytes: int = 0,
    workload: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
) -> Measurement:
    """From raw repeats where given (as a measurer hands them over), else from a median alone."""

    def stats(repeats: Sequence[float], median: float | None) -> LatencyStats:
        if len(repeats):
            return LatencyStats.from_samples([float(x) for x in repeats])
        assert median is not None, "give a median or repeats"
        return LatencyStats.of_median(float(median))

    return Measurement(
        arch_id=arch_id, profile=profile, bitwidth=bitwidth, label=label,
        prefill=stats(prefill_repeats_ms, prefill_ms), decode=stats(decode_repeats_ms, decode_ms),
        peak_memory_bytes=peak_memory_bytes, model_bytes=model_bytes,
        workload=dict(workload or {}), provenance=dict(provenance or {}),
    )
