"""The lab end-to-end tests' bench: the gateway with analyzer listeners, its LIS, and what they saw.

The gateway runs as a subprocess (:class:`peers.gateway_proc.Gateway`), the LIS is
the real MLLP receiver process (:class:`peers.gateway_proc.Receiver`), the analyzer
is the scripted fake of ``tests/fakes/analyzer.py`` on a socat pty or a TCP
connection. Nothing here imports the gateway: what it did is read from outside
(the LIS receiver's record, the QC folder, ``/healthz``, the gateway's log, and the
journal's SQLite file opened read-only).

The LIS receiver records each message it ACKed as ``MSH-10 <TAB> sha256``; the
bytes behind a digest are looked up among the HL7 envelopes the gateway journaled
(:func:`lis_messages`), so a message the LIS got that the gateway never built, or
built differently, fails the lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from fakes.analyzer import FakeAnalyzer, open_serial_stream, open_tcp_stream, sample_messages
from peers import FrameReader, frame, segment_fields
from peers.gateway_proc import Gateway, Proc, Receiver, mllp_destination, wait_for
from peers.mllp_receiver import read_record

SAMPLES = Path("/work/shared/samples/lab")
PROFILES = Path(__file__).resolve().parents[1] / "config" / "drivers"
# retry the LIS soon after it is back (the defaults wait up to 5 minutes, and 30 s breaker)
FAST_DELIVERY = {"backoff": {"initial_s": 0.05, "max_s": 0.3}, "breaker": {"cooldown_s": 0.5}}
T = TypeVar("T")


def capture(name: str) -> list[bytes]:
    """The message texts of a real capture (``07_astm_roche_cobas_e411_session.bin``)."""
    return sample_messages(SAMPLES / name)


def profile_codes(profile: str) -> dict[str, dict[str, str]]:
    """The ``codes`` table of a shipped profile, read straight from its YAML."""
    doc = yaml.safe_load((PROFILES / f"{profile}.yaml").read_text(encoding="utf-8"))
    codes: dict[str, dict[str, str]] = doc.get("codes") or {}
    return {str(k): v for k, v in codes.items()}


# -- configuration ---------------------------------------------------------------------


def astm_listener(
    listener_id: str, profile: str, transport: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {"id": listener_id, "type": "astm", "profile": profile, "transport": transport, **extra}


def lis_destination(port: int) -> dict[str, Any]:
    return mllp_destination("lis", port, **FAST_DELIVERY)


def result_routes(lis: str = "lis", qc: str | None = "qc") -> list[dict[str, Any]]:
    """Patient results to the LIS as ORU^R01; QC results (when ``qc``) to their own place."""
    routes: list[dict[str, Any]] = [
        {
            "id": "results",
            "match": {"kind": "lab-result", "qc": "false"},
            "steps": ["map-codes", "hl7-oru"],
            "to": [lis],
        }
    ]
    if qc is not None:
        routes.append(
            {
                "id": "qc-results",
                "match": {"kind": "lab-result", "qc": "true"},
                "steps": ["map-codes", "hl7-oru"],
                "to": [qc],
            }
        )
    return routes


@dataclass
class LabBench:
    """One test's gateway, its state folder and ports; started and stopped by pid."""

    tmp: Path
    state_dir: Path
    http_port: int
    procs: list[Proc]

    @property
    def config(self) -> Path:
        return self.tmp / "gateway.yaml"

    def write_config(
        self,
        *,
        listeners: list[dict[str, Any]],
        destinations: list[dict[str, Any]],
        routes: list[dict[str, Any]],
        journal: dict[str, Any] | None = None,
    ) -> Path:
        doc = {
            "site": {"id": "lab-e2e"},
            "state_dir": str(self.state_dir),
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "journal": {"min_free_mb": 0, **(journal or {})},
            "logging": {"level": "INFO", "format": "text"},
            "listeners": listeners,
            "destinations": destinations,
            "routes": routes,
        }
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return self.config

    def gateway(self) -> Gateway:
        gateway = Gateway(self.config, self.http_port, 0)
        self.procs.append(gateway)
        return gateway

    def receiver(self, port: int, name: str = "lis") -> Receiver:
        receiver = Receiver(port, self.tmp / f"{name}-record.txt")
        self.procs.append(receiver)
        return receiver.start()


def wait_log(gateway: Gateway, text: str, timeout_s: float = 10.0, after: int = 0) -> None:
    """Wait until the gateway's log holds ``text`` (after byte offset ``after``)."""

    def seen() -> bool:
        return gateway.log.exists() and text.encode() in gateway.log.read_bytes()[after:]

    try:
        wait_for(seen, timeout_s, f"{text!r} in the gateway's log")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{gateway.log_tail()}") from None


def log_size(gateway: Gateway) -> int:
    return gateway.log.stat().st_size if gateway.log.exists() else 0


def steps_idle(gateway: Gateway, *keys: str, timeout_s: float = 10.0) -> None:
    """Wait until the named route chains (``steps:<route id>``) have nothing pending."""
    gateway.wait_health(
        lambda doc: all(doc["destinations"][f"steps:{k}"]["pending"] == 0 for k in keys),
        timeout_s,
        f"route steps {keys} to be idle",
    )


async def until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """:func:`wait_for` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the analyzer ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_analyzer(port: int, **options: Any) -> AsyncIterator[FakeAnalyzer]:
    """The fake analyzer connected to the gateway's ``tcp_listen`` port."""
    reader, writer = await open_tcp_stream("127.0.0.1", port)
    options.setdefault("reply_timeout_s", 5.0)
    options.setdefault("receive_timeout_s", 5.0)
    fake = FakeAnalyzer(reader, writer, **options)
    try:
        yield fake
    finally:
        await fake.close()


@contextlib.asynccontextmanager
async def serial_analyzer(
    path: Path, baudrate: int = 9600, **options: Any
) -> AsyncIterator[FakeAnalyzer]:
    """The fake analyzer on its end of a socat pty pair, paced at ``baudrate``."""
    reader, writer = await open_serial_stream(path, baudrate, pace=True)
    options.setdefault("reply_timeout_s", 5.0)
    options.setdefault("receive_timeout_s", 5.0)
    fake = FakeAnalyzer(reader, writer, **options)
    try:
        yield fake
    finally:
        await fake.close()


# -- what the LIS got ------------------------------------------------------------------


@contextlib.contextmanager
def journal(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """The gateway's journal, opened read-only (beside the running gateway: WAL)."""
    conn = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def lis_record(receiver: Receiver) -> list[tuple[str, str]]:
    """(MSH-10, sha256) of every message the LIS receiver ACKed, in order."""
    return read_record(receiver.record)


def lis_messages(receiver: Receiver, state_dir: Path) -> list[bytes]:
    """The bytes of every message the LIS ACKed, in order (see the module docstring)."""
    out = []
    with journal(state_dir) as conn:
        for cid, sha in lis_record(receiver):
            row = conn.execute(
                "SELECT body, blob FROM envelopes WHERE kind = 'hl7' AND digest = ?", (sha,)
            ).fetchone()
            assert row is not None, f"the LIS got {cid} ({sha[:12]}), not a message medgw built"
            body, blob = row
            out.append(bytes(body) if blob is None else (state_dir / "blobs" / blob).read_bytes())
    return out


def quarantine(state_dir: Path) -> list[tuple[str, str, bytes, int]]:
    """(source, reason, raw, size) of every quarantined input, oldest first."""
    with journal(state_dir) as conn:
        rows = conn.execute(
            "SELECT source, reason, raw, size FROM quarantine ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], bytes(r[2]), r[3]) for r in rows]


def sessions(state_dir: Path, source: str) -> list[str]:
    """The JSON details the gateway recorded for each finished analyzer session."""
    with journal(state_dir) as conn:
        rows = conn.execute(
            "SELECT details FROM sessions WHERE source = ? ORDER BY id", (source,)
        ).fetchall()
    return [r[0] for r in rows]


# -- HL7, read by hand (independently of drivers.hl7) -----------------------------------


def segments(message: bytes) -> list[list[str]]:
    """Segments as field lists: ``fields[n]`` is field n (MSH-n for MSH too)."""
    out = []
    for seg in message.decode("utf-8").split("\r"):
        if not seg:
            continue
        fields = seg.split("|")
        if fields[0] == "MSH":  # MSH-1 is the field separator itself
            fields = ["MSH", "|", *fields[1:]]
        out.append(fields)
    return out


def field(seg: list[str], n: int) -> str:
    """Field n of a segment from :func:`segments` ('' when the segment stops earlier)."""
    return seg[n] if n < len(seg) else ""


def named(message: bytes, name: str) -> list[list[str]]:
    return [s for s in segments(message) if s[0] == name]


def send_hl7(port: int, message: bytes, timeout_s: float = 10.0) -> list[str]:
    """Send one message over MLLP (the peers' own framing); returns the reply's MSA fields."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(frame(message))
        reader = FrameReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection without an ACK")
            replies = reader.feed(data)
            if replies:
                return segment_fields(replies[0], "MSA")
