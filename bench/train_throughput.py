"""Training throughput: tokens/s of our brief training step against Hugging Face transformers'
``LlamaForCausalLM`` with the same architecture and the same weights, on the same machine.

    .venv/bin/python bench/train_throughput.py [--threads 2] [--rounds 5] [--steps 3] [--batch 16] [--quick]
        [--out bench/results/train_throughput.json]

For each architecture (GQA decoders at gqa_small's scale that Llama can express: RMSNorm, gated
FFN, no layer sharing), our ``nas.model.Decoder`` and a ``LlamaForCausalLM`` built from
``nas.hf.llama_config`` and loaded with ``nas.hf.llama_state_dict`` of the same weights are trained
with the same ``nas.train.train_step`` (same AdamW groups, loss, clipping), same batch, context,
torch threads and batches. The two alternate in rounds (which one goes first alternates too), each
round timing ``--steps`` optimizer steps after a warm-up; tokens/s per round, median and spread,
and the per-round ratio ours/HF. Also the model FLOP rate by the 6·N·tokens estimate (N the
non-embedding parameters plus the lm_head). CPU only here: on a GPU the same script runs with
``--device cuda`` (not taken on this machine). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, spread  # bench/ is on sys.path: the scripts run as python bench/NAME.py
from torch import nn

from nas.arch import ArchSpec
from nas.hf import llama_config, llama_state_dict
from nas.model import build_model
from nas.settings import TrainConfig
from nas.train import make_optimizer, train_step

SPECS = {
    # name -> ArchSpec fields; both are points of gqa_small (5M-60M parameters, context 256)
    "gqa-d256-L6": dict(vocab_size=4096, d_model=256, n_layers=6, attention="gqa", n_heads=8, n_kv_heads=2,
                        head_dim=32, ffn="gated", ffn_ratio=3.0, activation="silu", norm="rmsnorm",
                        tied_embeddings=True, context_length=256),
    "gqa-d384-L8": dict(vocab_size=8192, d_model=384, n_layers=8, attention="gqa", n_heads=8, n_kv_heads=2,
                        head_dim=48, ffn="gated", ffn_ratio=3.0, activation="silu", norm="rmsnorm",
                        tied_embeddings=False, context_length=256),
}
QUICK_SPEC = dict(vocab_size=512, d_model=64, n_layers=2, attention="gqa", n_heads=4, n_kv_heads=2, head_dim=16,
                  ffn="gated", ffn_ratio=2.0, activation="silu", norm="rmsnorm", tied_embeddings=False,
                  context_length=64)


class LogitsOnly(nn.Module):
    """HF returns a ModelOutput; train_step wants logits, as our Decoder returns them."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x, use_cache=False).logits


def hf_twin(ours: nn.Module, spec: ArchSpec) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = llama_config(spec)
    cfg.pop("architectures")
    cfg.pop("torch_dtype")
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(llama_state_dict(ours), strict=False)
    missing = [k for k in missing if not (spec.tied_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    if spec.tied_embeddings:
        hf.tie_weights()
    return LogitsOnly(hf)


def timed_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
                n: int, start: int, grad_clip: float, device: str) -> float:
    """Seconds for ``n`` optimizer steps through ``nas.train.train_step`` (the brief training's own step)."""
    t0 = time.perf_counter()
    for i in range(n):
        x, y = batches[(start + i) % len(batches)]
        train_step(model, opt, x, y, lr=1e-3, grad_clip=grad_clip, use_bf16=False, step=i, total_steps=n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--quick", action="store_true", help="smoke test: one toy spec, 2 rounds of 1 step")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = {"quick-toy": QUICK_SPEC} if args.quick else {k: SPECS[k] for k in args.specs}
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 2, 1, 1, 4
    cfg = TrainConfig(batch_size=args.batch)
    import transformers

    results = []
    for name, fields in specs.items():
        spec = ArchSpec(**fields)
        T, B = spec.context_length, args.batch
        ours = build_model(spec, seed=0).to(args.device).train()
        hf = hf_twin(ours, spec).to(args.device).train()
        n_ours = sum(p.numel() for p in ours.parameters())
        n_hf = sum(p.numel() for p in hf.parameters())
        if n_ours != n_hf:
            raise RuntimeError(f"{name}: parameter counts differ, ours {n_ours:,} vs HF {n_hf:,}")
        # Same weights, same function: check once before timing anything.
        x0 = torch.randint(0, spec.vocab_size, (2, T), device=args.device)
        with torch.no_grad():
            diff = (ours(x0) - hf(x0)).abs().max().item()
        models = {"ours": ours, "hf": hf}
        opts = {k: make_optimizer(m, cfg) for k, m in models.items()}
        rng = np.random.default_rng(0)
        windows = [torch.from_numpy(rng.integers(0, spec.vocab_size, (B, T + 1))) for _ in range(4)]
        batches = [(w[:, :-1].contiguous().to(args.device), w[:, 1:].contiguous().to(args.device)) for w in windows]
        for key in models:
            timed_steps(models[key], opts[key], batches, args.warmup, 0, cfg.grad_clip, args.device)
        per_round: dict[str, list[float]] = {"ours": [], "hf": []}
        for r in range(args.rounds):
            order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
            for key in order:
                s = timed_steps(models[key], opts[key], batches, args.steps, r * args.steps, cfg.grad_clip,
                                args.device)
                per_round[key].append(args.steps * B * T / s)
        ratios = [o / h for o, h in zip(per_round["ours"], per_round["hf"], strict=True)]
        matmul_params = spec.non_embedding_params() + spec.vocab_size * spec.d_model  # + lm_head
        row = {
            "name": name, "spec": fields, "summary": spec.summary(), "params": n_ours,
            "flop_params": matmul_params, "batch": B, "context": T, "max_abs_logit_diff": diff,
            "ours_tok_s": per_round["ours"], "hf_tok_s": per_round["hf"], "ratio_per_round": ratios,
            "ours": spread(per_round["ours"]), "hf": spread(per_round["hf"]), "ratio": spread(ratios),
            "ours_gflop_s_median": 6 * matmul_params * statistics.median(per_round["ours"]) / 1e9,
            "hf_gflop_s_median": 6 * matmul_params * statistics.median(per_round["hf"]) / 1e9,
        }
        results.append(row)
        print(f"{name}: {spec.summary()}, {n_ours / 1e6:.1f}M params, batch {B} x {T}, logits agree to {diff:.1e}")
        for key in ("ours", "hf"):
            s = row[key]
            print(f"  {key:5s} {s['median']:8.0f} tok/s  [{s['min']:.0f}, {s['max']:.0f}]  "
                  f"~{row[key + '_gflop_s_median']:.0f} GFLOP/s (6·N·tokens)")
        print(f"  ours/HF per round: median {row['ratio']['median']:.3f} [{row['ratio']['min']:.3f}, "
              f"{row['ratio']['max']:.3f}]")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads(), device=args.device,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "setup": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                  "batch": args.batch, "interleaved": True, "attn_implementation_hf": "sdpa", "dtype": "float32"},
        "results": results,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
