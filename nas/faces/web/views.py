"""The query parameters of the study page and the trial table: what each may be, checked once.

A view that cannot be drawn is refused up front as a :class:`BadRequest` naming the parameter,
never half-drawn. The same :class:`View` filters and sorts the table's rows for the page, for its
refresh (``/api/study/NAME/rows``) and for scripts (``/api/study/NAME/trials``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from nas.faces import plots
from nas.faces.web.errors import BadRequest
from nas.spec.arch import ArchSpec

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))
"""ArchSpec's fields in their declared order (the order of a stored spec's keys): what a point may
be coloured by besides a figure."""
AXES = tuple(plots.FIGURES)
FEASIBILITY = {
    "all": "every trial",
    "feasible": "complete, within budgets",
    "front": "on the Pareto front",
    "over-budget": "over a budget",
    "failed": "failed",
    "running": "running",
}
SORTS = (
    "number",
    "state",
    "params",
    "val_bpb",
    "decode_ms",
    "prefill_ms",
    "peak_memory_mb",
    "model_mb",
    "label",
    "seconds",
)
LABEL_RE = re.compile(r"^(all|none|measured:[\w.\-@]+|estimated:[\w.\-]+)$")
NAME_RE = re.compile(r"^[^\x00-\x1f/]{1,200}$")
DEFAULT_LIMIT = 500


@dataclasses.dataclass(frozen=True)
class View:
    """The study page's query parameters, checked once (a bad one is a 400 naming it)."""

    x: str = "decode_ms"
    y: str = "val_bpb"
    color: str | None = None
    feasibility: str = "all"
    label: str = "all"
    sort: str = "number"
    desc: bool = False
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, **kw: Any) -> View:
        view = cls(**kw)
        for key in ("x", "y"):
            if getattr(view, key) not in AXES:
                raise BadRequest(f"{key}={getattr(view, key)!r}: choose one of {', '.join(AXES)}")
        if view.x == view.y:
            raise BadRequest("x and y must be different figures")
        if view.color is not None and view.color not in AXES and view.color not in SPEC_FIELDS:
            raise BadRequest(f"color={view.color!r}: choose a figure ({', '.join(AXES)}) or a spec field")
        if view.feasibility not in FEASIBILITY:
            raise BadRequest(f"feasibility={view.feasibility!r}: choose one of {', '.join(FEASIBILITY)}")
        if not LABEL_RE.match(view.label):
            raise BadRequest(f"label={view.label!r}: all, none, measured:<where> or estimated:<how>")
        if view.sort not in SORTS:
            raise BadRequest(f"sort={view.sort!r}: choose one of {', '.join(SORTS)}")
        return view

    def keep(self, p: plots.TrialPoint) -> bool:
        f = self.feasibility
        ok = (
            f == "all"
            or (f == "feasible" and p.feasible)
            or (f == "front" and p.on_front)
            or (f == "over-budget" and (p.state == "infeasible" or (p.state == "complete" and not p.feasible)))
            or (f in ("failed", "running") and p.state == f)
        )
        if ok and self.label != "all":
            ok = (p.label is None) if self.label == "none" else p.label == self.label
        return ok

    def rows(self, data: plots.StudyData) -> tuple[list[plots.TrialPoint], int]:
        """The table's rows after the filters, sorted, at most ``limit``; and how many matched."""
        rows = [p for p in data.points if self.keep(p)]
        rows.sort(key=self._key, reverse=self.desc)
        if self.sort != "number":  # missing values last, whatever the order
            rows.sort(key=lambda p: self._key(p)[0])
        return rows[: self.limit], len(rows)

    def _key(self, p: plots.TrialPoint) -> tuple[bool, Any]:
        if self.sort == "number":
            return (False, p.number)
        if self.sort == "state":
            return (False, (p.state, p.number))
        if self.sort == "label":
            return (p.label is None, (p.label or "", p.number))
        if self.sort == "seconds":
            s = _seconds(p)
            return (s is None, s or 0.0)
        v = p.figures.get(self.sort)
        return (v is None, v if v is not None else 0.0)


def colour_choices(data: plots.StudyData) -> list[str]:
    """What the study's points may be coloured by: every figure, and the spec fields that vary
    among its loaded specs (every field when no spec is loaded yet)."""
    dims = data.dimensions() if any(p.spec for p in data.points) else []
    return [*AXES, *(d for d in SPEC_FIELDS if d in dims or not dims)]


def _seconds(p: plots.TrialPoint) -> float | None:
    return None if p.finished_at is None else (p.finished_at - p.started_at).total_seconds()
