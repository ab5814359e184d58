"""Search throughput against Ray worker count on this machine: trials per hour.

    .venv/bin/python bench/ray_throughput.py [--trials 8] [--workers 1,2] [--tokens 32768] [--out ...]

A local Ray (all of this machine's CPUs, 1 CPU per trial) runs the same small search (the
`tiny` space on the `host` profile, a 300 kB corpus slice, a fixed token budget per trial) with
1, then 2 workers, each on a fresh database; the local executor (one process, trials one after
another) is the reference, and the Ray runs train the architectures it drew, in its order. Host
calibration and tokenizers are made once by a warm-up search that is not counted, so every timed
run finds them cached. Throughput counts every trial that got past sampling (complete, infeasible
or failed), over the wall time of the run (Ray already up).
Prints a table and writes the figures as JSON. Not a test: figures depend on the machine's load,
which is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import optuna

from nas.search.config import SearchConfig
from nas.search.ray_executor import RayOptions, run_with_ray
from nas.search.study import Search
from nas.spec.settings import TrainConfig
from nas.spec.space import load_space
from nas.store import Store

ROOT = Path(__file__).resolve().parents[1]


def config(work: Path, name: str, tokens: int) -> SearchConfig:
    train: TrainConfig = load_space("tiny").training.model_copy(update={"tokens": tokens})
    return SearchConfig(study=name, space="tiny", device="host", db_url=f"sqlite:///{work / name}.db",
                        train=train, max_bytes=300_000, artifacts=work / "artifacts", seed=0)


def trial_seconds(cfg: SearchConfig) -> list[float]:
    with Store(cfg.db_url, upgrade=False) as store:
        return [t.seconds for t in store.trials(study=cfg.study) if t.failed_stage != "sample" and t.seconds]


def drawn(cfg: SearchConfig) -> list[dict]:
    """The parameters of the study's trials that got past sampling, in order."""
    study = optuna.load_study(study_name=cfg.study, storage=cfg.db_url)
    return [t.params for t in study.trials if "invalid" not in t.user_attrs]


def run(kind: str, workers: int, work: Path, trials: int, tokens: int, same_as: list[dict] | None = None) -> dict:
    cfg = config(work, f"{kind}-{workers}", tokens)
    if same_as:
        # The same architectures as the reference run, queued in its order: the runs then differ
        # only in how the trials are executed, not in what was drawn.
        s = Search(cfg)
        for params in same_as:
            s.study.enqueue_trial(params)
        s.close()
    start = time.perf_counter()
    if kind == "local":
        s = Search(cfg)
        try:
            counts = s.run(n_trials=trials)
        finally:
            s.close()
    else:
        counts = run_with_ray(cfg, RayOptions(workers=workers), n_trials=trials)
    wall = time.perf_counter() - start
    done = counts["complete"] + counts["infeasible"] + counts["failed"]
    per_trial = trial_seconds(cfg)
    return {"executor": kind, "workers": workers, "trials": done, "counts": counts, "wall_s": round(wall, 1),
            "trials_per_hour": round(done / wall * 3600, 1),
            "median_trial_s": round(statistics.median(per_trial), 1) if per_trial else None,
            "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="trials per run")
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens per trial")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_throughput.json")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="nas-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("NAS_CACHE_DIR", str(work / "cache"))
        print("warm-up (host calibration, tokenizers; not counted)", flush=True)
        warm = Search(config(work, "warmup", args.tokens))
        warm.run(n_trials=3)
        warm.close()
        rows = [run("local", 1, work, args.trials, args.tokens)]
        print(rows[-1], flush=True)
        same = drawn(config(work, "local-1", args.tokens))
        for w in workers:
            rows.append(run("ray", w, work, args.trials, args.tokens, same_as=same))
            print(rows[-1], flush=True)
        import ray

        ray.shutdown()

    print(f"\n{'executor':8s} {'workers':>7s} {'trials':>6s} {'wall s':>7s} {'trials/h':>9s} {'median trial s':>15s}")
    for r in rows:
        print(f"{r['executor']:8s} {r['workers']:7d} {r['trials']:6d} {r['wall_s']:7.1f} {r['trials_per_hour']:9.1f} "
              f"{r['median_trial_s'] if r['median_trial_s'] is not None else '':>15}")
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version(), "note": "shared with other sessions' work"},
              "setup": {"space": "tiny", "profile": "host", "max_bytes": 300_000, "tokens_per_trial": args.tokens,
                        "trials_per_run": args.trials, "cpus_per_trial": 1},
              "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
