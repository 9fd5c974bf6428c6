"""Local HTTP endpoints: ``/healthz`` (JSON) and ``/metrics`` (Prometheus).

A deliberately tiny HTTP/1.1 responder for GET requests on loopback: no
framework on the service's only event loop, nothing that can block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from gateway.config import Endpoint

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpEndpoints:
    def __init__(
        self,
        listen: Endpoint,
        health: Callable[[], tuple[int, dict[str, Any]]],
        metrics: Callable[[], bytes],
    ) -> None:
        self.listen = listen
        self._health = health
        self._metrics = metrics
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
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = self._route(method, path.split("?", 1)[0])
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(READ_TIMEOUT_S):
                await writer.drain()
        writer.close()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            status, doc = self._health()
            return status, "application/json", json.dumps(doc, indent=1).encode() + b"\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        return 404, "text/plain", b"try /healthz or /metrics\n"
