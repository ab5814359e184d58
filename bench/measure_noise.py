"""What makes a decode measurement noisy on this machine: the measuring loop's settings against
the machine's own noise floor, side by side in one run.

    .venv/bin/python bench/measure_noise.py [--quick] [--space gqa_small] [-n 4] [--rounds 3]
        [--repeats 30] [--out bench/results/measure_noise.json]

Two kinds of figures, interleaved round by round so that drift on the shared machine falls on all:

- the floor: a numpy matrix-vector product (fp32, one BLAS thread, pinned to the last core) at
  weight sizes from L2-resident to out of L3, timed the same way. No ONNX Runtime, no model: the
  spread any code gets here.
- decode steps of n architectures drawn from the space (deployment graph at their drawn bitwidth,
  the host workload's context), each variant in a fresh pinned process as the measuring worker
  runs them (nas.stages.measure_worker: ORT_SEQUENTIAL, arena off, the cache filled by a real
  prefill). Variants: today's worker settings (2 threads on both cores, 3 warm-up calls); 20
  warm-up calls; ONNX Runtime's thread spinning off; outputs bound once (IO binding) instead of
  copied out each call; Python's garbage collector off while timing; 1 thread on the last core
  (the first left to the machine).

Per variant: the coefficient of variation within a run (std / mean), two robust spreads (the
interquartile range and p90 - median, over the median), and the change of the median from
round to round ((max - min) / min over the rounds, per model). The median over models of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the floor is one thread; set before numpy loads BLAS
import numpy as np
from _common import machine

# The decode loop of nas.stages.measure_worker.run, with the settings a variant changes. It is a
# copy (the worker's own run() has no such switches): kept in step by hand, checked by the
# "today" variant's median against the worker's own measurement (printed as "worker").
LOOP = r'''
import gc, json, os, sys, time
import numpy as np, onnxruntime as ort
from nas.stages.feeds import step_inputs
a = json.loads(sys.argv[1])
os.sched_setaffinity(0, set(a["cores"]))
man = json.load(open(os.path.join(a["model_dir"], "model.json")))
so = ort.SessionOptions()
so.intra_op_num_threads = a["threads"]
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.enable_cpu_mem_arena = False
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
if not a["spin"]:
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(os.path.join(a["model_dir"], man["path"]), so, providers=["CPUExecutionProvider"])
graph, cs, ctx = man.get("graph", "plain"), man["cache_spec"], a["context"]
rng = np.random.default_rng(0)
vocab = man["vocab_size"]
def cache(past):
    return {c["name"]: np.zeros([{"batch": 1, "past": past}.get(d, d) if isinstance(d, str) else d
                                 for d in c["shape"]], dtype=c["dtype"]) for c in cs}
presents = s.run([c["output"] for c in cs], {"input_ids": rng.integers(0, vocab, (1, ctx)), **cache(0),
                                             **step_inputs(graph, 1, 0, ctx)})
feeds = {"input_ids": rng.integers(0, vocab, (1, 1)), **step_inputs(graph, 1, ctx, 1)}
feeds.update({c["name"]: p for c, p in zip(cs, presents)})
if a["iob"]:
    io = s.io_binding()
    for k, v in feeds.items():
        io.bind_cpu_input(k, v)
    for o in s.get_outputs():
        io.bind_output(o.name, "cpu")
    s.run_with_iobinding(io)
    bound = io.get_outputs()
    io.clear_binding_outputs()
    for o, v in zip(s.get_outputs(), bound):
        io.bind_ortvalue_output(o.name, v)
    step = lambda: s.run_with_iobinding(io)
else:
    step = lambda: s.run(None, feeds)
for _ in range(a["warmup"]):
    step()
if not a["gc"]:
    gc.collect()
    gc.disable()
xs = []
for _ in range(a["repeats"]):
    t0 = time.perf_counter_ns()
    step()
    xs.append((time.perf_counter_ns() - t0) / 1e6)
print(json.dumps(xs))
'''

VARIANTS: dict[str, dict[str, Any]] = {
    "today (2 threads, warm-up 3)": {},
    "warm-up 20": {"warmup": 20},
    "spinning off": {"spin": False},
    "IO binding": {"iob": True},
    "gc off": {"gc": False},
    "1 thread, last core": {"threads": 1, "last_core": True},
}
FLOOR_SIZES = {"256 KiB": 256, "1 MiB": 512, "4 MiB": 1024, "16 MiB": 2048, "64 MiB": 4096}


def stats(xs: list[float]) -> dict[str, float]:
    x = np.asarray(xs)
    med = float(np.median(x))
    q25, q75, p90 = np.percentile(x, [25, 75, 90])
    return {"median_ms": med, "cv": float(x.std(ddof=1) / x.mean()), "iqr_over_median": float((q75 - q25) / med),
            "p90_over_median": float(p90 / med - 1), "max_over_median": float(x.max() / med)}


def floor(n: int, repeats: int) -> list[float]:
    """A pinned, single-threaded numpy matrix-vector product over an n x n fp32 weight."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    x = np.ones(n, dtype=np.float32)
    inner = max(1, 2048 // n)  # each sample at least one 16 MiB sweep's worth of work
    for _ in range(20):
        a @ x
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            a @ x
        xs.append((time.perf_counter_ns() - t0) / 1e6)
    return xs


def run_loop(model_dir: Path, context: int, variant: dict[str, Any], repeats: int, cores: list[int]) -> list[float]:
    threads = variant.get("threads", 2)
    use = cores[-threads:] if variant.get("last_core") else cores[:threads]
    args = {"model_dir": str(model_dir), "context": context, "repeats": repeats, "threads": threads, "cores": use,
            "warmup": variant.get("warmup", 3), "spin": variant.get("spin", True), "iob": variant.get("iob", False),
            "gc": variant.get("gc", True)}
    r = subprocess.run([sys.executable, "-c", LOOP, json.dumps(args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)), timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="gqa_small")
    ap.add_argument("-n", type=int, default=4, help="architectures drawn from the space")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="one tiny model, 2 rounds of few repeats, 2 floor sizes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "measure_noise.json")
    args = ap.parse_args()
    sizes = FLOOR_SIZES
    if args.quick:
        args.space, args.n, args.rounds, args.repeats = "tiny", 1, 2, 6
        sizes = dict(list(FLOOR_SIZES.items())[:2])

    import onnxruntime as ort

    from nas.search.pipeline import host_setup
    from nas.spec.space import load_space
    from nas.stages.export import export_spec
    from nas.stages.measure import measure_local, pinned_cores

    host = host_setup().profile
    cores = pinned_cores(max(2, host.runtime.threads))
    if len(cores) < 2:
        raise SystemExit("this benchmark needs 2 cores (it compares 2 threads with 1 on a core left free)")
    space = load_space(args.space)
    rng = random.Random(args.seed)
    rows: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for i in range(args.n):
            spec = space.sample(rng)
            exported = export_spec(spec, Path(tmp) / str(i), graph="deploy")
            models.append((spec, exported.path.parent, host.workload.decode_past_tokens(spec)))
            print(f"model {i}: {spec.summary()} ({exported.graph} graph)", flush=True)
        worker = {}
        for r in range(args.rounds):
            here = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cores[-1]})
            for label, n in sizes.items():
                rows.setdefault(f"floor: numpy gemv {label}", {}).setdefault("all", []).append(
                    stats(floor(n, max(50, 3 * args.repeats))))
            os.sched_setaffinity(0, here)
            for i, (spec, model_dir, context) in enumerate(models):
                for name, v in VARIANTS.items():
                    rows.setdefault(name, {}).setdefault(str(i), []).append(
                        stats(run_loop(model_dir, context, v, args.repeats, cores)))
                if r == 0:  # the worker itself, once: the copy above must time what it times
                    worker[str(i)] = measure_local(model_dir, spec, host, repeats=args.repeats).decode.median_ms
            gc.collect()
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    summary = {}
    for name, by_model in rows.items():
        runs = [s for v in by_model.values() for s in v]
        out = {k: float(np.median([s[k] for s in runs])) for k in ("cv", "iqr_over_median", "p90_over_median",
                                                                   "max_over_median")}
        out["cv_max"] = float(max(s["cv"] for s in runs))
        if not name.startswith("floor"):
            out["run_to_run"] = float(np.median([
                (max(s["median_ms"] for s in v) - min(s["median_ms"] for s in v)) / min(s["median_ms"] for s in v)
                for v in by_model.values()]))
            out["median_ms"] = {m: float(np.median([s["median_ms"] for s in v])) for m, v in by_model.items()}
        summary[name] = out
    print(f"\n{'':34s} {'CV':>7s} {'CV max':>7s} {'IQR/med':>8s} {'p90/med-1':>9s} {'max/med':>8s} {'run-to-run':>10s}")
    for name, s in summary.items():
        rr = f"{s['run_to_run']:10.1%}" if "run_to_run" in s else f"{'':10s}"
        print(f"{name:34s} {s['cv']:7.1%} {s['cv_max']:7.1%} {s['iqr_over_median']:8.1%} {s['p90_over_median']:9.1%} "
              f"{s['max_over_median']:8.2f} {rr}")
    today = summary["today (2 threads, warm-up 3)"]["median_ms"]
    print("worker's own decode median (round 1) vs the loop's 'today' median over rounds:",
          {m: (round(worker[m], 3), round(today[m], 3)) for m in worker})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(onnxruntime=ort.__version__, numpy=np.__version__),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"bench/measure_noise.py{' --quick' if args.quick else ''} --space {args.space} -n {args.n} "
                   f"--seed {args.seed} --rounds {args.rounds} --repeats {args.repeats}",
        "models": [spec.summary() for spec, _, _ in models], "worker_decode_ms_round1": worker,
        "summary": summary, "runs": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
