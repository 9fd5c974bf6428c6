"""A sending MLLP client (a stand-in analyzer middleware) that survives its peer going away.

    python tests/peers/mllp_sender.py --port P --count N --connections C
        --prefix X --acked FILE [--deadline-s S]

Sends N ORU^R01 results over C parallel connections (connection c sends
``X-<c>-<n>`` for n = 0, 1, ... in order), one at a time per connection, waiting
for each ACK. Every control id that got ``AA`` (with MSA-2 = its MSH-10) is appended
to the acked file, flushed and fsynced. A lost connection, a timeout, or a negative
ACK makes it reconnect (small capped backoff) and send the same message again,
until all N are ACKed (exit 0) or the deadline passes (exit 1).
The message bytes are a pure function of (prefix, connection, n): see
:func:`build_message`, which the tests use to check what arrived byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `peers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import DurableLines, FrameReader, frame, segment_fields

ACK_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 0.02
BACKOFF_MAX_S = 0.5

_TESTS = [
    ("718-7", "Hemoglobin", "g/dL", "12.0-16.0"),
    ("4544-3", "Hematocrit", "%", "36-46"),
    ("6690-2", "Leukocytes", "10*3/uL", "4.5-11.0"),
    ("777-3", "Platelets", "10*3/uL", "150-400"),
    ("789-8", "Erythrocytes", "10*6/uL", "4.2-5.4"),
    ("2345-7", "Glucose", "mg/dL", "70-99"),
    ("2160-0", "Creatinine", "mg/dL", "0.6-1.2"),
    ("3094-0", "Urea nitrogen", "mg/dL", "7-20"),
    ("2951-2", "Sodium", "mmol/L", "136-145"),
    ("2823-3", "Potassium", "mmol/L", "3.5-5.1"),
    ("2075-0", "Chloride", "mmol/L", "98-107"),
    ("1742-6", "ALT", "U/L", "7-56"),
    ("1920-8", "AST", "U/L", "10-40"),
]
_NAMES = ["Müller^Jürgen", "Nguyễn^Thị Lan", "O'Brien^Siobhán", "Smith^John^Q", "Đặng^Văn An"]


def control_id(prefix: str, conn: int, n: int) -> str:
    return f"{prefix}-{conn}-{n}"


def split_count(count: int, connections: int) -> list[int]:
    """How many messages each connection sends."""
    return [count // connections + (c < count % connections) for c in range(connections)]


def all_control_ids(prefix: str, count: int, connections: int) -> list[str]:
    return [
        control_id(prefix, c, n)
        for c, k in enumerate(split_count(count, connections))
        for n in range(k)
    ]


def build_message(prefix: str, conn: int, n: int) -> bytes:
    """A realistic ORU^R01 (UTF-8, 1-3 kB), the same bytes for the same arguments."""
    cid = control_id(prefix, conn, n)
    seed = n * 7919 + conn * 104729
    stamp = f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}{seed % 24:02d}{seed % 60:02d}00"
    name = _NAMES[seed % len(_NAMES)]
    obx = []
    for i in range(6 + seed % 15):
        code, text, unit, ref = _TESTS[(seed + i) % len(_TESTS)]
        value = f"{((seed >> (i % 11)) % 997) / 10:.1f}"
        flag = "H" if (seed + i) % 5 == 0 else "N"
        obx.append(
            f"OBX|{i + 1}|NM|{code}^{text}^LN||{value}|{unit}|{ref}|{flag}|||F|||{stamp}"
            f"|LAB^Central laboratory|analyzer^cobas 8000^L"
        )
    segments = [
        f"MSH|^~\\&|COBAS|LAB-01|LIS|HOSPITAL|{stamp}||ORU^R01^ORU_R01|{cid}|P|2.5.1"
        "|||AL|NE||UNICODE UTF-8",
        f"PID|1||P{seed % 1000003:07d}^^^HOSP^MR||{name}||19{40 + seed % 60}0{1 + seed % 9}15"
        f"|{'MF'[seed % 2]}|||{seed % 900 + 100} Hauptstraße^^Zürich^^80{seed % 100:02d}^CH",
        f"PV1|1|I|WARD{seed % 9}^{seed % 40}^1||||1234^Dr. Weiß^Anna",
        f"ORC|RE|ORD{seed}|FIL{seed}||CM",
        f"OBR|1|ORD{seed}|FIL{seed}|24323-8^Comprehensive metabolic panel^LN|||{stamp}"
        f"|||||||{stamp}||1234^Dr. Weiß^Anna||||||{stamp}|||F",
        *obx,
        f"NTE|1|L|Specimen {cid} slightly hemolyzed; results verified.",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


@dataclass
class Stats:
    acked: int = 0
    naks: int = 0
    reconnects: int = 0
    timeouts: int = 0


class Sender:
    def __init__(
        self, host: str, port: int, prefix: str, acked: DurableLines, deadline: float
    ) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.acked = acked
        self.deadline = deadline
        self.stats = Stats()

    async def connection(self, conn: int, count: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        frames = FrameReader()
        backoff = BACKOFF_INITIAL_S
        for n in range(count):
            cid = control_id(self.prefix, conn, n)
            message = build_message(self.prefix, conn, n)
            while True:
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"deadline passed with {cid} not ACKed")
                try:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(self.host, self.port), 5.0
                        )
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        frames = FrameReader()
                    assert reader is not None
                    writer.write(frame(message))
                    await writer.drain()
                    reply = await asyncio.wait_for(self._reply(reader, frames), ACK_TIMEOUT_S)
                except (OSError, EOFError, TimeoutError) as err:
                    self.stats.timeouts += isinstance(err, TimeoutError)
                    self.stats.reconnects += 1
                    writer = await _close(writer)
                    await asyncio.sleep(backoff)
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
                    continue
                backoff = BACKOFF_INITIAL_S
                msa = segment_fields(reply, "MSA")
                if msa[2] != cid:  # out of step: start over on a new connection
                    writer = await _close(writer)
                    continue
                if msa[1] == "AA":
                    self.acked.add(cid)
                    self.stats.acked += 1
                    break
                self.stats.naks += 1  # AE/AR: the gateway could not take it now; resend
                await asyncio.sleep(BACKOFF_INITIAL_S)
        await _close(writer)

    @staticmethod
    async def _reply(reader: asyncio.StreamReader, frames: FrameReader) -> bytes:
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("connection closed before the ACK")
            replies = frames.feed(data)
            if replies:
                return replies[0]


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _main(args: argparse.Namespace) -> int:
    acked = DurableLines(args.acked)
    sender = Sender(args.host, args.port, args.prefix, acked, time.monotonic() + args.deadline_s)
    started = time.monotonic()
    counts = split_count(args.count, args.connections)
    results = await asyncio.gather(
        *(sender.connection(c, k) for c, k in enumerate(counts)), return_exceptions=True
    )
    acked.close()
    s = sender.stats
    failed = [r for r in results if isinstance(r, BaseException)]
    print(
        f"sender count={args.count} acked={s.acked} naks={s.naks} reconnects={s.reconnects} "
        f"timeouts={s.timeouts} seconds={time.monotonic() - started:.1f}",
        flush=True,
    )
    for err in failed:
        print(f"sender failed: {err!r}", flush=True)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--prefix", default="MSG")
    p.add_argument("--acked", type=Path, required=True)
    p.add_argument("--deadline-s", type=float, default=120.0)
    return asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
