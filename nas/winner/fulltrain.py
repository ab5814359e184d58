"""Full training of an exported architecture: ``nas train DIR``.

The export folder (``nas.winner.folder``) holds the spec, the tokenizer, the brief-trained weights and a
recipe; this stage trains the spec for the recipe's budget with the search's own optimizer,
schedule and step (``nas.stages.train.make_optimizer``, ``lr_at``, ``train_step``, ``evaluate_bpb``), so
the full run differs from a trial's only in length and batch. Layout it adds to DIR::

    checkpoints/run.json          the resolved run (budget, batch, lr, data, ...): what a resume must match
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

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from nas.spec.errors import NasError
from nas.spec.files import atomic_write
from nas.spec.settings import TrainConfig
from nas.stages.data import TokenizedCorpus, WindowSampler, tokenize_with_file
from nas.stages.model import Decoder, build_model
from nas.stages.train import CurvePoint, evaluate_bpb, lr_at, make_optimizer, train_step
from nas.winner.folder import MAX_SUBSET_EPOCHS, WinnerExport, load_winner, suggest_recipe

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
TRAINED = "trained"
REPORT = "report.json"
CHECKPOINT_FORMAT = "nas-fulltrain-v1"
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

    def train_config(self) -> TrainConfig:
        """The brief-training value the shared optimizer and schedule read."""
        return TrainConfig(
            tokens=self.tokens, batch_size=self.batch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
            warmup_tokens_frac=min(0.99, self.warmup_steps / self.total_steps), weight_decay=self.weight_decay,
            beta1=self.beta1, beta2=self.beta2, grad_clip=self.grad_clip, eval_tokens=self.eval_tokens,
            seed=self.seed, log_every=self.log_every,
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


class Events(Protocol):
    """What full training reports as it goes (the CLI draws a progress bar from it)."""

    def message(self, text: str) -> None: ...
    def started(self, step: int, total_steps: int, resumed: bool) -> None: ...
    def stepped(self, step: int, total_steps: int, loss: float, lr: float, tokens_per_s: float) -> None: ...
    def logged(self, point: CurvePoint) -> None: ...
    def evaluated(self, step: int, bpb: float) -> None: ...
    def checkpointed(self, step: int, path: Path) -> None: ...


class SilentEvents:
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
        log_every=max(1, min(100, steps // 200)),
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
    events: Events | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FullTrainResult:
    """Train the spec exported in ``folder`` fully, resuming from its last checkpoint if any.

    ``bf16`` and ``compile`` None mean: on for CUDA, off on the CPU. ``max_steps`` stops after
    that many steps in all (a checkpoint is written). ``final_export`` False skips the final
    ONNX/Hugging Face export (tests compare runs without paying for it twice).
    """
    from nas.stages.data import load_corpus

    ev = events or SilentEvents()
    overrides = overrides or Overrides()
    folder = Path(folder)
    export = load_winner(folder)
    spec = export.spec
    device, use_bf16, use_compile = _device_settings(device, bf16, compile)
    if max_steps is not None and max_steps < 1:
        raise FullTrainError(f"--max-steps must be >= 1, got {max_steps}")

    ckpt_dir = folder / CHECKPOINTS
    if restart and ckpt_dir.exists():
        for path in [*checkpoints(folder), ckpt_dir / RUN_FILE]:
            path.unlink(missing_ok=True)
    previous = None
    if (ckpt_dir / RUN_FILE).is_file():
        previous = RunConfig(**json.loads((ckpt_dir / RUN_FILE).read_text()))

    data, max_bytes, why = corpus_source(export, overrides, previous)
    ev.message(f"corpus {data}, max_bytes {max_bytes} ({why}): reading, and tokenizing with the exported tokenizer")
    try:
        corpus = load_corpus(None if data == "stdlib" else data, max_bytes=max_bytes)
    except NasError as e:
        raise FullTrainError(f"cannot read the training corpus: {e}") from None
    run = resolve_run(export, overrides, corpus.fingerprint, previous)
    report_path = folder / TRAINED / REPORT
    if previous is None and corpus.fingerprint != export.manifest["corpus"]["fingerprint"]:
        ev.message(f"note: corpus {corpus.fingerprint} is not the study's ({export.manifest['corpus']['fingerprint']}):"
                   " validation BPB does not compare with the search's")
    tc = tokenize_with_file(corpus, export.tokenizer_path, spec.vocab_size, folder / "data")
    train_tokens = len(tc.train_ids)
    if previous is None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / RUN_FILE).write_text(run.model_dump_json(indent=2) + "\n")
        epochs = run.tokens / max(1, train_tokens)
        if epochs > MAX_SUBSET_EPOCHS:
            ev.message(f"note: the budget is {epochs:.1f} epochs of this corpus: past a few, repeated data overfits "
                       "small models; give --data more text")
        ev.message(f"plan: {run.tokens:,} tokens ({run.tokens / spec.params():.0f} per parameter) = {run.total_steps:,}"
                   f" steps of {run.batch_size} x {spec.context_length}, lr {run.lr:.3g}, warm-up {run.warmup_steps}"
                   f" steps, from {run.init}; {epochs:.1f} epochs of {train_tokens:,} training tokens")

    cfg = run.train_config()
    model = build_model(spec, seed=run.seed)
    if run.init == "exported":
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    sampler = WindowSampler(tc.train_ids, run.batch_size, spec.context_length, seed=run.seed)

    step, elapsed_before, resumed_from = 0, 0.0, None
    curve: list[CurvePoint] = []
    evals: list[tuple[int, float]] = []
    window: list[float] = []
    found = checkpoints(folder)
    if found:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
        state = torch.load(found[-1], map_location="cpu", weights_only=True)  # plain values and tensors only
        if state.get("format") != CHECKPOINT_FORMAT:
            raise FullTrainError(f"{found[-1]}: not a checkpoint of this version ({state.get('format')!r})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.restore(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = resumed_from = int(state["step"])
        elapsed_before = float(state["seconds"])
        curve = [CurvePoint(*p) for p in state["curve"]]
        evals = [tuple(e) for e in state["evals"]]  # type: ignore[misc]
        window = list(state["window"])
        ev.message(f"resuming from {found[-1].name}: step {step:,} of {run.total_steps:,}")

    tokens_per_step = run.batch_size * spec.context_length
    start = time.perf_counter()

    def save_checkpoint() -> Path:
        path = ckpt_dir / f"step-{step:08d}.pt"
        atomic_write(path, lambda f: torch.save({
            "format": CHECKPOINT_FORMAT, "step": step, "total_steps": run.total_steps, "tokens": step * tokens_per_step,
            "run": run.model_dump(), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "sampler": sampler.state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.startswith("cuda") else None,
            "seconds": elapsed_before + (time.perf_counter() - start),
            "curve": [list(dataclasses.astuple(p)) for p in curve],
            "evals": [list(e) for e in evals], "window": window,
        }, f), fsync=True)
        for old in checkpoints(folder)[:-run.keep_checkpoints]:
            old.unlink(missing_ok=True)
        ev.checkpointed(step, path)
        return path

    if step >= run.total_steps and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("run") == run.model_dump():
            ev.message(f"already trained fully ({step:,} steps): see {report_path}")
            return FullTrainResult(
                folder=folder, run=run, step=step, total_steps=run.total_steps, tokens=step * tokens_per_step,
                seconds=elapsed_before, resumed_from=resumed_from, stopped_by="done",
                last_loss=curve[-1].loss if curve else math.nan, val_bpb=report.get("val_bpb_torch"),
                onnx_bpb=report.get("val_bpb_onnx"), onnx_dir=folder / TRAINED / "onnx",
                hf_dir=folder / report["hf"] if report.get("hf") else None, checkpoint=found[-1],
                curve=tuple(curve), evals=tuple(evals))

    stepper: torch.nn.Module = torch.compile(model) if use_compile else model  # type: ignore[assignment]
    session_start_step = step
    ev.started(step, run.total_steps, resumed_from is not None)
    stopped_by: Literal["done", "max_steps", "interrupted"] = "done"
    last_loss = curve[-1].loss if curve else math.nan
    last_ckpt: Path | None = found[-1] if found else None
    while step < run.total_steps:
        if max_steps is not None and step >= max_steps:
            stopped_by = "max_steps"
            break
        if should_stop is not None and should_stop():
            stopped_by = "interrupted"
            break
        lr = lr_at(step, run.total_steps, run.warmup_steps, cfg)
        x_np, y_np = sampler.next()
        x = torch.from_numpy(x_np).to(device, non_blocking=True)
        y = torch.from_numpy(y_np).to(device, non_blocking=True)
        last_loss = train_step(stepper, opt, x, y, lr=lr, grad_clip=run.grad_clip, use_bf16=use_bf16,
                               step=step, total_steps=run.total_steps)
        step += 1
        window.append(last_loss)
        seconds = elapsed_before + time.perf_counter() - start
        session_tps = (step - session_start_step) * tokens_per_step / max(time.perf_counter() - start, 1e-9)
        ev.stepped(step, run.total_steps, last_loss, lr, session_tps)
        if step % run.log_every == 0 or step == run.total_steps:
            point = CurvePoint(step, step * tokens_per_step, float(np.mean(window)), lr, seconds)
            curve.append(point)
            window = []
            ev.logged(point)
        if step % run.eval_every == 0 and step != run.total_steps:
            bpb = evaluate_bpb(model, tc, run.eval_tokens, device=device).bpb
            evals.append((step, bpb))
            ev.evaluated(step, bpb)
        if step % run.checkpoint_every == 0 and step != run.total_steps:
            last_ckpt = save_checkpoint()

    finished_eval = step >= run.total_steps and (not evals or evals[-1][0] != step)
    if finished_eval:  # the final validation BPB, kept in the last checkpoint so a re-run has it
        bpb = evaluate_bpb(model, tc, run.eval_tokens, device=device).bpb
        evals.append((step, bpb))
        ev.evaluated(step, bpb)
    if step > session_start_step or not found or finished_eval:
        last_ckpt = save_checkpoint()
    seconds = elapsed_before + time.perf_counter() - start
    result = FullTrainResult(
        folder=folder, run=run, step=step, total_steps=run.total_steps, tokens=step * tokens_per_step,
        seconds=seconds, resumed_from=resumed_from, stopped_by=stopped_by, last_loss=last_loss,
        val_bpb=evals[-1][1] if evals else None, checkpoint=last_ckpt, curve=tuple(curve), evals=tuple(evals))
    if step < run.total_steps or not final_export:
        return result
    onnx_dir, hf_dir, onnx_bpb = _finish(export, model.to("cpu"), run, tc, curve, evals, seconds, ev)
    return dataclasses.replace(result, onnx_bpb=onnx_bpb, onnx_dir=onnx_dir, hf_dir=hf_dir)


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
            evals: list[tuple[int, float]], seconds: float, ev: Events) -> tuple[Path, Path | None, float]:
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
    exported = export_spec(spec, onnx_dir, model=model)
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
