"""Training throughput: tokens/s of our brief training step against Hugging Face transformers'
``LlamaForCausalLM`` with the same architecture and the same weights, on the same machine.

    .venv/bin/python bench/train_throughput.py [--threads 2] [--rounds 5] [--steps 3] [--batch 16] [--quick]
        [--device cuda] [--compile] [--peak-tflops T] [--out bench/results/train_throughput.json]

For each architecture (GQA decoders at gqa_small's scale that Llama can express: RMSNorm, gated
FFN, no layer sharing), our ``nas.stages.model.Decoder`` and a ``LlamaForCausalLM`` built from
``nas.stages.hf.llama_config`` and loaded with ``nas.stages.hf.llama_state_dict`` of the same weights are trained
with the same ``nas.stages.train.train_step`` (same AdamW groups, loss, clipping), same batch, context,
torch threads and batches. The variants alternate in rounds (their order rotates), each round
timing ``--steps`` optimizer steps after a warm-up; tokens/s per round, median and spread, and the
per-round ratio ours/HF. Also the model FLOP rate by the 6·N·tokens estimate (N the non-embedding
parameters plus the lm_head).

On a GPU (``--device cuda``) training runs in bf16 autocast as the brief training does there,
``--compile`` adds a ``torch.compile`` variant of each model (compile time is kept out of the
timed rounds by the warm-up, and reported), and the FLOP rate is also given as model FLOPs
utilization against the GPU's dense bf16 peak (``--peak-tflops``, or a table of known GPUs).
Prints a table and writes JSON.
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

from nas.spec.arch import ArchSpec
from nas.spec.settings import TrainConfig
from nas.stages.hf import llama_config, llama_state_dict
from nas.stages.model import build_model
from nas.stages.train import make_optimizer, train_step

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


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a piece of
# the name torch reports; --peak-tflops overrides. The first match wins, so SXM before PCIe.
GPU_PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                        ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0)]


def gpu_peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in GPU_PEAK_BF16_TFLOPS if key in name), None)


def timed_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
                n: int, start: int, grad_clip: float, device: str, use_bf16: bool = False) -> float:
    """Seconds for ``n`` optimizer steps through ``nas.stages.train.train_step`` (the brief training's own step)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        x, y = batches[(start + i) % len(batches)]
        train_step(model, opt, x, y, lr=1e-3, grad_clip=grad_clip, use_bf16=use_bf16, step=i, total_steps=n)
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on cuda training is bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile variant of each model")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak for MFU (default: from a table of known GPUs)")
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

    cuda = args.device.startswith("cuda")
    use_bf16 = cuda and torch.cuda.is_bf16_supported()  # as nas.stages.train.train_brief decides
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if cuda else None
    peak = args.peak_tflops or (gpu_peak_tflops(gpu) if gpu else None)
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
        # Each variant steps its own model and optimizer; a compiled variant wraps the same module
        # as its eager twin, so it starts from wherever the eager one's steps left the weights.
        models: dict[str, nn.Module] = {"ours": ours, "hf": hf}
        if args.compile:
            models |= {"ours+compile": torch.compile(ours), "hf+compile": torch.compile(hf)}
        opts = {k: make_optimizer(m, cfg) for k, m in models.items()}
        rng = np.random.default_rng(0)
        windows = [torch.from_numpy(rng.integers(0, spec.vocab_size, (B, T + 1))) for _ in range(4)]
        batches = [(w[:, :-1].contiguous().to(args.device), w[:, 1:].contiguous().to(args.device)) for w in windows]
        warmup_s = {}
        for key in models:  # the first steps of a compiled variant compile it
            warmup_s[key] = timed_steps(models[key], opts[key], batches, args.warmup, 0, cfg.grad_clip, args.device,
                                        use_bf16)
        keys = list(models)
        per_round: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                s = timed_steps(models[key], opts[key], batches, args.steps, r * args.steps, cfg.grad_clip,
                                args.device, use_bf16)
                per_round[key].append(args.steps * B * T / s)
        ratios = [o / h for o, h in zip(per_round["ours"], per_round["hf"], strict=True)]
        matmul_params = spec.non_embedding_params() + spec.vocab_size * spec.d_model  # + lm_head
        row = {
            "name": name, "spec": fields, "summary": spec.summary(), "params": n_ours,
            "flop_params": matmul_params, "batch": B, "context": T, "max_abs_logit_diff": diff,
            "ours_tok_s": per_round["ours"], "hf_tok_s": per_round["hf"], "ratio_per_round": ratios,
            "ratio": spread(ratios), "warmup_s": warmup_s,
        }
        for key in keys:
            med = statistics.median(per_round[key])
            row[key] = spread(per_round[key])
            row[f"{key}_gflop_s_median"] = 6 * matmul_params * med / 1e9
            if peak:
                row[f"{key}_mfu_median"] = 6 * matmul_params * med / (peak * 1e12)
        if args.compile:
            row["ours_tok_s_compiled"] = per_round["ours+compile"]
            row["hf_tok_s_compiled"] = per_round["hf+compile"]
            row["ratio_compiled"] = spread([o / h for o, h in zip(per_round["ours+compile"], per_round["hf+compile"],
                                                                  strict=True)])
        results.append(row)
        print(f"{name}: {spec.summary()}, {n_ours / 1e6:.1f}M params, batch {B} x {T}, logits agree to {diff:.1e}"
              f"{', bf16 autocast' if use_bf16 else ''}")
        for key in keys:
            s = row[key]
            mfu = f", MFU {row[key + '_mfu_median']:.1%} of {peak:.0f} TFLOP/s" if peak else ""
            print(f"  {key:13s} {s['median']:8.0f} tok/s  [{s['min']:.0f}, {s['max']:.0f}]  "
                  f"~{row[key + '_gflop_s_median']:.0f} GFLOP/s (6·N·tokens){mfu}  (warm-up {warmup_s[key]:.1f} s)")
        print(f"  ours/HF per round: median {row['ratio']['median']:.3f} [{row['ratio']['min']:.3f}, "
              f"{row['ratio']['max']:.3f}]")
        if args.compile:
            rc = row["ratio_compiled"]
            print(f"  compiled, ours/HF per round: median {rc['median']:.3f} [{rc['min']:.3f}, {rc['max']:.3f}]")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads(), device=args.device, gpu=gpu,
                    peak_bf16_tflops=peak),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "setup": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                  "batch": args.batch, "interleaved": True, "attn_implementation_hf": "sdpa",
                  "dtype": "bf16 autocast" if use_bf16 else "float32", "compile": args.compile},
        "results": results,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
