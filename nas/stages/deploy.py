"""The deployment graph: the fused, quantized ONNX graph a deployment runs, built from weights.

``nas.stages.export`` traces the model and lets ONNX Runtime's quantizers rewrite it: ~460 nodes
per decode step on a 30M model, most of them small element-wise ops (docs/dependencies.md). A
deployment runs the graph onnxruntime-genai's model builder emits instead, with ONNX Runtime's
fused contrib ops. This module writes that graph itself, node by node with the ``onnx`` helper
API, from a :class:`~nas.stages.model.Decoder`'s weights, so it covers what the builder cannot
(block-wise layer sharing, LayerNorm, plain FFNs, every activation) and needs no tracing::

    input_ids ─ Gather / GatherBlockQuantized ─┐
    per applied layer i (block i // share_repeat: its initializers are reused, its nodes repeated):
      [Skip]SimplifiedLayerNormalization | [Skip]LayerNormalization   (residual add fused in)
      qkv = MatMul | MatMulNBits (packed Q, K, V)      (B, T, (h + 2 kv) * hd)
      GroupQueryAttention(qkv, past.i.key, past.i.value, seqlens_k, total_sequence_length,
                          cos, sin; rotary inside)      -> (B, T, h * hd), present.i.key/value
      o = MatMul | MatMulNBits
      SkipNorm(o, residual); FFN: up / gate MatMuls, activation, Mul, down
    final SkipNorm, lm_head MatMul | MatMulNBits -> logits (B, T, vocab)

Per bitwidth: 32 and 16 keep float weights (fp16 computes, caches and returns logits in fp16, as
the plain graph does); 8 and 4 store every linear as MatMulNBits (bits 8 or 4, asymmetric,
blocks of ``INT4_BLOCK_SIZE`` along the input features, one fp32 scale and a zero point per
block, ``accuracy_level=4``) and the embedding as GatherBlockQuantized. A tied table is stored
once: at 32/16 bits as W^T (d_model, vocab), which the lm_head multiplies by and the embedding
gathers columns of; at 8/4 bits as the lm_head's packed MatMulNBits weight, which the embedding
reads through a Reshape with the same scales and zero points (``tied_storage == "shared"``).

Interface (``feeds.step_inputs`` says how to feed it): ``input_ids``, ``seqlens_k``,
``total_sequence_length``, and the cache ``past.{i}.key/value`` in GroupQueryAttention's BNSH
layout (B, kv_heads, past, head_dim), which is also the torch model's layout. The rotary tables
hold ``context_length`` positions (``max_positions``).

A head_dim that is not a multiple of 16, which GroupQueryAttention refuses on the CPU, is padded
with zeros to the next multiple (``padded_head_dim``): a cost a deployment on this runtime pays
too, so it is measured, and the manifest's ``graph_note`` says so; the cache then has the padded
width.

MLA runs as multi-query attention on its latent, with the up-projections absorbed into the query
and output weights (as DeepSeek-V2 deploys it; ``_mla_weights``): every head's score is
``q_rope . k_rope + (W_uk^T q_content) . c`` and its output ``W_uv (softmax . c)``, so one
GroupQueryAttention with a single kv head of width ``[rotary key | latent]`` computes it, with
no per-step rebuild of K and V from the cached latent::

      q  = MatMul(W_q absorbed)               (B, T, h * P)  per head [q_rope | W_uk^T q_content]
      kv = MatMul(W_down) -> Split -> latent norm -> Concat   (B, T, P)  [k_rope | c]
      GroupQueryAttention(q, kv, kv, ...; kv_num_heads=1, rotary on the first slots)
      o  = MatMul(W_o absorbed: W_o W_uv per head)

GroupQueryAttention takes one cache pair of equal widths, so the latent is cached twice (as key
and as value), ``P`` padded to a multiple of 16 (``mla_layout``; ``graph_note`` gives the
factor over the torch model's cache; the layout is ``nas.spec.latency.mla_layout``, whose
figures the latency model prices). What it cannot express (``unsupported_reason``), where
``nas.stages.export.export_spec`` falls back to the plain graph and records why: at 8/4 bits a
d_model that is not a multiple of the quantization block (the embedding's blocks run along
d_model).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from nas.spec.arch import BITWIDTHS, INT4_BLOCK_SIZE, ArchSpec
from nas.spec.latency import deployed_attention, mla_layout
from nas.stages.export import (
    MODEL_FILE,
    CacheInput,
    ExportedModel,
    ExportError,
    _cache_spec,
    _check_io,
    _describe,
    _remove_model_files,
    _save,
)
from nas.stages.model import Decoder

Tensor = torch.Tensor

DEPLOY_OPSET = 21
_MS = "com.microsoft"


def padded_head_dim(spec: ArchSpec) -> int:
    """The head width the deployment graph runs: head_dim rounded up to GroupQueryAttention's
    multiple of 16 (the padding is zeros, which change no dot product; see _pad_heads); for
    MLA the width of its one kv head (``nas.spec.latency.mla_layout``)."""
    return deployed_attention(spec)[1]


def padding_note(spec: ArchSpec) -> str:
    """What the padding costs, for the manifest; empty when head_dim needs none."""
    if spec.attention == "mla":
        r, dr, width = spec.mla_latent_rank, spec.mla_rope_dim, padded_head_dim(spec)
        return (f"mla as multi-query attention on its latent (up-projections absorbed): one kv head of "
                f"width {width} holding [rotary key | latent], cached as key and as value: the cache is "
                f"{2 * width / (r + dr):.2f}x the spec's {r}+{dr} per token and layer")
    hd, hdp = spec.head_dim, padded_head_dim(spec)
    if hdp == hd:
        return ""
    return (f"head_dim {hd} padded to {hdp} for GroupQueryAttention: the K/V cache and the Q/K/V/output "
            f"weights are {hdp / hd:.2f}x the spec's")
MATMUL_NBITS_ACCURACY = 4
"""int8 compute for MatMulNBits' activations: the fastest decode here (docs/dependencies.md)."""
RMS_EPS, LN_EPS = 1e-6, 1e-5  # the torch model's (nas.stages.model._norm)


def unsupported_reason(spec: ArchSpec, bitwidth: int | None = None) -> str | None:
    """Why ``spec`` has no deployment graph here (one line), or None when it has one."""
    bits = spec.bitwidth if bitwidth is None else bitwidth
    if bits in (8, 4) and spec.d_model % INT4_BLOCK_SIZE:
        return (f"d_model {spec.d_model} is not a multiple of the {INT4_BLOCK_SIZE}-wide quantization "
                "block of the embedding table")
    return None


# --- block-wise quantization in MatMulNBits' layout ------------------------------------------------


def quantize_blockwise(w: np.ndarray, bits: int, block: int = INT4_BLOCK_SIZE
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round-to-nearest quantization of ``w`` (N, K) in blocks of ``block`` along K,
    as MatMulNBits stores it: packed (N, k_blocks, block * bits / 8) uint8, scales (N, k_blocks)
    float32, zero points (N, ceil(k_blocks * bits / 8)) uint8 (two 4-bit ones per byte, low nibble
    first). K is zero-padded to whole blocks. The block's range is widened to hold 0, so that
    the padding and exact zeros stay exact (as ONNX Runtime's own quantizer does)."""
    n, k = w.shape
    k_blocks = math.ceil(k / block)
    padded = np.zeros((n, k_blocks * block), dtype=np.float32)
    padded[:, :k] = w
    q = padded.reshape(n, k_blocks, block)  # (N, k_blocks, block)
    lo = np.minimum(q.min(-1), 0.0)
    hi = np.maximum(q.max(-1), 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale
    zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)  # (N, k_blocks)
    vals = np.clip(np.round(q / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    if bits == 8:
        return vals, scale, zp
    if bits != 4:
        raise ExportError(f"block-wise quantization takes 4 or 8 bits, got {bits}")
    packed = vals[..., 0::2] | (vals[..., 1::2] << 4)  # (N, k_blocks, block / 2)
    zp_padded = np.zeros((n, 2 * math.ceil(k_blocks / 2)), dtype=np.uint8)
    zp_padded[:, :k_blocks] = zp
    zp_packed = zp_padded[:, 0::2] | (zp_padded[:, 1::2] << 4)  # (N, ceil(k_blocks / 2))
    return packed.astype(np.uint8), scale, zp_packed.astype(np.uint8)


# --- graph building ------------------------------------------------------------------------------


def _np(t: Tensor) -> np.ndarray:
    """A weight as float32 numpy, wherever and at whatever precision the model holds it."""
    return t.detach().to("cpu", torch.float32).numpy()



class _Graph:
    """Nodes and initializers being written. An initializer is added once per name, so the
    applied layers of one shared block all point at the same weights."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.dtype = np.float16 if bits == 16 else np.float32
        self.onnx_dtype = TensorProto.FLOAT16 if bits == 16 else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}

    def init(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def weight(self, name: str, value: Tensor) -> str:
        """A float weight (a norm's gamma, a float matrix) at the graph's compute dtype."""
        return self.init(name, _np(value).astype(self.dtype))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "",
             **attrs: object) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def quantized(self, name: str, w: Tensor) -> tuple[str, str, str]:
        """``w`` (N, K) as MatMulNBits' packed weight, scales and zero points (initializer names)."""
        if f"{name}.qweight" not in self.inits:
            packed, scale, zp = quantize_blockwise(_np(w), self.bits)
            self.init(f"{name}.qweight", packed)
            self.init(f"{name}.scales", scale)
            self.init(f"{name}.zero_points", zp)
        return f"{name}.qweight", f"{name}.scales", f"{name}.zero_points"

    def linear(self, x: str, name: str, w: Tensor, out: str, node_name: str) -> str:
        """y = x @ w.T for ``w`` (N, K): MatMul on a pre-transposed float constant, or MatMulNBits."""
        n, k = w.shape
        if self.bits in (32, 16):
            wt = self.init(f"{name}.weight_t", _np(w).T.astype(self.dtype))
            return self.node("MatMul", [x, wt], [out], node_name)[0]
        packed, scales, zps = self.quantized(name, w)
        return self.node("MatMulNBits", [x, packed, scales, zps], [out], node_name, _MS, K=k, N=n,
                         bits=self.bits, block_size=INT4_BLOCK_SIZE, accuracy_level=MATMUL_NBITS_ACCURACY)[0]


def _rotary_tables(spec: ArchSpec, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max_positions, width / 2) as ``nas.stages.model.Rotary`` computes them
    (float32 angles, then the compute dtype); GroupQueryAttention's non-interleaved rotary is
    the model's rotate-half convention, so half the table is all it needs. The width is the
    padded head (GQA) or MLA's rotary slots (``mla_layout``); GroupQueryAttention rotates as
    many leading slots of a head as the table is wide, twice over."""
    if spec.attention == "mla":
        dim, width = spec.mla_rope_dim, mla_layout(spec)[0]
    else:
        dim, width = spec.head_dim, padded_head_dim(spec)
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(spec.context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    # Padded pairs get angle 0 (cos 1, sin 0): they rotate zeros (or, for MLA, pass through).
    freqs = torch.nn.functional.pad(freqs, (0, (width - dim) // 2))  # (positions, width / 2)
    return freqs.cos().numpy().astype(dtype), freqs.sin().numpy().astype(dtype)


def _mla_weights(attn: torch.nn.Module, spec: ArchSpec) -> tuple[Tensor, Tensor, Tensor]:
    """MLA's projections with its up-projections absorbed, laid out as ``mla_layout`` says:
    the query (h * width, d) giving per head [q_rope | W_uk^T q_content], the down-projection
    (width, d) giving [k_rope | c] before the latent's norm, and the output (d, h * width) taking
    per head W_o W_uv on the latent's slots (zeros elsewhere: the value's rotary slots carry the
    unrotated key, which nothing reads). Computed in float32 from the trained weights."""
    h, hd, r, dr, d = spec.n_heads, spec.head_dim, spec.mla_latent_rank, spec.mla_rope_dim, spec.d_model
    rotary, lead, width = mla_layout(spec)
    rope = torch.cat((torch.arange(dr // 2), torch.arange(rotary // 2, rotary // 2 + dr // 2)))
    latent = torch.arange(lead, lead + r)

    def f32(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32)

    wq = f32(attn.wq.weight).view(h, hd + dr, d)  # per head [content | rope] rows
    up = f32(attn.w_up.weight).view(h, 2 * hd, r)  # per head [K | V] rows
    w_uk, w_uv = up[:, :hd], up[:, hd:]  # (h, hd, r)
    q = torch.zeros(h, width, d)
    q[:, rope] = wq[:, hd:]
    q[:, latent] = w_uk.transpose(1, 2) @ wq[:, :hd]  # (h, r, d): q . (W_uk c) = (W_uk^T q) . c
    w_down = f32(attn.w_down.weight)  # [c | k_rope] rows
    down = torch.zeros(width, d)
    down[rope] = w_down[r:]
    down[latent] = w_down[:r]
    wo = f32(attn.wo.weight).view(d, h, hd)
    o = torch.zeros(d, h, width)
    o[:, :, latent] = torch.einsum("dhk,hkr->dhr", wo, w_uv)  # y_h = W_uv (softmax . c)
    return q.reshape(h * width, d), down, o.reshape(d, h * width)


def _pad_heads(w: Tensor, heads: int, hd: int, hdp: int, rotary: bool) -> Tensor:
    """Rows of ``w`` (heads * hd, K), one block of hd per head, spread to blocks of hdp with zero
    rows. Rotary pairs dimension i with i + width / 2 (rotate-half), so a rotated head keeps its
    halves at [0, hd/2) and [hdp/2, hdp/2 + hd/2); V (and the output's columns) keep [0, hd)."""
    if hdp == hd:
        return w
    blocks = w.reshape(heads, hd, -1)  # (heads, hd, K)
    out = w.new_zeros(heads, hdp, blocks.shape[-1])
    if rotary:
        out[:, : hd // 2] = blocks[:, : hd // 2]
        out[:, hdp // 2 : hdp // 2 + hd // 2] = blocks[:, hd // 2 :]
    else:
        out[:, :hd] = blocks
    return out.reshape(heads * hdp, -1)


def _act(g: _Graph, x: str, activation: str, prefix: str) -> str:
    """The FFN's activation in as few nodes as ONNX Runtime runs it."""
    out = f"{prefix}/act"
    if activation == "silu":
        # x * sigmoid(x); ORT has no Silu op, and QuickGelu(alpha=1) is that product in one node.
        return g.node("QuickGelu", [x], [out], out, _MS, alpha=1.0)[0]
    if activation == "gelu":
        return g.node("Gelu", [x], [out], out)[0]  # opset 20's Gelu, exact (erf) as F.gelu's default
    return g.node("Relu", [x], [out], out)[0]


class _Norms:
    """The residual stream's norms, each fused with the residual add that precedes it."""

    def __init__(self, g: _Graph, spec: ArchSpec) -> None:
        self.g, self.rms = g, spec.norm == "rmsnorm"

    def first(self, x: str, norm: torch.nn.Module, name: str, out: str) -> str:
        g = self.g
        gamma = g.weight(f"{name}.weight", norm.weight)
        if self.rms:
            return g.node("SimplifiedLayerNormalization", [x, gamma], [out], out, axis=-1, epsilon=RMS_EPS,
                          stash_type=1)[0]
        beta = g.weight(f"{name}.bias", norm.bias)
        return g.node("LayerNormalization", [x, gamma, beta], [out], out, axis=-1, epsilon=LN_EPS)[0]

    def skip(self, x: str, residual: str, norm: torch.nn.Module, name: str, out: str) -> tuple[str, str]:
        """norm(x + residual) and x + residual."""
        g = self.g
        gamma = g.weight(f"{name}.weight", norm.weight)
        summed = f"{out}/residual"
        if self.rms:
            g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], [out, "", "", summed], out, _MS,
                   epsilon=RMS_EPS)
        else:
            beta = g.weight(f"{name}.bias", norm.bias)
            g.node("SkipLayerNormalization", [x, residual, gamma, beta], [out, "", "", summed], out, _MS,
                   epsilon=LN_EPS)
        return out, summed


def _graph(model: Decoder, bits: int) -> tuple[onnx.ModelProto, str]:
    """The deployment graph of ``model`` at ``bits``, and its tied-table storage."""
    spec = model.spec
    g = _Graph(bits)
    norms = _Norms(g, spec)

    # --- embedding: x (B, T, d) ---
    table = model.tok_emb.weight  # (V, d)
    tied = spec.tied_embeddings
    if bits in (32, 16):
        if tied:
            # One (d, V) table: the lm_head's pre-transposed weight; the embedding gathers its
            # columns, (d, B, T), and moves d last. One Transpose per call, not per layer.
            wt = g.init("lm_head.weight_t", _np(table).T.astype(g.dtype))
            g.node("Gather", [wt, "input_ids"], ["embed/columns"], "embed/columns", axis=1)
            x = g.node("Transpose", ["embed/columns"], ["embed/x"], "embed/x", perm=[1, 2, 0])[0]
        else:
            x = g.node("Gather", [g.weight("tok_emb.weight", table), "input_ids"], ["embed/x"], "embed/x")[0]
    else:
        if tied:
            # The lm_head's packed (V, k_blocks, blob) weight seen as (V, d * bits / 8): the same
            # bytes, one row per token, blocks along d with the same scales and zero points.
            packed, scales, zps = g.quantized("lm_head", table)
            shape = g.init("embed/table_shape", np.array([spec.vocab_size, -1], dtype=np.int64))
            data = g.node("Reshape", [packed, shape], ["embed/table"], "embed/table")[0]
        else:
            data, scales, zps = g.quantized("tok_emb", table)
            flat = np.ascontiguousarray(numpy_helper.to_array(g.inits[data]).reshape(spec.vocab_size, -1))
            g.inits[data] = numpy_helper.from_array(flat, data)  # (V, d * bits / 8)
        x = g.node("GatherBlockQuantized", [data, "input_ids", scales, zps], ["embed/x"], "embed/x", _MS,
                   bits=bits, block_size=INT4_BLOCK_SIZE, gather_axis=0, quantize_axis=1)[0]

    cos, sin = _rotary_tables(spec, g.dtype)
    g.init("rotary.cos", cos)
    g.init("rotary.sin", sin)

    residual, pending = x, None  # pending: the last sub-layer's output, not yet added to the stream
    for i, block in enumerate(model.applied_blocks()):
        b = f"blocks.{i // spec.share_repeat}"  # the unique block's weights
        p = f"layers.{i}"  # this use's nodes
        if pending is None:
            hn = norms.first(residual, block.attn_norm, f"{b}.attn_norm", f"{p}/attn_norm")
        else:
            hn, residual = norms.skip(pending, residual, block.attn_norm, f"{b}.attn_norm", f"{p}/attn_norm")
        attn = block.attn
        if spec.attention == "mla":
            o = _mla_attention(g, norms, spec, attn, hn, b, p, i)
        else:
            o = _gqa_attention(g, spec, attn, hn, b, p, i)
        hn, residual = norms.skip(o, residual, block.ffn_norm, f"{b}.ffn_norm", f"{p}/ffn_norm")
        ffn = block.ffn
        up = g.linear(hn, f"{b}.ffn.w_up", ffn.w_up.weight, f"{p}/up", f"{p}/up")
        if ffn.w_gate is not None:
            gate = g.linear(hn, f"{b}.ffn.w_gate", ffn.w_gate.weight, f"{p}/gate", f"{p}/gate")
            hidden = g.node("Mul", [_act(g, gate, spec.activation, p), up], [f"{p}/gated"], f"{p}/gated")[0]
        else:
            hidden = _act(g, up, spec.activation, p)
        pending = g.linear(hidden, f"{b}.ffn.w_down", ffn.w_down.weight, f"{p}/ffn_out", f"{p}/ffn_out")
    hn, _ = norms.skip(pending, residual, model.norm, "norm", "final_norm")
    g.linear(hn, "lm_head", model.lm_head.weight, "logits", "lm_head")

    dt = g.onnx_dtype
    cache = _deploy_cache_spec(spec, bits)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", dt, ["batch", "seq", spec.vocab_size])]
    for c in cache:
        inputs.append(helper.make_tensor_value_info(c.name, dt, list(c.shape)))
        present = ["batch", c.shape[1], "total", c.shape[3]]
        outputs.append(helper.make_tensor_value_info(c.output, dt, present))
    graph = helper.make_graph(g.nodes, "deploy", inputs, outputs, list(g.inits.values()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEPLOY_OPSET),
                                                    helper.make_opsetid(_MS, 1)],
                              producer_name="nas.stages.deploy")
    proto.ir_version = 10  # what ONNX Runtime 1.32 reads; onnx 1.23 would write 11
    return proto, ("shared" if tied else "untied")


def _gqa_attention(g: _Graph, spec: ArchSpec, attn: torch.nn.Module, hn: str, b: str, p: str, i: int) -> str:
    """MHA/GQA/MQA: packed QKV, GroupQueryAttention (rotary inside), output projection."""
    h, kv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    hdp = padded_head_dim(spec)  # the width GroupQueryAttention runs (hd unless padded)
    wqkv = torch.cat((_pad_heads(attn.wq.weight, h, hd, hdp, rotary=True),
                      _pad_heads(attn.wk.weight, kv, hd, hdp, rotary=True),
                      _pad_heads(attn.wv.weight, kv, hd, hdp, rotary=False)), dim=0)  # ((h + 2 kv) hdp, d)
    qkv = g.linear(hn, f"{b}.attn.wqkv", wqkv, f"{p}/qkv", f"{p}/qkv")
    g.node("GroupQueryAttention",
           [qkv, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length",
            "rotary.cos", "rotary.sin"],
           [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], f"{p}/gqa", _MS,
           # the scale of the real width: the padding adds zeros to every dot product
           num_heads=h, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(hd))
    wo = _pad_heads(attn.wo.weight.t(), h, hd, hdp, rotary=False).t()  # (d, h hdp): zero columns
    return g.linear(f"{p}/attn", f"{b}.attn.wo", wo, f"{p}/attn_out", f"{p}/attn_out")


def _mla_attention(g: _Graph, norms: _Norms, spec: ArchSpec, attn: torch.nn.Module, hn: str, b: str, p: str,
                   i: int) -> str:
    """MLA as multi-query attention on its latent (``_mla_weights``, ``mla_layout``)."""
    h, hd, r, dr = spec.n_heads, spec.head_dim, spec.mla_latent_rank, spec.mla_rope_dim
    _, lead, width = mla_layout(spec)
    wq, w_down, wo = _mla_weights(attn, spec)
    q = g.linear(hn, f"{b}.attn.wq_absorbed", wq, f"{p}/q", f"{p}/q")
    down = g.linear(hn, f"{b}.attn.w_down", w_down, f"{p}/down", f"{p}/down")
    tail = width - lead - r
    sizes = g.init("mla.split", np.array([lead, r, *([tail] if tail else [])], dtype=np.int64))
    parts = [f"{p}/rope", f"{p}/latent_raw", *([f"{p}/pad"] if tail else [])]
    g.node("Split", [down, sizes], parts, f"{p}/split", axis=-1)
    c = norms.first(parts[1], attn.latent_norm, f"{b}.attn.latent_norm", f"{p}/latent")
    kv = g.node("Concat", [parts[0], c, *parts[2:]], [f"{p}/kv"], f"{p}/kv", axis=-1)[0]
    g.node("GroupQueryAttention",
           [q, kv, kv, f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length",
            "rotary.cos", "rotary.sin"],
           [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], f"{p}/gqa", _MS,
           # the torch model's scale: its query heads are hd + dr wide
           num_heads=h, kv_num_heads=1, do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(hd + dr))
    return g.linear(f"{p}/attn", f"{b}.attn.wo_absorbed", wo, f"{p}/attn_out", f"{p}/attn_out")


def _deploy_cache_spec(spec: ArchSpec, bits: int) -> tuple[CacheInput, ...]:
    """The plain graph's cache inputs (same names, BNSH layout) at the padded head width; for
    MLA one kv head of ``mla_layout``'s width, as key and as value."""
    hdp = padded_head_dim(spec)
    dtype = "float16" if bits == 16 else "float32"
    if spec.attention == "mla":
        return tuple(CacheInput(f"past.{i}.{kind}", f"present.{i}.{kind}", ("batch", 1, "past", hdp), dtype)
                     for i in range(spec.n_layers) for kind in ("key", "value"))
    return tuple(dataclasses.replace(c, shape=(*c.shape[:-1], hdp))
                 for c in _cache_spec(spec, "float16" if bits == 16 else "float32"))


def build_deploy(model: Decoder, out_dir: Path, bitwidth: int | None = None) -> ExportedModel:
    """Write ``model``'s deployment graph at ``bitwidth`` (default: its spec's) to
    ``out_dir/model.onnx`` (+ ``.data``, + ``model.json``). Raises ExportError for a spec it
    cannot express (``unsupported_reason``)."""
    if not isinstance(model, Decoder):
        raise ExportError(f"build_deploy takes a nas.stages.model.Decoder, got {type(model).__name__}")
    spec = model.spec
    bits = spec.bitwidth if bitwidth is None else bitwidth
    if bits not in BITWIDTHS:
        raise ExportError(f"bitwidth must be one of {list(BITWIDTHS)}, got {bits!r}")
    reason = unsupported_reason(spec, bits)
    if reason:
        raise ExportError(f"no deployment graph for {spec.summary()}: {reason}")
    with torch.no_grad():  # weights are read, never moved: the caller's model stays where it is
        proto, tied_storage = _graph(model, bits)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    _remove_model_files(path)
    _save(proto, path)
    quantized = ("MatMul", "Gather") if bits != 32 else ()
    cache = _deploy_cache_spec(spec, bits)
    exported = _describe(
        path, spec=spec, bitwidth=bits, opset=DEPLOY_OPSET,
        input_names=("input_ids", "seqlens_k", "total_sequence_length", *(c.name for c in cache)),
        output_names=("logits", *(c.output for c in cache)), cache_spec=cache,
        logits_dtype="float16" if bits == 16 else "float32", quantized_ops=quantized,
        embedding_quantized=bits != 32, lm_head_quantized=bits != 32, made_by="built", graph="gqa",
        max_positions=spec.context_length, tied_storage=tied_storage, graph_note=padding_note(spec),
    )
    _check_io(exported)
    return exported
