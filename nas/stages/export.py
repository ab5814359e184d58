"""Export a decoder to ONNX and quantize it with ONNX Runtime's own tools.

One graph serves prefill and decode: inputs ``input_ids`` (B, T) and the cache of the P tokens
before them, outputs ``logits`` (B, T, vocab) and the cache of all P+T tokens. B, T and P are
dynamic (P = 0 is a prefill), so the measurer and the scorer run the very file a deployment
would, with no second graph to keep in step. Names are explicit and stable::

    inputs   input_ids, past.{i}.key / past.{i}.value      (mha/gqa/mqa, one pair per applied layer)
                        past.{i}.latent / past.{i}.rope    (mla)
    outputs  logits,    present.{i}.<same suffix>          (feed present.i.x back as past.i.x)

Choices, and why:

- torch's dynamo exporter at opset 20 (docs/dependencies.md): the TorchScript exporter fails on SDPA with
  ``enable_gqa``; opset 23 emits a native ``Attention`` op that broke ORT's quantization tools.
- Every ``nn.Linear`` is exported as ``MatMul(x, W^T)`` with W^T stored pre-transposed. Left as
  ``Linear``, the exporter writes ``Transpose(W) -> MatMul`` for the larger weights (its constant
  folding has a size limit) and folds the smaller ones once per *use*: ORT's quantizers skip a
  MatMul whose weight is not a constant, and a repeated block (layer sharing) would be stored
  twice. Pre-transposed, each weight is one initializer, shared by every use of its block.
- Tied embeddings: the lm_head is exported as its own pre-transposed constant, so that the
  quantizers treat it as a weight (as ``Transpose(table)`` it stayed fp32 under int4 and was
  dequantized on every step under int8: docs/dependencies.md). The deployed file then holds the table twice;
  ``ExportedModel.tied_storage == "duplicated"`` says so, and the file size counts both.
- fp16 converts inputs and outputs too (``keep_io_types=False``): the KV cache is held in fp16,
  as ``ArchSpec.activation_bytes`` and ``kv_cache_bytes_per_token`` assume, and a deployment that
  picks fp16 to save memory would not keep an fp32 cache. ``cache_spec`` and ``logits_dtype``
  carry the dtype, so callers need not know.
- int8 is ``quantize_dynamic`` (8-bit weights per tensor, unsigned, activations quantized per call); int4 is
  ``MatMulNBitsQuantizer`` (weight-only, block ``INT4_BLOCK_SIZE``, ``accuracy_level=4``), which
  raises the file's opset to 21 for its int4 tensors. Both quantize every weight MatMul (the
  lm_head included) and the embedding Gather; the result records what left fp32, read from the
  file (``quantized_ops``, ``embedding_quantized``, ``lm_head_quantized``).
- Weights go to an external ``model.onnx.data`` beside ``model.onnx``; ``files`` lists both and
  ``total_bytes`` counts both. The exporter's per-node debug metadata is dropped first, since it
  is no part of a deployment and was a third of a small model's bytes. ``model.json`` beside them
  is the ExportedModel (``load_exported``), for a measurer in another process.

DESIGN.md's trial flow speaks of prefill and decode graphs: here they are one file, run with an
empty cache or with one token.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from nas.spec.arch import BITWIDTHS, INT4_BLOCK_SIZE, ArchSpec
from nas.spec.errors import NasError
from nas.stages.feeds import GraphKind, step_inputs
from nas.stages.model import Decoder, build_model

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 22
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "model.json"  # the ExportedModel beside the files, for a measurer in another process
EXPORT_FORMAT = 2
"""The version of what the exporter and its quantizers write, in the manifest and in a measurement's
workload: raised whenever a change here changes what measuring the files would read, so that a
stored measurement of older files is not reused for new ones (2: int8 weights unsigned, U8U8)."""

TiedStorage = Literal["untied", "duplicated", "shared"]


class ExportError(NasError):
    """A model that cannot be exported or quantized, or a request the exporter does not support."""


@dataclass(frozen=True)
class CacheInput:
    """One past-cache input: its name, the output that carries its next value, and its shape
    with the symbolic axes ``"batch"`` and ``"past"``."""

    name: str
    output: str
    shape: tuple[int | str, ...]
    dtype: str
    """numpy dtype name: "float32", or "float16" for an fp16 model."""

    @property
    def past_axis(self) -> int:
        return self.shape.index("past")

    def concrete_shape(self, batch: int, past: int) -> tuple[int, ...]:
        sizes = {"batch": batch, "past": past}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def zeros(self, batch: int, past: int = 0) -> np.ndarray:
        return np.zeros(self.concrete_shape(batch, past), dtype=self.dtype)


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file on disk and what a caller needs to run and report it without torch."""

    path: Path
    """The .onnx file."""
    files: tuple[Path, ...]
    """Every file the model needs (the .onnx and its external data): move them together."""
    total_bytes: int
    """Bytes of all ``files``: the model size a deployment stores."""
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    cache_spec: tuple[CacheInput, ...]
    """The past inputs in input order, each with its present output."""
    logits_dtype: str
    vocab_size: int
    bitwidth: int
    """The file's weight precision (32, 16, 8, 4); ``spec.bitwidth`` is what was asked for."""
    opset: int
    spec: ArchSpec
    tied_storage: TiedStorage
    """"duplicated": the spec ties its embeddings but the file holds the table and the lm_head
    separately (see the module docstring); "shared": the file holds the tied table once, read by
    both (the deployment graph, nas.stages.deploy); "untied": the spec does not tie them."""
    quantized_ops: tuple[str, ...] = ()
    """Op types whose constant weights were quantized, e.g. ("MatMul", "Gather")."""
    embedding_quantized: bool = False
    """Whether the input embedding table (the Gather) is stored below fp32."""
    lm_head_quantized: bool = False
    dynamic_batch: bool = True
    made_by: Literal["traced", "reweighted", "built"] = "traced"
    """How the graph was made: traced from the model (export_onnx), an earlier trace of the same
    spec with this model's weights written in (reweight), or built node by node from the
    model's weights (nas.stages.deploy)."""
    graph: GraphKind = "plain"
    """Which interface the graph has, hence how it is fed (nas.stages.feeds): "plain", the traced
    export; "gqa", the deployment graph (GroupQueryAttention, which also needs seqlens_k and
    total_sequence_length)."""
    max_positions: int = 0
    """Longest sequence (cache plus new tokens) the graph can take; 0: any (the plain graph
    computes its rotary angles on the fly, the deployment graph reads them from a table)."""
    graph_note: str = ""
    """Why this is the plain graph where the deployment graph was asked for, or what the
    deployment graph changed from the spec to run (a padded head width); empty otherwise."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; file paths relative to the model's folder, so the folder can move."""
        d = dataclasses.asdict(self)
        root = self.path.parent
        d["path"] = self.path.name
        d["files"] = [str(f.relative_to(root)) for f in self.files]
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path) -> ExportedModel:
        d = dict(data)
        d.pop("export_format", None)  # the manifest's, not a field
        d["path"] = root / d["path"]
        d["files"] = tuple(root / f for f in d["files"])
        d["spec"] = ArchSpec.from_dict(d["spec"])
        d["cache_spec"] = tuple(
            CacheInput(c["name"], c["output"], tuple(c["shape"]), c["dtype"]) for c in d["cache_spec"]
        )
        for key in ("input_names", "output_names", "quantized_ops"):
            d[key] = tuple(d[key])
        return cls(**d)

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The cache of a prefill: every past input with past length 0."""
        return {c.name: c.zeros(batch, 0) for c in self.cache_spec}


def load_exported(folder: Path) -> ExportedModel:
    """The ExportedModel saved in ``folder`` by export_onnx or quantize."""
    manifest = Path(folder) / MANIFEST_FILE
    if not manifest.is_file():
        raise ExportError(f"no exported model in {folder} (missing {MANIFEST_FILE})")
    return ExportedModel.from_dict(json.loads(manifest.read_text()), Path(folder))


# --- export -------------------------------------------------------------------------------------


class _PreTransposed(nn.Module):
    """``nn.Linear`` without bias, holding W^T so the graph has ``MatMul(x, const)``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight_t)


class _FlatCache(nn.Module):
    """``Decoder.forward_cached`` with the cache flattened into positional tensors, which is
    what an ONNX graph's inputs and outputs are."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, past: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, new_cache = self.model.forward_cached(input_ids, cache)
        return (logits, *(t for pair in new_cache for t in pair))


def _export_copy(model: Decoder) -> Decoder:
    """A CPU fp32 eval copy of ``model`` whose linear layers are pre-transposed constants; a tied
    lm_head gets its own copy of the table. The caller's model is left untouched."""
    m = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    for module in list(m.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ExportError(f"linear layer {name!r} has a bias; the exporter expects none")
                # Each unique module is replaced once, so a shared block keeps one set of weights.
                setattr(module, name, _PreTransposed(child.weight))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _cache_suffixes(spec: ArchSpec) -> tuple[str, str]:
    return ("latent", "rope") if spec.attention == "mla" else ("key", "value")


def _cache_shapes(spec: ArchSpec) -> tuple[tuple[int | str, ...], tuple[int | str, ...]]:
    """Shapes of one layer's (a, b) cache pair, as documented at the top of nas/stages/model.py."""
    if spec.attention == "mla":
        return ("batch", "past", spec.mla_latent_rank), ("batch", "past", spec.mla_rope_dim)
    kv = ("batch", spec.n_kv_heads, "past", spec.head_dim)
    return kv, kv


def _cache_spec(spec: ArchSpec, dtype: str = "float32") -> tuple[CacheInput, ...]:
    out = []
    for i in range(spec.n_layers):
        for suffix, shape in zip(_cache_suffixes(spec), _cache_shapes(spec), strict=True):
            out.append(CacheInput(f"past.{i}.{suffix}", f"present.{i}.{suffix}", shape, dtype))
    return tuple(out)


def _from_exporters(record: logging.LogRecord) -> bool:
    """A record the exporter or a quantizer logged straight to the root logger (ONNX Runtime's
    quantization tools call ``logging.info``/``logging.warning``)."""
    path = record.pathname.replace("\\", "/")
    return any(f"/{pkg}/" in path for pkg in ("onnxruntime", "onnx", "onnxscript", "onnx_ir", "torch"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantizers' progress prints, warnings and INFO logs; errors
    still raise. The root logger keeps its level: a filter drops only the records these
    libraries send to it, so the rest of the program's logging is untouched."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                              "onnx_ir", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    root = logging.getLogger()
    drop = logging.Filter()
    drop.filter = lambda record: not (record.levelno < logging.ERROR and _from_exporters(record))  # type: ignore[method-assign]
    root.addFilter(drop)
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: Decoder, out_dir: Path, *, opset: int = DEFAULT_OPSET) -> ExportedModel:
    """Export ``model`` (fp32) to ``out_dir/model.onnx`` (+ ``model.onnx.data``) as one graph with
    a KV cache and dynamic batch, sequence and past length."""
    if not isinstance(model, Decoder):
        raise ExportError(f"export_onnx takes a nas.stages.model.Decoder, got {type(model).__name__}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}: the dynamo exporter needs "
            f">= {MIN_OPSET}, and from 23 it emits a native Attention op that ORT's quantizers reject"
        )
    spec = model.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_spec = _cache_spec(spec)
    input_names = ("input_ids", *(c.name for c in cache_spec))
    output_names = ("logits", *(c.output for c in cache_spec))

    # Example shapes of 2 or more: torch.export specializes a dimension that is 0 or 1 in the
    # example to that constant, which would fix the batch to 1 or the past length to 0.
    batch, seq, past = 2, 3, 2
    m = _export_copy(model)
    with torch.no_grad():
        ids = torch.randint(0, spec.vocab_size, (batch, past + seq), generator=torch.Generator().manual_seed(0))
        _, warm = m.forward_cached(ids[:, :past], m.empty_cache(batch))
    example_past = tuple(t.contiguous() for pair in warm for t in pair)
    b = torch.export.Dim("batch", min=1)
    t = torch.export.Dim("seq", min=1)
    p = torch.export.Dim("past", min=0)
    past_shapes = tuple({c.shape.index("batch"): b, c.past_axis: p} for c in cache_spec)
    dynamic_shapes = ({0: b, 1: t}, past_shapes)

    path = out_dir / MODEL_FILE
    _remove_model_files(path)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                _FlatCache(m), (ids[:, past:], example_past), dynamo=True, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
            _strip_debug_info(program.model)
            program.save(str(path), external_data=True)
    except Exception as e:  # the exporter raises many kinds; a failed export is the model's problem
        raise ExportError(f"ONNX export of {spec.summary()} failed: {type(e).__name__}: {e}") from e

    exported = _describe(
        path, spec=spec, bitwidth=32, opset=opset, input_names=input_names, output_names=output_names,
        cache_spec=cache_spec, logits_dtype="float32", quantized_ops=(),
    )
    _check_io(exported)
    return exported


def _remove_model_files(path: Path) -> None:
    """Delete a model file and its external data left by an earlier run in the same folder."""
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)


def _strip_debug_info(model: Any) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX node text, source paths):
    for a small model it is most of the .onnx file (375 kB of 1 MB measured on a 0.17M-param
    model) and it is no part of what a deployment ships."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None


# --- files and metadata -------------------------------------------------------------------------


def _model_files(path: Path) -> tuple[Path, ...]:
    """The .onnx and every external-data file it refers to."""
    proto = onnx.load(str(path), load_external_data=False)
    locations: list[str] = []
    for init in _all_initializers(proto.graph):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next(e.value for e in init.external_data if e.key == "location")
            if loc not in locations:
                locations.append(loc)
    return (path, *(path.parent / loc for loc in locations))


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def _describe(path: Path, *, spec: ArchSpec, bitwidth: int, opset: int, input_names: tuple[str, ...],
              output_names: tuple[str, ...], cache_spec: tuple[CacheInput, ...], logits_dtype: str,
              quantized_ops: tuple[str, ...], embedding_quantized: bool = False,
              lm_head_quantized: bool = False, made_by: str = "traced", graph: str = "plain",
              max_positions: int = 0, graph_note: str = "", tied_storage: str | None = None) -> ExportedModel:
    files = _model_files(path)
    if tied_storage is None:
        tied_storage = "duplicated" if spec.tied_embeddings else "untied"
    exported = ExportedModel(
        path=path, files=files, total_bytes=sum(f.stat().st_size for f in files),
        input_names=input_names, output_names=output_names, cache_spec=cache_spec,
        logits_dtype=logits_dtype, vocab_size=spec.vocab_size, bitwidth=bitwidth, opset=opset, spec=spec,
        tied_storage=tied_storage, quantized_ops=quantized_ops,  # type: ignore[arg-type]
        embedding_quantized=embedding_quantized, lm_head_quantized=lm_head_quantized, made_by=made_by,  # type: ignore[arg-type]
        graph=graph, max_positions=max_positions, graph_note=graph_note,  # type: ignore[arg-type]
    )
    (path.parent / MANIFEST_FILE).write_text(json.dumps({**exported.to_dict(), "export_format": EXPORT_FORMAT},
                                                        indent=1))
    return exported


def _check_io(exported: ExportedModel) -> None:
    """The file's inputs and outputs are the names, dtypes and shapes the result promises."""
    proto = onnx.load(str(exported.path), load_external_data=False)
    names_in = tuple(i.name for i in proto.graph.input)
    names_out = tuple(o.name for o in proto.graph.output)
    if names_in != exported.input_names or names_out != exported.output_names:
        raise ExportError(
            f"exported graph has inputs {names_in} and outputs {names_out}; "
            f"expected {exported.input_names} and {exported.output_names}"
        )
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
              for i in [*proto.graph.input, *proto.graph.output]}
    for c in exported.cache_spec:
        if dtypes[c.name] != c.dtype or dtypes[c.output] != c.dtype:
            raise ExportError(f"{c.name} is {dtypes[c.name]}, expected {c.dtype}")
    if dtypes["logits"] != exported.logits_dtype:
        raise ExportError(f"logits are {dtypes['logits']}, expected {exported.logits_dtype}")


# --- quantization -------------------------------------------------------------------------------


def quantize(exported: ExportedModel, bitwidth: int, out_dir: Path) -> ExportedModel:
    """Quantize an fp32 export to ``bitwidth`` in ``out_dir`` with ONNX Runtime's tools.

    32: the fp32 files themselves (copied when ``out_dir`` is elsewhere); 16: fp16 weights and
    activations, fp16 cache and logits; 8: int8 weights of every MatMul and of the embedding
    Gather, activations quantized dynamically; 4: int4 weight-only MatMulNBits (block 32) and the
    embedding as GatherBlockQuantized.
    """
    if bitwidth not in BITWIDTHS:
        raise ExportError(f"bitwidth must be one of {list(BITWIDTHS)}, got {bitwidth!r}")
    if exported.bitwidth != 32:
        raise ExportError(f"quantize takes an fp32 export, got one at bitwidth {exported.bitwidth}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bitwidth == 32:
        if out_dir.resolve() == exported.path.parent.resolve():
            return exported
        for f in exported.files:  # the .onnx names its data file relatively: keep the names
            shutil.copy2(f, out_dir / f.relative_to(exported.path.parent))
        return _redescribe(exported, out_dir / exported.path.name)
    if out_dir.resolve() == exported.path.parent.resolve():
        raise ExportError(f"quantize would overwrite its fp32 input in {out_dir}: choose another out_dir")
    path = out_dir / MODEL_FILE
    _remove_model_files(path)
    try:
        with _quiet():
            result = _QUANTIZERS[bitwidth](exported, path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"{bitwidth}-bit quantization of {exported.spec.summary()} failed: {type(e).__name__}: {e}"
        ) from e
    _check_io(result)
    return result


def _redescribe(exported: ExportedModel, path: Path, **changes: Any) -> ExportedModel:
    fields = {k: getattr(exported, k) for k in (
        "spec", "bitwidth", "opset", "input_names", "output_names", "cache_spec", "logits_dtype",
        "quantized_ops", "embedding_quantized", "lm_head_quantized", "made_by", "graph", "max_positions",
        "graph_note", "tied_storage")}
    fields.update(changes)
    return _describe(path, **fields)


def _save(proto: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _quantize_fp16(exported: ExportedModel, path: Path) -> ExportedModel:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(exported.path))
    # keep_io_types=False: the cache and logits become fp16 too (module docstring). The rotary
    # angles are then computed in fp16 as well; measured at positions 192-255 the logit error
    # was no larger than at 0-63, so no node is kept in fp32.
    proto = convert_float_to_float16(proto, keep_io_types=False)
    _save(proto, path)
    cache = tuple(dataclasses.replace(c, dtype="float16") for c in exported.cache_spec)
    return _quantized_result(exported, path, bitwidth=16, cache_spec=cache, logits_dtype="float16")


def _quantize_int8(exported: ExportedModel, path: Path) -> ExportedModel:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-tensor weight scales (ORT's default): per-channel cut the worst logit error of a
    # briefly trained model from 0.16 to 0.02 fp32-logit std (mean KL 3.6e-5 -> 2.2e-5) but its
    # decode was 8% slower (0.28 vs 0.26 ms, 6M-param GQA model, 2 threads), and a search
    # ranks by both. The embedding Gather is quantized too: it ran, and it is a large share of a
    # small model (a 0.1M-param one: 140 kB with it, 183 kB without, same error).
    # Unsigned weights (U8U8), not signed (U8S8): on an x86 CPU without VNNI (AVX2 only) ONNX
    # Runtime multiplies uint8 x int8 with an instruction whose int16 sums saturate, and the
    # int8 error then depends on the host's CPU: 4 `tiny` models at init had a relative logit
    # error of 0.13-0.38 with signed weights on such a CPU against 0.07-0.09 unsigned (and
    # 0.10 at most, signed, on CPUs with VNNI). A search must not score a model worse because
    # of the CPU it happened to run on.
    quantize_dynamic(
        exported.path, path, op_types_to_quantize=["MatMul", "Gather"], per_channel=False,
        weight_type=QuantType.QUInt8, use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},  # leave the attention's activation matmuls alone
    )
    return _quantized_result(exported, path, bitwidth=8)


def _quantize_int4(exported: ExportedModel, path: Path) -> ExportedModel:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # "Gather" joins the default ("MatMul",) so the embedding becomes GatherBlockQuantized (int4,
    # blocks along d_model): left out, the fp32 table dominated a small int4 file (docs/dependencies.md).
    # The quantizer then raises the file's opset to 21, the first with int4 tensors; the ops in
    # our graph mean the same at 21, and ORT's outputs matched. accuracy_level=4 (int8 compute)
    # was the fastest decode (docs/dependencies.md) and its error equalled accuracy_level=0's here.
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(exported.path)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=False,
        accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    _save(quantizer.model.model, path)
    return _quantized_result(exported, path, bitwidth=4)


def _quantized_result(exported: ExportedModel, path: Path, **changes: Any) -> ExportedModel:
    """Describe a quantized file, reading from it which weights left fp32."""
    source = onnx.load(str(exported.path), load_external_data=False)
    target = onnx.load(str(path), load_external_data=False)
    embedding, lm_head = _embedding_and_lm_head(source)
    fp32_before, fp32_after = _fp32_matrices(source), _fp32_matrices(target)
    matmul_weights = {n.input[1] for n in source.graph.node if n.op_type == "MatMul"} & fp32_before
    ops = []
    if matmul_weights - {lm_head} and not (matmul_weights - {lm_head}) & fp32_after:
        ops.append("MatMul")
    if embedding not in fp32_after:
        ops.append("Gather")
    return _redescribe(
        exported, path, opset=_opset(target), quantized_ops=tuple(ops),
        embedding_quantized=embedding not in fp32_after, lm_head_quantized=lm_head not in fp32_after,
        **changes,
    )


def _embedding_and_lm_head(proto: onnx.ModelProto) -> tuple[str, str]:
    """Names of the embedding table (the Gather on input_ids) and the lm_head weight (the MatMul
    that makes the logits) in an fp32 export."""
    embedding = next(n.input[0] for n in proto.graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    lm_head = next(n.input[1] for n in proto.graph.node if "logits" in n.output)
    return embedding, lm_head


def _fp32_matrices(proto: onnx.ModelProto) -> set[str]:
    return {i.name for i in _all_initializers(proto.graph)
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


_QUANTIZERS = {16: _quantize_fp16, 8: _quantize_int8, 4: _quantize_int4}


# --- new weights into an exported graph ----------------------------------------------------------
# Tracing a model (export_onnx) costs seconds to tens of seconds; a trial would pay it twice, for
# the fresh model it measures and for the trained one it scores, and the two graphs differ only in
# their weights. So the trained model's fp32 file is the measured graph with its weights rewritten
# (reweight). Two things make that exact: each parameter is an initializer named by its module
# path in the copy export_onnx traces, and no two parameters share one. The exporter merges
# initializers of equal value (up to 1024 elements), and in a fresh model every norm's weights
# are ones and every LayerNorm bias zeros: fresh_distinct_model moves each by a tiny distinct
# amount before the export that will be reused. Latency does not depend on weight values.
# reweight checks both conditions and then ORT's logits against torch's before it returns.

_PARAM_PREFIX = "model."  # _FlatCache holds the traced copy as .model


def fresh_distinct_model(spec: ArchSpec, seed: int = 0) -> Decoder:
    """A fresh model (``build_model``) whose export ``reweight`` can later take trained weights
    into: every parameter of up to 1024 elements, norms' ones and LayerNorm's zeros among them, is
    moved by a distinct amount of about 1e-3 (relative to 1), so the exporter keeps one
    initializer per parameter. For measuring latency, which does not depend on weight values."""
    model = build_model(spec, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() <= 1024:
                p.add_(torch.rand(p.shape, generator=g) * 1e-3 + 1e-4)
    return model


def reweight(template: ExportedModel, model: Decoder, out_dir: Path, *, atol: float = 1e-3) -> ExportedModel:
    """``model``'s fp32 export, made by writing its weights into ``template`` (an fp32
    ``export_onnx`` of a model of the same spec) instead of tracing again. Raises ExportError when
    the template cannot take them (a parameter merged with another or missing, a shape that
    differs) or when ONNX Runtime's logits then differ from torch's by more than ``atol``, relative
    to the largest logit; the caller then traces (``export_onnx``)."""
    if template.bitwidth != 32:
        raise ExportError(f"reweight takes an fp32 export as its template, got one at bitwidth {template.bitwidth}")
    if template.spec != model.spec:
        raise ExportError(f"the template was exported for {template.spec.summary()}, "
                          f"the model is {model.spec.summary()}")
    m = _export_copy(model)  # what export_onnx traces: parameter names as in the graph
    weights = {_PARAM_PREFIX + k: v.numpy() for k, v in m.named_parameters()}
    proto = onnx.load(str(template.path))
    inits = {i.name: i for i in proto.graph.initializer}
    missing = sorted(set(weights) - set(inits))
    if missing:
        raise ExportError(f"template graph has no initializer for {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''} (merged by the exporter?)")
    for name, value in weights.items():
        init = inits[name]
        if tuple(init.dims) != value.shape or init.data_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"initializer {name} is {tuple(init.dims)}, the model's weight {value.shape}")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    _remove_model_files(path)
    _save(proto, path)
    exported = _redescribe(template, path, made_by="reweighted")
    _check_logits(exported, m, atol)
    return exported


def _check_logits(exported: ExportedModel, m: Decoder, atol: float) -> None:
    """ORT's logits of a short prefill and one decode step against torch's, on ``m`` (a CPU fp32
    eval model, as _export_copy makes)."""
    spec = m.spec
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (1, min(8, spec.context_length)))
    with torch.no_grad():
        want, cache = m.forward_cached(torch.from_numpy(ids[:, :-1]), m.empty_cache(1))
        want_step, _ = m.forward_cached(torch.from_numpy(ids[:, -1:]), cache)
    session = ort_session(exported)
    got, ort_cache = run_cached(session, exported, ids[:, :-1], None)
    got_step, _ = run_cached(session, exported, ids[:, -1:], ort_cache)
    scale = max(1.0, float(np.abs(want.numpy()).max()))
    err = max(float(np.abs(got - want.numpy()).max()), float(np.abs(got_step - want_step.numpy()).max())) / scale
    if not err <= atol:
        raise ExportError(f"reweighted graph's logits differ from torch's by {err:.2e} (relative), over {atol:g}")


# --- the whole stage ----------------------------------------------------------------------------


def export_spec(spec: ArchSpec, out_dir: Path, *, model: Decoder | None = None, seed: int = 0,
                like: ExportedModel | None = None, progress: Callable[[str], None] | None = None,
                graph: Literal["plain", "deploy"] = "plain") -> ExportedModel:
    """Export ``model`` (or a fresh one built from ``spec`` and ``seed``) and quantize it to
    ``spec.bitwidth``: the deployed model in ``out_dir``, its fp32 source in ``out_dir/fp32``.

    ``graph="deploy"``: the deployment graph (``nas.stages.deploy``: fused contrib ops, built from
    the weights, no fp32 folder) where the spec allows it; where it does not, the plain graph as
    below, its ``graph_note`` saying why. ``like``: an earlier ``export_spec`` of the same spec (its
    files still on disk) whose plain graph takes ``model``'s weights (``reweight``) instead of a
    new trace; if it cannot, the model is traced as without it. The deployment graph needs no
    ``like``: building it is cheap. ``progress`` hears which step is running (seconds each)."""
    say = progress or (lambda step: None)
    if spec.bitwidth not in BITWIDTHS:
        raise ExportError(f"bitwidth must be one of {list(BITWIDTHS)}, got {spec.bitwidth!r}")
    if graph not in ("plain", "deploy"):
        raise ExportError(f"graph must be 'plain' or 'deploy', got {graph!r}")
    if model is None:
        model = build_model(spec, seed)
    elif model.spec != spec:
        raise ExportError(f"the model was built for {model.spec.summary()}, not for {spec.summary()}")
    out_dir = Path(out_dir)
    note = ""
    if graph == "deploy":
        from nas.stages.deploy import build_deploy, unsupported_reason  # it imports this module

        reason = unsupported_reason(spec)
        if reason is None:
            say("building the deployment graph")
            return build_deploy(model, out_dir)
        note = f"plain graph: {reason}"
    fp32_dir = out_dir if spec.bitwidth == 32 else out_dir / "fp32"
    fp32 = None
    if like is not None and like.graph == "plain":
        say("writing the weights into the measured graph")
        try:
            fp32 = reweight(fp32_source(like), model, fp32_dir)
        except (ExportError, OSError, onnx.checker.ValidationError) as e:
            logging.getLogger(__name__).info("tracing again: %s", e)
    if fp32 is None:
        say("tracing the model to ONNX")
        fp32 = export_onnx(model, fp32_dir)
    if spec.bitwidth == 32:
        deployed = fp32
    else:
        say(f"quantizing to {spec.bitwidth} bits")
        deployed = quantize(fp32, spec.bitwidth, out_dir)
    return _redescribe(deployed, deployed.path, graph_note=note) if note else deployed


def fp32_source(deployed: ExportedModel) -> ExportedModel:
    """The fp32 export an ``export_spec`` result was quantized from (itself at 32 bits)."""
    return deployed if deployed.bitwidth == 32 else load_exported(deployed.path.parent / "fp32")


# --- running --------------------------------------------------------------------------------------


def ort_session(exported: ExportedModel, threads: int = 1) -> ort.InferenceSession:
    """A CPU session on the exported file, with ``threads`` intra-op threads and ORT's warnings off."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # one graph, run step by step: parallel branches only add noise
    opts.log_severity_level = 3
    return ort.InferenceSession(str(exported.path), opts, providers=["CPUExecutionProvider"])


def run_cached(
    session: ort.InferenceSession, exported: ExportedModel, input_ids: np.ndarray,
    cache: dict[str, np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One prefill (``cache`` None: empty) or decode step: (B, T) ids -> logits (B, T, vocab) and
    the cache of all tokens so far, keyed by the past input names so it can be fed back."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ExportError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    if cache is None:
        cache = exported.empty_cache(ids.shape[0])
    batch, seq = ids.shape
    past = cache[exported.cache_spec[0].name].shape[exported.cache_spec[0].past_axis] if exported.cache_spec else 0
    if exported.max_positions and past + seq > exported.max_positions:
        raise ExportError(f"{past + seq} positions, over the graph's {exported.max_positions} (its context length)")
    if exported.graph == "gqa" and past > 0 and seq > 1 and batch > 1:
        # GroupQueryAttention takes several new tokens after a non-empty cache only for batch 1
        # (docs/dependencies.md): feed them one at a time, which gives the same logits.
        steps = []
        for t in range(seq):
            logits, cache = run_cached(session, exported, ids[:, t : t + 1], cache)
            steps.append(logits)
        return np.concatenate(steps, axis=1), cache
    feeds: dict[str, np.ndarray] = {"input_ids": ids, **step_inputs(exported.graph, batch, past, seq)}
    for c in exported.cache_spec:
        feeds[c.name] = cache[c.name]
    outputs = session.run(list(exported.output_names), feeds)
    by_name = dict(zip(exported.output_names, outputs, strict=True))
    return by_name["logits"], {c.name: by_name[c.output] for c in exported.cache_spec}
