"""`nas trial`, `nas measure`, `nas search`: start work. One architecture trained or measured,
or the whole search. Registered on the main app by ``register(app)``.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from nas.faces.cli.common import (
    DbOpt,
    JsonOpt,
    SeedOpt,
    SpaceOpt,
    console,
    db_url,
    err_console,
    fmt_bytes,
    fmt_count,
    read_arch_json,
    spec_from,
)
from nas.faces.cli.results import print_pareto
from nas.search.config import SearchConfig, SearchEvents
from nas.spec.errors import NasError
from nas.spec.results import Measurement
from nas.spec.settings import check_study_name, default_study_name


def register(app: typer.Typer) -> None:
    """Add ``trial``, ``measure``, ``search``, ``remeasure`` to ``app``."""
    app.command()(trial)
    app.command()(measure)
    app.command()(search)
    app.command()(remeasure)


def trial(
    space: SpaceOpt,
    arch_json: Annotated[Path | None, typer.Option(help="Train this spec (JSON, e.g. from `nas sample --json`) "
                                                   "instead of a random one from the space.")] = None,
    seed: SeedOpt = 0,
    data: Annotated[str | None, typer.Option(help="Corpus: a .txt/.md/.jsonl file or folder "
                                             "(default: the Python standard library's source).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Training budget in tokens (default: the space's).",
                                               min=1)] = None,
    seconds: Annotated[float | None, typer.Option(help="Optional wall-clock budget in seconds.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Use a deterministic subset of the corpus "
                                                  "of about this many bytes.")] = None,
    device: Annotated[str, typer.Option(help="torch device for training: cpu, cuda.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Train one architecture briefly, as a search trial would, and score its validation BPB.

    Prints the falling training loss, then bits per byte on the validation split of the model
    exported at its bitwidth and run in ONNX Runtime (the search's score), the fp32 torch model's
    beside it, and what a unigram and a bigram count model of the same tokenizer achieve (8.0 is
    a uniform guess over bytes). Unlike a search trial it measures no latency and stores nothing.
    """
    import tempfile

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nas.search.trial import score_trained
    from nas.spec.space import load_space
    from nas.stages.data import load_corpus, ngram_baseline_bpb, tokenize_corpus
    from nas.stages.train import evaluate_bpb, train_brief

    sp = load_space(space)
    if arch_json is not None:
        spec = read_arch_json(arch_json)
        sp.check_rules(spec)
    else:
        spec = sp.sample(random.Random(seed))
    overrides = {k: v for k, v in {"tokens": tokens, "seconds": seconds, "seed": seed}.items() if v is not None}
    cfg = sp.training.updated(**overrides)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NasError("--device cuda: no CUDA device is visible to torch")

    log = err_console if as_json else console
    log.print(f"[bold]{spec.arch_id}[/bold]  {spec.summary()}  ({fmt_count(spec.params())} params)")
    with log.status("loading corpus and tokenizer (cached after the first run)…"):
        corpus = load_corpus(data, max_bytes=max_bytes)
        tc = tokenize_corpus(corpus, spec.vocab_size)
    log.print(f"corpus {corpus.name} [{corpus.fingerprint}]: {fmt_bytes(corpus.train_bytes)} train, "
              f"{fmt_bytes(corpus.val_bytes)} validation; {len(tc.train_ids):,} train tokens at vocab {tc.vocab_size}")

    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=log) as bar:
        task = bar.add_task("train", total=None, loss="…")

        def on_progress(point, total: int) -> None:
            bar.update(task, total=total, completed=point.step, loss=f"{point.loss:.3f}")
            bar.console.print(f"step {point.step:5d}  tokens {point.tokens:>9,}  loss {point.loss:.4f}  "
                              f"lr {point.lr:.2e}  {point.tokens / max(point.seconds, 1e-9):,.0f} tok/s")

        model, result = train_brief(spec, tc, cfg, device=device, progress=on_progress)
    with log.status(f"exporting at {spec.bitwidth} bits and scoring validation bits per byte in ONNX Runtime…"), \
            tempfile.TemporaryDirectory() as tmp:
        # the search's own score stage: BPB of the deployed (quantized) model, and the torch
        # model's beside it, whose gap is what quantization costs
        score, _ = score_trained(spec, model, tc, Path(tmp), cfg)
        torch_score = evaluate_bpb(model, tc, cfg.eval_tokens, device="cpu")
        unigram, bigram = ngram_baseline_bpb(tc, 1), ngram_baseline_bpb(tc, 2)
    out = {
        "arch_id": spec.arch_id, "spec": spec.to_dict(), "params": spec.params(),
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                  "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
                  "stopped_by": result.stopped_by},
        "val_bpb": score.bpb, "val_tokens": score.tokens, "val_bytes": score.bytes, "bitwidth": spec.bitwidth,
        "torch_fp32_bpb": torch_score.bpb,
        "baseline_bpb": {"unigram": unigram, "bigram": bigram}, "corpus": corpus.fingerprint,
    }
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table(title=f"trial {spec.arch_id}", show_header=False)
    table.add_row("architecture", spec.summary())
    table.add_row("params", f"{spec.params():,} ({spec.non_embedding_params():,} non-embedding)")
    table.add_row("trained", f"{result.tokens:,} tokens in {result.steps} steps, {result.seconds:.1f} s "
                             f"({result.tokens_per_s:,.0f} tok/s), final loss {result.final_loss:.4f}")
    table.add_row("validation BPB",
                  f"[bold]{score.bpb:.4f}[/bold] over {score.bytes:,} bytes ({score.tokens:,} tokens), the "
                  f"{spec.bitwidth}-bit ONNX model in ONNX Runtime, as the search scores it")
    table.add_row("torch fp32 BPB", f"{torch_score.bpb:.4f} (the gap is the cost of the {spec.bitwidth}-bit export)")
    table.add_row("baselines BPB", f"bigram {bigram:.4f}, unigram {unigram:.4f}, uniform bytes 8.0")
    console.print(table)


DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="Hardware profile: a name from `nas devices` or a "
                                                                "YAML path.")]




def _measurement_rows(m, profile) -> list[tuple[str, str, str]]:
    """(figure, value, budget) rows, each value with its label."""
    b = profile.budgets
    tag = f"[dim]{m.label}[/dim]"

    def budget(limit: float | None, value: float, unit: str) -> str:
        if limit is None:
            return ""
        return f"{'[green]ok' if value <= limit else '[red]over'}[/] ≤ {limit:g} {unit}"

    d, p = m.decode, m.prefill
    return [
        ("decode / token", f"{d.median_ms:.3f} ms (p10 {d.p10_ms:.3f}, p90 {d.p90_ms:.3f}, cv {d.cv:.1%}) {tag}",
         budget(b.decode_ms_per_token, d.median_ms, "ms")),
        ("prefill", f"{p.median_ms:.2f} ms (p10 {p.p10_ms:.2f}, p90 {p.p90_ms:.2f}, cv {p.cv:.1%}) {tag}",
         budget(b.prefill_ms, p.median_ms, "ms")),
        ("peak memory", f"{m.peak_memory_mb:.1f} MiB {tag}", budget(b.peak_memory_mb, m.peak_memory_mb, "MiB")),
        ("model size", f"{m.model_mb:.2f} MiB", budget(b.model_mb, m.model_mb, "MiB")),
    ]


def measure(
    device: DeviceOpt,
    space: SpaceOpt,
    arch_json: Annotated[Path | None, typer.Option(help="Measure this spec (JSON) instead of a random one "
                                                   "from the space.")] = None,
    seed: SeedOpt = 0,
    require_measured: Annotated[bool, typer.Option(help="Refuse to estimate: fail unless the device itself "
                                                   "measures.")] = False,
    keep: Annotated[Path | None, typer.Option(help="Keep the exported ONNX files in this folder.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export one architecture to ONNX, quantize it to its bitwidth and measure it on a device profile.

    Prints prefill and per-token decode latency (median and spread over repeats), peak memory of
    the inference process and model size, each labelled with where it came from
    (measured:local, measured:<node>, estimated:model), next to the profile's budgets.
    """
    import tempfile

    from nas.search.pipeline import host_setup, measure_deployed
    from nas.spec.profile import analytic_budget_check, load_profile
    from nas.stages.export import export_spec

    spec = spec_from(space, arch_json, seed)
    profile = load_profile(device)
    log = err_console if as_json else console
    log.print(f"[bold]{spec.arch_id}[/bold]  {spec.summary()}  ({fmt_count(spec.params())} params) on "
              f"[bold]{profile.name}[/bold]: {profile.device.name}")
    for reason in analytic_budget_check(spec, profile):
        log.print(f"[yellow]over budget before measuring:[/yellow] {reason}")
    with log.status("calibrating this host (once; cached)…"):
        host = host_setup()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = keep or Path(tmp)
        with log.status(f"exporting to ONNX and quantizing to {spec.bitwidth} bits…"):
            exported = export_spec(spec, out_dir, graph="deploy")  # the graph a trial measures
        with log.status("measuring in an isolated ONNX Runtime process…"):
            m = measure_deployed(spec, exported.path.parent, profile, host=host,
                                 require_measured=require_measured,
                                 notify=lambda msg: log.print(f"[yellow]note:[/yellow] {msg}"))
    constraints = profile.budgets.constraints(m.figures())
    feasible = all(v <= 0 for v in constraints.values())
    if as_json:
        print(json.dumps({"spec": spec.to_dict(), "arch_id": spec.arch_id, "feasible": feasible,
                          "constraints": constraints, "measurement": m.to_dict()}, indent=2))
        return
    w = m.workload
    table = Table(title=f"{spec.arch_id} on {profile.name}",
                  caption=f"prompt {w['prompt_tokens']} tokens, decode at {w['context_tokens']} cached tokens, "
                          f"batch {w['batch']}, "
                          + (f"{w['warmup']} warm-up + up to {w['repeats']} repeats" if "repeats" in w
                             else "estimated (no repeats: the device's latency model)"))
    table.add_column("figure")
    table.add_column("value")
    table.add_column("budget")
    for row in _measurement_rows(m, profile):
        table.add_row(*row)
    console.print(table)
    prov = m.provenance.get("host", m.provenance)
    console.print(f"taken on: {prov.get('cpu')} · {prov.get('threads')} threads · {prov.get('execution_provider')}"
                  f" · onnxruntime {prov.get('onnxruntime')}" + _estimate_note(m))
    console.print("[green]within every budget[/green]" if feasible else "[red]over budget: infeasible[/red]")


def _estimate_note(m: Measurement) -> str:
    """How an estimate's latency was made, in one clause (empty for a measurement)."""
    p = m.provenance
    if not m.label.startswith("estimated"):
        return ""
    if "kernel_us" not in p:  # an old row, from the roofline that scaled this host's timing
        return " · latency scaled from this host by the roofline"
    bw = p["bandwidth_gbs"].get("*")
    how = (f"fitted to {p['n_points']} calibration points" if p.get("method") == "fitted"
           else "datasheet figures (no calibration points)")
    return (f" · latency from the device's model ({how}): {bw:.3g} GB/s effective, "
            f"{p['kernel_us']:.3g} µs x {p['kernels_per_step']} kernels per step")


def _parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m' or plain seconds -> seconds."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise NasError(f"--time {text!r}: give a duration like 90s, 30m, 2h or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


class _RichEvents(SearchEvents):
    """The search's progress, drawn with rich: trials done, the current trial's stage and
    training step, one line per finished trial. When stdout is not a terminal (a log file, a
    pipe), rich draws no live bar, so a line after each counted trial says how far the search is
    and for how long it has run."""

    def __init__(self, progress, total: float | None, time_budget_s: float | None = None) -> None:
        import time

        self.p = progress
        self.total, self.time_budget_s = total, time_budget_s
        self.trials = progress.add_task("trials", total=total, info="")
        self.current = progress.add_task("trial", total=None, info="")
        self.finished = 0
        self.started = time.monotonic()

    def message(self, text: str) -> None:
        # one line each, never wrapped: a user who logs to a file greps them
        self.p.console.print(f"[dim]{text}[/dim]", soft_wrap=True)

    def trial_started(self, number: int) -> None:
        self.p.update(self.current, description=f"trial {number}", completed=0, total=None, info="sampling")

    def stage(self, number: int, stage: str, detail: str) -> None:
        self.p.update(self.current, info=f"{stage}: {detail}" if detail else stage)

    def stage_step(self, stage: str, step: str) -> None:
        self.p.update(self.current, info=f"{stage}: {step}")

    def train_progress(self, number: int, step: int, total: int, loss: float) -> None:
        self.p.update(self.current, completed=step, total=total, info=f"train: loss {loss:.3f}")

    def trial_finished(self, number: int, state: str, summary: str) -> None:
        if state == "invalid":  # stored as infeasible at the sample stage: said the same way here
            state, summary = "infeasible", f"sample: {summary} (an invalid draw; not counted, drawn again)"
            colour, counted = "dim", False
        else:
            colour, counted = {"complete": "green", "infeasible": "yellow", "failed": "red"}[state], True
        self.p.console.print(f"trial {number:4d} [{colour}]{state:10s}[/{colour}] {escape(summary)}",
                             highlight=False, soft_wrap=True)
        if counted:
            self.finished += 1

    def trials_done(self, units: float) -> None:
        import datetime
        import time

        self.p.update(self.trials, completed=units)
        if self.p.console.is_terminal:
            return
        elapsed = time.monotonic() - self.started
        of = f" of {self.total:g}" if self.total is not None else ""
        budget = f" of {datetime.timedelta(seconds=round(self.time_budget_s))}" if self.time_budget_s else ""
        self.p.console.print(f"progress: {self.finished} trials, {units:.2f}{of} trials' worth of training, "
                             f"{datetime.timedelta(seconds=round(elapsed))}{budget} elapsed", highlight=False,
                             soft_wrap=True)


def search(
    space: SpaceOpt = "gqa_small",
    device: DeviceOpt = "jetson",
    trials: Annotated[int | None, typer.Option(help="Stop after this many trials' worth of training (default 20 "
                                               "without --time). Without rungs each trial counts 1; with "
                                               "--rungs a trial counts its share of the whole budget (at least "
                                               "the first rung's), so N buys about N whole-budget trainings "
                                               "and the time of N trials. Draws that break the space's rules "
                                               "count nothing.", min=1)] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Stop starting trials after this long: "
                                                    "90s, 30m, 2h, 1h30m. The running trial finishes the rung "
                                                    "it is on; past the time no trial goes on to another "
                                                    "rung.")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: SPACE-DEVICE): 1 to 100 "
                                              "letters, digits, '.', '_' or '-'; it names the artifacts "
                                              "folder. The same name resumes the study.")] = None,
    db: DbOpt = None,
    data: Annotated[str | None, typer.Option(help="Corpus: a .txt/.md/.jsonl file or folder (default: the "
                                             "Python standard library's source).")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Use a deterministic subset of the corpus of about this "
                                                  "many bytes.")] = None,
    objectives: Annotated[str, typer.Option(help="Comma-separated, all minimized: val_bpb, decode_ms, "
                                            "prefill_ms, peak_memory_mb, model_mb, params.")] = "val_bpb,decode_ms",
    sampler: Annotated[str, typer.Option(help="tpe (default: multivariate TPE, good with categorical and "
                                         "conditional dimensions), nsga2, gp, random.")] = "tpe",
    seed: SeedOpt = 0,
    tokens: Annotated[int | None, typer.Option(help="Training budget per trial in tokens (default: the "
                                               "space's).", min=1)] = None,
    rungs: Annotated[int, typer.Option(help="Successive halving on the training budget: with 3, every trial is "
                                       "scored at 1/9 of --tokens and goes on to 1/3 and to all of it only "
                                       "while in the top 1/ETA of the trials at its rung (by non-dominated "
                                       "sorting of BPB there and the measured objectives). 1: every trial "
                                       "trains the whole budget.", min=1)] = 1,
    noise_seeds: Annotated[int | None, typer.Option(help="Extra training seeds of the first complete trial's "
                                                    "architecture, trained to the first rung once per study, "
                                                    "whose spread is the error bar of every BPB (default: 2 "
                                                    "with --rungs, 0 without: there they cost whole "
                                                    "trainings).", min=0)] = None,
    eta: Annotated[int, typer.Option(help="With --rungs: the budget grows ETA times per rung and the top "
                                     "1/ETA go on.", min=2)] = 3,
    other_bitwidths: Annotated[bool | None, typer.Option(help="When a trial lands on the front, queue its "
                                                         "architecture at the space's other bitwidths as trials "
                                                         "that score its trained weights (weights do not depend "
                                                         "on the bitwidth, so they skip training: each costs a "
                                                         "measurement and a score, and counts 0.1 of a trial). "
                                                         "Default: on with --rungs, off without.")] = None,
    front_neighbours: Annotated[bool | None, typer.Option(help="When a trial trained past the first rung lands on "
                                                          "the front, queue its architecture one d_model choice "
                                                          "narrower and, apart, one n_layers step shallower: cheaper "
                                                          "to train and faster, trained through the rungs, they fill "
                                                          "the front's fast end. Default: on with --rungs, off "
                                                          "without.")] = None,
    artifacts: Annotated[Path, typer.Option(help="Where trained weights and ONNX files of each trial go.")]
    = Path("nas_artifacts"),
    require_measured: Annotated[bool, typer.Option(help="Refuse estimates: fail unless the device itself "
                                                   "measures.")] = False,
    torch_device: Annotated[str, typer.Option(help="torch device for training: cpu, cuda.")] = "cpu",
    executor: Annotated[str, typer.Option(help="local (trials one after another in this process) or ray (Ray "
                                          "Tune trials on the workers of a Ray cluster; the same study, store "
                                          "and front).")] = "local",
    workers: Annotated[int, typer.Option(help="With --executor ray: trials running at once.", min=1)] = 1,
    ray_address: Annotated[str | None, typer.Option(help="With --executor ray: the head of an existing Ray "
                                                    "cluster (HOST:6379, or auto); default: start Ray here. "
                                                    "Use a PostgreSQL --db when workers are on several "
                                                    "machines.")] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="With --executor ray: CPUs each trial holds (a GPU "
                                                  "fraction is added when training on cuda).", min=0.1)] = 1.0,
) -> None:
    """Search a space for the architectures that are best on a device: the Pareto front of quality
    (validation BPB of the quantized model) against latency, under the profile's budgets.

    Each trial: sample, analytic budget check, export + quantize + measure (or estimate), brief
    training, BPB of the quantized model in ONNX Runtime. Infeasible architectures are rejected
    before they are trained. Results go to --db; re-running with the same --study resumes.
    Ctrl-C (or SIGTERM) stops at the next training step or stage, recording the running trial as failed;
    it is tried again on resume. A second Ctrl-C stops at once.

    With --executor ray --workers N [--ray-address HOST:6379], N trials run at once as Ray Tune
    trials; a profile measured on a device (measurement.where: ray) is measured on the node that
    joined the cluster with its resource (README: "Distributed search with Ray").
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if executor not in ("local", "ray"):
        raise NasError(f"unknown --executor {executor!r}; choose local or ray")
    if executor == "local" and (workers != 1 or ray_address or cpus_per_trial != 1.0):
        raise NasError("--workers, --ray-address and --cpus-per-trial need --executor ray (or run the same "
                       "command in several processes)")
    if trials is None and time_budget is None:
        trials = 20
    timeout = _parse_duration(time_budget) if time_budget else None
    objective_names = tuple(o.strip() for o in objectives.split(",") if o.strip())
    sp_train = None
    if tokens is not None:
        from nas.spec.space import load_space

        sp_train = load_space(space).training.updated(tokens=tokens)
    name = check_study_name(study) if study is not None else default_study_name(space, device)
    cfg = SearchConfig(study=name, space=space, device=device, db_url=db_url(db), objectives=objective_names,
                       sampler=sampler, seed=seed, train=sp_train, data=data, max_bytes=max_bytes,
                       artifacts=artifacts, require_measured=require_measured, torch_device=torch_device,
                       rungs=rungs, eta=eta, noise_seeds=noise_seeds, other_bitwidths=other_bitwidths,
                       front_neighbours=front_neighbours)
    stop = _stop_on_signals()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as progress:
        events = _RichEvents(progress, trials, timeout)
        try:
            counts = _run_search(cfg, events, stop, trials, timeout, executor=executor, workers=workers,
                                 ray_address=ray_address, cpus_per_trial=cpus_per_trial)
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"interrupted: finished trials are recorded; resume with the same command "
                              f"(--study {name})")
            raise typer.Exit(130) from None
    worth = f" ({counts['trial_units']:g} trials' worth of training)" if rungs > 1 and "trial_units" in counts else ""
    console.print(f"done: {counts['complete']} complete, {counts['infeasible']} infeasible, {counts['failed']} "
                  f"failed{worth}; {counts['invalid']} invalid draws (infeasible at sampling, not counted)")
    print_pareto(cfg.db_url, name, as_json=False)


def _stop_on_signals() -> threading.Event:
    """An event that Ctrl-C or SIGTERM (kill, a scheduler) sets: the search stops at its next safe
    point (a training step, a stage boundary), the running trial recorded and queued again. A
    second signal stops at once. The handler only sets the event: raising from it could land in
    a finalizer or an import, where Python swallows it."""
    import signal

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _run_search(cfg: SearchConfig, events: SearchEvents, stop: threading.Event, trials: int | None,
                timeout: float | None, *, executor: str, workers: int, ray_address: str | None,
                cpus_per_trial: float) -> dict[str, int]:
    """The search on this process (``local``) or on a Ray cluster's workers; the trial counts."""
    if executor == "ray":
        from nas.search.ray_executor import RayOptions, run_with_ray

        events.message(f"study {cfg.study} on {cfg.db_url}, {workers} Ray worker(s)")
        return run_with_ray(cfg, RayOptions(workers=workers, address=ray_address, cpus_per_trial=cpus_per_trial),
                            events, stop=stop, n_trials=trials, timeout_s=timeout)
    from nas.search.study import Search

    s = Search(cfg, events, stop=stop)
    events.message(f"study {cfg.study} on {cfg.db_url}")
    try:
        return s.run(n_trials=trials, timeout_s=timeout)
    finally:
        s.close()


def remeasure(
    study: Annotated[str, typer.Argument(help="The study whose Pareto front to measure again.")],
    db: DbOpt = None,
    top: Annotated[int | None, typer.Option(help="Only the N front trials with the best BPB (default: the whole "
                                                 "front).", min=1)] = None,
    ray_address: Annotated[str | None, typer.Option(help="For a `where: ray` profile: HOST:PORT of the cluster whose "
                                                         "node advertises the profile's ray_resource.")] = None,
    device: Annotated[str | None, typer.Option(help="The study's profile as a YAML path, when it is not one of "
                                                    "hw_profiles/ (it must have the study's profile name).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a study's Pareto front again on the device as it is now and show what moved.

    Each front trial's architecture is exported again and measured where its profile is
    measured: here (`where: local`), on the Ray node advertising the profile's resource (with
    --ray-address), or else estimated by the device's latency model as it is now (with the
    points `nas devices calibrate` stored). The new figures are stored as new measurement rows
    (labelled, fingerprinted, provenance.remeasure_of naming the trial); the trials keep the
    objectives Optuna was told, and `nas pareto` and the plots show the newer figures beside
    them. Prints per trial the old and new decode and prefill ms, their ratio and where each
    was taken (label and fingerprint), and whether the front's membership or its order by
    decode latency changes with the new figures.
    """
    from nas.search.remeasure import remeasure_front
    from nas.store import Store

    log = err_console if as_json else console
    with Store(db_url(db)) as store, log.status("measuring the front again…") as status:
        result = remeasure_front(store, study, device=device, top=top, ray_address=ray_address,
                                 progress=status.update)
    if as_json:
        print(json.dumps({"study": study, "where": result.where, "front_before": result.front_before,
                          "front_after": result.front_after, "order_before": result.order_before,
                          "order_after": result.order_after,
                          "trials": [{"number": mv.trial.number, "old": mv.old.summary() if mv.old else None,
                                      "new": mv.new.summary(), "over_budget": mv.over_budget,
                                      "decode_ratio": mv.ratio("decode_ms"), "prefill_ratio": mv.ratio("prefill_ms")}
                                     for mv in result.moved]}, indent=2, default=str))
        return
    _print_remeasured(result)


def _taken(row) -> str:
    """A measurement's label and the fingerprint of the machine its figures rest on."""
    if row is None:
        return "–"
    prov = row.provenance
    fp = prov.get("fingerprint") or (prov.get("host") or {}).get("fingerprint")
    digest = prov.get("model_digest")
    where = f" · fp {fp}" if fp else ""
    return row.label + where + (f" · model {digest}" if digest else "")


def _old_new(mv, key: str) -> tuple[str, str]:
    old = mv.old.summary().get(key) if mv.old is not None and mv.old.ok else None
    new = mv.new.summary().get(key)
    ratio = mv.ratio(key)
    return (f"{old:.4g} → {new:.4g}" if old is not None else f"– → {new:.4g}"), (f"{ratio:.2f}x" if ratio else "–")


def _print_remeasured(result) -> None:
    table = Table(title=f"Remeasured front of {result.study} on {result.where}",
                  caption="old: the figures the trial was scored with (kept); new: this run's, stored as new "
                          "measurement rows. ratio = new / old.")
    for col in ("trial", "architecture", "decode ms", "ratio", "prefill ms", "ratio", "old: label · fingerprint",
                "new: label · fingerprint"):
        table.add_column(col, overflow="fold", justify="left" if col in ("architecture",) or ":" in col else "right")
    for mv in result.moved:
        decode, d_ratio = _old_new(mv, "decode_ms")
        prefill, p_ratio = _old_new(mv, "prefill_ms")
        over = f" [red](over: {', '.join(mv.over_budget)})[/red]" if mv.over_budget else ""
        table.add_row(f"#{mv.trial.number}", (mv.trial.arch_summary or "") + over, decode, d_ratio, prefill, p_ratio,
                      _taken(mv.old), _taken(mv.new))
    console.print(table)
    dropped = [n for n in result.front_before if n not in result.front_after]
    if dropped:
        console.print(f"front membership changes: {', '.join(f'#{n}' for n in dropped)} would leave the front "
                      f"with the new figures (dominated by another front trial, or over a budget)")
    else:
        console.print("front membership: unchanged with the new figures (among the trials remeasured)")
    old = " < ".join(f"#{n}" for n in result.order_before)
    new = " < ".join(f"#{n}" for n in result.order_after)
    console.print(f"order by decode latency: unchanged ({new})" if old == new else
                  f"order by decode latency changes: {old} before, {new} now")
    console.print("the trials keep the figures they were scored with; `nas pareto` shows the newer ones beside them")
