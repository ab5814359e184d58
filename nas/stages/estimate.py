"""Roofline estimates for devices we are not on, scaled from measurements on this host.

A figure for a target is never passed off as measured: it is the host's measurement of the same
model and workload, scaled by a roofline model, and labelled ``estimated:roofline``.

- Decode (one token with a KV cache) streams every weight it uses plus the cache: memory-bound.
  The host's decode time is scaled by host read bandwidth / target bandwidth.
- Prefill (a prompt at once) is large matrix products: compute-bound. The host's prefill time is
  scaled by the host's matrix-multiply rate / the target's peak rate for the model's dtype.

The host's bandwidth and rates are what ONNX Runtime attains here (``calibrate_host``); a
target's are datasheet peaks, which real kernels do not reach, so an uncorrected estimate is
optimistic. Calibration points measured on the real device (``calibration:`` in its profile)
correct it: each phase is multiplied by the median ratio measured / estimated over the points.
Small models are partly overhead-bound (docs/dependencies.md, "ONNX export": most of a decode step is small element-wise
ops); that share is scaled like the rest, one more reason to calibrate on the device.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.spec.errors import NasError
from nas.spec.files import atomic_write
from nas.spec.results import ESTIMATED_ROOFLINE, Measurement

if TYPE_CHECKING:
    from nas.spec.arch import ArchSpec
    from nas.spec.profile import HardwareProfile

DTYPE = {32: "fp32", 16: "fp16", 8: "int8", 4: "int8"}  # int4 is weight-only: int8 compute on CPUs


@dataclass(frozen=True)
class HostCalibration:
    """What ONNX Runtime attains on this machine with the host profile's threads."""

    memory_bandwidth_gbs: float
    peak_gflops: dict[str, float]
    """Attained matrix-multiply rate per dtype: fp32, fp16, int8."""
    provenance: dict[str, Any]
    measured_at: float

    def flops(self, bitwidth: int) -> float:
        return self.peak_gflops[DTYPE[bitwidth]] * 1e9

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9


def _calibration_path(host: HardwareProfile) -> Path:
    from nas.stages.data import cache_dir

    # "best": rates from the fastest repeat (measure_worker.calibrate); an older cache file, from
    # the median, has another name and is measured again rather than trusted.
    return cache_dir() / "calibration" / f"{host.name}-{host.fingerprint}-best.json"


def calibrate_host(host: HardwareProfile, *, refresh: bool = False, repeats: int = 10,
                   timeout_s: float = 300.0) -> HostCalibration:
    """Measure (or load from the cache) the host's bandwidth and matrix-multiply rates, in an
    isolated worker process pinned like a measurement."""
    from nas.stages.measure import MeasurementError, pinned_cores

    path = _calibration_path(host)
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        return HostCalibration(**data)
    args = {"mode": "calibrate", "threads": host.runtime.threads, "provider": host.runtime.execution_provider,
            "repeats": repeats, "max_phase_seconds": 10.0, "cores": pinned_cores(host.runtime.threads)}
    try:
        proc = subprocess.run([sys.executable, "-m", "nas.stages.measure_worker", json.dumps(args)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MeasurementError(f"host calibration timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise MeasurementError(f"host calibration failed: {proc.stderr.strip()[-300:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cal = HostCalibration(memory_bandwidth_gbs=result["memory_bandwidth_gbs"], peak_gflops=result["peak_gflops"],
                          provenance=result["provenance"], measured_at=time.time())
    atomic_write(path, json.dumps(asdict(cal)))
    return cal


def calibrated_profile(host: HardwareProfile, cal: HostCalibration) -> HardwareProfile:
    """The host profile with its ``measure`` facts filled in from the calibration."""
    peaks = {**cal.peak_gflops, "int4": cal.peak_gflops["int8"]}
    return host.with_measured(memory_bandwidth_gbs=cal.memory_bandwidth_gbs, peak_gflops=peaks)


@dataclass(frozen=True)
class Factors:
    """How one host measurement became a target estimate."""

    decode: float
    prefill: float
    decode_correction: float = 1.0
    prefill_correction: float = 1.0


def roofline_factors(spec: ArchSpec, target: HardwareProfile, cal: HostCalibration) -> Factors:
    """Multipliers from host time to target time, before any device calibration."""
    decode = cal.bandwidth_bytes_per_s / target.bandwidth_bytes_per_s
    prefill = cal.flops(spec.bitwidth) / target.peak_flops(spec.bitwidth)
    return Factors(decode=decode, prefill=prefill)


def estimate(host_measurement: Measurement, spec: ArchSpec, target: HardwareProfile, cal: HostCalibration,
             *, corrections: tuple[float, float] = (1.0, 1.0)) -> Measurement:
    """The target's figures for ``spec``, scaled from its measurement here on the target's workload.

    ``corrections`` (decode, prefill) come from the target's calibration points (see
    ``fit_corrections``). Memory is the host's peak resident set (same runtime library, same
    model file): a device's runtime (e.g. CUDA) adds its own, which only a device measurement shows.
    """
    if host_measurement.arch_id != spec.arch_id:
        raise NasError(f"host measurement is of {host_measurement.arch_id}, not {spec.arch_id}")
    f = roofline_factors(spec, target, cal)
    decode_f, prefill_f = f.decode * corrections[0], f.prefill * corrections[1]
    return Measurement(
        arch_id=spec.arch_id,
        profile=target.name,
        bitwidth=spec.bitwidth,
        label=ESTIMATED_ROOFLINE,
        prefill=host_measurement.prefill.scaled(prefill_f),
        decode=host_measurement.decode.scaled(decode_f),
        peak_memory_bytes=host_measurement.peak_memory_bytes,
        model_bytes=host_measurement.model_bytes,
        workload=host_measurement.workload,
        provenance={
            "method": "host measurement x roofline ratio",
            "host_decode_ms": host_measurement.decode.median_ms,
            "host_prefill_ms": host_measurement.prefill.median_ms,
            "decode_factor": decode_f,
            "prefill_factor": prefill_f,
            "corrections": list(corrections),
            "host_bandwidth_gbs": cal.memory_bandwidth_gbs,
            "host_gflops": cal.peak_gflops[DTYPE[spec.bitwidth]],
            "target_bandwidth_gbs": target.bandwidth_bytes_per_s / 1e9,
            "target_gflops": target.peak_flops(spec.bitwidth) / 1e9,
            "host": host_measurement.provenance,
        },
    )


def fit_corrections(pairs: list[tuple[Measurement, float | None, float | None]]) -> tuple[float, float]:
    """Median measured/estimated ratio per phase over a device's calibration points.

    ``pairs``: (uncorrected estimate, measured decode ms or None, measured prefill ms or None).
    A phase without points keeps 1.0.
    """
    decode = [m / e.decode.median_ms for e, m, _ in pairs if m is not None and e.decode.median_ms > 0]
    prefill = [m / e.prefill.median_ms for e, _, m in pairs if m is not None and e.prefill.median_ms > 0]
    return (statistics.median(decode) if decode else 1.0, statistics.median(prefill) if prefill else 1.0)
