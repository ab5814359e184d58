"""What a search is asked to do: its settings, the objectives it can minimize, its samplers, and
what it reports as it goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nas.spec.settings import TrainConfig

# name -> (direction, what it is). Every objective is minimized: lower is better for each.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_bpb": ("minimize", "validation bits per byte of the quantized model, in ONNX Runtime"),
    "decode_ms": ("minimize", "decode latency per token at the profile's context (median)"),
    "prefill_ms": ("minimize", "prefill latency of the profile's prompt (median)"),
    "peak_memory_mb": ("minimize", "peak resident memory of the inference process, MiB"),
    "model_mb": ("minimize", "size of the deployed model files, MiB"),
    "params": ("minimize", "unique parameters"),
}
DEFAULT_OBJECTIVES = ("val_bpb", "decode_ms")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
STAGES = ("sample", "budget", "measure", "train", "score")


@dataclass(frozen=True)
class SearchConfig:
    study: str
    space: str
    device: str
    db_url: str
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    sampler: str = "tpe"
    seed: int = 0
    train: TrainConfig | None = None
    """The study's brief training; None takes the space's default."""
    data: str | None = None
    max_bytes: int | None = None
    artifacts: Path = Path("nas_artifacts")
    require_measured: bool = False
    torch_device: str = "cpu"
    heartbeat_s: int = 10
    grace_s: int = 60
    max_retry: int = 1
    """How often a trial whose worker died is tried again."""
    rungs: int = 1
    """Rungs of successive halving on the training budget (``nas.search.rungs``): 1 trains every
    trial on the whole budget; 3 scores at 1/9, 1/3 and all of it, a trial going on only while in
    the top 1/eta at its rung."""
    eta: int = 3
    noise_seeds: int | None = None
    """Extra training seeds of one architecture that measure the study's seed spread of BPB
    (``nas.search.noise``); None: 2 with rungs (they train to the first rung only), 0 without
    (they would cost two whole trainings: ask for them)."""
    other_bitwidths: bool | None = None
    """When a trial lands on the front, queue its architecture at the space's other bitwidths as
    trials of their own that take its trained weights instead of training (quantization comes
    after training, so training again would give the same weights): each costs a measurement and
    a score, and shows what another bitwidth of a front architecture gains or loses. A trial off
    the front gets the bitwidths at which it would be on it: its BPB with that bitwidth's
    predicted figures dominated by no trial at its rung (``nas.search.trial.predicted_twin``).
    None: on with rungs (a search of many cheap trials), off without (one trial per draw, as ever)."""
    front_neighbours: bool | None = None
    """When a trial trained past the first rung lands on the front, queue its architecture one
    step cheaper along width and along depth (the space's ``d_model`` choice below, its
    ``n_layers`` step below), as trials of their own that train through the rungs. Cheaper to
    train and faster to run than the trial they come from, they fill the front's fast end, which
    the sampler may never draw: a seeded search whose 4-layer draws were all wide left a front of
    one architecture. A neighbour that lands on the front queues its own, so the search walks down
    the front until a step falls off it. None: on with rungs, off without."""
    stage_deadline_factor: float = 10.0
    """The export and score stages fail a trial past this many times their normal cost
    (``nas.search.deadline``)."""


def noise_seeds(cfg: SearchConfig) -> int:
    """The extra seeds the study's noise is measured with (``SearchConfig.noise_seeds``)."""
    if cfg.noise_seeds is not None:
        return cfg.noise_seeds
    return 2 if cfg.rungs > 1 else 0


def other_bitwidths(cfg: SearchConfig) -> bool:
    """Whether front trials' other bitwidths are queued (``SearchConfig.other_bitwidths``)."""
    return cfg.other_bitwidths if cfg.other_bitwidths is not None else cfg.rungs > 1


def front_neighbours(cfg: SearchConfig) -> bool:
    """Whether front trials' cheaper neighbours are queued (``SearchConfig.front_neighbours``)."""
    return cfg.front_neighbours if cfg.front_neighbours is not None else cfg.rungs > 1


class SearchEvents:
    """What the search reports as it goes; the methods do nothing here. The CLI subclasses it to
    draw a progress display; a script passes this class itself to hear nothing."""

    def message(self, text: str) -> None: ...
    def trial_started(self, number: int) -> None: ...
    def stage(self, number: int, stage: str, detail: str) -> None: ...
    def stage_step(self, stage: str, step: str) -> None: ...
    def train_progress(self, number: int, step: int, total: int, loss: float) -> None: ...
    def trial_finished(self, number: int, state: str, summary: str) -> None: ...
    def trials_done(self, units: float) -> None:
        """How many trials' worth have run so far (each counts its share of the training budget)."""
