"""systemd notifications (sd_notify) and the /healthz and /metrics endpoints of a gateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.journal import Journal
from gateway.registry import default_registry
from gateway.sdnotify import Notifier
from gateway.service import Gateway

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(tmp_path: Path, mllp_port: int, http_port: int) -> str:
    return (
        f"site: {{id: health-site}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"http: {{listen: 127.0.0.1:{http_port}}}\n"
        f"journal: {{min_free_mb: 0}}\n"
        f"listeners:\n"
        f"  - {{id: his, type: hl7-mllp, listen: 127.0.0.1:{mllp_port}}}\n"
        f"destinations:\n"
        f"  - {{id: outbox, type: folder, path: {tmp_path / 'outbox'}}}\n"
        f"routes:\n"
        f"  - {{match: {{source: his}}, to: [outbox]}}\n"
    )


@dataclass
class Running:
    gw: Gateway
    mllp_port: int
    http_port: int
    outbox: Path
    stop: asyncio.Event


@asynccontextmanager
async def running_gateway(
    tmp_path: Path, notifier: Notifier | None = None
) -> AsyncIterator[Running]:
    mllp_port, http_port = free_port(), free_port()
    registry = default_registry()
    cfg = parse_config(config_text(tmp_path, mllp_port, http_port), registry)
    gw = Gateway(cfg, registry, notifier=notifier or Notifier(env={}), drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not gw.ready.is_set():
        ready.cancel()
        stop.set()
        await task
        raise AssertionError("gateway did not become ready")
    try:
        yield Running(gw, mllp_port, http_port, tmp_path / "outbox", stop)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# -- sd_notify ------------------------------------------------------------------------------


class NotifySocket:
    """The service manager's side: a datagram socket collecting notifications."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.messages.append((time.monotonic(), data.decode()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect())

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def times_of(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.split("\n")]

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket(f"@medgw-test-{uuid.uuid4().hex}")  # abstract: no path length limit
    yield ns
    ns.close()


async def test_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    notify_socket.start()
    notifier = Notifier(env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"})
    assert notifier.enabled
    assert notifier.watchdog_interval == pytest.approx(0.1)  # half the watchdog timeout
    async with running_gateway(tmp_path, notifier) as r:
        await until(lambda: any("READY=1" in m for m in notify_socket.lines()), what="READY=1")
        await until(lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 4, what="4 pings")
        assert r.gw.ready.is_set()
    await until(lambda: notify_socket.times_of("STOPPING=1") != [], what="STOPPING=1")
    msgs = notify_socket.lines()
    assert msgs[0] == "READY=1\nSTATUS=serving"  # READY comes first, with a status line
    assert "STOPPING=1\nSTATUS=draining" in msgs
    pings = notify_socket.times_of("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert min(gaps) > 0.05, gaps  # not a busy loop
    assert 0.08 < statistics.median(gaps) < 0.15, gaps  # half of WATCHDOG_USEC
    assert notify_socket.times_of("READY=1")[0] <= pings[0]


async def test_watchdog_stops_petting_when_the_journal_writer_is_gone(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_socket.start()
    notifier = Notifier(env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"})
    async with running_gateway(tmp_path, notifier):
        await until(lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 2)
        monkeypatch.setattr(Journal, "writer_alive", property(lambda self: False))
        await asyncio.sleep(0.06)  # a ping already on its way may still arrive
        before = len(notify_socket.times_of("WATCHDOG=1"))
        await asyncio.sleep(0.3)  # six ping intervals
        assert len(notify_socket.times_of("WATCHDOG=1")) == before
        monkeypatch.undo()
        await until(lambda: len(notify_socket.times_of("WATCHDOG=1")) > before, what="pings again")


async def test_notifier_with_a_socket_path() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # short: sun_path is 108 bytes
        ns = NotifySocket(str(Path(d) / "notify"))
        try:
            ns.start()
            Notifier(env={"NOTIFY_SOCKET": ns.address}).notify("READY=1", "STATUS=x")
            await until(lambda: ns.lines() == ["READY=1\nSTATUS=x"])
        finally:
            ns.close()


async def test_unreachable_notify_socket_does_not_stop_the_gateway(tmp_path: Path) -> None:
    notifier = Notifier(
        env={"NOTIFY_SOCKET": f"@medgw-nobody-{uuid.uuid4().hex}", "WATCHDOG_USEC": "100000"}
    )
    async with running_gateway(tmp_path, notifier) as r:
        assert b"|AA|" in await send_hl7(r.mllp_port, "N-1")


def test_notifier_without_systemd_is_a_no_op() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.notify("READY=1")  # nothing to send to, nothing raised


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env={"NOTIFY_SOCKET": "@x", **env}).watchdog_interval == interval


async def test_medgw_run_notifies_systemd_and_stops_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """The real `medgw run` as systemd starts it: Type=notify, watchdog, SIGTERM."""
    notify_socket.start()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config_text(tmp_path, free_port(), free_port()), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "200000",
    }
    env.pop("WATCHDOG_PID", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "run",
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        await until(lambda: notify_socket.times_of("READY=1") != [], what="READY=1")
        await until(lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 2, what="pings")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    await until(lambda: notify_socket.times_of("STOPPING=1") != [], what="STOPPING=1")
    assert b"gateway.stopped" in err


# -- HTTP endpoints ---------------------------------------------------------------------------


async def http(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # the server closes after one response
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


async def send_hl7(port: int, control_id: str) -> bytes:
    msg = (
        f"MSH|^~\\&|LAB|HOSP|LIS|HOSP|20240101120000||ORU^R01|{control_id}|P|2.5.1\r"
        f"OBX|1|NM|GLU||5.4|mmol/L\r"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x0b" + msg + b"\x1c\r")
    await writer.drain()
    reply = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 5)
    writer.close()
    return reply


async def test_healthz_reports_destinations(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        status, headers, body = await http(r.http_port, "GET", "/healthz")
        assert status == 200
        assert headers["content-type"] == "application/json"
        doc = json.loads(body)
        assert doc["status"] == "ok"
        assert doc["site"] == "health-site"
        assert doc["listeners"] == {"his": "MllpListener"}
        assert doc["destinations"]["outbox"] == {
            "breaker": "closed",
            "pending": 0,
            "dead": 0,
            "delivered": 0,
            "oldest_pending_s": None,
            "last_error": None,
            "last_success_at": None,
        }
        assert b"|AA|" in await send_hl7(r.mllp_port, "H-1")
        await until(lambda: any(r.outbox.glob("*.hl7")), what="delivery")
        await until(lambda: r.gw.journal.depth() == {"outbox": {"done": 1}})
        _, _, body = await http(r.http_port, "GET", "/healthz?verbose=1")
        outbox = json.loads(body)["destinations"]["outbox"]
        assert outbox["delivered"] == 1
        assert outbox["last_success_at"].endswith("Z")


async def test_healthz_degraded_and_stopping(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        breaker = r.gw.pumps["outbox"].breaker
        breaker.failures = breaker.threshold
        breaker.open_until = time.monotonic() + 60
        status, _, body = await http(r.http_port, "GET", "/healthz")
        assert status == 200  # degraded still answers: the box itself is up
        doc = json.loads(body)
        assert doc["status"] == "degraded"
        assert doc["destinations"]["outbox"]["breaker"] == "open"
        breaker.failures = 0
        r.gw.stopping = True  # what run() sets while draining
        status, _, body = await http(r.http_port, "GET", "/healthz")
        assert status == 503
        assert json.loads(body)["status"] == "stopping"


async def test_metrics_after_a_delivery(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        assert b"|AA|" in await send_hl7(r.mllp_port, "M-1")
        await until(lambda: r.gw.journal.depth() == {"outbox": {"done": 1}}, what="delivery")
        status, headers, body = await http(r.http_port, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'medgw_queue_depth{destination="outbox",state="done"} 1.0' in text
    assert 'medgw_messages_received_total{listener="his"} 1.0' in text
    assert 'medgw_messages_delivered_total{destination="outbox"} 1.0' in text
    assert 'medgw_delivery_latency_seconds_count{destination="outbox"} 1.0' in text
    assert 'medgw_delivery_latency_seconds_bucket{destination="outbox",le="+Inf"} 1.0' in text
    assert 'medgw_delivery_latency_seconds_bucket{destination="outbox",le="0.005"}' in text
    assert "# TYPE medgw_delivery_latency_seconds histogram" in text


async def test_metrics_show_pending_depth_and_age(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        # stop deliveries first, so what comes in stays pending
        await r.gw.pumps["outbox"].stop(1.0)
        assert b"|AA|" in await send_hl7(r.mllp_port, "P-1")
        _, _, body = await http(r.http_port, "GET", "/metrics")
    text = body.decode()
    assert 'medgw_queue_depth{destination="outbox",state="pending"} 1.0' in text
    assert 'medgw_queue_oldest_pending_seconds{destination="outbox"}' in text


async def test_unknown_path_and_wrong_method(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as r:
        status, _, body = await http(r.http_port, "GET", "/nope")
        assert status == 404
        assert b"/healthz" in body
        status, _, _ = await http(r.http_port, "POST", "/healthz")
        assert status == 405
        status, _, _ = await http(r.http_port, "DELETE", "/metrics")
        assert status == 405
        # a client that sends half a request and leaves does not hurt the next one
        _, writer = await asyncio.open_connection("127.0.0.1", r.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        writer.close()
        status, _, _ = await http(r.http_port, "GET", "/healthz")
        assert status == 200
