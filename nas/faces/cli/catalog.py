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
    DbOpt,
    JsonOpt,
    SeedOpt,
    SpaceOpt,
    console,
    db_url,
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




devices_app = typer.Typer(help="Hardware profiles: list and validate them, calibrate this host or a device.",
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
    device: Annotated[str | None, typer.Option(
        "--device", "-d", help="Calibrate this profile's device (a name from `nas devices` or a YAML path): measure "
                               "the fixed reference architectures on it and store them as its calibration points. "
                               "Without it: this host's bandwidth and matmul rates, as before.")] = None,
    db: DbOpt = None,
    ray_address: Annotated[str | None, typer.Option(
        help="With --device of a `where: ray` profile: HOST:PORT of the cluster whose node advertises the "
             "profile's ray_resource.")] = None,
    export: Annotated[Path | None, typer.Option(
        "--export", help="With --device: write the points as a YAML `calibration:` snippet for the profile.")] = None,
    space: Annotated[str, typer.Option("--space", "-s", help="Without --device: space to draw the reference "
                                                             "architectures from.")] = "gqa_small",
    n: Annotated[int | None, typer.Option("-n", help="Reference architectures to measure (without --device: drawn "
                                                     "from --space, default 3; with it: the first N of the fixed "
                                                     "set, smallest first, default all 6).", min=1)] = None,
    seed: SeedOpt = 0,
    refresh: Annotated[bool, typer.Option(help="Measure the host again instead of using the cached figures.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Calibrate a device's latency model on the device, or this host's roofline.

    With --device NAME: the fixed reference set (nas.spec.calibration, 6 architectures spanning
    size, depth, attention kind and bitwidth) is exported here and measured on the device: on
    the Ray node advertising the profile's ray_resource (`where: ray`, with --ray-address), or
    on this machine (`where: local`, e.g. host). Each point is stored in the database under the
    device's fingerprint, printed against the latency model before and after it, and used by
    the search's estimates for that profile; --export writes them for the profile's YAML.

    Without --device: this host's memory bandwidth and matrix-multiply rates with ONNX Runtime
    (cached), then the roofline efficiencies they give on a few architectures of --space.
    """
    if device is not None:
        _calibrate_device(device, db, ray_address, export, n, as_json)
        return
    if export is not None or ray_address is not None:
        raise NasError("--export and --ray-address calibrate a device: give --device NAME")
    n = n or 3
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
            m = measure_local(export_spec(spec, Path(tmp), graph="deploy").path.parent, spec, host)
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


def _calibrate_device(device: str, db: str | None, ray_address: str | None, export: Path | None, n: int | None,
                      as_json: bool) -> None:
    from nas.search.calibration import calibrate_device, points_yaml
    from nas.spec.files import atomic_write
    from nas.spec.profile import load_profile
    from nas.store import Store

    profile = load_profile(device)
    log = err_console if as_json else console
    with Store(db_url(db)) as store, log.status("calibrating…") as status:
        result = calibrate_device(profile, store, ray_address=ray_address, n=n, progress=status.update)
    if export is not None:
        try:
            atomic_write(export, points_yaml(profile, result.rows))
        except OSError as e:
            raise NasError(f"{export}: cannot write: {e.strerror}") from None
    if as_json:
        print(json.dumps({"profile": profile.name, "run": result.run, "where": result.where,
                          "points": [_fit_json(f) for f in result.fits], "no_fit": result.no_fit,
                          "refit": result.after.describe() if result.after else None}, indent=2, default=str))
        return
    _print_calibration(result, export)


def _fit_json(f: Any) -> dict[str, Any]:
    r = f.row
    return {"id": r.id, "arch_id": r.arch_id, "summary": r.spec.summary(), "bitwidth": r.spec.bitwidth,
            "label": r.label, "node": r.node, "device_fingerprint": r.device_fingerprint, "workload": r.workload,
            "decode_ms": r.decode_ms, "prefill_ms": r.prefill_ms, "peak_memory_bytes": r.peak_memory_bytes,
            "model_bytes": r.model_bytes, "device_facts": r.device_facts, "predicted_before": f.before,
            "predicted_after": f.after}


def _vs(predicted: float | None, measured: float) -> str:
    if predicted is None:
        return "–"
    return f"{predicted:.3g} ({(predicted - measured) / measured:+.0%})"


def _print_calibration(result: Any, export: Path | None) -> None:
    p = result.profile
    fps = sorted({r.device_fingerprint for r in result.rows})
    console.print(f"[bold]{p.name}[/bold] measured on {result.where}: run {result.run}, "
                  f"device fingerprint {', '.join(fps)}")
    facts = result.rows[0].device_facts if result.rows else {}
    console.print("  " + ", ".join(f"{k} {v}" for k, v in facts.items()), highlight=False)
    if result.before is not None and result.after.method == "datasheet":
        caption = (f"before and refit: the datasheet model ({result.after.parameter_sources.get('kernel_us')}); "
                   f"a fit needs at least 3 points")
    elif result.before is not None:
        errors = ", ".join(f"{k} {v:.0%}" for k, v in result.after.fit_error.items())
        caption = (f"before: the model fitted to the profile's {len(p.calibration)} own point(s) "
                   f"({result.before.method}); refit: with these {len(result.rows)} too (its mean error over "
                   f"all {result.after.n_points} points it was fitted to: {errors})")
    else:
        caption = f"no fit: {result.no_fit}"
    table = Table(title=f"Calibration points of {p.name}", caption=caption)
    for col in ("arch", "decode ms", "before", "refit", "prefill ms", "before", "refit", "peak MiB", "node"):
        table.add_column(col, justify="left" if col in ("arch", "node") else "right", overflow="fold")
    for f in result.fits:
        r = f.row
        peak = f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes else "–"
        table.add_row(r.spec.summary(), f"{r.decode_ms:.3f}", _vs(f.before.get("decode"), r.decode_ms),
                      _vs(f.after.get("decode"), r.decode_ms), f"{r.prefill_ms:.2f}",
                      _vs(f.before.get("prefill"), r.prefill_ms), _vs(f.after.get("prefill"), r.prefill_ms),
                      peak, r.node)
    console.print(table)
    use = ("estimates for it (no device node in the cluster, or `where: estimate`) now fit these points"
           if p.measurement.where != "local" else "its figures are measured, so no search estimate uses them")
    console.print(f"stored in nas_calibration under {p.name} + fingerprint; {use}.")
    if export is not None:
        console.print(f"wrote {len(result.rows)} point(s) to {export} (paste under the profile's calibration:)")
