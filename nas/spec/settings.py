"""Run settings: plain, validated values (pydantic), importable without torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """The brief training every trial of a study gets. Sequences are the spec's context_length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(300_000, gt=0)
    """Training budget in tokens (batch_size x context_length per step); the schedule's length."""
    seconds: float | None = Field(None, gt=0)
    """Optional wall-clock budget; when set, training stops at whichever budget ends first and
    the cosine schedule follows the larger of the two progress fractions."""
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decays to lr * min_lr_ratio."""
    warmup_tokens_frac: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    eval_tokens: int = Field(65_536, gt=0)
    """Validation targets scored for BPB (the first ones of the validation split: a fixed set)."""
    seed: int = 0
    log_every: int = Field(10, gt=0)
    """Steps between loss lines / progress updates."""
