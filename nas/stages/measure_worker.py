"""The measuring process: run one exported model in ONNX Runtime and print its figures as JSON.

Started by :func:`nas.stages.measure.measure_local` as ``python -m nas.stages.measure_worker '<json>'``, one
process per measurement, so that a crash, a hang or an out-of-memory kill in ONNX Runtime ends
only this process. It imports numpy and onnxruntime only (no torch, no nas modules that pull it
in), so its peak resident memory is what a deployment's inference process would hold: the
runtime plus the model, its arena disabled so that growth is the model's own. Either graph kind
(plain or deployment, the manifest's ``graph``) is fed by ``nas.stages.feeds``, which is numpy only.

Protocol: argv[1] is a JSON object (model_dir, threads, provider, prompt_tokens, context_tokens,
batch, warmup, repeats, max_phase_seconds, cores); stdout's last line is a JSON object with the
samples, memory and provenance; a non-zero exit means failure, with the reason on stderr.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from nas.stages.feeds import step_inputs  # numpy only: the rule run_cached feeds a graph by


def _status_bytes(key: str) -> int | None:
    """VmHWM / VmRSS of this process from /proc (kB there); None where /proc or the key is
    missing: a figure that was not taken is absent, never 0 (which would meet any budget)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS so the peak excludes what imports briefly touched."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    # At least 5 repeats for a spread; fewer than asked only when a phase would run too long.
    while len(samples) < repeats and (len(samples) < 5 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def run(args: dict[str, Any]) -> dict[str, Any]:
    if args.get("cores"):
        os.sched_setaffinity(0, set(args["cores"]))  # another process's load must not land on us
    model_dir = Path(args["model_dir"])
    manifest = json.loads((model_dir / "model.json").read_text())
    model_path = model_dir / manifest["path"]
    cache_spec = manifest["cache_spec"]
    graph = manifest.get("graph", "plain")  # manifests written before the deployment graph are plain

    peak_reset = _reset_peak()
    baseline_rss = _status_bytes("VmRSS")

    available = ort.get_available_providers()
    provider = args["provider"]
    if provider not in available:
        raise RuntimeError(f"execution provider {provider} is not available here; available: {', '.join(available)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(args["threads"])
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(model_path), so, providers=[provider])
    load_s = time.perf_counter() - t0

    batch, prompt, context = int(args["batch"]), int(args["prompt_tokens"]), int(args["context_tokens"])
    rng = np.random.default_rng(0)
    vocab = int(manifest["vocab_size"])

    def cache(past: int) -> dict[str, np.ndarray]:
        feeds = {}
        for c in cache_spec:
            shape = [{"batch": batch, "past": past}.get(d, d) if isinstance(d, str) else d for d in c["shape"]]
            feeds[c["name"]] = np.zeros(shape, dtype=c["dtype"])
        return feeds

    output_names = [c["output"] for c in cache_spec]
    prompt_ids = rng.integers(0, vocab, size=(batch, prompt), dtype=np.int64)
    empty = cache(0)
    prefill_feeds = {"input_ids": prompt_ids, **empty, **step_inputs(graph, batch, 0, prompt)}
    prefill = _timed(lambda: session.run(None, prefill_feeds), args["warmup"], args["repeats"],
                     args["max_phase_seconds"])

    # The decode cache is filled by a real prefill of `context` tokens, then every timed step
    # decodes one token on top of the same cache, so the context length stays fixed.
    context_ids = rng.integers(0, vocab, size=(batch, context), dtype=np.int64)
    presents = session.run(output_names, {"input_ids": context_ids, **empty, **step_inputs(graph, batch, 0, context)})
    decode_feeds = {"input_ids": rng.integers(0, vocab, size=(batch, 1), dtype=np.int64),
                    **step_inputs(graph, batch, context, 1)}
    decode_feeds.update({c["name"]: p for c, p in zip(cache_spec, presents, strict=True)})
    del presents
    decode = _timed(lambda: session.run(None, decode_feeds), args["warmup"], args["repeats"],
                    args["max_phase_seconds"])

    files = [model_dir / f for f in manifest["files"]]
    return {
        "prefill_ms": prefill,
        "decode_ms": decode,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "baseline_rss_bytes": baseline_rss,
        "peak_reset": peak_reset,
        "model_bytes": sum(f.stat().st_size for f in files),
        "session_load_s": load_s,
        "provenance": {
            "cpu": cpu_model(),
            "machine": platform.machine(),
            "hostname": platform.node(),
            "threads": int(args["threads"]),
            "cores": sorted(os.sched_getaffinity(0)),
            "execution_provider": provider,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "opset": manifest.get("opset"),
            "graph": graph,
            "made_by": manifest.get("made_by"),
            "graph_note": manifest.get("graph_note", ""),  # why a plain graph, where one was used
            "arena": False,
        },
    }


def _matmul_model(path: Path, m: int, k: int, n: int, dtype: str) -> None:
    """A one-node graph: y = x @ W with W a constant, for the rate of ORT's own kernels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if dtype == "int8":
        # MatMulInteger: uint8 activations times uint8 weights, int32 out (what int8 models run:
        # nas.stages.export quantizes weights unsigned).
        w = numpy_helper.from_array(rng.integers(0, 255, size=(k, n), dtype=np.uint8), "W")
        node = helper.make_node("MatMulInteger", ["x", "W"], ["y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np_dtype), "W")
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
        x_type = y_type = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", x_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def calibrate(args: dict[str, Any]) -> dict[str, Any]:
    """What ONNX Runtime attains here: read bandwidth (a matrix-vector product over a 256 MiB
    weight, the shape of a decode step) and matrix-multiply rate per dtype (the shape of a prefill).

    Each rate is from the fastest of the repeats, not their median: other work on the machine only
    ever slows a run, so the fastest is the closest to what the hardware attains (as STREAM
    reports its best). A median taken on a busy machine once cached a bandwidth 2.5x below the
    quiet one, and with it target estimates 2.5x too fast (a target's figure is the host's
    measurement times host bandwidth / target bandwidth)."""
    import tempfile

    if args.get("cores"):
        os.sched_setaffinity(0, set(args["cores"]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(args["threads"])
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    provider = args["provider"]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def rate(name: str, m: int, k: int, n: int, dtype: str) -> float:
            path = Path(tmp) / f"{name}.onnx"
            _matmul_model(path, m, k, n, dtype)
            session = ort.InferenceSession(str(path), so, providers=[provider])
            if dtype == "int8":
                x = rng.integers(0, 255, size=(m, k), dtype=np.uint8)
            else:
                x = rng.standard_normal((m, k)).astype(np.float16 if dtype == "fp16" else np.float32)
            samples = _timed(lambda: session.run(None, {"x": x}), 3, int(args["repeats"]), args["max_phase_seconds"])
            return float(np.min(samples)) / 1e3  # seconds

        k = n = 8192
        t = rate("gemv", 1, k, n, "fp32")
        out["memory_bandwidth_gbs"] = k * n * 4 / t / 1e9
        m, k, n = 256, 2048, 2048
        out["peak_gflops"] = {d: 2 * m * k * n / rate(f"gemm_{d}", m, k, n, d) / 1e9 for d in ("fp32", "fp16", "int8")}
    out["provenance"] = {"cpu": cpu_model(), "threads": int(args["threads"]), "execution_provider": provider,
                         "onnxruntime": ort.__version__, "cores": sorted(os.sched_getaffinity(0))}
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    try:
        result = calibrate(args) if args.get("mode") == "calibrate" else run(args)
    except Exception as e:  # reported to the parent, which records the reason
        print(f"{type(e).__name__}: {e}".replace("\n", " ")[:2000], file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
