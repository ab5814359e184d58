"""Plain vs deployment graph per bitwidth on a ~30M gqa_small-like model, measured in one run.

    PYTHONPATH=. .venv/bin/python bench/deploy_graph.py [--quick] [--rounds 2] [--repeats 30] [--tied]
        [--attention gqa|mla] [--genai /tmp/ogavenv/bin/python] [--out bench/results/deploy_graph.json]

For each bitwidth (fp32, fp16, int8, int4) the plain graph (nas.stages.export: dynamo trace, then
ONNX Runtime's quantizers) and the deployment graph (nas.stages.deploy: fused contrib ops) of
the same weights are measured by the project's own worker (nas.stages.measure.measure_local: a
fresh pinned process, host profile's workload), interleaved (plain, deploy, deploy, plain, ...)
so that drift on the shared machine falls on both. Reported per graph: decode ms/token (median,
CV), prefill ms, decode over the bandwidth roofline (the bytes a step reads, ArchSpec.decode_bytes,
over the host's measured read bandwidth), nodes per decode step (of the graph ONNX Runtime runs
after its own optimizations, saved through SessionOptions.optimized_model_filepath, and of the
file), file size and peak RSS. ``--attention mla``: the same shape with multi-head latent
attention (latent 128, rotary 32), whose deployment graph is the absorbed one (nas.stages.deploy);
its roofline counts the bytes each graph really reads (nas.spec.latency.decode_step: the
absorbed weights and the doubled latent cache for the deployment graph, the architecture's for
the plain one). Goals (issue 14): decode <= 1.5x the roofline at every bitwidth;
int4 >= 1.6x faster than int8 (deployment graph).

With ``--genai PYTHON`` (an interpreter that has onnxruntime-genai 0.18's model builder), the same
weights also go through the builder (a Hugging Face folder from nas.stages.hf; int4 and fp32, CPU)
and its graph's node count and decode time are taken beside ours, in this process with the same
session options, alternating: a reference, not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import machine, spread

from nas.search.pipeline import host_setup
from nas.spec.arch import ArchSpec
from nas.spec.latency import decode_step
from nas.stages.deploy import build_deploy
from nas.stages.export import export_onnx, quantize
from nas.stages.feeds import step_inputs
from nas.stages.measure import measure_local
from nas.stages.model import build_model

BITS = (32, 16, 8, 4)
NAMES = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def bench_spec(tied: bool, quick: bool = False, attention: str = "gqa") -> ArchSpec:
    """A gqa_small point of ~30M parameters (the size the builder was measured at: docs/dependencies.md);
    ``quick``: a 0.1M-parameter one of the same shape, to check the script runs. ``attention="mla"``:
    the same with an attention_kinds-style latent (rank 128, rotary 32; quick: 24 and 8)."""
    heads = ({"attention": "gqa", "n_kv_heads": 2} if attention == "gqa" else
             {"attention": "mla", "mla_latent_rank": 24 if quick else 128, "mla_rope_dim": 8 if quick else 32})
    if quick:
        return ArchSpec(vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, tied_embeddings=tied,
                        context_length=64, **heads)
    return ArchSpec(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, head_dim=64, ffn="gated", ffn_ratio=3.0,
                    activation="silu", norm="rmsnorm", tied_embeddings=tied, context_length=256, **heads)


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()  # as nas.stages.measure_worker sets them
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def node_counts(path: Path, threads: int) -> dict[str, int | str]:
    """Nodes in the file, and in the graph ONNX Runtime runs after its optimizations."""
    file_nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options(threads)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            optimized: int | str = len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
        except Exception as e:  # a figure we could not take is reported, not guessed
            optimized = f"not saved: {type(e).__name__}: {str(e)[:120]}"
    return {"file": file_nodes, "ort_optimized": optimized}


def _time(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _decode_feeds_ours(session: ort.InferenceSession, manifest: dict, context: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cache = {c["name"]: np.zeros([{"batch": 1, "past": 0}.get(d, d) for d in c["shape"]], dtype=c["dtype"])
             for c in manifest["cache_spec"]}
    ids = rng.integers(0, manifest["vocab_size"], (1, context), dtype=np.int64)
    outs = session.run([c["output"] for c in manifest["cache_spec"]],
                       {"input_ids": ids, **cache, **step_inputs(manifest.get("graph", "plain"), 1, 0, context)})
    feeds = {"input_ids": rng.integers(0, manifest["vocab_size"], (1, 1), dtype=np.int64),
             **step_inputs(manifest.get("graph", "plain"), 1, context, 1)}
    feeds.update({c["name"]: o for c, o in zip(manifest["cache_spec"], outs, strict=True)})
    return feeds


def _decode_feeds_genai(session: ort.InferenceSession, spec: ArchSpec, context: int) -> dict[str, np.ndarray]:
    """The builder's interface: input_ids, attention_mask (B, total), past_key_values.i.key/value."""
    rng = np.random.default_rng(0)
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    dtype = np.float16 if "float16" in past[0].type else np.float32
    empty = {i.name: np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), dtype=dtype) for i in past}
    ids = rng.integers(0, spec.vocab_size, (1, context), dtype=np.int64)
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, context), np.int64),
                                               **empty}), strict=True))
    feeds = {"input_ids": rng.integers(0, spec.vocab_size, (1, 1), dtype=np.int64),
             "attention_mask": np.ones((1, context + 1), np.int64)}
    feeds.update({i.name: outs[i.name.replace("past_key_values", "present")] for i in past})
    return feeds


def genai_reference(model, spec: ArchSpec, work: Path, python: str, ours: dict[int, Path], threads: int,
                    context: int, repeats: int) -> list[dict]:
    """The builder's graph of the same weights beside ours: nodes and in-process decode time."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nas.stages.hf import save_hf

    tok = Tokenizer(models.BPE())  # the builder loads a tokenizer from the folder; any will do
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(work / "tokenizer.json"))
    hf = save_hf(model, work / "hf", tokenizer_json=work / "tokenizer.json", eos_token="<eos>", eos_token_id=0)
    rows = []
    for bits, precision in ((4, "int4"), (32, "fp32")):
        out = work / f"genai_{precision}"
        t0 = time.perf_counter()
        proc = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                               "-p", precision, "-e", "cpu"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            rows.append({"bitwidth": bits, "error": proc.stderr.strip().splitlines()[-1][:300]})
            continue
        build_s = time.perf_counter() - t0
        g_path = out / "model.onnx"
        g_sess = ort.InferenceSession(str(g_path), _session_options(threads), providers=["CPUExecutionProvider"])
        o_sess = ort.InferenceSession(str(ours[bits] / "model.onnx"), _session_options(threads),
                                      providers=["CPUExecutionProvider"])
        g_feeds = _decode_feeds_genai(g_sess, spec, context)
        o_feeds = _decode_feeds_ours(o_sess, json.loads((ours[bits] / "model.json").read_text()), context)
        g_ms, o_ms = [], []
        run_genai = lambda s=g_sess, f=g_feeds: s.run(None, f)  # noqa: E731
        run_ours = lambda s=o_sess, f=o_feeds: s.run(None, f)  # noqa: E731
        for _ in range(10):  # alternate the two, in 10 chunks
            g_ms += _time(run_genai, 2, max(2, repeats // 5))
            o_ms += _time(run_ours, 2, max(2, repeats // 5))
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
        rows.append({"bitwidth": bits, "builder_s": build_s, "genai_nodes": node_counts(g_path, threads),
                     "ours_nodes": node_counts(ours[bits] / "model.onnx", threads),
                     "genai_decode_ms": spread(g_ms), "ours_decode_ms": spread(o_ms),
                     "genai_decode_p10_ms": float(np.percentile(g_ms, 10)),
                     "ours_decode_p10_ms": float(np.percentile(o_ms, 10)), "genai_file_mb": size / 1e6,
                     "ours_file_mb": sum(f.stat().st_size for f in ours[bits].iterdir()
                                         if f.name.startswith("model.onnx")) / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round, few repeats")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--attention", choices=["gqa", "mla"], default="gqa")
    ap.add_argument("--genai", default=None, help="python with onnxruntime-genai's builder (reference only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy_graph.json")
    args = ap.parse_args()
    if args.genai and args.attention == "mla":
        ap.error("--genai takes --attention gqa only: the builder has no MLA")
    if args.quick:
        args.rounds, args.repeats = 1, 6

    calibrated = host_setup()
    host, cal = calibrated.profile, calibrated.cal
    threads = host.runtime.threads
    spec = bench_spec(args.tied, args.quick, args.attention)
    print(f"{spec.summary()}: {spec.params() / 1e6:.1f}M params; "
          f"host read bandwidth {cal.memory_bandwidth_gbs:.1f} GB/s")
    model = build_model(spec, seed=0).eval()
    rows: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dirs: dict[tuple[int, str], Path] = {}
        t0 = time.perf_counter()
        plain32 = export_onnx(model, work / "plain32")
        plain_s = time.perf_counter() - t0
        for bits in BITS:
            t0 = time.perf_counter()
            plain = plain32 if bits == 32 else quantize(plain32, bits, work / f"plain{bits}")
            dirs[bits, "plain"] = plain.path.parent
            quant_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dirs[bits, "deploy"] = build_deploy(model, work / f"deploy{bits}", bits).path.parent
            rows[bits, "plain"] = {"make_s": plain_s + quant_s if bits != 32 else plain_s}
            rows[bits, "deploy"] = {"make_s": time.perf_counter() - t0}
        for key, d in dirs.items():
            rows[key]["nodes"] = node_counts(d / "model.onnx", threads)
        samples: dict[tuple[int, str], list] = {k: [] for k in dirs}
        for r in range(args.rounds):
            for bits in BITS:
                order = ("plain", "deploy") if (r + bits) % 2 == 0 else ("deploy", "plain")
                for kind in order:
                    m = measure_local(dirs[bits, kind], replace(spec, bitwidth=bits), host, repeats=args.repeats)
                    samples[bits, kind].append(m)
                    print(f"round {r + 1} {NAMES[bits]:5s} {kind:6s} decode {m.decode.median_ms:6.3f} ms "
                          f"(cv {m.decode.cv:.1%}) prefill {m.prefill.median_ms:7.2f} ms")
        genai = (genai_reference(model, spec, work, args.genai, {b: dirs[b, "deploy"] for b in BITS}, threads,
                                 host.workload.decode_past_tokens(spec), args.repeats) if args.genai else None)

    past = host.workload.decode_past_tokens(spec)
    table = []
    for (bits, kind), ms in samples.items():
        at = replace(spec, bitwidth=bits)
        # the bytes this graph reads a step: the deployment graph's heads (the same as the
        # architecture's for an unpadded GQA), or the architecture's for the plain graph
        read = decode_step(at, past).bytes if kind == "deploy" else at.decode_bytes(past)
        roofline_ms = read / cal.bandwidth_bytes_per_s * 1e3
        decode = float(np.median([m.decode.median_ms for m in ms]))
        # The fastest tenth of the repeats (pooled over rounds): other work on a shared machine
        # only ever slows a step, so on a loaded host it is the closer figure to a quiet one.
        p10 = float(np.percentile([x for m in ms for x in m.decode.repeats_ms], 10))
        row = {"bitwidth": bits, "graph": kind, **rows[bits, kind],
               "decode_ms": decode, "decode_ms_per_round": [m.decode.median_ms for m in ms],
               "decode_p10_ms": p10, "over_roofline_p10": p10 / roofline_ms,
               "decode_cv_within": [m.decode.cv for m in ms],
               "prefill_ms": float(np.median([m.prefill.median_ms for m in ms])),
               "roofline_ms": roofline_ms, "over_roofline": decode / roofline_ms,
               "file_mb": ms[0].model_bytes / 1e6,
               "peak_rss_mb": float(np.median([m.peak_memory_bytes for m in ms])) / 2**20}
        table.append(row)
    by = {(r["bitwidth"], r["graph"]): r for r in table}
    summary = {
        "speedup_deploy_over_plain": {NAMES[b]: by[b, "plain"]["decode_ms"] / by[b, "deploy"]["decode_ms"]
                                      for b in BITS},
        "int4_over_int8_speedup": {k: by[8, k]["decode_ms"] / by[4, k]["decode_ms"] for k in ("plain", "deploy")},
        "deploy_over_roofline": {NAMES[b]: by[b, "deploy"]["over_roofline"] for b in BITS},
        "deploy_over_roofline_p10": {NAMES[b]: by[b, "deploy"]["over_roofline_p10"] for b in BITS},
        "speedup_deploy_over_plain_p10": {NAMES[b]: by[b, "plain"]["decode_p10_ms"] / by[b, "deploy"]["decode_p10_ms"]
                                          for b in BITS},
        "int4_over_int8_speedup_p10": {k: by[8, k]["decode_p10_ms"] / by[4, k]["decode_p10_ms"]
                                       for k in ("plain", "deploy")},
        "goal_decode_within_1_5x_roofline": {NAMES[b]: by[b, "deploy"]["over_roofline"] <= 1.5 for b in BITS},
        "goal_int4_1_6x_faster_than_int8": by[8, "deploy"]["decode_ms"] / by[4, "deploy"]["decode_ms"] >= 1.6,
    }
    print(f"\n{'':6s}{'graph':8s}{'decode ms':>10s}{'x roof':>8s}{'p10 ms':>8s}{'x roof':>8s}{'prefill':>9s}"
          f"{'nodes':>7s}{'ort':>6s}{'MB':>7s}{'RSS MB':>8s}")
    for r in sorted(table, key=lambda r: (-r["bitwidth"], r["graph"])):
        print(f"{NAMES[r['bitwidth']]:6s}{r['graph']:8s}{r['decode_ms']:10.3f}{r['over_roofline']:8.2f}"
              f"{r['decode_p10_ms']:8.3f}{r['over_roofline_p10']:8.2f}{r['prefill_ms']:9.2f}{r['nodes']['file']:7d}{r['nodes']['ort_optimized']!s:>6.6s}"
              f"{r['file_mb']:7.1f}{r['peak_rss_mb']:8.1f}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    if genai:
        for g in genai:
            print(f"  builder {NAMES[g['bitwidth']]}: {g}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "command": f"bench/deploy_graph.py{' --quick' if args.quick else ''} --rounds {args.rounds} "
                   f"--repeats {args.repeats}"
                   f"{' --tied' if args.tied else ''}{' --attention mla' if args.attention == 'mla' else ''}"
                   f"{' --genai PY' if args.genai else ''}",
        "machine": machine(threads=threads, onnxruntime=ort.__version__, pid=os.getpid()),
        "spec": spec.to_dict(), "params": spec.params(), "workload_past_tokens": past,
        "host_bandwidth_gbs": cal.memory_bandwidth_gbs, "rows": table, "summary": summary, "genai": genai,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
