"""Run settings: plain, validated values (pydantic), importable without torch."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nas.spec.errors import NasError


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
    """Peak learning rate of a model ``lr_base_width`` wide (and of the embedding and norms of any)."""
    lr_rule: Literal["width", "constant"] = "constant"
    """How the peak rate follows the architecture. ``width``: the hidden matrices (attention and
    FFN projections) of a model ``d_model`` wide get ``lr * lr_base_width / d_model``, the token
    embedding, the lm_head and the norm gains ``lr`` itself: Adam's update of a matrix moves its
    output by about lr x fan-in, so one rate for every width trains a wide model too hot and a narrow
    one too cold, and the brief ranking then favours the widths the rate suits (muP, Yang et al.
    2022, Table 3, for Adam). ``constant`` (the default, and what studies made before the rule
    trained with): ``lr`` for every parameter. A space chooses its rule and base width in its
    ``training:`` section, where its widths are known."""
    lr_base_width: int = Field(256, gt=0)
    """The width at which ``lr`` is every parameter's rate under the ``width`` rule."""
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

    def updated(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, validated like the original (``model_copy`` would skip that,
        and a budget of 0 tokens would then train one step and be stored as a result)."""
        try:
            return TrainConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise NasError(f"training {field}: {first['msg']}, got {first.get('input')!r}") from None


STUDY_NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', beginning with a letter or a digit"
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(name: str) -> str:
    """``name`` if it is a valid study name, else a NasError saying the rule. A study's name is
    also the folder of its artifacts (``--artifacts/NAME``), a URL path segment of the web page
    and an Optuna study name, so one rule that every one of them accepts: no path separators, no
    leading dot (no ``..``), no control characters, short enough for any filesystem."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise NasError(f"study name {name!r} is not allowed: use {STUDY_NAME_RULE}")
    return name


def default_study_name(space: str, device: str) -> str:
    """SPACE-DEVICE from the names (or file stems) of the space and the profile, with any
    character the rule does not allow replaced by '-'."""
    from pathlib import Path

    raw = f"{Path(space).stem}-{Path(device).stem}"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", raw).lstrip("._-")[:100]
    return check_study_name(name or "study")
