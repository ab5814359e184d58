"""The studies (``/``) and one study's page (``/study/NAME``): its figures and its trial table."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from nas.faces import plots
from nas.faces.web.deps import Reader, Screenful, Settings
from nas.faces.web.reader import studies_stamp
from nas.faces.web.render import render
from nas.faces.web.views import AXES, FEASIBILITY, View, colour_choices

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def index(reader: Reader, settings: Settings) -> str:
    studies = reader.store.list_studies()
    return render(
        "index.html",
        title="studies",
        studies=studies,
        db=reader.store.url,
        refresh_s=settings.refresh_s,
        stamp=studies_stamp(studies),
    )


@router.get("/study/{name}", response_class=HTMLResponse)
def study_page(
    name: str,
    reader: Reader,
    settings: Settings,
    table: Screenful,
    x: str = "decode_ms",
    y: str = "val_bpb",
    color: str | None = None,
) -> str:
    """The page is drawn without its figures, which it fetches from ``/api/study/NAME/figures``:
    the table shows at once, however large the study."""
    view = View.parse(x=x, y=y, color=color, **table)
    full = reader.load(name)
    rows, matching = view.rows(full)
    labels = sorted({p.label for p in full.points if p.label})
    return render(
        "study.html",
        title=name,
        data=full,
        study=name,
        view=view,
        state=dataclasses.asdict(view),
        rows=rows,
        close=full.within_noise(),
        rungs=full.has_rungs,
        matching=matching,
        labels=labels,
        facts=plots.study_facts(full),
        db=reader.store.url,
        refresh_s=settings.refresh_s,
        stamp=reader.stamp(full.study),
        axes=AXES,
        colours=colour_choices(full),
        feasibility=FEASIBILITY,
    )
