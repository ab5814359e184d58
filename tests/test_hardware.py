"""Hardware profiles: every shipped file loads; bad files fail with file and key in one line;
the analytic budget check rejects only what is certainly over budget."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from nas.spec.arch import ArchSpec
from nas.spec.errors import ConfigError, NasError
from nas.spec.profile import (
    HardwareProfile,
    analytic_budget_check,
    list_profile_files,
    load_profile,
    min_model_bytes,
    min_peak_memory_bytes,
    parse_profile,
)
from nas.spec.space import load_space

SHIPPED = sorted(list_profile_files())

# A valid profile to break one key at a time.
BASE: dict[str, Any] = {
    "description": "a test board",
    "device": {
        "name": "test board",
        "kind": "cpu",
        "cores": 4,
        "memory_gb": 8,
        "memory_bandwidth_gbs": 17.1,
        "peak_gflops": {"fp32": 100, "fp16": 200, "int8": 400, "int4": 400},
    },
    "runtime": {"execution_provider": "CPUExecutionProvider", "threads": 4},
    "workload": {"prompt_tokens": 64, "context_tokens": 256, "generate_tokens": 32, "batch": 1},
    "budgets": {"peak_memory_mb": 256, "decode_ms_per_token": 20, "model_mb": 48},
    "measurement": {"where": "ray", "ray_resource": "board"},
    "calibration": [],
}
SMALL_ARCH = {"vocab_size": 2048, "d_model": 192, "n_layers": 4, "n_heads": 4, "attention": "gqa",
              "n_kv_heads": 2, "head_dim": 48, "context_length": 256}
POINT = {"model": "our gqa 4L", "arch": SMALL_ARCH, "bitwidth": 8, "quantization": "int8 dynamic",
         "runtime": "ONNX Runtime 1.20 CPU", "workload": {"prompt_tokens": 64, "context_tokens": 255},
         "prefill_ms": 12.5, "decode_ms": 1.9,
         "source": {"url": "file://pi5-lab/run-2024-05-01.json", "board": "Raspberry Pi 5 8GB"}}


def edited(path: str, value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    """BASE with the dotted ``path`` set to ``value`` (or deleted)."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return doc


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "board") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


# --- shipped profiles ----------------------------------------------------------------------------
def test_the_required_profiles_ship():
    assert {"jetson", "rpi5", "laptop", "host"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_as_a_frozen_hashable_value(name):
    profile = load_profile(name)
    assert profile.name == name and profile.description
    assert profile.runtime.threads >= 1 and profile.workload.prompt_tokens >= 1
    assert any(v is not None for v in profile.budgets.model_dump().values()), "a profile with no budget"
    with pytest.raises(ValidationError):
        profile.name = "other"  # type: ignore[misc]
    again = HardwareProfile.model_validate(profile.model_dump())
    assert again == profile and hash(again) == hash(profile)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_device_facts_are_known_or_left_to_be_measured(name):
    profile = load_profile(name)
    if profile.to_be_measured():
        assert profile.measurement.where in ("local", "ray")  # something can measure them
        return
    assert profile.bandwidth_bytes_per_s > 1e9
    # Quantized arithmetic is never slower than fp32; int4 is weight-only, never faster than int8.
    assert profile.peak_flops(8) >= profile.peak_flops(32) > 1e9
    assert profile.peak_flops(4) <= profile.peak_flops(8)


def test_peak_flops_maps_bitwidth_to_dtype():
    profile = load_profile("rpi5")
    gflops = profile.device.peak_gflops
    assert profile.peak_flops(32) == pytest.approx(gflops.fp32 * 1e9)
    assert profile.peak_flops(16) == pytest.approx(gflops.fp16 * 1e9)
    assert profile.peak_flops(8) == pytest.approx(gflops.int8 * 1e9)
    assert profile.peak_flops(4) == pytest.approx(gflops.int4 * 1e9)
    assert profile.bandwidth_bytes_per_s == pytest.approx(profile.device.memory_bandwidth_gbs * 1e9)
    with pytest.raises(ValueError, match="bitwidth"):
        profile.peak_flops(2)


def test_facts_left_to_measure_say_how_to_get_them_and_can_be_filled_in():
    host = load_profile("host")
    assert "device.memory_bandwidth_gbs" in host.to_be_measured()
    with pytest.raises(ConfigError, match=r"device\.peak_gflops\.fp32: .*nas devices calibrate host"):
        host.peak_flops(32)
    measured = host.with_measured(memory_bandwidth_gbs=27.0, memory_gb=23.0,
                                  peak_gflops={"fp32": 180, "fp16": 180, "int8": 700, "int4": 700})
    assert measured.to_be_measured() == []
    assert measured.bandwidth_bytes_per_s == pytest.approx(27e9) and measured.peak_flops(4) == pytest.approx(700e9)
    with pytest.raises(ConfigError, match="memory_bandwidth_gbs"):
        host.with_measured(memory_bandwidth_gbs=-1.0)


def test_workload_is_clamped_to_the_spec_context():
    profile = load_profile("jetson")  # context 512 tokens
    spec = ArchSpec(**SMALL_ARCH)  # context_length 256
    assert profile.workload.decode_past_tokens(spec) == 255
    assert profile.workload.prefill_tokens(spec) == min(profile.workload.prompt_tokens, 256)
    assert profile.workload.cached_tokens(spec) == 256


# --- bad profiles --------------------------------------------------------------------------------
BAD = [
    (edited("device.colour", "green"), "device.colour", "unknown key"),
    (edited("extra_section", {}), "extra_section", "unknown key"),
    (edited("device.memory_bandwidth_gbs", -5), "device.memory_bandwidth_gbs", "positive"),
    (edited("device.peak_gflops.int4", "fast"), "device.peak_gflops.int4", "positive"),
    (edited("device.peak_gflops.fp8", 800), "device.peak_gflops.fp8", "unknown key"),
    (edited("device.kind", "npu"), "device.kind", "'cpu' or 'gpu'"),
    (edited("runtime.execution_provider", "TPUExecutionProvider"), "runtime.execution_provider",
     "CPUExecutionProvider"),
    (edited("runtime.execution_provider", "CUDAExecutionProvider"), "runtime.execution_provider", "cpu device"),
    (edited("runtime.threads", 16), "runtime.threads", "oversubscribe"),
    (edited("runtime.threads", True), "runtime.threads", "integer"),
    (edited("budgets.decode_ms_per_token", 0), "budgets.decode_ms_per_token", "greater than 0"),
    (edited("budgets.model_mb", "small"), "budgets.model_mb", "number"),
    (edited("workload", delete=True), "workload", "is required"),
    (edited("device.name", delete=True), "device.name", "is required"),
    (edited("measurement.ray_resource", delete=True), "measurement.ray_resource", "is required"),
    (edited("measurement.where", "cloud"), "measurement.where", "'local', 'ray' or 'estimate'"),
    (edited("device.memory_bandwidth_gbs", "measure") | {"measurement": {"where": "estimate"}},
     "device.memory_bandwidth_gbs", "estimate"),
    (edited("calibration", [{**POINT, "arch": {**SMALL_ARCH, "n_kv_heads": 3}}]), "calibration[0].arch", "n_kv_heads"),
    (edited("calibration", [{**POINT, "arch": {**SMALL_ARCH, "widht": 3}}]), "calibration[0].arch", "widht"),
    (edited("calibration", [{**POINT, "arch": {**SMALL_ARCH, "bitwidth": 4}}]), "calibration[0].arch.bitwidth",
     "point's bitwidth is 8"),
    (edited("calibration", [POINT, {**POINT, "decode_ms": -1}]), "calibration[1].decode_ms", "greater than 0"),
    (edited("calibration", [{**POINT, "source": {"url": "", "board": "Pi 5"}}]), "calibration[0].source.url",
     "at least 1 character"),
    (edited("calibration", [{**POINT, "source": "a lab run"}]), "calibration[0].source", "valid dictionary"),
    (edited("calibration", [{**POINT, "decode_tokens_per_s": 500}]), "calibration[0].decode_ms", "not both"),
    (edited("calibration", [{k: v for k, v in POINT.items() if k not in ("decode_ms", "prefill_ms")}]),
     "calibration[0].decode_tokens_per_s", "needs a decode or a prefill figure"),
    (edited("calibration", [{**POINT, "workload": {}}]), "calibration[0].workload.prompt_tokens", "prefill_ms"),
    (edited("calibration", [{**POINT, "bits_per_weight": 8.5, "file_mb": 3.0}]), "calibration[0].file_mb",
     "not both"),
    (edited("calibration", [{**POINT, "decode_ms": "fast"}]), "calibration[0].decode_ms", "number"),
    (edited("latency_prior", {"kernel_us": 0, "base_memory_mb": 45}), "latency_prior.kernel_us", "greater than 0"),
    (edited("name", "other"), "name", "file name"),
    ("device: {name: x, kind: cpu\nruntime: [", "line", "not valid YAML"),
    ("- just\n- a list\n", "", "must be a mapping"),
]


@pytest.mark.parametrize("doc,key,problem", BAD, ids=[f"{i}-{k or 'top'}" for i, (_, k, _) in enumerate(BAD)])
def test_invalid_profile_names_file_and_key_in_one_line(doc, key, problem, tmp_path):
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert info.value.key.startswith(key), message
    assert problem in message, message
    assert "\n" not in message and "Traceback" not in message


def test_a_valid_calibration_point_becomes_an_archspec_at_its_bitwidth(tmp_path):
    profile = load_profile(write(tmp_path, edited("calibration", [POINT])))
    point = profile.calibration[0]
    assert isinstance(point.arch, ArchSpec) and point.arch.bitwidth == 8
    assert point.arch == ArchSpec(**{**SMALL_ARCH, "bitwidth": 8})
    assert HardwareProfile.model_validate(profile.model_dump()) == profile


def test_yaml_errors_give_the_line(tmp_path):
    path = write(tmp_path, "description: x\ndevice:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        load_profile(path)


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(NasError, match=r"known: .*rpi5"):
        load_profile("rpi6")


def test_a_profile_is_found_by_path_and_named_after_its_file(tmp_path):
    profile = load_profile(write(tmp_path, BASE, name="my_board"))
    assert profile.name == "my_board" and profile.source.endswith("my_board.yaml")
    assert parse_profile(yaml.safe_dump(BASE), "inline", "x").device.cores == 4


# --- the analytic check --------------------------------------------------------------------------
def gqa(**kw: Any) -> ArchSpec:
    return ArchSpec(**{**SMALL_ARCH, **kw})


def test_analytic_check_flags_a_big_spec_and_passes_a_small_one_on_rpi5():
    rpi5 = load_profile("rpi5")
    big = gqa(vocab_size=8192, d_model=512, n_layers=16, n_heads=8, head_dim=64, bitwidth=32)
    small = gqa(bitwidth=4)
    reasons = analytic_budget_check(big, rpi5)
    assert reasons and "model size" in reasons[0] and "budgets.model_mb" in reasons[0]
    assert analytic_budget_check(small, rpi5) == []


def test_analytic_check_flags_memory_against_a_tight_budget(tmp_path):
    tight = load_profile(write(tmp_path, edited("budgets", {"peak_memory_mb": 8})))
    spec = gqa(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, head_dim=64, bitwidth=16)
    (reason,) = analytic_budget_check(spec, tight)
    assert reason.startswith("peak memory") and "budgets.peak_memory_mb" in reason
    assert analytic_budget_check(spec, load_profile(write(tmp_path, edited("budgets", {}), name="open"))) == []


def test_analytic_bounds_never_exceed_the_spec_s_own_byte_counts():
    # A lower bound: an export is never smaller than it, so a rejected spec would also fail measured.
    space, rng = load_space("gqa_small"), random.Random(3)
    workload = load_profile("rpi5").workload
    for _ in range(100):
        spec = space.sample(rng)
        assert min_model_bytes(spec) <= spec.weight_bytes()
        kv = spec.kv_cache_bytes_per_token() * workload.cached_tokens(spec)
        assert min_peak_memory_bytes(spec, workload) <= spec.weight_bytes() + kv


def test_each_device_rejects_some_gqa_small_specs_but_not_most():
    space, rng = load_space("gqa_small"), random.Random(0)
    specs = [space.sample(rng) for _ in range(300)]
    rejected = {name: sum(bool(analytic_budget_check(s, load_profile(name))) for s in specs) / len(specs)
                for name in ("jetson", "rpi5", "laptop", "host")}
    assert all(0 < share < 0.5 for share in rejected.values()), rejected
    assert rejected["rpi5"] == max(rejected.values()), rejected  # the smallest device is the tightest


def test_hardware_module_imports_without_torch_or_onnxruntime():
    code = ("import sys, nas.spec.profile; bad = {'torch', 'onnxruntime'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fingerprint_follows_what_measurements_depend_on(tmp_path):
    base = load_profile(write(tmp_path, BASE, name="a"))
    other_budget = load_profile(write(tmp_path, edited("budgets.model_mb", 1000), name="b"))
    other_threads = load_profile(write(tmp_path, edited("runtime.threads", 2), name="c"))
    assert base.fingerprint == other_budget.fingerprint != other_threads.fingerprint
