"""What every `nas` command file shares: the consoles, the common options (``--db`` and its
default, ``--space``, ``--seed``, ``--json``), number formats, and reading an architecture."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError, SpecError

LOG_WIDTH = 160
"""Columns when the output is not a terminal and COLUMNS does not say: rich's own 80 would fold
the front's table into a column of fragments in a log file."""


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, width=LOG_WIDTH)
    return c


console = _console()
err_console = _console(stderr=True)

SpaceOpt = Annotated[str, typer.Option("--space", "-s", help="Search space: a name from `nas spaces` or a YAML path.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling (and training).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default: sqlite:///nas.db in the working "
                                                        "directory; postgresql://... for several workers).")]


def db_url(url: str | None) -> str:
    """``--db`` as given, or the default: sqlite:///nas.db in the working directory."""
    from nas.store import default_db_url

    return url or default_db_url()


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
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


def read_arch_json(path: Path) -> ArchSpec:
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


def spec_from(space: str, arch_json: Path | None, seed: int) -> ArchSpec:
    from nas.spec.space import load_space

    sp = load_space(space)
    if arch_json is None:
        return sp.sample(random.Random(seed))
    spec = read_arch_json(arch_json)
    sp.check_rules(spec)
    return spec
