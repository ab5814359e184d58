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

MAX_COMPARED = 8
"""At most this many studies on one compare page: the figure stays readable, and one request cannot
make the server read every study in the database (each is read whole, and the reader keeps only
:data:`~nas.faces.web.reader.STUDIES_KEPT` reads)."""


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    reader: Reader,
    study: Annotated[list[str] | None, Query()] = None,
    x: str = "decode_ms",
    y: str = "val_bpb",
) -> str:
    """Each study named is read once, however often the URL names it (in the order first named),
    and none is read when the request names too many."""
    names = list(dict.fromkeys(study or []))
    if len(names) < 2:
        raise BadRequest("compare needs two studies or more: /compare?study=A&study=B")
    if len(names) > MAX_COMPARED:
        raise BadRequest(f"study: compare shows at most {MAX_COMPARED} studies, this asks for {len(names)}")
    View.parse(x=x, y=y)
    datas = [reader.load(n, thin=True) for n in names]
    fig = plots.compare_figure(datas, x=x, y=y)
    return render(
        "compare.html",
        title="compare",
        studies=names,
        fig_json=pio.to_json(fig, validate=False),
        db=reader.store.url,
    )
