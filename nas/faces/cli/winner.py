"""`nas export` and `nas train`: take a study's winner out of the search and train it fully.

Registered on the main app by ``nas.faces.cli.main`` (``register(app)``), so this module owns its commands
and the main CLI file stays one import long for them. Heavy modules (torch, ONNX) are imported
inside the commands.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nas.faces.cli.common import DbOpt, console, db_url, err_console


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``train`` to ``app``."""
    app.command("export")(export)
    app.command("train")(train)


def export(
    study: Annotated[str, typer.Argument(help="Study name (see `nas studies`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must be empty unless --force).")],
    trial: Annotated[int | None, typer.Option(help="Export this trial number.")] = None,
    pick: Annotated[str | None, typer.Option(help="Choose the trial: `knee` (the Pareto point closest to the utopia "
                                             "point, each objective normalized over the front) or `best-under` "
                                             "(lowest BPB with decode <= --max-decode-ms).")] = None,
    max_decode_ms: Annotated[float | None, typer.Option(help="Decode latency limit (ms/token) for --pick "
                                                        "best-under.")] = None,
    db: DbOpt = None,
    force: Annotated[bool, typer.Option(help="Write into a non-empty --out folder, replacing its files.")] = False,
) -> None:
    """Export a trial of a study: spec (JSON, YAML), tokenizer, trained weights, the quantized ONNX
    model that was scored, a README of its labelled figures, a full-training recipe and, where
    the architecture allows, a Hugging Face Llama folder (config + safetensors) and a litgpt config.

    Then `nas train OUT` trains it fully.
    """
    from nas.winner.folder import export_winner

    result = export_winner(db_url=db_url(db), study=study, out_dir=out, trial=trial, pick=pick,
                           max_decode_ms=max_decode_ms, force=force,
                           notify=lambda text: err_console.print(f"[dim]{text}[/dim]", highlight=False))
    man = result.manifest
    m = man["measurement"] or {}
    table = Table(title=f"{study} trial {result.trial} -> {out}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("picked", man["pick"]["how"])
    table.add_row("architecture", f"{result.spec.summary()} ({result.spec.arch_id}), {result.spec.params():,} params")
    base = man["baselines"] or {}
    if man["val_bpb"] is not None:
        table.add_row("validation BPB", f"{man['val_bpb']:.4f} (quantized, ONNX Runtime; bigram "
                                        f"{base.get('bigram_bpb', float('nan')):.4f}, unigram "
                                        f"{base.get('unigram_bpb', float('nan')):.4f})")
    if m:
        table.add_row("decode / prefill", f"{m['decode_ms']:.4g} ms/token, {m['prefill_ms']:.4g} ms ({m['label']})")
        table.add_row("memory / size", f"{(m['peak_memory_bytes'] or 0) / 2**20:.1f} MiB peak, "
                                       f"{(m['model_bytes'] or 0) / 2**20:.2f} MiB model ({m['label']})")
    table.add_row("ONNX", f"onnx/ at {man['onnx']['bitwidth']} bits")
    if man["hf"]["dir"]:
        table.add_row("Hugging Face", "hf/ (LlamaForCausalLM: config.json, model.safetensors, tokenizer)")
    else:
        table.add_row("Hugging Face", "[yellow]not written: LlamaConfig cannot express " +
                      "; ".join(man["hf"]["not_expressible"]) + "[/yellow]")
    if man["litgpt"]["dir"]:
        table.add_row("litgpt", "litgpt/model_config.yaml (config only)")
    else:
        table.add_row("litgpt", "not written: " + "; ".join(man["litgpt"]["not_expressible"]))
    r = json.loads((result.folder / "recipe.json").read_text())
    table.add_row("recipe", f"{r['tokens']:,} tokens ({r['tokens_per_param']:.0f}/param), batch {r['batch_size']} x "
                            f"{r['context_length']}, lr {r['lr']:.3g}, warm-up {r['warmup_steps']} steps, cosine "
                            f"({r['steps']:,} steps)")
    console.print(table)
    console.print(f"next: [bold]nas train {out}[/bold]  (see {out / 'README.md'})", highlight=False, soft_wrap=True)


class _TrainProgress:
    """Full training drawn with rich: a bar over the run's steps with loss, lr, tok/s and the last
    validation BPB; one line per log interval, evaluation and checkpoint."""

    def __init__(self, progress: Any) -> None:
        self.p = progress
        self.task = progress.add_task("training", total=None, info="")
        self.bpb = "…"
        self.log_lines = True

    def message(self, text: str) -> None:
        self.p.console.print(f"[dim]{text}[/dim]", highlight=False)

    def started(self, step: int, total_steps: int, resumed: bool) -> None:
        self.p.update(self.task, total=total_steps, completed=step)
        if resumed:
            self.p.console.print(f"continuing at step {step + 1:,} of {total_steps:,}", highlight=False)

    def stepped(self, step: int, total_steps: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.p.update(self.task, completed=step,
                      info=f"loss {loss:.3f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  val BPB {self.bpb}")

    def logged(self, point: Any) -> None:
        self.p.console.print(f"step {point.step:7,d}  tokens {point.tokens:>12,}  loss {point.loss:.4f}  "
                             f"lr {point.lr:.2e}", highlight=False)

    def evaluated(self, step: int, bpb: float) -> None:
        self.bpb = f"{bpb:.4f}"
        self.p.console.print(f"step {step:7,d}  validation BPB {bpb:.4f}", highlight=False)

    def checkpointed(self, step: int, path: Path) -> None:
        self.p.console.print(f"[dim]checkpoint {path}[/dim]", highlight=False)


def train(
    folder: Annotated[Path, typer.Argument(help="An export folder from `nas export`.")],
    data: Annotated[str | None, typer.Option(help="Corpus: a .txt/.md/.jsonl file or folder, or `stdlib` (default: "
                                             "the study's corpus, tokenized with the exported tokenizer).")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Deterministic subset of the corpus of about this many bytes "
                                                  "(default: the study's subset while the budget is at most 4 epochs "
                                                  "of it, else all of the source; 0 = all of it).", min=0)] = None,
    tokens: Annotated[int | None, typer.Option(help="Token budget (default: the recipe's, ~20 per parameter).",
                                               min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step (default: the recipe's).", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the recipe's).")] = None,
    init: Annotated[str | None, typer.Option(help="scratch (default: fresh weights, the trial's seed) or exported "
                                             "(start from the exported brief-trained weights).")] = None,
    device: Annotated[str, typer.Option(help="torch device: cpu or cuda.")] = "cpu",
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on with CUDA, "
                                              "off on the CPU).")] = None,
    compile_model: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model "
                                                       "(default: on with CUDA, off on the CPU).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps in all, with a checkpoint "
                                                  "(the schedule still spans the whole budget); run again to go on.",
                                                  min=1)] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validation BPB evaluations.", min=1)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.", min=1)] = None,
    restart: Annotated[bool, typer.Option(help="Delete this folder's checkpoints and start over.")] = False,
) -> None:
    """Train an exported architecture fully, with checkpoints in FOLDER/checkpoints.

    Running the same command again resumes from the last checkpoint (step, optimizer, data
    position and loss curve continue). Ctrl-C or SIGTERM stops after the current step with a
    checkpoint. One process trains a folder at a time: a second fails at once, naming the first's
    pid. A checkpoint that does not load is moved aside and the one before it resumed. At the end:
    FOLDER/trained/ holds the weights, the ONNX model at the spec's bitwidth (scored in ONNX
    Runtime), a Hugging Face folder where Llama can express the spec, and report.json.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from nas.winner.fulltrain import Overrides, train_full

    stop = {"requested": False}

    def _request_stop(signum: int, frame: object) -> None:
        if stop["requested"]:  # a second signal: stop now, without the checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop["requested"] = True
        err_console.print("stopping after this step (a checkpoint is written); signal again to stop at once")

    old = {s: signal.signal(s, _request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    overrides = Overrides(data=data, max_bytes=max_bytes, tokens=tokens, batch_size=batch_size, lr=lr, init=init,
                          eval_every=eval_every, checkpoint_every=checkpoint_every)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as progress:
            events = _TrainProgress(progress)
            result = train_full(folder, overrides, device=device, bf16=bf16, compile=compile_model,
                                max_steps=max_steps, restart=restart, events=events,
                                should_stop=lambda: stop["requested"])
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)

    if result.stopped_by != "done":
        why = "interrupted" if result.stopped_by == "interrupted" else f"--max-steps {max_steps} reached"
        console.print(f"{why}: step {result.step:,} of {result.total_steps:,}, checkpoint {result.checkpoint}; "
                      f"run `nas train {folder}` again to continue", highlight=False, soft_wrap=True)
        if result.stopped_by == "interrupted":
            raise typer.Exit(130)
        return
    table = Table(title=f"{folder}: trained fully", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("trained", f"{result.tokens:,} tokens, {result.step:,} steps, {result.seconds:,.1f} s of training, "
                             f"last loss {result.last_loss:.4f}")
    if result.val_bpb is not None:
        table.add_row("validation BPB (torch)", f"{result.val_bpb:.4f}")
    if result.onnx_bpb is not None:
        bits = json.loads((folder / "trained" / "report.json").read_text())["onnx_bitwidth"]
        table.add_row("validation BPB (ONNX)", f"[bold]{result.onnx_bpb:.4f}[/bold] (the deployed {bits}-bit model "
                                               "in ONNX Runtime, as the search scores)")
    if result.onnx_dir is not None:
        table.add_row("ONNX", str(result.onnx_dir))
    table.add_row("Hugging Face", str(result.hf_dir) if result.hf_dir else "not written: LlamaConfig cannot express "
                  "this architecture (see README.md)")
    table.add_row("report", str(folder / "trained" / "report.json"))
    console.print(table)
