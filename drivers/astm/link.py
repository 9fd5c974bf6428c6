"""ASTM E1381-02 / CLSI LIS01-A2 link layer (sans-IO): establishment, transfer, termination.

The gateway is always the *computer system*; the peer is the instrument. Bytes from
the line and clock readings (monotonic seconds) go in; typed events come out, and the
bytes to write wait in :meth:`AstmLink.data_to_send`. The machine is the table
:data:`TRANSITIONS` (state, input) -> named action, with the standard's sections
beside it; a pair missing from the table is an illegal transition and raises
:class:`LinkStateError` (only the application's calls can cause one: every received
byte has an entry).

Choices where the standard leaves room (section numbers are E1381-02's; LIS01-A2
numbers them 8.x):

* The final (ETX) frame of a text is not ACKed by the link: :class:`TextReceived`
  waits for :meth:`AstmLink.acknowledge`, so the application journals first. While
  it waits no receive timer runs (the application is slow, not the instrument) and
  bytes that arrive are held, then processed after the reply. Intermediate (ETB)
  frames are ACKed as soon as they validate.
* A frame carrying the number of the last accepted frame is the sender repeating a
  frame whose ACK it lost (6.5.1.3): ACKed again, its text not used twice.
* Contention (6.2.7.1): our ENQ answered by an ENQ. The instrument wins; its
  colliding ENQ is *not* answered ("when the next ENQ is received, it replies"):
  the instrument repeats it after 1 s (6.2.7.2) and that one gets the ACK. Our
  queue waits ``contention_wait_s`` after the line is neutral again.
* A receiver interrupt (EOT in reply to a frame, 6.3.5) counts as the ACK; the link
  finishes the message in progress, terminates, and starts later messages only
  after the instrument's transfer or ``interrupt_wait_s`` (6.3.5.3).
* After an abort (six refusals, or no reply in 15 s: 6.5.1.4, 6.5.2.2) the message
  is reported as :class:`SendFailed`; repeating it is the caller's (journal's) job.
  Messages still queued wait ``enq_retry_after_nak_s`` before the next ENQ.
* Message boundaries (H..L) belong to the record layer: a TransferEnded with
  ``aborted=True`` tells it to drop the records of an unfinished message.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from drivers.astm.frames import (
    ACK,
    ENQ,
    EOT,
    LF,
    NAK,
    RESTRICTED,
    STX,
    FrameError,
    parse_frame,
    split_records,
)

_ACK, _NAK, _ENQ, _EOT = bytes([ACK]), bytes([NAK]), bytes([ENQ]), bytes([EOT])
_FRAME_STOP = re.compile(rb"[\x02\x04\n]")  # STX, EOT or LF end the bytes of an open frame
_JUNK_STOP = re.compile(rb"[\x02\x04\x05\x06\x15]")


@dataclass(frozen=True, slots=True)
class LinkSettings:
    frame_size: int = 247  # 247 legacy E1381, 64000 LIS01-A2: STX..LF, sent and accepted
    allow_bare_lf: bool = False  # relaxation: checksum followed by LF only
    allow_missing_number: bool = False  # relaxation: frames without the FN digit
    reply_timeout_s: float = 15.0  # sender waits for ACK/NAK/EOT (6.5.2.1, 6.5.2.2)
    receive_timeout_s: float = 30.0  # receiver waits for the next frame or EOT (6.5.2.3)
    enq_retry_after_nak_s: float = 10.0  # after a NAK to our ENQ (6.2.6)
    contention_wait_s: float = 20.0  # after losing contention (6.2.7.1)
    interrupt_wait_s: float = 15.0  # after honouring a receiver interrupt (6.3.5.3)
    max_attempts: int = 6  # a frame is sent at most 6 times, then the message aborts (6.5.1.4)
    max_held_bytes: int = 1 << 20  # kept while the application journals (none, if conforming)
    max_text_bytes: int = 16 << 20  # ETB frames joined into one text: beyond it, NAK

    def __post_init__(self) -> None:
        if not 8 <= self.frame_size <= 64_000:
            raise ValueError(f"frame_size {self.frame_size} outside 8..64000")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferStarted:
    """The instrument's ENQ was answered ACK: frames follow."""


@dataclass(frozen=True, slots=True)
class TransferRefused:
    """The instrument's ENQ was answered NAK (``busy``: receiver not ready, 6.2.5)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TextReceived:
    """An ETX frame's text joined to the ETB frames before it; answer with acknowledge()."""

    text: bytes
    frame_number: int  # the ETX frame's; -1 when it had none (relaxation)


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame answered NAK (or, when cut short by a new STX, not answered at all)."""

    reason: str
    raw: bytes  # at most frame_size + 1 bytes of it


@dataclass(frozen=True, slots=True)
class DuplicateFrame:
    """The last accepted frame came again (our ACK was lost): ACKed, text not reused."""

    frame_number: int


@dataclass(frozen=True, slots=True)
class TransferEnded:
    """The instrument's transfer is over: EOT, or the receive timeout.

    ``aborted``: it timed out, or the EOT came inside a frame, inside an ETB sequence
    or after a refused frame; records of an unfinished message should be dropped.
    """

    aborted: bool
    reason: str
    discarded: bytes  # ETB text of an unfinished frame sequence


@dataclass(frozen=True, slots=True)
class Junk:
    """Received bytes the current state ignores (6.5.1.2)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EstablishmentFailed:
    """Our ENQ was refused or unanswered; the next ENQ goes out at ``retry_at``."""

    reason: str
    retry_at: float


@dataclass(frozen=True, slots=True)
class ContentionLost:
    """Both sides sent ENQ; the instrument goes first (6.2.7)."""


@dataclass(frozen=True, slots=True)
class InterruptRequested:
    """The instrument answered a frame with EOT: it wants the line (6.3.5)."""


@dataclass(frozen=True, slots=True)
class MessageSent:
    """The last frame of the message sent with ``ref`` was acknowledged."""

    ref: object


@dataclass(frozen=True, slots=True)
class SendFailed:
    """The message was aborted (EOT sent); sending it again is the caller's choice."""

    ref: object
    reason: str


LinkEvent = (
    TransferStarted
    | TransferRefused
    | TextReceived
    | FrameRejected
    | DuplicateFrame
    | TransferEnded
    | Junk
    | EstablishmentFailed
    | ContentionLost
    | InterruptRequested
    | MessageSent
    | SendFailed
)


class LinkStateError(RuntimeError):
    """An input the current state has no transition for (a caller's mistake)."""


class LinkState(Enum):
    IDLE = "idle"  # neutral line (maybe holding queued messages until a retry time)
    RECEIVING = "receiving"  # instrument is sender, we wait for a frame or EOT
    AWAIT_ACKNOWLEDGE = "await-acknowledge"  # TextReceived out, waiting for acknowledge()
    AWAIT_ENQ_REPLY = "await-enq-reply"  # we sent ENQ
    AWAIT_FRAME_REPLY = "await-frame-reply"  # we sent a frame


class Input(Enum):
    ENQ = "ENQ"
    EOT = "EOT"
    ACK = "ACK"
    NAK = "NAK"
    FRAME = "frame"  # STX .. LF, received while RECEIVING
    JUNK = "junk"  # a run of any other bytes
    TIMEOUT = "timeout"  # tick() at or after next_deadline()
    SEND = "send"  # send() queued a message
    ACKNOWLEDGE = "acknowledge"  # acknowledge() answered a TextReceived


S, In = LinkState, Input

# (state, input) -> action method. Sections of ASTM E1381-02 (LIS01-A2 8.x).
TRANSITIONS: dict[tuple[LinkState, Input], str] = {
    # 6.2 establishment; a neutral line ignores everything but ENQ
    (S.IDLE, In.ENQ): "_answer_enq",  # 6.2.4 ACK, 6.2.5 NAK when busy
    (S.IDLE, In.EOT): "_ignore_quietly",  # 6.4: a termination we had already assumed
    (S.IDLE, In.ACK): "_ignore",
    (S.IDLE, In.NAK): "_ignore",
    (S.IDLE, In.JUNK): "_ignore",
    (S.IDLE, In.SEND): "_establish_when_due",  # 6.2.1 ENQ
    (S.IDLE, In.TIMEOUT): "_establish_when_due",  # 6.2.6 / 6.2.7.1 / 6.3.5.3 waits are over
    # 6.3 transfer, instrument sending
    (S.RECEIVING, In.FRAME): "_receive_frame",  # 6.3.1-6.3.4, 6.5.1
    (S.RECEIVING, In.EOT): "_end_transfer",  # 6.4
    (S.RECEIVING, In.ENQ): "_ignore",
    (S.RECEIVING, In.ACK): "_ignore",
    (S.RECEIVING, In.NAK): "_ignore",
    (S.RECEIVING, In.JUNK): "_ignore",  # 6.5.1.2
    (S.RECEIVING, In.TIMEOUT): "_receive_timeout",  # 6.5.2.3
    (S.RECEIVING, In.SEND): "_keep_queued",
    (S.AWAIT_ACKNOWLEDGE, In.ACKNOWLEDGE): "_answer_text",  # 6.3.4.1, reply in 15 s (6.5.2.4)
    (S.AWAIT_ACKNOWLEDGE, In.SEND): "_keep_queued",
    # 6.2 establishment, we are sender
    (S.AWAIT_ENQ_REPLY, In.ACK): "_start_transfer",  # 6.2.4
    (S.AWAIT_ENQ_REPLY, In.NAK): "_enq_refused",  # 6.2.6: wait >= 10 s
    (S.AWAIT_ENQ_REPLY, In.ENQ): "_contention",  # 6.2.7
    (S.AWAIT_ENQ_REPLY, In.TIMEOUT): "_enq_timeout",  # 6.5.2.1: termination phase
    (S.AWAIT_ENQ_REPLY, In.EOT): "_ignore",
    (S.AWAIT_ENQ_REPLY, In.JUNK): "_ignore",
    (S.AWAIT_ENQ_REPLY, In.SEND): "_keep_queued",
    # 6.3 transfer, we are sender
    (S.AWAIT_FRAME_REPLY, In.ACK): "_frame_accepted",  # 6.3.4.2
    (S.AWAIT_FRAME_REPLY, In.EOT): "_receiver_interrupt",  # 6.3.4.4, 6.3.5
    (S.AWAIT_FRAME_REPLY, In.NAK): "_frame_refused",  # 6.3.4.3, 6.5.1.4
    (S.AWAIT_FRAME_REPLY, In.ENQ): "_frame_refused",  # 6.5.1.4: any other reply is a NAK
    (S.AWAIT_FRAME_REPLY, In.JUNK): "_frame_refused",
    (S.AWAIT_FRAME_REPLY, In.TIMEOUT): "_frame_timeout",  # 6.5.2.2
    (S.AWAIT_FRAME_REPLY, In.SEND): "_keep_queued",
}

_CONTROL = {ENQ: In.ENQ, EOT: In.EOT, ACK: In.ACK, NAK: In.NAK}
Action = Callable[[float, bytes], list[LinkEvent]]


class AstmLink:
    """One line's E1381 link state; see the module docstring for the choices made."""

    def __init__(self, settings: LinkSettings = LinkSettings()) -> None:
        self.settings = settings
        self.busy = False  # True: an instrument's ENQ is answered NAK
        self._state = LinkState.IDLE
        self._out = bytearray()
        self._deadline: float | None = None  # of the state's timer (not IDLE's hold)
        # receiving
        self._frame: bytearray | None = None  # an open frame, from its STX
        self._frame_len = 0
        self._frame_lost = False  # an open frame was cut by EOT
        self._expected = 1
        self._last_number: int | None = None
        self._partial = b""  # text of accepted ETB frames
        self._pending_number = -1  # of the ETX frame waiting for acknowledge()
        self._last_reply_nak = False
        self._held = bytearray()  # bytes received while waiting for acknowledge()
        # sending
        self._queue: deque[tuple[bytes, object]] = deque()
        self._hold_until: float | None = None  # no ENQ before this
        self._hold_after_transfer: float | None = None  # hold from the instrument's EOT
        self._frames: list[bytes] = []  # frames of the message at the queue's head
        self._index = 0
        self._attempts = 0
        self._next_number = 1
        self._interrupted = False

    # --- the interface ----------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[LinkEvent]:
        """Bytes from the instrument, in any chunking; returns the events they complete."""
        events: list[LinkEvent] = []
        pos, n = 0, len(data)
        while pos < n:
            if self._state is S.AWAIT_ACKNOWLEDGE:  # held, bounded, until acknowledge()
                keep = data[pos : pos + max(self.settings.max_held_bytes - len(self._held), 0)]
                self._held += keep
                if pos + len(keep) < n:
                    events.append(Junk(bytes(data[pos + len(keep) :])))
                break
            if self._frame is not None:
                pos = self._collect(self._frame, data, pos, now, events)
                continue
            byte = data[pos]
            if byte == STX and self._state is S.RECEIVING:
                self._frame, self._frame_len = bytearray(b"\x02"), 1
                pos += 1
            elif byte in _CONTROL:
                events += self._dispatch(_CONTROL[byte], now, data[pos : pos + 1])
                pos += 1
            else:
                m = _JUNK_STOP.search(data, pos + 1)
                end = m.start() if m else n
                events += self._dispatch(In.JUNK, now, data[pos:end])
                pos = end
        return events

    def tick(self, now: float) -> list[LinkEvent]:
        """Fire the timer if it is due."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        return self._dispatch(In.TIMEOUT, now, b"")

    def next_deadline(self) -> float | None:
        """When tick() must next be called (None: only input can change anything)."""
        if self._state is S.IDLE:
            return self._hold_until if self._queue else None
        return self._deadline

    def data_to_send(self) -> bytes:
        """Bytes for the line (ACK/NAK/ENQ/EOT and frames); drains the buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, text: bytes, ref: object, now: float) -> list[LinkEvent]:
        """Queue a message (records, each ending in CR); ``ref`` comes back in the result event.

        Raises ValueError for empty text or text with a restricted character (6.6).
        """
        if not text:
            raise ValueError("empty message")
        bad = RESTRICTED.intersection(text)
        if bad:
            raise ValueError(f"message text contains restricted characters {sorted(bad)}")
        self._queue.append((bytes(text), ref))
        return self._dispatch(In.SEND, now, b"")

    def acknowledge(self, ok: bool, now: float) -> list[LinkEvent]:
        """Answer the pending TextReceived: ACK when ``ok`` (journaled), else NAK."""
        return self._dispatch(In.ACKNOWLEDGE, now, _ACK if ok else _NAK)

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def queued(self) -> int:
        """Messages not yet confirmed or failed (the one being sent included)."""
        return len(self._queue)

    # --- machinery --------------------------------------------------------------------

    def _dispatch(self, inp: Input, now: float, data: bytes) -> list[LinkEvent]:
        name = TRANSITIONS.get((self._state, inp))
        if name is None:
            raise LinkStateError(f"no transition for {inp.value} in state {self._state.value}")
        action: Action = getattr(self, name)
        return action(now, data)

    def _collect(
        self, frame: bytearray, data: bytes, pos: int, now: float, events: list[LinkEvent]
    ) -> int:
        """Add bytes to the open frame (keeping frame_size + 1 at most); dispatch it at LF."""
        m = _FRAME_STOP.search(data, pos)
        end = m.start() if m else len(data)
        self._frame_len += end - pos
        frame += data[pos : min(end, pos + self.settings.frame_size + 1 - len(frame))]
        if m is None:
            return end
        stop = data[end]
        if stop == LF:
            self._frame_len += 1
            if len(frame) <= self.settings.frame_size:
                frame.append(LF)
            self._frame = None
            events += self._dispatch(In.FRAME, now, bytes(frame))
            return end + 1
        if stop == STX:  # a frame cut short: its sender is not waiting for a reply to it
            events.append(FrameRejected("frame cut short by STX", bytes(frame)))
            self._frame, self._frame_len = bytearray(b"\x02"), 1
            return end + 1
        self._frame, self._frame_lost = None, True  # EOT: handled as a control next
        return end

    def _reply(self, byte: bytes, now: float) -> None:
        self._out += byte
        self._last_reply_nak = byte == _NAK
        self._deadline = now + self.settings.receive_timeout_s

    def _to_idle(self, now: float) -> list[LinkEvent]:
        self._state, self._deadline = S.IDLE, None
        return self._establish_when_due(now, b"")

    def _hold(self, until: float) -> None:
        if self._hold_until is None or self._hold_until < until:
            self._hold_until = until

    # --- actions: neutral line --------------------------------------------------------

    def _ignore(self, now: float, data: bytes) -> list[LinkEvent]:
        return [Junk(data)]

    def _ignore_quietly(self, now: float, data: bytes) -> list[LinkEvent]:
        return []

    def _keep_queued(self, now: float, data: bytes) -> list[LinkEvent]:
        return []

    def _answer_enq(self, now: float, data: bytes) -> list[LinkEvent]:
        if self.busy:
            self._out += _NAK
            return [TransferRefused("busy")]
        self._state = S.RECEIVING
        self._expected, self._last_number, self._partial = 1, None, b""
        self._frame_lost = False
        self._reply(_ACK, now)
        return [TransferStarted()]

    def _establish_when_due(self, now: float, data: bytes) -> list[LinkEvent]:
        if not self._queue or (self._hold_until is not None and now < self._hold_until):
            return []
        self._hold_until = None
        self._out += _ENQ
        self._state, self._deadline = S.AWAIT_ENQ_REPLY, now + self.settings.reply_timeout_s
        return []

    # --- actions: instrument sending --------------------------------------------------

    def _receive_frame(self, now: float, raw: bytes) -> list[LinkEvent]:
        size = self.settings.frame_size
        if len(raw) > size:  # raw holds frame_size + 1 bytes at most
            return self._reject(f"frame of {self._frame_len} bytes, more than {size}", raw, now)
        try:
            frame = parse_frame(
                raw,
                allow_bare_lf=self.settings.allow_bare_lf,
                allow_missing_number=self.settings.allow_missing_number,
            )
        except FrameError as err:
            return self._reject(str(err), raw, now)
        number = frame.number
        if number >= 0 and number == self._last_number:
            self._reply(_ACK, now)
            return [DuplicateFrame(number)]
        if number >= 0 and number != self._expected:
            return self._reject(f"frame number {number}, expected {self._expected}", raw, now)
        if not frame.final:
            if len(self._partial) + len(frame.text) > self.settings.max_text_bytes:
                limit = self.settings.max_text_bytes
                return self._reject(f"intermediate frames exceed {limit} bytes", raw, now)
            self._accept(number)
            self._partial += frame.text
            self._reply(_ACK, now)
            return []
        self._pending_number = number
        self._state, self._deadline = S.AWAIT_ACKNOWLEDGE, None
        return [TextReceived(self._partial + frame.text, number)]

    def _accept(self, number: int) -> None:
        if number >= 0:
            self._last_number, self._expected = number, (number + 1) % 8

    def _reject(self, reason: str, raw: bytes, now: float) -> list[LinkEvent]:
        self._reply(_NAK, now)
        return [FrameRejected(reason, raw)]

    def _answer_text(self, now: float, reply: bytes) -> list[LinkEvent]:
        if reply == _ACK:  # a NAK leaves the numbers and ETB text for the frame's repetition
            self._accept(self._pending_number)
            self._partial = b""
        self._state = S.RECEIVING
        self._reply(reply, now)
        held = bytes(self._held)
        self._held.clear()
        return self.receive(held, now) if held else []

    def _end_transfer(self, now: float, data: bytes) -> list[LinkEvent]:
        if self._partial:
            reason = "EOT before the end of an ETB frame sequence"
        elif self._frame_lost:
            reason = "EOT inside a frame"
        elif self._last_reply_nak:
            reason = "EOT after a rejected frame"
        else:
            reason = "EOT"
        ended = TransferEnded(reason != "EOT", reason, self._finish_transfer(now))
        return [ended, *self._to_idle(now)]

    def _receive_timeout(self, now: float, data: bytes) -> list[LinkEvent]:
        reason = f"no frame or EOT within {self.settings.receive_timeout_s:g} s"
        return [TransferEnded(True, reason, self._finish_transfer(now)), *self._to_idle(now)]

    def _finish_transfer(self, now: float) -> bytes:
        discarded, self._partial = self._partial, b""
        self._frame, self._frame_lost, self._last_reply_nak = None, False, False
        if self._hold_after_transfer is not None:  # 6.2.7.1 / 6.3.5.3: the instrument went
            self._hold_until = now + self._hold_after_transfer
            self._hold_after_transfer = None
        return discarded

    # --- actions: we are sending ------------------------------------------------------

    def _start_transfer(self, now: float, data: bytes) -> list[LinkEvent]:
        self._next_number, self._interrupted = 1, False
        self._hold_after_transfer = None  # we have the line after all
        self._load_message()
        return self._send_frame(now)

    def _load_message(self) -> None:
        text, _ = self._queue[0]
        self._frames = split_records(
            text, frame_size=self.settings.frame_size, first_number=self._next_number
        )
        self._next_number += len(self._frames)
        self._index = self._attempts = 0

    def _send_frame(self, now: float) -> list[LinkEvent]:
        self._out += self._frames[self._index]
        self._attempts += 1
        self._state, self._deadline = S.AWAIT_FRAME_REPLY, now + self.settings.reply_timeout_s
        return []

    def _frame_accepted(self, now: float, data: bytes) -> list[LinkEvent]:
        self._index += 1
        self._attempts = 0
        if self._index < len(self._frames):
            return self._send_frame(now)
        _, ref = self._queue.popleft()
        events: list[LinkEvent] = [MessageSent(ref)]
        if self._queue and not self._interrupted:
            self._load_message()
            return [*events, *self._send_frame(now)]
        self._out += _EOT  # 6.4 termination
        if self._interrupted:  # 6.3.5.3: let the instrument have the line
            self._hold(now + self.settings.interrupt_wait_s)
            self._hold_after_transfer = 0.0
        return [*events, *self._to_idle(now)]

    def _receiver_interrupt(self, now: float, data: bytes) -> list[LinkEvent]:
        self._interrupted = True
        return [InterruptRequested(), *self._frame_accepted(now, data)]

    def _frame_refused(self, now: float, data: bytes) -> list[LinkEvent]:
        if self._attempts < self.settings.max_attempts:
            return self._send_frame(now)
        return self._abort(f"frame refused {self._attempts} times", now)

    def _frame_timeout(self, now: float, data: bytes) -> list[LinkEvent]:
        return self._abort(f"no reply to a frame within {self.settings.reply_timeout_s:g} s", now)

    def _abort(self, reason: str, now: float) -> list[LinkEvent]:
        _, ref = self._queue.popleft()
        self._attempts = 0
        self._out += _EOT  # 6.5.1.4 / 6.5.2.2: termination phase
        self._hold(now + self.settings.enq_retry_after_nak_s)
        return [SendFailed(ref, reason), *self._to_idle(now)]

    def _enq_refused(self, now: float, data: bytes) -> list[LinkEvent]:
        return self._retry_establishment("ENQ answered NAK", now)

    def _enq_timeout(self, now: float, data: bytes) -> list[LinkEvent]:
        self._out += _EOT  # 6.5.2.1: termination phase
        reason = f"no reply to ENQ within {self.settings.reply_timeout_s:g} s"
        return self._retry_establishment(reason, now)

    def _retry_establishment(self, reason: str, now: float) -> list[LinkEvent]:
        retry_at = now + self.settings.enq_retry_after_nak_s
        self._hold(retry_at)
        self._state, self._deadline = S.IDLE, None
        return [EstablishmentFailed(reason, retry_at)]

    def _contention(self, now: float, data: bytes) -> list[LinkEvent]:
        # 6.2.7.1: stop sending, do not answer this ENQ; the instrument's next one gets a reply
        self._hold(now + self.settings.contention_wait_s)
        self._hold_after_transfer = self.settings.contention_wait_s
        self._state, self._deadline = S.IDLE, None
        return [ContentionLost()]
