"""The README's main job, measured: ``nas search --space gqa_small --device jetson --rungs 3
--time 30m`` once per seed, each on a fresh database in a folder of its own, one after another
(each needs the whole machine), and what it ends with: wall time, peak RSS, complete trials
(trainings and bitwidth twins), trainings that reached the top rung, trials' worth of training,
and the Pareto front's size with the budget each of its points was trained to.

The caches a user's second run would have (the host's calibration, a tokenizer per vocabulary of
the space) are filled before any clock starts, as the README's figures were taken. Peak RSS is the
search process's, as ``/usr/bin/time -v`` reports it (``os.wait4``: the largest resident set of the
process and of the children it waited for). Pass ``--extra`` to compare a rule side by side, e.g.
``--extra=--no-front-neighbours`` (the runs' commands are in the JSON).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import machine, spread, write_json

DONE = re.compile(r"done: (\d+) complete, (\d+) infeasible, (\d+) failed \(([\d.]+) trials' worth of training\)")


def run_one(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """One main job in ``folder``: its command, figures and front."""
    folder.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{folder / 'nas.db'}"
    cmd = [sys.executable, "-m", "nas", "search", "--space", args.space, "--device", args.device, "--rungs",
           str(args.rungs), "--time", args.time, "--seed", str(seed), "--db", db, *args.extra]
    log = folder / "search.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"seed {seed}: the search exited {code}; its output is in {log}")
    done = DONE.search(log.read_text())
    if done is None:
        sys.exit(f"seed {seed}: no closing 'done:' line in {log}")
    return {"seed": seed, "command": " ".join(["nas", *cmd[3:]]), "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "complete": int(done[1]), "infeasible": int(done[2]),
            "failed": int(done[3]), "trials_worth": float(done[4]), **from_store(db, log)}


def from_store(db: str, log: Path) -> dict[str, Any]:
    """What the run's study holds: trainings and twins, who reached the top rung, the front."""
    from nas.store import Store

    with Store(db, upgrade=False) as store:
        (study,) = store.list_studies()
        complete = [t for t in store.trials(study=study.name) if t.state == "complete"]
        twins = [t for t in complete if "weights_of" in (t.train or {})]
        trained = [t for t in complete if "weights_of" not in (t.train or {})]
        top = max((len(t.train.get("rung_tokens", [])) for t in trained), default=1) - 1
        front = store.pareto(study=study.name)
        points = []
        for t in sorted(front, key=lambda t: t.val_bpb):
            spec = store.get_architecture(arch_id=t.arch_id).spec
            points.append({"trial": t.number, "summary": spec.summary(), "val_bpb": t.val_bpb,
                           "tokens": t.train["tokens"], "twin_of": t.train.get("weights_of"),
                           "objectives": dict(t.objectives)})
    by_tokens = Counter(p["tokens"] for p in points)
    return {"study": study.name, "trainings": len(trained), "twins": len(twins),
            "trainings_to_top_rung": sum(1 for t in trained if t.train.get("rung", 0) == top),
            "front": len(points), "front_by_tokens": {str(k): by_tokens[k] for k in sorted(by_tokens, reverse=True)},
            "front_points": points, "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--space", default="gqa_small")
    ap.add_argument("--device", default="jetson")
    ap.add_argument("--rungs", type=int, default=3)
    ap.add_argument("--time", default="30m", help="each run's --time")
    ap.add_argument("--extra", action="append", default=[],
                    help="another argument for every run's `nas search` (repeat it), "
                         "e.g. --extra=--no-front-neighbours")
    ap.add_argument("--work", type=Path, default=None, help="where the runs' folders go (default: a new temp folder)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/main_job.json"))
    ap.add_argument("--quick", action="store_true", help="smoke test: the tiny space on this host, 20 s, one seed")
    a = ap.parse_args()
    max_bytes = None
    if a.quick:
        a.space, a.device, a.time, a.seeds, max_bytes = "tiny", "host", "20s", a.seeds[:1], 300_000
        a.extra = [*a.extra, "--max-bytes", str(max_bytes), "--tokens", "8192"]
    from search_efficiency import warm_caches

    from nas.spec.space import load_space

    warm_caches(load_space(a.space), max_bytes)
    work = a.work or Path(tempfile.mkdtemp(prefix="nas-main-job-"))
    runs = []
    for seed in a.seeds:
        r = run_one(a, seed, work / f"seed-{seed}")
        runs.append(r)
        print(f"seed {seed}: {r['wall_s'] / 60:.1f} min, peak RSS {r['peak_rss_mb']:.0f} MB, {r['complete']} complete "
              f"({r['trainings']} trainings + {r['twins']} twins), {r['trainings_to_top_rung']} to the top rung, "
              f"{r['trials_worth']} trials' worth: front of {r['front']} "
              f"(by tokens trained: {', '.join(f'{k}: {v}' for k, v in r['front_by_tokens'].items())})", flush=True)
    doc = {"settings": {"space": a.space, "device": a.device, "rungs": a.rungs, "time": a.time, "extra": a.extra},
           "runs": runs, "front": spread(r["front"] for r in runs),
           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "bench/main_job.py " + " ".join(sys.argv[1:])}
    write_json(a.out, doc)
    print(f"front: median {doc['front']['median']:g} [{doc['front']['min']:g}, {doc['front']['max']:g}] over "
          f"{len(runs)} seed(s)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
