"""The HL7/MLLP listener inside a running gateway, fed bad and awkward input by a raw client.

The gateway runs in-process (journal, delivery to a folder outbox, the real
listener on a free port); the client is a few lines of MLLP framing over a plain
asyncio stream, so nothing here relies on the project's own MLLP code to talk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError, DiskFullError, JournalError
from gateway.registry import default_registry
from gateway.service import Gateway

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
REPO = Path(__file__).resolve().parents[1]


# -- harness ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    gw: Gateway
    port: int
    state: Path
    outbox: Path
    config_file: Path

    def count(self, table: str) -> int:
        with sqlite3.connect(f"file:{self.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
            return int(c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def quarantine(self) -> list[tuple[str, int, bytes]]:
        """(reason, size, raw) of every quarantined item, oldest first."""
        with sqlite3.connect(f"file:{self.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
            return [
                (r, s, bytes(b))
                for r, s, b in c.execute("SELECT reason, size, raw FROM quarantine ORDER BY id")
            ]

    def outbox_files(self) -> list[Path]:
        """Delivered files (a file being written is still ``*.tmp``)."""
        return sorted(self.outbox.glob("*.hl7")) if self.outbox.exists() else []

    def headers(self) -> list[dict[str, str]]:
        with sqlite3.connect(f"file:{self.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
            return [json.loads(h) for (h,) in c.execute("SELECT headers FROM envelopes")]


@asynccontextmanager
async def running_gateway(
    tmp_path: Path, *, listener: str = "", journal: str = "min_free_mb: 0"
) -> AsyncIterator[Running]:
    port = free_port()
    state, outbox = tmp_path / "state", tmp_path / "outbox"
    text = (
        f"site: {{id: test-site}}\n"
        f"state_dir: {state}\n"
        f"http: {{listen: null}}\n"
        f"journal: {{{journal}}}\n"
        f"listeners:\n"
        f"  - {{id: his, type: hl7-mllp, listen: 127.0.0.1:{port}{listener}}}\n"
        f"destinations:\n"
        f"  - {{id: outbox, type: folder, path: {outbox}}}\n"
        f"routes:\n"
        f"  - {{match: {{source: his}}, to: [outbox]}}\n"
    )
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(text, encoding="utf-8")
    registry = default_registry()
    gw = Gateway(parse_config(text, registry, source=str(config_file)), registry, drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not gw.ready.is_set():
        ready.cancel()
        stop.set()
        await task  # raises the start failure
        raise AssertionError("gateway did not become ready")
    try:
        yield Running(gw, port, state, outbox, config_file)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class MllpPeer:
    """A raw MLLP sender: writes bytes as told, reads reply frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    @classmethod
    async def connect(cls, port: int) -> MllpPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            start = self.buf.find(VT)
            end = self.buf.find(FS + CR, start + 1) if start >= 0 else -1
            if end >= 0:
                msg, self.buf = self.buf[start + 1 : end], self.buf[end + 2 :]
                return msg
            data = await asyncio.wait_for(
                self.reader.read(65536), max(0.01, deadline - time.monotonic())
            )
            if not data:
                raise EOFError(f"closed; unframed bytes: {self.buf!r}")
            self.buf += data

    async def request(self, message: bytes) -> Ack:
        await self.write(VT + message + FS + CR)
        return Ack(await self.reply())

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@asynccontextmanager
async def peer(port: int) -> AsyncIterator[MllpPeer]:
    p = await MllpPeer.connect(port)
    try:
        yield p
    finally:
        await p.close()


class Ack:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        assert raw.endswith(b"\r"), raw
        self.segments = {s[:3]: s.split(b"|") for s in raw.split(b"\r") if s}
        self.msh = self.segments[b"MSH"]
        self.msa = self.segments[b"MSA"]

    def msh_field(self, n: int) -> bytes:
        """MSH-n (MSH-1 is the separator itself)."""
        return self.msh[n - 1]

    @property
    def code(self) -> bytes:
        return self.msa[1]

    @property
    def control_id(self) -> bytes:
        return self.msa[2]

    @property
    def err(self) -> bytes:
        return b"|".join(self.segments[b"ERR"]) if b"ERR" in self.segments else b""


def hl7(
    control_id: str,
    *,
    app: str = "LAB",
    facility: str = "HOSP",
    to_app: str = "LIS",
    to_facility: str = "CENTRAL",
    version: str = "2.5.1",
    charset: str = "",
    pid: bytes = b"PID|1||12345^^^HOSP||DOE^JOHN",
) -> bytes:
    fields = [
        "MSH",
        "^~\\&",
        app,
        facility,
        to_app,
        to_facility,
        "20240101120000",
        "",
        "ORU^R01^ORU_R01",
        control_id,
        "P",
        version,
    ]
    if charset:
        fields += ["", "", "", "", "", charset]  # MSH-13..17 empty, MSH-18
    return "|".join(fields).encode("ascii") + CR + pid + CR + b"OBX|1|NM|GLU||5.4|mmol/L\r"


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# -- valid traffic and the ACK itself ---------------------------------------------------------


async def test_ack_mirrors_msh_and_message_reaches_outbox(tmp_path: Path) -> None:
    msg = hl7("CTRL-0001", app="ANALYZER", facility="LABDEPT", to_app="LIS", version="2.3")
    msg = msg.replace(b"ANALYZER", b"ANALYZER^1.2.3^ISO", 1)
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        ack = await p.request(msg)
        assert ack.code == b"AA"
        assert ack.control_id == b"CTRL-0001"  # MSA-2 = the received MSH-10
        assert ack.msh_field(2) == b"^~\\&"
        assert ack.msh_field(3) == b"LIS"  # sending and receiving swapped
        assert ack.msh_field(4) == b"CENTRAL"
        assert ack.msh_field(5) == b"ANALYZER^1.2.3^ISO"
        assert ack.msh_field(6) == b"LABDEPT"
        assert ack.msh_field(9) == b"ACK^R01^ACK"
        assert ack.msh_field(10) not in (b"", b"CTRL-0001")  # the ACK's own id
        assert ack.msh_field(11) == b"P"
        assert ack.msh_field(12) == b"2.3"  # version mirrored
        assert ack.err == b""
        await until(lambda: len(r.outbox_files()) == 1, what="outbox file")
        (out,) = r.outbox_files()
        assert out.read_bytes() == msg
        assert out.suffix == ".hl7"
        assert r.count("quarantine") == 0


async def test_retransmission_is_acked_but_stored_once(tmp_path: Path) -> None:
    msg = hl7("SAME-1")
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        assert (await p.request(msg)).code == b"AA"
        assert (await p.request(msg)).code == b"AA"
        assert r.count("envelopes") == 1
        await until(lambda: len(r.outbox_files()) == 1)
        dup = r.gw.metrics.registry.get_sample_value(
            "medgw_messages_duplicate_total", {"listener": "his"}
        )
        assert dup == 1


async def test_several_messages_in_one_write_are_acked_in_order(tmp_path: Path) -> None:
    ids = [f"BATCH-{i:03d}" for i in range(12)]
    bad = b"PID|no msh here"
    stream = b"".join(VT + hl7(c) + FS + CR for c in ids[:6])
    stream += VT + bad + FS + CR
    stream += b"".join(VT + hl7(c) + FS + CR for c in ids[6:])
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        await p.write(stream)
        acks = [Ack(await p.reply()) for _ in range(13)]
        assert [a.control_id for a in acks] == [c.encode() for c in ids[:6]] + [b""] + [
            c.encode() for c in ids[6:]
        ]
        assert [a.code for a in acks] == [b"AA"] * 6 + [b"AR"] + [b"AA"] * 6
        await until(lambda: len(r.outbox_files()) == 12, what="12 outbox files")
        bodies = sorted(f.read_bytes() for f in r.outbox_files())
        assert bodies == sorted(hl7(c) for c in ids)


async def test_message_in_one_byte_writes(tmp_path: Path) -> None:
    msg = hl7("BYTE-BY-BYTE")
    framed = VT + msg + FS + CR
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        for i in range(len(framed)):
            await p.write(framed[i : i + 1])
        ack = Ack(await p.reply())
        assert (ack.code, ack.control_id) == (b"AA", b"BYTE-BY-BYTE")
        await until(lambda: len(r.outbox_files()) == 1)
        assert r.outbox_files()[0].read_bytes() == msg


async def test_twenty_megabyte_message_goes_through_a_blob(tmp_path: Path) -> None:
    obx = b"OBX|1|ED|PDF||^application^pdf^Base64^"
    payload = (bytes(range(65, 91)) * (20 * 1024 * 1024 // 26 + 1))[: 20 * 1024 * 1024]
    msg = hl7("BIG-1") + obx + payload + CR
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        ack = await p.request(msg)
        assert (ack.code, ack.control_id) == (b"AA", b"BIG-1")
        blobs = [f for f in (r.state / "blobs").rglob("*") if f.is_file()]
        assert [f.stat().st_size for f in blobs] == [len(msg)]
        await until(lambda: len(r.outbox_files()) == 1, what="big outbox file")
        assert r.outbox_files()[0].read_bytes() == msg
        assert list(r.outbox.glob("*.tmp")) == []
        assert list((r.state / "blobs").rglob("*.tmp")) == []


# -- bytes outside frames and broken frames -------------------------------------------------


async def test_garbage_is_quarantined_without_reply(tmp_path: Path) -> None:
    garbage = b"GET / HTTP/1.1\r\nHost: lis\r\n\r\n\x00\xff\xfe garbage"
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        await p.write(garbage)
        await until(lambda: r.count("quarantine") == 1, what="junk quarantined")
        ack = await p.request(hl7("AFTER-JUNK"))
        # the first reply on the connection is for the valid message: junk got none
        assert (ack.code, ack.control_id) == (b"AA", b"AFTER-JUNK")
        ((reason, size, raw),) = r.quarantine()
        assert reason.startswith("junk:")
        assert raw == garbage
        assert size == len(garbage)
        assert r.count("envelopes") == 1


async def test_frame_without_end_block_then_valid_frame(tmp_path: Path) -> None:
    whole = hl7("CUT-1")
    truncated = whole[: whole.index(b"PID") + 6]  # MSH complete, PID cut short
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        await p.write(VT + truncated + VT + hl7("WHOLE-1") + FS + CR)
        first, second = Ack(await p.reply()), Ack(await p.reply())
        assert first.code == b"AR"
        assert first.control_id == b"CUT-1"  # its MSH was readable
        assert b"truncated" in first.err
        assert second.code == b"AA"
        assert second.control_id == b"WHOLE-1"
        ((reason, _, raw),) = r.quarantine()
        assert reason.startswith("truncated:")
        assert raw == truncated
        assert r.count("envelopes") == 1


@pytest.mark.parametrize(
    ("message", "location", "code"),
    [
        (b"PID|1||12345\rOBX|1|NM|GLU||5.4\r", b"", b"100"),
        (hl7("X").replace(b"|X|P|", b"||P|"), b"MSH^1^10", b"101"),
        (hl7("X").replace(b"ORU^R01^ORU_R01", b""), b"MSH^1^9", b"101"),
        (b"MSH\r", b"MSH^1^1", b"102"),
        (hl7("X", charset="KLINGON"), b"MSH^1^18", b"103"),
    ],
    ids=["no-msh", "empty-msh10", "empty-msh9", "no-separator", "unknown-charset"],
)
async def test_invalid_msh_gets_ar_with_err(
    tmp_path: Path, message: bytes, location: bytes, code: bytes
) -> None:
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        ack = await p.request(message)
        assert ack.code == b"AR"
        err = ack.segments[b"ERR"]
        assert err[2] == location  # ERR-2 (v2.5 layout)
        assert err[3].split(b"^")[0] == code  # ERR-3 HL7 table 0357
        assert err[3].split(b"^")[2] == b"HL70357"
        assert err[4] == b"E"
        ((_, size, raw),) = r.quarantine()
        assert (raw, size) == (message, len(message))
        assert r.count("envelopes") == 0
        # the connection is still good
        assert (await p.request(hl7("NEXT"))).code == b"AA"


async def test_too_large_message_is_rejected_and_next_is_fine(tmp_path: Path) -> None:
    big = hl7("HUGE-1") + b"NTE|1||" + b"x" * 10_000 + CR
    async with running_gateway(tmp_path, listener=", max_message_bytes: 2048") as r:
        async with peer(r.port) as p:
            ack = await p.request(big)
            assert ack.code == b"AR"
            assert ack.control_id == b"HUGE-1"
            assert b"too large" in ack.err
            assert b"207" in ack.err
            ((reason, _, raw),) = r.quarantine()
            assert reason.startswith(f"too large: {len(big)} bytes")
            assert 0 < len(raw) <= 4096
            assert raw == big[: len(raw)]  # the head of the message
            nxt = await p.request(hl7("SMALL-1"))
            assert (nxt.code, nxt.control_id) == (b"AA", b"SMALL-1")
        assert r.count("envelopes") == 1


async def test_quarantine_records_the_real_size_of_a_too_large_message(tmp_path: Path) -> None:
    big = hl7("HUGE-2") + b"NTE|1||" + b"x" * 10_000 + CR
    async with running_gateway(tmp_path, listener=", max_message_bytes: 2048") as r:
        async with peer(r.port) as p:
            assert (await p.request(big)).code == b"AR"
        ((_, size, _),) = r.quarantine()
        assert size == len(big)


async def test_incomplete_frame_then_disconnect_stores_nothing(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        async with peer(r.port) as p:
            await p.write(VT + hl7("LOST-1")[:30])
        async with peer(r.port) as p:  # a new connection works
            assert (await p.request(hl7("OK-1"))).code == b"AA"
        assert r.count("envelopes") == 1


# -- character sets -----------------------------------------------------------------------------


async def test_latin1_message_with_msh18_is_stored_byte_exact(tmp_path: Path) -> None:
    msg = hl7("LATIN-1", charset="8859/1", pid="PID|1||1||MÜLLER^RENÉ^Ñ".encode("latin-1"))
    assert b"\xdc" in msg and b"\xc9" in msg
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        ack = await p.request(msg)
        assert (ack.code, ack.control_id) == (b"AA", b"LATIN-1")
        await until(lambda: len(r.outbox_files()) == 1)
        assert r.outbox_files()[0].read_bytes() == msg
        (headers,) = r.headers()
        assert headers["charset"] == "iso8859-1"
        assert headers["control_id"] == "LATIN-1"


async def test_invalid_utf8_is_ae_with_offset_and_quarantined(tmp_path: Path) -> None:
    msg = hl7("BAD-UTF8", charset="UNICODE UTF-8", pid=b"PID|1||1||M\xfcLLER")
    offset = msg.index(b"\xfc")
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        ack = await p.request(msg)
        assert ack.code == b"AE"
        assert ack.control_id == b"BAD-UTF8"
        assert f"offset {offset}".encode() in ack.err
        assert b"102" in ack.err
        ((reason, _, raw),) = r.quarantine()
        assert raw == msg
        assert "utf-8" in reason
        assert r.count("envelopes") == 0


async def test_utf8_message_is_accepted(tmp_path: Path) -> None:
    msg = hl7("UTF8-OK", charset="UNICODE UTF-8", pid="PID|1||1||NGUYỄN^THỊ".encode())
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        assert (await p.request(msg)).code == b"AA"
        await until(lambda: len(r.outbox_files()) == 1)
        assert r.outbox_files()[0].read_bytes() == msg


# -- the journal cannot store ------------------------------------------------------------------


async def test_disk_full_gives_ar_not_aa(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, journal="min_free_mb: 1000000000") as r:
        async with peer(r.port) as p:
            ack = await p.request(hl7("NO-ROOM"))
            assert (ack.code, ack.control_id) == (b"AR", b"NO-ROOM")
            assert b"out of storage" in ack.err
            assert b"207" in ack.err
        assert r.count("envelopes") == 0
        assert r.outbox_files() == []


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (JournalError("disk I/O error"), b"cannot store message now"),
        (DiskFullError("below watermark"), b"out of storage"),
    ],
)
async def test_journal_failure_gives_ar_and_connection_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: JournalError, text: bytes
) -> None:
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        real_accept = r.gw.journal.accept

        async def failing(*args: object, **kw: object) -> object:
            raise error

        monkeypatch.setattr(r.gw.journal, "accept", failing)
        acks = [await p.request(hl7(f"FAIL-{i}")) for i in range(3)]
        assert [a.code for a in acks] == [b"AR"] * 3
        assert all(text in a.err for a in acks)
        assert r.count("envelopes") == 0
        monkeypatch.setattr(r.gw.journal, "accept", real_accept)
        ok = await p.request(hl7("FAIL-0"))  # the sender resends: now it is stored
        assert (ok.code, ok.control_id) == (b"AA", b"FAIL-0")
        assert r.count("envelopes") == 1


# -- operators see what was quarantined --------------------------------------------------------


async def test_queue_list_quarantine_shows_rejected_input(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r, peer(r.port) as p:
        await p.write(b"NOISE-BEFORE-FRAME")
        assert (await p.request(b"PID|1||no msh\r")).code == b"AR"
        assert (await p.request(hl7("U8", charset="UNICODE UTF-8", pid=b"PID|\xff"))).code == b"AE"
        await until(lambda: r.count("quarantine") == 3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "queue",
            "list",
            "--quarantine",
            "--config",
            str(r.config_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[:6] == ["ID", "RECEIVED", "SOURCE", "PEER", "SIZE", "REASON"]
    body = lines[1:]
    assert len(body) == 3
    assert "junk:" in body[2] and "b'NOISE-BEFORE-FRAME'" in body[2]
    assert "message does not start with an MSH" in body[1]
    assert "cannot decode as utf-8" in body[0]  # newest first
    assert all(" his " in line and "127.0.0.1:" in line for line in body)


# -- who may connect, and the record of each connection -------------------------------------


def session_rows(r: Running) -> list[tuple[str, dict[str, object]]]:
    with sqlite3.connect(f"file:{r.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT peer, details FROM sessions WHERE source = 'his' ORDER BY id")
        return [(p, json.loads(d)) for p, d in rows]


async def test_peer_outside_allowed_ips_is_closed_unanswered_and_recorded(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, listener=", allowed_ips: [10.20.0.0/16]") as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(VT + hl7("NOT-ALLOWED") + FS + CR)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no ACK
        writer.close()
        await until(lambda: len(session_rows(r)) == 1, what="the refusal's session record")
        ((peer_addr, details),) = session_rows(r)
        assert peer_addr.startswith("127.0.0.1:")
        assert details == {"protocol": "hl7-mllp", "rejected": "address not allowed"}
        assert r.count("envelopes") == 0 and r.count("quarantine") == 0


async def test_allowed_peer_is_served_and_its_connection_recorded(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, listener=", allowed_ips: [10.0.0.1, 127.0.0.0/8]") as r:
        async with peer(r.port) as p:
            assert (await p.request(hl7("ALLOWED-1"))).code == b"AA"
            assert (await p.request(hl7("ALLOWED-2"))).code == b"AA"
        await until(lambda: len(session_rows(r)) == 1, what="the connection's session record")
        ((_, details),) = session_rows(r)
        assert details == {"protocol": "hl7-mllp", "messages": 2, "tls": False}


def test_allowed_ips_must_be_addresses_or_networks(tmp_path: Path) -> None:
    text = (
        "site: {id: t}\nstate_dir: " + str(tmp_path) + "\nlisteners:\n"
        "  - {id: his, type: hl7-mllp, listen: 127.0.0.1:0, allowed_ips: [10.0.0.0/8, lab-pc]}\n"
        "destinations: [{id: o, type: folder, path: " + str(tmp_path / "o") + "}]\n"
        "routes: [{match: {source: his}, to: [o]}]\n"
    )
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.allowed_ips.*'lab-pc'"):
        parse_config(text, default_registry(), source="t.yaml")
