"""Brief training and bits-per-byte scoring: the quality half of a trial.

Every trial of a study gets the same budget (tokens, optionally seconds), AdamW with linear
warm-up and cosine decay, gradient clipping and a fixed seed, so that two architectures differ
only by what they are. A loss that turns NaN or infinite ends the trial with a TrainingError that
says when and at which learning rate.

Quality is reported in bits per byte (BPB): the summed negative log-likelihood of the validation
targets, in bits, over the UTF-8 bytes those targets stand for. Unlike loss per token it does not
depend on how many bytes a vocabulary packs into a token, so vocabularies compare fairly.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nas.spec.arch import ArchSpec
from nas.spec.errors import TrainingError
from nas.spec.settings import TrainConfig
from nas.stages.data import TokenizedCorpus, WindowSampler, stack_windows, val_windows
from nas.stages.model import Decoder, build_model


@dataclass(frozen=True)
class CurvePoint:
    step: int
    tokens: int
    loss: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    """Mean training loss (nats/token) over the last logging interval."""
    stopped_by: str
    """"tokens" or "seconds": which budget ended training."""
    curve: tuple[CurvePoint, ...] = field(repr=False)


@dataclass(frozen=True)
class BpbResult:
    bpb: float
    nll_bits: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean NLL per token in nats, for comparison with the training loss."""
        return self.nll_bits * math.log(2) / self.tokens


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at the end.

    ``progress`` (0..1), when given, replaces the step-based position in the decay; a time
    budget uses it so that the schedule ends when the time does.
    """
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if progress is None:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def lr_scale(name: str, param: torch.Tensor, spec: ArchSpec | None, cfg: TrainConfig) -> float:
    """The factor on the peak learning rate of parameter ``name`` (``TrainConfig.lr_rule``): under
    ``width``, base width / d_model for the hidden matrices, 1 for the embedding, the lm_head (tied
    or not: it is the embedding's table) and every vector (norm gains)."""
    if spec is None or cfg.lr_rule == "constant" or param.dim() < 2 or name.startswith(("tok_emb.", "lm_head.")):
        return 1.0
    return cfg.lr_base_width / spec.d_model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``, one group per (weight decay, learning-rate factor); ``train_step``
    sets each group's rate from the schedule. A Decoder's ``spec`` sets the width rule's factors;
    another module (a reference implementation in a benchmark) trains every parameter at ``lr``."""
    spec: ArchSpec | None = getattr(model, "spec", None)
    if spec is None:
        cfg = cfg.updated(lr_rule="constant")
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # a tied table is listed once, under tok_emb
        if id(p) in seen:
            continue
        seen.add(id(p))
        # Decay matrices only: decaying norm gains pulls them towards 0 for no benefit.
        groups.setdefault((p.dim() >= 2, lr_scale(name, p, spec, cfg)), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale, "lr_scale": scale}
         for (decay, scale), ps in sorted(groups.items())],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
    )


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               lr: float, grad_clip: float, use_bf16: bool, step: int, total_steps: int) -> float:
    """One optimizer step at the schedule's learning rate ``lr`` (times each parameter group's
    ``lr_scale``); returns the batch's loss (nats/token).

    Shared by the brief training here and the full training of ``nas.winner.fulltrain``, so that a model
    trained fully is trained exactly as the search trained it, only for longer. ``model`` may be a
    ``torch.compile`` wrapper. A non-finite loss raises TrainingError naming the step (counted
    from 1) and the learning rate, before the weights are touched.
    """
    for group in opt.param_groups:  # each group at its factor of the schedule's rate (make_optimizer)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise TrainingError(
            f"training diverged: loss is {loss_value} at step {step + 1} of {total_steps} (lr {lr:.3g})"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss_value


ProgressFn = Callable[[CurvePoint, int], None]
"""Called every cfg.log_every steps with the latest point and the total step count."""

CHECKPOINT_FORMAT = "nas-train-state-v1"


@dataclass
class TrainState:
    """Where a brief training stands after some steps: everything a later call needs to go on
    as if it had never stopped (the schedule is defined on the whole budget, ``cfg.tokens``, so a
    run stopped at a rung and continued equals one that was not stopped)."""

    spec: dict
    cfg: dict
    step: int
    model: dict
    optimizer: dict
    sampler: dict
    torch_rng: torch.Tensor
    curve: list[CurvePoint]
    window: list[float]
    """Losses since the last logged point, so the next point averages the same steps."""
    seconds: float
    """Training seconds spent so far, over every call."""

    def save(self, path: Path) -> Path:
        """Write the state atomically (a resumed trial must never read a torn file)."""
        from nas.spec.files import atomic_write

        payload = {"format": CHECKPOINT_FORMAT, **dataclasses.asdict(self)}
        payload["curve"] = [dataclasses.astuple(p) for p in self.curve]
        return atomic_write(path, lambda f: torch.save(payload, f), fsync=True)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            d = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise TrainingError(f"{path}: cannot read the training state: {e}") from None
        if not isinstance(d, dict) or d.pop("format", None) != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path}: not a training state of this version")
        d["curve"] = [CurvePoint(*p) for p in d["curve"]]
        return cls(**d)


def train_brief(
    spec: ArchSpec,
    data: TokenizedCorpus,
    cfg: TrainConfig,
    *,
    model: Decoder | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Decoder, TrainResult]:
    """Train a fresh model (or ``model``) of ``spec`` for the whole budget in ``cfg``.

    ``should_stop`` is asked before every step; when it answers True training stops at once
    with KeyboardInterrupt (a requested stop of the whole run, not a result)."""
    model, result, _ = train_until(spec, data, cfg, model=model, device=device, progress=progress,
                                   should_stop=should_stop)
    return model, result


def train_until(
    spec: ArchSpec,
    data: TokenizedCorpus,
    cfg: TrainConfig,
    *,
    until_tokens: int | None = None,
    resume: TrainState | None = None,
    model: Decoder | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Decoder, TrainResult, TrainState]:
    """Train ``spec`` on the schedule of the whole budget ``cfg.tokens``, stopping after
    ``until_tokens`` (a rung; None: the whole budget), from ``resume`` when given.

    The learning-rate schedule, the data order and the optimizer's state depend only on the
    step, so stopping at a rung and resuming from the returned state gives the very weights an
    uninterrupted run reaches. The result covers every step so far (resumed ones included)."""
    if data.vocab_size != spec.vocab_size:
        raise TrainingError(f"corpus tokenized with vocab {data.vocab_size}, spec wants {spec.vocab_size}")
    T = spec.context_length
    if len(data.train_ids) <= T + 1:
        raise TrainingError(f"training split has {len(data.train_ids)} tokens, fewer than one window of {T + 1}")
    if (until_tokens is not None or resume is not None) and cfg.seconds is not None:
        raise TrainingError("a time budget cannot be stopped at a rung and resumed: its schedule follows the clock")
    if model is None:
        model = build_model(spec, seed=cfg.seed)
    model.to(device).train()
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()

    tokens_per_step = cfg.batch_size * T
    total_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    end_step = total_steps
    if until_tokens is not None:
        end_step = min(total_steps, max(1, math.ceil(until_tokens / tokens_per_step)))
    warmup_steps = max(1, round(total_steps * cfg.warmup_tokens_frac))
    opt = make_optimizer(model, cfg)
    sampler = WindowSampler(data.train_ids, cfg.batch_size, T, seed=cfg.seed)

    curve: list[CurvePoint] = []
    window: list[float] = []
    first_step, seconds_before = 0, 0.0
    if resume is not None:
        if resume.spec != spec.to_dict() or resume.cfg != cfg.model_dump():
            raise TrainingError("the training state was made for another spec or training config")
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        sampler.restore(resume.sampler)
        torch.set_rng_state(resume.torch_rng)
        first_step, seconds_before = resume.step, resume.seconds
        curve, window = list(resume.curve), list(resume.window)
    start = time.perf_counter()
    stopped_by = "tokens"
    step = first_step
    lr = lr_at(step, total_steps, warmup_steps, cfg)
    for step in range(first_step, end_step):
        elapsed = time.perf_counter() - start
        time_progress = None
        if cfg.seconds is not None:
            if elapsed >= cfg.seconds:
                stopped_by = "seconds"
                break
            step_progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            time_progress = max(step_progress, elapsed / cfg.seconds)
        lr = lr_at(step, total_steps, warmup_steps, cfg, time_progress)
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        x_np, y_np = sampler.next()
        x = torch.from_numpy(x_np).to(device, non_blocking=True)
        y = torch.from_numpy(y_np).to(device, non_blocking=True)
        loss_value = train_step(model, opt, x, y, lr=lr, grad_clip=cfg.grad_clip, use_bf16=use_bf16,
                                step=step, total_steps=total_steps)

        window.append(loss_value)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            point = CurvePoint(step + 1, (step + 1) * tokens_per_step, float(np.mean(window)), lr,
                               seconds_before + time.perf_counter() - start)
            curve.append(point)
            window.clear()
            if progress is not None:
                progress(point, total_steps)
    else:
        step = end_step  # the loop ran to its end

    steps_done = step
    seconds = seconds_before + time.perf_counter() - start
    state = TrainState(spec=spec.to_dict(), cfg=cfg.model_dump(), step=steps_done,
                       model={k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
                       optimizer=_cpu(opt.state_dict()), sampler=sampler.state(), torch_rng=torch.get_rng_state(),
                       curve=list(curve), window=list(window), seconds=seconds)
    shown = list(curve)
    if window:  # stopped between logging points (a rung or a time budget): show where it ended
        shown.append(CurvePoint(steps_done, steps_done * tokens_per_step, float(np.mean(window)), lr, seconds))
    tokens = steps_done * tokens_per_step
    return model, TrainResult(
        steps=steps_done, tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
        final_loss=shown[-1].loss if shown else float("nan"), stopped_by=stopped_by, curve=tuple(shown),
    ), state


def _cpu(obj: Any) -> Any:
    """A deep copy of an optimizer state with every tensor on the CPU (a state must outlive the
    model it came from, and load on a machine without the GPU it was made on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def evaluate_bpb(model: Decoder, data: TokenizedCorpus, max_tokens: int | None = None,
                 device: str = "cpu", batch_size: int = 16) -> BpbResult:
    """Bits per byte of ``model`` on the first ``max_tokens`` validation targets."""
    model.eval()
    token_bytes = torch.from_numpy(np.asarray(data.token_bytes, dtype=np.int64))
    nll_nats = 0.0
    n_tokens = n_bytes = 0
    for x_np, y_np in stack_windows(val_windows(data.val_ids, model.spec.context_length, max_tokens), batch_size):
        x = torch.from_numpy(x_np).to(device)
        y = torch.from_numpy(y_np)
        logits = model(x).float().cpu()
        nll_nats += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
        n_tokens += y.numel()
        n_bytes += int(token_bytes[y].sum())
    model.train()
    if n_bytes == 0:
        raise TrainingError("validation split is empty: nothing to score")
    bits = nll_nats / math.log(2)
    return BpbResult(bpb=bits / n_bytes, nll_bits=bits, tokens=n_tokens, bytes=n_bytes)
