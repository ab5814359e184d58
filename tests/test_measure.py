"""Measurement in an isolated process, the per-device estimate beside it, and their labels."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nas.spec.profile import latency_model, load_profile
from nas.spec.results import ESTIMATED_MODEL, MEASURED_LOCAL, LatencyStats, Measurement
from nas.stages.estimate import calibrate_host, estimate
from nas.stages.export import EXPORT_FORMAT, export_spec
from nas.stages.measure import MeasurementError, _failure_reason, measure_local
from tests.test_arch import make

SPEC = make("gqa", vocab_size=512, d_model=64, head_dim=16, context_length=64, bitwidth=8)
FAST = dict(warmup=1, repeats=6, max_phase_seconds=2.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("measure-cache")
        mp.setenv("NAS_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_spec(SPEC, tmp_path_factory.mktemp("model")).path.parent


@pytest.fixture(scope="module")
def host_measurement(exported: Path) -> Measurement:
    return measure_local(exported, SPEC, load_profile("host"), **FAST)


def test_local_measurement_is_labelled_and_carries_its_provenance(host_measurement: Measurement, exported: Path):
    m = host_measurement
    assert m.label == MEASURED_LOCAL and m.profile == "host" and m.arch_id == SPEC.arch_id and m.bitwidth == 8
    assert len(m.decode.repeats_ms) >= 5 and len(m.prefill.repeats_ms) >= 5
    assert 0 < m.decode.p10_ms <= m.decode.median_ms <= m.decode.p90_ms
    assert m.prefill.median_ms > 0
    # the host profile asks for 256 cached tokens; a 64-token model is measured at its own limit
    assert m.workload["context_tokens"] == 63 and m.workload["prompt_tokens"] == 64
    # what exported the files is part of the workload: a search reuses a stored figure only for
    # files of the same export format (a figure of signed int8 weights is not one of unsigned)
    manifest = json.loads((exported / "model.json").read_text())
    assert m.workload["export_format"] == EXPORT_FORMAT == manifest["export_format"]
    files = [p for p in exported.iterdir() if p.is_file() and p.name.startswith("model.onnx")]
    assert m.model_bytes == sum(p.stat().st_size for p in files)
    assert m.peak_memory_bytes > m.model_bytes
    prov = m.provenance
    assert prov["threads"] == 2 and prov["execution_provider"] == "CPUExecutionProvider"
    assert prov["onnxruntime"] and prov["cpu"] and prov["arena"] is False
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_a_broken_model_fails_the_measurement_not_the_caller(exported: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in exported.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(MeasurementError, match=r"measurement failed \(exit 3\):"):
        measure_local(broken, SPEC, load_profile("host"), **FAST)


def test_a_hung_measurement_times_out_and_is_killed(exported: Path):
    # a million repeats with no phase limit stands in for a hang
    with pytest.raises(MeasurementError, match=r"timed out after 1\.5 s"):
        measure_local(exported, SPEC, load_profile("host"), timeout_s=1.5, warmup=1, repeats=10**6,
                      max_phase_seconds=1e6)
    # the worker's whole process group is gone; only this test's worker is looked for (its
    # command line names this test's model folder), not those of other runs on the machine
    mine = f"nas.stages.measure_worker.*{exported.resolve()}"
    out = subprocess.run(["pgrep", "-f", mine], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_an_unavailable_execution_provider_is_named(exported: Path):
    jetson = load_profile("jetson")  # CUDA, which this machine's onnxruntime does not have
    with pytest.raises(MeasurementError, match="CUDAExecutionProvider is not available here"):
        measure_local(exported, SPEC, jetson, **FAST)


def test_a_killed_worker_is_reported_with_its_signal():
    assert _failure_reason(-signal.SIGKILL, "") == "measurement process killed by SIGKILL (out of memory?)"
    assert "exit 3" in _failure_reason(3, "Traceback...\nValueError: bad\n")


def test_an_estimate_takes_latency_from_the_device_model_and_size_from_the_host(host_measurement: Measurement):
    rpi5 = load_profile("rpi5")
    est = estimate(SPEC, rpi5, host_measurement=host_measurement)
    assert est.label == ESTIMATED_MODEL and est.profile == "rpi5" and est.arch_id == SPEC.arch_id
    model = latency_model(rpi5)
    past, prompt = rpi5.workload.decode_past_tokens(SPEC), rpi5.workload.prefill_tokens(SPEC)
    assert est.decode.median_ms == pytest.approx(model.decode_ms(SPEC, past))
    assert est.prefill.median_ms == pytest.approx(model.prefill_ms(SPEC, prompt))
    # the host's own timing is kept for comparison but is not what the estimate says
    assert est.provenance["host_decode_ms"] == host_measurement.decode.median_ms
    assert est.model_bytes == host_measurement.model_bytes  # the deployed file, not the analytic bytes
    # a CPU target on the same runtime library: the host's peak memory of the same file and workload
    assert est.peak_memory_bytes == host_measurement.peak_memory_bytes
    assert est.provenance["estimator"] == "per-device latency model" and est.provenance["n_points"] == 11
    assert Measurement.from_dict(json.loads(json.dumps(est.to_dict()))) == est


def test_a_gpu_target_s_memory_is_the_model_s_not_the_host_s(host_measurement: Measurement):
    jetson = load_profile("jetson")
    est = estimate(SPEC, jetson, host_measurement=host_measurement)
    base = jetson.latency_prior.base_memory_mb * 2**20
    assert est.peak_memory_bytes > base + host_measurement.model_bytes  # CUDA's runtime, not this host's RSS
    assert "runtime base" in est.provenance["memory_from"]


def test_budget_constraints_are_figure_minus_budget(host_measurement: Measurement):
    host = load_profile("host")
    c = host.budgets.constraints(host_measurement.figures())
    assert c["decode_ms_per_token"] == pytest.approx(host_measurement.decode.median_ms - 10)
    assert c["model_mb"] == pytest.approx(host_measurement.model_mb - 64)
    assert set(c) == {"peak_memory_mb", "decode_ms_per_token", "model_mb"}  # host sets no prefill budget
    slow = dataclasses.replace(host_measurement, decode=LatencyStats.from_samples([50.0, 60.0]))
    assert host.budgets.constraints(slow.figures())["decode_ms_per_token"] > 0
    # A figure that was not taken is left out, never read as 0 (which would meet any budget).
    unread = dataclasses.replace(host_measurement, peak_memory_bytes=None)
    assert "peak_memory_mb" not in unread.figures()
    assert "peak_memory_mb" not in host.budgets.constraints(unread.figures())


def test_latency_stats_quantiles_and_cv():
    s = LatencyStats.from_samples([float(x) for x in range(1, 12)])
    assert s.median_ms == 6 and s.p10_ms == 2 and s.p90_ms == 10
    assert s.cv == pytest.approx(3.3166 / 6, rel=1e-3)
    assert s.scaled(2).median_ms == 12


def test_host_calibration_is_measured_once_then_cached(cache: Path, monkeypatch: pytest.MonkeyPatch):
    host = load_profile("host")
    cal = calibrate_host(host, repeats=3)
    assert cal.memory_bandwidth_gbs > 0.5 and cal.peak_gflops["fp32"] > 1
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("calibration ran again"))
    assert calibrate_host(host) == cal


@pytest.mark.parametrize("device,label", [("host", "measured:local"), ("laptop", "estimated:model"),
                                          ("jetson", "estimated:model")])
def test_cli_measure_prints_labelled_figures(device: str, label: str, cache: Path, tmp_path: Path):
    arch = tmp_path / "arch.json"
    arch.write_text(SPEC.canonical_json())
    proc = subprocess.run([sys.executable, "-m", "nas", "measure", "--device", device, "--space", "tiny",
                           "--arch-json", str(arch), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["measurement"]["label"] == label and out["arch_id"] == SPEC.arch_id
    assert out["measurement"]["decode"]["median_ms"] > 0
    if device == "jetson":
        assert "no Ray node advertises 'jetson'" in proc.stderr


def test_cli_require_measured_refuses_an_estimate(cache: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "nas", "measure", "--device", "laptop", "--space", "tiny",
                           "--require-measured"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "can only be estimated" in proc.stderr and "Traceback" not in proc.stderr


def test_the_device_fingerprint_changes_with_what_changes_the_speed(exported: Path):
    from nas.stages.measure import device_facts, device_fingerprint, fingerprint_of

    host = load_profile("host")
    fp = device_fingerprint(host)
    assert fp == device_fingerprint(host) and len(fp) == 16
    more_threads = host.model_copy(update={"runtime": host.runtime.model_copy(update={"threads": 7})})
    assert device_fingerprint(more_threads) != fp
    m = measure_local(exported, SPEC, host, **FAST)
    assert m.provenance["fingerprint"] == fp  # what a later search matches before reusing it
    # The facts behind it travel with the figures; those this machine does not expose are left
    # out (a VM has no cpufreq, an x86 host no device tree), never a failure.
    facts = device_facts(host)
    assert m.provenance["device_facts"] == facts and fingerprint_of(facts) == fp
    assert ("cpu_max_khz" in facts) == Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq").exists()
    assert ("board" in facts) == Path("/proc/device-tree/model").exists()
    assert {"cpu", "cores", "governor", "threads", "provider", "onnxruntime", "numpy", "python"} <= set(facts)
