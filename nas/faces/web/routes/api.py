"""The JSON under ``/api/``: what the study page polls while a search runs (a study's stamp, its
table's rows, its figures), and what a script can read (the studies, a study's trials, a trial).
Errors here are JSON too (``{"error", "status"}``)."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from fastapi import APIRouter
from fastapi.responses import Response

from nas.faces import plots
from nas.faces.web.deps import EveryRow, Reader, Screenful
from nas.faces.web.errors import BadRequest
from nas.faces.web.render import fragment
from nas.faces.web.views import View, colour_choices
from nas.store import StudyRow

router = APIRouter(prefix="/api")


@router.get("/studies")
def api_studies(reader: Reader) -> list[dict[str, Any]]:
    return [_study_json(s) for s in reader.store.list_studies()]


@router.get("/study/{name}")
def api_study(name: str, reader: Reader) -> dict[str, Any]:
    study = reader.study(name)
    return {**_study_json(study), "stamp": reader.stamp(study)}


@router.get("/study/{name}/trials")
def api_trials(name: str, reader: Reader, table: EveryRow) -> dict[str, Any]:
    view = View.parse(**table)
    full = reader.load(name)
    rows, matching = view.rows(full)
    return {"study": name, "matching": matching, "trials": [_point_json(p) for p in rows]}


@router.get("/study/{name}/rows")
def api_rows(name: str, reader: Reader, table: Screenful) -> dict[str, Any]:
    """The trial table's rows as HTML, for the page's filters and its refresh."""
    view = View.parse(**table)
    full = reader.load(name)
    rows, matching = view.rows(full)
    return {
        "html": fragment("rows.html", rows=rows, study=name, close=full.within_noise(),
                         rungs=full.has_rungs),
        "facts": fragment("facts.html", facts=plots.study_facts(full)),
        "shown": len(rows),
        "matching": matching,
        "total": len(full.points),
        "stamp": reader.stamp(full.study),
    }


@router.get("/study/{name}/figures")
def api_figures(
    name: str, reader: Reader, x: str = "decode_ms", y: str = "val_bpb", color: str | None = None
) -> Response:
    """The study's four figures as one JSON object; the same study as read in the same view gives
    the same figures, so they are drawn once per read and view."""
    view = View.parse(x=x, y=y, color=color)
    stamp, data = reader.read(name, thin=True)
    if view.color is not None and view.color not in colour_choices(data):
        raise BadRequest(f"color={view.color!r}: not a figure or a search dimension of {name!r}")

    def draw() -> str:
        figs = _study_figures(data, view)
        return "{" + ",".join(f'"{k}":{pio.to_json(f, validate=False)}' for k, f in figs.items()) + "}"

    return Response(reader.figures_json((name, stamp, x, y, color), draw), media_type="application/json")


@router.get("/study/{name}/trial/{number}")
def api_trial(name: str, number: int, reader: Reader) -> dict[str, Any]:
    _, t = reader.trial(name, number)
    return _jsonable({f.name: getattr(t, f.name) for f in dataclasses.fields(t)})


def _study_figures(data: plots.StudyData, view: View) -> dict[str, go.Figure]:
    return {
        "pareto": plots.pareto_figure(data, x=view.x, y=view.y, color=view.color),
        "pareto3d": plots.pareto3d_figure(data),
        "hypervolume": plots.hypervolume_figure(data, x=view.x, y=view.y),
        "dimensions": plots.dimensions_figure(data, objective=view.y),
    }


def _study_json(s: StudyRow) -> dict[str, Any]:
    return {
        "name": s.name,
        "space": s.space,
        "profile": s.profile,
        "trials": s.trial_counts,
        "n_trials": s.n_trials,
        "objectives": [o.to_dict() for o in s.objectives],
        "created_at": s.created_at.isoformat(),
    }


def _point_json(p: plots.TrialPoint) -> dict[str, Any]:
    return _jsonable(
        {
            "number": p.number,
            "state": p.state,
            "feasible": p.feasible,
            "on_front": p.on_front,
            "architecture": p.summary,
            "arch_id": p.arch_id,
            "label": p.label,
            "figures": p.figures,
            "failed_stage": p.stage,
            "failure_reason": p.reason,
            "constraints": p.constraints,
            "started_at": p.started_at,
            "finished_at": p.finished_at,
        }
    )


def _jsonable(value: Any) -> Any:
    """JSON's values only: NaN and infinities (a diverged loss) become null, times ISO strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value
