"""`rlhf label --web`: the labelling session as a local web page.

A Starlette app served by uvicorn on one socket bound before the address is printed (port 0 picks a free port).
It serves exactly one page (`label_web.html`, read from this package, never a folder) and a small JSON API over a
`LabelSession`: `GET /api/state` (the item to rank, progress, annotator), `POST /api/rank` (`{"item", "ranking":
[[2], [0, 1], [3]]}` or `{"item", "order": "3 1=2 4"}`), `POST /api/skip`, `POST /api/undo`. Every request must
carry the random token printed in the page's address (`?token=` or the `X-Label-Token` header, compared in
constant time) or it gets 403, whatever its path; any other path is 404. Other pages in the same browser cannot
read the token, so they cannot rank or read the answers, even on 127.0.0.1.

The handlers are `async` and do not await between reading and changing the session, so requests never interleave
inside one; each ranking is on disk (fsynced) before its response is sent. Ctrl-C stops uvicorn, which finishes
the requests in flight.

    rlhf label runs/demo/samples.jsonl --out runs/demo/rankings.jsonl --web --port 8765
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rlhf_cli.interact.label import LabelSession, check_tiers, describe, parse_ranking

PAGE = Path(__file__).with_name("label_web.html")
MAX_BODY = 64 * 1024  # a ranking is a few dozen bytes
TOKEN_HEADER = "x-label-token"


class TokenGate:
    """ASGI middleware: 403 for any HTTP request without the session's token, before routing."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            given = request.query_params.get("token") or request.headers.get(TOKEN_HEADER) or ""
            if not secrets.compare_digest(given.encode(), self.token):
                response = PlainTextResponse("forbidden: open the address `rlhf label --web` printed, with its "
                                             "token", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _state(session: LabelSession, **extra: Any) -> JSONResponse:
    item = session.current()
    body = {"annotator": session.annotator, "progress": session.progress().to_json(),
            "item": item.shown() if item else None, "can_undo": bool(session.ranked), **extra}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


async def _body(request: Request) -> dict[str, Any] | str:
    """The JSON object a POST carries, or an error message."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        return "request too large"
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "expected a JSON object"
    return data if isinstance(data, dict) else "expected a JSON object"


def _tiers(data: dict[str, Any], k: int) -> list[list[int]]:
    """The ranking of a POST: `ranking` as tiers of indices, or `order` as the terminal's text. ValueError if bad."""
    if isinstance(data.get("order"), str):
        return parse_ranking(data["order"], k)
    ranking = data.get("ranking")
    if not isinstance(ranking, list) or not all(
            isinstance(t, list) and t and all(isinstance(i, int) and not isinstance(i, bool) for i in t)
            for t in ranking):
        raise ValueError("expected `ranking`: tiers of answer indices best first, such as [[2], [0, 1], [3]]")
    check_tiers(ranking, k)
    return ranking


def build_app(session: LabelSession, token: str) -> ASGIApp:
    page = PAGE.read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(page.replace("{{nonce}}", nonce), headers={
            "Content-Security-Policy": csp, "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        return _state(session)

    def target(data: dict[str, Any]) -> Any:
        item = session.by_id.get(data.get("item")) if isinstance(data.get("item"), str) else None
        if item is None:
            raise LookupError("unknown item; reload the page")
        return item

    async def rank(request: Request) -> Response:
        data = await _body(request)
        if isinstance(data, str):
            return _error(data)
        try:
            item = target(data)
            if item.id in session.ranked:
                return _error(f"{item.where} is already ranked by {session.annotator}; reload the page", 409)
            tiers = _tiers(data, len(item.responses))
        except LookupError as e:
            return _error(str(e), 404)
        except ValueError as e:
            return _error(str(e))
        session.rank(item, tiers)
        return _state(session, saved={"where": item.where, "order": describe(tiers)})

    async def skip(request: Request) -> Response:
        data = await _body(request)
        if isinstance(data, str):
            return _error(data)
        try:
            session.skip(target(data))
        except LookupError as e:
            return _error(str(e), 404)
        return _state(session)

    async def undo(request: Request) -> Response:
        if not session.ranked:
            return _error("nothing to undo", 409)
        back = session.undo()
        return _state(session, undone=back.where if back else None)

    routes = [Route("/", index, methods=["GET"]), Route("/api/state", state, methods=["GET"]),
              Route("/api/rank", rank, methods=["POST"]), Route("/api/skip", skip, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"])]
    return TokenGate(Starlette(routes=routes), token)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the address is known before serving."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        from rlhf_cli.core.errors import ConfigError

        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another "
                          f"--port, or --port 0 for a free one") from None
    sock.listen(64)
    return sock


def page_url(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/?token={token}"


def serve(session: LabelSession, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve the page until Ctrl-C (or SIGTERM); `on_ready(url)` once the socket listens."""
    token = secrets.token_urlsafe(24)
    sock = bind(host, port)
    on_ready(page_url(sock, host, token))
    config = uvicorn.Config(build_app(session, token), log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
