"""Which ``Host:`` the page answers to: its defence against DNS rebinding.

The page has no login; it relies on being reachable from this machine only (127.0.0.1). A web
site open in a browser here can get around that without reaching the port itself: it makes its
own domain resolve to 127.0.0.1, and the browser, which believes it still talks to that domain,
lets the site's script read what the page answers. The browser does name that domain in
``Host:``, so answering only the names the page is served under (the address ``nas ui`` binds
and the loopback names, at its port) closes the hole; ``nas ui --allow-host`` adds a name (the
machine's on a network, a reverse proxy's). Any other ``Host:`` gets a 400 before a route runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from nas.faces.web.errors import error_response
from nas.spec.errors import NasError

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
"""The names a browser on this machine reaches a loopback-bound page by."""

_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9._~%-]+)(?::(?P<port>[0-9]{1,5}))?")


def default_hosts(host: str, port: int) -> list[str]:
    """``NAME:PORT`` for the address the page is bound to (``host``, as ``nas ui --host`` takes it:
    an IPv6 address without brackets) and for each loopback name, at ``port``."""
    names = dict.fromkeys([_bracketed(host.lower()), *LOOPBACK])
    return [f"{name}:{port}" for name in names]


def parse_host(text: str) -> tuple[str, int | None] | None:
    """``NAME`` or ``NAME:PORT`` (an IPv6 address in brackets) as the lower-case name and the port,
    or None when ``text`` is neither."""
    match = _HOST.fullmatch(text.strip().lower())
    if match is None:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return None
    return match["name"], None if port is None else int(port)


def parse_allowed(entries: Sequence[str]) -> frozenset[tuple[str, int | None]]:
    """``entries`` (``NAME:PORT``, or ``NAME`` for any port; an IPv6 address with brackets or
    without) as :class:`HostCheck` compares them; a :class:`NasError` names one that is neither."""
    allowed = set()
    for entry in entries:
        parsed = parse_host(_bracketed(entry.strip().lower()))
        if parsed is None:
            raise NasError(f"allowed host {entry!r}: give a name or an address, with :PORT or without")
        allowed.add(parsed)
    return frozenset(allowed)


class HostCheck:
    """ASGI middleware: a request whose ``Host:`` is not ``allowed`` (:func:`parse_allowed`) gets
    the page's 400 (JSON under ``/api/``). An entry with a port allows that name at that port only,
    as a browser names the page it opened; one without allows the name at any port (a reverse
    proxy may forward its own). A ``Host:`` without a port is at port 80, where a browser leaves
    the port out."""

    def __init__(self, app: ASGIApp, allowed: frozenset[tuple[str, int | None]]) -> None:
        self.app = app
        self.allowed = allowed

    def allows(self, header: str | None) -> bool:
        parsed = parse_host(header) if header else None
        if parsed is None:
            return False
        name, port = parsed
        return (name, None) in self.allowed or (name, 80 if port is None else port) in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # the lifespan: no Host
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        header = request.headers.get("host")
        if self.allows(header):
            await self.app(scope, receive, send)
            return
        message = (
            f"this page does not answer to the host {header!r}: open it by the address `nas ui` printed, "
            "or start it with --allow-host NAME"
        )
        await error_response(request, 400, message)(scope, receive, send)


def _bracketed(host: str) -> str:
    """An IPv6 address as a ``Host:`` header writes it (``::1`` -> ``[::1]``); any other name as it is."""
    return f"[{host}]" if host.count(":") > 1 and not host.startswith("[") else host
