"""Deadlines for the stages of a trial that run in this process (export, quantize, score).

A stage can hang or crawl (a loaded machine once held an export for 23 minutes where it takes
5-12 s). The measurement itself runs in a child process with its own time-out; the export, the
quantizers and the scoring run here, inside torch and ONNX Runtime, where nothing can be asked
to stop politely. So a stage past its deadline is interrupted with SIGALRM: the handler raises
:class:`StageTimeout` in the main thread at the next Python bytecode, the trial fails with the
stage and the reason, and the search goes on.

Limits: only the main thread receives signals, so a stage run elsewhere (a Ray Tune function
trainable runs in a thread of its worker) has no deadline; and a handler's exception raised while
a ``__del__`` or a ``finally`` runs can be swallowed, in which case the stage ends late instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError

# What a stage normally costs on the slowest machine we plan for (2 shared cores), in seconds,
# from the figures in bench/README.md ("Cost of a trial"): export 5-12 s and scoring 4-7% of a
# 3-5 minute trial for 8-27M parameters. A deadline is a multiple of this (SearchConfig's
# stage_deadline_factor), so that a loaded machine (up to 3x slower) never reaches it.
_BASE_S = {"export": 5.0, "score": 10.0}
_PER_MILLION_PARAMS_S = {"export": 0.3, "score": 0.5}


class StageTimeout(NasError):
    """A stage that ran past its deadline."""


def stage_deadline_s(stage: str, spec: ArchSpec, factor: float) -> float:
    """The deadline of ``stage`` ("export": export and quantize; "score": the trained model's
    export and its BPB in ONNX Runtime) for ``spec``: ``factor`` times its normal cost."""
    return factor * (_BASE_S[stage] + _PER_MILLION_PARAMS_S[stage] * spec.params() / 1e6)


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise StageTimeout if the body runs past ``seconds`` (None: no deadline). Only in the
    main thread; elsewhere the body runs without one."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise StageTimeout(f"{what} ran past its deadline of {seconds:.0f} s (a hung or starved stage)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
