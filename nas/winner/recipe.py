"""The full-training recipe of a winner, scaled from the study's brief training
(:func:`suggest_recipe`): what ``recipe.json`` holds, the README explains and ``nas train`` runs."""

from __future__ import annotations

import math
from typing import Any

from nas.spec.arch import ArchSpec
from nas.spec.settings import TrainConfig
from nas.winner.errors import WinnerError

CHINCHILLA_TOKENS_PER_PARAM = 20
OVERTRAINED_TOKENS_PER_PARAM = (100, 1000)
TARGET_STEPS = 5000
"""Grow the batch until a budget takes about this many optimizer steps (never shrink it)."""
MAX_BATCH_FACTOR = 8
"""At most 8x the brief training's batch: there is no gradient accumulation, and the brief batch is
what was known to fit."""
MAX_LR_FACTOR = 2.0
MAX_SUBSET_EPOCHS = 4
"""`nas train` keeps the study's corpus subset while the budget is at most this many epochs of it,
else it trains on the whole source. Repeated data returns less and less past a few epochs
(Muennighoff et al. 2023, "Scaling data-constrained language models"); measured here, 29 epochs of
a 300 kB subset (90k tokens) took a 129k-param model's validation BPB from 2.81 at mid-run back up
to 2.85 at the end while its training loss kept falling."""
CHINCHILLA = f"chinchilla_{CHINCHILLA_TOKENS_PER_PARAM}x"
"""The default budget's name in ``token_budgets``."""


def token_budgets(params: int) -> dict[str, int]:
    """The named token budgets for a model of ``params`` parameters, Chinchilla's first."""
    return {CHINCHILLA: CHINCHILLA_TOKENS_PER_PARAM * params,
            **{f"overtrained_{k}x": k * params for k in OVERTRAINED_TOKENS_PER_PARAM}}


def suggest_recipe(spec: ArchSpec, brief: TrainConfig, *, tokens: int | None = None, batch_size: int | None = None,
                   lr: float | None = None, train_tokens: int | None = None) -> dict[str, Any]:
    """A full-training plan for ``spec``, scaled from the study's brief training ``brief``.

    - Tokens: Chinchilla's compute-optimal ~20 tokens per parameter (Hoffmann et al. 2022) by
      default; small models meant for deployment are trained far past it, because inference cost
      and not training cost is what they save (100-1000+ tokens per parameter: TinyLlama 1.1B on
      3T tokens, ~2,700/param; Llama 3 8B on 15T, ~1,900/param).
    - Batch: the brief batch grown by a power of two k (1..8) until the budget takes about
      ``TARGET_STEPS`` steps, so that long runs use larger, less noisy batches.
    - Learning rate: the brief LR times sqrt(k), Adam's square-root scaling rule for a k-times
      batch (Malladi et al. 2022), capped at 2x: the brief LR is already a high one for models of
      this size.
    - Warm-up: 2% of the steps, at least 100 and at most 2,000, never over 10% of the run.
    - Schedule: cosine from the peak to ``brief.min_lr_ratio`` of it, as the brief training
      (``nas.stages.train.lr_at``), AdamW with the brief run's betas, weight decay and clipping.

    ``tokens``, ``batch_size`` and ``lr`` given replace the suggestion (the rest is derived from
    them); ``train_tokens`` (the corpus's training split) adds how many epochs a budget is.
    """
    n, T = spec.params(), spec.context_length
    budgets = token_budgets(n)
    tokens = budgets[CHINCHILLA] if tokens is None else tokens
    if tokens <= 0:
        raise WinnerError(f"the token budget must be positive, got {tokens}")
    if batch_size is None:
        batch_size = brief.batch_size * _batch_growth(tokens, brief.batch_size * T)
    if batch_size <= 0:
        raise WinnerError(f"the batch size must be positive, got {batch_size}")
    lr, lr_rule = _learning_rate(brief, batch_size / brief.batch_size, lr)
    steps = max(1, math.ceil(tokens / (batch_size * T)))
    recipe: dict[str, Any] = {
        "params": n, "non_embedding_params": spec.non_embedding_params(), "token_budgets": budgets,
        "tokens": tokens, "tokens_per_param": tokens / n, "context_length": T, "batch_size": batch_size,
        "tokens_per_step": batch_size * T, "steps": steps, "lr": lr, "lr_rule": lr_rule,
        # the brief training's per-parameter factor (TrainConfig.lr_rule) carries over unchanged
        "hidden_lr": lr * (brief.lr_base_width / spec.d_model if brief.lr_rule == "width" else 1.0),
        "warmup_steps": min(max(100, round(0.02 * steps)), 2000, max(1, steps // 10)),
        "schedule": "linear warm-up, then cosine decay to min_lr_ratio x lr (nas.stages.train.lr_at)",
        "min_lr_ratio": brief.min_lr_ratio,
        "optimizer": {"name": "AdamW", "betas": [brief.beta1, brief.beta2], "weight_decay": brief.weight_decay,
                      "decay": "matrices only", "grad_clip": brief.grad_clip},
        "eval_every": max(1, steps // 20), "eval_tokens": brief.eval_tokens,
        "checkpoint_every": max(1, steps // 20), "seed": brief.seed, "brief_training": brief.model_dump(),
    }
    if train_tokens:
        recipe["train_split_tokens"] = train_tokens
        recipe["epochs"] = tokens / train_tokens
        recipe["epochs_at_budgets"] = {k: v / train_tokens for k, v in budgets.items()}
    return recipe


def _batch_growth(tokens: int, brief_tokens_per_step: int) -> int:
    """The power of two (1..MAX_BATCH_FACTOR) the brief batch grows by for ``tokens``."""
    k = 2 ** round(math.log2(max(1.0, tokens / (TARGET_STEPS * brief_tokens_per_step))))
    return int(min(MAX_BATCH_FACTOR, max(1, k)))


def _learning_rate(brief: TrainConfig, growth: float, lr: float | None) -> tuple[float, str]:
    """(peak lr, how it was set): the given one, else the square-root rule for the batch growth."""
    lr_rule = "given"
    if lr is None:
        lr_rule = f"brief lr {brief.lr:g} x min(sqrt(batch growth {growth:g}), {MAX_LR_FACTOR:g})"
        lr = brief.lr * min(math.sqrt(growth), MAX_LR_FACTOR)
    if not (math.isfinite(lr) and lr > 0):
        raise WinnerError(f"the learning rate must be positive, got {lr}")
    return lr, lr_rule
