"""Calibration on the device itself: the fixed reference architectures ``nas devices calibrate
--device NAME`` measures there, and how one of its measurements becomes a calibration point of
the device's latency model (``nas.spec.latency``).

The public points a profile ships are 1-9B models run by llama.cpp or MLC; the search's models
are 1000x smaller and run by ONNX Runtime, where a step is mostly per-kernel cost that no public
point pins down. The reference set is therefore small models of our own graph, spread over what
the model's parameters respond to: bytes (size and bitwidth), kernels (depth, attention kind,
FFN kind) and FLOPs (prefill of wider models). Ordered from the smallest up, so that the first
few (``-n``) are a quick check and the whole set a calibration.

Plain values (no torch, no ONNX Runtime, no database): the store turns its rows into points with
:func:`calibration_point`, the search adds them to a profile with :func:`with_points`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nas.spec.arch import ArchSpec
from nas.spec.profile import CalibrationPoint, HardwareProfile, PointSource, PointWorkload

MIB = 2**20
REFERENCE_CONTEXT = 1024
"""Context length of the references: longer than any shipped profile's workload, so that each
point is taken at the profile's own prompt and context (``Workload`` clamps to a spec's)."""


def _ref(**fields: Any) -> ArchSpec:
    return ArchSpec(context_length=REFERENCE_CONTEXT, **fields)


@dataclass(frozen=True)
class Reference:
    """One reference architecture and what it is there to show the fit."""

    name: str
    spec: ArchSpec
    why: str


REFERENCE_SET: tuple[Reference, ...] = (
    Reference("gqa-small-int8", _ref(vocab_size=2048, d_model=128, n_layers=4, attention="gqa", n_heads=4,
                                     n_kv_heads=2, head_dim=32, bitwidth=8),
              "smallest: almost all kernel cost"),
    Reference("mqa-deep-int4", _ref(vocab_size=2048, d_model=128, n_layers=12, attention="mqa", n_heads=4,
                                    head_dim=32, bitwidth=4),
              "deep and thin at int4: 3x the kernels of the first for few more bytes"),
    Reference("mha-plain-fp32", _ref(vocab_size=4096, d_model=256, n_layers=4, attention="mha", n_heads=4,
                                     head_dim=64, ffn="plain", activation="gelu", bitwidth=32),
              "fp32 weights, a plain GELU FFN: bytes at another dtype"),
    Reference("mla-int8", _ref(vocab_size=4096, d_model=256, n_layers=6, attention="mla", n_heads=4, head_dim=64,
                               mla_latent_rank=64, mla_rope_dim=32, bitwidth=8),
              "MLA: its extra projections per layer"),
    Reference("gqa-medium-int4-tied", _ref(vocab_size=8192, d_model=384, n_layers=8, attention="gqa", n_heads=6,
                                           n_kv_heads=2, head_dim=64, tied_embeddings=True, bitwidth=4),
              "~15M params at int4, tied table: bytes start to count"),
    Reference("gqa-large-fp16", _ref(vocab_size=8192, d_model=512, n_layers=8, attention="gqa", n_heads=8,
                                     n_kv_heads=2, head_dim=64, ffn_ratio=3.0, bitwidth=16),
              "~30M params at fp16: the most bytes, and prefill FLOPs"),
)
"""The fixed reference set, smallest first."""

QUANTIZATION: dict[int, str] = {32: "fp32", 16: "fp16", 8: "int8 (quantize_dynamic)", 4: "int4 MatMulNBits block 32"}
"""How our export stores each bitwidth (``nas.stages.export``), as a point's ``quantization``."""


def reference_set(n: int | None = None) -> tuple[Reference, ...]:
    """The first ``n`` references (all with None)."""
    return REFERENCE_SET if n is None else REFERENCE_SET[:n]


def calibration_point(*, spec: ArchSpec, decode_ms: float, prefill_ms: float, workload: Mapping[str, Any],
                      peak_memory_bytes: int | None, model_bytes: int | None, facts: Mapping[str, Any],
                      fingerprint: str, node: str, created: str, run: str, board: str) -> CalibrationPoint:
    """A calibration point from one of our own measurements on the device.

    The bits per weight are the spec's own (``ArchSpec.weight_bytes``), as the estimates of the
    search's trials count them, so that a fitted bandwidth prices the same bytes it was fitted
    on; the file's real size is in the source's note."""
    runtime = f"ONNX Runtime {facts.get('onnxruntime', '?')} {facts.get('provider', '?')}"
    size = f"; file {model_bytes / MIB:.2f} MiB" if model_bytes else ""
    return CalibrationPoint(
        model=f"nas reference {spec.arch_id}", arch=spec, bitwidth=spec.bitwidth,
        quantization=QUANTIZATION[spec.bitwidth], runtime=runtime,
        workload=PointWorkload(prompt_tokens=int(workload["prompt_tokens"]),
                               context_tokens=int(workload["context_tokens"]),
                               threads=facts.get("threads")),
        decode_ms=decode_ms, prefill_ms=prefill_ms,
        peak_memory_mb=None if peak_memory_bytes is None else peak_memory_bytes / MIB,
        source=PointSource(url=f"nas devices calibrate (run {run})", board=board, node=node, fingerprint=fingerprint,
                           power_mode=facts.get("power_mode"), date=created,
                           note=f"our own export of {spec.summary()}, median of repeats{size}"),
    )


def with_points(profile: HardwareProfile, points: Sequence[CalibrationPoint]) -> HardwareProfile:
    """The profile with ``points`` (validated values already) added to its own. Its fingerprint
    stays: points change estimates, never what a measurement depends on."""
    if not points:
        return profile
    return profile.model_copy(update={"calibration": (*profile.calibration, *points)})


def stored_points(profile: HardwareProfile) -> list[CalibrationPoint]:
    """The profile's points that came from ``nas devices calibrate`` (they name a fingerprint)."""
    return [p for p in profile.calibration if p.source.fingerprint is not None]
