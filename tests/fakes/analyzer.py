"""A scripted fake lab analyzer: the *instrument* side of ASTM E1381 / CLSI LIS01-A2.

The peer that end-to-end tests and benchmarks run our gateway (the *computer system*)
against. It is written from the standard, independently of ``drivers.astm``: nothing
here is imported from ``drivers``, so a misreading of E1381 in our link layer is not
repeated here. Section numbers are E1381-02's (LIS01-A2 numbers them 8.x):

* Establishment (6.2): the sender writes ENQ; the receiver answers ACK (6.2.4) or
  NAK when not ready (6.2.5), after which the sender waits at least 10 s before its
  next ENQ (6.2.6). When both sides send ENQ (contention, 6.2.7) the instrument has
  priority (6.2.7.1): the computer system must stop and answer the instrument's
  *next* ENQ, which the instrument sends after waiting at least 1 s (6.2.7.2).
* Transfer (6.3): frames ``STX FN text ETB|ETX C1 C2 CR LF`` (6.3.1). FN is ``1``
  for the first frame after ENQ, then counts modulo 8: 1..7, 0, 1.. (6.3.2). C1 C2
  is the sum of the bytes from FN through ETB/ETX, modulo 256, as two uppercase
  hexadecimal digits (6.3.3). A frame holds at most 247 bytes, so 240 of text; a
  longer text goes in intermediate frames ending ETB and an end frame ending ETX
  (6.3.1.2). Each frame is answered ACK, NAK, or EOT: a receiver interrupt that
  also acknowledges the frame (6.3.4, 6.3.5).
* Termination (6.4): the sender writes EOT; the line is neutral again.
* Errors (6.5): bytes a state does not expect are ignored (6.5.1.2); a frame carrying
  the previous frame's number is a repeat whose ACK was lost, ACKed again and not
  used twice (6.5.1.3); a NAK *or any other reply* makes the sender send the frame
  again, at most 6 attempts, then the message is aborted by EOT (6.5.1.4). Timers:
  15 s for the reply to ENQ (6.5.2.1) or to a frame (6.5.2.2), 30 s for the
  receiver waiting for the next frame (6.5.2.3).

:class:`FakeAnalyzer` runs over any asyncio byte stream: a TCP connection from
:func:`open_tcp_stream` or a serial port (a socat pty in tests) from
:func:`open_serial_stream`, which can pace writes at the real byte time of the baud
rate. :class:`Fault` scripts a misbehaviour; :func:`sample_messages` turns a capture
from ``/work/shared/samples/lab`` into message texts to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, get_args

import serial

STX, ETX, EOT, ENQ, ACK, NAK, ETB = 0x02, 0x03, 0x04, 0x05, 0x06, 0x15, 0x17
CR, LF = 0x0D, 0x0A
FRAME_OVERHEAD = 7  # STX FN ETB|ETX C1 C2 CR LF
BITS_PER_BYTE = 10  # start bit, 8 data bits, stop bit (8N1)
GARBAGE = b"\x00\x7f\xffline noise\r\n"  # no protocol control character in it
NAK_WAIT_S = 10.0  # 6.2.6: after a NAK to ENQ, at least 10 s before the next ENQ
CONTENTION_WAIT_S = 1.0  # 6.2.7.2: the instrument's wait before its next ENQ
MAX_ATTEMPTS = 6  # 6.5.1.4: a frame is sent at most 6 times
_FRAME_END = re.compile(rb"[\x03\x17]")  # ETX or ETB

FaultKind = Literal[
    # the analyzer sending (send_message, send_session; query's upload)
    "bad_checksum", "lowercase_checksum", "repeat_frame", "skip_frame_number",
    "wrong_frame_number", "drop_line_after_frame", "no_eot", "garbage_before_enq",
    "slow_frame", "bare_lf",
    # both: after our EOT when sending; in reply to the host's ENQ when receiving
    "contend",
    # the analyzer receiving (receive_session; query's download)
    "busy", "nak_frame", "interrupt", "slow_ack",
]  # fmt: skip
_ATTEMPT_KINDS = frozenset(
    {"bad_checksum", "lowercase_checksum", "skip_frame_number", "wrong_frame_number",
     "slow_frame", "bare_lf"}
)  # fmt: skip
_RECEIVE_KINDS = frozenset({"contend", "busy", "nak_frame", "interrupt", "slow_ack"})
_SEND_KINDS = frozenset(get_args(FaultKind)) - (_RECEIVE_KINDS - {"contend"})


@dataclass(frozen=True, slots=True)
class Fault:
    """A scripted misbehaviour; what each kind puts on the wire.

    ``frame`` is the 1-based position of a frame in the transfer (not its FN digit);
    ``times`` how many attempts (or repeats, ENQs) it spoils; ``delay_s`` is real
    seconds, never scaled by :attr:`FakeAnalyzer.timescale`; ``data`` is the garbage
    for ``garbage_before_enq`` and the message text sent after winning ``contend``.

    Sending: ``bad_checksum`` C1 C2 off by one; ``lowercase_checksum`` the right
    checksum in lowercase hex; ``skip_frame_number`` FN one ahead (as if a frame
    had been lost); ``wrong_frame_number`` FN four ahead; ``bare_lf`` ``C1 C2 LF``
    without CR; ``slow_frame`` waits ``delay_s`` before the frame (each of these on
    the first ``times`` attempts of frame ``frame``, the retransmission after the
    host's NAK is correct). ``repeat_frame`` sends frame ``frame`` again, same FN and
    bytes, ``times`` times after its ACK (a lost ACK, 6.5.1.3). ``drop_line_after_frame``
    closes the line after the reply to frame ``frame`` (after ``delay_s``): no EOT.
    ``no_eot`` never ends the transfer. ``garbage_before_enq`` writes ``data`` (or
    :data:`GARBAGE`) before the first ENQ. ``contend`` writes ENQ right after the
    EOT, where a host answering a query sends its own (6.2.7); having won the line it
    sends ``data`` as a message (none: ENQ, ACK, EOT).

    Receiving: ``busy`` answers the host's ENQ with NAK ``times`` times (6.2.5);
    ``contend`` answers it with ENQ, waits 1 s, and sends ``data`` as the instrument
    (6.2.7); ``nak_frame`` NAKs the valid frame ``frame`` ``times`` times;
    ``interrupt`` answers frame ``frame`` with EOT (6.3.5); ``slow_ack`` waits
    ``delay_s`` before answering frame ``frame``.
    """

    kind: FaultKind
    frame: int = 1
    times: int = 1
    delay_s: float = 0.0
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.frame < 1 or self.times < 1 or self.delay_s < 0:
            raise ValueError(f"{self}: frame and times start at 1, delay_s is >= 0")


class WireEvent(NamedTuple):
    """One write (``tx``) or one read (``rx``) as it happened, for wire traces."""

    t: float  # the event loop's clock (monotonic seconds)
    direction: Literal["tx", "rx"]
    data: bytes


@dataclass
class SendResult:
    """How one transmission went (ENQ .. EOT, with any ``contend`` transfer)."""

    ok: bool = False
    frames_sent: int = 0  # every frame written: retransmissions and repeats too
    acks: int = 0  # ACK (or interrupting EOT) replies to frames
    naks: int = 0  # NAK replies to frames
    other_replies: int = 0  # other bytes in reply to a frame, taken as NAK (6.5.1.4)
    retransmissions: int = 0  # frames sent again after a refusal
    repeats: int = 0  # frames sent again after their ACK (repeat_frame)
    interrupts: int = 0  # EOT replies to frames (6.3.5), counted in acks as well
    enqs: int = 0
    enq_naks: int = 0
    contentions: int = 0  # ENQ answered by ENQ (6.2.7)
    eot_sent: bool = False  # the transfer was ended (or aborted) by our EOT
    ack_latencies_s: list[float] = field(default_factory=list)  # per frame, to its ACK
    message_ack_s: list[float] = field(default_factory=list)  # each message's last frame
    last_frame_ack_s: float | None = None  # last frame written -> its ACK read
    ignored: bytes = b""  # bytes that were no reply (junk, or sent during our waits)
    aborted: str | None = None


@dataclass
class ReceiveResult:
    """How receiving from the host went (ENQ .. EOT)."""

    records: list[bytes] = field(default_factory=list)  # of complete (H..L) messages
    frames: int = 0  # frames read, good or not
    acks: int = 0
    naks: int = 0
    repeats: int = 0  # frames with the previous FN, ACKed and not used (6.5.1.3)
    rejects: list[str] = field(default_factory=list)  # why each NAKed frame was refused
    busy_naks: int = 0
    contentions: int = 0
    discarded: list[bytes] = field(default_factory=list)  # records of an unfinished message
    ignored: bytes = b""
    aborted: str | None = None


class FakeAnalyzerError(Exception):
    """The host did something that ends the fake's script (the reason is the message)."""


class LineClosed(ConnectionError):
    """The other end closed the line (EOF)."""


def checksum(body: bytes, *, lowercase: bool = False) -> bytes:
    """C1 C2 for ``body`` (FN through ETB/ETX): the sum modulo 256 in hex (6.3.3)."""
    return (b"%02x" if lowercase else b"%02X") % (sum(body) & 0xFF)


def build_frame(number: int, text: bytes, *, final: bool) -> bytes:
    """A correct frame (6.3.1): ``STX FN text ETB|ETX C1 C2 CR LF``."""
    body = b"%d" % (number % 8) + text + bytes([ETX if final else ETB])
    return bytes([STX]) + body + checksum(body) + b"\r\n"


class ByteWriter(Protocol):
    """What the fake needs of a writer: :class:`asyncio.StreamWriter` or :class:`PacedWriter`."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class _Line:
    """Buffered reads with timeouts over a StreamReader, writes with drain, the wire log."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: ByteWriter, log: list[WireEvent] | None
    ) -> None:
        self._reader, self._writer, self._log = reader, writer, log
        self._buffer = bytearray()
        self.closed = False

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def write(self, data: bytes) -> float:
        """Write and drain; returns the time the last byte left (paced: its wire time ended)."""
        if self.closed:
            raise LineClosed("the fake analyzer closed the line")
        self._writer.write(data)
        await self._writer.drain()
        sent = self.now()
        if self._log is not None:
            self._log.append(WireEvent(sent, "tx", data))
        return sent

    async def _fill(self, timeout_s: float) -> bool:
        """Read what arrives within ``timeout_s``; False on timeout, LineClosed on EOF."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                data = await self._reader.read(65536)
        except TimeoutError:
            return False
        if not data:
            raise LineClosed("the host closed the line")
        if self._log is not None:
            self._log.append(WireEvent(self.now(), "rx", data))
        self._buffer += data
        return True

    async def byte(self, timeout_s: float) -> int | None:
        """The next byte, or None if none arrives within ``timeout_s``."""
        if not self._buffer and not await self._fill(timeout_s):
            return None
        value = self._buffer[0]
        del self._buffer[0]
        return value

    async def rest_of_frame(self, timeout_s: float, limit: int) -> bytes:
        """Bytes through the next LF (the STX was read already); a timer for the whole frame."""
        deadline = self.now() + timeout_s
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > limit:
                end = len(self._buffer) - 1  # a runaway frame: hand it over to be NAKed
                break
            if not await self._fill(deadline - self.now()):
                raise TimeoutError(f"no LF ending a frame within {timeout_s} s (6.5.2.3)")
        data = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return data

    async def collect(self, duration_s: float) -> bytes:
        """Everything that arrives during ``duration_s`` (a wait the standard requires)."""
        deadline = self.now() + duration_s
        with contextlib.suppress(LineClosed):
            while self.now() < deadline:
                await self._fill(deadline - self.now())
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


@dataclass(frozen=True, slots=True)
class _Planned:
    text: bytes
    final: bool  # ETX rather than ETB
    message_end: bool  # the last frame of a message


def _as_text(message: Sequence[bytes] | bytes) -> bytes:
    """Records joined with CR, each ending in CR (E1394 records, one per line)."""
    if isinstance(message, bytes | bytearray):
        text = bytes(message)
    else:
        text = b"".join(record.rstrip(b"\r") + b"\r" for record in message)
    if not text:
        raise ValueError("an empty message")
    return text if text.endswith(b"\r") else text + b"\r"


def _accept(faults: Iterable[Fault], kinds: frozenset[str], where: str) -> list[Fault]:
    faults = list(faults)
    for fault in faults:
        if fault.kind not in kinds:
            raise ValueError(f"fault {fault.kind!r} does not apply to {where}()")
    return faults


class FakeAnalyzer:
    """The instrument end of one line, driven by a test's script.

    ``frame_size`` bounds frames both ways (247: E1381; up to 64,000: LIS01-A2 8.3.1);
    ``one_record_per_frame`` ends each record in its own ETX frame, as many analyzers
    do, instead of filling frames; ``reply_timeout_s`` (6.5.2.1-2) and
    ``receive_timeout_s`` (6.5.2.3) are taken as given, while the standard's fixed
    waits (10 s after a NAK to ENQ, 1 s in contention) are multiplied by
    :attr:`timescale` so tests run fast. ``log`` collects :class:`WireEvent` items.
    The last outcomes are kept in :attr:`last_send` and :attr:`last_receive`.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: ByteWriter,
        *,
        frame_size: int = 247,
        reply_timeout_s: float = 15.0,
        receive_timeout_s: float = 30.0,
        one_record_per_frame: bool = False,
        timescale: float = 1.0,
        max_enq_attempts: int = 6,
        log: list[WireEvent] | None = None,
    ) -> None:
        if frame_size <= FRAME_OVERHEAD:
            raise ValueError(f"frame_size {frame_size} leaves no room for text")
        self._line = _Line(reader, writer, log)
        self.frame_size = frame_size
        self.reply_timeout_s = reply_timeout_s
        self.receive_timeout_s = receive_timeout_s
        self.one_record_per_frame = one_record_per_frame
        self.timescale = timescale
        self.max_enq_attempts = max_enq_attempts
        self.last_send: SendResult | None = None
        self.last_receive: ReceiveResult | None = None

    async def __aenter__(self) -> FakeAnalyzer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._line.close()

    # ---- sending (the instrument uploads results or a query) ----

    async def send_message(
        self, records: Sequence[bytes] | bytes, faults: Sequence[Fault] = ()
    ) -> SendResult:
        """One message (records, or its text with CR after each record) in ENQ .. EOT."""
        return await self.send_session([_as_text(records)], faults)

    async def send_session(
        self, messages: Sequence[Sequence[bytes] | bytes], faults: Sequence[Fault] = ()
    ) -> SendResult:
        """Several messages in one ENQ .. EOT; frame numbers run on across them (6.3.2)."""
        faults = _accept(faults, _SEND_KINDS, "send_session")
        result = SendResult()
        self.last_send = result
        frames = [planned for message in messages for planned in self._plan(_as_text(message))]
        try:
            for fault in faults:
                if fault.kind == "garbage_before_enq":
                    for _ in range(fault.times):
                        await self._line.write(fault.data or GARBAGE)
            result.ok = await self._transmit(frames, faults, result)
            for fault in faults:
                if fault.kind == "contend" and result.ok and result.eot_sent:
                    for _ in range(fault.times):  # ENQ right behind our EOT (6.2.7)
                        plan = self._plan(fault.data) if fault.data else []
                        result.ok = result.ok and await self._transmit(plan, (), result)
        except (ConnectionError, OSError) as err:
            result.ok = False
            result.aborted = f"line lost: {err}"
        return result

    def _plan(self, text: bytes) -> list[_Planned]:
        """Frames for one message: text cut every ``frame_size - 7`` bytes (6.3.1.2)."""
        room = self.frame_size - FRAME_OVERHEAD
        if self.one_record_per_frame:
            pieces = [record + b"\r" for record in text.split(b"\r") if record]
        else:
            pieces = [text]
        plan = []
        for piece in pieces:
            chunks = [piece[i : i + room] for i in range(0, len(piece), room)]
            plan += [_Planned(chunk, i == len(chunks) - 1, False) for i, chunk in enumerate(chunks)]
        plan[-1] = _Planned(plan[-1].text, True, True)
        return plan

    async def _transmit(
        self, frames: Sequence[_Planned], faults: Sequence[Fault], result: SendResult
    ) -> bool:
        """Establishment, transfer and termination of ``frames`` (6.2 - 6.4)."""
        if not await self._establish(result):
            return False
        for index, planned in enumerate(frames, start=1):
            if not await self._send_frame(index, planned, faults, result):
                return False
            for fault in faults:
                if fault.frame != index:
                    continue
                if fault.kind == "repeat_frame":
                    again = build_frame(index, planned.text, final=planned.final)
                    for _ in range(fault.times):  # 6.5.1.3: as if our ACK had been lost
                        result.repeats += 1
                        if await self._frame_reply(again, result) is None:
                            return await self._abort(result, f"no reply to repeated frame {index}")
                elif fault.kind == "drop_line_after_frame":
                    await asyncio.sleep(fault.delay_s)
                    await self._line.close()
                    result.aborted = f"line dropped after frame {index} (fault)"
                    return False
        if any(fault.kind == "no_eot" for fault in faults):
            return True
        await self._line.write(bytes([EOT]))  # 6.4
        result.eot_sent = True
        return True

    async def _establish(self, result: SendResult) -> bool:
        """ENQ until ACK: wait after NAK (6.2.6); in contention we go first (6.2.7)."""
        for attempt in range(1, self.max_enq_attempts + 1):
            await self._line.write(bytes([ENQ]))
            result.enqs += 1
            reply = await self._establish_reply(result)
            if reply is None:
                return await self._abort(
                    result, f"no reply to ENQ within {self.reply_timeout_s} s (6.5.2.1)"
                )
            if reply == ACK:
                return True
            if attempt == self.max_enq_attempts:
                break
            if reply == NAK:
                result.enq_naks += 1
                result.ignored += await self._line.collect(NAK_WAIT_S * self.timescale)
            else:  # the host's ENQ: it must yield and answer our next ENQ (6.2.7.1-2)
                result.contentions += 1
                result.ignored += await self._line.collect(CONTENTION_WAIT_S * self.timescale)
        result.aborted = f"ENQ not accepted in {self.max_enq_attempts} attempts"
        return False

    async def _establish_reply(self, result: SendResult) -> int | None:
        """ACK, NAK or ENQ within the reply timer; other bytes are ignored (6.5.1.2)."""
        deadline = self._line.now() + self.reply_timeout_s
        while (value := await self._line.byte(deadline - self._line.now())) is not None:
            if value in (ACK, NAK, ENQ):
                return value
            result.ignored += bytes([value])
        return None

    async def _send_frame(
        self, index: int, planned: _Planned, faults: Sequence[Fault], result: SendResult
    ) -> bool:
        """Frame ``index`` until ACK: a refused frame goes again, 6 attempts in all (6.5.1.4)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            active: dict[str, Fault] = {
                fault.kind: fault
                for fault in faults
                if fault.kind in _ATTEMPT_KINDS and fault.frame == index and attempt <= fault.times
            }
            if "slow_frame" in active:
                await asyncio.sleep(active["slow_frame"].delay_s)
            if attempt > 1:
                result.retransmissions += 1
            latency = await self._frame_reply(self._frame_bytes(index, planned, active), result)
            if latency is None:
                return await self._abort(
                    result, f"no reply to frame {index} within {self.reply_timeout_s} s (6.5.2.2)"
                )
            if latency >= 0:
                result.ack_latencies_s.append(latency)
                result.last_frame_ack_s = latency
                if planned.message_end:
                    result.message_ack_s.append(latency)
                return True
        await self._abort(result, f"frame {index} refused {MAX_ATTEMPTS} times (6.5.1.4)")
        return False

    @staticmethod
    def _frame_bytes(index: int, planned: _Planned, active: dict[str, Fault]) -> bytes:
        number = index % 8
        if "skip_frame_number" in active:
            number = (number + 1) % 8
        if "wrong_frame_number" in active:
            number = (number + 4) % 8
        body = b"%d" % number + planned.text + bytes([ETX if planned.final else ETB])
        check = checksum(body, lowercase="lowercase_checksum" in active)
        if "bad_checksum" in active:
            check = b"%02X" % ((sum(body) + 1) & 0xFF)
        return bytes([STX]) + body + check + (b"\n" if "bare_lf" in active else b"\r\n")

    async def _frame_reply(self, frame: bytes, result: SendResult) -> float | None:
        """Write ``frame`` and read its reply: the ACK's latency, -1.0 if refused, None if none."""
        sent = await self._line.write(frame)
        result.frames_sent += 1
        reply = await self._line.byte(self.reply_timeout_s)
        if reply is None:
            return None
        if reply in (ACK, EOT):  # 6.3.4; EOT: the host wants the line, we may go on (6.3.5)
            result.acks += 1
            if reply == EOT:
                result.interrupts += 1
            return self._line.now() - sent
        if reply == NAK:
            result.naks += 1
        else:  # 6.5.1.4: any other character is a NAK
            result.other_replies += 1
        return -1.0

    async def _abort(self, result: SendResult, reason: str) -> bool:
        """Termination phase after a failure (6.5.1.4, 6.5.2): EOT; the message is lost."""
        result.aborted = reason
        await self._line.write(bytes([EOT]))
        result.eot_sent = True
        return False

    # ---- receiving (the host answers a query or downloads orders) ----

    async def query(
        self,
        records: Sequence[bytes] | bytes,
        timeout_s: float = 30.0,
        faults: Sequence[Fault] = (),
    ) -> list[bytes]:
        """Send a host query (H, Q, L), then receive the host's answer: its records.

        Faults of the receiving kinds apply to the answer; the others (``contend``
        included: an ENQ right after the query's EOT) to the query.
        """
        faults = list(faults)
        download_kinds = _RECEIVE_KINDS - {"contend"}
        upload = [fault for fault in faults if fault.kind not in download_kinds]
        download = [fault for fault in faults if fault.kind in download_kinds]
        sent = await self.send_message(records, upload)
        if not sent.ok:
            raise FakeAnalyzerError(f"the query was not delivered: {sent.aborted}")
        return await self.receive_session(timeout_s, download)

    async def receive_session(
        self, timeout_s: float = 30.0, faults: Sequence[Fault] = ()
    ) -> list[bytes]:
        """Wait up to ``timeout_s`` for the host's ENQ, take its frames until EOT.

        Returns the records (without CR) of the complete messages, H through L. Frames
        are checked strictly: STX, FN the next in turn (or the previous one: a repeat),
        ETB/ETX, uppercase checksum, CR LF, at most ``frame_size`` bytes; a bad one is
        NAKed with its reason in :attr:`ReceiveResult.rejects`. Raises TimeoutError if
        no ENQ comes, or no frame or EOT within ``receive_timeout_s`` (6.5.2.3), and
        LineClosed if the host hangs up.
        """
        faults = _accept(faults, _RECEIVE_KINDS, "receive_session")
        result = ReceiveResult()
        self.last_receive = result
        deadline = self._line.now() + timeout_s
        busy = sum(fault.times for fault in faults if fault.kind == "busy")
        contend = [fault for fault in faults if fault.kind == "contend" for _ in range(fault.times)]
        while True:
            value = await self._line.byte(deadline - self._line.now())
            if value is None:
                result.aborted = f"no ENQ from the host within {timeout_s} s"
                raise TimeoutError(result.aborted)
            if value != ENQ:  # a neutral line ignores everything but ENQ (6.2)
                result.ignored += bytes([value])
            elif busy:
                busy -= 1
                result.busy_naks += 1
                await self._line.write(bytes([NAK]))  # 6.2.5: not ready
            elif contend:
                fault = contend.pop(0)
                result.contentions += 1
                await self._line.write(bytes([ENQ]))  # 6.2.7: both ENQ, the instrument wins
                result.ignored += await self._line.collect(CONTENTION_WAIT_S * self.timescale)
                if fault.data:
                    await self.send_message(fault.data)
                else:
                    await self._send_empty()
            else:
                await self._line.write(bytes([ACK]))  # 6.2.4
                break
        await self._receive_frames(result, faults)
        return result.records

    async def _send_empty(self) -> SendResult:
        result = SendResult()
        self.last_send = result
        result.ok = await self._transmit([], (), result)
        return result

    async def _receive_frames(self, result: ReceiveResult, faults: Sequence[Fault]) -> None:
        """Transfer phase as receiver (6.3): check, answer and collect frames until EOT."""
        naks = {fault.frame: fault.times for fault in faults if fault.kind == "nak_frame"}
        previous: int | None = None  # FN of the last accepted frame
        accepted = 0
        text, done = bytearray(), bytearray()
        while True:
            value = await self._line.byte(self.receive_timeout_s)
            if value is None:
                result.aborted = f"no frame or EOT within {self.receive_timeout_s} s (6.5.2.3)"
                raise TimeoutError(result.aborted)
            if value == EOT:  # 6.4
                break
            if value != STX:
                result.ignored += bytes([value])  # 6.5.1.2
                continue
            frame = bytes([STX]) + await self._line.rest_of_frame(
                self.receive_timeout_s, self.frame_size
            )
            result.frames += 1
            number, problem = self._check_frame(frame)
            if problem is None and number == previous:  # a repeat: its ACK was lost (6.5.1.3)
                result.repeats += 1
                result.acks += 1
                await self._line.write(bytes([ACK]))
                continue
            expected = 1 if previous is None else (previous + 1) % 8
            if problem is None and number != expected:
                problem = f"frame number {number}, expected {expected}"
            if problem is None and naks.get(accepted + 1, 0) > 0:
                naks[accepted + 1] -= 1
                problem = f"frame {accepted + 1} NAKed by the script"
            if problem is not None:
                result.rejects.append(problem)
                result.naks += 1
                await self._line.write(bytes([NAK]))  # 6.3.4
                continue
            accepted += 1
            previous = number
            text += frame[2:-5]
            if frame[-5] == ETX:
                done += text
                text.clear()
            mine = {fault.kind: fault for fault in faults if fault.frame == accepted}
            if "slow_ack" in mine:
                await asyncio.sleep(mine["slow_ack"].delay_s)
            result.acks += 1
            await self._line.write(bytes([EOT if "interrupt" in mine else ACK]))  # 6.3.4, 6.3.5
        message: list[bytes] = []
        for record in bytes(done).split(b"\r"):
            if record:
                message.append(record)
            if record[:1] == b"L":
                result.records += message
                message = []
        result.discarded = message + ([bytes(text)] if text else [])  # no L, or no ETX

    def _check_frame(self, frame: bytes) -> tuple[int, str | None]:
        """The frame number and why the frame is refused (None: it is well formed)."""
        if len(frame) > self.frame_size:
            return -1, f"frame of {len(frame)} bytes, more than {self.frame_size}"
        if not frame.endswith(b"\r\n"):
            return -1, "frame does not end with CR LF"
        body, received = frame[1:-4], frame[-4:-2]
        if len(body) < 2 or body[-1] not in (ETX, ETB):
            return -1, "no ETB or ETX before the checksum"
        if received != checksum(body):
            return -1, f"checksum {received!r}, expected {checksum(body)!r}"
        if not 0x30 <= body[0] <= 0x37:
            return -1, f"frame number {body[:1]!r} is not 0..7"
        return body[0] - 0x30, None


# ---- captures ----


def sample_messages(path: str | Path) -> list[bytes]:
    """Message texts (H .. L, each record ending in CR) from an ASTM capture file.

    Frames are cut from STX through ETB/ETX and the two checksum characters, so a
    bare LF, CR LF or nothing at all (end of file) may follow; ENQ, EOT and any bytes
    between frames are skipped. Each checksum is verified (ValueError if one is
    wrong, which is also what a non-ASTM file gives); the texts of all frames are
    joined (intermediate ETB frames continue a record) and cut into records at CR,
    a message being everything from an H record through the next L record.
    """
    data = Path(path).read_bytes()
    texts = []
    start = data.find(bytes([STX]))
    while start >= 0:
        found = _FRAME_END.search(data, start + 1)
        if found is None:
            raise ValueError(f"{path}: frame at byte {start} has no ETB or ETX")
        end = found.start()
        body, received = data[start + 1 : end + 1], data[end + 1 : end + 3]
        if received.upper() != checksum(body):
            raise ValueError(f"{path}: frame at byte {start}: checksum {received!r}")
        texts.append(body[1:-1] if 0x30 <= body[0] <= 0x37 else body[:-1])
        start = data.find(bytes([STX]), end + 3)
    messages: list[list[bytes]] = []
    current: list[bytes] = []
    for record in b"".join(texts).split(b"\r"):
        if not record:
            continue
        if record[:1] == b"H" and current:
            messages.append(current)
            current = []
        current.append(record)
        if record[:1] == b"L":
            messages.append(current)
            current = []
    if current:
        messages.append(current)
    return [b"".join(record + b"\r" for record in message) for message in messages]


# ---- transports ----


class _Sink(Protocol):
    async def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class PacedWriter:
    """A StreamWriter-like writer that lets bytes out no faster than ``baudrate`` allows.

    Each byte takes ``10 / baudrate`` seconds (8N1: start, 8 data, stop bits), so at
    9600 baud 960 bytes take one second; bytes are handed on in chunks of about 10 ms,
    each once its wire time has passed, as a UART would deliver them, and
    :meth:`drain` returns when the last byte written has left the line. Without a
    baudrate bytes go out as fast as the sink takes them.
    """

    def __init__(self, sink: _Sink, *, baudrate: int | None) -> None:
        self._sink = sink
        self._byte_s = BITS_PER_BYTE / baudrate if baudrate else 0.0
        self._chunk = max(1, int(0.01 / self._byte_s)) if baudrate else 65536
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._free_at = 0.0  # when the line has sent everything handed to it
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._error: Exception | None = None
        self._closing = False
        self._task = self._loop.create_task(self._pump(), name="paced-writer")

    def write(self, data: bytes) -> None:
        if self._closing or self._error is not None:
            raise ConnectionResetError("the line is closed") from self._error
        if not self._buffer:  # an idle line starts sending now
            self._free_at = max(self._free_at, self._loop.time())
        self._buffer += data
        self._idle.clear()
        self._wake.set()

    async def drain(self) -> None:
        await self._idle.wait()
        if self._error is not None:
            raise ConnectionResetError("the line is closed") from self._error

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._task.cancel()
        self._sink.close()
        self._idle.set()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._sink.wait_closed()

    async def _pump(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._buffer:
                    chunk = bytes(self._buffer[: self._chunk])
                    if self._byte_s:
                        self._free_at += len(chunk) * self._byte_s
                        await asyncio.sleep(max(0.0, self._free_at - self._loop.time()))
                    await self._sink.send(chunk)
                    del self._buffer[: len(chunk)]
                self._idle.set()
        except (ConnectionError, OSError) as err:
            self._error = err
            self._idle.set()


class _StreamSink:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class _SerialSink:
    """A non-blocking pyserial port on the event loop: reads fed to a StreamReader."""

    def __init__(self, port: serial.Serial, reader: asyncio.StreamReader) -> None:
        self._port, self.reader = port, reader
        self._fd = port.fileno()
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the other end of the pty went away
            data = b""
        if data:
            self.reader.feed_data(data)
        else:
            self._loop.remove_reader(self._fd)
            self.reader.feed_eof()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                ready: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_writer(self._fd, _resolve, ready)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._port.is_open:
            self._loop.remove_reader(self._fd)
            self._port.close()
            self.reader.feed_eof()

    async def wait_closed(self) -> None:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def open_serial_stream(
    path: str | Path, baudrate: int = 9600, *, pace: bool = True
) -> tuple[asyncio.StreamReader, PacedWriter]:
    """A serial port (a socat pty in tests) as a reader/writer pair, 8N1.

    With ``pace`` writes take the real byte time of ``baudrate`` (a pty would pass
    them at memory speed), which gives tests and benchmarks 9600-baud timing.
    """
    port = serial.Serial(str(path), baudrate=baudrate, timeout=0, write_timeout=0)
    sink = _SerialSink(port, asyncio.StreamReader())
    return sink.reader, PacedWriter(sink, baudrate=baudrate if pace else None)


async def open_tcp_stream(
    host: str, port: int, *, baudrate: int | None = None
) -> tuple[asyncio.StreamReader, ByteWriter]:
    """A TCP connection (an analyzer on a terminal server); ``baudrate`` paces writes."""
    reader, writer = await asyncio.open_connection(host, port)
    if baudrate is None:
        return reader, writer
    return reader, PacedWriter(_StreamSink(writer), baudrate=baudrate)
