"""MQTT telemetry against a real Mosquitto: site status and its Last Will, listener and
destination state, events with the patient-id policy, and events buffered while the
broker is away (across a gateway restart too).

The broker is Debian's mosquitto on a free loopback port, started and stopped by pid;
the watcher is a plain aiomqtt subscriber; HL7 goes in through a raw MLLP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from peers.gateway_proc import Proc, http_get, pick_free_port, wait_for
from peers.mosquitto import Mosquitto, available

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.events import Event, hash_id
from gateway.registry import default_registry
from gateway.service import Gateway

pytestmark = pytest.mark.skipif(not available(), reason="mosquitto not installed")

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
PREFIX = "medgw/laocai/gh-test"
PATIENT_NAME = "NGUYEN^VAN AN"


def oru(control_id: str, patient_id: str = "PID-778899") -> bytes:
    segments = [
        f"MSH|^~\\&|LAB|GH|HIS|GH|20261123101500||ORU^R01|{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^GH^MR||{PATIENT_NAME}||19800101|M",
        "OBR|1||S1|718-7^Hemoglobin^LN",
        "OBX|1|NM|718-7^Hemoglobin^LN||13.5|g/dL|12-16|N|||F",
    ]
    return VT + CR.join(s.encode() for s in segments) + CR + FS + CR


async def send_hl7(port: int, control_id: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(oru(control_id))
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(FS + CR), 10)
    finally:
        writer.close()


class Watcher:
    """A subscriber to ``<prefix>/#`` that keeps every message it gets."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self.got: list[tuple[str, bytes, bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Watcher:
        self._client = aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=f"watcher-{uuid.uuid4().hex[:8]}",
            tls_context=self.tls,
        )
        await self._client.__aenter__()
        await self._client.subscribe(f"{PREFIX}/#", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._client is not None
        async for msg in self._client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            self.got.append((str(msg.topic), payload, bool(msg.retain)))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.got if t == f"{PREFIX}/{topic}"]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on(f"events/{name}")]

    async def wait(self, check: Callable[[], bool], what: str, timeout: float = 15) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not check():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            topics = sorted({t for t, _, _ in self.got})
            raise AssertionError(f"timed out waiting for {what}; topics seen: {topics}") from None


def config_doc(tmp_path: Path, broker_port: int, mllp_port: int, **mqtt: Any) -> dict[str, Any]:
    return {
        "site": {"id": "gh-test"},
        "state_dir": str(tmp_path / "state"),
        "http": {"listen": None},
        "journal": {"min_free_mb": 0},
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{broker_port}",
            "topic_prefix": PREFIX,
            "keepalive_s": 5,
            "state_interval_s": 0.5,
            **mqtt,
        },
        "listeners": [{"id": "his", "type": "hl7-mllp", "listen": f"127.0.0.1:{mllp_port}"}],
        "destinations": [{"id": "outbox", "type": "folder", "path": str(tmp_path / "outbox")}],
        "routes": [{"match": {"source": "his"}, "to": ["outbox"]}],
    }


@asynccontextmanager
async def running(doc: dict[str, Any], tmp_path: Path) -> AsyncIterator[Gateway]:
    config_file = tmp_path / "gateway.yaml"
    text = yaml.safe_dump(doc, sort_keys=False)
    config_file.write_text(text, encoding="utf-8")
    registry = default_registry()
    gw = Gateway(parse_config(text, registry, source=str(config_file)), registry, drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        async with asyncio.timeout(10):
            await gw.ready.wait()
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_status_state_and_events_reach_the_broker(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    mllp = pick_free_port()
    try:
        async with (
            Watcher(broker.port) as w,
            running(config_doc(tmp_path, broker.port, mllp), tmp_path),
        ):
            await w.wait(lambda: b"online" in w.on("status"), "status online")
            ack = await send_hl7(mllp, "CTRL-1")
            assert b"MSA|AA|CTRL-1" in ack
            await w.wait(lambda: w.events("message.delivered"), "the delivered event")
            received = w.events("message.received")
            assert len(received) == 1
            ev = received[0]
            assert ev["source"] == "his" and ev["kind"] == "hl7" and ev["site"] == "gh-test"
            assert ev["ids"]["control_id"] == "CTRL-1"
            delivered = w.events("message.delivered")[0]
            assert delivered["destination"] == "outbox"
            assert delivered["envelope"] == ev["envelope"]

            def dest_state() -> dict[str, Any]:
                states = w.on("destinations/outbox/state")
                return json.loads(states[-1]) if states else {}

            await w.wait(lambda: dest_state().get("delivered") == 1, "outbox state delivered=1")
            assert dest_state()["breaker"] == "closed" and dest_state()["pending"] == 0

            def his_state() -> dict[str, Any]:
                states = w.on("listeners/his/state")
                return json.loads(states[-1]) if states else {}

            await w.wait(lambda: his_state().get("received") == 1, "his state received=1")
            assert his_state()["type"] == "hl7-mllp" and his_state()["last_message_at"]
            info = json.loads(w.on("info")[-1])
            assert info["site"] == "gh-test"
        # a subscriber arriving later still sees the retained state; a clean stop says offline
        async with Watcher(broker.port) as late:
            await late.wait(lambda: late.on("status") == [b"offline"], "retained offline")
            await late.wait(lambda: late.on("destinations/outbox/state"), "retained state")
            assert all(retained for _, _, retained in late.got)
        everything = b"".join(p for _, p, _ in w.got)
        assert PATIENT_NAME.encode() not in everything  # names never leave the site
    finally:
        broker.stop()


async def test_events_are_buffered_while_the_broker_is_away_even_across_a_restart(
    tmp_path: Path,
) -> None:
    broker_port, mllp = pick_free_port(), pick_free_port()
    doc = config_doc(tmp_path, broker_port, mllp)
    outbox_db = tmp_path / "state" / "telemetry.sqlite"
    async with running(doc, tmp_path) as gw:  # no broker yet: clinical traffic goes on
        for i in range(3):
            assert b"MSA|AA" in await send_hl7(mllp, f"AWAY-{i}")
        telemetry_outbox = outbox_db
        await asyncio.sleep(0.5)  # the flush interval: events reach the outbox file
        assert gw.journal.depth()["outbox"]["done"] == 3
    # the gateway stopped with the events still buffered; the broker comes back, then it
    broker = Mosquitto(tmp_path / "broker", port=broker_port).start()
    try:
        async with Watcher(broker.port) as w, running(doc, tmp_path):
            assert b"MSA|AA" in await send_hl7(mllp, "BACK-0")
            await w.wait(lambda: len(w.events("message.received")) == 4, "all 4 received events")
            ids = [e["ids"]["control_id"] for e in w.events("message.received")]
            assert ids == ["AWAY-0", "AWAY-1", "AWAY-2", "BACK-0"]  # in order, once each
            await w.wait(lambda: len(w.events("message.delivered")) == 4, "4 delivered")
        import sqlite3  # noqa: PLC0415

        with sqlite3.connect(telemetry_outbox) as c:
            assert c.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    finally:
        broker.stop()


def gateway_proc(tmp_path: Path, doc: dict[str, Any], procs: list[Proc]) -> Proc:
    http = pick_free_port()
    doc = {**doc, "http": {"listen": f"127.0.0.1:{http}"}}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    proc = Proc(
        "gateway",
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        tmp_path / "gateway.log",
    )
    proc.spawn()
    procs.append(proc)  # killed by pid at the end even if it never becomes ready

    def ready() -> bool:
        if not proc.running():
            raise AssertionError(f"gateway exited:\n{proc.log_tail()}")
        try:
            return http_get(http, "/healthz", 1.0)[0] == 200
        except OSError:
            return False

    wait_for(ready, 30, "the gateway's /healthz")
    return proc


async def test_last_will_says_offline_when_the_gateway_is_killed(
    tmp_path: Path, procs: list[Proc]
) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    procs.append(broker)
    async with Watcher(broker.port) as w:
        gw = gateway_proc(tmp_path, config_doc(tmp_path, broker.port, pick_free_port()), procs)
        await w.wait(lambda: w.on("status")[-1:] == [b"online"], "online")
        gw.signal(signal.SIGKILL)  # no goodbye: the broker publishes the Last Will
        await w.wait(lambda: w.on("status")[-1:] == [b"offline"], "the Last Will", timeout=20)
    async with Watcher(broker.port) as late:  # and keeps it for whoever looks later
        await late.wait(lambda: late.on("status") == [b"offline"], "retained offline")


async def test_broker_credentials_from_files(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"gh-test": "s3cret pass"}).start()
    (tmp_path / "mqtt.user").write_text("gh-test\n", encoding="utf-8")
    (tmp_path / "mqtt.pass").write_text("s3cret pass\n", encoding="utf-8")
    (tmp_path / "wrong.pass").write_text("nope\n", encoding="utf-8")
    mllp = pick_free_port()
    try:
        good = config_doc(
            tmp_path, broker.port, mllp, username_file="mqtt.user", password_file="mqtt.pass"
        )
        async with running(good, tmp_path) as gw:
            await wait_until(lambda: gw_telemetry_connected(gw), "connected with the password")
        bad = config_doc(
            tmp_path, broker.port, mllp, username_file="mqtt.user", password_file="wrong.pass"
        )
        async with running(bad, tmp_path) as gw:
            await asyncio.sleep(1.5)
            assert not gw_telemetry_connected(gw)
            assert gw.telemetry is not None
            assert "authoriz" in gw.telemetry.last_error.lower()
            assert b"MSA|AA" in await send_hl7(mllp, "NOAUTH-1")  # the clinical side goes on
    finally:
        broker.stop()


def gw_telemetry_connected(gw: Gateway) -> bool:
    return bool(gw.telemetry is not None and gw.telemetry.connected)


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_patient_id_policy() -> None:
    ev = Event("message.received", 1_700_000_000.0, ids={"patient_id": "PID-1", "accession": "A9"})
    assert ev.as_dict("plain")["ids"] == {"patient_id": "PID-1", "accession": "A9"}
    assert ev.as_dict("none")["ids"] == {"accession": "A9"}
    hashed = ev.as_dict("hashed", salt="gh-test")["ids"]
    assert hashed == {"patient_id_hash": hash_id("PID-1", "gh-test"), "accession": "A9"}
    assert hashed["patient_id_hash"] != hash_id("PID-1", "other-site")  # salted per site
    assert ev.as_dict("plain")["at"] == "2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ({"username": "a", "username_file": "f"}, "username or username_file"),
        ({"cert_file": "c.pem"}, "cert_file and key_file go together"),
        ({"url": "http://broker:1883"}, "url"),
        ({"patient_ids": "names"}, "patient_ids"),
        ({"topic_prefix": "medgw/#"}, "topic_prefix"),
    ],
)
def test_mqtt_config_errors_name_the_setting(
    tmp_path: Path, mqtt: dict[str, Any], message: str
) -> None:
    doc = config_doc(tmp_path, 1883, 2575, **mqtt)
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(doc), default_registry())
    assert message in str(err.value) and "mqtt" in str(err.value)


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1, made with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=medgw test CA",
    )
    run(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return ca, cert, key


async def test_mqtts_with_the_provinces_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "broker", tls=(ca, cert, key)).start()
    port = broker.port
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        doc = config_doc(tmp_path, port, pick_free_port(), ca_file=str(ca))
        doc["mqtt"]["url"] = f"mqtts://127.0.0.1:{port}"
        async with Watcher(port, tls=ctx) as w, running(doc, tmp_path):
            await w.wait(lambda: b"online" in w.on("status"), "status online over TLS")
        # a broker certificate the configured CA did not sign is refused
        other_ca, _, _ = make_certs(tmp_path / "other")
        doc["mqtt"]["ca_file"] = str(other_ca)
        async with running(doc, tmp_path) as gw:
            await wait_until(lambda: bool(gw.telemetry and gw.telemetry.last_error), "a TLS error")
            assert gw.telemetry is not None and not gw.telemetry.connected
            assert "certificate" in gw.telemetry.last_error.lower()
    finally:
        broker.stop()
