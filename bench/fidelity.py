"""Rank fidelity of brief training: does the BPB at each rung rank architectures as a longer
training does, and does the width-scaled learning rate make it rank them better?

    .venv/bin/python bench/fidelity.py [--space gqa_small] [--archs 10] [--seeds 0 1]
        [--top-tokens 300000] [--rungs 3] [--eta 3] [--ref-factor 3] [--rules width constant]
        [--max-params 30e6] [--threads 2] [--device cpu] [--out bench/results/fidelity.json]

``--archs`` distinct architectures are drawn from the space (seeded, within ``--max-params``),
each trained as a search trial with rungs is: on the whole budget's schedule (``--top-tokens``),
stopping at every rung (``top / eta**k``) to score its validation BPB, under each learning-rate
rule (``TrainConfig.lr_rule``) and each seed. The reference is the same architecture trained
``--ref-factor`` times the top budget on its own schedule, under the first rule and the first
seed: what a longer run says of it. Per rule and rung the script prints Kendall's tau between the
seed-mean BPB at the rung and the reference BPB, and the seed spread (the standard deviation of
BPB over seeds, median over architectures).

BPB here is the fp32 torch model's (``nas.stages.train.evaluate_bpb``) on the space's
``eval_tokens``: training fidelity does not depend on the deployed bitwidth, and leaving the
export out keeps the benchmark to its training cost. The bitwidth drawn is kept in the spec only
for the record.

Every finished run is written to ``--out`` at once and skipped when the script runs again with
the same settings, so a run cut short (a session's end, a kill) goes on where it stopped; an
``--out`` written under other settings is refused, not overwritten.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import kendall_tau, machine, resume_or_refuse, write_json


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    return {"space": a.space, "archs": a.archs, "seeds": a.seeds, "top_tokens": a.top_tokens, "rungs": a.rungs,
            "eta": a.eta, "ref_factor": a.ref_factor, "rules": a.rules, "max_params": a.max_params,
            "draw_seed": a.draw_seed, "max_bytes": a.max_bytes}


def draw_archs(space: Any, n: int, max_params: float, seed: int) -> list[Any]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        spec = space.sample(rng)
        if spec.params() <= max_params and spec.arch_id not in seen:
            seen.add(spec.arch_id)
            out.append(spec)
    return out


def run_rungs(spec: Any, tc: Any, cfg: Any, rung_tokens: list[int], device: str) -> dict[str, Any]:
    """Train on the top budget's schedule, scoring BPB at every rung on the way."""
    from nas.stages.train import evaluate_bpb, train_until

    state, bpbs, t0 = None, [], time.perf_counter()
    for tokens in rung_tokens:
        model, result, state = train_until(spec, tc, cfg, until_tokens=tokens, resume=state, device=device)
        bpbs.append(evaluate_bpb(model, tc, cfg.eval_tokens, device=device).bpb)
    return {"bpb": bpbs, "tokens": rung_tokens, "seconds": round(time.perf_counter() - t0, 1),
            "tokens_per_s": round(result.tokens_per_s, 1)}


def run_reference(spec: Any, tc: Any, cfg: Any, device: str) -> dict[str, Any]:
    from nas.stages.train import evaluate_bpb, train_brief

    t0 = time.perf_counter()
    model, result = train_brief(spec, tc, cfg, device=device)
    return {"bpb": evaluate_bpb(model, tc, cfg.eval_tokens, device=device).bpb, "tokens": result.tokens,
            "seconds": round(time.perf_counter() - t0, 1), "tokens_per_s": round(result.tokens_per_s, 1)}


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Kendall tau per rule and rung against the reference, over the architectures with a
    reference and at least one seed under the rule (the seed-mean over the seeds done), and the
    seed spread over those with two seeds or more."""
    s = doc["settings"]
    out: dict[str, Any] = {}
    for rule in s["rules"]:
        done = [a for a in doc["archs"] if a.get("reference") and a["runs"].get(rule)]
        if len(done) < 3:
            continue
        ref = [a["reference"]["bpb"] for a in done]
        per_rung = []
        for k in range(s["rungs"]):
            by_seed = [[r["bpb"][k] for r in a["runs"][rule].values()] for a in done]
            means = [statistics.fmean(v) for v in by_seed]
            spreads = [statistics.stdev(v) for v in by_seed if len(v) > 1]
            first = [a["runs"][rule][str(s["seeds"][0])]["bpb"][k] for a in done]
            per_rung.append({
                "tokens": next(iter(done[0]["runs"][rule].values()))["tokens"][k],
                "kendall_tau_vs_reference": kendall_tau(means, ref),
                "kendall_tau_first_seed": kendall_tau(first, ref),
                "seed_std_median": statistics.median(spreads) if spreads else None,
                "seed_std_max": max(spreads) if spreads else None,
                "archs_with_seeds": len(spreads),
                "bpb_range": [min(means), max(means)],
            })
        out[rule] = {"archs": len(done), "rungs": per_rung}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="gqa_small")
    ap.add_argument("--archs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--top-tokens", type=int, default=300_000)
    ap.add_argument("--rungs", type=int, default=3)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--ref-factor", type=float, default=3.0)
    ap.add_argument("--rules", nargs="+", default=["width", "constant"], choices=["width", "constant"])
    ap.add_argument("--max-params", type=float, default=30e6)
    ap.add_argument("--draw-seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=None, help="corpus subset (default: the whole corpus)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fidelity.json"))
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny space, 3 archs, 4k tokens, a 200 kB corpus")
    a = ap.parse_args()
    if a.quick:
        a.space, a.archs, a.top_tokens, a.ref_factor, a.max_bytes, a.max_params = "tiny", 3, 4096, 2.0, 200_000, 1e6

    import torch

    torch.set_num_threads(a.threads)
    from nas.search.rungs import RungPlan
    from nas.spec.space import load_space
    from nas.stages.data import load_corpus, tokenize_corpus

    space = load_space(a.space)
    # the space's training settings too: a run made under another batch or rate is not resumed
    settings = {**_settings(a), "training": space.training.model_dump()}
    # go on where the last run stopped; never overwrite runs made under other settings
    doc: dict[str, Any] = resume_or_refuse(a.out, settings, {"settings": settings, "archs": []})
    if doc["archs"]:
        print(f"resuming {a.out}: {sum(len(r) for x in doc['archs'] for r in x['runs'].values())} runs done")
    specs = draw_archs(space, a.archs, a.max_params, a.draw_seed)
    if not doc["archs"]:
        doc["archs"] = [{"arch_id": s.arch_id, "summary": s.summary(), "params": s.params(), "spec": s.to_dict(),
                         "runs": {}, "reference": None} for s in specs]
    rung_tokens = RungPlan(a.top_tokens, count=a.rungs, eta=a.eta).tokens()
    corpus = load_corpus(None, max_bytes=a.max_bytes)
    tokenized: dict[int, Any] = {}

    def save() -> None:
        doc["summary"] = summarize(doc)
        doc["machine"] = machine(torch=torch.__version__, threads=a.threads, device=a.device)
        doc["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        doc["command"] = "bench/fidelity.py " + " ".join(sys.argv[1:])
        write_json(a.out, doc)

    base = space.training
    # First pass: every arch's first seed under the first rule (the search's default) and its
    # reference, which is the tau a user acts on; then the other rules' first seed; then the other
    # seeds. A run cut short still ranks whole architectures under the default rule.
    first, others = a.rules[:1], a.rules[1:]
    for rules, seeds in ((first, [a.seeds[0]]), (others, [a.seeds[0]]), (a.rules, a.seeds[1:])):
        for spec, entry in zip(specs, doc["archs"], strict=True):
            if spec.vocab_size not in tokenized:
                tokenized[spec.vocab_size] = tokenize_corpus(corpus, spec.vocab_size)
            tc = tokenized[spec.vocab_size]
            for rule in rules:
                for seed in seeds:
                    if str(seed) in entry["runs"].get(rule, {}):
                        continue
                    cfg = base.updated(tokens=a.top_tokens, seed=seed, lr_rule=rule)
                    r = run_rungs(spec, tc, cfg, rung_tokens, a.device)
                    entry["runs"].setdefault(rule, {})[str(seed)] = r
                    print(f"{spec.summary():60s} {rule:8s} seed {seed}: BPB "
                          + " ".join(f"{b:.3f}" for b in r["bpb"]) + f"  ({r['seconds']:.0f} s)", flush=True)
                    save()
            if entry["reference"] is None and rules == first:
                cfg = base.updated(tokens=math.ceil(a.top_tokens * a.ref_factor), seed=a.seeds[0], lr_rule=a.rules[0])
                entry["reference"] = run_reference(spec, tc, cfg, a.device) | {"rule": a.rules[0]}
                print(f"{spec.summary():60s} reference {cfg.tokens:,} tokens: BPB {entry['reference']['bpb']:.3f}",
                      flush=True)
                save()
    save()
    print(f"wrote {a.out}")
    for rule, s in doc["summary"].items():
        for r in s["rungs"]:
            print(f"{rule:8s} {r['tokens']:>9,} tokens: tau {r['kendall_tau_vs_reference']:+.3f} over {s['archs']} "
                  f"archs, seed std median {r['seed_std_median']} over {r['archs_with_seeds']}")


if __name__ == "__main__":
    sys.exit(main())
