"""Local HTTP endpoints: ``/healthz`` (JSON), ``/metrics`` (Prometheus), ``/api/status``
(the technician view's JSON) and ``/`` (its read-only HTML page).

A deliberately tiny HTTP/1.1 responder for GET requests on loopback: no
framework on the service's only event loop, nothing that can block it. With a
token configured (required off loopback) every request must carry
``Authorization: Bearer <token>``; the page alone may take it as ``?token=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from gateway.config import Endpoint, Http
from gateway.errors import ConfigError
from gateway.secrets import read_secret

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0
REASONS = {
    200: "OK",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
JSON = "application/json"


def http_token(http: Http, config_dir: str = "") -> str | None:
    """The bearer token from ``http.token_file`` (None when there is none)."""
    if http.token_file is None:
        return None
    token = read_secret(http.token_file, config_dir, what="HTTP token").strip()
    if not token:
        raise ConfigError([f"http.token_file: {http.token_file} is empty"])
    return token


class HttpEndpoints:
    def __init__(
        self,
        listen: Endpoint,
        health: Callable[[], tuple[int, dict[str, Any]]],
        metrics: Callable[[], bytes],
        status: Callable[[], dict[str, Any]] | None = None,
        *,
        token: str | None = None,
    ) -> None:
        self.listen = listen
        self._health = health
        self._metrics = metrics
        self._status = status
        self._token = token
        self._page = b""
        if status is not None:
            self._page = resources.files("gateway").joinpath("status_page.html").read_bytes()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> HttpEndpoints:
        self._server = await asyncio.start_server(self._serve, self.listen.host, self.listen.port)
        log.info("http.listening address=%s:%d", self.listen.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            request, _, header_text = head.decode("latin-1").partition("\r\n")
            method, target, *_ = request.split(" ")
            path, _, query = target.partition("?")
            if self._authorized(header_text, path, query):
                status, ctype, body = self._route(method, path)
            else:
                status, ctype, body = 401, "text/plain", b"Authorization: Bearer <token> needed\n"
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            writer.close()
            return
        challenge = 'WWW-Authenticate: Bearer realm="medgw"\r\n' if status == 401 else ""
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Cache-Control: no-store\r\n{challenge}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(READ_TIMEOUT_S):
                await writer.drain()
        writer.close()

    def _authorized(self, header_text: str, path: str, query: str) -> bool:
        if self._token is None:
            return True
        presented = ""
        for line in header_text.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                scheme, _, credentials = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    presented = credentials.strip()
        if not presented and path == "/":  # the page stores it and sends it as a header
            presented = parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(presented.encode(), self._token.encode())

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            status, doc = self._health()
            return status, JSON, json.dumps(doc, indent=1).encode() + b"\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if self._status is not None and path == "/api/status":
            return 200, JSON, json.dumps(self._status(), indent=1).encode() + b"\n"
        if self._status is not None and path == "/":
            return 200, "text/html; charset=utf-8", self._page
        return 404, "text/plain", b"try /, /api/status, /healthz or /metrics\n"
