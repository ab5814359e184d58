"""The per-device latency model: the kernel count, the fit, the shipped calibration points, and the
estimate the search gets for a profile it cannot measure. Nothing here times anything, so no
figure depends on this machine's speed."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from nas.search.pipeline import Host, measure_deployed
from nas.spec.arch import ArchSpec
from nas.spec.errors import ConfigError
from nas.spec.latency import (
    DevicePrior,
    LatencyModel,
    Observation,
    decode_step,
    fit_latency_model,
    fused_kernels_per_step,
    kendall_tau,
    nnls,
    prefill_step,
)
from nas.spec.profile import latency_model, list_profile_files, load_profile
from nas.spec.results import ESTIMATED_MODEL, LatencyStats, Measurement
from nas.stages.estimate import HostCalibration, estimate
from tests.test_hardware import BASE, POINT, write

PRIOR = DevicePrior(bandwidth_gbs=100.0, peak_gflops={"fp32": 1000.0, "fp16": 8000.0, "int8": 16000.0, "int4": 8000.0},
                    kernel_us=10.0, base_memory_mb=300.0)


def spec(**kw: Any) -> ArchSpec:
    base = {"vocab_size": 4096, "d_model": 256, "n_layers": 8, "n_heads": 8, "attention": "gqa", "n_kv_heads": 2,
            "head_dim": 32, "context_length": 1024, "bitwidth": 4}
    return ArchSpec(**{**base, **kw})


# --- the kernel count ----------------------------------------------------------------------------
def test_kernel_count_follows_the_fused_graph_rule():
    assert fused_kernels_per_step(spec(n_layers=8)) == 8 * 11 + 6  # gated SiLU: 5 + 6 per layer
    assert fused_kernels_per_step(spec(n_layers=8, ffn="plain", activation="gelu")) == 8 * 8 + 6
    # a shared block runs (and launches its kernels) every time it is applied
    shared = spec(n_layers=8, layer_sharing="block_repeat", share_repeat=2)
    assert fused_kernels_per_step(shared) == fused_kernels_per_step(spec(n_layers=8))
    mla = spec(attention="mla", n_kv_heads=0, mla_latent_rank=64, mla_rope_dim=16)
    assert fused_kernels_per_step(mla) == 8 * 15 + 6  # + down-projection, Split, latent norm, Concat


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_kernel_count_per_layer_is_the_built_deployment_graphs(attention, tmp_path):
    import onnx

    from nas.stages.deploy import build_deploy
    from nas.stages.model import build_model

    # GELU: one node in the built graph as in the count (SiLU is one QuickGelu there, two in the
    # builder's graph the count follows)
    kw = {"mla_latent_rank": 24, "mla_rope_dim": 8, "n_kv_heads": 0} if attention == "mla" else {}
    counts = {}
    for layers in (2, 4):
        s = spec(attention=attention, n_layers=layers, d_model=64, n_heads=4, head_dim=16, vocab_size=300,
                 context_length=32, activation="gelu", **kw)
        exported = build_deploy(build_model(s), tmp_path / f"{attention}{layers}", 32)
        counts[layers] = (len(onnx.load(str(exported.path), load_external_data=False).graph.node),
                          fused_kernels_per_step(s))
    built = (counts[4][0] - counts[2][0]) // 2
    assert built == (counts[4][1] - counts[2][1]) // 2, counts


def test_a_step_is_priced_on_the_heads_the_deployment_graph_runs():
    from nas.spec.latency import deployed_attention, deployed_flops, deployed_params, kv_elements_per_token

    # A Llama-like spec (head width a multiple of 16), as every public calibration point is: the
    # fused graph's figures are the architecture's own.
    s = spec(head_dim=32)
    assert deployed_params(s) == s.params()
    assert kv_elements_per_token(s) * s.activation_bytes == s.kv_cache_bytes_per_token()
    assert deployed_flops(s, 1, 100) == s.decode_flops(100) and deployed_flops(s, 64, 0) == s.prefill_flops(64)
    # A head width of 24 runs padded to 32: its cache and its Q/K/V/output weights grow by 32 / 24.
    odd = spec(head_dim=24)
    assert deployed_attention(odd) == (2, 32)
    assert kv_elements_per_token(odd) * odd.activation_bytes == odd.kv_cache_bytes_per_token() * 32 // 24
    assert deployed_params(odd) - odd.params() == 8 * (256 * (8 + 4) * 8 + 8 * 8 * 256)
    # MLA: one kv head [rotary key | latent] (16 + 64 -> 80 wide), cached as key and value, and no
    # rebuild of K and V from the latent per step: decode FLOPs grow with the context by the
    # attention alone.
    mla = spec(attention="mla", n_kv_heads=0, mla_latent_rank=64, mla_rope_dim=16)
    assert deployed_attention(mla) == (1, 80)
    assert kv_elements_per_token(mla) == 8 * 2 * 80
    grow = deployed_flops(mla, 1, 1000) - deployed_flops(mla, 1, 0)
    assert grow == 2 * 8 * 8 * 2 * 80 * 1000 < mla.decode_flops(1000) - mla.decode_flops(0)
    assert decode_step(mla, 1000).flops == deployed_flops(mla, 1, 1000)


def test_a_step_counts_kv_bytes_with_the_context_and_an_untied_input_table_once():
    s = spec(bitwidth=8)
    short, long = decode_step(s, 0), decode_step(s, 999)
    per_position = s.kv_cache_bytes_per_token()  # head_dim 32: no padding
    assert long.bytes - short.bytes == pytest.approx(999 * per_position)
    # tied or not, a step reads one vocab x d_model table (the lm_head) and gathers a row of the input one
    tied = spec(bitwidth=8, tied_embeddings=True)
    assert decode_step(tied, 0).bytes == pytest.approx(short.bytes, rel=1e-3)
    assert tied.weight_bytes() < s.weight_bytes()  # while the untied file holds both
    assert prefill_step(s, 128).flops > 100 * decode_step(s, 0).flops


# --- fitting -------------------------------------------------------------------------------------
def synthetic_observations(truth: LatencyModel, n: int = 8, *, prefill: bool = True) -> list[Observation]:
    shapes = [(4, 256), (8, 256), (16, 128), (24, 512), (32, 256), (6, 1024), (12, 768), (2, 2048)]
    out = []
    for i, (layers, width) in enumerate(shapes[:n]):
        s = spec(n_layers=layers, d_model=width, head_dim=width // 8)
        out.append(Observation(decode_step(s, 100), truth.step_ms(decode_step(s, 100)), i))
        if prefill:
            out.append(Observation(prefill_step(s, 256), truth.step_ms(prefill_step(s, 256)), i))
    return out


def test_fitting_recovers_known_parameters_from_synthetic_points():
    truth = LatencyModel(bandwidth_gbs={"*": 60.0}, compute_efficiency=0.3, kernel_us=7.0, base_memory_mb=300.0,
                         peak_gflops=PRIOR.peak_gflops, method="truth")
    model = fit_latency_model(synthetic_observations(truth), PRIOR)
    assert model.method == "fitted" and model.n_points == 8
    # the weak pull towards the datasheet biases each parameter by well under 1%
    assert model.bandwidth_for("int4") == pytest.approx(60.0, rel=0.01)
    assert model.compute_efficiency == pytest.approx(0.3, rel=0.01)
    assert model.kernel_us == pytest.approx(7.0, rel=0.01)
    assert model.fit_error["decode"] < 0.01 and model.fit_error["prefill"] < 0.01


def test_without_prefill_points_the_rate_keeps_its_datasheet_value_and_says_so():
    truth = LatencyModel(bandwidth_gbs={"*": 60.0}, compute_efficiency=0.3, kernel_us=7.0, base_memory_mb=300.0,
                         peak_gflops=PRIOR.peak_gflops, method="truth")
    model = fit_latency_model(synthetic_observations(truth, prefill=False), PRIOR)
    assert model.compute_efficiency == pytest.approx(1.0, rel=0.05)
    assert "datasheet" in model.parameter_sources["compute"]
    # decode's own FLOPs, priced at the datasheet rate, leave a few percent to the bandwidth
    assert model.bandwidth_for("int4") == pytest.approx(60.0, rel=0.1)


def test_too_few_points_fall_back_to_the_datasheet_and_say_so():
    truth = LatencyModel(bandwidth_gbs={"*": 60.0}, compute_efficiency=0.3, kernel_us=7.0, base_memory_mb=300.0,
                         peak_gflops=PRIOR.peak_gflops, method="truth")
    model = fit_latency_model(synthetic_observations(truth, n=2), PRIOR)
    assert model.method == "datasheet" and model.bandwidth_for("int4") == 100.0 and model.kernel_us == 10.0
    assert "fewer than 3" in model.parameter_sources["bandwidth"]


def test_nnls_never_returns_a_negative_cost():
    # y = 2*x0 - 1*x1 would fit exactly; the non-negative answer drops x1 instead
    rows = [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]
    targets = [1.0, 3.0, 5.0]
    x = nnls(rows, targets)
    assert min(x) >= 0 and x[1] == 0.0 and x[0] == pytest.approx(22 / 14)


def test_a_dtype_with_its_own_points_gets_its_own_bandwidth():
    # decode points only: the rate stays at the datasheet's, so the truth has it there too
    slow_int8 = LatencyModel(bandwidth_gbs={"*": 80.0, "int8": 50.0}, compute_efficiency=1.0, kernel_us=7.0,
                             base_memory_mb=300.0, peak_gflops=PRIOR.peak_gflops, method="truth")
    obs = []
    # deep-thin and shallow-wide shapes, so that bytes and kernel counts are not proportional
    shapes = [(4, 1024), (16, 256), (32, 128), (8, 512)]
    for i, ((layers, width), bits) in enumerate([(sh, b) for b in (4, 8) for sh in shapes]):
        s = spec(n_layers=layers, d_model=width, head_dim=width // 8, bitwidth=bits)
        obs.append(Observation(decode_step(s, 64), slow_int8.step_ms(decode_step(s, 64)), i))
    model = fit_latency_model(obs, PRIOR)
    assert model.bandwidth_for("int8") == pytest.approx(50.0, rel=0.05)
    assert model.bandwidth_for("int4") == pytest.approx(80.0, rel=0.05)
    assert "geometric mean" in model.parameter_sources["bandwidth[*]"]  # fp16 and fp32 had no point


# --- what the physics says about ranking ---------------------------------------------------------
DEEP_THIN = spec(n_layers=32, d_model=128, head_dim=16, vocab_size=2048)  # few bytes, many kernels
SHALLOW_WIDE = spec(n_layers=4, d_model=1024, head_dim=128, vocab_size=8192, bitwidth=8)  # many bytes, few kernels


def test_a_launch_bound_gpu_and_a_bandwidth_bound_cpu_rank_two_archs_oppositely():
    gpu = LatencyModel(bandwidth_gbs={"*": 75.0}, compute_efficiency=0.5, kernel_us=9.0, base_memory_mb=400.0,
                       peak_gflops=PRIOR.peak_gflops, method="fitted")
    cpu = LatencyModel(bandwidth_gbs={"*": 14.0}, compute_efficiency=0.15, kernel_us=1.0, base_memory_mb=45.0,
                       peak_gflops={"fp32": 150.0, "fp16": 300.0, "int8": 600.0, "int4": 600.0}, method="fitted")
    past = 255
    assert gpu.decode_ms(DEEP_THIN, past) > gpu.decode_ms(SHALLOW_WIDE, past)  # kernels dominate on the GPU
    assert cpu.decode_ms(DEEP_THIN, past) < cpu.decode_ms(SHALLOW_WIDE, past)  # bytes dominate on the CPU


def test_the_shipped_device_models_rank_them_as_their_physics_says():
    jetson, rpi5 = latency_model(load_profile("jetson")), latency_model(load_profile("rpi5"))
    assert jetson.decode_ms(DEEP_THIN, 255) > jetson.decode_ms(SHALLOW_WIDE, 255)
    assert rpi5.decode_ms(DEEP_THIN, 255) < rpi5.decode_ms(SHALLOW_WIDE, 255)


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


# --- the shipped points --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["jetson", "rpi5"])
def test_the_target_profiles_ship_sourced_points_that_are_fitted(name):
    profile = load_profile(name)
    assert len(profile.calibration) >= 5
    for p in profile.calibration:
        assert p.source.url.startswith("https://") and p.source.board and p.runtime and p.quantization
        assert p.measured_decode_ms() or p.measured_prefill_ms()
        assert 3.0 < p.bits() < 17.0
    sizes = {round(p.arch.params() / 1e9, 1) for p in profile.calibration}
    assert len(sizes) >= 4, "points of several sizes"
    model = latency_model(profile)
    assert model.method == "fitted" and model.n_points == len(profile.calibration)
    # effective bandwidth below the datasheet peak, as real kernels reach
    peak = profile.device.memory_bandwidth_gbs
    assert 0.3 * peak < model.bandwidth_for("int4") <= peak


@pytest.mark.parametrize("name", sorted(list_profile_files()))
def test_every_profile_says_in_its_comments_how_far_its_model_is_from_its_points(name):
    profile = load_profile(name)
    if len(profile.calibration) < 3:
        return
    text = Path(profile.source).read_text()
    stated = re.search(r"in-sample decode MAPE (\d+(?:\.\d+)?)%", text)
    assert stated, f"{name}: no 'in-sample decode MAPE N%' in its comments"
    actual = latency_model(profile).fit_error["decode"] * 100
    assert float(stated.group(1)) == pytest.approx(actual, abs=0.1), "the profile's comment is stale: rerun the bench"


def test_laptop_has_no_points_and_its_model_is_the_datasheet():
    model = latency_model(load_profile("laptop"))
    assert model.method == "datasheet" and model.n_points == 0
    assert "fewer than 3" in model.describe()["parameter_sources"]["bandwidth"]


def test_a_bad_calibration_point_names_the_file_and_the_key_in_one_line(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["calibration"] = [POINT, {**POINT, "decode_ms": None, "decode_tokens_per_s": -3}]
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: calibration[1].decode_tokens_per_s: ") and "greater than 0" in message
    assert "\n" not in message


def test_a_published_rate_becomes_milliseconds(tmp_path):
    doc = copy.deepcopy(BASE)
    point = {k: v for k, v in POINT.items() if k not in ("decode_ms", "prefill_ms")}
    doc["calibration"] = [{**point, "decode_tokens_per_s": 20.0, "prefill_tokens_per_s": 320.0,
                           "workload": {"prompt_tokens": 64}, "file_mb": 2.0}]
    p = load_profile(write(tmp_path, yaml.safe_dump(doc))).calibration[0]
    assert p.measured_decode_ms() == pytest.approx(50.0)
    assert p.measured_prefill_ms() == pytest.approx(200.0)  # 64 tokens at 320 tokens/s
    assert p.bits() == pytest.approx(2 * 2**20 * 8 / p.arch.params())


# --- the search's estimate path ------------------------------------------------------------------
def _host_measurement(s: ArchSpec, profile_name: str) -> Measurement:
    return Measurement(arch_id=s.arch_id, profile=profile_name, bitwidth=s.bitwidth, label="measured:local",
                       prefill=LatencyStats.of_median(3.0), decode=LatencyStats.of_median(0.5),
                       peak_memory_bytes=90 * 2**20, model_bytes=5 * 2**20, workload={},
                       provenance={"execution_provider": "CPUExecutionProvider", "cpu": "test"})


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> Host:
    """A host whose 'measurement' is canned: the estimate path without exporting or timing."""
    monkeypatch.setattr("nas.search.pipeline.measure_local",
                        lambda model_dir, s, profile, runtime=None: _host_measurement(s, profile.name))
    cal = HostCalibration(memory_bandwidth_gbs=20.0, peak_gflops={"fp32": 100.0, "fp16": 100.0, "int8": 400.0},
                          provenance={"cpu": "test"}, measured_at=0.0)
    return Host(load_profile("host"), cal)


def test_an_estimated_profile_gets_its_device_model_s_figures_labelled_and_explained(fake_host, tmp_path):
    s = spec(context_length=256)
    m = measure_deployed(s, tmp_path, load_profile("laptop"), host=fake_host)
    assert m.label == ESTIMATED_MODEL
    model = latency_model(load_profile("laptop"))
    assert m.decode_ms == pytest.approx(model.decode_ms(s, load_profile("laptop").workload.decode_past_tokens(s)))
    assert m.decode_ms != 0.5  # not the host's timing
    prov = m.provenance
    assert prov["estimator"] == "per-device latency model" and prov["n_points"] == 0
    assert "fewer than 3" in prov["parameter_sources"]["bandwidth"]  # datasheet fallback, said so
    assert prov["kernels_per_step"] == fused_kernels_per_step(s) and prov["host_decode_ms"] == 0.5
    assert m.model_bytes == 5 * 2**20 and m.peak_memory_bytes == 90 * 2**20  # CPU target: the host's file and RSS


def test_a_device_without_its_ray_node_is_estimated_from_its_fitted_model_and_says_so(fake_host, tmp_path):
    notes: list[str] = []
    s = spec(context_length=256)
    m = measure_deployed(s, tmp_path, load_profile("jetson"), host=fake_host, notify=notes.append)
    assert m.label == ESTIMATED_MODEL and notes and ESTIMATED_MODEL in notes[0]
    prov = m.provenance
    assert prov["estimator"] == "per-device latency model" and prov["n_points"] == 6
    assert set(prov["fit_error_mape"]) == {"decode"} and prov["kernel_us"] > 0
    assert m.peak_memory_bytes > 400 * 2**20  # the CUDA runtime's base, not the host's RSS


def test_an_estimate_without_a_host_measurement_is_fully_analytic():
    s = spec(context_length=256)
    m = estimate(s, load_profile("rpi5"))
    assert m.model_bytes == s.weight_bytes() and m.provenance["model_bytes_from"].startswith("analytic")
    assert "host_decode_ms" not in m.provenance


def test_a_stored_estimate_is_reused_only_under_the_same_device_model():
    import dataclasses

    from nas.search.trial import _still_valid

    rpi5 = load_profile("rpi5")
    s = spec(context_length=256)
    est = estimate(s, rpi5)
    assert _still_valid(est, rpi5)
    fewer_points = rpi5.model_copy(update={"calibration": rpi5.calibration[:-1]})
    assert not _still_valid(est, fewer_points)  # the points changed: estimate again
    old = dataclasses.replace(est, label="estimated:roofline", provenance={"decode_factor": 2.0})
    assert not _still_valid(old, rpi5)  # the constant-factor estimate is never reused
    assert _still_valid(dataclasses.replace(est, label="measured:local", provenance={}), rpi5)
