"""Store scale: time to compute and show the Pareto front with many trials in the database, on
SQLite and PostgreSQL.

    .venv/bin/python bench/store_scale.py [--trials 10000] [--rounds 5] [--pg-admin URL | --no-pg] [--quick]
        [--out bench/results/store_scale.json]

Synthetic trials of gqa_small architectures are written through the store's own API
(``upsert_architecture``, ``add_measurement``, ``start_trial``, ``finish_trial`` / ``mark_infeasible`` /
``fail_trial``: about 75% complete, 15% infeasible, 10% failed, a 30-point learning curve each,
one architecture and measurement per 5 trials), into a fresh SQLite file and a fresh, uniquely named
PostgreSQL database (created on the server of ``--pg-admin``, dropped at the end). Then, in
interleaved rounds (backends alternate, every operation once per round), the wall clock of:

- ``Store.refresh_pareto`` and ``Store.pareto`` in-process;
- ``nas pareto STUDY --db URL``, the CLI end to end in a subprocess (interpreter start included);
- the web page (``nas.faces.web.app.create_app``, FastAPI's TestClient, in-process): GET of the study page and
  of its figures endpoint, cold (a new app: nothing cached) and warm (the same app again).

Prints a table and writes JSON (median, min, max per operation and backend).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _common import machine, spread  # bench/ is on sys.path: the scripts run as python bench/NAME.py
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from nas.spec.results import LatencyStats, Measurement
from nas.spec.space import load_space
from nas.store import Store

PG_ADMIN = os.environ.get("NAS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
STUDY = "scale"
NAS = str(Path(sys.executable).with_name("nas"))


def fill(store: Store, n: int, seed: int = 0) -> float:
    """Write ``n`` synthetic trials through the store's API; returns the seconds it took."""
    rng = random.Random(seed)
    space = load_space("gqa_small")
    t0 = time.perf_counter()
    store.create_study(name=STUDY, space="gqa_small", profile="host",
                       objectives=[("val_bpb", "minimize"), ("decode_ms", "minimize")],
                       corpus_fingerprint="synthetic", train_config={"tokens": 300_000}, seed=seed,
                       code_version="bench", extra={"sampler": "synthetic"})
    archs: list[tuple[object, int, float]] = []
    for _ in range(max(1, n // 5)):
        spec = space.sample(rng)
        store.upsert_architecture(spec=spec)
        decode = spec.decode_bytes(256) / 20e9 * 1e3 * rng.uniform(1.2, 3.0) + 0.02 * spec.n_layers
        reps = [decode * rng.gauss(1, 0.03) for _ in range(30)]
        m = store.add_measurement(Measurement(
            arch_id=spec.arch_id, profile="host", bitwidth=spec.bitwidth, label="measured:local",
            prefill=LatencyStats.from_samples([decode * 20] * 10), decode=LatencyStats.from_samples(reps),
            peak_memory_bytes=int(spec.params() * 2 + 60e6), model_bytes=spec.params() * 2,
            workload={"prompt_tokens": 128, "context_tokens": 256, "batch": 1},
            provenance={"cpu": "synthetic", "threads": 2}))
        archs.append((spec, m.id, decode))
    for number in range(n):
        spec, mid, decode = archs[number % len(archs)]
        store.start_trial(study=STUDY, number=number, optuna_trial_id=None, worker="bench:0")
        u = rng.random()
        if u < 0.10:
            store.update_trial(study=STUDY, number=number, arch_id=spec.arch_id)
            store.fail_trial(study=STUDY, number=number, stage="train", reason="synthetic failure")
            continue
        cons = {"decode_ms_per_token": decode - 10 + (15 if u < 0.25 else 0), "model_mb": -1.0}
        if u < 0.25:
            store.mark_infeasible(study=STUDY, number=number, stage="measure", reason="decode over budget",
                                  constraints=cons, arch_id=spec.arch_id, measurement_id=mid)
            continue
        bpb = 2.0 + 8e6 / (spec.non_embedding_params() + 4e6) * rng.uniform(0.8, 1.2)
        curve = [[s, s * 4096, 8.0 - 4 * s / 30, 3e-3, s * 1.5] for s in range(1, 31)]
        store.finish_trial(study=STUDY, number=number, arch_id=spec.arch_id, measurement_id=mid,
                           objectives={"val_bpb": bpb, "decode_ms": decode, "params": float(spec.params())},
                           val_bpb=bpb, constraints=cons, curve=curve, baselines={"unigram_bpb": 5.0},
                           train={"steps": 30, "tokens": 122_880, "seconds": 45.0, "tokens_per_s": 2730.0,
                                  "stage_seconds": {"measure": 9.0, "train": 45.0, "score": 6.0}})
    return time.perf_counter() - t0


CPU: dict[str, dict[str, list[float]]] = {}


def timed(fn: Callable[[], object], backend: str = "", op: str = "") -> float:
    """Wall-clock seconds of ``fn()``; its CPU seconds (this process's and its children's) are kept in
    CPU[backend][op], a figure that another process's load on the machine inflates far less."""
    t0, c0, ch0 = time.perf_counter(), time.process_time(), _children_cpu()
    fn()
    wall = time.perf_counter() - t0
    CPU.setdefault(backend, {}).setdefault(op, []).append(time.process_time() - c0 + _children_cpu() - ch0)
    return wall


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cli_pareto(url: str) -> None:
    r = subprocess.run([NAS, "pareto", STUDY, "--db", url], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "160"})
    if r.returncode != 0 or "Pareto front of" not in r.stdout:
        raise RuntimeError(f"nas pareto failed ({r.returncode}): {r.stderr[-500:]}")


def web_get(client: object, path: str) -> None:
    r = client.get(path)  # type: ignore[attr-defined]
    if r.status_code != 200:
        raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:300]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pg-admin", default=PG_ADMIN, help="a PostgreSQL server's admin URL (a database is "
                    "created there and dropped after)")
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--no-web", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: 100 trials, SQLite only, 2 rounds")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store_scale.json")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.rounds, args.no_pg = 100, 2, True

    signal.signal(signal.SIGTERM, _interrupt)  # so that `kill` still drops the PostgreSQL database
    work = Path(tempfile.mkdtemp(prefix="nas-bench-store-"))
    backends = {"sqlite": f"sqlite:///{work}/scale.db"}
    admin = pg_name = None
    if not args.no_pg:
        admin = create_engine(args.pg_admin, isolation_level="AUTOCOMMIT")
        pg_name = f"nas_bench_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
        backends["postgresql"] = make_url(args.pg_admin).set(database=pg_name).render_as_string(hide_password=False)
    create_app = None
    if not args.no_web:
        try:
            from fastapi.testclient import TestClient

            from nas.faces.web.app import create_app
        except ImportError as e:
            print(f"web page not timed: {e}")
    ops: dict[str, dict[str, list[float]]] = {}
    fill_s: dict[str, float] = {}
    try:
        stores = {}
        for name, url in backends.items():
            stores[name] = Store(url)
            fill_s[name] = fill(stores[name], args.trials)
            print(f"{name}: wrote {args.trials:,} trials through the store's API in {fill_s[name]:.0f} s", flush=True)
        front_size = {k: len(s.refresh_pareto(study=STUDY)) for k, s in stores.items()}
        counts = {k: s.get_study(name=STUDY).trial_counts for k, s in stores.items()}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for name in order:
                url, store = backends[name], stores[name]
                t = ops.setdefault(name, {})

                def record(op: str, fn: Callable[[], object], t: dict = t, name: str = name) -> None:
                    t.setdefault(op, []).append(timed(fn, name, op))

                record("Store.refresh_pareto", lambda s=store: s.refresh_pareto(study=STUDY))
                record("Store.pareto", lambda s=store: s.pareto(study=STUDY))
                record("Store.trials (all)", lambda s=store: s.trials(study=STUDY))
                record("nas pareto (CLI subprocess)", lambda u=url: cli_pareto(u))
                if create_app is not None:
                    # A new app each round: its first GET reads the study (cold), the second reuses it.
                    with TestClient(create_app(url, allowed_hosts=["testserver"])) as c:
                        record("web study page, cold", lambda c=c: web_get(c, f"/study/{STUDY}"))
                        record("web figures endpoint", lambda c=c: web_get(c, f"/api/study/{STUDY}/figures"))
                        record("web study page, warm", lambda c=c: web_get(c, f"/study/{STUDY}"))
                        record("web trials endpoint (all rows)", lambda c=c: web_get(c, f"/api/study/{STUDY}/trials"))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        for s in stores.values():
            s.close()
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
            admin.dispose()

    summary = {b: {op: {**spread(v), "cpu_median": statistics.median(CPU[b][op])} for op, v in t.items()}
               for b, t in ops.items()}
    names = list(next(iter(ops.values())))
    print(f"\n{args.trials:,} trials, front of {front_size}; wall-clock seconds, median [min, max] over "
          f"{args.rounds} rounds, and CPU seconds (median)")
    print(f"{'operation':34s}" + "".join(f"{b:>36s}" for b in summary))
    for op in names:
        print(f"{op:34s}" + "".join(f"{summary[b][op]['median']:10.3f} [{summary[b][op]['min']:.3f}, "
                                     f"{summary[b][op]['max']:.3f}] cpu {summary[b][op]['cpu_median']:6.3f}"
                                     for b in summary))

    import sqlalchemy

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(sqlalchemy=sqlalchemy.__version__, postgresql=_pg_version(args) if not args.no_pg else None),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/store_scale.py " + " ".join(sys.argv[1:]),
        "setup": {"trials": args.trials, "rounds": args.rounds, "backends": list(backends), "interleaved": True,
                  "web_timed": create_app is not None, "trial_counts": counts, "front_size": front_size,
                  "fill_seconds": fill_s},
        "summary": summary, "samples": ops, "cpu_samples": CPU,
    }, indent=1))
    print(f"wrote {args.out}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _pg_version(args: argparse.Namespace) -> str | None:
    try:
        engine = create_engine(args.pg_admin)
        with engine.connect() as conn:
            v = conn.execute(text("SHOW server_version")).scalar()
        engine.dispose()
        return v
    except Exception:  # a version string is a nicety, never a reason to fail
        return None


if __name__ == "__main__":
    main()
