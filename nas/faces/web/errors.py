"""What the page answers when it cannot answer: the error page (or JSON under ``/api/``), never a
traceback.

Each failure has its own status, so that neither a person nor a script polling ``/api/`` takes one
for another: a query parameter the page cannot use is a 400 naming it, a study or trial the
database does not hold a 404, a database that cannot be read (:class:`nas.store.StoreError`) a
503 with its one-line reason. Any other :class:`NasError` is a 500 that keeps its message (it
says what to fix, e.g. a stored spec this code rejects); anything else is a bug, logged with its
traceback and a bare 500 in the page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from nas.faces.web.render import render
from nas.spec.errors import NasError
from nas.store import StoreError

log = logging.getLogger("nas.faces.web")

TITLES = {400: "Bad request", 404: "Not found", 500: "Internal error", 503: "Database unavailable"}


class BadRequest(NasError):
    """A query parameter the page cannot use: becomes a 400 naming it."""


class NotFound(NasError):
    """A study or trial the database does not hold: becomes a 404 naming it."""


def install_error_pages(app: FastAPI) -> None:
    """Answer every failure of ``app`` with :func:`error_response`. Starlette picks the handler of
    the most specific class, so a :class:`BadRequest` is a 400 though it is also a NasError."""

    async def http_error(request: Request, exc: HTTPException) -> Response:  # an unknown URL, a wrong method
        return error_response(request, exc.status_code, str(exc.detail))

    async def bad_params(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(request, 400, f"bad {where}: {first.get('msg', 'invalid value')}")

    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return error_response(request, 400, str(exc))

    async def not_found(request: Request, exc: NotFound) -> Response:
        return error_response(request, 404, str(exc))

    async def unreadable(request: Request, exc: StoreError) -> Response:
        return error_response(request, 503, f"the database cannot be read: {exc}")

    async def cannot_show(request: Request, exc: NasError) -> Response:
        log.warning("cannot show %s: %s", request.url.path, exc)
        return error_response(request, 500, str(exc))

    async def bug(request: Request, exc: Exception) -> Response:
        log.exception("error on %s", request.url.path)
        return error_response(request, 500, "internal error (the server's log has the details)")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, bad_params)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(StoreError, unreadable)
    app.add_exception_handler(NasError, cannot_show)
    app.add_exception_handler(Exception, bug)


def error_response(request: Request, status: int, message: str) -> Response:
    """The error page, or ``{"error", "status"}`` for ``/api/`` and for a client that asks for JSON."""
    if _wants_json(request):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    body = render("error.html", title=TITLES.get(status, str(status)), status=status, message=message, db=None)
    return HTMLResponse(body, status_code=status)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")
