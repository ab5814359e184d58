"""The brief-training schedule: at a fixed token budget, which batch size and peak learning rate
give the lowest BPB, and does any of them let deeper or wider models beat the smallest?

    .venv/bin/python bench/brief_schedule.py [--space gqa_small] [--shapes 4x384 12x384]
        [--batches 16 4] [--lrs 3e-3 1.5e-3 7.5e-4] [--tokens 303000] [--vocab 8192]
        [--threads 2] [--device cpu] [--out bench/results/brief_schedule.json]

Every shape ``LxD`` is one fixed decoder (``L`` layers, width ``D``, GQA 8 heads / 2 kv heads,
plain ReLU FFN x3, RMSNorm, tied embeddings, ``--vocab``), so only depth and width vary. Each is
trained once per (batch, lr) as a search trial is (``nas.stages.train.train_brief`` with the
space's ``training:`` and these overrides, its learning-rate rule included, seed 0) on the same
token budget, and scored in fp32 torch BPB on the space's ``eval_tokens`` validation targets. A
smaller batch buys more optimizer steps at the same tokens; on 2 CPU cores it costs no
throughput at these widths (the tokens/s column says so).

Every finished run is written to ``--out`` at once and skipped when the script runs again with
the same settings, so a run cut short goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, resume_or_refuse, write_json


def shape_spec(shape: str, vocab: int) -> Any:
    from nas.spec.arch import ArchSpec

    n_layers, d_model = (int(v) for v in shape.lower().split("x"))
    return ArchSpec(vocab_size=vocab, d_model=d_model, n_layers=n_layers, attention="gqa", n_heads=8,
                    n_kv_heads=2, head_dim=d_model // 8, ffn="plain", ffn_ratio=3.0, activation="relu",
                    norm="rmsnorm", tied_embeddings=True, bitwidth=32, context_length=256)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="gqa_small")
    p.add_argument("--shapes", nargs="+", default=["4x384", "12x384"])
    p.add_argument("--batches", nargs="+", type=int, default=[16, 4])
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1.5e-3, 7.5e-4])
    p.add_argument("--tokens", type=int, default=303_000)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-bytes", type=int, default=None, help="corpus subset (default: the whole corpus)")
    p.add_argument("--out", type=Path, default=Path("bench/results/brief_schedule.json"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny space, 2 tiny shapes, 2 batches x 2 "
                   "rates, 4k tokens, a 200 kB corpus")
    a = p.parse_args(argv)
    if a.quick:
        a.space, a.shapes, a.batches, a.lrs = "tiny", ["2x64", "4x64"], [8, 2], [3e-3, 1e-3]
        a.tokens, a.vocab, a.max_bytes = 4096, 512, 200_000

    import torch

    from nas.spec.space import load_space
    from nas.stages.data import load_corpus, tokenize_corpus
    from nas.stages.train import evaluate_bpb, train_brief

    torch.set_num_threads(a.threads)
    space = load_space(a.space)
    settings = {"space": a.space, "tokens": a.tokens, "vocab": a.vocab, "max_bytes": a.max_bytes,
                "training": space.training.model_dump()}
    doc: dict[str, Any] = resume_or_refuse(a.out, settings, {"settings": settings, "runs": []})
    done = {(r["shape"], r["batch"], r["lr"]) for r in doc["runs"]}
    corpus = load_corpus(None, max_bytes=a.max_bytes)
    tc = tokenize_corpus(corpus, a.vocab)
    for shape in a.shapes:
        spec = shape_spec(shape, a.vocab)
        for batch in a.batches:
            for lr in a.lrs:
                if (shape, batch, lr) in done:
                    continue
                cfg = space.training.updated(batch_size=batch, lr=lr, tokens=a.tokens)
                t0 = time.perf_counter()
                model, result = train_brief(spec, tc, cfg, device=a.device)
                bpb = evaluate_bpb(model, tc, cfg.eval_tokens, device=a.device).bpb
                row = {"shape": shape, "batch": batch, "lr": lr, "params": spec.params(), "steps": result.steps,
                       "tokens": result.tokens, "bpb": round(bpb, 4), "tokens_per_s": round(result.tokens_per_s),
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(row), flush=True)
                doc["runs"].append(row)
                doc["machine"] = machine(threads=a.threads, torch=torch.__version__, device=a.device)
                doc["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                doc["command"] = "bench/brief_schedule.py " + " ".join(sys.argv[1:] if argv is None else argv)
                write_json(a.out, doc, indent=2)
    print(f"{'shape':>8} {'batch':>5} {'lr':>8} {'steps':>5} {'BPB':>7} {'tok/s':>6}")
    for r in sorted(doc["runs"], key=lambda r: (r["shape"], -r["batch"], -r["lr"])):
        print(f"{r['shape']:>8} {r['batch']:>5} {r['lr']:>8.2e} {r['steps']:>5} {r['bpb']:>7.4f} "
              f"{r['tokens_per_s']:>6}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
