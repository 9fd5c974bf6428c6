"""drivers.transports against real peers: socat pty pairs, asyncio TCP servers and clients.

The peer ends are independent of the code under test: pyserial in a thread on the
far pty, plain asyncio streams for TCP. Reconnect delays are a few tens of ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import serial
from fakes.pty import socat_pty_pair

from drivers.transports import (
    Line,
    SerialLine,
    StreamLine,
    Transport,
    TransportSettings,
    reconnect_delay,
)
from gateway.config import Endpoint, ListenerBase, parse_config
from gateway.errors import ConfigError
from gateway.registry import Registry

pytestmark = pytest.mark.timeout(15)

LOGGER = "drivers.transports"
FAST = {"reconnect_initial_s": 0.02, "reconnect_max_s": 0.1}


def settings(**values: Any) -> TransportSettings:
    return TransportSettings.model_validate({**FAST, **values})


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(event + " ")
    ]


async def wait_until(check: Callable[[], object], what: str, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.01)


class Echo:
    """A handler: optionally greets, then echoes every byte back until the line ends."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.lines: list[Line] = []
        self.ended: list[Line] = []

    async def __call__(self, line: Line) -> None:
        self.lines.append(line)
        if self.greeting:
            await line.write(self.greeting)
        while data := await line.read():
            await line.write(data)
        self.ended.append(line)


def open_peer(path: Path, timeout_s: float = 3.0) -> serial.Serial:
    """The analyzer's end of the cable: blocking pyserial, used from threads."""
    return serial.Serial(str(path), baudrate=9600, timeout=timeout_s)


async def peer_exchange(peer: serial.Serial, data: bytes) -> bytes:
    """Write ``data`` and read as many bytes back, concurrently (large transfers)."""
    _, back = await asyncio.gather(
        asyncio.to_thread(peer.write, data), asyncio.to_thread(peer.read, len(data))
    )
    return back


# -- configuration ---------------------------------------------------------------------


class AnalyzerSettings(ListenerBase):
    type: Literal["analyzer"]
    transport: TransportSettings


def not_started(cfg: Any, intake: Any, ctx: Any) -> Any:
    raise AssertionError("these tests only load the configuration")


def load(transport: str) -> TransportSettings:
    registry = Registry()
    registry.listener("analyzer", AnalyzerSettings, not_started, "config only")
    text = (
        f"site: {{id: t}}\nlisteners:\n  - id: a1\n    type: analyzer\n    transport: {transport}\n"
    )
    cfg = parse_config(text, registry)
    listener = cfg.listeners[0]
    assert isinstance(listener, AnalyzerSettings)
    return listener.transport


def problems(transport: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(transport)
    return [p.removeprefix("listeners[0].").split(" (line ")[0] for p in info.value.problems]


@pytest.mark.parametrize(
    ("transport", "kind", "target"),
    [
        (
            "{serial: /dev/serial/by-id/usb-FTDI-if00, baudrate: 9600, bytesize: 8, parity: N,"
            " stopbits: 1, rtscts: false, xonxoff: false}",
            "serial",
            "/dev/serial/by-id/usb-FTDI-if00",
        ),
        ('{serial: "socket://10.0.0.9:4001"}', "socket", "socket://10.0.0.9:4001"),
        ("{tcp_listen: 0.0.0.0:5001}", "tcp_listen", "0.0.0.0:5001"),
        ("{tcp_connect: 10.0.0.8:5001}", "tcp_connect", "10.0.0.8:5001"),
    ],
)
def test_each_kind_of_transport_is_read(transport: str, kind: str, target: str) -> None:
    t = load(transport)
    assert (t.kind, t.target) == (kind, target)
    assert (t.reconnect_initial_s, t.reconnect_max_s, t.max_connections) == (1, 60, 4)
    assert t.connect_to == {
        "socket": Endpoint("10.0.0.9", 4001),
        "tcp_connect": Endpoint("10.0.0.8", 5001),
    }.get(kind)


def test_serial_line_settings_keep_pyserial_values() -> None:
    t = load(
        "{serial: /dev/ttyUSB0, baudrate: 250000, bytesize: 7, parity: e, stopbits: 1.5,"
        " rtscts: true, xonxoff: true, reconnect_initial_s: 0.5, reconnect_max_s: 5}"
    )
    assert (t.baudrate, t.bytesize, t.parity, t.stopbits) == (250000, 7, "E", 1.5)
    assert (t.rtscts, t.xonxoff, t.reconnect_initial_s, t.reconnect_max_s) == (True, True, 0.5, 5)


ONE_OF = "transport: give exactly one of serial, tcp_listen, tcp_connect"


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("{}", ONE_OF),
        ("{baudrate: 9600}", ONE_OF),
        ("{serial: /dev/ttyS0, tcp_listen: 0.0.0.0:5001}", ONE_OF),
        ("{tcp_listen: 0.0.0.0:5001, tcp_connect: 10.0.0.8:5001}", ONE_OF),
        ("{serial: /dev/ttyS0, parity: X}", "transport.parity: must be one of N, E, O, M, S"),
        ("{serial: /dev/ttyS0, parity: 1}", "transport.parity: must be one of N, E, O, M, S"),
        ("{serial: /dev/ttyS0, bytesize: 9}", "transport.bytesize: must be one of 5, 6, 7, 8"),
        ("{serial: /dev/ttyS0, stopbits: 3}", "transport.stopbits: must be one of 1, 1.5, 2"),
        (
            "{serial: /dev/ttyS0, baudrate: 0}",
            "transport.baudrate: must be a positive whole number of bits per second, e.g. 9600",
        ),
        (
            "{serial: /dev/ttyS0, baudrate: true}",
            "transport.baudrate: must be a positive whole number of bits per second, e.g. 9600",
        ),
        (
            "{tcp_listen: 0.0.0.0:5001, baudrate: 9600}",
            "transport.baudrate: only allowed with serial",
        ),
        (
            "{tcp_connect: 10.0.0.8:5001, rtscts: true}",
            "transport.rtscts: only allowed with serial",
        ),
        (
            '{serial: "socket://10.0.0.9:4001", parity: E}',
            "transport.parity: has no effect with socket:// (set it on the serial-over-IP box)",
        ),
        (
            "{tcp_connect: 10.0.0.8:5001, max_connections: 2}",
            "transport.max_connections: only allowed with tcp_listen",
        ),
        (
            "{tcp_connect: 10.0.0.8:5001, allowed_ips: [10.0.0.0/8]}",
            "transport.allowed_ips: only allowed with tcp_listen",
        ),
        (
            "{tcp_listen: 0.0.0.0:5001, allowed_ips: [10.0.0.0/33]}",
            "transport.allowed_ips: not an IP address or CIDR network: '10.0.0.0/33'",
        ),
        (
            "{tcp_listen: 0.0.0.0:5001, max_connections: 0}",
            "transport.max_connections: Input should be greater than or equal to 1",
        ),
        (
            "{tcp_connect: 10.0.0.8:5001, reconnect_initial_s: 120}",
            "transport.reconnect_max_s: must be >= reconnect_initial_s (120)",
        ),
        (
            "{serial: ttyUSB0}",
            "transport.serial: expected a device path such as /dev/serial/by-id/... or"
            " socket://host:port, got 'ttyUSB0'",
        ),
        (
            '{serial: "rfc2217://10.0.0.9:4001"}',
            "transport.serial: unsupported URL scheme 'rfc2217': give a device path or"
            " socket://host:port",
        ),
        (
            '{serial: "socket://10.0.0.9"}',
            "transport.serial: expected 'host:port', got '10.0.0.9'",
        ),
        ("{tcp_connect: 10.0.0.8:99999}", "transport.tcp_connect: port must be 1..65535"),
        ("{serial: /dev/ttyS0, baud: 9600}", "transport.baud: unknown setting"),
    ],
)
def test_config_errors_name_the_setting(transport: str, expected: str) -> None:
    assert problems(transport) == [expected]


# -- backoff ---------------------------------------------------------------------------


def test_reconnect_delay_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 200):
        nominal = min(60.0, 1.0 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = reconnect_delay(attempt, 1.0, 60.0, rng)
            assert nominal / 2 <= delay <= nominal
    assert reconnect_delay(10_000, 1.0, 60.0, rng) <= 60.0  # no overflow far out


class Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_reconnect_delay_is_a_function_of_the_random_draw() -> None:
    assert reconnect_delay(1, 2.0, 60.0, Fixed(0.0)) == 1.0
    assert reconnect_delay(3, 2.0, 60.0, Fixed(0.0)) == 4.0
    assert reconnect_delay(3, 2.0, 60.0, Fixed(0.999999)) == pytest.approx(8.0)
    assert reconnect_delay(9, 2.0, 60.0, Fixed(0.5)) == 45.0
    delays = {reconnect_delay(4, 1.0, 60.0, random.Random(seed)) for seed in range(50)}
    assert len(delays) == 50  # analyzers cut off together do not retry in step


# -- serial ----------------------------------------------------------------------------


async def test_serial_exchanges_bytes_both_ways(tmp_path: Path) -> None:
    handler = Echo(greeting=b"HELLO\r\n")
    with socat_pty_pair(tmp_path) as (a, b, _):
        peer = open_peer(b)  # before the gateway writes: opening flushes the input
        try:
            async with Transport(settings(serial=str(a)), "analyzer", handler) as transport:
                assert await asyncio.to_thread(peer.read, 7) == b"HELLO\r\n"
                assert transport.connected
                assert isinstance(handler.lines[0], SerialLine)
                assert handler.lines[0].peer == str(a)
                for chunk in (b"\x05", b"\x021H|\\^&|||\r\x0312\r\n", bytes(range(256))):
                    assert await peer_exchange(peer, chunk) == chunk
                status = transport.status()
                assert (status.kind, status.connected, status.peers) == ("serial", True, (str(a),))
        finally:
            peer.close()
    assert handler.ended  # the handler saw the end of its line at shutdown


async def test_serial_large_transfer_is_intact(tmp_path: Path) -> None:
    payload = random.Random(1).randbytes(64 * 1024)
    handler = Echo()
    with socat_pty_pair(tmp_path) as (a, b, _):
        # generous: on a loaded 2-core machine 64 kB through two ptys and back can take
        # seconds, and a short read would look like corruption
        peer = open_peer(b, timeout_s=30.0)
        try:
            async with Transport(settings(serial=str(a)), "analyzer", handler):
                await wait_until(lambda: handler.lines, "the line to open")
                back = await peer_exchange(peer, payload)
                assert len(back) == len(payload)
                assert back == payload
        finally:
            peer.close()


async def test_serial_line_settings_are_applied_and_the_port_is_exclusive(
    tmp_path: Path,
) -> None:
    handler = Echo()
    line_settings = {"baudrate": 19200, "bytesize": 7, "parity": "E", "stopbits": 2}
    with socat_pty_pair(tmp_path) as (a, _, _):
        cfg = settings(serial=str(a), rtscts=True, **line_settings)
        async with Transport(cfg, "analyzer", handler):
            await wait_until(lambda: handler.lines, "the line to open")
            line = handler.lines[0]
            assert isinstance(line, SerialLine)
            port = line.serial
            assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (19200, 7, "E", 2)
            assert (port.rtscts, port.xonxoff, port.exclusive) == (True, False, True)
            # what the kernel holds (a pty keeps CS8 and no parity whatever it is told)
            fd = os.open(a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                _, _, cflag, _, ispeed, ospeed, cc = termios.tcgetattr(fd)
            finally:
                os.close(fd)
            assert ispeed == ospeed == termios.B19200
            assert cflag & termios.CSTOPB and cflag & termios.CRTSCTS
            assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)
            with pytest.raises(serial.SerialException, match="exclusively lock"):
                serial.Serial(str(a), exclusive=True)


async def test_serial_loss_is_logged_once_and_the_line_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    handler = Echo()
    with socat_pty_pair(tmp_path) as (a, b, pid):
        peer = open_peer(b)
        try:
            async with Transport(settings(serial=str(a)), "analyzer", handler) as transport:
                await wait_until(lambda: handler.lines, "the line to open")
                assert await peer_exchange(peer, b"before") == b"before"
                os.kill(pid, signal.SIGTERM)  # the cable is pulled: links go, pty hangs up
                await wait_until(lambda: handler.ended, "the handler to see the end")
                await wait_until(lambda: len(logged(caplog, "transport.retry")) >= 3, "retries")
                assert len(logged(caplog, "transport.lost")) == 1
                lost = logged(caplog, "transport.lost")[0]
                assert lost.levelno == logging.WARNING
                assert f"name=analyzer peer={a} error=" in lost.getMessage()
                assert not transport.connected
                assert transport.status().error
                peer.close()

                with socat_pty_pair(tmp_path) as (a2, b2, _):  # plugged back, same names
                    assert a2 == a
                    await wait_until(lambda: len(handler.lines) == 2, "the line to reopen")
                    peer = open_peer(b2)
                    assert await peer_exchange(peer, b"after") == b"after"
                    assert len(logged(caplog, "transport.lost")) == 1
                    connected = logged(caplog, "transport.connected")
                    assert len(connected) == 2  # at start and once back
                    assert connected[1].levelno == logging.INFO
                    assert transport.status().connected  # (a fresh look for mypy)
        finally:
            peer.close()


async def test_serial_device_missing_at_start_is_retried_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    handler = Echo()
    path = tmp_path / "ttyA"
    async with Transport(settings(serial=str(path)), "analyzer", handler) as transport:
        assert "transport:analyzer" in {t.get_name() for t in asyncio.all_tasks()}
        await wait_until(lambda: len(logged(caplog, "transport.retry")) >= 3, "retries")
        assert len(logged(caplog, "transport.lost")) == 1
        status = transport.status()
        assert not status.connected
        assert status.error is not None and "No such file" in status.error
        assert status.since is not None and status.since.tzinfo is not None
        with socat_pty_pair(tmp_path) as (a, b, _):
            assert a == path
            await wait_until(lambda: handler.lines, "the line to open")
            peer = open_peer(b)
            try:
                assert await peer_exchange(peer, b"late") == b"late"
            finally:
                peer.close()
            assert len(logged(caplog, "transport.connected")) == 1
            assert len(logged(caplog, "transport.lost")) == 1


async def test_serial_write_to_a_peer_that_never_reads_is_bounded(tmp_path: Path) -> None:
    outcome: list[BaseException] = []

    async def flood(line: Line) -> None:
        try:
            await line.write(b"x" * 512 * 1024)
        except ConnectionError as err:
            outcome.append(err)

    cfg = settings(serial=str(tmp_path / "ttyA"), baudrate=4_000_000, write_timeout_s=0.2)
    with socat_pty_pair(tmp_path) as (_, b, _):
        peer = open_peer(b)  # open, never read
        try:
            started = time.monotonic()
            async with Transport(cfg, "analyzer", flood):
                await wait_until(lambda: outcome, "the write to fail", timeout_s=4.0)
            assert time.monotonic() - started < 4.0
        finally:
            peer.close()
    assert "write not done within" in str(outcome[0])


# -- TCP: connecting out (tcp_connect and socket://) -----------------------------------


class Analyzer:
    """A TCP analyzer that reads the gateway's greeting, sends ``ping``, checks the echo."""

    def __init__(self) -> None:
        self.results: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            greeting = await reader.readexactly(7)
            writer.write(b"ping")
            await writer.drain()
            self.results.put_nowait((greeting, await reader.readexactly(4)))
            await reader.read()  # hold the connection until either side closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def connect_settings(kind: str, port: int, **values: Any) -> TransportSettings:
    if kind == "socket":
        return settings(serial=f"socket://127.0.0.1:{port}", **values)
    return settings(tcp_connect=f"127.0.0.1:{port}", **values)


@pytest.mark.parametrize("kind", ["socket", "tcp_connect"])
async def test_connect_reconnects_when_the_analyzer_restarts(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    analyzer = Analyzer()
    await analyzer.start()
    handler = Echo(greeting=b"HELLO\r\n")
    cfg = connect_settings(kind, analyzer.port)
    async with Transport(cfg, "analyzer", handler) as transport:
        assert await asyncio.wait_for(analyzer.results.get(), 3) == (b"HELLO\r\n", b"ping")
        line = handler.lines[0]
        assert isinstance(line, StreamLine)
        assert line.peer == cfg.target
        sock = line.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)

        await analyzer.stop()  # power cycle: connection reset, then refused for a while
        await wait_until(lambda: handler.ended, "the handler to see the end")
        await wait_until(lambda: len(logged(caplog, "transport.retry")) >= 3, "retries")
        assert len(logged(caplog, "transport.lost")) == 1
        assert not transport.connected

        await analyzer.start()
        assert await asyncio.wait_for(analyzer.results.get(), 3) == (b"HELLO\r\n", b"ping")
        assert len(logged(caplog, "transport.connected")) == 2
        assert len(logged(caplog, "transport.lost")) == 1
        assert transport.status().connected  # (a fresh look for mypy)
    await analyzer.stop()


async def test_a_failing_handler_is_logged_and_the_line_reopened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    analyzer = Analyzer()
    await analyzer.start()
    echo = Echo(greeting=b"HELLO\r\n")
    calls = 0

    async def handler(line: Line) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("session bug")
        await echo(line)

    async with Transport(connect_settings("tcp_connect", analyzer.port), "analyzer", handler):
        assert await asyncio.wait_for(analyzer.results.get(), 3) == (b"HELLO\r\n", b"ping")
    failed = logged(caplog, "transport.handler_failed")
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert len(logged(caplog, "transport.closed")) == 1
    assert len(logged(caplog, "transport.connected")) == 2
    await analyzer.stop()


async def test_tcp_write_to_a_peer_that_never_reads_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    release = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    outcome: list[BaseException] = []

    async def flood(line: Line) -> None:
        try:
            await line.write(b"x" * 32 * 1024 * 1024)
        except ConnectionError as err:
            outcome.append(err)
            raise  # the line's end, not a handler failure

    try:
        cfg = settings(tcp_connect=f"127.0.0.1:{port}", write_timeout_s=0.2)
        async with Transport(cfg, "analyzer", flood):
            await wait_until(lambda: logged(caplog, "transport.lost"), "the line to be lost")
        assert "write not drained within 0.2 s" in str(outcome[0])
        assert "write not drained within 0.2 s" in logged(caplog, "transport.lost")[0].getMessage()
        assert not logged(caplog, "transport.handler_failed")
    finally:
        release.set()
        server.close()
        await server.wait_closed()


# -- TCP: analyzers connecting in (tcp_listen) ---------------------------------------


def listen_settings(**values: Any) -> TransportSettings:
    return settings(tcp_listen=Endpoint("127.0.0.1", 0), **values)


async def client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def roundtrip(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes, size: int = 0
) -> bytes:
    """Send ``data``; read ``size`` bytes back (``len(data)`` by default)."""
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(size or len(data)), 3)


async def test_listen_serves_concurrent_analyzers_each_with_its_own_handler() -> None:
    both = asyncio.Event()
    lines: list[Line] = []

    async def handler(line: Line) -> None:
        lines.append(line)
        if len(lines) == 2:
            both.set()
        await both.wait()  # neither is served until both are connected: concurrency
        while data := await line.read():
            await line.write(line.peer.encode() + b" " + data)

    async with Transport(listen_settings(), "analyzer", handler) as transport:
        assert transport.port > 0
        first, second = await client(transport.port), await client(transport.port)
        await wait_until(lambda: len(lines) == 2, "two handlers")
        assert lines[0] is not lines[1] and lines[0].peer != lines[1].peer
        names = [c[1].get_extra_info("sockname") for c in (first, second)]
        for (host, port), conn in zip(names, (first, second), strict=True):
            expected = f"{host}:{port} R|1".encode()
            assert await roundtrip(conn, b"R|1", len(expected)) == expected
        assert transport.status().peers == tuple(sorted(line.peer for line in lines))
        for _, writer in (first, second):
            writer.close()
        await wait_until(lambda: not transport.connected, "both lines to close")


async def test_listen_refuses_connections_beyond_max_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    handler = Echo()
    async with Transport(listen_settings(max_connections=2), "analyzer", handler) as transport:
        conns = [await client(transport.port), await client(transport.port)]
        for conn in conns:
            assert await roundtrip(conn, b"ok") == b"ok"
        reader, writer = await client(transport.port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed at once
        writer.close()
        assert len(logged(caplog, "transport.refused")) == 1
        assert len(handler.lines) == 2

        conns[0][1].close()
        await wait_until(lambda: len(transport.status().peers) == 1, "one line to close")
        again = await client(transport.port)
        assert await roundtrip(again, b"back") == b"back"
        for _, w in (conns[1], again):
            w.close()


async def test_listen_closes_peers_outside_allowed_ips_before_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    handler = Echo()
    async with Transport(
        listen_settings(allowed_ips=("192.168.7.0/24",)), "analyzer", handler
    ) as transport:
        reader, writer = await client(transport.port)
        writer.write(b"\x05")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, nothing answered
        writer.close()
        assert [r.getMessage() for r in logged(caplog, "transport.refused")] == [
            f"transport.refused name=analyzer peer={writer.get_extra_info('sockname')[0]}:"
            f"{writer.get_extra_info('sockname')[1]} reason=address not allowed"
        ]
        assert handler.lines == []
    async with Transport(
        listen_settings(allowed_ips=("192.168.7.0/24", "127.0.0.1")), "analyzer", handler
    ) as transport:
        conn = await client(transport.port)
        assert await roundtrip(conn, b"ok") == b"ok"
        conn[1].close()


async def test_exit_closes_lines_then_cancels_handlers_that_do_not_return() -> None:
    outcomes: list[str] = []
    calls = 0

    async def handler(line: Line) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # reads its line
            while await line.read():
                pass
            outcomes.append("saw the end")
            return
        try:
            await asyncio.Event().wait()  # ignores its line
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise

    transport = Transport(listen_settings(), "analyzer", handler, drain_timeout_s=0.3)
    async with transport:
        first = await client(transport.port)
        await wait_until(lambda: transport.connected, "the first line")
        second = await client(transport.port)
        await wait_until(lambda: len(transport.status().peers) == 2, "the second line")
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert sorted(outcomes) == ["cancelled", "saw the end"]
    for reader, writer in (first, second):
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    assert not transport.connected


async def test_handlers_of_a_listening_transport_get_stream_lines() -> None:
    seen: list[Line] = []

    async def handler(line: Line) -> None:
        seen.append(line)
        await line.aclose()
        assert await line.read() == b""
        with pytest.raises(ConnectionError):
            await line.write(b"late")

    async with Transport(listen_settings(), "analyzer", handler) as transport:
        reader, writer = await client(transport.port)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    assert isinstance(seen[0], StreamLine)
    sock = seen[0].get_extra_info("socket")
    assert sock is None or sock.fileno() == -1  # closed
