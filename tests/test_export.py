"""Export and quantization: ONNX Runtime runs the exported graph as PyTorch does, every quantized
file stays close to it, and the files shrink with the bitwidth."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.spec.errors import NasError
from nas.spec.space import load_space
from nas.stages.export import (
    ExportedModel,
    ExportError,
    export_onnx,
    export_spec,
    load_exported,
    ort_session,
    quantize,
    run_cached,
)
from nas.stages.model import Decoder, build_model
from tests.test_arch import ATTENTION, SHARING, make

# Real text as byte-level tokens (ids < 256 fit every vocabulary here): to train on briefly and to
# prompt with, so that logits are those of text and not of random ids.
TEXT = np.frombuffer(Path(json.__file__).with_name("decoder.py").read_bytes(), dtype=np.uint8).astype(np.int64)


def _torch_steps(model: Decoder, ids: np.ndarray, prompt: int) -> tuple[list[np.ndarray], list]:
    """Prefill ids[:, :prompt], then decode the rest one token at a time: logits of each call."""
    steps = []
    with torch.no_grad():
        logits, cache = model.forward_cached(torch.from_numpy(ids[:, :prompt]), model.empty_cache(ids.shape[0]))
        steps.append(logits.numpy())
        for t in range(prompt, ids.shape[1]):
            logits, cache = model.forward_cached(torch.from_numpy(ids[:, t : t + 1]), cache)
            steps.append(logits.numpy())
    return steps, cache


def _ort_steps(exported: ExportedModel, ids: np.ndarray, prompt: int) -> tuple[list[np.ndarray], dict]:
    session = ort_session(exported)
    logits, cache = run_cached(session, exported, ids[:, :prompt], None)
    steps = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache = run_cached(session, exported, ids[:, t : t + 1], cache)
        steps.append(logits)
    return steps, cache


# --- fp32: the exported graph is the model --------------------------------------------------------


def _parity_cases():
    # Every attention kind with every sharing scheme; norm and tying alternate so that each
    # attention kind and each sharing scheme meets both norms and both tying choices, and every
    # (norm, tied) pair occurs. The full product (32 exports at ~2.5 s each on these 2 cores)
    # would not fit the test budget; norm and tying act outside attention and sharing.
    for (i, attention), (j, sharing) in itertools.product(enumerate(ATTENTION), enumerate(SHARING)):
        norm = ("rmsnorm", "layernorm")[(i + j) % 2]
        tied = bool((i // 2 + j) % 2)
        ffn, act = (("gated", "silu"), ("plain", "gelu"))[i % 2]
        name = f"{attention}-{sharing}-{norm}-{'tied' if tied else 'untied'}"
        yield pytest.param(attention, sharing, norm, tied, ffn, act, id=name)


@pytest.mark.parametrize("attention,sharing,norm,tied,ffn,activation", list(_parity_cases()))
def test_ort_prefill_and_decode_match_torch(attention, sharing, norm, tied, ffn, activation, tmp_path):
    spec = make(attention, sharing, n_layers=2, d_model=32, head_dim=8, norm=norm, tied_embeddings=tied,
                ffn=ffn, activation=activation)
    model = build_model(spec, seed=1).eval()
    exported = export_onnx(model, tmp_path)

    a, b = ("latent", "rope") if attention == "mla" else ("key", "value")
    assert exported.input_names == ("input_ids", f"past.0.{a}", f"past.0.{b}", f"past.1.{a}", f"past.1.{b}")
    assert exported.output_names == ("logits", f"present.0.{a}", f"present.0.{b}", f"present.1.{a}",
                                     f"present.1.{b}")
    assert exported.tied_storage == ("duplicated" if tied else "untied")
    assert exported.bitwidth == 32 and exported.opset == 20

    # Prefill of 7 tokens on an empty cache (past length 0), then 3 one-token decode steps.
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 10))
    want, want_cache = _torch_steps(model, ids, prompt=7)
    got, got_cache = _ort_steps(exported, ids, prompt=7)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"call {step}")
    # The cache comes back in the layout of nas/stages/model.py, with the shapes cache_spec promises.
    flat_want = [t.numpy() for pair in want_cache for t in pair]
    for c, w in zip(exported.cache_spec, flat_want, strict=True):
        assert got_cache[c.name].shape == c.concrete_shape(batch=2, past=10) == w.shape
        assert got_cache[c.name].dtype == np.dtype(c.dtype)
        np.testing.assert_allclose(got_cache[c.name], w, atol=1e-4, rtol=1e-4)


# --- quantized: close to fp32, and smaller -----------------------------------------------------------


def _train_briefly(model: Decoder, steps: int = 40) -> float:
    """Some AdamW steps on real text, enough to move the weights off their init scale (logits'
    std ~2 instead of ~0.15, where near-uniform logits would make any error look small)."""
    gen = torch.Generator().manual_seed(0)
    data = torch.from_numpy(TEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def logit_errors(want: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """rel: max |logit difference| over the fp32 logits' std; kl: mean KL(fp32 || quantized) of
    the next-token distributions, in nats; top1: how often both pick the same next token."""
    got = got.astype(np.float32)
    log_p = torch.log_softmax(torch.from_numpy(want), -1)
    log_q = torch.log_softmax(torch.from_numpy(got), -1)
    return {
        "rel": float(np.abs(got - want).max() / want.std()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def quantization_errors(model: Decoder, out_dir: Path) -> tuple[dict[int, ExportedModel], dict[int, dict]]:
    """Export, quantize to every bitwidth, and measure each against PyTorch's fp32 logits over a
    24-token prefill and 4 decode steps of text."""
    fp32 = export_onnx(model, out_dir / "32")
    files = {32: fp32, **{bw: quantize(fp32, bw, out_dir / str(bw)) for bw in (16, 8, 4)}}
    ids = (TEXT[:56].reshape(2, 28) % model.spec.vocab_size).copy()
    want = np.concatenate(_torch_steps(model, ids, prompt=24)[0], axis=1)
    errors = {bw: logit_errors(want, np.concatenate(_ort_steps(f, ids, prompt=24)[0], axis=1))
              for bw, f in files.items()}
    return files, errors


# Bounds per bitwidth, from what quantization_errors measured (worst case over 12 random `tiny`-space
# specs at init, logits' std ~0.15, and 7 models trained as in _train_briefly, std ~2; top1 on the
# trained ones only):
#            rel     kl       top1
#   fp16     0.0033  4.4e-7   1.0
#   int8     0.10    2.3e-5   1.0
#   int4     0.87    2.2e-3   0.91
# At init rel is the larger (int4 0.5-0.87 vs 0.06-0.10 trained, as the logits' std is tiny) and KL
# the smaller (near-uniform distributions), so both regimes are tested. Longer windows measured
# more (48-256 tokens after 150 training steps: int8 rel 0.16 / kl 4e-4, int4 rel 0.6 / kl 3e-3 /
# top1 0.87). The bounds leave ~2-6x over the worst measured here (top1 ~0.15 below), loose enough
# for other CPUs' kernels, tight enough to catch a wrongly dequantized table or a cache kept at
# the wrong precision (rel >> 2).
BOUNDS = {
    32: {"rel": 1e-4, "kl": 1e-6, "top1": 1.0},
    16: {"rel": 0.02, "kl": 1e-5, "top1": 0.95},
    8: {"rel": 0.3, "kl": 2e-4, "top1": 0.85},
    4: {"rel": 2.0, "kl": 1e-2, "top1": 0.75},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Decoder, dict[int, ExportedModel], dict[int, dict]]:
    spec = make("gqa", n_layers=2, d_model=48, head_dim=12, vocab_size=300, context_length=64)
    model = build_model(spec, seed=0)
    _train_briefly(model)
    files, errors = quantization_errors(model, tmp_path_factory.mktemp("trained"))
    return model, files, errors


def _check_bounds(errors: dict[int, dict], check_top1: bool) -> None:
    for bw, err in errors.items():
        bound = BOUNDS[bw]
        assert err["rel"] <= bound["rel"], f"{bw}-bit: {err}"
        assert err["kl"] <= bound["kl"], f"{bw}-bit: {err}"
        if check_top1:
            assert err["top1"] >= bound["top1"], f"{bw}-bit: {err}"


def test_quantized_logits_of_a_trained_model_stay_close_to_fp32(trained):
    _, _, errors = trained
    _check_bounds(errors, check_top1=True)
    # Fewer bits, more error: the error of each bitwidth is that of its quantization.
    assert errors[16]["kl"] < errors[8]["kl"] < errors[4]["kl"]


@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_logits_of_tiny_space_models_stay_close_to_fp32(seed, tmp_path):
    spec = dataclasses.replace(load_space("tiny").sample(random.Random(seed)), bitwidth=32)
    _, errors = quantization_errors(build_model(spec, seed=seed).eval(), tmp_path)
    # Top-1 is not checked at init: near-uniform logits make the argmax a coin toss.
    _check_bounds(errors, check_top1=False)


def test_quantized_files_are_smaller_and_say_what_they_hold(trained):
    model, files, _ = trained
    size = {bw: f.total_bytes for bw, f in files.items()}
    assert size[8] < size[16] < size[32]
    assert size[4] < size[8]
    for bw, f in files.items():
        assert f.total_bytes == sum(p.stat().st_size for p in f.files)
        assert f.path in f.files and len(f.files) == 2  # the .onnx and its external data
        # File over analytic weight bytes at this bitwidth: measured 1.08 (fp32), 1.16 (fp16),
        # 1.42 (int8), 1.83 (int4) for this 0.1M-param model, whose graph (~35 kB) is a large share
        # of a small file; on a 24M-param GQA model 1.002 (fp32), 1.004 (fp16), 1.01 (int8),
        # 1.04 (int4). A tied spec's file holds its table twice (tied_storage="duplicated").
        analytic = dataclasses.replace(model.spec, bitwidth=bw).weight_bytes()
        assert analytic <= f.total_bytes < 1.25 * analytic + 48_000, (bw, f.total_bytes, analytic)
    assert files[32].quantized_ops == () and not files[32].embedding_quantized
    for bw in (16, 8, 4):
        assert files[bw].quantized_ops == ("MatMul", "Gather")
        assert files[bw].embedding_quantized and files[bw].lm_head_quantized
    # fp16 keeps no fp32 at its edges: the cache and the logits are fp16 too.
    assert files[16].logits_dtype == "float16"
    assert {c.dtype for c in files[16].cache_spec} == {"float16"}
    assert {c.dtype for bw in (32, 8, 4) for c in files[bw].cache_spec} == {"float32"}
    assert files[4].opset == 21  # the int4 quantizer raises it for int4 tensors (see nas/stages/export.py)


# --- the stage and its helpers ---------------------------------------------------------------------


def test_export_spec_deploys_the_bitwidth_and_keeps_fp32_beside_it(tmp_path):
    spec = make("mla", "block_repeat", n_layers=2, d_model=32, head_dim=8, bitwidth=8, tied_embeddings=True)
    model = build_model(spec, seed=2).eval()
    deployed = export_spec(spec, tmp_path, model=model)
    assert deployed.bitwidth == 8 and deployed.path == tmp_path / "model.onnx"
    assert deployed.tied_storage == "duplicated" and deployed.spec == spec
    assert load_exported(tmp_path) == deployed  # the manifest round-trips
    fp32 = load_exported(tmp_path / "fp32")
    assert fp32.bitwidth == 32 and fp32.total_bytes > deployed.total_bytes

    # One file, any batch: batch 1 and 3 (the export traced batch 2) match PyTorch, and so does
    # a one-token prefill (sequence and past length both at their smallest).
    for batch, prompt in ((1, 1), (3, 4)):
        ids = np.random.default_rng(batch).integers(0, spec.vocab_size, (batch, 6))
        want, _ = _torch_steps(model, ids, prompt=prompt)
        got, _ = _ort_steps(fp32, ids, prompt=prompt)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_fp32_quantize_is_the_same_file_or_a_copy(trained, tmp_path):
    _, files, _ = trained
    assert quantize(files[32], 32, files[32].path.parent) == files[32]
    copy = quantize(files[32], 32, tmp_path)
    assert copy.path == tmp_path / "model.onnx" and copy.total_bytes == files[32].total_bytes
    assert dataclasses.replace(copy, path=files[32].path, files=files[32].files) == files[32]


def test_bad_requests_raise_export_errors(trained, tmp_path):
    model, files, _ = trained
    with pytest.raises(ExportError, match="bitwidth must be one of"):
        quantize(files[32], 2, tmp_path / "q")
    with pytest.raises(ExportError, match="takes an fp32 export"):
        quantize(files[8], 4, tmp_path / "q")
    with pytest.raises(ExportError, match="would overwrite"):
        quantize(files[32], 8, files[32].path.parent)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "x", opset=23)
    with pytest.raises(ExportError, match="built for"):
        export_spec(make("mha"), tmp_path / "y", model=model)
    with pytest.raises(ExportError, match=r"\(batch, seq\)"):
        run_cached(ort_session(files[32]), files[32], np.zeros(5, dtype=np.int64), None)
    with pytest.raises(ExportError, match="no exported model"):
        load_exported(tmp_path)
    assert issubclass(ExportError, NasError)


# --- the trained model's export from the measured graph (reweight) --------------------------------


def _other_weights(spec, seed: int) -> Decoder:
    """A model of ``spec`` with weights unlike a fresh one's, as after training: norms and biases
    off their ones and zeros, every matrix moved."""
    model = build_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("attention,sharing,norm,tied", [
    ("gqa", "block_repeat", "rmsnorm", True), ("mla", "none", "layernorm", False),
    ("mha", "none", "layernorm", True), ("mqa", "block_repeat", "rmsnorm", False),
])
def test_reweighting_the_measured_graph_is_the_trace_of_the_trained_model(attention, sharing, norm, tied, tmp_path):
    from nas.stages.export import fp32_source, fresh_distinct_model

    spec = make(attention, sharing, norm=norm, tied_embeddings=tied, bitwidth=8)
    measured = export_spec(spec, tmp_path / "measured", model=fresh_distinct_model(spec))
    trained = _other_weights(spec, seed=3)
    reused = export_spec(spec, tmp_path / "reused", model=trained, like=measured)
    traced = export_spec(spec, tmp_path / "traced", model=trained)
    assert reused.made_by == "reweighted" and traced.made_by == "traced"
    assert load_exported(tmp_path / "reused" / "fp32").made_by == "reweighted"  # said in the manifest too
    src, ref = fp32_source(reused), fp32_source(traced)
    # the same graph, node for node, the same bytes, and the trained model's outputs
    nodes = [[(n.op_type, tuple(n.input)) for n in onnx_graph(e).node] for e in (src, ref)]
    assert nodes[0] == nodes[1] and src.total_bytes == ref.total_bytes
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 10))
    want, _ = _torch_steps(trained.eval(), ids, prompt=6)
    for g, w in zip(_ort_steps(src, ids, prompt=6)[0], want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    # the quantized files agree as well: quantization sees the same graph and weights
    for g, w in zip(_ort_steps(reused, ids, prompt=6)[0], _ort_steps(traced, ids, prompt=6)[0], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def onnx_graph(exported: ExportedModel):
    import onnx

    return onnx.load(str(exported.path), load_external_data=False).graph


def test_a_graph_with_merged_weights_is_refused_and_export_spec_traces_instead(tmp_path):
    from nas.stages.export import reweight

    spec = make("gqa", "none", norm="layernorm")
    # A plain fresh model: every norm weight is ones, every bias zeros, and the exporter keeps
    # one initializer for each group of equal ones: a trained model's norms cannot go back in.
    merged = export_onnx(build_model(spec, seed=0), tmp_path / "merged")
    trained = _other_weights(spec, seed=4)
    with pytest.raises(ExportError, match="merged"):
        reweight(merged, trained, tmp_path / "x")
    out = export_spec(spec, tmp_path / "y", model=trained, like=merged)
    assert out.made_by == "traced"
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (1, 5))
    want, _ = _torch_steps(trained.eval(), ids, prompt=5)
    np.testing.assert_allclose(_ort_steps(out, ids, prompt=5)[0][0], want[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="exported for"):
        reweight(merged, build_model(make("mha")), tmp_path / "z")
