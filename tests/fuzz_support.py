"""The fuzz tests' bench: a gateway in a background thread, and wire framing written by hand.

The gateway runs in-process on its own event loop in a thread, so that the tests
can talk to it with plain blocking sockets (and hypothesis can drive them
synchronously). Every frame the tests send is built here in a few lines from the
standards (MLLP: HL7 v2.5.1 Appendix C; ASTM E1381 frames; DICOM PS3.8 section 9
PDUs), never with the product's own codecs, so a bug in the product cannot hide
behind the same bug in the test.

Tracebacks the product logs (its ``gateway``, ``drivers`` and ``dicom`` loggers,
and asyncio's "unhandled exception in a task or callback") are collected: a fuzz
test fails on any, because an input the gateway handled on purpose is a one-line
log, not a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import TracebackType

from gateway.config import parse_config
from gateway.registry import default_registry
from gateway.service import Gateway

PRODUCT_LOGGERS = ("gateway", "drivers", "dicom", "asyncio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``check`` (from the test's thread) until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


class TracebackCollector(logging.Handler):
    """Keeps every ERROR record of the product's loggers that carries a traceback, and
    every ERROR of asyncio (an exception nobody handled)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(PRODUCT_LOGGERS):
            return
        if record.exc_info or record.name.startswith("asyncio"):
            self.records.append(record)

    def report(self) -> str:
        return "\n".join(self.format(r) for r in self.records)

    def format(self, record: logging.LogRecord) -> str:
        return logging.Formatter("%(name)s %(levelname)s %(message)s").format(record)


class GatewayThread:
    """The real gateway (``Gateway.run``) on an event loop in a daemon thread.

    ``with GatewayThread(text, state) as gw:`` returns once it is ready (or raises
    its start failure); leaving stops it the way SIGTERM does.
    """

    def __init__(self, config_text: str, config_file: Path) -> None:
        config_file.write_text(config_text, encoding="utf-8")
        self.registry = default_registry()
        self.cfg = parse_config(config_text, self.registry, source=str(config_file))
        self.state = Path(self.cfg.state_dir)
        self.tracebacks = TracebackCollector()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fuzz-gateway", daemon=True)
        self.thread_errors: list[str] = []  # exceptions that ended any thread (pynetdicom's)
        self.tolerated: tuple[str, ...] = ()  # thread deaths known and pinned elsewhere
        self._excepthook = threading.excepthook

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        where = traceback.extract_tb(args.exc_traceback)[-3:] if args.exc_traceback else []
        self.thread_errors.append(
            f"{name}: {args.exc_type.__name__}: {args.exc_value} at "
            + " <- ".join(
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.line}" for f in where[::-1]
            )
        )  # asserted by assert_healthy(), not printed as a pytest warning

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported to the test's thread by running()/__exit__
            self._error = err
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        gw = Gateway(self.cfg, self.registry, drain_grace_s=2)
        self._task = asyncio.create_task(gw.run(self._stop), name="gateway")
        ready = asyncio.create_task(gw.ready.wait())
        await asyncio.wait({self._task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if gw.ready.is_set():
            self._ready.set()
        else:
            ready.cancel()
        await self._task

    def __enter__(self) -> GatewayThread:
        logging.getLogger().addHandler(self.tracebacks)
        threading.excepthook = self._thread_died
        self._thread.start()
        if not self._ready.wait(20):
            raise AssertionError("the gateway did not become ready in 20 s")
        if self._error is not None or not self.running():
            raise AssertionError(f"the gateway did not start: {self._error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._loop is not None and self._stop is not None and self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
            assert not self._thread.is_alive(), "the gateway did not stop within 30 s"
        finally:
            logging.getLogger().removeHandler(self.tracebacks)
            threading.excepthook = self._excepthook
        if exc is None:
            assert self._error is None, f"the gateway failed: {self._error!r}"

    def running(self) -> bool:
        """The service is up: its thread alive and ``Gateway.run`` not returned."""
        return (
            self._thread.is_alive()
            and self._task is not None
            and not self._task.done()
            and self._error is None
        )

    def assert_healthy(self) -> None:
        assert self.running(), f"the gateway stopped: {self._error!r}"
        died = [e for e in self.thread_errors if not any(t in e for t in self.tolerated)]
        assert not died, f"threads died: {died}"
        assert not self.tracebacks.records, (
            "the gateway logged tracebacks:\n" + self.tracebacks.report()
        )

    # -- the journal, read-only beside the running gateway ------------------------------

    @contextmanager
    def journal(self) -> Iterator[sqlite3.Connection]:
        uri = f"file:{self.state / 'journal.sqlite'}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
            yield conn

    def count(self, table: str) -> int:
        with self.journal() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def folder_bodies(folder: Path, suffix: str) -> set[bytes]:
    """The bytes of every delivered file (``*.suffix``; files being written are hidden)."""
    if not folder.is_dir():
        return set()
    return {p.read_bytes() for p in folder.glob(f"*.{suffix}")}


def connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    """A blocking loopback connection whose every recv/send gives up after ``timeout_s``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send; False when the peer has closed or reset the connection (allowed for junk)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_some(sock: socket.socket, quiet_s: float, limit_s: float = 5.0) -> bytes:
    """What arrives until the line has been quiet ``quiet_s`` (or closed, or ``limit_s``)."""
    got = bytearray()
    deadline = time.monotonic() + limit_s
    previous = sock.gettimeout()
    sock.settimeout(quiet_s)
    try:
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
    finally:
        sock.settimeout(previous)
    return bytes(got)


# -- MLLP (HL7 v2.5.1 Appendix C) --------------------------------------------------------

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def mllp(message: bytes) -> bytes:
    return VT + message + FS + CR


class MllpReplies:
    """Reply blocks from one connection, read as they come."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    def next(self, timeout_s: float = 10.0) -> bytes | None:
        """The next reply's content; None once the gateway closed the connection."""
        deadline = time.monotonic() + timeout_s
        while True:
            start = self.buf.find(VT)
            end = self.buf.find(FS, start + 1) if start >= 0 else -1
            if end >= 0:
                reply = self.buf[start + 1 : end]
                self.buf = self.buf[end + 1 :].removeprefix(CR)
                return reply
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply in {timeout_s:g} s; unframed: {self.buf!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
            self.buf += data


def msa(reply: bytes) -> tuple[bytes, bytes]:
    """(MSA-1 ack code, MSA-2 control id) of an ACK; fails on anything else."""
    segments = [s for s in reply.split(CR) if s]
    assert segments and segments[0].startswith(b"MSH"), f"reply without MSH: {reply!r}"
    sep = segments[0][3:4]  # an ACK answers in the message's own delimiters (MSH-1)
    assert sep, f"reply without a field separator: {reply!r}"
    found = [s.split(sep) for s in segments if s.startswith(b"MSA" + sep)]
    assert len(found) == 1, f"reply without one MSA: {reply!r}"
    fields = found[0]
    return fields[1], (fields[2] if len(fields) > 2 else b"")


# -- ASTM E1381 frames ------------------------------------------------------------------

STX, ETX, EOT, ENQ, ACK, NAK, ETB, LF = 0x02, 0x03, 0x04, 0x05, 0x06, 0x15, 0x17, 0x0A


def astm_checksum(body: bytes) -> bytes:
    """E1381: the modulo-256 sum of the bytes FN..ETB/ETX, as two upper-case hex digits."""
    return f"{sum(body) % 256:02X}".encode()


def astm_frame(number: int, text: bytes, *, last: bool) -> bytes:
    body = str(number % 8).encode() + text + bytes([ETX if last else ETB])
    return bytes([STX]) + body + astm_checksum(body) + b"\r\n"


def astm_frames(message: bytes, text_size: int = 240) -> list[bytes]:
    """A message cut into frames of at most ``text_size`` text bytes, numbered from 1."""
    chunks = [message[i : i + text_size] for i in range(0, len(message), text_size)]
    return [astm_frame(n, chunk, last=n == len(chunks)) for n, chunk in enumerate(chunks, start=1)]


def astm_texts(capture: bytes) -> bytes:
    """The message text of a captured E1381 session: the frames' texts joined."""
    out = bytearray()
    for part in capture.split(bytes([STX]))[1:]:
        stop = min(i for i in (part.find(bytes([ETX])), part.find(bytes([ETB]))) if i >= 0)
        out += part[1:stop]  # without the frame number
    return bytes(out)


def astm_session(sock: socket.socket, message: bytes, timeout_s: float = 10.0) -> None:
    """Send one message as an instrument does (E1381): ENQ, frames, EOT.

    A NAK to the ENQ (receiver busy) is retried; a NAKed frame is sent again, at
    most six times. Fails when the gateway does not take the message."""
    deadline = time.monotonic() + timeout_s

    def reply() -> int:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(1)
        assert data, "the gateway closed the line during a valid transfer"
        return data[0]

    for _ in range(50):
        sock.sendall(bytes([ENQ]))
        answer = reply()
        if answer == ACK:
            break
        assert answer == NAK, f"ENQ answered {answer:#04x}"
        time.sleep(0.1)
    else:
        raise AssertionError("ENQ refused 50 times")
    for frame in astm_frames(message):
        for _ in range(6):
            sock.sendall(frame)
            answer = reply()
            if answer in (ACK, EOT):  # EOT: a receiver interrupt, which counts as the ACK
                break
            assert answer == NAK, f"frame answered {answer:#04x}: {frame!r}"
        else:
            raise AssertionError(f"frame NAKed six times: {frame!r}")
    sock.sendall(bytes([EOT]))


# -- DICOM upper layer PDUs (PS3.8 section 9.3) -------------------------------------------

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"


def pdu_item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value) & 0xFFFF) + value


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte length (``length`` overrides the true one)."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def associate_rq(
    called: bytes = b"MEDGW",
    calling: bytes = b"FUZZ",
    *,
    version: int = 1,
    context: bytes = APPLICATION_CONTEXT,
    abstract: bytes = VERIFICATION,
    transfer: bytes = IMPLICIT_LE,
    context_id: int = 1,
    max_length: int = 16384,
    extra_items: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ body (PS3.8 9.3.2), each field given as the test wants it."""
    presentation = pdu_item(
        0x20,
        bytes([context_id, 0, 0, 0]) + pdu_item(0x30, abstract) + pdu_item(0x40, transfer),
    )
    user = pdu_item(0x50, pdu_item(0x51, struct.pack(">L", max_length & 0xFFFFFFFF)))
    return (
        struct.pack(">HH", version & 0xFFFF, 0)
        + called[:16].ljust(16)
        + calling[:16].ljust(16)
        + bytes(32)
        + pdu_item(0x10, context)
        + presentation
        + extra_items
        + user
    )
