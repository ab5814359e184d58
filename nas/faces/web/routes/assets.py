"""plotly.js, served from the plotly package itself so that the page works on a closed network,
and an empty favicon, so that a browser asking for one gets no error page."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter
from fastapi.responses import Response
from plotly.offline import get_plotlyjs

router = APIRouter()


@router.get("/static/plotly.min.js")
def plotly_js() -> Response:
    return Response(
        _plotly_js(), media_type="application/javascript", headers={"Cache-Control": "public, max-age=86400"}
    )


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)


@cache
def _plotly_js() -> str:
    return get_plotlyjs()
