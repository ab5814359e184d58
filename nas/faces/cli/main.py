"""The `nas` command line. Each command reads values, calls a stage, prints with rich.

Errors a user can fix (NasError) become one line on stderr and exit code 2; torch and the other
heavy stages are imported inside the commands that need them, so `nas spaces` starts fast.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nas.faces.cli.common import DbOpt, db_url
from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError, SpecError

app = typer.Typer(
    name="nas",
    help=(
        "Hardware-aware architecture search for small decoder-only language models.\n\n"
        "Start with `nas spaces` (what can be searched), `nas sample --space tiny` (what an "
        "architecture looks like) and `nas trial --space tiny` (train one briefly and score it)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)

SpaceOpt = Annotated[str, typer.Option("--space", "-s", help="Search space: a name from `nas spaces` or a YAML path.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling (and training).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def spec_figures(spec: ArchSpec) -> dict[str, float | int | str]:
    """The analytic figures shown for a spec (at its own context length)."""
    ctx = spec.context_length
    return {
        "arch_id": spec.arch_id,
        "summary": spec.summary(),
        "params": spec.params(),
        "non_embedding_params": spec.non_embedding_params(),
        "prefill_flops": spec.prefill_flops(ctx),
        "decode_flops": spec.decode_flops(ctx - 1),
        "weight_bytes": spec.weight_bytes(),
        "kv_cache_bytes_per_token": spec.kv_cache_bytes_per_token(),
    }


@app.command()
def spaces(
    names: Annotated[list[str] | None, typer.Argument(help="Spaces to show in full (default: list all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the search spaces and validate each one (exit 2 if any is invalid)."""
    from nas.spec.space import iter_spaces, load_space

    if names:
        for name in names:
            _show_space(load_space(name), as_json)
        return
    rows, failed = [], 0
    for name, path in iter_spaces():
        try:
            sp = load_space(path)
        except NasError as e:
            failed += 1
            rows.append({"name": name, "path": str(path), "valid": False, "error": str(e)})
            continue
        rng = random.Random(0)
        params = [sp.sample(rng).params() for _ in range(200)]
        rows.append({
            "name": name, "path": str(path), "valid": True, "searched": len(sp.searchable),
            "size": sp.size(), "params_min": min(params), "params_max": max(params),
            "train_tokens": sp.training.tokens, "description": sp.description,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title="Search spaces", caption="params: range over 200 random valid samples")
        for col in ("name", "searched dims", "combinations", "params", "train tokens", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            if not r["valid"]:
                table.add_row(r["name"], "", "", "", "", f"[red]invalid: {r['error']}[/red]")
                continue
            table.add_row(
                r["name"], str(r["searched"]), f"{r['size']:,}" if r["size"] else "continuous",
                f"{_fmt_count(r['params_min'])}–{_fmt_count(r['params_max'])}", _fmt_count(r["train_tokens"]),
                r["description"].split(". ")[0].rstrip(".") + ".",
            )
        console.print(table)
    if failed:
        raise typer.Exit(2)


def _show_space(sp, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "name": sp.name, "path": str(sp.path), "description": sp.description,
            "dimensions": {d.name: d.describe() for d in sp.dimensions},
            "rules": [r.text for r in sp.rules], "training": sp.training.model_dump(),
        }, indent=2))
        return
    table = Table(title=f"{sp.name}  ({sp.path})", caption=sp.description)
    table.add_column("dimension")
    table.add_column("values")
    table.add_column("searched")
    for d in sp.dimensions:
        table.add_row(d.name, d.describe(), "yes" if d.searchable else "")
    console.print(table)
    for r in sp.rules:
        console.print(f"  rule: [cyan]{r.text}[/cyan]")
    console.print(f"  training: {sp.training.model_dump()}")


@app.command()
def sample(
    space: SpaceOpt,
    n: Annotated[int, typer.Option("-n", help="How many architectures to draw.", min=1)] = 5,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Draw random valid architectures from a space and show their analytic figures."""
    from nas.spec.space import load_space

    sp = load_space(space)
    rng = random.Random(seed)
    specs = [sp.sample(rng) for _ in range(n)]
    if as_json:
        print(json.dumps([{"spec": s.to_dict(), **spec_figures(s)} for s in specs], indent=2))
        return
    table = Table(title=f"{n} samples from {sp.name} (seed {seed})",
                  caption="FLOPs and KV cache at the spec's context length; decode = one token at a full cache")
    for col in ("arch_id", "architecture", "params", "non-emb", "prefill FLOPs", "decode FLOPs/tok",
                "weights", "KV/token"):
        table.add_column(col, overflow="fold", justify="left" if col in ("arch_id", "architecture") else "right")
    for s in specs:
        f = spec_figures(s)
        table.add_row(
            s.arch_id, s.summary(), _fmt_count(f["params"]), _fmt_count(f["non_embedding_params"]),
            _fmt_count(f["prefill_flops"]), _fmt_count(f["decode_flops"]), _fmt_bytes(f["weight_bytes"]),
            _fmt_bytes(f["kv_cache_bytes_per_token"]),
        )
    console.print(table)


def _read_arch_json(path: Path) -> ArchSpec:
    try:
        text = path.read_text()
    except OSError as e:
        raise NasError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NasError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and "spec" in data:  # accept `nas sample --json` rows too
        data = data["spec"]
    if isinstance(data, list) and data:
        data = data[0].get("spec", data[0]) if isinstance(data[0], dict) else data[0]
    try:
        return ArchSpec.from_dict(data)
    except SpecError as e:
        raise NasError(f"{path}: {e}") from None


@app.command()
def trial(
    space: SpaceOpt,
    arch_json: Annotated[Path | None, typer.Option(help="Train this spec (JSON, e.g. from `nas sample --json`) "
                                                   "instead of a random one from the space.")] = None,
    seed: SeedOpt = 0,
    data: Annotated[str | None, typer.Option(help="Corpus: a .txt/.md/.jsonl file or folder "
                                             "(default: the Python standard library's source).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Training budget in tokens (default: the space's).")] = None,
    seconds: Annotated[float | None, typer.Option(help="Optional wall-clock budget in seconds.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Use a deterministic subset of the corpus "
                                                  "of about this many bytes.")] = None,
    device: Annotated[str, typer.Option(help="torch device for training: cpu, cuda.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Train one architecture briefly, as a search trial would, and score its validation BPB.

    Prints the falling training loss, then bits per byte on the validation split next to what a
    unigram and a bigram count model of the same tokenizer achieve (8.0 is a uniform guess over bytes).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nas.spec.space import load_space
    from nas.stages.data import load_corpus, ngram_baseline_bpb, tokenize_corpus
    from nas.stages.train import evaluate_bpb, train_brief

    sp = load_space(space)
    if arch_json is not None:
        spec = _read_arch_json(arch_json)
        sp.check_rules(spec)
    else:
        spec = sp.sample(random.Random(seed))
    overrides = {k: v for k, v in {"tokens": tokens, "seconds": seconds, "seed": seed}.items() if v is not None}
    cfg = sp.training.model_copy(update=overrides)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NasError("--device cuda: no CUDA device is visible to torch")

    log = err_console if as_json else console
    log.print(f"[bold]{spec.arch_id}[/bold]  {spec.summary()}  ({_fmt_count(spec.params())} params)")
    with log.status("loading corpus and tokenizer (cached after the first run)…"):
        corpus = load_corpus(data, max_bytes=max_bytes)
        tc = tokenize_corpus(corpus, spec.vocab_size)
    log.print(f"corpus {corpus.name} [{corpus.fingerprint}]: {_fmt_bytes(corpus.train_bytes)} train, "
              f"{_fmt_bytes(corpus.val_bytes)} validation; {len(tc.train_ids):,} train tokens at vocab {tc.vocab_size}")

    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=log) as bar:
        task = bar.add_task("train", total=None, loss="…")

        def on_progress(point, total: int) -> None:
            bar.update(task, total=total, completed=point.step, loss=f"{point.loss:.3f}")
            bar.console.print(f"step {point.step:5d}  tokens {point.tokens:>9,}  loss {point.loss:.4f}  "
                              f"lr {point.lr:.2e}  {point.tokens / max(point.seconds, 1e-9):,.0f} tok/s")

        model, result = train_brief(spec, tc, cfg, device=device, progress=on_progress)
    with log.status("scoring validation bits per byte…"):
        score = evaluate_bpb(model, tc, cfg.eval_tokens, device=device)
        unigram, bigram = ngram_baseline_bpb(tc, 1), ngram_baseline_bpb(tc, 2)
    out = {
        "arch_id": spec.arch_id, "spec": spec.to_dict(), "params": spec.params(),
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                  "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
                  "stopped_by": result.stopped_by},
        "val_bpb": score.bpb, "val_tokens": score.tokens, "val_bytes": score.bytes,
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
                  f"[bold]{score.bpb:.4f}[/bold] over {score.bytes:,} bytes ({score.tokens:,} tokens)")
    table.add_row("baselines BPB", f"bigram {bigram:.4f}, unigram {unigram:.4f}, uniform bytes 8.0")
    console.print(table)


DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="Hardware profile: a name from `nas devices` or a "
                                                                "YAML path.")]


def _spec_from(space: str, arch_json: Path | None, seed: int) -> ArchSpec:
    from nas.spec.space import load_space

    sp = load_space(space)
    if arch_json is None:
        return sp.sample(random.Random(seed))
    spec = _read_arch_json(arch_json)
    sp.check_rules(spec)
    return spec


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


@app.command()
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
    (measured:local, measured:<node>, estimated:roofline), next to the profile's budgets.
    """
    import tempfile

    from nas.search.pipeline import budget_constraints, host_setup, measure_deployed
    from nas.spec.profile import analytic_budget_check, load_profile
    from nas.stages.export import export_spec

    spec = _spec_from(space, arch_json, seed)
    profile = load_profile(device)
    log = err_console if as_json else console
    log.print(f"[bold]{spec.arch_id}[/bold]  {spec.summary()}  ({_fmt_count(spec.params())} params) on "
              f"[bold]{profile.name}[/bold]: {profile.device.name}")
    for reason in analytic_budget_check(spec, profile):
        log.print(f"[yellow]over budget before measuring:[/yellow] {reason}")
    with log.status("calibrating this host (once; cached)…"):
        host, cal = host_setup()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = keep or Path(tmp)
        with log.status(f"exporting to ONNX and quantizing to {spec.bitwidth} bits…"):
            exported = export_spec(spec, out_dir)
        with log.status("measuring in an isolated ONNX Runtime process…"):
            m = measure_deployed(spec, exported.path.parent, profile, host=host, cal=cal,
                                 require_measured=require_measured,
                                 notify=lambda msg: log.print(f"[yellow]note:[/yellow] {msg}"))
    feasible = all(v <= 0 for v in budget_constraints(m, profile).values())
    if as_json:
        print(json.dumps({"spec": spec.to_dict(), "arch_id": spec.arch_id, "feasible": feasible,
                          "constraints": budget_constraints(m, profile), "measurement": m.to_dict()}, indent=2))
        return
    w = m.workload
    table = Table(title=f"{spec.arch_id} on {profile.name}",
                  caption=f"prompt {w['prompt_tokens']} tokens, decode at {w['context_tokens']} cached tokens, "
                          f"batch {w['batch']}, {w['warmup']} warm-up + up to {w['repeats']} repeats")
    table.add_column("figure")
    table.add_column("value")
    table.add_column("budget")
    for row in _measurement_rows(m, profile):
        table.add_row(*row)
    console.print(table)
    prov = m.provenance.get("host", m.provenance)
    console.print(f"taken on: {prov.get('cpu')} · {prov.get('threads')} threads · {prov.get('execution_provider')}"
                  f" · onnxruntime {prov.get('onnxruntime')}"
                  + (f" · scaled ×{m.provenance['decode_factor']:.3g} (decode), ×{m.provenance['prefill_factor']:.3g}"
                     f" (prefill) by the roofline" if m.label.startswith("estimated") else ""))
    console.print("[green]within every budget[/green]" if feasible else "[red]over budget: infeasible[/red]")


devices_app = typer.Typer(help="Hardware profiles: list and validate them, calibrate this host.",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(devices_app, name="devices")


@devices_app.callback()
def devices(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the hardware profiles in hw_profiles/ and validate each one (exit 2 if any is invalid)."""
    if ctx.invoked_subcommand is not None:
        return
    from nas.spec.profile import list_profile_files, load_profile

    rows, failed = [], 0
    for name, path in list_profile_files().items():
        try:
            p = load_profile(path)
        except NasError as e:
            failed += 1
            rows.append({"name": name, "path": str(path), "valid": False, "error": str(e)})
            continue
        b = p.budgets
        rows.append({
            "name": name, "path": str(path), "valid": True, "device": p.device.name,
            "provider": p.runtime.execution_provider, "threads": p.runtime.threads,
            "bandwidth_gbs": p.device.memory_bandwidth_gbs, "where": p.measurement.where,
            "ray_resource": p.measurement.ray_resource, "calibration_points": len(p.calibration),
            "budgets": {"peak_memory_mb": b.peak_memory_mb, "decode_ms_per_token": b.decode_ms_per_token,
                        "prefill_ms": b.prefill_ms, "model_mb": b.model_mb},
        })
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title="Hardware profiles")
        for col in ("name", "device", "runtime", "bandwidth", "figures come from", "budgets"):
            table.add_column(col, overflow="fold")
        for r in rows:
            if not r["valid"]:
                table.add_row(r["name"], f"[red]invalid: {r['error']}[/red]", "", "", "", "")
                continue
            where = {"local": "measured:local", "ray": f"Ray node with '{r['ray_resource']}', else estimated",
                     "estimate": "estimated:roofline"}[r["where"]]
            if r["calibration_points"]:
                where += f" ({r['calibration_points']} calibration points)"
            budgets = ", ".join(f"{k} ≤ {v:g}" for k, v in r["budgets"].items() if v is not None)
            bw = r["bandwidth_gbs"]
            table.add_row(r["name"], r["device"], f"{r['provider'].removesuffix('ExecutionProvider')} ×{r['threads']}",
                          f"{bw:g} GB/s" if isinstance(bw, (int, float)) else str(bw), where, budgets)
        console.print(table)
    if failed:
        raise typer.Exit(2)


@devices_app.command()
def calibrate(
    space: Annotated[str, typer.Option("--space", "-s", help="Space to draw the reference architectures from.")]
    = "gqa_small",
    n: Annotated[int, typer.Option("-n", help="Reference architectures to measure.", min=1)] = 3,
    seed: SeedOpt = 0,
    refresh: Annotated[bool, typer.Option(help="Measure the host again instead of using the cached figures.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure this host's memory bandwidth and matrix-multiply rates with ONNX Runtime, then the
    efficiencies the roofline derives from them on a few reference architectures."""
    import dataclasses
    import tempfile

    from nas.spec.space import load_space
    from nas.stages.export import export_spec
    from nas.stages.measure import measure_local

    log = err_console if as_json else console
    with log.status("measuring this host's bandwidth and matmul rates…"):
        host, cal = _host_setup(refresh)
    sp = load_space(space)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        spec = dataclasses.replace(sp.sample(rng), bitwidth=32)  # fp32: the rates above are fp32's
        with tempfile.TemporaryDirectory() as tmp, log.status(f"reference {i + 1}/{n}: {spec.summary()}"):
            m = measure_local(export_spec(spec, Path(tmp)).path.parent, spec, host)
        past, prompt = m.workload["context_tokens"], m.workload["prompt_tokens"]
        decode_gbs = spec.decode_bytes(past) / (m.decode.median_ms / 1e3) / 1e9
        prefill_gflops = spec.prefill_flops(prompt) / (m.prefill.median_ms / 1e3) / 1e9
        rows.append({"arch_id": spec.arch_id, "summary": spec.summary(), "decode_ms": m.decode.median_ms,
                     "decode_cv": m.decode.cv, "decode_gbs": decode_gbs,
                     "decode_efficiency": decode_gbs / cal.memory_bandwidth_gbs, "prefill_ms": m.prefill.median_ms,
                     "prefill_gflops": prefill_gflops, "prefill_efficiency": prefill_gflops / cal.peak_gflops["fp32"]})
    if as_json:
        print(json.dumps({"host": dataclasses.asdict(cal), "references": rows}, indent=2))
        return
    console.print(f"[bold]host[/bold]: {cal.provenance.get('cpu')}, {cal.provenance.get('threads')} threads, "
                  f"onnxruntime {cal.provenance.get('onnxruntime')}")
    console.print(f"  read bandwidth (fp32 matrix-vector, 256 MiB): [bold]{cal.memory_bandwidth_gbs:.1f} GB/s[/bold]")
    console.print("  matrix-multiply rate: " + ", ".join(f"{k} [bold]{v:.0f}[/bold] GFLOP/s"
                                                           for k, v in cal.peak_gflops.items()))
    table = Table(title="Roofline efficiencies on reference architectures (fp32)",
                  caption="decode: bytes a step reads / time, over the bandwidth; prefill: FLOPs / time, over the "
                          "fp32 rate. Well below 1 means overhead-bound (many small ops), as NOTES.md found.")
    for col in ("arch", "decode ms", "cv", "GB/s", "eff.", "prefill ms", "GFLOP/s", "eff."):
        table.add_column(col, justify="left" if col == "arch" else "right", overflow="fold")
    for r in rows:
        table.add_row(r["summary"], f"{r['decode_ms']:.3f}", f"{r['decode_cv']:.1%}", f"{r['decode_gbs']:.1f}",
                      f"{r['decode_efficiency']:.2f}", f"{r['prefill_ms']:.2f}", f"{r['prefill_gflops']:.0f}",
                      f"{r['prefill_efficiency']:.2f}")
    console.print(table)


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


class _RichEvents:
    """The search's progress, drawn with rich: trials done, the current trial's stage and
    training step, one line per finished trial."""

    def __init__(self, progress, total: int | None) -> None:
        self.p = progress
        self.trials = progress.add_task("trials", total=total, info="")
        self.current = progress.add_task("trial", total=None, info="")
        self.finished = 0

    def message(self, text: str) -> None:
        self.p.console.print(f"[dim]{text}[/dim]")

    def trial_started(self, number: int) -> None:
        self.p.update(self.current, description=f"trial {number}", completed=0, total=None, info="sampling")

    def stage(self, number: int, stage: str, detail: str) -> None:
        self.p.update(self.current, info=f"{stage}: {detail}" if detail else stage)

    def train_progress(self, number: int, step: int, total: int, loss: float) -> None:
        self.p.update(self.current, completed=step, total=total, info=f"train: loss {loss:.3f}")

    def trial_finished(self, number: int, state: str, summary: str) -> None:
        colour = {"complete": "green", "infeasible": "yellow", "failed": "red", "invalid": "dim"}[state]
        self.p.console.print(f"trial {number:4d} [{colour}]{state:10s}[/{colour}] {summary}", highlight=False)
        if state != "invalid":
            self.finished += 1
            self.p.update(self.trials, completed=self.finished)


@app.command()
def search(
    space: SpaceOpt = "gqa_small",
    device: DeviceOpt = "jetson",
    trials: Annotated[int | None, typer.Option(help="Stop after this many trials (sampling rejects not counted).",
                                               min=1)] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Stop starting trials after this long: "
                                                    "90s, 30m, 2h, 1h30m.")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: SPACE-DEVICE). The same name resumes "
                                              "the study.")] = None,
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
                                               "space's).")] = None,
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

    from nas.search.study import Search, SearchConfig

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

        sp_train = load_space(space).training.model_copy(update={"tokens": tokens})
    name = study or f"{Path(space).stem}-{Path(device).stem}"
    cfg = SearchConfig(study=name, space=space, device=device, db_url=db_url(db), objectives=objective_names,
                       sampler=sampler, seed=seed, train=sp_train, data=data, max_bytes=max_bytes,
                       artifacts=artifacts, require_measured=require_measured, torch_device=torch_device)
    import signal
    import threading

    stop = threading.Event()

    def _request_stop(signum: int, frame: object) -> None:
        # Ctrl-C or SIGTERM (kill, a scheduler): the first asks the search to stop at its next safe
        # point (a training step, a stage boundary), the running trial recorded and queued again;
        # a second stops at once. Raising from the handler itself could land in a finalizer or an
        # import, where Python swallows it.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as progress:
        events = _RichEvents(progress, trials)
        try:
            if executor == "ray":
                from nas.search.ray_executor import RayOptions, run_with_ray

                events.message(f"study {name} on {cfg.db_url}, {workers} Ray worker(s)")
                counts = run_with_ray(cfg, RayOptions(workers=workers, address=ray_address,
                                                      cpus_per_trial=cpus_per_trial),
                                      events, stop=stop, n_trials=trials, timeout_s=timeout)
            else:
                s = Search(cfg, events, stop=stop)
                events.message(f"study {name} on {cfg.db_url}")
                try:
                    counts = s.run(n_trials=trials, timeout_s=timeout)
                finally:
                    s.close()
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"interrupted: finished trials are recorded; resume with the same command "
                              f"(--study {name})")
            raise typer.Exit(130) from None
    console.print(f"done: {counts['complete']} complete, {counts['infeasible']} infeasible, {counts['failed']} "
                  f"failed, {counts['invalid']} invalid draws")
    _print_pareto(cfg.db_url, name, as_json=False)


def _trial_figures(store, trial) -> dict:
    m = store.get_measurement(id=trial.measurement_id) if trial.measurement_id else None
    return {
        "number": trial.number, "state": trial.state, "arch_id": trial.arch_id, "architecture": trial.arch_summary,
        "params": store.get_architecture(arch_id=trial.arch_id).params if trial.arch_id else None,
        "val_bpb": trial.val_bpb, "objectives": trial.objectives, "constraints": trial.constraints,
        "feasible": {"complete": trial.feasible, "infeasible": False}.get(trial.state),
        "label": m.label if m else None,
        "decode_ms": m.decode_ms_per_token if m else None, "prefill_ms": m.prefill_ms if m else None,
        "peak_memory_mb": m.peak_memory_bytes / 2**20 if m and m.peak_memory_bytes else None,
        "model_mb": m.model_bytes / 2**20 if m and m.model_bytes else None,
        "failed_stage": trial.failed_stage, "failure_reason": trial.failure_reason,
        "seconds": trial.seconds, "artifact_dir": trial.artifact_dir,
    }


def _open_store(db: str):
    from nas.store import Store

    return Store(db, upgrade=False)


def _print_pareto(db: str, study: str, as_json: bool) -> None:
    with _open_store(db) as store:
        st = store.get_study(name=study)
        front = store.pareto(study=study)
        rows = [_trial_figures(store, t) for t in front]
    if as_json:
        print(json.dumps({"study": study, "objectives": [o.to_dict() for o in st.objectives], "front": rows},
                         indent=2, default=str))
        return
    table = Table(title=f"Pareto front of {study}: {len(rows)} of {st.n_trials} trials "
                        f"({st.space} on {st.profile})",
                  caption="objectives: " + ", ".join(f"{o.name} ({o.direction})" for o in st.objectives)
                  + "; latency and memory labelled with where they came from")
    for col in ("#", "architecture", "params", "BPB", "decode ms/tok", "prefill ms", "memory MiB", "size MiB",
                "label"):
        table.add_column(col, justify="left" if col in ("architecture", "label") else "right", overflow="fold")
    for r in sorted(rows, key=lambda r: (r["val_bpb"] is None, r["val_bpb"])):
        table.add_row(str(r["number"]), r["architecture"] or "", _fmt_count(r["params"] or 0),
                      f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "",
                      f"{r['decode_ms']:.3f}" if r["decode_ms"] is not None else "",
                      f"{r['prefill_ms']:.2f}" if r["prefill_ms"] is not None else "",
                      f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "",
                      f"{r['model_mb']:.1f}" if r["model_mb"] is not None else "", r["label"] or "")
    console.print(table)


@app.command()
def studies(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies in the database with their trials by state."""
    with _open_store(db_url(db)) as store:
        rows = store.list_studies()
        fronts = {s.name: len(store.pareto(study=s.name)) for s in rows}
    if as_json:
        print(json.dumps([{"name": s.name, "space": s.space, "profile": s.profile, "trials": s.trial_counts,
                           "front": fronts[s.name], "objectives": [o.to_dict() for o in s.objectives],
                           "created_at": s.created_at.isoformat(), "code_version": s.code_version} for s in rows],
                         indent=2))
        return
    table = Table(title=f"Studies in {db_url(db)}")
    for col in ("study", "space", "device", "complete", "infeasible", "failed", "running", "front", "created"):
        table.add_column(col)
    for s in rows:
        c = s.trial_counts
        table.add_row(s.name, s.space, s.profile, str(c.get("complete", 0)), str(c.get("infeasible", 0)),
                      str(c.get("failed", 0)), str(c.get("running", 0)), str(fronts[s.name]),
                      s.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@app.command()
def pareto(study: Annotated[str, typer.Argument(help="Study name (see `nas studies`).")], db: DbOpt = None,
           as_json: JsonOpt = False) -> None:
    """The study's Pareto front: architecture, params, BPB, latencies with their labels, memory, size."""
    _print_pareto(db_url(db), study, as_json)


@app.command()
def show(study: Annotated[str, typer.Argument(help="Study name.")],
         trial: Annotated[int, typer.Argument(help="Trial number.")], db: DbOpt = None,
         as_json: JsonOpt = False) -> None:
    """One trial: its spec, measurement with provenance, training, score, and why it failed if it did."""
    with _open_store(db_url(db)) as store:
        t = store.get_trial(study=study, number=trial)
        figures = _trial_figures(store, t)
        spec = store.get_architecture(arch_id=t.arch_id).spec if t.arch_id else None
        m = store.get_measurement(id=t.measurement_id) if t.measurement_id else None
        full = store.trials(study=study, curves=True)
    curve = next((x.curve for x in full if x.number == trial), None)
    if as_json:
        print(json.dumps({**figures, "spec": spec.to_dict() if spec else None, "train": t.train,
                          "baselines": t.baselines, "curve": curve,
                          "measurement": {"workload": m.workload, "provenance": m.provenance,
                                          "decode_p10_ms": m.decode_p10_ms, "decode_p90_ms": m.decode_p90_ms,
                                          "prefill_p10_ms": m.prefill_p10_ms, "prefill_p90_ms": m.prefill_p90_ms}
                          if m else None}, indent=2, default=str))
        return
    table = Table(title=f"{study} trial {trial}: {t.state}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    if t.failure_reason:
        table.add_row("why", f"[red]{t.failed_stage}: {t.failure_reason}[/red]")
    if spec:
        table.add_row("architecture", f"{spec.summary()} ({spec.arch_id})")
        table.add_row("params", f"{spec.params():,} ({spec.non_embedding_params():,} non-embedding)")
    if t.val_bpb is not None:
        b = t.baselines or {}
        table.add_row("validation BPB", f"{t.val_bpb:.4f} (bigram {b.get('bigram_bpb', float('nan')):.4f}, "
                                        f"unigram {b.get('unigram_bpb', float('nan')):.4f})")
    if t.train:
        tr = t.train
        table.add_row("training", f"{tr['tokens']:,} tokens, {tr['steps']} steps, {tr['seconds']} s "
                                  f"({tr['tokens_per_s']:,.0f} tok/s), final loss {tr['final_loss']:.4f}")
    if curve:
        table.add_row("loss curve", "  ".join(f"{p[0]}:{p[2]:.2f}" for p in curve[:: max(1, len(curve) // 8)]))
    if m:
        table.add_row("decode", f"{m.decode_ms_per_token:.3f} ms/token (p10 {m.decode_p10_ms:.3f}, p90 "
                                f"{m.decode_p90_ms:.3f}) {m.label}")
        table.add_row("prefill", f"{m.prefill_ms:.2f} ms (p10 {m.prefill_p10_ms:.2f}, p90 {m.prefill_p90_ms:.2f}) "
                                 f"{m.label}")
        table.add_row("memory / size", f"{(m.peak_memory_bytes or 0) / 2**20:.1f} MiB peak, "
                                       f"{(m.model_bytes or 0) / 2**20:.2f} MiB model")
        table.add_row("workload", json.dumps(m.workload))
        prov = m.provenance.get("host", m.provenance)
        table.add_row("taken on", f"{prov.get('cpu')}, {prov.get('threads')} threads, "
                                  f"{prov.get('execution_provider')}, onnxruntime {prov.get('onnxruntime')}")
    if t.constraints:
        table.add_row("constraints", ", ".join(f"{k} {v:+.3g}" for k, v in t.constraints.items())
                      + ("  (≤ 0 is within budget)"))
    if t.artifact_dir:
        table.add_row("artifacts", t.artifact_dir)
    console.print(table)


db_app = typer.Typer(help="The results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None) -> None:
    """Create or upgrade this project's tables (nas_*) to the current schema. Optuna's tables are
    Optuna's own and untouched."""
    from nas.store import upgrade

    before, after = upgrade(db_url(db))
    console.print(f"{db_url(db)}: schema {before or 'empty'} -> {after}")


def _host_setup(refresh: bool):
    from nas.search.pipeline import host_setup

    return host_setup(refresh=refresh)


from nas.faces.cli.winner import register as _register_export  # noqa: E402, I001
_register_export(app)
from nas.faces.cli.browse import register as _register_browse  # noqa: E402, I001
_register_browse(app)


def main() -> None:
    # Standalone mode lets click report usage errors (exit 2) and --help; our own errors come
    # out of it as NasError and get one line, no traceback.
    try:
        app()
    except NasError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
