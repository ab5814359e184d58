"""One trial's page (``/study/NAME/trial/N``): its spec, its measurement with where it came from,
its training curve, and the ``nas export`` command that makes a model folder of it."""

from __future__ import annotations

import shlex

import plotly.graph_objects as go
import plotly.io as pio
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from nas.faces import plots
from nas.faces.web.deps import Reader, Settings
from nas.faces.web.render import render
from nas.store import TrialRow

router = APIRouter()


@router.get("/study/{name}/trial/{number}", response_class=HTMLResponse)
def trial_page(name: str, number: int, reader: Reader, settings: Settings) -> str:
    store = reader.store
    study, trial = reader.trial(name, number)
    m = store.get_measurement(id=trial.measurement_id) if trial.measurement_id is not None else None
    spec = reader.spec(trial.arch_id) if trial.arch_id else None
    curve = _curve_figure(trial)
    front = {t.number for t in store.pareto(study=name)}
    return render(
        "trial.html",
        title=f"{name} · trial {number}",
        study=study,
        t=trial,
        m=m,
        spec=spec,
        on_front=number in front,
        curve_json=pio.to_json(curve, validate=False) if curve else None,
        export=_export_command(store.url, name, number, db_default=settings.db_is_default()),
        db=store.url,
    )


def _curve_figure(t: TrialRow) -> go.Figure | None:
    """Training loss against tokens seen (the curve's points are [step, tokens, loss, lr, seconds])."""
    if not t.curve:
        return None
    pts = [p for p in t.curve if isinstance(p, (list, tuple)) and len(p) >= 3 and p[2] is not None]
    fig = go.Figure(
        go.Scatter(
            x=[p[1] for p in pts],
            y=[p[2] for p in pts],
            mode="lines+markers",
            name="train loss",
            customdata=[p[0] for p in pts],
            hovertemplate="step %{customdata}, %{x:,} tokens: loss %{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(title_text="training loss (nats/token)")
    return plots.styled(fig, f"trial {t.number}: training loss", height=340)


def _export_command(db: str, study: str, number: int, *, db_default: bool) -> str:
    cmd = ["nas", "export", study, "--trial", str(number), "--out", f"{study}-trial{number}"]
    if not db_default:
        cmd += ["--db", db]
    return shlex.join(cmd)
