"""Estimates for devices we are not on: the device's own latency model, fitted to points measured
on that device, never this host's timing scaled by a constant.

A figure for a target is labelled ``estimated:model`` (``nas.spec.results``), and its provenance
says which model gave it: its parameters, how many calibration points they were fitted to and how
far the fit is from them (``nas.spec.latency``, ``nas.spec.profile.latency_model``).

- Latency (decode per token, prefill of the workload's prompt) comes from the model alone: the
  spec's bytes, FLOPs and kernel count priced at the device's fitted bandwidth, rate and kernel
  cost. This host's timing of the same graph is *not* used: a 2-core x86 VM ranks small models by
  its own overheads, which is what the per-device model is there to avoid.
- The host still measures the exported graph, for what the analytic model cannot know: the size
  of the deployed files (what a tied table or a quantizer really stores), and, for a target on
  the same CPU execution provider, the peak resident memory (the same runtime library, the same
  file and the same workload give the same memory on an Arm board as here). For a GPU target the
  memory is the model's: weights + KV cache + the provider's runtime base.
- The kernel count is the analytic count of a fused deployment graph
  (``nas.spec.latency.fused_kernels_per_step``), not the node count of the plain graph measured
  here, which a deployment would not run.

``calibrate_host`` measures what ONNX Runtime attains on this machine (bandwidth, matmul rates)
for the ``host`` profile's ``measure`` facts.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.spec.calibration import stored_points
from nas.spec.errors import NasError
from nas.spec.files import atomic_write
from nas.spec.latency import LatencyModel, decode_step, deployed_weight_bytes, prefill_step
from nas.spec.profile import latency_model
from nas.spec.results import ESTIMATED_MODEL, LatencyStats, Measurement

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

    # The method in the name: "best", rates from the fastest repeat (measure_worker.calibrate);
    # "u8": the int8 rate taken with unsigned weights, as the exporter quantizes them. A cache file
    # of an older method (the median; signed int8 weights) has another name and is measured again
    # rather than trusted.
    return cache_dir() / "calibration" / f"{host.name}-{host.fingerprint}-best-u8.json"


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


def cached_host_calibration(host: HardwareProfile) -> HostCalibration | None:
    """The host's calibration if one is cached, without measuring anything."""
    path = _calibration_path(host)
    if not path.exists():
        return None
    try:
        return HostCalibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def calibrated_profile(host: HardwareProfile, cal: HostCalibration) -> HardwareProfile:
    """The host profile with its ``measure`` facts filled in from the calibration."""
    peaks = {**cal.peak_gflops, "int4": cal.peak_gflops["int8"]}
    return host.with_measured(memory_bandwidth_gbs=cal.memory_bandwidth_gbs, peak_gflops=peaks)


@functools.lru_cache(maxsize=64)
def device_model(target: HardwareProfile) -> LatencyModel:
    """The target's latency model, fitted once per profile value (a profile is frozen and hashable,
    so an edited file is a new key)."""
    return latency_model(target)


def estimate(spec: ArchSpec, target: HardwareProfile, model: LatencyModel | None = None, *,
             host_measurement: Measurement | None = None) -> Measurement:
    """The target's figures for ``spec`` on its workload, from the target's latency model.

    ``host_measurement`` (this host's measurement of the same deployed graph on the target's
    workload) gives the file size and, for a CPU-provider target, the peak memory; without it
    both are analytic (the deployment graph's weights, ``deployed_weight_bytes``; weights + KV +
    runtime base).
    """
    if host_measurement is not None and host_measurement.arch_id != spec.arch_id:
        raise NasError(f"host measurement is of {host_measurement.arch_id}, not {spec.arch_id}")
    model = model or device_model(target)
    w = target.workload
    past, prompt = w.decode_past_tokens(spec), w.prefill_tokens(spec)
    decode, prefill = decode_step(spec, past), prefill_step(spec, prompt)
    model_bytes = (host_measurement.model_bytes if host_measurement is not None
                   else math.ceil(deployed_weight_bytes(spec)))
    host_peak = host_measurement.peak_memory_bytes if host_measurement is not None else None
    same_runtime = (host_measurement is not None and target.runtime.execution_provider == "CPUExecutionProvider"
                    and host_measurement.provenance.get("execution_provider") == "CPUExecutionProvider")
    if same_runtime and host_peak is not None:
        peak, memory_from = host_peak, "host peak RSS (same CPU runtime, file and workload)"
    else:
        peak = model.peak_memory_bytes(model_bytes, spec, w.cached_tokens(spec), w.batch)
        memory_from = "model: deployed weights + KV cache at the workload + runtime base"
    provenance: dict[str, Any] = {
        "estimator": "per-device latency model", **model.describe(), "model_digest": model.digest(),
        "kernels_per_step": decode.kernels, "kernel_count": "analytic, fused deployment graph",
        "decode_bytes": decode.bytes, "decode_flops": decode.flops, "prefill_flops": prefill.flops,
        "model_bytes_from": ("host export" if host_measurement is not None
                             else "analytic (nas.spec.latency.deployed_weight_bytes)"),
        "memory_from": memory_from,
    }
    stored = stored_points(target)
    if stored:  # the device's own points from `nas devices calibrate`, which runs and machine
        provenance["stored_calibration"] = [
            {"arch_id": p.arch.arch_id, "node": p.source.node, "fingerprint": p.source.fingerprint,
             "run": p.source.url, "date": p.source.date} for p in stored]
    if host_measurement is not None:  # what this host measured, kept for comparison, not used for latency
        provenance.update(host_decode_ms=host_measurement.decode.median_ms,
                          host_prefill_ms=host_measurement.prefill.median_ms, host=host_measurement.provenance)
    return Measurement(
        arch_id=spec.arch_id, profile=target.name, bitwidth=spec.bitwidth, label=ESTIMATED_MODEL,
        prefill=LatencyStats.of_median(model.step_ms(prefill)), decode=LatencyStats.of_median(model.step_ms(decode)),
        peak_memory_bytes=peak, model_bytes=model_bytes,
        workload={"prompt_tokens": prompt, "context_tokens": past, "batch": w.batch},
        provenance=provenance,
    )
