"""Cost of a trial: the share of a trial's wall clock spent in export, quantization, measurement,
training and scoring, from a real search.

    .venv/bin/python bench/trial_cost.py [--space gqa_small] [--device host] [--complete 2] [--max-trials 6]
        [--seed 0] [--quick] [--out bench/results/trial_cost.json]

Runs a real ``nas.search.study.Search`` (the space's default training budget unless ``--tokens``) until
``--complete`` trials have been trained and scored (or ``--max-trials`` drawn). The search stores
per-stage seconds in each complete trial's train JSON (``stage_seconds``): sample, budget,
measure (export with fresh weights + quantize + measure), train, score (save + the trained
model's fp32 file, written into the measured graph by ``nas.stages.export.reweight`` or traced again +
quantize + BPB in ONNX Runtime). The rest of the trial's wall clock (writing the
trial, refreshing the front, Optuna's bookkeeping) is ``report/other``. To split measure and score
into their parts, the script then times those calls separately (``nas.stages.export.export_onnx``,
``nas.stages.export.reweight``, ``nas.stages.export.quantize``, ``nas.stages.measure.measure_local``,
``nas.stages.score.score_bpb_onnx``) on the same specs and the same trained weights, and divides each
stored stage in those proportions.
Rejected trials (over a budget) are listed with their cost too. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, spread  # bench/ is on sys.path: the scripts run as python bench/NAME.py

from nas.search.config import SearchConfig
from nas.search.study import Search
from nas.spec.profile import load_profile
from nas.spec.settings import TrainConfig
from nas.spec.space import load_space
from nas.stages.data import load_corpus, tokenize_corpus
from nas.stages.export import export_onnx, fresh_distinct_model, quantize, reweight
from nas.stages.measure import measure_local
from nas.stages.model import build_model
from nas.stages.score import score_bpb_onnx
from nas.store import Store

PARTS = ("sample+budget", "export", "quantize", "measure", "train", "save", "score export", "score quantize",
         "score BPB", "report/other")


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def split_parts(spec, trained_pt: Path, profile, train_cfg, corpus, threads: int,
                score_graph: str = "traced") -> dict[str, float]:
    """Seconds of each part of the measure and score stages, timed one by one on this spec. The
    trained model's fp32 file is made as the search made it (``score_graph``): the measured graph
    with the trained weights written in (``nas.stages.export.reweight``), or a new trace."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fresh, out["export"] = timed(lambda: export_onnx(fresh_distinct_model(spec, 0), d / "m" / "fp32"))
        deployed, out["quantize"] = (fresh, 0.0) if spec.bitwidth == 32 else timed(quantize, fresh, spec.bitwidth,
                                                                                   d / "m")
        _, out["measure"] = timed(measure_local, deployed.path.parent, spec, profile)
        ckpt = torch.load(trained_pt, map_location="cpu", weights_only=False)
        model = build_model(spec, 0)
        model.load_state_dict(ckpt["state_dict"])
        _, out["save"] = timed(torch.save, ckpt, d / "model.pt")
        if score_graph == "reweighted":
            fp32, out["score export"] = timed(reweight, fresh, model, d / "s" / "fp32")
        else:
            fp32, out["score export"] = timed(export_onnx, model, d / "s" / "fp32")
        scored, out["score quantize"] = (fp32, 0.0) if spec.bitwidth == 32 else timed(quantize, fp32, spec.bitwidth,
                                                                                      d / "s")
        tc = tokenize_corpus(corpus, spec.vocab_size)  # cached by the search's run: not part of the timing
        _, out["score BPB"] = timed(score_bpb_onnx, scored, tc, train_cfg.eval_tokens, threads=threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="gqa_small")
    ap.add_argument("--device", default="host")
    ap.add_argument("--complete", type=int, default=2, help="stop after this many trained and scored trials")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=None, help="training budget (default: the space's)")
    ap.add_argument("--max-bytes", type=int, default=None, help="corpus size (default: the whole embedded corpus)")
    ap.add_argument("--study", default="cost")
    ap.add_argument("--from-db", default=None, metavar="URL",
                    help="run no search: analyse the finished trials of --study in this database (a run of this "
                         "script stopped early); space, profile, training and corpus are read from the study")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny space, one trial, small corpus")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trial_cost.json")
    args = ap.parse_args()
    if args.quick:
        args.space, args.complete, args.max_trials = "tiny", 1, 3
        args.tokens, args.max_bytes = args.tokens or 2048, args.max_bytes or 200_000

    if args.from_db:
        # Analyse the finished trials of a search already run (by this script, stopped early).
        store = Store(args.from_db)
        st_row = store.get_study(name=args.study)
        args.space, args.device = st_row.space, st_row.profile
        train = TrainConfig(**st_row.train_config)
        args.max_bytes = st_row.extra.get("max_bytes")
        rows = [t for t in store.trials(study=args.study) if t.state != "running" and t.failed_stage != "sample"]
        threads = 2
        search = None
        print(f"analysing {len(rows)} finished trials of study {args.study!r} in {args.from_db}")
    else:
        space = load_space(args.space)
        train = space.training if args.tokens is None else space.training.model_copy(update={"tokens": args.tokens})
        work = Path(tempfile.mkdtemp(prefix="nas-bench-cost-"))
        cfg = SearchConfig(study=args.study, space=args.space, device=args.device,
                           db_url=f"sqlite:///{work}/cost.db", seed=args.seed, train=train,
                           max_bytes=args.max_bytes, artifacts=work / "artifacts")
        search = Search(cfg)
        print(f"search on {args.space} / {args.device}, training {train.tokens:,} tokens x batch "
              f"{train.batch_size}, until {args.complete} complete (at most {args.max_trials} trials); "
              f"database {cfg.db_url}")
        numbers = set()
        complete = drawn = 0
        while complete < args.complete and drawn < args.max_trials:
            t0 = time.perf_counter()
            state, number, _ = search.run_one(seed=args.seed + 1000 * drawn, n_trials_hint=None)
            numbers.add(number)
            drawn += 1
            complete += state == "complete"
            print(f"  trial {number}: {state} in {time.perf_counter() - t0:.1f} s", flush=True)
        store = search.store
        rows = [t for t in store.trials(study=args.study) if t.number in numbers]
        threads = search.resources.host.profile.runtime.threads if search.resources.host else 2
    # A trial's wall clock as the store recorded it (start_trial to finish), in every mode.
    wall = {t.number: t.seconds for t in rows}
    profile = load_profile(args.device)
    corpus = load_corpus(None, max_bytes=args.max_bytes)
    trials, rejected = [], []
    for t in rows:
        if t.state != "complete":
            rejected.append({"number": t.number, "state": t.state, "stage": t.failed_stage,
                             "reason": t.failure_reason, "seconds": wall[t.number]})
            continue
        spec = store.get_architecture(arch_id=t.arch_id).spec
        st = t.train["stage_seconds"]
        parts = split_parts(spec, Path(t.artifact_dir) / "model.pt", profile, train, corpus, threads,
                            t.train.get("score_graph", "traced"))
        m_sum = parts["export"] + parts["quantize"] + parts["measure"]
        s_sum = parts["save"] + parts["score export"] + parts["score quantize"] + parts["score BPB"]
        seconds = {"sample+budget": st.get("sample", 0.0) + st.get("budget", 0.0), "train": st["train"]}
        for k in ("export", "quantize", "measure"):
            seconds[k] = st["measure"] * parts[k] / m_sum
        for k in ("save", "score export", "score quantize", "score BPB"):
            seconds[k] = st["score"] * parts[k] / s_sum
        seconds["report/other"] = max(0.0, wall[t.number] - sum(st.values()))
        total = sum(seconds.values())
        trials.append({"number": t.number, "summary": spec.summary(), "params": spec.params(),
                       "bitwidth": spec.bitwidth, "score_graph": t.train.get("score_graph", "traced"),
                       "tokens": t.train["tokens"], "train_tokens_per_s":
                       t.train["tokens_per_s"], "wall_s": wall[t.number], "stage_seconds_stored": st,
                       "parts_timed_separately_s": parts, "seconds": seconds,
                       "share": {k: v / total for k, v in seconds.items()},
                       "not_training_share": 1 - seconds["train"] / total})
    if search is not None:
        search.close()
    store.close()

    print(f"\n{'part':16s}" + "".join(f"{'trial ' + str(t['number']):>18s}" for t in trials))
    for k in PARTS:
        print(f"{k:16s}" + "".join(f"{t['seconds'][k]:9.1f} s {t['share'][k]:6.1%}" for t in trials))
    print(f"{'total':16s}" + "".join(f"{sum(t['seconds'].values()):9.1f} s {'':6s}" for t in trials))
    for t in trials:
        print(f"  trial {t['number']}: {t['summary']}, {t['params'] / 1e6:.1f}M params, "
              f"{t['train_tokens_per_s']:.0f} tok/s; everything but training {t['not_training_share']:.1%}")
    for r in rejected:
        print(f"  trial {r['number']}: {r['state']} at {r['stage']} after {r['seconds']:.1f} s ({r['reason']})")
    shares = [t["not_training_share"] for t in trials]
    summary = {"complete_trials": len(trials),
               "not_training_share": spread(shares) if shares else None,
               "median_share": {k: statistics.median(t["share"][k] for t in trials) for k in PARTS} if trials else None,
               "rejected_trial_seconds": [r["seconds"] for r in rejected]}
    if shares:
        print(f"everything but training: median {summary['not_training_share']['median']:.1%} "
              f"[{min(shares):.1%}, {max(shares):.1%}] of a complete trial")

    import onnxruntime

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(torch=torch.__version__, onnxruntime=onnxruntime.__version__,
                    torch_threads=torch.get_num_threads(), ort_threads=threads),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/trial_cost.py " + " ".join(sys.argv[1:]),
        "setup": {"space": args.space, "device": args.device, "training": train.model_dump(),
                  "max_bytes": args.max_bytes, "seed": args.seed, "from_db": args.from_db},
        "summary": summary, "trials": trials, "rejected": rejected,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
