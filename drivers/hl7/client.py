"""A minimal MLLP client: one connection, one request at a time, the reply frame back.

With ``ssl_context`` the connection is TLS (the handshake counts against
``connect_timeout_s``); ``server_hostname`` is the name the server's certificate
must carry (default: ``host``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from drivers.hl7.mllp import FrameReceived, MllpFramer, frame

READ_SIZE = 64 * 1024
CLOSE_TIMEOUT_S = 5.0


class MllpClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._framer = MllpFramer()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Open the connection if it is not open (raises OSError, ssl.SSLError
        among them, or TimeoutError)."""
        if self.connected:
            return
        opening = (
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname or self.host,
            )
            if self.ssl_context is not None
            else asyncio.open_connection(self.host, self.port)
        )
        reader, writer = await asyncio.wait_for(opening, self.connect_timeout_s)
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._framer = MllpFramer()

    async def request(self, message: bytes, timeout_s: float) -> bytes:
        """Send one framed message and return the content of the next frame received.

        Raises TimeoutError, OSError, or EOFError if the peer closes first; the
        caller should :meth:`close` after any of them (the stream may be out of step).
        """
        await self.connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(frame(message))
        # one deadline for sending and the reply: a peer that stops reading cannot hold
        # the worker (asyncio.timeout: no extra task per message, unlike wait_for)
        async with asyncio.timeout(timeout_s):
            await self._writer.drain()
            return await self._read_frame(self._reader)

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise EOFError("connection closed before a reply")
            for event in self._framer.feed(data):
                if isinstance(event, FrameReceived):
                    return event.data

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is None:
            return
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()  # unsent data to a peer that stopped reading: drop it
        else:
            writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await writer.wait_closed()
