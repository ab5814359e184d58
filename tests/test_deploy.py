"""The deployment graph (nas.stages.deploy): ONNX Runtime's fused ops give the torch model's logits
at every bitwidth, for every attention kind (MLA as multi-query attention on its latent), norm,
FFN kind, activation, tying and sharing; it says what it cannot express; and it is fed and
measured like the plain graph."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from nas.spec.latency import mla_layout
from nas.spec.profile import load_profile
from nas.stages.deploy import build_deploy, quantize_blockwise, unsupported_reason
from nas.stages.export import ExportError, export_onnx, load_exported, ort_session, quantize, run_cached
from nas.stages.measure import measure_local
from nas.stages.model import build_model
from tests.test_arch import make
from tests.test_export import TEXT, _ort_steps, _torch_steps, _train_briefly, logit_errors

ATTENTIONS = {"mha": {}, "gqa": {"n_kv_heads": 2}, "mqa": {}}
FFNS = [("gated", "silu"), ("plain", "gelu"), ("gated", "relu"), ("plain", "silu"), ("gated", "gelu"),
        ("plain", "relu")]


def tiny(attention: str = "gqa", sharing: str = "none", **kw):
    """A model small enough to build and run in a fraction of a second; head_dim 16 is the
    smallest GroupQueryAttention takes on the CPU unpadded, d_model 64 two quantization blocks."""
    base = dict(n_layers=2, d_model=64, n_heads=4, head_dim=16, vocab_size=300, context_length=32)
    base.update(ATTENTIONS[attention])
    base.update(kw)
    return make(attention, sharing, **base)


# Bounds per bitwidth against torch's fp32 logits (prefill of 7 tokens, 3 decode steps, batch 2,
# at init: logits' std ~0.15, near-uniform, so top-1 is not checked here). Worst measured over the
# full product of the axes below (96 builds): fp32 rel 2.7e-6, kl 7e-8 (rounding); fp16 rel 0.0037,
# kl 8e-8; int8 rel 0.057, kl 1.5e-6; int4 rel 0.80, kl 3.6e-4. They are the plain graph's bounds
# (tests/test_export.py BOUNDS, where the plain graph measured fp16 0.0033, int8 0.10, int4 0.87 rel
# at init): the deployment graph is held to the same faithfulness as the graph it replaces.
BOUNDS = {
    32: {"rel": 1e-4, "kl": 1e-6},
    16: {"rel": 0.02, "kl": 1e-5},
    8: {"rel": 0.3, "kl": 2e-4},
    4: {"rel": 2.0, "kl": 1e-2},
}


def _cases():
    # Every attention kind, sharing scheme, tying and bitwidth (48 builds, no tracing: ~0.5 s each
    # with the session); the norm alternates so that each of those values meets both norms, and
    # the FFN kind and activation cycle through their 6 pairs so each meets every other axis.
    axes = itertools.product(enumerate(ATTENTIONS), enumerate(("none", "block_repeat")), enumerate((False, True)),
                             (32, 16, 8, 4))
    for n, ((i, attention), (j, sharing), (k, tied), bits) in enumerate(axes):
        norm = ("rmsnorm", "layernorm")[(i + j + k + n) % 2]
        ffn, act = FFNS[n % len(FFNS)]
        name = f"{attention}-{sharing}-{norm}-{'tied' if tied else 'untied'}-{ffn}-{act}-{bits}"
        yield pytest.param(attention, sharing, norm, tied, ffn, act, bits, id=name)


@pytest.mark.parametrize("attention,sharing,norm,tied,ffn,activation,bits", list(_cases()))
def test_deployment_graph_matches_torch(attention, sharing, norm, tied, ffn, activation, bits, tmp_path):
    # An FFN width of 176 (ratio 2.75) is no whole number of quantization blocks: MatMulNBits
    # pads K; 256 (ratio 4) is.
    spec = tiny(attention, sharing, norm=norm, tied_embeddings=tied, ffn=ffn, activation=activation,
                ffn_ratio=2.75 if tied else 4.0)
    model = build_model(spec, seed=1).eval()
    exported = build_deploy(model, tmp_path, bits)
    assert exported.graph == "gqa" and exported.made_by == "built" and exported.bitwidth == bits
    assert exported.tied_storage == ("shared" if tied else "untied")
    assert load_exported(tmp_path) == exported  # the manifest round-trips, graph kind included

    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 10))
    want, want_cache = _torch_steps(model, ids, prompt=7)
    got, got_cache = _ort_steps(exported, ids, prompt=7)
    err = logit_errors(np.concatenate(want, axis=1), np.concatenate(got, axis=1))
    assert err["rel"] <= BOUNDS[bits]["rel"] and err["kl"] <= BOUNDS[bits]["kl"], err
    # The cache is the torch model's layout (B, kv, P, hd), which is GroupQueryAttention's BNSH.
    flat_want = [t.numpy() for pair in want_cache for t in pair]
    for c, w in zip(exported.cache_spec, flat_want, strict=True):
        assert got_cache[c.name].shape == c.concrete_shape(batch=2, past=10) == w.shape
        assert got_cache[c.name].dtype == np.dtype(c.dtype)
        if bits == 32:  # the cache holds K and V of float weights: exact up to rounding
            np.testing.assert_allclose(got_cache[c.name], w, atol=1e-4, rtol=1e-4)


def test_deployment_graph_is_fused_and_shares_blocks_and_tied_tables(tmp_path):
    spec = tiny("gqa", "block_repeat", n_layers=4, tied_embeddings=True)
    model = build_model(spec, seed=0)
    files = {bits: build_deploy(model, tmp_path / str(bits), bits) for bits in (32, 4)}
    for bits, exported in files.items():
        proto = onnx.load(str(exported.path), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        # Per applied layer: norm, packed QKV, GroupQueryAttention, output, norm, up, gate,
        # activation, Mul, down (10); plus embedding (2 nodes), final norm and lm_head.
        assert ops.count("GroupQueryAttention") == spec.n_layers
        assert len(ops) == 10 * spec.n_layers + 4, ops
        assert not {"Expand", "Concat", "Softmax", "Transpose"} & set(ops[2:])  # nothing of the plain graph's
        linear = "MatMul" if bits == 32 else "MatMulNBits"
        assert ops.count(linear) == 5 * spec.n_layers + 1  # every linear, the lm_head included
        weights = {i.name for i in proto.graph.initializer}
        # Two unique blocks for four applied layers: each block's weights are stored once.
        assert sum(".attn.wqkv." in w for w in weights) == spec.unique_layers * (1 if bits == 32 else 3)
        assert not any("tok_emb" in w for w in weights)  # the tied table is the lm_head's, stored once
    # The tied int4 file holds one table: under the untied file by about a quantized table.
    untied = build_deploy(build_model(tiny("gqa", "block_repeat", n_layers=4), seed=0), tmp_path / "u", 4)
    table = spec.vocab_size * spec.d_model * (0.5 + 4.5 / 32)
    assert files[4].total_bytes < untied.total_bytes - 0.9 * table


def test_what_it_cannot_express_is_refused_with_the_reason(tmp_path):
    assert unsupported_reason(tiny()) is None
    assert unsupported_reason(make("mla", n_layers=2, d_model=64, head_dim=16)) is None  # below
    assert unsupported_reason(tiny(head_dim=8, d_model=32)) is None  # padded, not refused (below)
    assert "d_model 48" in unsupported_reason(tiny(d_model=48), bitwidth=4)
    assert unsupported_reason(tiny(d_model=48), bitwidth=32) is None
    with pytest.raises(ExportError, match=r"no deployment graph .* d_model 48"):
        build_deploy(build_model(tiny(d_model=48, bitwidth=8)), tmp_path)
    with pytest.raises(ExportError, match="bitwidth must be one of"):
        build_deploy(build_model(tiny()), tmp_path, 2)


@pytest.mark.parametrize("attention,head_dim,d_model", [("mha", 24, 96), ("gqa", 12, 64), ("mqa", 8, 32)])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_a_head_dim_off_multiples_of_16_is_padded_and_still_matches_torch(attention, head_dim, d_model, bits,
                                                                          tmp_path):
    # GroupQueryAttention on the CPU takes head_dim in multiples of 16 only: the graph pads each head
    # with zeros (Q/K by halves, to keep rotate-half's pairs), which changes no dot product.
    spec = tiny(attention, head_dim=head_dim, d_model=d_model, norm="layernorm", ffn="plain", activation="gelu")
    model = build_model(spec, seed=4).eval()
    exported = build_deploy(model, tmp_path, bits)
    hdp = -(-head_dim // 16) * 16
    assert exported.graph_note.startswith(f"head_dim {head_dim} padded to {hdp}")
    ids = np.random.default_rng(2).integers(0, spec.vocab_size, (2, 10))
    want, want_cache = _torch_steps(model, ids, prompt=7)
    got, got_cache = _ort_steps(exported, ids, prompt=7)
    err = logit_errors(np.concatenate(want, axis=1), np.concatenate(got, axis=1))
    assert err["rel"] <= BOUNDS[bits]["rel"] and err["kl"] <= BOUNDS[bits]["kl"], err
    (k_name, v_name), (k_want, v_want) = [c.name for c in exported.cache_spec[:2]], want_cache[0]
    k, v = got_cache[k_name], got_cache[v_name]
    assert k.shape == (2, spec.n_kv_heads, 10, hdp) == exported.cache_spec[0].concrete_shape(2, 10)
    if bits == 32:  # the real dimensions hold the torch model's K and V; the padding stays zero
        half = head_dim // 2
        np.testing.assert_allclose(np.concatenate((k[..., :half], k[..., hdp // 2 : hdp // 2 + half]), -1),
                                   k_want.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(v[..., :head_dim], v_want.numpy(), atol=1e-4, rtol=1e-4)
        assert not v[..., head_dim:].any() and not k[..., half : hdp // 2].any()


def _mla_cases():
    # rope 8 (rotary slots padded to 16, the key's halves apart) with a latent that leaves a zero
    # tail (12 + 24 -> 48 wide), and rope 16 with one that fills the width exactly (16 + 32 = 48);
    # at every bitwidth, each layout twice: once with RMSNorm, unshared, and once with LayerNorm
    # (the latent's norm too), block-repeated, so that fp32 (the exact check) meets both; tying
    # alternates between the layouts (16 builds, no tracing).
    for (i, (dr, r)), bits, variant in itertools.product(enumerate(((8, 24), (16, 32))), (32, 16, 8, 4), (0, 1)):
        norm, sharing = (("rmsnorm", "none"), ("layernorm", "block_repeat"))[variant]
        tied = bool((i + variant) % 2)
        yield pytest.param(dr, r, norm, sharing, tied, bits, id=f"r{r}+{dr}-{norm}-{sharing}-tied{int(tied)}-{bits}")


@pytest.mark.parametrize("dr,r,norm,sharing,tied,bits", list(_mla_cases()))
def test_mla_runs_as_multi_query_attention_on_its_latent_and_matches_torch(dr, r, norm, sharing, tied, bits,
                                                                           tmp_path):

    spec = make("mla", sharing, n_layers=4 if sharing != "none" else 2, d_model=64, n_heads=4, head_dim=16,
                vocab_size=300, context_length=32, mla_latent_rank=r, mla_rope_dim=dr, norm=norm,
                tied_embeddings=tied, ffn="gated", activation="silu")
    model = build_model(spec, seed=1).eval()
    exported = build_deploy(model, tmp_path, bits)
    rotary, lead, width = mla_layout(spec)
    assert exported.graph == "gqa" and width % 16 == 0 and width == 48
    assert exported.graph_note.startswith(f"mla as multi-query attention on its latent (up-projections absorbed): "
                                          f"one kv head of width {width}")
    proto = onnx.load(str(exported.path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GroupQueryAttention") == spec.n_layers
    assert not any(".attn.w_up" in i.name for i in proto.graph.initializer)  # absorbed

    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 10))
    want, want_cache = _torch_steps(model, ids, prompt=7)
    got, got_cache = _ort_steps(exported, ids, prompt=7)
    err = logit_errors(np.concatenate(want, axis=1), np.concatenate(got, axis=1))
    assert err["rel"] <= BOUNDS[bits]["rel"] and err["kl"] <= BOUNDS[bits]["kl"], err
    for i, (c_want, rope_want) in enumerate(want_cache):
        key, value = got_cache[f"past.{i}.key"], got_cache[f"past.{i}.value"]
        assert key.shape == value.shape == (2, 1, 10, width) == exported.cache_spec[2 * i].concrete_shape(2, 10)
        if bits == 32:  # the key holds the torch model's rotated k_rope and its normalized latent
            half = dr // 2
            rope = np.concatenate((key[:, 0, :, :half], key[:, 0, :, rotary // 2 : rotary // 2 + half]), -1)
            np.testing.assert_allclose(rope, rope_want.numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(key[:, 0, :, lead : lead + r], c_want.numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(value[..., lead:], key[..., lead:], atol=0)
            assert not key[..., half : rotary // 2].any() and not key[..., lead + r :].any()
    # MLA's point, kept: its cache per token is well under what MHA of the same heads holds.
    assert 2 * width < 2 * spec.n_heads * spec.head_dim


@pytest.mark.parametrize("attention,head_dim,tied", [("gqa", 16, False), ("gqa", 12, True), ("mla", 16, True)])
def test_the_weights_the_latency_model_prices_are_the_ones_the_graph_stores(attention, head_dim, tied, tmp_path):
    # nas.spec.latency.deployed_params counts what the deployment graph holds: padded heads,
    # MLA's absorbed query and output; the same count as the built fp32 graph's weights.
    from onnx import numpy_helper

    from nas.spec.latency import deployed_params

    kw = {"mla_latent_rank": 24, "mla_rope_dim": 8} if attention == "mla" else {}
    spec = make(attention, "block_repeat", n_layers=4, d_model=64, n_heads=4, head_dim=head_dim, vocab_size=300,
                context_length=32, tied_embeddings=tied, **({"n_kv_heads": 2} if attention == "gqa" else {}), **kw)
    exported = build_deploy(build_model(spec), tmp_path, 32)
    proto = onnx.load(str(exported.path))
    stored = sum(numpy_helper.to_array(i).size for i in proto.graph.initializer
                 if not i.name.startswith(("rotary.", "mla.split", "embed/")))
    assert stored == deployed_params(spec)
    assert (stored == spec.params()) == (attention == "gqa" and head_dim % 16 == 0)


def test_blockwise_quantization_round_trips_within_half_a_step():
    w = np.random.default_rng(0).standard_normal((5, 70)).astype(np.float32)  # K not a whole block
    for bits in (8, 4):
        packed, scale, zp = quantize_blockwise(w, bits)
        k_blocks = 3
        assert packed.shape == (5, k_blocks, 32 * bits // 8) and scale.shape == (5, k_blocks)
        assert zp.shape == (5, k_blocks if bits == 8 else 2)
        if bits == 4:
            vals = np.stack((packed & 15, packed >> 4), axis=-1).reshape(5, k_blocks, 32)
            zps = np.stack((zp & 15, zp >> 4), axis=-1).reshape(5, -1)[:, :k_blocks]
        else:
            vals, zps = packed, zp
        deq = ((vals.astype(np.float32) - zps[..., None]) * scale[..., None]).reshape(5, -1)[:, :70]
        assert np.abs(deq - w).max() <= 0.5 * scale.max() + 1e-6


def test_several_tokens_after_a_prefill_at_batch_2_match_torch(tmp_path):
    # GroupQueryAttention refuses several new tokens after a cache at batch > 1; run_cached feeds
    # them one by one.
    spec = tiny("mqa")
    model = build_model(spec, seed=3).eval()
    exported = build_deploy(model, tmp_path, 32)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (2, 9))
    import torch

    with torch.no_grad():
        _, cache = model.forward_cached(torch.from_numpy(ids[:, :5]), model.empty_cache(2))
        want, _ = model.forward_cached(torch.from_numpy(ids[:, 5:]), cache)
    session = ort_session(exported)
    _, ort_cache = run_cached(session, exported, ids[:, :5], None)
    got, ort_cache = run_cached(session, exported, ids[:, 5:], ort_cache)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="over the graph's 32"):
        run_cached(session, exported, np.zeros((2, 24), dtype=np.int64), ort_cache)


@pytest.fixture(scope="module", params=["gqa", "mla"])
def trained(request):
    kw = {"mla_latent_rank": 32, "mla_rope_dim": 8} if request.param == "mla" else {}
    spec = make(request.param, n_layers=2, d_model=64, n_heads=4, head_dim=16, vocab_size=300, context_length=64,
                **({"n_kv_heads": 2} if request.param == "gqa" else {}), **kw)
    model = build_model(spec, seed=0)
    _train_briefly(model)
    return model


def test_a_trained_models_deployment_graph_is_as_close_to_torch_as_the_plain_graph(trained, tmp_path):
    ids = (TEXT[:56].reshape(2, 28) % trained.spec.vocab_size).copy()
    want = np.concatenate(_torch_steps(trained, ids, prompt=24)[0], axis=1)
    plain32 = export_onnx(trained, tmp_path / "plain32")
    errors = {}
    for bits in (32, 16, 8, 4):
        plain = plain32 if bits == 32 else quantize(plain32, bits, tmp_path / f"plain{bits}")
        deploy = build_deploy(trained, tmp_path / f"deploy{bits}", bits)
        errors[bits] = {kind: logit_errors(want, np.concatenate(_ort_steps(f, ids, prompt=24)[0], axis=1))
                        for kind, f in (("plain", plain), ("deploy", deploy))}
    for bits, err in errors.items():
        d, p = err["deploy"], err["plain"]
        assert d["rel"] <= BOUNDS[bits]["rel"] and d["kl"] <= BOUNDS[bits]["kl"], (bits, err)
        # Trained (logits' std ~2), top-1 agrees as the plain graph's bounds ask (tests/test_export.py).
        assert d["top1"] >= {32: 1.0, 16: 0.95, 8: 0.85, 4: 0.75}[bits], (bits, err)
        # No worse than the plain graph beyond a margin for rounding. Measured (2 seeds): int4 the
        # same error as the plain graph's (the same round-to-nearest blocks and accuracy level);
        # int8 2-5x lower KL (blocks of 32, weight-only, against per-tensor dynamic int8); fp16
        # 0.8-1.3x the plain graph's KL (~3e-7). MLA (its absorbed weights quantized, not its
        # own): int4 KL 8.67e-4 against the plain graph's 8.58e-4, int8 5.5e-6 against 1.4e-5.
        assert d["kl"] <= 2 * p["kl"] + 1e-7, (bits, err)


def test_the_measurement_worker_runs_the_deployment_graph(tmp_path):
    spec = tiny("gqa", bitwidth=4, context_length=64)
    exported = build_deploy(build_model(spec), tmp_path, 4)
    m = measure_local(tmp_path, spec, load_profile("host"), warmup=1, repeats=5, max_phase_seconds=2.0)
    assert m.provenance["graph"] == "gqa"
    assert m.decode.median_ms > 0 and m.prefill.median_ms > 0 and m.model_bytes == exported.total_bytes


def test_export_spec_deploys_the_fused_graph_or_says_why_it_falls_back(tmp_path):
    from nas.stages.export import export_spec

    spec = tiny("gqa", bitwidth=4, tied_embeddings=True)
    model = build_model(spec, seed=2).eval()
    deployed = export_spec(spec, tmp_path / "d", model=model, graph="deploy")
    assert deployed.graph == "gqa" and deployed.made_by == "built" and deployed.graph_note == ""
    assert not (tmp_path / "d" / "fp32").exists()  # built from the weights: no fp32 trace beside it
    # A spec the deployment graph cannot express gets the plain graph, with the reason on record.
    odd = tiny("gqa", n_layers=1, d_model=48, bitwidth=8)
    fallback = export_spec(odd, tmp_path / "m", graph="deploy")
    assert fallback.graph == "plain" and fallback.made_by == "traced"
    assert fallback.graph_note.startswith("plain graph: d_model 48") and load_exported(tmp_path / "m") == fallback
    # The default stays the plain graph, and a plain template is still reweighted.
    assert export_spec(spec, tmp_path / "p", model=model).graph == "plain"
    with pytest.raises(ExportError, match="graph must be"):
        export_spec(spec, tmp_path / "x", graph="fused")
