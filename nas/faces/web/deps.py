"""What the routes are given (FastAPI's ``Depends``): the app's :class:`StudyReader` and its
:class:`WebSettings`, both made once by :func:`nas.faces.web.app.create_app` and kept in
``app.state``. A route names them as parameters (``reader: Reader``), so it holds no state of its
own and a test can hand it another."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from nas.faces.web.reader import StudyReader
from nas.faces.web.views import DEFAULT_LIMIT
from nas.store import default_db_url


@dataclasses.dataclass(frozen=True)
class WebSettings:
    """What :func:`~nas.faces.web.app.create_app` was told that a route needs besides the reader."""

    db_url: str
    """The database URL as given (with its password, unlike ``Store.url``)."""
    refresh_s: float
    """How often an open page asks whether its study has changed."""

    def db_is_default(self) -> bool:
        """Whether a command shown on the page may leave out ``--db``; asked per request, since the
        default is a file in the working directory."""
        return self.db_url == default_db_url()


async def _reader(request: Request) -> StudyReader:
    return request.app.state.reader


async def _settings(request: Request) -> WebSettings:
    return request.app.state.settings


Reader = Annotated[StudyReader, Depends(_reader)]
Settings = Annotated[WebSettings, Depends(_settings)]


def _table_query(default_limit: int) -> Callable[..., Awaitable[dict[str, Any]]]:
    """The trial table's query parameters (filters, order, how many rows), for
    :meth:`nas.faces.web.views.View.parse`; ``limit`` defaults to ``default_limit``."""

    async def table_query(
        feasibility: str = "all",
        label: str = "all",
        sort: str = "number",
        desc: bool = False,
        limit: int = Query(default_limit, ge=1, le=100_000),
    ) -> dict[str, Any]:
        return {"feasibility": feasibility, "label": label, "sort": sort, "desc": desc, "limit": limit}

    return table_query


Screenful = Annotated[dict[str, Any], Depends(_table_query(DEFAULT_LIMIT))]
"""The table as the page shows it: at most DEFAULT_LIMIT rows unless asked for more."""
EveryRow = Annotated[dict[str, Any], Depends(_table_query(100_000))]
"""The table as a script reads it: every row unless asked for fewer."""
