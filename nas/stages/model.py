"""The decoder-only model, built from an ArchSpec and nothing else.

One implementation for every point of the search space: attention kind (MHA/GQA/MQA/MLA), FFN
kind, activation, norm, tied embeddings and block-wise layer sharing are all read from the spec,
never from a name. Two forwards share the same blocks:

- ``forward(idx)``: training and scoring, causal attention over the whole window.
- ``forward_cached(idx, cache)``: inference with a KV cache. Prefill is this call with an empty
  cache; decode is this call with one token. It is the graph the exporter hands to ONNX Runtime,
  so it takes and returns plain tensors.

Cache layout, one ``(a, b)`` pair per *applied* layer (a repeated block keeps one pair per use,
since each use sees different inputs)::

    mha/gqa/mqa:  a = K  (B, n_kv_heads, P, head_dim)     b = V  (B, n_kv_heads, P, head_dim)
    mla:          a = c  (B, P, mla_latent_rank)          b = k_rope (B, P, mla_rope_dim)

MLA caches only the normalized latent and the shared rotary key, and rebuilds every head's K and
V from them on each call (no weight absorption), as ``ArchSpec.decode_flops`` counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.spec.arch import ArchSpec

Cache = list[tuple[Tensor, Tensor]]

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm``'s parameters and defaults, computed as HF's ``LlamaRMSNorm`` does: in float32
    from plain ops, then cast back. On CPU (torch 2.13) this trains faster than ``nn.RMSNorm``'s
    own kernel, whose backward cost our brief training 3% against HF Llama (bench/README.md);
    the exported graph is the same decomposition at our opset."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _norm(spec: ArchSpec, dim: int) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, eps=1e-5)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention (as HF Llama), angles computed from
    positions on the fly so that any past length works without a precomputed table."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        # x: (..., T, dim); positions: (T,)
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]  # (T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """MHA, GQA and MQA: K/V heads shared by groups of query heads."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.h, self.kv, self.hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.wq = nn.Linear(spec.d_model, self.h * self.hd, bias=False)
        self.wk = nn.Linear(spec.d_model, self.kv * self.hd, bias=False)
        self.wv = nn.Linear(spec.d_model, self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, spec.d_model, bias=False)
        self.rotary = Rotary(self.hd, spec.rope_theta)

    def forward(
        self, x: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor] | None, mask: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd).transpose(1, 2)  # (B, h, T, hd)
        k = self.wk(x).view(B, T, self.kv, self.hd).transpose(1, 2)  # (B, kv, T, hd)
        v = self.wv(x).view(B, T, self.kv, self.hd).transpose(1, 2)  # (B, kv, T, hd)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k = torch.cat((cache[0], k), dim=2)  # (B, kv, P+T, hd)
            v = torch.cat((cache[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv != self.h
        )  # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.h * self.hd)
        return self.wo(y), (k, v) if cache is not None else None


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): K and V are rebuilt per head from a low-rank
    latent c; position enters through a small rotary key shared by all heads."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.h, self.hd = spec.n_heads, spec.head_dim
        self.r, self.dr = spec.mla_latent_rank, spec.mla_rope_dim
        self.wq = nn.Linear(spec.d_model, self.h * (self.hd + self.dr), bias=False)
        self.w_down = nn.Linear(spec.d_model, self.r + self.dr, bias=False)  # -> [c | k_rope]
        self.latent_norm = _norm(spec, self.r)
        self.w_up = nn.Linear(self.r, self.h * 2 * self.hd, bias=False)  # c -> [K | V] per head
        self.wo = nn.Linear(self.h * self.hd, spec.d_model, bias=False)
        self.rotary = Rotary(self.dr, spec.rope_theta)

    def forward(
        self, x: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor] | None, mask: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd + self.dr).transpose(1, 2)  # (B, h, T, hd+dr)
        q_content, q_rope = q.split((self.hd, self.dr), dim=-1)
        q = torch.cat((q_content, self.rotary(q_rope, positions)), dim=-1)
        c, k_rope = self.w_down(x).split((self.r, self.dr), dim=-1)  # (B, T, r), (B, T, dr)
        c, k_rope = self.latent_norm(c), self.rotary(k_rope, positions)
        if cache is not None:
            c = torch.cat((cache[0], c), dim=1)  # (B, P+T, r)
            k_rope = torch.cat((cache[1], k_rope), dim=1)  # (B, P+T, dr)
        S = c.shape[1]
        kv = self.w_up(c).view(B, S, self.h, 2 * self.hd).transpose(1, 2)  # (B, h, S, 2hd)
        k_content, v = kv.split((self.hd, self.hd), dim=-1)
        k = torch.cat((k_content, k_rope[:, None].expand(B, self.h, S, self.dr)), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, self.h * self.hd)
        return self.wo(y), (c, k_rope) if cache is not None else None


class FeedForward(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[spec.activation]
        self.gated = spec.ffn == "gated"
        self.w_up = nn.Linear(spec.d_model, spec.ffn_hidden, bias=False)
        self.w_gate = nn.Linear(spec.d_model, spec.ffn_hidden, bias=False) if self.gated else None
        self.w_down = nn.Linear(spec.ffn_hidden, spec.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w_gate is not None:
            return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))
        return self.w_down(self.act(self.w_up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.attn_norm = _norm(spec, spec.d_model)
        self.attn = LatentAttention(spec) if spec.attention == "mla" else Attention(spec)
        self.ffn_norm = _norm(spec, spec.d_model)
        self.ffn = FeedForward(spec)

    def forward(
        self, x: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor] | None, mask: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        a, new_cache = self.attn(self.attn_norm(x), positions, cache, mask)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), new_cache


class Decoder(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.unique_layers))
        self.norm = _norm(spec, spec.d_model)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02), with the projections that write into the residual stream
        # scaled by 1/sqrt(2 * depth) so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights keep 1, biases 0
            std = 0.02
            if name.endswith(("wo.weight", "w_down.weight")):
                std /= math.sqrt(2 * self.spec.n_layers)
            nn.init.normal_(p, mean=0.0, std=std)

    def applied_blocks(self) -> list[Block]:
        """The block run at each depth: with block_repeat each unique block appears share_repeat
        times in a row (A A B B), as in MobileLLM."""
        return [self.blocks[i // self.spec.share_repeat] for i in range(self.spec.n_layers)]

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, vocab) logits, causal over the window."""
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx)  # (B, T, d)
        for block in self.applied_blocks():
            x, _ = block(x, positions, None, None)
        return self.lm_head(self.norm(x))

    def forward_cached(self, idx: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """(B, T) new token ids and the cache of the P tokens before them -> logits of the new
        tokens (B, T, vocab) and the cache of all P+T tokens."""
        T = idx.shape[1]
        past = cache[0][0].shape[-2] if self.spec.attention != "mla" else cache[0][0].shape[1]
        positions = torch.arange(T, device=idx.device) + past
        mask = positions[:, None] >= torch.arange(past + T, device=idx.device)[None, :]  # (T, P+T)
        x = self.tok_emb(idx)
        new_cache: Cache = []
        for block, layer_cache in zip(self.applied_blocks(), cache, strict=True):
            x, c = block(x, positions, layer_cache, mask)
            new_cache.append(c)
        return self.lm_head(self.norm(x)), new_cache

    def empty_cache(self, batch: int = 1, device: torch.device | str = "cpu") -> Cache:
        """A cache holding no tokens (P = 0), the input of a prefill."""
        s = self.spec
        dtype = self.tok_emb.weight.dtype
        if s.attention == "mla":
            shapes = ((batch, 0, s.mla_latent_rank), (batch, 0, s.mla_rope_dim))
        else:
            shapes = ((batch, s.n_kv_heads, 0, s.head_dim),) * 2
        return [tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
                for _ in range(s.n_layers)]


def build_model(spec: ArchSpec, seed: int = 0) -> Decoder:
    """A freshly initialized model; the same (spec, seed) gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Decoder(spec)
