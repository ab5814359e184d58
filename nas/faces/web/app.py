"""`nas ui`: a read-only web page over the results database.

Pages: the studies (``/``), one study's figures and trial table (``/study/NAME``), one trial
(``/study/NAME/trial/N``) and studies side by side (``/compare?study=A&study=B``). The JSON under
``/api/`` is what the page polls while a search runs, and what a script can read.

Everything is read through :class:`nas.store.Store` and drawn by :mod:`nas.faces.plots` (a face,
in the package's layers: no SQL, no torch here). HTML is rendered on the server with Jinja2
(:mod:`.render`); plotly.js is served from the plotly package itself, so the page works on a
closed network. A study of thousands of trials is read once per change (:mod:`.reader`) and drawn
from an even sample of at most ``max_points`` trials, the front always kept.

The routes live in :mod:`.routes`, one module per resource, and are given the app's reader and
settings (:mod:`.deps`); :mod:`.errors` says what each failure becomes: never a traceback in the
page. Only requests that name the page as it is served get that far (:mod:`.hosts`: no other
site's page can read the results through a browser on this machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from nas.faces import plots
from nas.faces.web.deps import WebSettings
from nas.faces.web.errors import install_error_pages
from nas.faces.web.hosts import HostCheck, default_hosts, parse_allowed
from nas.faces.web.reader import StudyReader
from nas.faces.web.routes import ROUTERS
from nas.store import Store


def create_app(
    db_url: str,
    *,
    refresh_s: float = 5.0,
    max_points: int = 1000,
    host: str = "127.0.0.1",
    port: int = 8000,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The web app over the database at ``db_url``, read-only.

    The schema must be this code's (``nas db upgrade`` otherwise: the page never writes).
    ``refresh_s``: how often an open study page asks whether the study has changed.
    ``max_points``: at most this many trials (besides the front) are drawn per figure.
    ``allowed_hosts``: the ``Host:`` values answered (``NAME:PORT``, or ``NAME`` at any port), any
    other gets a 400; None: the address ``host`` and the loopback names at ``port``, where the app
    is served (:func:`~nas.faces.web.hosts.default_hosts`). A test client names itself
    ``testserver``, which it must allow.
    """
    # a bad entry fails here, before the database is opened
    hosts = parse_allowed(default_hosts(host, port) if allowed_hosts is None else allowed_hosts)
    store = Store(db_url, upgrade=False)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="nas", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.settings = WebSettings(db_url=db_url, refresh_s=refresh_s)
    # The specs of architectures seen, for the life of the server: an arch_id never changes its spec.
    app.state.specs = plots.SpecCache()
    app.state.reader = StudyReader(store, max_points=max_points, specs=app.state.specs)
    app.add_middleware(HostCheck, allowed=hosts)
    install_error_pages(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
