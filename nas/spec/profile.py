"""Hardware profiles: ``hw_profiles/<name>.yaml`` turned into a validated, frozen value.

A profile is a board *and* the way a deployment runs on it: the same board moves a model's decode
rate by up to ~4x across power modes (docs/dependencies.md, "Devices"), so the power mode, the ONNX Runtime execution
provider and the thread count belong to the profile, not to the measurement. A profile file::

    description: Raspberry Pi 5 8GB, CPU, an offline voice assistant
    device:                        # datasheet facts of the unit that runs the model; sources in comments
      name: "Raspberry Pi 5 8GB (4x Cortex-A76 @ 2.4 GHz)"
      kind: cpu                    # cpu | gpu
      cores: 4                     # CPU cores; for a gpu, its streaming multiprocessors
      memory_gb: 8
      memory_bandwidth_gbs: 17.1   # or `measure`: found by `nas devices calibrate` on the machine itself
      peak_gflops: {fp32: 153.6, fp16: 307.2, int8: 614.4, int4: 614.4}   # dense; or `measure`
      power_mode: MAXN             # optional
    runtime: {execution_provider: CPUExecutionProvider, threads: 4}
    workload: {prompt_tokens: 64, context_tokens: 256, generate_tokens: 48, batch: 1}
    budgets: {peak_memory_mb: 192, decode_ms_per_token: 10, model_mb: 48}    # each optional
    measurement: {where: ray, ray_resource: rpi5}    # local | ray | estimate
    calibration: []                # points measured on the real device

Units: ``*_gb`` and ``*_gbs`` are decimal (1e9 bytes, as datasheets give them); the budgets'
``*_mb`` are MiB (2**20 bytes, as /proc and ``nas sample`` report memory and file sizes).

``peak_gflops.<dtype>`` is the dense peak of the arithmetic a model of that bitwidth runs on with
this runtime. int4 is weight-only in ONNX Runtime (MatMulNBits unpacks the weights), so its entry
is the rate of the arithmetic it unpacks to: int8 dot products on a CPU with ``accuracy_level=4``,
fp16 on CUDA; it may equal int8 where there is no native int4 path.

Errors name the file and the dotted key (``budgets.decode_ms_per_token: Input should be greater
than 0``), one line each. This module is a value: it imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from nas.spec.arch import BITWIDTHS, ArchSpec
from nas.spec.errors import ConfigError, SpecError
from nas.spec.files import definition_files, parse_yaml_mapping, read_definition
from nas.spec.latency import (
    DevicePrior,
    LatencyModel,
    Observation,
    decode_step,
    deployed_params,
    fit_base_memory,
    fit_latency_model,
    kv_elements_per_token,
    prefill_step,
)

MEASURE = "measure"
"""A device fact that cannot be written down ahead of time (the host a search happens to run on):
``nas devices calibrate`` measures it there. Needs a profile that is measured, not estimated."""

MIB = 2**20
DTYPES: dict[int, str] = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}
"""Bitwidth of an ArchSpec -> key of ``device.peak_gflops``."""

ExecutionProvider = Literal["CPUExecutionProvider", "CUDAExecutionProvider"]
# The provider a deployment on each kind of device uses; a gpu profile run on the CPU provider
# would measure the board's CPU while its facts describe the GPU.
_PROVIDER_FOR_KIND: dict[str, str] = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}


class _FieldProblem(ValueError):
    """Raised inside a validator to name a key below the one pydantic reports (cross-field checks)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


# --- field types ---------------------------------------------------------------------------------
def _positive_or_measure(value: Any) -> float | str:
    if value == MEASURE:
        return MEASURE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number or {MEASURE!r}, got {value!r}")
    return float(value)


def _positive_int_or_measure(value: Any) -> int | str:
    if value == MEASURE:
        return MEASURE
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive integer or {MEASURE!r}, got {value!r}")
    return value


def _to_spec(value: Any) -> ArchSpec:
    if isinstance(value, ArchSpec):
        return value
    try:
        return ArchSpec.from_dict(value)
    except SpecError as e:  # its message names the ArchSpec field
        raise ValueError(str(e)) from None


Measurable = Annotated[float | Literal["measure"], PlainValidator(_positive_or_measure)]
MeasurableInt = Annotated[int | Literal["measure"], PlainValidator(_positive_int_or_measure)]
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True, min_length=1)]
Spec = Annotated[ArchSpec, PlainValidator(_to_spec), PlainSerializer(ArchSpec.to_dict, return_type=dict)]


class _Section(BaseModel):
    # Frozen and hashable like ArchSpec; unknown keys are typos, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ------------------------------------------------------------------------------------
class PeakGflops(_Section):
    """Dense peak GFLOP/s (GOP/s for the integer types) per dtype; see the module docstring."""

    fp32: Measurable
    fp16: Measurable
    int8: Measurable
    int4: Measurable


class Device(_Section):
    """Datasheet facts of the compute unit that runs the model."""

    name: Text
    kind: Literal["cpu", "gpu"]
    cores: MeasurableInt
    """CPU cores; for a gpu its streaming multiprocessors (the YAML comment says which)."""
    memory_gb: Measurable
    memory_bandwidth_gbs: Measurable
    """Peak DRAM bandwidth: decode reads every weight once per token, so this bounds decode."""
    peak_gflops: PeakGflops
    power_mode: Text | None = None
    """The board's power mode (e.g. nvpmodel's MAXN): part of the device, since it moves clocks."""

    @field_validator("peak_gflops", mode="before")
    @classmethod
    def _measure_all(cls, value: Any) -> Any:
        # `peak_gflops: measure` is shorthand for every dtype measured.
        return dict.fromkeys(PeakGflops.model_fields, MEASURE) if value == MEASURE else value


class Runtime(_Section):
    """How a deployment runs the model: the ONNX Runtime provider and its intra-op threads."""

    execution_provider: ExecutionProvider
    threads: PositiveInt


class Workload(_Section):
    """Where latency is taken. A spec with a shorter context_length than the workload is measured
    at its own limit (see the methods): the search space, not the profile, sets model context."""

    prompt_tokens: PositiveInt
    """Prefill latency is measured on a prompt of this length."""
    context_tokens: PositiveInt
    """Decode latency is measured with this many tokens already in the KV cache."""
    generate_tokens: PositiveInt
    """Tokens generated per request (prefill + generate_tokens x decode is one request)."""
    batch: PositiveInt = 1

    def prefill_tokens(self, spec: ArchSpec) -> int:
        """Prompt length to measure prefill at for this spec."""
        return min(self.prompt_tokens, spec.context_length)

    def decode_past_tokens(self, spec: ArchSpec) -> int:
        """Past length to measure one decode step at (the new token must still fit the context)."""
        return min(self.context_tokens, spec.context_length - 1)

    def cached_tokens(self, spec: ArchSpec) -> int:
        """Most positions the KV cache holds during the workload, per sequence."""
        return max(self.prefill_tokens(spec), self.decode_past_tokens(spec) + 1)


class Budgets(_Section):
    """Limits a deployment must meet; each optional. A spec over any budget is infeasible."""

    peak_memory_mb: PositiveFloat | None = None
    """Peak resident memory of the inference process, MiB (runtime and KV cache included)."""
    decode_ms_per_token: PositiveFloat | None = None
    """One decode step at the workload's context, median, ms."""
    prefill_ms: PositiveFloat | None = None
    """Prefill of the workload's prompt (time to first token), median, ms."""
    model_mb: PositiveFloat | None = None
    """Size of the deployed model files (graph and external data together), MiB."""

    FIGURE_OF: ClassVar[dict[str, str]] = {
        "peak_memory_mb": "peak_memory_mb", "decode_ms_per_token": "decode_ms", "prefill_ms": "prefill_ms",
        "model_mb": "model_mb",
    }
    """Budget -> the measurement figure it bounds (``Measurement.figures()``'s names)."""

    def limits(self) -> dict[str, float]:
        """The budgets this profile sets, by name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def constraints(self, figures: Mapping[str, float | None]) -> dict[str, float]:
        """Constraint values, figure minus budget in the budget's unit (<= 0 is met, as Optuna's
        constraints read), for each budget set whose figure is known; a budget whose figure is
        not in ``figures`` is left out rather than guessed."""
        out = {}
        for key, limit in self.limits().items():
            value = figures.get(self.FIGURE_OF[key])
            if value is not None:
                out[key] = float(value) - limit
        return out

    @property
    def peak_memory_bytes(self) -> float | None:
        return None if self.peak_memory_mb is None else self.peak_memory_mb * MIB

    @property
    def model_bytes(self) -> float | None:
        return None if self.model_mb is None else self.model_mb * MIB


class MeasurementSite(_Section):
    """Where a figure for this profile comes from: ``local`` (this host measures for real),
    ``ray`` (a Ray node advertising ``ray_resource`` measures it on the device), ``estimate``
    (the device's latency model gives the figure; labelled as such, never as measured)."""

    where: Literal["local", "ray", "estimate"]
    ray_resource: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    """Custom resource a device's node advertises: ``ray start --resources '{"jetson": 1}'``."""

    @model_validator(mode="after")
    def _resource_for_ray(self) -> MeasurementSite:
        if self.where == "ray" and not self.ray_resource:
            raise _FieldProblem(
                "ray_resource", "is required when where is 'ray' (the resource the device's node advertises)"
            )
        return self


PREFILL_PROMPT_IF_UNPUBLISHED = 512
"""Prompt length a published prefill *rate* is taken at when its source does not say (llama.cpp's
``llama-bench`` measures prompts of 512 tokens by default): only the per-kernel share of the time
depends on it, small for the models such figures are published for."""


class PointSource(_Section):
    """Where a calibration figure was published, and on what exactly it was taken."""

    url: Text
    """The page, thread or file that publishes the figure."""
    board: Text
    """The board (and memory size) it ran on; where it is not the profile's own device, the
    profile's description says how they differ."""
    power_mode: Text | None = None
    date: Text | None = None
    note: Text | None = None
    """Anything needed to read the figure: which row of a table, how it was averaged."""
    node: Text | None = None
    """For a point measured by ``nas devices calibrate``: the machine (Ray node) it ran on."""
    fingerprint: Text | None = None
    """For a point measured by ``nas devices calibrate``: the device fingerprint of the run
    (``nas.stages.measure.device_facts``); public points have none."""


class PointWorkload(_Section):
    """What the published run did, as far as its source says (unknown: left out)."""

    prompt_tokens: PositiveInt | None = None
    """Prompt length of the prefill figure."""
    context_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None
    """Positions in the KV cache during the decode figure (the middle of a generation for a
    figure averaged over one); unknown counts as 0, which for the short runs such figures come
    from moves the KV bytes by a few percent of the weights at most."""
    threads: PositiveInt | None = None


class CalibrationPoint(_Section):
    """One latency published (or measured by us) on the device, to fit the device's latency model.

    ``arch`` describes the model by the ArchSpec fields the model needs (from its public config);
    ``bitwidth`` is the dtype class of its weights (4: 4-bit formats, 8, 16, 32), while the bytes
    read come from ``bits_per_weight`` or ``file_mb`` (a Q4_K_M file holds ~4.85 bits per weight,
    not 4). Each phase is given as published: milliseconds or tokens per second."""

    model: Text
    """The public model, e.g. ``TinyLlama-1.1B``."""
    arch: Spec
    bitwidth: Literal[32, 16, 8, 4]
    quantization: Text
    """The runtime's format name (``Q4_K_M``, ``q4f16_ft``, ``int4 MatMulNBits``)."""
    bits_per_weight: PositiveFloat | None = None
    file_mb: PositiveFloat | None = None
    """Size of the model file as published, MiB: gives the bits per weight."""
    kv_bytes_per_element: Literal[1, 2, 4] | None = None
    """Bytes per KV-cache element (llama.cpp and MLC keep fp16: 2); default: the spec's own."""
    runtime: Text
    """Runtime and version (``llama.cpp b4240 CPU``, ``MLC 0.1.x CUDA``, ``ONNX Runtime 1.32``)."""
    workload: PointWorkload = PointWorkload()
    decode_ms: PositiveFloat | None = None
    decode_tokens_per_s: PositiveFloat | None = None
    prefill_ms: PositiveFloat | None = None
    """The whole prompt's prefill (needs ``workload.prompt_tokens``)."""
    prefill_tokens_per_s: PositiveFloat | None = None
    peak_memory_mb: PositiveFloat | None = None
    """Peak resident memory of the inference process, MiB, where the source gives it."""
    source: PointSource

    @model_validator(mode="before")
    @classmethod
    def _bitwidth_into_arch(cls, data: Any) -> Any:
        # The point's bitwidth is the spec's: fill it in, and refuse an arch that says otherwise.
        if not (isinstance(data, dict) and isinstance(data.get("arch"), dict)):
            return data
        bits = data.get("bitwidth")
        if isinstance(bits, bool) or bits not in BITWIDTHS:
            return data
        arch_bits = data["arch"].get("bitwidth", bits)
        if arch_bits != bits:
            raise _FieldProblem("arch.bitwidth", f"is {arch_bits!r} but the point's bitwidth is {bits}")
        return {**data, "arch": {**data["arch"], "bitwidth": bits}}

    @model_validator(mode="after")
    def _figures(self) -> CalibrationPoint:
        for phase in ("decode", "prefill"):
            if getattr(self, f"{phase}_ms") is not None and getattr(self, f"{phase}_tokens_per_s") is not None:
                raise _FieldProblem(f"{phase}_ms", f"give {phase}_ms or {phase}_tokens_per_s, not both")
        if self.decode_ms is None and self.decode_tokens_per_s is None and self.prefill_ms is None \
                and self.prefill_tokens_per_s is None:
            raise _FieldProblem("decode_tokens_per_s", "a point needs a decode or a prefill figure (ms or tokens/s)")
        if self.prefill_ms is not None and self.workload.prompt_tokens is None:
            raise _FieldProblem("workload.prompt_tokens", "is required with prefill_ms (the prompt it was taken on)")
        if self.bits_per_weight is not None and self.file_mb is not None:
            raise _FieldProblem("file_mb", "give bits_per_weight or file_mb, not both")
        return self

    # --- the figures in the model's units --------------------------------------------------
    def bits(self) -> float:
        """Average stored bits per parameter."""
        if self.bits_per_weight is not None:
            return self.bits_per_weight
        if self.file_mb is not None:
            return self.file_mb * MIB * 8 / self.arch.params()
        return self.arch.weight_bytes() * 8 / self.arch.params()

    def measured_decode_ms(self) -> float | None:
        if self.decode_ms is not None:
            return self.decode_ms
        return None if self.decode_tokens_per_s is None else 1e3 / self.decode_tokens_per_s

    def prompt_tokens(self) -> int:
        """The prefill figure's prompt (published, or ``PREFILL_PROMPT_IF_UNPUBLISHED``)."""
        return self.workload.prompt_tokens or PREFILL_PROMPT_IF_UNPUBLISHED

    def measured_prefill_ms(self) -> float | None:
        """The whole prompt's prefill, ms."""
        if self.prefill_ms is not None:
            return self.prefill_ms
        return None if self.prefill_tokens_per_s is None else 1e3 * self.prompt_tokens() / self.prefill_tokens_per_s


class LatencyPrior(_Section):
    """What the latency model assumes of the execution provider before (or beside) the points.
    Not part of the fingerprint: it changes estimates, never a measurement."""

    kernel_us: PositiveFloat
    """Cost of one kernel (launch, dispatch, the element-wise work around it), microseconds."""
    base_memory_mb: PositiveFloat
    """Resident memory of the runtime before any weight (libraries, CUDA context), MiB."""


class HardwareProfile(_Section):
    """A device, how it runs, what it is asked to do and what it must stay within."""

    name: Text
    """The file's stem (``jetson``); set by the loader, not written in the file."""
    source: str = ""
    """The file it was loaded from, for error messages."""
    description: str = ""
    device: Device
    runtime: Runtime
    workload: Workload
    budgets: Budgets
    measurement: MeasurementSite
    latency_prior: LatencyPrior | None = None
    """The per-kernel cost and runtime base the latency model starts from; default: by provider
    (``DEFAULT_LATENCY_PRIOR``)."""
    calibration: tuple[CalibrationPoint, ...] = ()

    @field_validator("calibration", mode="before")
    @classmethod
    def _empty_calibration(cls, value: Any) -> Any:
        return () if value is None else value

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        kind, provider = self.device.kind, self.runtime.execution_provider
        if _PROVIDER_FOR_KIND[kind] != provider:
            raise _FieldProblem(
                "runtime.execution_provider",
                f"{provider} does not run on a {kind} device; use {_PROVIDER_FOR_KIND[kind]} (device.kind is {kind!r})",
            )
        cores = self.device.cores
        if kind == "cpu" and isinstance(cores, int) and self.runtime.threads > cores:
            raise _FieldProblem(
                "runtime.threads", f"{self.runtime.threads} threads on {cores} cores would oversubscribe them"
            )
        unknown = self.to_be_measured()
        if unknown and self.measurement.where == "estimate":
            raise _FieldProblem(
                unknown[0], f"is {MEASURE!r} but measurement.where is 'estimate': nothing measures it; give a number"
            )
        return self

    @property
    def fingerprint(self) -> str:
        """Hash of what a latency or memory figure depends on (device, runtime, workload), for
        caching measurements: editing budgets, description or calibration keeps it."""
        facts = self.model_dump(include={"device", "runtime", "workload"})
        return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    # --- datasheet figures for the latency model and the checks ---------------------------------------------
    def to_be_measured(self) -> list[str]:
        """Dotted keys of the device facts marked ``measure`` (empty once calibrated)."""
        d = self.device
        keys = [f"device.{k}" for k in ("cores", "memory_gb", "memory_bandwidth_gbs") if getattr(d, k) == MEASURE]
        keys += [f"device.peak_gflops.{k}" for k in PeakGflops.model_fields if getattr(d.peak_gflops, k) == MEASURE]
        return keys

    def _known(self, value: float | int | str, key: str) -> float:
        if value == MEASURE:
            raise ConfigError(
                self.source or self.name, key, f"is {MEASURE!r}: run `nas devices calibrate {self.name}` first"
            )
        return float(value)

    def peak_flops(self, bitwidth: int) -> float:
        """Dense peak FLOP/s (OP/s) of the arithmetic a model at ``bitwidth`` runs on."""
        if bitwidth not in DTYPES:
            raise ValueError(f"bitwidth must be one of {list(DTYPES)}, got {bitwidth!r}")
        dtype = DTYPES[bitwidth]
        return self._known(getattr(self.device.peak_gflops, dtype), f"device.peak_gflops.{dtype}") * 1e9

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self._known(self.device.memory_bandwidth_gbs, "device.memory_bandwidth_gbs") * 1e9

    def with_measured(
        self,
        *,
        memory_bandwidth_gbs: float | None = None,
        peak_gflops: dict[str, float] | None = None,
        memory_gb: float | None = None,
        cores: int | None = None,
    ) -> HardwareProfile:
        """A copy with measured device facts filled in (validated again), for ``nas devices calibrate``."""
        device = self.device.model_dump()
        updates = {"memory_bandwidth_gbs": memory_bandwidth_gbs, "memory_gb": memory_gb, "cores": cores}
        device.update({k: v for k, v in updates.items() if v is not None})
        device["peak_gflops"] = {**device["peak_gflops"], **(peak_gflops or {})}
        return _validate({**self.model_dump(), "device": device}, self.source or self.name)


# --- the latency model of a device --------------------------------------------------------------
DEFAULT_LATENCY_PRIOR: dict[str, LatencyPrior] = {
    # ~4 us per node: the 30M int4 model of docs/dependencies.md ran ~460 nodes per decode step in
    # ~2.25 ms with most kernel time outside the MatMuls, on the 2-vCPU development host; the
    # runtime base is onnxruntime and numpy imported (~45 MiB there).
    "CPUExecutionProvider": LatencyPrior(kernel_us=4.0, base_memory_mb=45.0),
    # Assumed, not measured here: a CUDA launch and its host-side dispatch from a small Arm core
    # (~10 us), and the CUDA context with cuBLAS/cuDNN loaded (several hundred MiB).
    "CUDAExecutionProvider": LatencyPrior(kernel_us=10.0, base_memory_mb=400.0),
}


def device_prior(profile: HardwareProfile) -> DevicePrior:
    """The datasheet side of a profile's latency model (its facts must be known, not ``measure``)."""
    prior = profile.latency_prior or DEFAULT_LATENCY_PRIOR[profile.runtime.execution_provider]
    peaks = {DTYPES[b]: profile.peak_flops(b) / 1e9 for b in DTYPES}
    source = "datasheet" if profile.latency_prior else (
        f"datasheet; kernel and base priors: {profile.runtime.execution_provider} defaults")
    return DevicePrior(bandwidth_gbs=profile.bandwidth_bytes_per_s / 1e9, peak_gflops=peaks,
                       kernel_us=prior.kernel_us, base_memory_mb=prior.base_memory_mb, source=source)


def point_observations(point: CalibrationPoint, index: int) -> list[Observation]:
    """The measured steps of one calibration point (a decode figure, a prefill figure, or both)."""
    kw = {"bits_per_weight": point.bits(), "kv_bytes_per_element": point.kv_bytes_per_element}
    out = []
    decode = point.measured_decode_ms()
    if decode is not None:
        out.append(Observation(decode_step(point.arch, point.workload.context_tokens or 0, **kw), decode, index))
    prefill = point.measured_prefill_ms()
    if prefill is not None:
        out.append(Observation(prefill_step(point.arch, point.prompt_tokens(), **kw), prefill, index))
    return out


def latency_model(profile: HardwareProfile, *, leave_out: int | None = None) -> LatencyModel:
    """The device's latency model fitted to its profile's calibration points (or its datasheet,
    with fewer than ``MIN_POINTS``); ``leave_out`` drops one point (leave-one-out accuracy)."""
    points = [p for i, p in enumerate(profile.calibration) if i != leave_out]
    observations = [o for i, p in enumerate(points) for o in point_observations(p, i)]
    model = fit_latency_model(observations, device_prior(profile))
    residuals = []
    for p in points:  # the runtime base, where points publish the process's peak memory
        if p.peak_memory_mb is not None:
            kv = kv_elements_per_token(p.arch) * p.arch.activation_bytes  # as peak_memory_bytes counts it
            held = deployed_params(p.arch) * p.bits() / 8 + kv * (p.workload.context_tokens or 0)
            residuals.append(p.peak_memory_mb - held / MIB)
    return fit_base_memory(model, residuals)


# --- the analytic check --------------------------------------------------------------------------
# Lower bounds only: the check runs before any export or measurement and must never reject a spec
# that the measured check could pass. Anything a deployment might save (scales in fp16, the input
# embedding table paged in row by row, the KV cache in fp16) is assumed saved.
def min_model_bytes(spec: ArchSpec) -> int:
    """Fewest bytes any export of ``spec`` can take: every unique parameter at its bitwidth, no
    quantization scales (ArchSpec.weight_bytes adds int4's fp32 scales; a CUDA export keeps them
    in fp16), tied tables and shared blocks stored once."""
    return math.ceil(spec.params() * spec.bitwidth / 8)


def min_peak_memory_bytes(spec: ArchSpec, workload: Workload) -> int:
    """Fewest bytes the inference process must hold at its peak: the weights one decode step reads
    (all but an untied input embedding, whose rows are gathered one by one and may stay on disk
    when ONNX Runtime maps the file) plus the KV cache at the workload's longest context, at no
    more than 2 bytes per element. The runtime's own memory is not counted."""
    read = spec.params() - (0 if spec.tied_embeddings else spec.embedding_params() // 2)
    elements_per_token = spec.kv_cache_bytes_per_token() // spec.activation_bytes
    kv = elements_per_token * min(spec.activation_bytes, 2) * workload.cached_tokens(spec) * workload.batch
    return math.ceil(read * spec.bitwidth / 8) + kv


def analytic_budget_check(spec: ArchSpec, profile: HardwareProfile) -> list[str]:
    """Why ``spec`` is certainly over the profile's budgets, before anything is measured (an empty
    list passes). Memory and size only: latency needs a measurement (docs/dependencies.md: small decoders are
    overhead-bound, so bytes alone do not bound their speed from above)."""
    budgets, reasons = profile.budgets, []
    bits = DTYPES[spec.bitwidth]
    if budgets.model_bytes is not None:
        size = min_model_bytes(spec)
        if size > budgets.model_bytes:
            reasons.append(
                f"model size: {spec.params() / 1e6:.1f}M parameters at {bits} take at least {size / MIB:.1f} MiB; "
                f"budget {budgets.model_mb:g} MiB (budgets.model_mb)"
            )
    if budgets.peak_memory_bytes is not None:
        held = min_peak_memory_bytes(spec, profile.workload)
        if held > budgets.peak_memory_bytes:
            reasons.append(
                f"peak memory: weights and KV cache at {profile.workload.cached_tokens(spec)} tokens take at least "
                f"{held / MIB:.1f} MiB; budget {budgets.peak_memory_mb:g} MiB (budgets.peak_memory_mb)"
            )
    return reasons


# --- loading -------------------------------------------------------------------------------------
_SECTIONS = {"description", "device", "runtime", "workload", "budgets", "measurement", "latency_prior", "calibration"}


def _dotted(loc: list[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: list[str | int]) -> list[str]:
    """Field names of the section at ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = HardwareProfile
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        inner = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    names = list(model.model_fields)
    return [n for n in names if n not in ("name", "source")] if model is HardwareProfile else names


def _describe(err: Any) -> tuple[str, str]:
    """(dotted key, problem) for one pydantic error."""
    loc = list(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldProblem):
        return _dotted([*loc, *cause.key.split(".")]), cause.problem
    if err["type"] == "extra_forbidden":
        return _dotted(loc), f"unknown key; allowed: {', '.join(_allowed_keys(loc[:-1]))}"
    if err["type"] == "missing":
        return _dotted(loc), "is required"
    return _dotted(loc), err["msg"].removeprefix("Value error, ")


def _validate(doc: dict[str, Any], source: str) -> HardwareProfile:
    try:
        return HardwareProfile.model_validate(doc)
    except ValidationError as e:
        errors = e.errors()
        key, problem = _describe(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(source, key, problem + more) from None


def parse_profile(text: str, source: str, name: str) -> HardwareProfile:
    """Validate a profile's YAML text; ``source`` names the file in errors, ``name`` is its stem."""
    doc = parse_yaml_mapping(text, source, f"the sections {', '.join(sorted(_SECTIONS))}")
    for key in ("name", "source"):
        if key in doc:
            raise ConfigError(source, key, "unknown key; a profile's name is its file name")
    return _validate({**doc, "name": name, "source": source}, source)


def list_profile_files() -> dict[str, Path]:
    """Name -> file of every shipped profile (the checkout's copy wins over the wheel's)."""
    return definition_files("hw_profiles")


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A profile by name (``jetson``) or by path to a YAML file."""
    name, path, text = read_definition(name_or_path, "hw_profiles", "hardware profile")
    return parse_profile(text, str(path), name)
