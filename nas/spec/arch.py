"""ArchSpec: one decoder-only architecture, as plain data.

It is the one value passed between search space, model builder, exporter, measurer, store and
export, so it imports nothing heavy (no torch, no ONNX Runtime, no database). Its analytic
figures (parameters, FLOPs, weight bytes, KV-cache bytes) are methods; the model builder's
``sum(p.numel())`` is checked against :meth:`ArchSpec.params` in the tests.

Attention kinds, by how many K/V heads serve the query heads::

    mha  q q q q      gqa  q q q q      mqa  q q q q      mla  q q q q
         | | | |           \\|  \\|            \\ \\|/            (K, V rebuilt per head
         k k k k            k   k             k             from one cached latent c)

Layer sharing "block_repeat" is MobileLLM's immediate block-wise repeat: ``n_layers`` counts the
blocks a token passes through; each of the ``n_layers // share_repeat`` unique blocks is applied
``share_repeat`` times in a row (A A B B ...). Parameters scale with the unique blocks; FLOPs,
latency and the KV cache with ``n_layers``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from nas.spec.errors import SpecError

Attention = Literal["mha", "gqa", "mqa", "mla"]
FFNKind = Literal["gated", "plain"]
Activation = Literal["silu", "gelu", "relu"]
Norm = Literal["rmsnorm", "layernorm"]
Sharing = Literal["none", "block_repeat"]
Bitwidth = Literal[32, 16, 8, 4]
BITWIDTHS: tuple[int, ...] = get_args(Bitwidth)

# int4 is weight-only with one fp32 scale and a 4-bit zero point per block of this many weights
# (ONNX Runtime's MatMulNBits layout); the exporter uses the same block so the bytes match the file.
INT4_BLOCK_SIZE = 32

@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    # --- vocabulary and width -------------------------------------------------------------
    vocab_size: int
    """Tokenizer vocabulary size (a BPE is trained per size); also the embedding rows."""
    d_model: int
    """Residual stream width."""
    # --- depth and sharing -----------------------------------------------------------------
    n_layers: int
    """Blocks a token passes through, repeats included."""
    layer_sharing: Sharing = "none"
    share_repeat: int = 1
    """With "block_repeat": times each unique block is applied in a row (>= 2)."""
    # --- attention ---------------------------------------------------------------------------
    attention: Attention = "mha"
    n_heads: int
    n_kv_heads: int = 0
    """K/V heads. Derived for mha (= n_heads), mqa (= 1) and mla (= n_heads) when left at 0;
    for gqa it must divide n_heads and lie strictly between 1 and n_heads."""
    head_dim: int
    """Per-head width of queries, keys and values (need not equal d_model // n_heads)."""
    mla_latent_rank: int = 0
    """MLA only: width of the cached latent c from which every head's K and V are rebuilt."""
    mla_rope_dim: int = 0
    """MLA only: width of the decoupled rotary key shared by all heads (cached beside c)."""
    rope_theta: float = 10000.0
    context_length: int = 256
    """Longest sequence the model is trained and measured at."""
    # --- feed-forward and norms ----------------------------------------------------------------
    ffn: FFNKind = "gated"
    """gated: down(act(gate(x)) * up(x)) as in SwiGLU; plain: down(act(up(x)))."""
    ffn_ratio: float = 4.0
    """Hidden width over d_model; the hidden width is rounded to a multiple of 8."""
    activation: Activation = "silu"
    norm: Norm = "rmsnorm"
    # --- weights ---------------------------------------------------------------------------------
    tied_embeddings: bool = False
    """The output projection reuses the input embedding table."""
    bitwidth: Bitwidth = 32
    """Deployed weight precision: 32 (fp32), 16 (fp16), 8 (int8 dynamic), 4 (int4 weight-only)."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.attention == "mqa" and self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", 1)
        elif self.attention in ("mha", "mla") and self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_values(self)

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def unique_layers(self) -> int:
        return self.n_layers // self.share_repeat

    @property
    def ffn_hidden(self) -> int:
        return max(8, 8 * round(self.ffn_ratio * self.d_model / 8))

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def qk_head_dim(self) -> int:
        """Width of a query/key dot product per head (MLA adds its rotary part)."""
        return self.head_dim + (self.mla_rope_dim if self.attention == "mla" else 0)

    # --- parameters ------------------------------------------------------------------------------
    def _norm_params(self, dim: int) -> int:
        return dim if self.norm == "rmsnorm" else 2 * dim  # LayerNorm has a bias

    def attention_params(self) -> int:
        d, h, hd = self.d_model, self.n_heads, self.head_dim
        if self.attention == "mla":
            r, dr = self.mla_latent_rank, self.mla_rope_dim
            return (
                d * h * (hd + dr)  # q: content + rotary part per head
                + d * (r + dr)  # down-projection to latent c and the shared rotary key
                + self._norm_params(r)  # norm on the latent (as in DeepSeek-V2)
                + r * h * 2 * hd  # up-projection of c to every head's K and V
                + h * hd * d  # output
            )
        return d * h * hd + 2 * d * self.n_kv_heads * hd + h * hd * d

    def ffn_params(self) -> int:
        return (3 if self.ffn == "gated" else 2) * self.d_model * self.ffn_hidden

    def block_params(self) -> int:
        return 2 * self._norm_params(self.d_model) + self.attention_params() + self.ffn_params()

    def embedding_params(self) -> int:
        """Input table plus, when untied, the output projection."""
        return self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)

    def non_embedding_params(self) -> int:
        return self.unique_layers * self.block_params() + self._norm_params(self.d_model)

    def params(self) -> int:
        """Unique trainable parameters (tied tables and shared blocks counted once)."""
        return self.embedding_params() + self.non_embedding_params()

    # --- FLOPs (one multiply-add = 2 FLOPs; norms, activations, softmax ignored) --------------
    def _linear_macs_per_token(self) -> int:
        """Weight multiply-adds per token, every applied block counted (shared or not)."""
        norm_w = self._norm_params(self.d_model)
        per_block = self.block_params() - 2 * norm_w
        if self.attention == "mla":
            per_block -= self._norm_params(self.mla_latent_rank)
        return self.n_layers * per_block + self.vocab_size * self.d_model  # + lm_head

    def _attention_macs(self, n_keys: int) -> int:
        """Score and weighted-sum multiply-adds of one query over n_keys cached positions."""
        return self.n_layers * self.n_heads * (self.qk_head_dim + self.head_dim) * n_keys

    def prefill_flops(self, prompt_len: int) -> int:
        """Forward FLOPs of a causal pass over a prompt of prompt_len tokens."""
        keys = prompt_len * (prompt_len + 1) // 2  # query t sees t+1 keys
        return 2 * (prompt_len * self._linear_macs_per_token() + self._attention_macs(1) * keys)

    def decode_flops(self, past_len: int) -> int:
        """FLOPs to produce one token with past_len positions already in the cache.

        Our MLA rebuilds K and V from the cached latent on every step (no weight absorption),
        so its decode pays the up-projection for every cached position.
        """
        n_keys = past_len + 1
        flops = 2 * (self._linear_macs_per_token() + self._attention_macs(n_keys))
        if self.attention == "mla":
            up = self.mla_latent_rank * self.n_heads * 2 * self.head_dim
            flops += 2 * self.n_layers * up * past_len
        return flops

    def train_flops_per_token(self) -> int:
        """Forward + backward FLOPs per trained token at full context (the 6N rule, plus attention)."""
        return 3 * self.prefill_flops(self.context_length) // self.context_length

    # --- bytes -----------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the unique weights at the spec's bitwidth.

        Matrices (embeddings included) take the bitwidth; int4 adds one fp32 scale and one 4-bit
        zero point per block of INT4_BLOCK_SIZE weights (asymmetric, as ORT's MatMulNBits
        stores them); norm vectors stay fp32. What a deployed ONNX file holds can
        differ (a tied table may be stored twice): the measured file size says so.
        """
        vectors = (2 * self.unique_layers + 1) * self._norm_params(self.d_model)
        if self.attention == "mla":
            vectors += self.unique_layers * self._norm_params(self.mla_latent_rank)
        matrices = self.params() - vectors
        if self.bitwidth == 4:
            matrix_bytes = matrices / 2 + 4.5 * math.ceil(matrices / INT4_BLOCK_SIZE)
        else:
            matrix_bytes = matrices * self.bitwidth / 8
        return math.ceil(matrix_bytes) + 4 * vectors

    def decode_bytes(self, past_len: int) -> int:
        """Bytes one decode step must read: every weight it multiplies by (all of them but the
        input embedding, of which it gathers one row) plus the KV cache of past_len tokens."""
        untied_input_table = 0 if self.tied_embeddings else self.vocab_size * self.d_model
        table_bytes = math.ceil(untied_input_table * self.weight_bytes() / max(1, self.params()))
        return self.weight_bytes() - table_bytes + past_len * self.kv_cache_bytes_per_token()

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation (and KV-cache) element: fp16 models compute in fp16, the
        others in fp32 (int8 and int4 are weight quantizations)."""
        return 2 if self.bitwidth == 16 else 4

    def kv_cache_bytes_per_token(self) -> int:
        """Cache bytes added per generated token: K and V per applied layer, or for MLA the
        latent plus the shared rotary key."""
        if self.attention == "mla":
            per_layer = self.mla_latent_rank + self.mla_rope_dim
        else:
            per_layer = 2 * self.n_kv_heads * self.head_dim
        return self.n_layers * per_layer * self.activation_bytes

    # --- identity and serialization ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """Sorted keys, no spaces: equal specs give equal strings, hence equal ids."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def arch_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        if not isinstance(data, dict):
            raise SpecError(f"an ArchSpec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown ArchSpec field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in data)
        if missing:
            raise SpecError(f"ArchSpec field {missing[0]!r} is required")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """One short line, e.g. ``gqa 8L d384 6h/2kv×64 gated-silu×2.7 rms V4096 tied int8``."""
        if self.attention == "mla":
            heads = f"{self.n_heads}h×{self.head_dim} r{self.mla_latent_rank}+{self.mla_rope_dim}"
        elif self.attention == "gqa":
            heads = f"{self.n_heads}h/{self.n_kv_heads}kv×{self.head_dim}"
        else:
            heads = f"{self.n_heads}h×{self.head_dim}"
        depth = f"{self.n_layers}L"
        if self.layer_sharing == "block_repeat":
            depth += f"({self.unique_layers}×{self.share_repeat})"
        norm = "rms" if self.norm == "rmsnorm" else "ln"
        bits = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}[self.bitwidth]
        tied = " tied" if self.tied_embeddings else ""
        return (
            f"{self.attention} {depth} d{self.d_model} {heads} "
            f"{self.ffn}-{self.activation}×{self.ffn_ratio:g} {norm} V{self.vocab_size}{tied} {bits}"
        )


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# --- field metadata -------------------------------------------------------------------------
# Read from the dataclass's annotations, so that a new field needs no second list: validation,
# the search-space loader and the web page's columns all iterate these.
_HINTS = get_type_hints(ArchSpec)
LITERAL_FIELDS: dict[str, tuple[Any, ...]] = {n: get_args(t) for n, t in _HINTS.items() if get_origin(t) is Literal}
"""Fields whose allowed values are a fixed set, with those values."""
INT_FIELDS: tuple[str, ...] = tuple(
    n for n, t in _HINTS.items() if t is int or all(type(a) is int for a in LITERAL_FIELDS.get(n, (None,)))
)
FLOAT_FIELDS: tuple[str, ...] = tuple(n for n, t in _HINTS.items() if t is float)
BOOL_FIELDS: tuple[str, ...] = tuple(n for n, t in _HINTS.items() if t is bool)


def _check_types(spec: ArchSpec) -> None:
    for name in INT_FIELDS:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{name} must be an integer, got {value!r}")
    for name in FLOAT_FIELDS:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(spec, name, float(value))  # 4 and 4.0 must hash alike
    for name in BOOL_FIELDS:
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{name} must be true or false, got {getattr(spec, name)!r}")
    for name, allowed in LITERAL_FIELDS.items():
        if getattr(spec, name) not in allowed:
            raise SpecError(f"{name} must be one of {list(allowed)}, got {getattr(spec, name)!r}")


def _check_values(s: ArchSpec) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "context_length"):
        if getattr(s, name) < 1:
            raise SpecError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.vocab_size < 256 + 1:
        raise SpecError(f"vocab_size must be > 256 (byte-level BPE needs the 256 bytes), got {s.vocab_size}")
    if s.ffn_ratio <= 0:
        raise SpecError(f"ffn_ratio must be > 0, got {s.ffn_ratio}")
    if s.rope_theta <= 0:
        raise SpecError(f"rope_theta must be > 0, got {s.rope_theta}")

    if s.attention == "mla":
        if s.mla_latent_rank < 1:
            raise SpecError(f"mla_latent_rank must be >= 1 for mla, got {s.mla_latent_rank}")
        if s.mla_rope_dim < 2 or s.mla_rope_dim % 2:
            raise SpecError(f"mla_rope_dim must be even and >= 2 for mla, got {s.mla_rope_dim}")
    else:
        if s.head_dim % 2:
            raise SpecError(f"head_dim must be even (rotary embedding), got {s.head_dim}")
        for name in ("mla_latent_rank", "mla_rope_dim"):
            if getattr(s, name) != 0:
                raise SpecError(f"{name} applies to attention 'mla' only; got {getattr(s, name)} with {s.attention!r}")

    kv, h = s.n_kv_heads, s.n_heads
    expected = {"mha": h, "mqa": 1, "mla": h}.get(s.attention)
    if expected is not None and kv != expected:
        raise SpecError(f"n_kv_heads must be {expected} for {s.attention} (n_heads={h}), got {kv}")
    if s.attention == "gqa" and not (1 < kv < h and h % kv == 0):
        raise SpecError(
            f"n_kv_heads must divide n_heads and lie strictly between 1 and n_heads for gqa "
            f"(1 is mqa, n_heads is mha); got n_kv_heads={kv}, n_heads={h}"
        )

    if s.layer_sharing == "none" and s.share_repeat != 1:
        raise SpecError(f"share_repeat must be 1 when layer_sharing is 'none', got {s.share_repeat}")
    if s.layer_sharing == "block_repeat":
        if s.share_repeat < 2:
            raise SpecError(f"share_repeat must be >= 2 for block_repeat, got {s.share_repeat}")
        if s.n_layers % s.share_repeat:
            raise SpecError(
                f"n_layers ({s.n_layers}) must be a multiple of share_repeat ({s.share_repeat}) for block_repeat"
            )
