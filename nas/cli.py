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

from nas.arch import ArchSpec
from nas.errors import NasError, SpecError

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
    from nas.space import iter_spaces, load_space

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
    from nas.space import load_space

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

    from nas.data import load_corpus, ngram_baseline_bpb, tokenize_corpus
    from nas.space import load_space
    from nas.train import evaluate_bpb, train_brief

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
