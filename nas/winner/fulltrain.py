"""Full training of an exported architecture: ``nas train DIR``.

The export folder (``nas.winner.folder``) holds the spec, the tokenizer, the brief-trained weights and a
recipe; this stage trains the spec for the recipe's budget with the search's own optimizer,
schedule and step (``nas.stages.train.make_optimizer``, ``lr_at``, ``train_step``, ``evaluate_bpb``), so
the full run differs from a trial's only in length and batch. Layout it adds to DIR::

    checkpoints/run.json          the resolved run (budget, batch, lr, data, ...): what a resume must match
    checkpoints/train.lock        held (flock) by the process training the folder; holds its pid
    checkpoints/step-00001234.pt  model, optimizer, step, RNG states, data position, curve (the last 2 kept)
    trained/model.pt              the final weights, in the search's format {"spec", "state_dict", "train_config"}
    trained/onnx/                 the final model exported and quantized at the spec's bitwidth (nas.stages.export)
    trained/hf/                   LlamaForCausalLM folder, where Llama can express the spec
    trained/report.json           steps, tokens, losses, validation BPB in torch and of the quantized ONNX file

Choices, and why:

- From scratch by default (``init="scratch"``, the brief run's seed: the same initial weights as
  the trial): the brief weights saw a negligible share of a full budget, on a schedule that had
  already decayed. ``init="exported"`` starts from them (the warm-up then re-warms them).
- Resume is exact: a checkpoint holds the model, AdamW's moments, the step, torch's RNG states and
  the data position (the window sampler's generator state), so an interrupted run that resumes
  takes the same steps on the same batches as one that was never interrupted; the tests check
  that the loss curves are equal. A checkpoint is written to a temporary name and moved into
  place, so a kill mid-write leaves the previous one intact.
- A checkpoint that does not load all the same (cut short by a full disk or a partial copy,
  damaged on the disk) is not the end of the run: the newest one that
  loads is resumed from, the steps after it are redone exactly, and the bad file is moved aside
  (``<name>.unreadable``, kept for inspection, out of the count of checkpoints kept) with one
  line saying which and why. Only when none loads is it an error, naming the folder.
- One process per folder: two runs of one folder would overwrite each other's checkpoints and
  both believe they resume the run, so ``train_full`` holds an exclusive ``flock`` on
  ``checkpoints/train.lock`` for the whole run and a second one fails at once, naming the
  holder's pid. The kernel drops the lock when the holder dies, however it dies, so a killed run
  leaves no stale lock; the file stays (deleting it would let a third process lock a new file
  while a second still holds the old one).
- Interrupts: the caller passes ``should_stop`` (the CLI sets it on SIGINT/SIGTERM); the loop
  finishes the current step, checkpoints and returns. ``max_steps`` stops the same way after that
  many steps (the schedule still spans the whole budget), to train in slices.
- On a GPU, bf16 autocast and ``torch.compile`` by default; on the CPU neither (autocast here is
  CUDA's, and compile was measured no faster on these CPUs for a 30-40 s first step). These,
  the device and ``max_steps`` may change between sessions of one run; what the run computes
  (budget, batch, learning rate, data, initialization) may not.
- The data is tokenized with the exported ``tokenizer.json`` itself, never a re-trained one (a
  retrained BPE may differ), and cached in ``DIR/data``; by default the study's corpus, so the
  validation BPB compares with the search's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from nas.spec.errors import NasError
from nas.spec.files import atomic_write
from nas.spec.settings import TrainConfig
from nas.stages.data import TokenizedCorpus, WindowSampler, tokenize_with_file
from nas.stages.model import Decoder, build_model
from nas.stages.train import CurvePoint, evaluate_bpb, lr_at, make_optimizer, train_step
from nas.winner.folder import WinnerExport, load_winner
from nas.winner.recipe import MAX_SUBSET_EPOCHS, suggest_recipe

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
TRAINED = "trained"
REPORT = "report.json"
CHECKPOINT_FORMAT = "nas-fulltrain-v1"
# What a checkpoint must hold for a resume; one that lacks any of them is skipped as unreadable.
CHECKPOINT_KEYS = ("step", "model", "optimizer", "sampler", "torch_rng", "seconds", "curve", "evals", "window")
UNREADABLE_SUFFIX = ".unreadable"
INITS = ("scratch", "exported")


class FullTrainError(NasError):
    """A full-training request that cannot go on: a bad setting, a resume that does not match."""


class RunConfig(BaseModel):
    """One full-training run, fully resolved: saved beside the checkpoints so that running the same
    command again resumes exactly this run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch_id: str
    init: Literal["scratch", "exported"]
    data: str
    max_bytes: int | None
    corpus_fingerprint: str
    tokenizer_sha256: str
    tokens: int
    batch_size: int
    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    seed: int
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    log_every: int
    keep_checkpoints: int = 2
    lr_rule: Literal["width", "constant"] = "constant"
    """The brief training's per-parameter rule (``TrainConfig.lr_rule``); a run saved before the
    rule existed trained every parameter at ``lr`` and resumes so."""
    lr_base_width: int = 256

    def train_config(self) -> TrainConfig:
        """The brief-training value the shared optimizer and schedule read."""
        return TrainConfig(
            tokens=self.tokens, batch_size=self.batch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
            warmup_tokens_frac=min(0.99, self.warmup_steps / self.total_steps), weight_decay=self.weight_decay,
            beta1=self.beta1, beta2=self.beta2, grad_clip=self.grad_clip, eval_tokens=self.eval_tokens,
            seed=self.seed, log_every=self.log_every, lr_rule=self.lr_rule, lr_base_width=self.lr_base_width,
        )


@dataclass(frozen=True)
class Overrides:
    """What the user asked for; None means "the recipe's" (or, on resume, the run's)."""

    data: str | None = None
    max_bytes: int | None = None
    tokens: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    init: str | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None


class FullTrainEvents:
    """What full training reports as it goes; the methods do nothing here. The CLI subclasses it
    to draw a progress bar; a script passes this class itself to hear nothing."""

    def message(self, text: str) -> None: ...
    def started(self, step: int, total_steps: int, resumed: bool) -> None: ...
    def stepped(self, step: int, total_steps: int, loss: float, lr: float, tokens_per_s: float) -> None: ...
    def logged(self, point: CurvePoint) -> None: ...
    def evaluated(self, step: int, bpb: float) -> None: ...
    def checkpointed(self, step: int, path: Path) -> None: ...


@dataclass(frozen=True)
class FullTrainResult:
    folder: Path
    run: RunConfig
    step: int
    """Steps done so far (the resumed ones included)."""
    total_steps: int
    tokens: int
    seconds: float
    """Training time over every session of the run."""
    resumed_from: int | None
    stopped_by: Literal["done", "max_steps", "interrupted"]
    last_loss: float
    val_bpb: float | None
    """Torch BPB at the last evaluation."""
    onnx_bpb: float | None = None
    """BPB of the final quantized ONNX model (as the search scores); set when done."""
    onnx_dir: Path | None = None
    hf_dir: Path | None = None
    checkpoint: Path | None = None
    curve: tuple[CurvePoint, ...] = ()
    evals: tuple[tuple[int, float], ...] = ()


# --- data -----------------------------------------------------------------------------------------


# --- the run ----------------------------------------------------------------------------------------


def corpus_source(export: WinnerExport, overrides: Overrides, previous: RunConfig | None,
                  ) -> tuple[str, int | None, str]:
    """(data, max_bytes, why) to train on.

    What the user gave (``--data`` alone takes all of that source; ``--max-bytes 0`` lifts a
    subset); else, resuming, the run's; else the study's corpus: the same subset while the token
    budget is at most ``MAX_SUBSET_EPOCHS`` epochs of it (the validation BPB then compares with the
    search's), the whole source beyond that.
    """
    if previous is not None and overrides.data is None and overrides.max_bytes is None:
        return previous.data, previous.max_bytes, "the run's corpus"
    corpus = export.manifest["corpus"]
    data = str(overrides.data if overrides.data is not None else corpus["data"])
    if overrides.max_bytes is not None:
        return data, overrides.max_bytes or None, "as asked"
    if overrides.data is not None:
        return data, None, "as asked"
    subset, train_tokens = corpus["max_bytes"], corpus.get("train_tokens")
    if subset is None:
        return data, None, "the study's corpus"
    tokens = suggest_recipe(export.spec, export.brief_training, tokens=overrides.tokens)["tokens"]
    if train_tokens and tokens > MAX_SUBSET_EPOCHS * train_tokens:
        return data, None, (f"all of the study's source: the budget is {tokens / train_tokens:.0f} epochs of its "
                            f"{subset:,}-byte subset (more than {MAX_SUBSET_EPOCHS}); --max-bytes {subset} keeps it")
    return data, subset, "the study's corpus (its subset)"


def resolve_run(export: WinnerExport, overrides: Overrides, corpus_fingerprint: str, previous: RunConfig | None,
                ) -> RunConfig:
    """The run to do: the previous one when resuming (an explicit setting that differs is an
    error), else the recipe with the user's settings in place of its suggestions."""
    brief = export.brief_training
    data, max_bytes, _ = corpus_source(export, overrides, None)
    if overrides.init is not None and overrides.init not in INITS:
        raise FullTrainError(f"--init must be one of {', '.join(INITS)}, got {overrides.init!r}")
    recipe = suggest_recipe(export.spec, brief, tokens=overrides.tokens, batch_size=overrides.batch_size,
                            lr=overrides.lr)
    steps = recipe["steps"]
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(overrides, name)
        if value is not None and value < 1:
            raise FullTrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    fresh = RunConfig(
        arch_id=export.spec.arch_id, init=overrides.init or "scratch", data=str(data), max_bytes=max_bytes,
        corpus_fingerprint=corpus_fingerprint, tokenizer_sha256=export.manifest["tokenizer"]["sha256"],
        tokens=recipe["tokens"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        warmup_steps=recipe["warmup_steps"], total_steps=steps, min_lr_ratio=brief.min_lr_ratio,
        weight_decay=brief.weight_decay, beta1=brief.beta1, beta2=brief.beta2, grad_clip=brief.grad_clip,
        seed=brief.seed, eval_every=overrides.eval_every or recipe["eval_every"], eval_tokens=brief.eval_tokens,
        checkpoint_every=overrides.checkpoint_every or recipe["checkpoint_every"],
        log_every=max(1, min(100, steps // 200)), lr_rule=brief.lr_rule, lr_base_width=brief.lr_base_width,
    )
    if previous is None:
        return fresh
    asked = {"tokens": overrides.tokens, "batch_size": overrides.batch_size, "lr": overrides.lr,
             "init": overrides.init, "eval_every": overrides.eval_every,
             "checkpoint_every": overrides.checkpoint_every}
    if overrides.data is not None or overrides.max_bytes is not None:
        asked.update(data=fresh.data, max_bytes=fresh.max_bytes)
    for key, value in asked.items():
        if value is not None and getattr(previous, key) != value:
            raise FullTrainError(
                f"the run in {export.folder / CHECKPOINTS} was started with {key} = {getattr(previous, key)!r}, not "
                f"{value!r}: run the same command to resume it, or add --restart to start over"
            )
    if previous.arch_id != export.spec.arch_id:
        raise FullTrainError(f"the checkpoints in {export.folder / CHECKPOINTS} are of architecture "
                             f"{previous.arch_id}, this export is {export.spec.arch_id}: add --restart")
    if previous.tokenizer_sha256 != fresh.tokenizer_sha256:
        raise FullTrainError(f"{export.tokenizer_path} changed since the run started: add --restart")
    if previous.corpus_fingerprint != corpus_fingerprint:
        raise FullTrainError(f"the corpus ({previous.data}, max_bytes={previous.max_bytes}) changed since the run "
                             f"started (fingerprint {previous.corpus_fingerprint}, now {corpus_fingerprint}): the "
                             "data position is meaningless; add --restart")
    return previous


def checkpoints(folder: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(folder) / CHECKPOINTS).glob("step-*.pt"))


def train_full(
    folder: Path,
    overrides: Overrides | None = None,
    *,
    device: str = "cpu",
    bf16: bool | None = None,
    compile: bool | None = None,
    max_steps: int | None = None,
    restart: bool = False,
    final_export: bool = True,
    events: FullTrainEvents | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FullTrainResult:
    """Train the spec exported in ``folder`` fully, resuming from its last checkpoint if any.

    ``bf16`` and ``compile`` None mean: on for CUDA, off on the CPU. ``max_steps`` stops after
    that many steps in all (a checkpoint is written). ``final_export`` False skips the final
    ONNX/Hugging Face export (tests compare runs without paying for it twice). Another process
    training the same folder is a FullTrainError, at once.
    """
    ev = events or FullTrainEvents()
    folder = Path(folder)
    export = load_winner(folder)
    device, use_bf16, use_compile = _device_settings(device, bf16, compile)
    if max_steps is not None and max_steps < 1:
        raise FullTrainError(f"--max-steps must be >= 1, got {max_steps}")
    with _run_lock(folder):  # before anything reads or changes the checkpoints
        previous = _previous_run(folder, restart)
        run, tc = _start_run(export, overrides or Overrides(), previous, ev)

        session = _Session(export, run, tc, device, ev)
        done = session.trained_before()
        if done is not None:
            return done
        stopped_by = session.train(max_steps, should_stop, use_bf16=use_bf16, use_compile=use_compile)
        result = session.close(stopped_by)
        if result.step < run.total_steps or not final_export:
            return result
        onnx_dir, hf_dir, onnx_bpb = _finish(export, session.model.to("cpu"), run, tc, session.curve, session.evals,
                                             result.seconds, ev)
    return dataclasses.replace(result, onnx_bpb=onnx_bpb, onnx_dir=onnx_dir, hf_dir=hf_dir)


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """Hold ``checkpoints/train.lock`` exclusively while the body runs, with this process's pid in
    it; when another process holds it, fail at once (FullTrainError naming the folder and that pid)
    rather than wait: the other run may last days."""
    ckpt_dir = folder / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process (pid not written yet)"
            raise FullTrainError(f"{folder} is being trained by {who}, which holds {path}: wait for it to end, "
                                 "or stop it, before running `nas train` on this folder again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no stale pid for a person reading the file after the run
    finally:
        os.close(fd)  # releases the lock


def _previous_run(folder: Path, restart: bool) -> RunConfig | None:
    """The run the checkpoints belong to, if any; ``restart`` forgets it and its checkpoints (the
    ones moved aside as unreadable too)."""
    ckpt_dir = folder / CHECKPOINTS
    if restart and ckpt_dir.exists():
        for path in [*checkpoints(folder), *ckpt_dir.glob(f"step-*.pt{UNREADABLE_SUFFIX}"), ckpt_dir / RUN_FILE]:
            path.unlink(missing_ok=True)
    if (ckpt_dir / RUN_FILE).is_file():
        return RunConfig(**json.loads((ckpt_dir / RUN_FILE).read_text()))
    return None


def _start_run(export: WinnerExport, overrides: Overrides, previous: RunConfig | None, ev: FullTrainEvents,
               ) -> tuple[RunConfig, TokenizedCorpus]:
    """The run to do and its tokenized corpus; a new run is saved beside the checkpoints (and its
    plan said) before its first step, so that an interrupted one resumes as this run."""
    from nas.stages.data import load_corpus

    folder, spec = export.folder, export.spec
    data, max_bytes, why = corpus_source(export, overrides, previous)
    ev.message(f"corpus {data}, max_bytes {max_bytes} ({why}): reading, and tokenizing with the exported tokenizer")
    try:
        corpus = load_corpus(None if data == "stdlib" else data, max_bytes=max_bytes)
    except NasError as e:
        raise FullTrainError(f"cannot read the training corpus: {e}") from None
    run = resolve_run(export, overrides, corpus.fingerprint, previous)
    if previous is None and corpus.fingerprint != export.manifest["corpus"]["fingerprint"]:
        ev.message(f"note: corpus {corpus.fingerprint} is not the study's ({export.manifest['corpus']['fingerprint']}):"
                   " validation BPB does not compare with the search's")
    tc = tokenize_with_file(corpus, export.tokenizer_path, spec.vocab_size, folder / "data")
    train_tokens = len(tc.train_ids)
    if previous is None:
        ckpt_dir = folder / CHECKPOINTS
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / RUN_FILE).write_text(run.model_dump_json(indent=2) + "\n")
        epochs = run.tokens / max(1, train_tokens)
        if epochs > MAX_SUBSET_EPOCHS:
            ev.message(f"note: the budget is {epochs:.1f} epochs of this corpus: past a few, repeated data overfits "
                       "small models; give --data more text")
        ev.message(f"plan: {run.tokens:,} tokens ({run.tokens / spec.params():.0f} per parameter) = {run.total_steps:,}"
                   f" steps of {run.batch_size} x {spec.context_length}, lr {run.lr:.3g}, warm-up {run.warmup_steps}"
                   f" steps, from {run.init}; {epochs:.1f} epochs of {train_tokens:,} training tokens")
    return run, tc


class _Session:
    """One sitting of a run: the model, the optimizer and the data position, fresh or as the last
    checkpoint left them, and the progress a checkpoint keeps beside them (step, training time,
    curve, evaluations, the losses since the last curve point). Held together because a checkpoint
    must save all of it at once for a resumed run to take the same steps on the same batches."""

    def __init__(self, export: WinnerExport, run: RunConfig, tc: TokenizedCorpus, device: str,
                 ev: FullTrainEvents) -> None:
        spec = export.spec
        self.folder, self.run, self.tc, self.device, self.ev = export.folder, run, tc, device, ev
        self.cfg = run.train_config()
        self.model = build_model(spec, seed=run.seed)
        if run.init == "exported":
            state = torch.load(self.folder / "model.pt", map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["state_dict"])
        self.model.to(device).train()
        self.opt = make_optimizer(self.model, self.cfg)
        self.sampler = WindowSampler(tc.train_ids, run.batch_size, spec.context_length, seed=run.seed)
        self.tokens_per_step = run.batch_size * spec.context_length

        self.step, self.seconds_before, self.resumed_from = 0, 0.0, None
        self.curve: list[CurvePoint] = []
        self.evals: list[tuple[int, float]] = []
        self.window: list[float] = []
        self.last_ckpt: Path | None = None
        found = checkpoints(self.folder)
        if found:
            self.last_ckpt = self._resume_newest_readable(found)
        self.last_loss = self.curve[-1].loss if self.curve else math.nan
        self.session_start = self.step
        self.start = time.perf_counter()

    def _resume_newest_readable(self, found: list[Path]) -> Path:
        """Resume from the newest of ``found`` (oldest first) that loads, moving the newer ones that
        do not aside with one line each; FullTrainError naming the folder when none loads."""
        unreadable: list[tuple[Path, str]] = []
        for path in reversed(found):
            try:
                state = _read_checkpoint(path)
            except _UnreadableCheckpoint as e:
                unreadable.append((path, str(e)))
                continue
            for bad, why in unreadable:
                aside = bad.with_name(bad.name + UNREADABLE_SUFFIX)
                bad.replace(aside)
                self.ev.message(f"skipping {bad.name}: it does not load ({why}); moved aside to {aside.name}, "
                                f"resuming from the older {path.name}")
            self._resume(path, state)
            return path
        newest, why = unreadable[0]
        raise FullTrainError(f"no checkpoint in {self.folder / CHECKPOINTS} loads ({len(found)} tried; the newest, "
                             f"{newest.name}: {why}): add --restart to start the run over")

    def _resume(self, path: Path, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sampler.restore(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.startswith("cuda"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = self.resumed_from = int(state["step"])
        self.seconds_before = float(state["seconds"])
        self.curve = [CurvePoint(*p) for p in state["curve"]]
        self.evals = [tuple(e) for e in state["evals"]]  # type: ignore[misc]
        self.window = list(state["window"])
        self.ev.message(f"resuming from {path.name}: step {self.step:,} of {self.run.total_steps:,}")

    def trained_before(self) -> FullTrainResult | None:
        """The result of this very run when an earlier session finished it (its report says so)."""
        run, step = self.run, self.step
        report_path = self.folder / TRAINED / REPORT
        if step < run.total_steps or not report_path.is_file():
            return None
        report = json.loads(report_path.read_text())
        if report.get("run") != run.model_dump():
            return None
        self.ev.message(f"already trained fully ({step:,} steps): see {report_path}")
        return FullTrainResult(
            folder=self.folder, run=run, step=step, total_steps=run.total_steps, tokens=step * self.tokens_per_step,
            seconds=self.seconds_before, resumed_from=self.resumed_from, stopped_by="done", last_loss=self.last_loss,
            val_bpb=report.get("val_bpb_torch"), onnx_bpb=report.get("val_bpb_onnx"),
            onnx_dir=self.folder / TRAINED / "onnx", hf_dir=self.folder / report["hf"] if report.get("hf") else None,
            checkpoint=self.last_ckpt, curve=tuple(self.curve), evals=tuple(self.evals))

    def train(self, max_steps: int | None, should_stop: Callable[[], bool] | None, *, use_bf16: bool,
              use_compile: bool) -> Literal["done", "max_steps", "interrupted"]:
        """Step until the run is done, ``max_steps`` steps are done in all, or ``should_stop`` says so."""
        stepper: torch.nn.Module = torch.compile(self.model) if use_compile else self.model  # type: ignore[assignment]
        self.ev.started(self.step, self.run.total_steps, self.resumed_from is not None)
        while self.step < self.run.total_steps:
            if max_steps is not None and self.step >= max_steps:
                return "max_steps"
            if should_stop is not None and should_stop():
                return "interrupted"
            self._train_step(stepper, use_bf16)
        return "done"

    def _train_step(self, stepper: torch.nn.Module, use_bf16: bool) -> None:
        run = self.run
        lr = lr_at(self.step, run.total_steps, run.warmup_steps, self.cfg)
        x_np, y_np = self.sampler.next()
        x = torch.from_numpy(x_np).to(self.device, non_blocking=True)
        y = torch.from_numpy(y_np).to(self.device, non_blocking=True)
        self.last_loss = train_step(stepper, self.opt, x, y, lr=lr, grad_clip=run.grad_clip, use_bf16=use_bf16,
                                    step=self.step, total_steps=run.total_steps)
        self.step += 1
        step = self.step
        self.window.append(self.last_loss)
        seconds = self.seconds_before + time.perf_counter() - self.start
        session_tps = (step - self.session_start) * self.tokens_per_step / max(time.perf_counter() - self.start, 1e-9)
        self.ev.stepped(step, run.total_steps, self.last_loss, lr, session_tps)
        if step % run.log_every == 0 or step == run.total_steps:
            point = CurvePoint(step, step * self.tokens_per_step, float(np.mean(self.window)), lr, seconds)
            self.curve.append(point)
            self.window = []
            self.ev.logged(point)
        if step % run.eval_every == 0 and step != run.total_steps:
            self._evaluate()
        if step % run.checkpoint_every == 0 and step != run.total_steps:
            self._save_checkpoint()

    def _evaluate(self) -> None:
        bpb = evaluate_bpb(self.model, self.tc, self.run.eval_tokens, device=self.device).bpb
        self.evals.append((self.step, bpb))
        self.ev.evaluated(self.step, bpb)

    def _save_checkpoint(self) -> None:
        run, step = self.run, self.step
        path = self.folder / CHECKPOINTS / f"step-{step:08d}.pt"
        atomic_write(path, lambda f: torch.save({
            "format": CHECKPOINT_FORMAT, "step": step, "total_steps": run.total_steps,
            "tokens": step * self.tokens_per_step, "run": run.model_dump(), "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "sampler": self.sampler.state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.startswith("cuda") else None,
            "seconds": self.seconds_before + (time.perf_counter() - self.start),
            "curve": [list(dataclasses.astuple(p)) for p in self.curve],
            "evals": [list(e) for e in self.evals], "window": self.window,
        }, f), fsync=True)
        for old in checkpoints(self.folder)[:-run.keep_checkpoints]:
            old.unlink(missing_ok=True)
        self.ev.checkpointed(step, path)
        self.last_ckpt = path

    def close(self, stopped_by: Literal["done", "max_steps", "interrupted"]) -> FullTrainResult:
        """The session's result, after the final evaluation (once the run is done) and a checkpoint
        of whatever this session changed."""
        run, step = self.run, self.step
        finished_eval = step >= run.total_steps and (not self.evals or self.evals[-1][0] != step)
        if finished_eval:  # the final validation BPB, kept in the last checkpoint so a re-run has it
            self._evaluate()
        if step > self.session_start or self.resumed_from is None or finished_eval:
            self._save_checkpoint()
        seconds = self.seconds_before + time.perf_counter() - self.start
        return FullTrainResult(
            folder=self.folder, run=run, step=step, total_steps=run.total_steps, tokens=step * self.tokens_per_step,
            seconds=seconds, resumed_from=self.resumed_from, stopped_by=stopped_by, last_loss=self.last_loss,
            val_bpb=self.evals[-1][1] if self.evals else None, checkpoint=self.last_ckpt, curve=tuple(self.curve),
            evals=tuple(self.evals))


class _UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be resumed from; the message says why, in one line."""


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's state, checked to be this version's and complete, else _UnreadableCheckpoint."""
    try:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain values and tensors only
    except Exception as e:  # a damaged file fails in the zip reader, the unpickler or the OS, each its own way
        text = str(e).split(". ")[0].splitlines()[0][:160] if str(e).strip() else ""
        size = path.stat().st_size if path.exists() else 0
        raise _UnreadableCheckpoint(f"{type(e).__name__}{': ' + text if text else ''}; {size:,} bytes") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise _UnreadableCheckpoint(f"not a checkpoint of this version ({found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise _UnreadableCheckpoint(f"it lacks {', '.join(missing)}")
    return state


def _device_settings(device: str, bf16: bool | None, compile: bool | None) -> tuple[str, bool, bool]:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FullTrainError(f"--device must be cpu or cuda, got {device!r}")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise FullTrainError("--device cuda: no CUDA device is visible to torch")
    if bf16 and not cuda:
        raise FullTrainError("--bf16 needs --device cuda (autocast is CUDA's here; the CPU trains in fp32)")
    if bf16 and not torch.cuda.is_bf16_supported():
        raise FullTrainError("--bf16: this GPU does not support bfloat16")
    use_bf16 = bf16 if bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    use_compile = compile if compile is not None else cuda
    return device, bool(use_bf16), bool(use_compile)


def _finish(export: WinnerExport, model: Decoder, run: RunConfig, tc: TokenizedCorpus, curve: list[CurvePoint],
            evals: list[tuple[int, float]], seconds: float, ev: FullTrainEvents) -> tuple[Path, Path | None, float]:
    """Save the final weights, export and quantize them as the search did, score that file, and
    write the Hugging Face folder where Llama can express the spec."""
    from nas.stages.data import EOS
    from nas.stages.export import export_spec
    from nas.stages.hf import llama_incompatibilities, save_hf
    from nas.stages.score import score_bpb_onnx

    out = export.folder / TRAINED
    out.mkdir(parents=True, exist_ok=True)
    spec = export.spec
    model.eval()
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(),
                "train_config": run.train_config().model_dump()}, out / "model.pt")
    ev.message(f"exporting to ONNX and quantizing to {spec.bitwidth} bits")
    onnx_dir = out / "onnx"
    exported = export_spec(spec, onnx_dir, model=model, graph="deploy")  # the graph the search measured and scored
    onnx_bpb = score_bpb_onnx(exported, tc, run.eval_tokens, threads=min(4, os.cpu_count() or 1)).bpb
    hf_dir = None
    if not llama_incompatibilities(spec):
        hf_dir = save_hf(model, out / "hf", tokenizer_json=export.tokenizer_path, eos_token=EOS,
                         eos_token_id=export.manifest["tokenizer"]["eos_token_id"])
    report = {
        "arch_id": spec.arch_id, "summary": spec.summary(), "run": run.model_dump(), "steps": run.total_steps,
        "tokens": run.total_steps * run.batch_size * spec.context_length, "seconds": round(seconds, 2),
        "final_loss": curve[-1].loss if curve else None, "val_bpb_torch": evals[-1][1],
        "val_bpb_onnx": onnx_bpb, "onnx_bitwidth": exported.bitwidth, "onnx_bytes": exported.total_bytes,
        "same_corpus_as_study": run.corpus_fingerprint == export.manifest["corpus"]["fingerprint"],
        "study_val_bpb": export.manifest.get("val_bpb"), "study_baselines": export.manifest.get("baselines"),
        "evals": [list(e) for e in evals], "hf": str(hf_dir.relative_to(export.folder)) if hf_dir else None,
        "hf_not_expressible": llama_incompatibilities(spec),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return onnx_dir, hf_dir, onnx_bpb
