"""What the benchmark scripts share. They run as ``python bench/NAME.py``, so this folder is on
``sys.path`` and ``from _common import cpu_model`` finds this file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nas.spec.files import atomic_write
from nas.spec.latency import kendall_tau

__all__ = ["cpu_model", "kendall_tau", "machine", "resume_or_refuse", "spread", "write_json"]


def cpu_model() -> str:
    """The CPU's model name, for the machine facts every result records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """The machine facts a result records (CPU, cores, load at the end, Python), plus ``extra``
    (library versions, threads): the load says how far to trust the timings."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_1_5_15min_at_end": os.getloadavg(),
            "python": platform.python_version(), **extra}


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max: how every benchmark reports repeated figures."""
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def write_json(path: Path, doc: dict[str, Any], indent: int = 1) -> None:
    """Write ``doc`` to ``path`` whole or not at all (``nas.spec.files.atomic_write``): the
    resumable benchmarks save after every run, and a kill mid-write must not lose the runs before."""
    atomic_write(path, json.dumps(doc, indent=indent))


def resume_or_refuse(path: Path, settings: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """The resumable benchmarks' start: the results at ``path`` when they were written under
    the same ``settings`` (the run goes on where it stopped), ``fresh`` when there is no file, and
    a one-line exit when the file holds runs made under other settings, which a new run must not
    overwrite (they may be the only copy of hours of training)."""
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: not a results file this script can resume ({e}); pass another --out or remove it")
    if old.get("settings") != settings:
        sys.exit(f"{path}: written with other settings; pass another --out or remove it")
    return old
