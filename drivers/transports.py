"""Byte transports, the layer below the analyzer sessions: serial ports, serial-over-IP, TCP.

A :class:`Transport` keeps the line(s) of one analyzer open and hands each one, as
a :class:`Line`, to the protocol session's handler (the ASTM or HL7 session; they
alone write to a line). ``transport:`` in an analyzer listener's config names
exactly one of::

    transport: {serial: /dev/serial/by-id/usb-FTDI-if00, baudrate: 9600, parity: N}
    transport: {serial: "socket://10.0.0.9:4001"}   # serial-over-IP box, we connect
    transport: {tcp_listen: 0.0.0.0:5001}           # the analyzer connects to us
    transport: {tcp_connect: 10.0.0.8:5001}         # we connect to the analyzer

Serial ports are opened and configured by pyserial (its parameter names, termios,
``exclusive`` lock) and then read and written without blocking on the file
descriptor, woken by the event loop: no thread per port. ``socket://`` URLs, which
pyserial serves with a blocking socket of its own, are opened here as an asyncio
TCP connection instead: the same code path as ``tcp_connect``, with its
non-blocking drain, keepalive and EOF handling. POSIX only (the gateway runs on
Linux).

Lines that we open (serial, ``socket://``, ``tcp_connect``) are reopened when they
are lost or their handler returns, after a capped, jittered exponential delay; the
loss is logged once (``transport.lost``) and the return once
(``transport.connected``), not every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import termios
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import serial
from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.allowlist import address_allowed, parse_networks
from gateway.config import Endpoint, EndpointField, Frozen, parse_endpoint

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0  # a TCP close that cannot flush its last bytes is aborted after this
DRAIN_POLL_MAX_S = 0.05
# Linux TCP keepalive: a silently vanished peer (a serial-over-IP box that lost power)
# is noticed after about 60 + 5 * 10 s of silence instead of the kernel's two hours;
# TCP_USER_TIMEOUT does the same for data the peer never acknowledges.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 5

KINDS = ("serial", "tcp_listen", "tcp_connect")
PARITIES = (
    serial.PARITY_NONE,
    serial.PARITY_EVEN,
    serial.PARITY_ODD,
    serial.PARITY_MARK,
    serial.PARITY_SPACE,
)
BYTESIZES = (5, 6, 7, 8)
STOPBITS = (1, 1.5, 2)
LINE_SETTINGS = ("baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff")
_NOT_VALID = object()  # stands for a field that failed its own validation


# -- configuration ---------------------------------------------------------------------


def _socket_endpoint(url: str) -> Endpoint:
    rest = url.removeprefix("socket://")
    if not rest or "/" in rest or "?" in rest:
        raise ValueError(f"expected socket://host:port, got {url!r}")
    return parse_endpoint(rest)


def _whole(value: object) -> int | None:
    """An int that is not a bool, else None (YAML ``true`` is not a baud rate)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TransportSettings(Frozen):
    """The ``transport:`` section of an analyzer listener.

    ``serial`` is a device path (prefer the stable ``/dev/serial/by-id/...``) or a
    ``socket://host:port`` URL; the line settings use pyserial's names and values
    and are allowed only with a device path. ``baudrate`` may be any positive rate
    the adapter supports, not only the standard list. ``max_connections`` bounds
    the analyzers served at once with ``tcp_listen``, ``allowed_ips`` who may connect
    there (addresses or CIDR networks; empty: anyone). ``write_timeout_s`` bounds a
    write (plus, on a serial port, the time the bytes take on the wire).
    """

    serial: str | None = None
    tcp_listen: EndpointField | None = None
    tcp_connect: EndpointField | None = None
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # field names shadow the module here: pyserial's PARITY_NONE
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    max_connections: int = Field(default=4, ge=1)
    allowed_ips: tuple[str, ...] = ()
    reconnect_initial_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0, validate_default=True)
    write_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and sum(data.get(k) is not None for k in KINDS) != 1:
            raise ValueError("give exactly one of serial, tcp_listen, tcp_connect")
        return data

    @field_validator("serial")
    @classmethod
    def _serial(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        scheme, sep, _ = value.partition("://")
        if sep:
            if scheme != "socket":
                raise ValueError(
                    f"unsupported URL scheme {scheme!r}: give a device path or socket://host:port"
                )
            _socket_endpoint(value)
        elif not value.startswith("/"):
            raise ValueError(
                "expected a device path such as /dev/serial/by-id/... or socket://host:port,"
                f" got {value!r}"
            )
        return value

    @field_validator("baudrate", mode="before")
    @classmethod
    def _baudrate(cls, value: object) -> int:
        rate = _whole(value)
        if rate is None or rate <= 0:
            raise ValueError("must be a positive whole number of bits per second, e.g. 9600")
        return rate

    @field_validator("bytesize", mode="before")
    @classmethod
    def _bytesize(cls, value: object) -> int:
        size = _whole(value)
        if size not in BYTESIZES:
            raise ValueError("must be one of 5, 6, 7, 8")
        return size

    @field_validator("parity", mode="before")
    @classmethod
    def _parity(cls, value: object) -> str:
        if isinstance(value, str) and value.upper() in PARITIES:
            return value.upper()
        raise ValueError("must be one of N, E, O, M, S")

    @field_validator("stopbits", mode="before")
    @classmethod
    def _stopbits(cls, value: object) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and value in STOPBITS:
            return value
        raise ValueError("must be one of 1, 1.5, 2")

    @field_validator(*LINE_SETTINGS)
    @classmethod
    def _only_serial(cls, value: object, info: ValidationInfo) -> object:
        # runs only for settings given in the file (defaults are not validated)
        port = info.data.get("serial", _NOT_VALID)
        if port is None:
            raise ValueError("only allowed with serial")
        if isinstance(port, str) and port.startswith("socket://"):
            raise ValueError("has no effect with socket:// (set it on the serial-over-IP box)")
        return value

    @field_validator("max_connections")
    @classmethod
    def _only_listen(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("tcp_listen", _NOT_VALID) is None:
            raise ValueError("only allowed with tcp_listen")
        return value

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if value and info.data.get("tcp_listen", _NOT_VALID) is None:
            raise ValueError("only allowed with tcp_listen")
        parse_networks(value)
        return value

    @field_validator("reconnect_max_s")
    @classmethod
    def _max_after_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("reconnect_initial_s")
        if isinstance(initial, int | float) and value < initial:
            raise ValueError(f"must be >= reconnect_initial_s ({initial:g})")
        return value

    @property
    def kind(self) -> Literal["serial", "socket", "tcp_listen", "tcp_connect"]:
        if self.serial is not None:
            return "socket" if self.serial.startswith("socket://") else "serial"
        return "tcp_listen" if self.tcp_listen is not None else "tcp_connect"

    @property
    def target(self) -> str:
        """What the config names: the device path, URL or address (the ``peer`` of logs)."""
        if self.serial is not None:
            return self.serial
        return str(self.tcp_listen or self.tcp_connect)

    @property
    def connect_to(self) -> Endpoint | None:
        """The address we connect to (``tcp_connect`` or a ``socket://`` URL), else None."""
        if self.serial is not None and self.serial.startswith("socket://"):
            return _socket_endpoint(self.serial)
        return self.tcp_connect


def reconnect_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """The wait before reconnect ``attempt`` (1, 2, ...): capped exponential with jitter.

    ``d = min(max_s, initial_s * 2 ** (attempt - 1))``; the result is uniform in
    ``[d / 2, d]``, so that analyzers cut off together do not come back in step.
    """
    d = min(max_s, initial_s * 2.0 ** max(0, min(attempt - 1, 62)))
    return d * (0.5 + rng.random() / 2)


# -- lines -----------------------------------------------------------------------------


class Line(Protocol):
    """One open byte stream to one analyzer, as a protocol session sees it.

    ``read`` returns the next bytes available (one or more), or ``b""`` for ever
    once the line is gone (EOF, device unplugged, connection reset, closed);
    ``write`` returns when all bytes are written and drained, and raises
    :class:`ConnectionError` when the line is gone or the write timed out (the line
    is then closed). One reader at a time; writes may run alongside the reader.
    """

    peer: str

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


class StreamLine:
    """A TCP connection (``tcp_listen``, ``tcp_connect``, ``socket://``) as a :class:`Line`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        write_timeout_s: float,
    ) -> None:
        self.peer = peer
        self.error: str | None = None  # why the line was lost; None while up or closed by us
        self._reader = reader
        self._writer = writer
        self._write_timeout_s = write_timeout_s
        self._write_lock = asyncio.Lock()
        self._gone = False

    def get_extra_info(self, name: str) -> Any:
        """The transport's ``get_extra_info`` (``socket``, ``peername``...), for diagnostics."""
        return self._writer.get_extra_info(name)

    def _lost(self, reason: str) -> None:
        if not self._gone:
            self._gone = True
            self.error = reason
            self._writer.transport.abort()

    def _why(self) -> str:
        return f"{self.peer}: {self.error or 'line closed'}"

    async def read(self) -> bytes:
        if self._gone:
            return b""
        try:
            data = await self._reader.read(READ_SIZE)
        except OSError as err:  # reset by the peer
            self._lost(_describe(err))
            return b""
        if not data:
            self._lost("closed by the peer")
        return data

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._gone:
                raise ConnectionError(self._why())
            try:
                self._writer.write(data)
                async with asyncio.timeout(self._write_timeout_s):
                    await self._writer.drain()
            except TimeoutError as err:
                self._lost(f"write not drained within {self._write_timeout_s:g} s")
                raise ConnectionError(self._why()) from err
            except OSError as err:
                self._lost(_describe(err))
                raise ConnectionError(self._why()) from err

    async def aclose(self) -> None:
        """Close, flushing what is buffered for up to CLOSE_TIMEOUT_S, then abort."""
        self._gone = True
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except OSError:
            pass  # reset while closing: closed all the same


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SerialLine:
    """A serial port as a :class:`Line`: non-blocking reads and writes on the port's
    file descriptor, woken by ``loop.add_reader`` / ``add_writer``.

    ``serial`` is the open pyserial port (its settings are what was applied).
    ``write`` returns once the kernel reports its output queue empty (``TIOCOUTQ``),
    so a protocol timer started after a write does not count transmission time;
    its deadline is ``write_timeout_s`` plus the bytes' time on the wire.
    """

    def __init__(self, port: serial.Serial, peer: str, write_timeout_s: float) -> None:
        self.peer = peer
        self.serial = port
        self.error: str | None = None
        self._fd = port.fileno()
        self._loop = asyncio.get_running_loop()
        self._write_timeout_s = write_timeout_s
        parity_bits = 0 if port.parity == serial.PARITY_NONE else 1
        self._char_s = (1 + port.bytesize + parity_bits + port.stopbits) / port.baudrate
        self._waiters: set[asyncio.Future[None]] = set()
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._gone = False

    @classmethod
    async def open(cls, settings: TransportSettings) -> SerialLine:
        """Open and configure the port; OSError (pyserial's SerialException) if it cannot."""
        assert settings.serial is not None
        try:
            port = serial.serial_for_url(
                settings.serial,
                baudrate=settings.baudrate,
                bytesize=settings.bytesize,
                parity=settings.parity,
                stopbits=settings.stopbits,
                rtscts=settings.rtscts,
                xonxoff=settings.xonxoff,
                timeout=0,
                write_timeout=0,
                exclusive=True,  # flock: a second process gets an error, not half the bytes
            )
        except ValueError as err:  # a setting this adapter refuses (an unusual baud rate)
            raise OSError(f"cannot configure {settings.serial}: {err}") from err
        try:
            fd = port.fileno()
            os.set_blocking(fd, False)
            # pyserial leaves VMIN = VTIME = 0, where an empty read means "no data yet";
            # with VMIN = 1 it raises EAGAIN instead, and an empty read means hang-up.
            attrs = termios.tcgetattr(fd)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (OSError, termios.error) as err:
            port.close()
            raise OSError(f"cannot configure {settings.serial}: {err}") from err
        return cls(port, settings.serial, settings.write_timeout_s)

    def _shut(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for fut in self._waiters:
            _wake(fut)
        with contextlib.suppress(OSError, termios.error):
            # drop unsent output: the last close of a tty otherwise waits for it to drain
            self.serial.reset_output_buffer()
        with contextlib.suppress(OSError, termios.error):
            self.serial.close()

    def _lost(self, reason: str) -> None:
        if not self._gone:
            self.error = reason
            self._shut()

    def _why(self) -> str:
        return f"{self.peer}: {self.error or 'line closed'}"

    async def _ready(self, writable: bool) -> None:
        fut = self._loop.create_future()
        if writable:
            self._loop.add_writer(self._fd, _wake, fut)
        else:
            self._loop.add_reader(self._fd, _wake, fut)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            # once closed, the descriptor's number may already belong to another port
            if not self._gone:
                if writable:
                    self._loop.remove_writer(self._fd)
                else:
                    self._loop.remove_reader(self._fd)

    async def read(self) -> bytes:
        async with self._read_lock:
            while not self._gone:
                try:
                    data = os.read(self._fd, READ_SIZE)
                except BlockingIOError:
                    await self._ready(writable=False)
                    continue
                except OSError as err:  # EIO: unplugged, or a pty whose other end closed
                    self._lost(_describe(err))
                    break
                if data:
                    return data
                self._lost("hang-up: the device returned no data")
            return b""

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            budget = self._write_timeout_s + len(data) * self._char_s
            try:
                async with asyncio.timeout(budget):
                    await self._write_all(memoryview(data))
                    await self._drain()
            except TimeoutError as err:
                self._lost(f"write not done within {budget:.3g} s")
                raise ConnectionError(self._why()) from err

    async def _write_all(self, view: memoryview) -> None:
        while view:
            if self._gone:
                raise ConnectionError(self._why())
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                await self._ready(writable=True)
                continue
            except OSError as err:
                self._lost(_describe(err))
                raise ConnectionError(self._why()) from err
            view = view[n:]

    async def _drain(self) -> None:
        while not self._gone:
            try:
                pending = self.serial.out_waiting
            except OSError:
                return  # no TIOCOUTQ here: the kernel has the bytes, that is all we can know
            if pending <= 0:
                return
            await asyncio.sleep(min(DRAIN_POLL_MAX_S, max(0.001, pending * self._char_s)))
        raise ConnectionError(self._why())

    async def aclose(self) -> None:
        self._shut()


# -- the transport ---------------------------------------------------------------------


Handler = Callable[[Line], Awaitable[None]]
_AnyLine = SerialLine | StreamLine


def _tune_socket(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    user_timeout_ms = (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT) * 1000
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", user_timeout_ms),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def _open_line(s: TransportSettings) -> _AnyLine:
    address = s.connect_to
    if address is None:
        return await SerialLine.open(s)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, limit=READ_SIZE
            )
    except TimeoutError as err:
        raise TimeoutError(f"no connection within {CONNECT_TIMEOUT_S:g} s") from err
    _tune_socket(writer)
    return StreamLine(reader, writer, s.target, s.write_timeout_s)


async def open_line(settings: TransportSettings) -> Line:
    """Open one line now, once (serial, ``socket://`` or ``tcp_connect``), for tools
    such as ``medgw astm replay``; a ``tcp_listen`` transport waits for one analyzer."""
    if settings.kind != "tcp_listen":
        return await _open_line(settings)
    assert settings.tcp_listen is not None
    ready: asyncio.Future[Line] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune_socket(writer)
        peername = writer.get_extra_info("peername")
        peer = str(Endpoint(peername[0], peername[1])) if peername else "?"
        line = StreamLine(reader, writer, peer, settings.write_timeout_s)
        if ready.done():
            await line.aclose()
        else:
            ready.set_result(line)

    server = await asyncio.start_server(
        accepted, settings.tcp_listen.host, settings.tcp_listen.port, limit=READ_SIZE
    )
    try:
        return await ready
    finally:
        server.close()


@dataclass(frozen=True, slots=True)
class TransportStatus:
    """For health: whether a line is up, since when, and why not."""

    kind: str
    target: str
    connected: bool
    peers: tuple[str, ...]
    since: datetime | None  # when ``connected`` last changed; None before the first try
    error: str | None  # why the line is down (serial, socket://, tcp_connect)


class Transport:
    """Serves the lines of one analyzer to ``handler`` (an async context manager).

    ``tcp_listen``: binds on enter (``port`` is then the bound port) and runs
    ``handler(line)`` for each analyzer that connects, up to ``max_connections``;
    more are closed at once. Otherwise: a named task opens the line, runs
    ``handler(line)``, and when the handler returns or fails, or the line is lost,
    reopens it after :func:`reconnect_delay`. A line is closed when its handler
    returns. On exit: stop accepting and reopening, close the lines (handlers see
    ``b""`` and return), cancel handlers still running after ``drain_timeout_s``,
    close the server.
    """

    def __init__(
        self,
        settings: TransportSettings,
        name: str,
        handler: Handler,
        *,
        drain_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.name = name
        self.port = 0
        self._handler = handler
        self._drain_timeout_s = drain_timeout_s
        self._rng = random.Random()
        self._server: asyncio.Server | None = None
        self._networks = parse_networks(settings.allowed_ips)
        self._lines: set[_AnyLine] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._since: datetime | None = None
        self._error: str | None = None

    @property
    def connected(self) -> bool:
        return bool(self._lines)

    def status(self) -> TransportStatus:
        return TransportStatus(
            kind=self.settings.kind,
            target=self.settings.target,
            connected=self.connected,
            peers=tuple(sorted(line.peer for line in self._lines)),
            since=self._since,
            error=None if self._lines else self._error,
        )

    async def __aenter__(self) -> Transport:
        listen = self.settings.tcp_listen
        if listen is not None:
            self._server = await asyncio.start_server(
                self._accept, listen.host, listen.port, limit=READ_SIZE
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
            self._since = datetime.now(UTC)
            log.info(
                "transport.listening name=%s address=%s max_connections=%d",
                self.name,
                Endpoint(listen.host, self.port),
                self.settings.max_connections,
            )
        else:
            task = asyncio.create_task(self._keep_open(), name=f"transport:{self.name}")
            self._tasks.add(task)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop accepting and reopening; close lines; cancel late handlers; close the server."""
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(line.aclose() for line in list(self._lines)))
        running = [t for t in self._tasks if not t.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=self._drain_timeout_s)
            for task in late:
                log.warning("transport.cancel_handler name=%s task=%s", self.name, task.get_name())
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("transport.stopped name=%s", self.name)

    # -- lines we open -------------------------------------------------------------

    async def _keep_open(self) -> None:
        """Open, serve, reopen, until the transport stops.

        ``attempt`` counts failures since the last line that stayed up for
        ``reconnect_max_s``: a line that opens and drops at once is backed off too.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        attempt = 0
        reported = False  # the current outage has been logged
        while not self._stopping.is_set():
            try:
                line = await self._open()
            except Exception as err:  # OSError expected: SerialException, refused, timeout
                attempt += 1
                self._went_down(_describe(err))
                delay = reconnect_delay(
                    attempt, s.reconnect_initial_s, s.reconnect_max_s, self._rng
                )
                if not reported:
                    reported = True
                    log.warning(
                        "transport.lost name=%s peer=%s error=%s",
                        self.name,
                        s.target,
                        self._error,
                        exc_info=not isinstance(err, OSError),  # a bug: keep its traceback
                    )
                log.debug(
                    "transport.retry name=%s attempt=%d delay=%.3f error=%s",
                    self.name,
                    attempt,
                    delay,
                    self._error,
                )
                await self._pause(delay)
                continue
            if self._stopping.is_set():
                await line.aclose()
                break
            reported = False
            log.info("transport.connected name=%s peer=%s", self.name, line.peer)
            opened = loop.time()
            await self._serve(line)
            if self._stopping.is_set():
                break
            if line.error is not None:
                reported = True
                self._went_down(line.error)
                log.warning(
                    "transport.lost name=%s peer=%s error=%s", self.name, line.peer, line.error
                )
            else:
                self._went_down("closed by the handler")
                log.info("transport.closed name=%s peer=%s", self.name, line.peer)
            # a line that stayed up a while starts the backoff again; a flapping one does not
            attempt = 1 if loop.time() - opened >= s.reconnect_max_s else attempt + 1
            await self._pause(
                reconnect_delay(attempt, s.reconnect_initial_s, s.reconnect_max_s, self._rng)
            )

    async def _open(self) -> _AnyLine:
        return await _open_line(self.settings)

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    def _went_down(self, error: str) -> None:
        if self._error is None or self._since is None:
            self._since = datetime.now(UTC)
        self._error = error

    # -- lines served (both kinds) -------------------------------------------------

    async def _serve(self, line: _AnyLine) -> None:
        """Run the handler on ``line``; close the line when it returns, fails or is cancelled."""
        if not self._lines:
            self._since = datetime.now(UTC)
        self._lines.add(line)
        self._error = None
        try:
            await self._handler(line)
        except Exception as err:
            # a write on a lost or closed line is the line's end, not the handler's fault
            if not (isinstance(err, ConnectionError) and (line.error or self._stopping.is_set())):
                log.exception("transport.handler_failed name=%s peer=%s", self.name, line.peer)
        finally:
            self._lines.discard(line)
            if not self._lines:
                self._since = datetime.now(UTC)
            await line.aclose()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(Endpoint(peername[0], peername[1])) if peername else "?"
        if not address_allowed(peername[0] if peername else "", self._networks):
            log.warning(
                "transport.refused name=%s peer=%s reason=address not allowed", self.name, peer
            )
            writer.transport.abort()
            return
        if self._stopping.is_set() or len(self._lines) >= self.settings.max_connections:
            log.warning(
                "transport.refused name=%s peer=%s connections=%d",
                self.name,
                peer,
                len(self._lines),
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"transport:{self.name}:{peer}")
        self._tasks.add(task)
        _tune_socket(writer)
        line = StreamLine(reader, writer, peer, self.settings.write_timeout_s)
        log.info("transport.connected name=%s peer=%s", self.name, peer)
        try:
            await self._serve(line)
        finally:
            self._tasks.discard(task)
            log.info(
                "transport.disconnected name=%s peer=%s reason=%s",
                self.name,
                peer,
                line.error or "closed",
            )
