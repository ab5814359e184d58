"""Measuring an exported model on this machine, in an isolated process.

Each measurement runs ``nas.stages.measure_worker`` in a fresh process, pinned to the profile's thread
count of cores, with ONNX Runtime's threads and execution provider from the profile. The parent
only waits: a crash, a hang (time-out) or an out-of-memory kill ends the child, and comes back
here as a MeasurementError with its reason, never as a crash of the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.spec.errors import NasError
from nas.spec.results import MEASURED_LOCAL, LatencyStats, Measurement

if TYPE_CHECKING:
    from nas.spec.arch import ArchSpec
    from nas.spec.profile import HardwareProfile

DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 20
DEFAULT_TIMEOUT_S = 300.0
MAX_PHASE_SECONDS = 15.0
"""A phase (prefill or decode) stops repeating after this long, once it has 5 samples."""


class MeasurementError(NasError):
    """A measurement that failed: the worker crashed, was killed, timed out or reported an error."""


def pinned_cores(threads: int) -> list[int]:
    """The cores a measurement of ``threads`` threads is pinned to: the first ones this process
    may run on, so that another process's load does not show up as latency."""
    available = sorted(os.sched_getaffinity(0))
    return available[: max(1, min(threads, len(available)))]


def _read_first_line(path: str) -> str | None:
    """The file's first line, stripped; None where it does not exist or cannot be read (a VM
    without cpufreq, a board without a device tree): a fact that is absent is left out."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    line = text.replace("\x00", "").strip().splitlines()
    return line[0].strip() if line else None


def _nvpmodel_mode() -> str | None:
    """The Jetson power mode as ``nvpmodel -q`` prints it ("NV Power Mode: MAXN"), where that
    tool exists; it moves the clocks, hence the speed, by up to ~4x (docs/dependencies.md)."""
    import shutil

    tool = shutil.which("nvpmodel")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    modes = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Power Mode" in line and ":" in line]
    return modes[0] if modes else None


def _nvidia_gpus() -> list[str]:
    """GPU models the NVIDIA driver lists (desktop and server drivers; a Jetson has none here)."""
    found = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue
        found += [line.split(":", 1)[1].strip() for line in lines if line.startswith("Model:")]
    return found


def device_facts(runtime: HardwareProfile) -> dict[str, Any]:
    """What changes this machine's speed for a measurement on ``runtime``'s settings.

    Always: the CPU model and the cores this process may use, the frequency governor
    ("unknown" where unreadable), the thread count and execution provider, and the versions of
    ONNX Runtime, numpy and Python. Where the machine exposes them (only then, so that a machine
    without them keeps the fingerprint it had before they were read): the CPU's maximum clock,
    the board's model (a Jetson's or a Pi's device tree), the Jetson power mode, the NVIDIA GPU
    models and, on the CUDA provider, the ONNX Runtime build's device. Nothing here fails on a
    fact that is absent."""
    import platform

    import numpy
    import onnxruntime

    from nas.stages.measure_worker import cpu_model

    facts: dict[str, Any] = {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
        "governor": _read_first_line("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "unknown",
        "threads": runtime.runtime.threads, "provider": runtime.runtime.execution_provider,
        "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
    }
    optional = {
        "cpu_max_khz": _read_first_line("/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq"),
        "board": _read_first_line("/proc/device-tree/model"),
        "power_mode": _nvpmodel_mode(),
        "gpus": _nvidia_gpus() or None,
    }
    if runtime.runtime.execution_provider != "CPUExecutionProvider":
        optional["onnxruntime_device"] = onnxruntime.get_device()
    facts.update({k: v for k, v in optional.items() if v is not None})
    return facts


def fingerprint_of(facts: dict[str, Any]) -> str:
    """The fingerprint of :func:`device_facts`' facts: a short hash."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def device_fingerprint(runtime: HardwareProfile) -> str:
    """A hash of :func:`device_facts`: what changes this machine's speed for a measurement on
    ``runtime``'s settings. A stored measurement is reused only under the same fingerprint:
    figures taken on another machine, or with another runtime, are taken again rather than
    passed off as this one's."""
    return fingerprint_of(device_facts(runtime))


def measure_local(
    model_dir: Path,
    spec: ArchSpec,
    profile: HardwareProfile,
    *,
    runtime: HardwareProfile | None = None,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_phase_seconds: float = MAX_PHASE_SECONDS,
    label: str = MEASURED_LOCAL,
) -> Measurement:
    """Prefill and decode latency, peak memory and size of ``spec``'s deployed model in
    ``model_dir`` (written by ``nas.stages.export``), run here on ``profile``'s workload.

    Threads and execution provider come from ``runtime`` (default: ``profile`` itself). A target
    measured elsewhere passes the host profile as ``runtime``: its workload run on this machine
    gives an estimate its file size and, on a CPU target, its memory.
    """
    runtime_profile = runtime or profile
    threads = runtime_profile.runtime.threads
    w = profile.workload
    manifest = _manifest(Path(model_dir))
    workload = {
        "prompt_tokens": w.prefill_tokens(spec),
        "context_tokens": w.decode_past_tokens(spec),
        "batch": w.batch,
        "warmup": warmup,
        "repeats": repeats,
        # Which graph ran (nas.stages.feeds): the deployment graph and the plain one of the same
        # spec differ by up to ~2x, so a figure of one is never reused for the other.
        "graph": manifest.get("graph", "plain"),
        # What exported the files (nas.stages.export.EXPORT_FORMAT; None before it was recorded):
        # a figure of older files is not reused for new ones.
        "export_format": manifest.get("export_format"),
    }
    args = {
        "model_dir": str(Path(model_dir).resolve()),
        "threads": threads,
        "provider": runtime_profile.runtime.execution_provider,
        "max_phase_seconds": max_phase_seconds,
        "cores": pinned_cores(threads),
        **workload,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    facts = device_facts(runtime_profile)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.stages.measure_worker", json.dumps(args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, so a time-out kills everything it started
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise MeasurementError(f"measurement timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise MeasurementError(_failure_reason(proc.returncode, err))
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise MeasurementError(f"measurement worker printed no result (stderr: {err.strip()[-300:]})") from None

    return Measurement(
        arch_id=spec.arch_id,
        profile=profile.name,
        bitwidth=spec.bitwidth,
        label=label,
        prefill=LatencyStats.from_samples(result["prefill_ms"]),
        decode=LatencyStats.from_samples(result["decode_ms"]),
        peak_memory_bytes=result["peak_rss_bytes"],
        model_bytes=result["model_bytes"],
        workload=workload,
        provenance={**result["provenance"], "fingerprint": fingerprint_of(facts), "device_facts": facts,
                    "baseline_rss_bytes": result["baseline_rss_bytes"],
                    "session_load_s": round(result["session_load_s"], 3), "peak_reset": result["peak_reset"]},
    )


def _manifest(model_dir: Path) -> dict[str, Any]:
    """The exported model's manifest (empty where it is missing or broken: manifests written
    before the deployment graph are plain, and the worker reports a missing model itself)."""
    try:
        return json.loads((model_dir / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"measurement process killed by {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "no message"
    return f"measurement failed (exit {returncode}): {detail[:500]}"
