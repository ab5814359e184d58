"""Search efficiency: our default search (multivariate TPE with constraints, as ``nas search`` runs it)
against random search, same space, profile, corpus, training budget and wall-clock budget, several seeds.

    .venv/bin/python bench/search_efficiency.py [--space tiny] [--device host] [--seeds 0 1 2] [--budget-s 220]
        [--set decode_ms_per_token=0.2 --set model_mb=0.5] [--quick] [--out bench/results/search_efficiency.json]

Each (arm, seed) is a ``nas.search.study.Search`` on its own SQLite database; an arm is a sampler,
optionally with rungs (``tpe+rungs3``: successive halving on the training budget, every trial scored
at 1/9 and 1/3 of it on the way, only the best going on; its points are each trial's BPB at the rung
where it stopped, so a trial stopped early counts with its less-trained BPB). The runs are interleaved
in one process: the run that has used the least of its budget runs its next trial (``Search.run_one``,
the same unit ``nas search`` repeats), so the machine's load falls alike on every run. A run's clock
is the sum of its own trials' wall-clock seconds; like ``nas search --time``, a trial started
before the budget ends is finished. From each run's feasible complete trials in the store, the
hypervolume of the (decode ms, validation BPB) front after each trial, against one reference
point shared by all runs (``nas.faces.plots.reference_point`` of every feasible point of every run).

``--set KEY=VALUE`` overrides a budget of the profile (written to a temporary copy of it): the
default tightens the host's budgets to the tiny space's scale, so that some draws are rejected
analytically, some after measurement, as a real search on a device is.
Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _common import machine, spread  # bench/ is on sys.path: the scripts run as python bench/NAME.py

from nas.faces.plots import hypervolume_2d, reference_point
from nas.search.config import SearchConfig
from nas.search.study import Search
from nas.spec.profile import list_profile_files, load_profile
from nas.spec.space import SearchSpace, load_space

OBJ = ("decode_ms", "val_bpb")
DEFAULT_SET = ["decode_ms_per_token=0.25", "model_mb=0.5"]


def parse_arm(arm: str) -> tuple[str, int]:
    """``tpe`` -> (tpe, 1 rung); ``tpe+rungs3`` -> (tpe, 3 rungs)."""
    sampler, _, rest = arm.partition("+")
    if rest and not (rest.startswith("rungs") and rest[5:].isdigit() and int(rest[5:]) >= 1):
        raise SystemExit(f"--samplers {arm!r}: give SAMPLER or SAMPLER+rungsN")
    return sampler, int(rest[5:]) if rest else 1


def tightened_profile(device: str, overrides: list[str], folder: Path) -> str:
    """A copy of the profile with some budgets overridden; the profile's own name when none are."""
    if not overrides:
        return device
    path = Path(device) if Path(device).exists() else list_profile_files()[device]
    doc = yaml.safe_load(path.read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        doc["budgets"][key] = float(value)
    out = folder / f"{device}-bench.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_profile(out)  # validate it here, not inside the first run
    return str(out)


def warm_caches(space: SearchSpace, max_bytes: int | None) -> None:
    """Fill the on-disk caches every run shares before any clock starts: the host's calibration and
    a tokenizer per vocabulary of the space. Otherwise the first run to draw a vocabulary pays
    for training its tokenizer (minutes on a busy machine) and the others get it free."""
    from nas.search.pipeline import host_setup
    from nas.stages.data import load_corpus, tokenize_corpus

    host_setup()
    corpus = load_corpus(None, max_bytes=max_bytes)
    vocab = next(d for d in space.dimensions if d.name == "vocab_size")
    for v in vocab.choices if vocab.kind == "choices" else (vocab.value,):
        tokenize_corpus(corpus, int(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="tiny")
    ap.add_argument("--device", default="host")
    ap.add_argument("--samplers", nargs="+", default=["tpe", "random"],
                    help="the arms: a sampler (tpe, nsga2, gp, random), optionally with rungs of successive "
                         "halving on the training budget as SAMPLER+rungsN (eta 3), e.g. tpe+rungs3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-s", type=float, default=220.0, help="wall-clock budget of each run, seconds")
    ap.add_argument("--tokens", type=int, default=None, help="training budget per trial (default: the space's)")
    ap.add_argument("--max-bytes", type=lambda s: None if s == "all" else int(s), default=1_000_000,
                    help="corpus size in bytes (embedded stdlib corpus), or 'all' for the whole corpus as "
                         "nas search reads it by default")
    ap.add_argument("--set", dest="overrides", action="append", default=None, metavar="BUDGET=VALUE",
                    help=f"override a profile budget (default: {' '.join(DEFAULT_SET)}; --set none for none)")
    ap.add_argument("--work", type=Path, default=None,
                    help="where the runs' databases (sqlite:///WORK/<sampler>-s<seed>.db) and artifacts go "
                         "(default: a new temporary folder)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one seed, seconds of budget, tiny corpus")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_efficiency.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budget_s, args.max_bytes, args.tokens = [0], 1.0, 200_000, args.tokens or 2048
    if args.overrides is None:
        args.overrides = ["none"] if args.quick else DEFAULT_SET  # quick: every tiny draw feasible
    overrides = [o for o in args.overrides if o != "none"]

    space = load_space(args.space)
    train = space.training if args.tokens is None else space.training.model_copy(update={"tokens": args.tokens})
    work = args.work or Path(tempfile.mkdtemp(prefix="nas-bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    device = tightened_profile(args.device, overrides, work)
    runs = []
    for seed in args.seeds:
        for arm in args.samplers:
            sampler, rungs = parse_arm(arm)
            name = f"{arm.replace('+', '-')}-s{seed}"
            cfg = SearchConfig(study=name, space=args.space, device=device, db_url=f"sqlite:///{work / name}.db",
                               sampler=sampler, seed=seed, train=train, max_bytes=args.max_bytes,
                               artifacts=work / "artifacts", rungs=rungs, eta=3)
            runs.append({"name": name, "sampler": arm, "seed": seed, "search": Search(cfg), "used_s": 0.0,
                         "trials": [], "draws": 0})
    warm_caches(space, args.max_bytes)
    print(f"{len(runs)} runs of {args.budget_s:.0f} s each on {args.space} / {args.device} "
          f"(budgets {', '.join(overrides) or 'as profiled'}), training {train.tokens:,} tokens, work dir {work}")

    # Interleave: the run furthest behind goes next; a run stops once its budget is spent.
    t_all = time.perf_counter()
    while True:
        live = [r for r in runs if r["used_s"] < args.budget_s]
        if not live:
            break
        r = min(live, key=lambda r: r["used_s"])
        t0 = time.perf_counter()
        state, number, invalid = r["search"].run_one(seed=r["seed"] + r["draws"] * 1000, n_trials_hint=None)
        dt = time.perf_counter() - t0
        r["draws"] += 1 + invalid
        r["used_s"] += dt
        r["trials"].append({"number": number, "state": state, "seconds": dt, "at_s": r["used_s"],
                            "invalid_draws_before": invalid})
        print(f"  {r['name']:10s} t={r['used_s']:6.1f}s trial {number} {state} ({dt:.1f} s)", flush=True)
    total_s = time.perf_counter() - t_all

    # Join what the store holds with this run's clock.
    all_points = []
    for r in runs:
        store = r["search"].store
        rows = {t.number: t for t in store.trials(study=r["name"])}
        for t in r["trials"]:
            row = rows.get(t["number"])
            t["store_state"] = row.state if row else None
            t["failed_stage"] = row.failed_stage if row else None
            ok = row is not None and row.state == "complete" and row.feasible and row.objectives
            t["point"] = [row.objectives[o] for o in OBJ] if ok else None
            if t["point"]:
                all_points.append(t["point"])
        r["search"].close()
    # No feasible point anywhere (a budget too short): every hypervolume is 0, against no reference.
    ref = reference_point(np.array(all_points), ("minimize", "minimize")) if all_points else [math.nan, math.nan]
    for r in runs:
        pts, curve = [], []
        for t in r["trials"]:
            if t["point"]:
                pts.append(t["point"])
            curve.append([round(t["at_s"], 2), hypervolume_2d(pts, ref)])
        r["hv_curve"] = curve
        r["final_hv"] = curve[-1][1] if curve else 0.0

    def reach_time(r: dict, target: float) -> float | None:
        return next((at for at, hv in r["hv_curve"] if hv >= target), None)

    random_final = [r["final_hv"] for r in runs if r["sampler"] == "random"]
    target = statistics.median(random_final) if random_final else None
    for r in runs:
        paired = next((x for x in runs if x["sampler"] == "random" and x["seed"] == r["seed"]), None)
        r["reach_random_median_final_s"] = reach_time(r, target) if target is not None else None
        r["reach_paired_random_final_s"] = reach_time(r, paired["final_hv"]) if paired else None

    # What a rejection costs against a trained trial (this process's wall clock per trial).
    cost: dict[str, list[float]] = {"invalid draw (sample)": [], "rejected analytically (budget)": [],
                                    "rejected after measurement (measure)": [], "complete (trained and scored)": [],
                                    "failed": []}
    for r in runs:
        for t in r["trials"]:
            key = {"budget": "rejected analytically (budget)", "measure": "rejected after measurement (measure)",
                   "sample": "invalid draw (sample)"}.get(t["failed_stage"] or "", None)
            if t["state"] == "complete":
                key = "complete (trained and scored)"
            elif t["state"] == "failed":
                key = "failed"
            if key:
                cost[key].append(t["seconds"])
    complete_med = statistics.median(cost["complete (trained and scored)"] or [float("nan")])
    rejections = {k: {"n": len(v), **(spread(v) if v else {}),
                      "share_of_complete_trial": (statistics.median(v) / complete_med) if v else None}
                  for k, v in cost.items()}

    fractions = (0.25, 0.5, 0.75, 1.0)
    by_sampler = {}
    for s in args.samplers:
        mine = [r for r in runs if r["sampler"] == s]
        at = {}
        for f in fractions:
            at[f"hv_at_{int(f * 100)}pct_budget"] = spread(
                [max([hv for t_, hv in r["hv_curve"] if t_ <= f * args.budget_s] or [0.0]) for r in mine]
                if f < 1 else [r["final_hv"] for r in mine])
        reached = [r["reach_random_median_final_s"] for r in mine]
        by_sampler[s] = {
            **at, "runs": len(mine), "trials": spread([len(r["trials"]) for r in mine]),
            "feasible_complete": spread([sum(1 for t in r["trials"] if t["point"]) for r in mine]),
            "reached_random_median_final": f"{sum(x is not None for x in reached)}/{len(reached)}",
            "time_to_random_median_final_s": spread([x for x in reached if x is not None]) if any(
                x is not None for x in reached) else None,
        }

    print(f"\nreference point (decode ms, BPB) = ({ref[0]:.4g}, {ref[1]:.4g}); random's median final HV = "
          f"{target:.4g}" if target is not None else "")
    print(f"{'run':10s} {'trials':>6s} {'feasible':>8s} {'final HV':>9s} {'reach rnd-median':>16s} "
          f"{'reach paired rnd':>16s}")
    for r in runs:
        def fmt(x: float | None) -> str:
            return "never" if x is None else f"{x:.0f} s"
        print(f"{r['name']:10s} {len(r['trials']):6d} {sum(1 for t in r['trials'] if t['point']):8d} "
              f"{r['final_hv']:9.4g} {fmt(r['reach_random_median_final_s']):>16s} "
              f"{fmt(r['reach_paired_random_final_s']):>16s}")
    print("\nper sampler (median [min, max] over seeds)")
    for s, d in by_sampler.items():
        hv = "  ".join(f"{k.split('_')[2]}: {v['median']:.4g} [{v['min']:.4g}, {v['max']:.4g}]"
                       for k, v in d.items() if k.startswith("hv_at"))
        print(f"  {s:7s} HV at {hv}; reached random's median final HV in {d['reached_random_median_final']} runs")
    print("\ncost per trial, wall-clock seconds (median [min, max]), share of a complete trial's median")
    for k, v in rejections.items():
        if v["n"]:
            print(f"  {k:40s} n={v['n']:3d}  {v['median']:7.3f} [{v['min']:.3f}, {v['max']:.3f}]  "
                  f"{v['share_of_complete_trial']:.1%}")

    import onnxruntime
    import optuna
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(torch=torch.__version__, onnxruntime=onnxruntime.__version__, optuna=optuna.__version__,
                    torch_threads=torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/search_efficiency.py " + " ".join(sys.argv[1:]),
        "setup": {"space": args.space, "device": args.device, "budget_overrides": overrides,
                  "training": train.model_dump(), "max_bytes": args.max_bytes, "budget_s_per_run": args.budget_s,
                  "objectives": list(OBJ), "samplers": args.samplers, "seeds": args.seeds,
                  "reference_point": ref, "interleaved": True, "total_wall_s": total_s},
        "by_sampler": by_sampler, "trial_cost_s": rejections,
        "random_median_final_hv": target,
        "runs": [{k: v for k, v in r.items() if k != "search"} for r in runs],
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
