"""A latency model per device: bytes over an effective bandwidth, FLOPs over an effective rate,
and a cost per kernel, with the device's parameters fitted to points measured on it.

Plain arithmetic on ArchSpec figures (no torch, no ONNX Runtime, no numpy), so that profiles,
the store and the web page can load and show it. One step of the model, for a spec at a
bitwidth on a device::

    decode_ms  = (weight bytes read per token + KV-cache bytes at the context) / B[dtype]
               + decode FLOPs / R[dtype] + kernels per step x k
    prefill_ms = (weight bytes + KV bytes written) / B[dtype] + prompt FLOPs / R[dtype]
               + kernels per step x k
    peak memory = weight bytes held + KV cache at the workload's longest context + runtime base

- ``B[dtype]`` is an *effective* memory bandwidth, ``R[dtype]`` an effective arithmetic rate
  and ``k`` the cost of one kernel of the device's execution provider (launch, dispatch and the
  small element-wise work around it). They are fitted per device by non-negative least squares
  on the relative error of the points of its profile (``calibration:``), with a weak pull
  towards the profile's datasheet figures so that a parameter the points cannot see (the rate,
  when no point publishes a prefill figure) keeps its datasheet value instead of drifting.
- With fewer than ``MIN_POINTS`` points nothing is fitted: the model is the datasheet (peak
  bandwidth, peak rate) plus the profile's prior kernel cost, and says so. Datasheet peaks are
  optimistic: real kernels reach a fraction of them.
- An attention term that grows with the context beyond its KV bytes is not modelled: the
  public points are taken at short contexts (tens to hundreds of tokens) and cannot fit one.
  KV-cache bytes enter through the bandwidth term, which is what makes decode slow with context
  in proportion to KV bytes per token (docs/dependencies.md, "Devices").

Every figure of a step is the fused deployment graph's (``nas.stages.deploy``), which is what a
device runs: :func:`fused_kernels_per_step` counts its kernels, and its bytes and FLOPs are
those of the heads it really runs (``deployed_attention``): a head width padded to
GroupQueryAttention's multiple of 16, and MLA as multi-query attention on its latent with its
up-projections absorbed (no per-step rebuild of K and V, a cache of ``[rotary key | latent]``
held as key and as value). For the Llama-like models of the public calibration points these are
the architecture's own figures (``ArchSpec.decode_flops``, ``kv_cache_bytes_per_token``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nas.spec.arch import ArchSpec

MIN_POINTS = 3
"""Fewest points of a device worth fitting; below it the model is the datasheet."""

PRICING = 2
"""What a step's figures are the figures of; part of a model's digest, so that an estimate stored
under another rule is not reused: 1, the architecture's (``ArchSpec``) bytes and FLOPs; 2, the
fused deployment graph's heads (padded GQA, absorbed MLA: ``deployed_attention``)."""

PRIOR_WEIGHT = 0.02
"""How hard the fit is pulled towards the datasheet: a parameter twice its prior costs as much
as a 2% miss on one point, so a few points override the prior, and a parameter no point sees
(the rate, without prefill points) stays at it. Much weaker (0.001) let the Jetson fit use decode
FLOPs, which grow with bytes, as a second bandwidth knob (rate at 18% of peak from decode alone)."""

DTYPE_OF_BITS: dict[int, str] = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}
Phase = Literal["decode", "prefill"]


# --- what a step does, from the spec -------------------------------------------------------------
GQA_MULTIPLE = 16
"""ONNX Runtime's GroupQueryAttention on the CPU (1.32) takes a head width, and rotates a width,
in multiples of 16 only."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def mla_layout(spec: ArchSpec) -> tuple[int, int, int]:
    """Where the deployment graph's MLA puts what in its one kv head: ``(rotary, lead, width)``.
    GroupQueryAttention rotates the first ``rotary`` slots (mla_rope_dim rounded up to 16) in
    rotate-half pairs (i, i + rotary / 2), so the rotary key's halves sit at [0, dr/2) and
    [rotary/2, rotary/2 + dr/2), with angle 0 on the pairs between; the latent follows at
    [lead, lead + r), lead = rotary/2 + dr/2; the rest up to ``width`` (a multiple of 16) is
    zeros, as are the slots between the rotary halves (none when dr is a multiple of 16)."""
    dr, r = spec.mla_rope_dim, spec.mla_latent_rank
    rotary = _round_up(dr, GQA_MULTIPLE)
    lead = rotary // 2 + dr // 2
    return rotary, lead, _round_up(lead + r, GQA_MULTIPLE)


def deployed_attention(spec: ArchSpec) -> tuple[int, int]:
    """``(kv heads, head width)`` of the fused graph's GroupQueryAttention: the spec's, with the
    width padded to a multiple of 16; for MLA one kv head as wide as ``mla_layout`` says."""
    if spec.attention == "mla":
        return 1, mla_layout(spec)[2]
    return spec.n_kv_heads, _round_up(spec.head_dim, GQA_MULTIPLE)


def _deployed_attention_weights(spec: ArchSpec) -> int:
    """Matrix elements of one layer's attention in the fused graph, the padding's zero rows
    included (the kernels multiply them): Q/K/V and output at the deployed head width; for MLA
    its absorbed query, its down-projection and its absorbed output."""
    d, h = spec.d_model, spec.n_heads
    kv, width = deployed_attention(spec)
    if spec.attention == "mla":
        return d * h * width + d * width + h * width * d
    return d * (h + 2 * kv) * width + h * width * d


def deployed_params(spec: ArchSpec) -> int:
    """Parameters the fused graph stores: the spec's, with each unique layer's attention
    matrices as ``_deployed_attention_weights`` counts them (the same for an unpadded GQA)."""
    spec_matrices = spec.attention_params()
    if spec.attention == "mla":  # the latent's norm is a vector, kept as it is
        r = spec.mla_latent_rank
        spec_matrices -= r if spec.norm == "rmsnorm" else 2 * r
    return spec.params() + spec.unique_layers * (_deployed_attention_weights(spec) - spec_matrices)


def deployed_weight_bytes(spec: ArchSpec) -> float:
    """Bytes of the weights the fused graph stores at the spec's bitwidth: ``ArchSpec.weight_bytes``
    (its per-bitwidth storage rule, int4's scales included) over ``deployed_params``."""
    return spec.weight_bytes() * deployed_params(spec) / spec.params()


def deployed_linear_macs_per_token(spec: ArchSpec) -> int:
    """Weight multiply-adds per token of the fused graph, every applied layer counted."""
    per_layer = _deployed_attention_weights(spec) + spec.ffn_params()
    return spec.n_layers * per_layer + spec.vocab_size * spec.d_model  # + lm_head


def deployed_flops(spec: ArchSpec, tokens: int, past_tokens: int) -> int:
    """FLOPs of one call of the fused graph on ``tokens`` new positions after ``past_tokens``
    cached ones: the linear layers, and per head a score and a weighted sum over the deployed
    width for every key a query sees."""
    keys = tokens * past_tokens + tokens * (tokens + 1) // 2
    _, width = deployed_attention(spec)
    attention = spec.n_layers * spec.n_heads * 2 * width * keys
    return 2 * (tokens * deployed_linear_macs_per_token(spec) + attention)


def fused_kernels_per_step(spec: ArchSpec) -> int:
    """Kernels one forward step (a decode step, or a whole prompt's prefill) launches in a fused
    deployment graph, counted as the ONNX Runtime contrib ops that onnxruntime-genai's model
    builder emits for a Llama-family decoder.

    Per applied layer (a shared block counts each time it runs):

    - 1 norm before attention (SimplifiedLayerNormalization, or the Skip- variant fusing the
      residual add), 1 packed QKV MatMulNBits, 1 GroupQueryAttention (rotary inside), 1 output
      projection, 1 SkipSimplifiedLayerNormalization before the FFN: 5;
    - FFN, gated: gate and up MatMuls, the activation, the multiply, the down MatMul; plain: up,
      activation, down. The activation is 2 ops for SiLU (Sigmoid and Mul), 1 for GELU or ReLU:
      gated SiLU 6, gated GELU 5, plain SiLU 4, plain GELU 3;
    - MLA adds 4: its down-projection to [rotary key | latent], a Split, the latent's norm and a
      Concat (its query replaces the packed QKV; its up-projections are absorbed).

    Per graph: the embedding (GatherBlockQuantized), the final norm, the lm_head, and 3 small ops
    preparing the sequence lengths and attention mask: 6.

    A gated-SiLU GQA model of 8 layers counts 8 x 11 + 6 = 94, near the ~99 nodes per step the
    builder emitted for the 30M model of docs/dependencies.md; ``nas.stages.deploy`` builds 83
    for it (it needs no mask ops and runs SiLU as one QuickGelu): within the per-graph constant.
    This is a count of the graph a deployment runs, not of our plain export (~460 nodes).
    """
    act = 2 if spec.activation == "silu" else 1
    ffn = (3 + act + 1) if spec.ffn == "gated" else (2 + act)
    per_layer = 5 + ffn + (4 if spec.attention == "mla" else 0)
    return spec.n_layers * per_layer + 6


def default_bits_per_weight(spec: ArchSpec) -> float:
    """Average stored bits per parameter of our own export at the spec's bitwidth (int4's
    block scales and zero points included; see ``ArchSpec.weight_bytes``)."""
    return spec.weight_bytes() * 8 / spec.params()


def weight_bytes_read(spec: ArchSpec, bits_per_weight: float) -> float:
    """Weight bytes one step reads: every parameter the fused graph stores (``deployed_params``)
    but an untied input embedding, of which a step gathers only its tokens' rows (a tied table
    is read whole, as the lm_head)."""
    untied_input = 0 if spec.tied_embeddings else spec.vocab_size * spec.d_model
    return (deployed_params(spec) - untied_input) * bits_per_weight / 8


def kv_elements_per_token(spec: ArchSpec) -> int:
    """KV-cache elements one position adds in the fused graph: K and V of every kv head per
    applied layer at the deployed width (for MLA, its one ``[rotary key | latent]`` head twice)."""
    kv, width = deployed_attention(spec)
    return spec.n_layers * 2 * kv * width


@dataclass(frozen=True)
class Step:
    """What one step of a spec costs in the model's three currencies, before a device prices them."""

    phase: Phase
    dtype: str
    bytes: float
    flops: float
    kernels: int


def decode_step(spec: ArchSpec, past_tokens: int, *, bits_per_weight: float | None = None,
                kv_bytes_per_element: float | None = None) -> Step:
    """One decode step with ``past_tokens`` positions in the KV cache."""
    bpw = default_bits_per_weight(spec) if bits_per_weight is None else bits_per_weight
    kvb = spec.activation_bytes if kv_bytes_per_element is None else kv_bytes_per_element
    kv = kv_elements_per_token(spec) * kvb * (past_tokens + 1)  # read the past, write the new one
    return Step("decode", DTYPE_OF_BITS[spec.bitwidth], weight_bytes_read(spec, bpw) + kv,
                float(deployed_flops(spec, 1, past_tokens)), fused_kernels_per_step(spec))


def prefill_step(spec: ArchSpec, prompt_tokens: int, *, bits_per_weight: float | None = None,
                 kv_bytes_per_element: float | None = None) -> Step:
    """One prefill of a ``prompt_tokens`` prompt: the weights read once, the cache written once."""
    bpw = default_bits_per_weight(spec) if bits_per_weight is None else bits_per_weight
    kvb = spec.activation_bytes if kv_bytes_per_element is None else kv_bytes_per_element
    kv = kv_elements_per_token(spec) * kvb * prompt_tokens
    return Step("prefill", DTYPE_OF_BITS[spec.bitwidth], weight_bytes_read(spec, bpw) + kv,
                float(deployed_flops(spec, prompt_tokens, 0)), fused_kernels_per_step(spec))


# --- the device's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePrior:
    """What the datasheet and the execution provider say before any point is fitted."""

    bandwidth_gbs: float
    """Peak DRAM bandwidth (decimal GB/s)."""
    peak_gflops: Mapping[str, float]
    """Dense peak rate per dtype (fp32, fp16, int8, int4)."""
    kernel_us: float
    """Cost of one kernel of the execution provider, microseconds (the profile's prior)."""
    base_memory_mb: float
    """Resident memory of the runtime before any weight, MiB."""
    source: str = "datasheet"


@dataclass(frozen=True)
class Observation:
    """One measured step: its cost figures and the milliseconds it took on the device."""

    step: Step
    ms: float
    point: int = 0
    """Which calibration point it came from (a point may give a decode and a prefill figure)."""


@dataclass(frozen=True)
class LatencyModel:
    """A device's fitted (or datasheet) parameters and the figures it gives for a spec."""

    bandwidth_gbs: Mapping[str, float]
    """Effective bandwidth per dtype; ``"*"`` is used for a dtype with no entry of its own."""
    compute_efficiency: float
    """Fraction of the datasheet peak rate (of each dtype) that steps reach."""
    kernel_us: float
    base_memory_mb: float
    peak_gflops: Mapping[str, float]
    method: str
    """``fitted`` or ``datasheet``."""
    parameter_sources: Mapping[str, str] = field(default_factory=dict)
    """Per parameter: fitted from how many points, or the datasheet / profile prior it kept."""
    n_points: int = 0
    fit_error: Mapping[str, float] = field(default_factory=dict)
    """In-sample mean absolute percentage error per phase (on the points it was fitted to)."""

    def bandwidth_for(self, dtype: str) -> float:
        return self.bandwidth_gbs.get(dtype, self.bandwidth_gbs["*"])

    def step_ms(self, step: Step) -> float:
        """Milliseconds of one step on this device."""
        memory = step.bytes / (self.bandwidth_for(step.dtype) * 1e9)
        compute = step.flops / (self.peak_gflops[step.dtype] * 1e9 * self.compute_efficiency)
        return 1e3 * (memory + compute) + step.kernels * self.kernel_us * 1e-3

    def decode_ms(self, spec: ArchSpec, past_tokens: int, **kw: Any) -> float:
        return self.step_ms(decode_step(spec, past_tokens, **kw))

    def prefill_ms(self, spec: ArchSpec, prompt_tokens: int, **kw: Any) -> float:
        return self.step_ms(prefill_step(spec, prompt_tokens, **kw))

    def peak_memory_bytes(self, weight_bytes: float, spec: ArchSpec, cached_tokens: int, batch: int = 1) -> int:
        """Weights held (the deployed file, or the analytic bytes) + KV cache at the workload's
        longest context + the runtime's own base."""
        kv = kv_elements_per_token(spec) * spec.activation_bytes * cached_tokens * batch
        return math.ceil(weight_bytes + kv + self.base_memory_mb * 2**20)

    def digest(self) -> str:
        """Hash of the parameters: an estimate made with other parameters (the profile's points
        changed) is not reused as this model's."""
        facts = {k: v for k, v in self.describe().items() if k != "parameter_sources"}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The model and its parameters, for a measurement's provenance."""
        return {
            "model": "bytes/bandwidth + FLOPs/rate + kernels x per-kernel cost (nas.spec.latency)",
            "pricing": PRICING, "method": self.method, "n_points": self.n_points,
            "bandwidth_gbs": dict(self.bandwidth_gbs), "compute_efficiency": self.compute_efficiency,
            "effective_gflops": {k: v * self.compute_efficiency for k, v in self.peak_gflops.items()},
            "kernel_us": self.kernel_us, "base_memory_mb": self.base_memory_mb,
            "parameter_sources": dict(self.parameter_sources), "fit_error_mape": dict(self.fit_error),
        }


def datasheet_model(prior: DevicePrior, why: str = "no calibration points") -> LatencyModel:
    """The model a device gets before any point: datasheet bandwidth and peak rate (optimistic),
    the profile's prior kernel cost and runtime base."""
    note = f"{prior.source} ({why})"
    return LatencyModel(
        bandwidth_gbs={"*": prior.bandwidth_gbs}, compute_efficiency=1.0, kernel_us=prior.kernel_us,
        base_memory_mb=prior.base_memory_mb, peak_gflops=dict(prior.peak_gflops), method="datasheet",
        parameter_sources={"bandwidth": note, "compute": note, "kernel_us": f"profile prior ({why})",
                           "base_memory_mb": "profile prior"},
    )


# --- fitting -------------------------------------------------------------------------------------
def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None for a singular system."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[r][c]:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def nnls(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Non-negative least squares, exactly, by trying every set of free columns (the problems
    here have at most a handful of parameters, so 2**n small solves beat an iterative method)."""
    n = len(rows[0])
    best, best_cost = [0.0] * n, sum(t * t for t in targets)
    for size in range(1, n + 1):
        for free in itertools.combinations(range(n), size):
            ata = [[sum(r[i] * r[j] for r in rows) for j in free] for i in free]
            atb = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in free]
            sol = _solve(ata, atb)
            if sol is None or min(sol) < 0:
                continue
            x = [0.0] * n
            for i, v in zip(free, sol, strict=True):
                x[i] = v
            cost = sum((sum(ri * xi for ri, xi in zip(r, x, strict=True)) - t) ** 2
                       for r, t in zip(rows, targets, strict=True))
            if cost < best_cost - 1e-18:
                best, best_cost = x, cost
    return best


def fit_latency_model(observations: Sequence[Observation], prior: DevicePrior, *,
                      min_points: int = MIN_POINTS, prior_weight: float = PRIOR_WEIGHT) -> LatencyModel:
    """Fit a device's parameters to its measured steps (each a decode or a prefill figure).

    Unknowns, all non-negative and all 1 at the datasheet: the inverse bandwidth efficiency per
    dtype group, the inverse compute efficiency, and the kernel cost relative to the prior. A
    dtype gets a bandwidth of its own when at least two points run at it; the others share
    a pooled one. The error minimized is relative (each point counts alike, whatever its size),
    plus ``prior_weight`` times each parameter's relative distance from its prior.
    ``min_points`` counts points, not observations (``Observation.point``).
    """
    points = {o.point for o in observations}
    if len(points) < min_points:
        return datasheet_model(prior, f"{len(points)} calibration point(s), fewer than {min_points}")
    counts: dict[str, int] = {}  # points (not observations) per dtype
    for dtype, _ in {(o.step.dtype, o.point) for o in observations}:
        counts[dtype] = counts.get(dtype, 0) + 1
    groups = sorted(d for d, c in counts.items() if c >= 2)
    pooled = any(counts[d] < 2 for d in counts)
    columns = groups + (["*"] if pooled else [])
    n_bw = len(columns)

    def features(step: Step) -> list[float]:
        col = step.dtype if step.dtype in groups else "*"
        bw = [0.0] * n_bw
        bw[columns.index(col)] = 1e3 * step.bytes / (prior.bandwidth_gbs * 1e9)  # ms at datasheet bandwidth
        compute = 1e3 * step.flops / (prior.peak_gflops[step.dtype] * 1e9)  # ms at datasheet peak
        kernels = step.kernels * prior.kernel_us * 1e-3  # ms at the prior kernel cost
        return [*bw, compute, kernels]

    rows = [[f / o.ms for f in features(o.step)] for o in observations]
    targets = [1.0] * len(rows)
    n = n_bw + 2
    for j in range(n):  # the pull towards the prior: prior_weight * (theta_j - 1)
        rows.append([prior_weight if i == j else 0.0 for i in range(n)])
        targets.append(prior_weight)
    theta = nnls(rows, targets)
    # A coefficient of 0 would mean infinite bandwidth or rate: keep it finite (a tiny floor).
    theta = [max(t, 1e-6) for t in theta]
    bandwidth = {c: prior.bandwidth_gbs / theta[i] for i, c in enumerate(columns)}
    if "*" not in bandwidth:  # a dtype without points of its own: the geometric mean of the fitted ones
        bandwidth["*"] = math.exp(statistics.fmean(math.log(v) for v in bandwidth.values()))
    n_prefill = sum(o.step.phase == "prefill" for o in observations)

    def group(o: Observation) -> str:
        return o.step.dtype if o.step.dtype in groups else "*"

    sources = {f"bandwidth[{c}]": f"fitted ({sum(group(o) == c for o in observations)} observations)" for c in columns}
    if not pooled:
        sources["bandwidth[*]"] = "geometric mean of the fitted dtypes (no point at other dtypes)"
    sources["compute"] = (f"fitted ({n_prefill} prefill observations)" if n_prefill
                          else "datasheet peak (no prefill point: decode FLOPs barely move it)")
    sources["kernel_us"] = f"fitted ({len(observations)} observations, weak pull to the profile prior)"
    sources["base_memory_mb"] = "profile prior"
    model = LatencyModel(
        bandwidth_gbs=bandwidth, compute_efficiency=1.0 / theta[n_bw], kernel_us=prior.kernel_us * theta[n_bw + 1],
        base_memory_mb=prior.base_memory_mb, peak_gflops=dict(prior.peak_gflops), method="fitted",
        parameter_sources=sources, n_points=len(points),
    )
    errors: dict[str, list[float]] = {}
    for o in observations:
        errors.setdefault(o.step.phase, []).append(abs(model.step_ms(o.step) - o.ms) / o.ms)
    return dataclasses.replace(model, fit_error={k: statistics.fmean(v) for k, v in errors.items()})


def fit_base_memory(model: LatencyModel, residuals_mb: Sequence[float]) -> LatencyModel:
    """The model with its runtime base set to the median of measured (peak - weights - KV), MiB."""
    if not residuals_mb:
        return model
    base = max(0.0, statistics.median(residuals_mb))
    sources = {**model.parameter_sources, "base_memory_mb": f"fitted ({len(residuals_mb)} points with peak memory)"}
    return dataclasses.replace(model, base_memory_mb=base, parameter_sources=sources)


# --- how well it ranks ---------------------------------------------------------------------------
def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction."""
    return statistics.fmean(abs(p - m) / m for p, m in zip(predicted, measured, strict=True))


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list count in neither direction and shrink the scale)."""
    n, s, ta, tb = len(a), 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            sa, sb = (da > 0) - (da < 0), (db > 0) - (db < 0)
            s += sa * sb
            ta += sa != 0
            tb += sb != 0
    return s / math.sqrt(ta * tb) if ta and tb else float("nan")
