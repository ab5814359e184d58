"""Hypervolume of a two-objective front, and its history over a study.

The hypervolume is the search-efficiency figure: one number for how much of the objective space a
front dominates, so that two searches with the same budget can be compared over time (against one
reference point; :func:`reference_point` picks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from nas.faces.plots.data import StudyData
from nas.store import non_dominated


def hypervolume_2d(
    points: Iterable[Sequence[float]], reference: Sequence[float], directions: Sequence[str] = ("minimize", "minimize")
) -> float:
    """The area dominated by ``points`` and bounded by ``reference``, in two objectives.

    Optuna's own hypervolume is in a private module, so it is computed here: sort by the first
    objective and add, for each point that improves the second, the strip it newly covers. Points
    that do not strictly beat the reference in both objectives add nothing. Maximized objectives
    are negated first, so the reference must lie below every point that should count.
    """
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    pts = np.asarray(list(points), dtype=float).reshape(-1, 2) * sign
    ref = np.asarray(reference, dtype=float) * sign
    pts = pts[np.all(pts < ref, axis=1) & np.all(np.isfinite(pts), axis=1)]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def reference_point(values: np.ndarray, directions: Sequence[str]) -> list[float]:
    """The worst value seen in each objective, pushed out by a tenth of the range seen (or a tenth
    of its size when every value is the same), so that the worst points still add a little area."""
    vals = np.asarray(values, dtype=float).reshape(-1, len(directions))
    ref = []
    for i, d in enumerate(directions):
        col = vals[:, i]
        span = float(col.max() - col.min()) or abs(float(col.max())) or 1.0
        ref.append(float(col.max() + 0.1 * span) if d == "minimize" else float(col.min() - 0.1 * span))
    return ref


def hypervolume_history(
    data: StudyData, x: str = "decode_ms", y: str = "val_bpb", reference: Sequence[float] | None = None
) -> tuple[list[dict[str, Any]], list[float]]:
    """The hypervolume of the feasible front after each trial finished, in finishing order.

    Returns one row per finished trial (number, minutes since the study's first trial started,
    hypervolume) and the reference point used (default: :func:`reference_point` of this study).
    """
    dirs = (data.direction(x), data.direction(y))
    done = sorted((p for p in data.points if p.finished_at is not None), key=lambda p: (p.finished_at, p.number))
    usable = [p for p in done if p.feasible and x in p.figures and y in p.figures]
    if reference is None:
        if not usable:
            return [], []
        reference = reference_point(np.array([[p.figures[x], p.figures[y]] for p in usable]), dirs)
    start = min((p.started_at for p in data.points), default=None)
    front: list[tuple[float, float]] = []
    rows, hv = [], 0.0
    for p in done:
        if p.feasible and x in p.figures and y in p.figures:
            candidate = (p.figures[x], p.figures[y])
            pts = np.array([*front, candidate])
            front = [tuple(r) for r in pts[non_dominated(pts, dirs)]]  # type: ignore[misc]
            hv = hypervolume_2d(front, reference, dirs)
        minutes = (p.finished_at - start).total_seconds() / 60 if start and p.finished_at else 0.0
        rows.append({"number": p.number, "minutes": minutes, "hypervolume": hv, "state": p.state})
    return rows, list(reference)
