"""A receiving MLLP server (a stand-in LIS) that records what it accepted.

    python tests/peers/mllp_receiver.py --port P --record FILE
        [--nack-every N] [--nack-first K] [--delay-ms D]

Each message gets an original-mode ACK: ``AA`` with MSA-2 = the message's MSH-10,
after a line ``<MSH-10> <TAB> <sha256 of the message>`` was appended to the record
file, flushed and fsynced, so the record never claims less than was ACKed.
``--nack-first K`` answers ``AE`` to the first K messages received, ``--nack-every N``
to every Nth; those are not recorded. ``--delay-ms`` waits before each reply.
It can also run in-process: ``await MllpReceiver(record).start(port)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `peers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import (
    DurableLines,
    FrameReader,
    control_id_of,
    digest,
    frame,
    read_lines,
    segment_fields,
    separator,
)


def read_record(path: Path) -> list[tuple[str, str]]:
    """(MSH-10, sha256) of every message recorded, in the order received."""
    out = []
    for line in read_lines(path):
        cid, _, sha = line.partition("\t")
        out.append((cid, sha))
    return out


def build_ack(message: bytes, code: str, text: str = "") -> bytes:
    """An original-mode ACK: applications swapped, MSA-2 = the message's MSH-10."""
    sep = separator(message)
    msh = segment_fields(message, "MSH")
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    ack_id = f"R{time.monotonic_ns() % 10**12}"
    head = [
        *("MSH", msh[1] or "^~\\&", msh[4], msh[5], msh[2], msh[3], stamp, ""),
        *("ACK", ack_id, msh[10] or "P", msh[11] or "2.5.1"),
    ]
    msa = ["MSA", code, msh[9], *([text] if text else [])]
    return f"{sep.join(head)}\r{sep.join(msa)}\r".encode("latin-1", "replace")


class MllpReceiver:
    def __init__(
        self, record: Path, *, nack_every: int = 0, nack_first: int = 0, delay_ms: float = 0
    ) -> None:
        self.record = DurableLines(record)
        self.nack_every = nack_every
        self.nack_first = nack_first
        self.delay_s = delay_ms / 1000
        self.received = 0  # frames seen, NAKed ones included
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, port: int, host: str = "127.0.0.1") -> MllpReceiver:
        self._server = await asyncio.start_server(self._serve, host, port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for writer in self._conns.values():
            writer.close()  # the handler sees EOF and ends on its own
        await asyncio.gather(*self._conns, return_exceptions=True)
        self.record.close()

    def _decide(self) -> str:
        self.received += 1
        if self.received <= self.nack_first:
            return "AE"
        if self.nack_every and self.received % self.nack_every == 0:
            return "AE"
        return "AA"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames = FrameReader()
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        try:
            while data := await reader.read(65536):
                for message in frames.feed(data):
                    code = self._decide()
                    if code == "AA":
                        self.record.add(f"{control_id_of(message)}\t{digest(message)}")
                        self.accepted += 1
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    text = "test receiver NAK" if code != "AA" else ""
                    writer.write(frame(build_ack(message, code, text)))
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _main(args: argparse.Namespace) -> None:
    receiver = await MllpReceiver(
        args.record,
        nack_every=args.nack_every,
        nack_first=args.nack_first,
        delay_ms=args.delay_ms,
    ).start(args.port, args.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"receiver listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    await receiver.close()
    print(f"receiver received={receiver.received} accepted={receiver.accepted}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--nack-every", type=int, default=0)
    p.add_argument("--nack-first", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
