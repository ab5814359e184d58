"""`nas spaces`, `nas sample`, `nas devices`: what can be searched, on what, and what an
architecture of a space looks like. Registered on the main app by ``register(app)``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nas.faces.cli.common import (
    JsonOpt,
    SeedOpt,
    SpaceOpt,
    console,
    err_console,
    fmt_bytes,
    fmt_count,
    spec_figures,
)
from nas.spec.errors import NasError


def register(app: typer.Typer) -> None:
    """Add ``spaces``, ``sample`` to ``app``."""
    app.command()(spaces)
    app.command()(sample)
    app.add_typer(devices_app, name="devices")


def _each_valid(files: Iterable[tuple[str, Path]], load: Callable[[Path], Any],
                rows: list[dict[str, Any]]) -> Iterator[tuple[str, Path, Any]]:
    """(name, path, loaded) for each definition file that loads; one that does not gets its row
    (``valid: False`` and the error) in ``rows`` instead, so a listing validates as it goes."""
    for name, path in files:
        try:
            loaded = load(path)
        except NasError as e:
            rows.append({"name": name, "path": str(path), "valid": False, "error": str(e)})
            continue
        yield name, path, loaded


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
    rows = []
    for name, path, sp in _each_valid(iter_spaces(), load_space, rows):
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
                f"{fmt_count(r['params_min'])}–{fmt_count(r['params_max'])}", fmt_count(r["train_tokens"]),
                r["description"].split(". ")[0].rstrip(".") + ".",
            )
        console.print(table)
    if any(not r["valid"] for r in rows):
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
            s.arch_id, s.summary(), fmt_count(f["params"]), fmt_count(f["non_embedding_params"]),
            fmt_count(f["prefill_flops"]), fmt_count(f["decode_flops"]), fmt_bytes(f["weight_bytes"]),
            fmt_bytes(f["kv_cache_bytes_per_token"]),
        )
    console.print(table)




devices_app = typer.Typer(help="Hardware profiles: list and validate them, calibrate this host.",
                          invoke_without_command=True, no_args_is_help=False)


@devices_app.callback()
def devices(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the hardware profiles in hw_profiles/ and validate each one (exit 2 if any is invalid)."""
    if ctx.invoked_subcommand is not None:
        return
    from nas.spec.profile import list_profile_files, load_profile

    rows = []
    for name, path, p in _each_valid(list_profile_files().items(), load_profile, rows):
        rows.append({
            "name": name, "path": str(path), "valid": True, "device": p.device.name,
            "provider": p.runtime.execution_provider, "threads": p.runtime.threads,
            "bandwidth_gbs": p.device.memory_bandwidth_gbs, "where": p.measurement.where,
            "ray_resource": p.measurement.ray_resource, "calibration_points": len(p.calibration),
            "budgets": p.budgets.model_dump(),
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
                     "estimate": "estimated:model"}[r["where"]]
            if r["calibration_points"]:
                where += f" ({r['calibration_points']} calibration points)"
            budgets = ", ".join(f"{k} ≤ {v:g}" for k, v in r["budgets"].items() if v is not None)
            bw = r["bandwidth_gbs"]
            table.add_row(r["name"], r["device"], f"{r['provider'].removesuffix('ExecutionProvider')} ×{r['threads']}",
                          f"{bw:g} GB/s" if isinstance(bw, (int, float)) else str(bw), where, budgets)
        console.print(table)
    if any(not r["valid"] for r in rows):
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

    from nas.search.pipeline import host_setup
    from nas.spec.space import load_space
    from nas.stages.export import export_spec
    from nas.stages.measure import measure_local

    log = err_console if as_json else console
    with log.status("measuring this host's bandwidth and matmul rates…"):
        calibrated = host_setup(refresh=refresh)
    host, cal = calibrated.profile, calibrated.cal
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
                          "fp32 rate. Well below 1 means overhead-bound (many small ops) (docs/dependencies.md).")
    for col in ("arch", "decode ms", "cv", "GB/s", "eff.", "prefill ms", "GFLOP/s", "eff."):
        table.add_column(col, justify="left" if col == "arch" else "right", overflow="fold")
    for r in rows:
        table.add_row(r["summary"], f"{r['decode_ms']:.3f}", f"{r['decode_cv']:.1%}", f"{r['decode_gbs']:.1f}",
                      f"{r['decode_efficiency']:.2f}", f"{r['prefill_ms']:.2f}", f"{r['prefill_gflops']:.0f}",
                      f"{r['prefill_efficiency']:.2f}")
    console.print(table)
