"""MllpClient: a peer that accepts but never reads cannot hold a delivery worker."""

from __future__ import annotations

import asyncio
import time

import pytest

from drivers.hl7.client import MllpClient


async def test_request_times_out_when_the_peer_never_reads() -> None:
    accepted = asyncio.Event()

    release = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await release.wait()  # holds the connection, reads nothing
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0, limit=1024)
    port = server.sockets[0].getsockname()[1]
    client = MllpClient("127.0.0.1", port)
    message = b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|X1|P|2.5.1\r" + b"OBX|" * 8_000_000
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await client.request(message, timeout_s=0.5)
        assert accepted.is_set()
        assert time.monotonic() - started < 10  # the deadline covered the blocked send
    finally:
        await client.close()  # must not wait for the unsent data either
        assert time.monotonic() - started < 10
        release.set()
        server.close()
        await server.wait_closed()
