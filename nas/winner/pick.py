"""Which trial of a study to export (:func:`pick_trial`).

- ``--trial N``: that trial, if it completed (a failed, infeasible or running trial has no trained
  model to export).
- ``--pick knee``: the stored Pareto front's point closest to the utopia point. Each of the
  study's objectives is min-max normalized over the front to [0, 1] (0 = the front's best, 1 its
  worst; an objective equal on every point counts 0 for all), so that milliseconds and bits per
  byte weigh alike; the utopia point is 0 in every objective (each best at once, usually
  unreachable); the knee is the point at the smallest Euclidean distance from it, ties to the
  lower trial number. It is the balanced compromise, not the best at anything.
- ``--pick best-under --max-decode-ms X``: the lowest BPB among complete trials within every
  budget of the profile whose decode latency (the measurement's median, with its label) is at
  most X ms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.winner.errors import WinnerError

if TYPE_CHECKING:
    from nas.store import Store, StudyRow, TrialRow

PICKS = ("knee", "best-under")


def knee_index(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> int:
    """Index of the row of ``values`` (front points x objectives) closest to the utopia point after
    min-max normalizing each objective over the rows (module docstring); the first on a tie."""
    points = np.asarray(values, dtype=float)
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] != len(directions):
        raise WinnerError(f"knee: need a non-empty (points x {len(directions)}) table, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise WinnerError("knee: objective values must be finite")
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    p = points * sign  # every column now minimized
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    normalized = (p - lo) / span  # 0 = best on the front; a constant column is 0 everywhere
    distance = np.sqrt((normalized**2).sum(axis=1))
    return int(np.argmin(distance))  # argmin returns the first minimum: rows come by trial number


@dataclass(frozen=True)
class Pick:
    """The chosen trial and why, in words for the README and the CLI."""

    number: int
    how: str
    details: dict[str, Any] = field(default_factory=dict)


def pick_trial(store: Store, study: str, *, trial: int | None = None, pick: str | None = None,
               max_decode_ms: float | None = None) -> Pick:
    """Choose the trial to export: exactly one of ``trial`` or ``pick`` (module docstring)."""
    _check_choice(trial, pick, max_decode_ms)
    st = store.get_study(name=study)  # an unknown study is an error before any other
    if trial is not None:
        return _by_number(store, study, trial)
    if pick == "knee":
        return _knee(store, st)
    assert max_decode_ms is not None  # _check_choice saw to it; narrows the type
    return _best_under(store, study, max_decode_ms)


def _check_choice(trial: int | None, pick: str | None, max_decode_ms: float | None) -> None:
    if (trial is None) == (pick is None):
        raise WinnerError("choose the trial with exactly one of --trial N or --pick knee|best-under")
    if pick is not None and pick not in PICKS:
        raise WinnerError(f"unknown --pick {pick!r}; choose one of {', '.join(PICKS)}")
    if pick == "best-under" and max_decode_ms is None:
        raise WinnerError("--pick best-under needs --max-decode-ms X (decode latency limit, ms/token)")
    if max_decode_ms is not None and pick != "best-under":
        raise WinnerError("--max-decode-ms only applies to --pick best-under")
    if max_decode_ms is not None and not (math.isfinite(max_decode_ms) and max_decode_ms > 0):
        raise WinnerError(f"--max-decode-ms must be a positive number of milliseconds, got {max_decode_ms}")


def _by_number(store: Store, study: str, number: int) -> Pick:
    row = store.find_trial(study=study, number=number)
    if row is None:
        numbers = [t.number for t in store.trials(study=study)]
        known = f"trials {min(numbers)}-{max(numbers)}" if numbers else "no trials yet"
        raise WinnerError(f"no trial {number} in study {study!r} ({known})")
    _exportable(row, study)
    note = "" if row.feasible else " (over a budget of the profile: see the constraints)"
    return Pick(number, f"trial {number}, chosen by --trial{note}")


def _exportable(trial: TrialRow, study: str) -> None:
    if trial.state == "complete":
        return
    if trial.state == "failed":
        raise WinnerError(f"trial {trial.number} of study {study!r} failed at {trial.failed_stage}: "
                          f"{trial.failure_reason}; it has no trained model to export")
    if trial.state == "infeasible":
        raise WinnerError(f"trial {trial.number} of study {study!r} is infeasible ({trial.failed_stage}: "
                          f"{trial.failure_reason}); it was never trained")
    raise WinnerError(f"trial {trial.number} of study {study!r} is still {trial.state}; export it when it completes")


def _knee(store: Store, st: StudyRow) -> Pick:
    front = [t for t in store.pareto(study=st.name) if t.state == "complete"]
    if not front:
        raise WinnerError(f"study {st.name!r} has no Pareto front yet (no complete trial within the budgets)")
    names = [o.name for o in st.objectives]
    values = [[(t.objectives or {}).get(n, math.nan) for n in names] for t in front]
    chosen = front[knee_index(values, [o.direction for o in st.objectives])]
    how = (f"knee of the Pareto front ({len(front)} point{'s' if len(front) != 1 else ''} over "
           f"{', '.join(names)}): the point closest to the utopia point after min-max normalizing each "
           "objective over the front")
    return Pick(chosen.number, how, {"front": [t.number for t in front], "objectives": names})


def _best_under(store: Store, study: str, max_decode_ms: float) -> Pick:
    candidates = []
    fastest: tuple[float, int] | None = None
    for t in store.trials(study=study, states=["complete"]):
        if not t.feasible or t.val_bpb is None:
            continue
        ms, label = _decode_ms(store, t)
        if ms is None:
            continue
        if fastest is None or ms < fastest[0]:
            fastest = (ms, t.number)
        if ms <= max_decode_ms:
            candidates.append((t.val_bpb, t.number, ms, label))
    if not candidates:
        if fastest is None:
            raise WinnerError(f"study {study!r} has no complete trial within its budgets to choose from")
        raise WinnerError(f"no complete trial of study {study!r} within its budgets decodes in <= {max_decode_ms:g} "
                          f"ms/token; the fastest is trial {fastest[1]} at {fastest[0]:.4g} ms")
    bpb, number, ms, label = min(candidates)
    how = (f"lowest BPB ({bpb:.4f}) among the {len(candidates)} complete trial(s) within the budgets that decode in "
           f"<= {max_decode_ms:g} ms/token (this one: {ms:.4g} ms, {label or 'unlabelled'})")
    return Pick(number, how, {"max_decode_ms": max_decode_ms, "candidates": len(candidates)})


def _decode_ms(store: Store, trial: TrialRow) -> tuple[float | None, str | None]:
    """The trial's decode latency (median ms/token) and its label, from its measurement."""
    if trial.measurement_id is not None:
        m = store.get_measurement(id=trial.measurement_id)
        return m.decode_ms_per_token, m.label
    value = (trial.objectives or {}).get("decode_ms")
    return value, None
