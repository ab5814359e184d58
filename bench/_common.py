"""What the benchmark scripts share. They run as ``python bench/NAME.py``, so this folder is on
``sys.path`` and ``from _common import cpu_model`` finds this file."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, for the machine facts every result records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
