"""The audit trail: records from a running gateway, append-only storage, retention, and the
RFC 5424 export to real UDP and TCP collectors (sockets in the test), outage included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest

from gateway import audit as audit_mod
from gateway.audit import AuditLog, AuditStore, row_for
from gateway.cli import main as medgw
from gateway.config import Audit, Syslog, parse_config
from gateway.events import Event, EventBus, hash_id
from gateway.registry import default_registry
from gateway.service import Gateway

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
BOM = b"\xef\xbb\xbf"

# -- a strict RFC 5424 reader (section 6) --------------------------------------------------

HEADER = re.compile(
    rb"^<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) "
    rb"(?P<ts>[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    rb"(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) "
)
SD_NAME = re.compile(r"[!#-<>-\\^-~]{1,32}")


def parse_sd(text: str) -> tuple[dict[str, dict[str, str]], str]:
    """STRUCTURED-DATA ("-" or elements) and what follows it."""
    if text.startswith("-"):
        return {}, text[1:]
    elements: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(text) and text[i] == "[":
        m = SD_NAME.match(text, i + 1)
        assert m, f"bad SD-ID at {text[i:]!r}"
        params: dict[str, str] = {}
        i = m.end()
        while text[i] == " ":
            n = SD_NAME.match(text, i + 1)
            assert n and text[n.end() : n.end() + 2] == '="', f"bad SD-PARAM at {text[i:]!r}"
            j, value = n.end() + 2, []
            while text[j] != '"':
                if text[j] == "\\" and text[j + 1] in '"\\]':
                    j += 1
                assert text[j] != "]" or text[j - 1] == "\\", "unescaped ] in a PARAM-VALUE"
                value.append(text[j])
                j += 1
            params[n.group()] = "".join(value)
            i = j + 1
        assert text[i] == "]", f"SD element not closed at {text[i:]!r}"
        assert m.group() not in elements, "duplicate SD-ID"
        elements[m.group()] = params
        i += 1
    assert elements, "neither - nor an SD element"
    return elements, text[i:]


def parse_5424(msg: bytes) -> dict[str, Any]:
    m = HEADER.match(msg)
    assert m, f"not an RFC 5424 header: {msg[:120]!r}"
    pri = int(m["pri"])
    assert 0 <= pri <= 191 and m["version"] == b"1"
    time.strptime(m["ts"].decode()[:19], "%Y-%m-%dT%H:%M:%S")
    rest = msg[m.end() :].decode("utf-8")
    sd, tail = parse_sd(rest)
    assert tail.startswith(" "), "MSG must follow SD after one space"
    body = tail[1:].encode()
    assert body.startswith(BOM), "a UTF-8 MSG starts with the BOM"
    return {
        "facility": pri // 8,
        "severity": pri % 8,
        "timestamp": m["ts"].decode(),
        "hostname": m["host"].decode(),
        "app": m["app"].decode(),
        "procid": m["procid"].decode(),
        "msgid": m["msgid"].decode(),
        "sd": sd,
        "body": json.loads(body[3:]),
    }


# -- collectors --------------------------------------------------------------------------


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpCollector:
    """RFC 6587 octet-counted frames on a loopback port; stop() closes every connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        # bounded: Python 3.11's wait_closed() can wait on a connection the peer just dropped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                length = await reader.readuntil(b" ")
                assert re.fullmatch(rb"[1-9][0-9]* ", length), length
                self.messages.append(await reader.readexactly(int(length)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


class UdpCollector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.messages.append(data)


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def audit_rows(
    state: Path, sql: str = "SELECT event, source, destination, ids FROM audit"
) -> list[Any]:
    path = state / "audit.sqlite"
    if not path.exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


@asynccontextmanager
async def audit_log(tmp_path: Path, **audit: Any) -> AsyncIterator[tuple[AuditLog, EventBus]]:
    bus = EventBus()
    log = AuditLog(Audit(**audit), "site-1", tmp_path / "state")
    bus.subscribe(log.on_event)
    async with log:
        yield log, bus


def emit(bus: EventBus, n: int, **fields: Any) -> None:
    for i in range(n):
        bus.emit(
            "message.received",
            source="his",
            envelope=f"env-{i}",
            kind="hl7",
            peer="127.0.0.1",
            ids={"control_id": f"C{i}", "patient_id": "P123"},
            **fields,
        )


# -- the running gateway -----------------------------------------------------------------

ORU = (
    b"MSH|^~\\&|COBAS|LAB|LIS|HOSP|20240101120000||ORU^R01|AUD-1|P|2.5.1\r"
    b"PID|1||P0001^^^HOSP^MR||Doe^Jane\r"
    b"OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|||||F\r"
)


async def test_a_running_gateway_audits_received_and_delivered_and_exports_them(
    tmp_path: Path,
) -> None:
    port, syslog_port = free_port(), free_port()
    collector = TcpCollector(syslog_port)
    await collector.start()
    state, outbox = tmp_path / "state", tmp_path / "outbox"
    text = (
        f"site: {{id: test-site}}\n"
        f"state_dir: {state}\n"
        f"http: {{listen: null}}\n"
        f"journal: {{min_free_mb: 0}}\n"
        f"audit: {{syslog: {{url: 'tcp://127.0.0.1:{syslog_port}', hostname: gw-01}}}}\n"
        f"listeners:\n"
        f"  - {{id: his, type: hl7-mllp, listen: 127.0.0.1:{port}}}\n"
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
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(VT + ORU + FS + CR)
        await writer.drain()
        ack = await asyncio.wait_for(reader.readuntil(FS + CR), 10)
        assert b"MSA|AA|AUD-1" in ack
        writer.close()
        await writer.wait_closed()
        await wait_for(
            lambda: {"message.received", "message.delivered"} <= {r[0] for r in audit_rows(state)}
        )
        await wait_for(lambda: len(collector.messages) >= 2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await collector.stop()

    rows = {r[0]: r for r in audit_rows(state)}
    assert rows["message.received"][1] == "his"
    assert json.loads(rows["message.received"][3]) == {"control_id": "AUD-1"}
    assert rows["message.delivered"][1:3] == ("his", "outbox")
    parsed = [parse_5424(m) for m in collector.messages]
    delivered = next(p for p in parsed if p["msgid"] == "message.delivered")
    assert delivered["facility"] == 10 and delivered["severity"] == 5
    assert delivered["hostname"] == "gw-01" and delivered["app"] == "medgw"
    assert delivered["sd"]["medgw@32473"]["destination"] == "outbox"
    assert delivered["sd"]["medgw@32473"]["site"] == "test-site"
    assert delivered["sd"]["ids@32473"] == {"control_id": "AUD-1"}
    assert delivered["body"]["ids"] == {"control_id": "AUD-1"}
    assert [p["body"]["seq"] for p in parsed] == sorted(p["body"]["seq"] for p in parsed)

    # the CLI reads the same file
    assert (
        medgw(["audit", "list", "--config", str(config_file), "--event", "message.delivered"]) == 0
    )
    assert medgw(["audit", "export", "--config", str(config_file), "--format", "syslog"]) == 0


async def test_cli_lists_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with audit_log(tmp_path) as (_, bus):
        emit(bus, 2)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(f"site: {{id: s}}\nstate_dir: {tmp_path / 'state'}\n", encoding="utf-8")
    assert medgw(["audit", "list", "--config", str(config_file), "--since", "1d"]) == 0
    out = capsys.readouterr().out
    assert "message.received" in out and "control_id=C1" in out
    assert medgw(["audit", "export", "--config", str(config_file), "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["ids"]["control_id"] for d in lines] == ["C0", "C1"]
    assert medgw(["audit", "export", "--config", str(config_file), "--format", "syslog"]) == 0
    for line in capsys.readouterr().out.splitlines():
        header = HEADER.match(line.encode())
        assert header and header["msgid"] == b"message.received"


# -- append-only and retention ---------------------------------------------------------------


def test_update_and_delete_are_refused_and_retention_prunes(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    store = AuditStore(path, retention_days=30)
    now = time.time()
    old = Event("message.received", at=now - 31 * 86400, source="his")
    new = Event("message.delivered", at=now - 29 * 86400, source="his", destination="lis")
    store.append([row_for(old, "plain", ""), row_for(new, "plain", "")])
    store.close()

    with closing(sqlite3.connect(path)) as conn:  # as someone with the sqlite3 shell would
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET outcome = 'ok' WHERE event = 'message.received'")
        with pytest.raises(sqlite3.DatabaseError, match="kept for 30 days"):
            conn.execute("DELETE FROM audit")
        with pytest.raises(sqlite3.DatabaseError, match="kept for 30 days"):
            conn.execute("DELETE FROM audit WHERE event = 'message.delivered'")
        assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 2

    store = AuditStore(path, retention_days=30)
    assert store.prune() == 1
    assert [r.event for r in store.records()] == ["message.delivered"]
    store.close()


async def test_retention_is_applied_at_start(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "state" / "audit.sqlite", retention_days=1)
    store.append([row_for(Event("message.received", at=time.time() - 2 * 86400), "plain", "")])
    store.close()
    async with audit_log(tmp_path, retention_days=1) as (_, bus):
        emit(bus, 1)
    assert [r[0] for r in audit_rows(tmp_path / "state")] == ["message.received"]
    assert len(audit_rows(tmp_path / "state")) == 1


async def test_only_who_sent_what_to_whom_is_audited(tmp_path: Path) -> None:
    async with audit_log(tmp_path) as (_, bus):
        bus.emit("destination.down", destination="lis", outcome="failed")
        bus.emit("message.dead", destination="lis", source="his", outcome="failed")
    assert [r[0] for r in audit_rows(tmp_path / "state")] == ["message.dead"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("plain", {"control_id": "C0", "patient_id": "P123"}),
        ("hashed", {"control_id": "C0", "patient_id_hash": hash_id("P123", "site-1")}),
        ("none", {"control_id": "C0"}),
    ],
)
async def test_patient_id_policy(tmp_path: Path, policy: str, expected: dict[str, str]) -> None:
    async with audit_log(tmp_path, patient_ids=policy) as (_, bus):
        emit(bus, 1)
    (ids,) = audit_rows(tmp_path / "state", "SELECT ids FROM audit")
    assert json.loads(ids[0]) == expected


# -- syslog ------------------------------------------------------------------------------


async def test_udp_collector_gets_rfc5424_records(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    collector = UdpCollector()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: collector, local_addr=("127.0.0.1", port)
    )
    try:
        syslog = Syslog(url=f"udp://127.0.0.1:{port}", app_name="medgw-test")
        async with audit_log(tmp_path, syslog=syslog, patient_ids="hashed") as (_, bus):
            emit(bus, 3, detail={"note": 'quote " and ] bracket \\ slash'})
            bus.emit("message.quarantined", source="his", outcome="refused", detail={"reason": "x"})
            await wait_for(lambda: len(collector.messages) == 4)
    finally:
        transport.close()
    parsed = [parse_5424(m) for m in collector.messages]
    assert [p["msgid"] for p in parsed] == ["message.received"] * 3 + ["message.quarantined"]
    assert [p["severity"] for p in parsed] == [5, 5, 5, 4]
    assert all(p["facility"] == 10 and p["app"] == "medgw-test" for p in parsed)
    first = parsed[0]
    assert first["sd"]["medgw@32473"]["peer"] == "127.0.0.1"
    assert first["sd"]["ids@32473"] == {
        "control_id": "C0",
        "patient_id_hash": hash_id("P123", "site-1"),
    }
    assert "P123" not in json.dumps(first)
    assert first["body"]["detail"]["note"] == 'quote " and ] bracket \\ slash'


async def test_records_missed_while_the_collector_is_down_arrive_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_mod, "RECONNECT_MIN_S", 0.05)
    monkeypatch.setattr(audit_mod, "RECONNECT_MAX_S", 0.2)
    port = free_port()
    collector = TcpCollector(port)
    await collector.start()
    syslog = Syslog(url=f"tcp://127.0.0.1:{port}")
    async with audit_log(tmp_path, syslog=syslog) as (log, bus):
        emit(bus, 2)
        await wait_for(lambda: len(collector.messages) == 2)
        await collector.stop()
        await wait_for(lambda: not log.connected)
        emit(bus, 5)
        await wait_for(lambda: len(audit_rows(tmp_path / "state")) == 7)
        await asyncio.sleep(0.3)  # reconnect attempts fail meanwhile
        assert len(collector.messages) == 2
        collector2 = TcpCollector(port)
        await collector2.start()
        await wait_for(lambda: len(collector2.messages) == 5)
    await collector2.stop()
    seqs = [parse_5424(m)["body"]["seq"] for m in collector.messages + collector2.messages]
    assert seqs == list(range(1, 8))
    store = AuditStore(tmp_path / "state" / "audit.sqlite", 365)
    assert store.sent_seq() == 7
    store.close()


async def test_unsent_records_are_sent_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_mod, "RECONNECT_MIN_S", 0.05)
    port = free_port()
    syslog = Syslog(url=f"tcp://127.0.0.1:{port}")
    async with audit_log(tmp_path, syslog=syslog) as (_, bus):  # no collector yet
        emit(bus, 3)
    collector = TcpCollector(port)
    await collector.start()
    try:
        async with audit_log(tmp_path, syslog=syslog):
            await wait_for(lambda: len(collector.messages) == 3)
    finally:
        await collector.stop()


async def test_tls_collector_gets_octet_counted_records(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", "collector.key", "-out", "collector.crt", "-subj", "/CN=collector",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "collector.crt", tmp_path / "collector.key")
    port = free_port()
    collector = TcpCollector(port)
    collector.server = await asyncio.start_server(
        collector._conn, "127.0.0.1", port, ssl=server_ctx
    )
    syslog = Syslog(url=f"tls://127.0.0.1:{port}", ca_file=tmp_path / "collector.crt")
    try:
        async with audit_log(tmp_path, syslog=syslog) as (log, bus):
            emit(bus, 2)
            await wait_for(lambda: len(collector.messages) == 2)
            assert log.connected
    finally:
        await collector.stop()
    assert [parse_5424(m)["body"]["ids"]["control_id"] for m in collector.messages] == ["C0", "C1"]
