"""Studies side by side (``/compare?study=A&study=B``): their fronts and hypervolume over time
against one reference point (:func:`nas.faces.plots.compare_figure`)."""

from __future__ import annotations

from typing import Annotated

import plotly.io as pio
from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from nas.faces import plots
from nas.faces.web.deps import Reader
from nas.faces.web.errors import BadRequest
from nas.faces.web.render import render
from nas.faces.web.views import View

router = APIRouter()


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    reader: Reader,
    study: Annotated[list[str] | None, Query()] = None,
    x: str = "decode_ms",
    y: str = "val_bpb",
) -> str:
    study = study or []
    if len(study) < 2:
        raise BadRequest("compare needs two studies or more: /compare?study=A&study=B")
    View.parse(x=x, y=y)
    datas = [reader.load(n, thin=True) for n in study]
    fig = plots.compare_figure(datas, x=x, y=y)
    return render(
        "compare.html",
        title="compare",
        studies=study,
        fig_json=pio.to_json(fig, validate=False),
        db=reader.store.url,
    )
