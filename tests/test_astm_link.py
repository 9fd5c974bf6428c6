"""ASTM E1381-02 link layer (AstmLink): event scripts, capture replays, two links back to back."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers.astm.frames import build_frame, iter_frames, parse_frame, split_records
from drivers.astm.link import (
    TRANSITIONS,
    AstmLink,
    ContentionLost,
    DuplicateFrame,
    EstablishmentFailed,
    FrameRejected,
    Input,
    InterruptRequested,
    Junk,
    LinkEvent,
    LinkSettings,
    LinkState,
    LinkStateError,
    MessageSent,
    SendFailed,
    TextReceived,
    TransferEnded,
    TransferRefused,
    TransferStarted,
)

SAMPLES = Path("/work/shared/samples/lab")
MANIFEST = {e["file"]: e for e in json.loads((SAMPLES / "MANIFEST.json").read_text())}

ENQ, EOT, ACK, NAK, STX = b"\x05", b"\x04", b"\x06", b"\x15", b"\x02"
MESSAGE = b"H|\\^&|||medgw\rP|1\rO|1|S-1||^^^GLU\rL|1|N\r"


def frame(number: int, text: bytes, *, final: bool = True) -> bytes:
    return build_frame(number, text, final=final)


def established(settings: LinkSettings | None = None, now: float = 0.0) -> AstmLink:
    """A link that has ACKed the instrument's ENQ (the reply drained)."""
    link = AstmLink(settings or LinkSettings())
    assert link.receive(ENQ, now) == [TransferStarted()]
    assert link.data_to_send() == ACK
    return link


def answer_all(link: AstmLink, events: list[LinkEvent], now: float) -> list[LinkEvent]:
    """Play the application: acknowledge(True) every TextReceived, keep all events."""
    seen: list[LinkEvent] = []
    pending = list(events)
    while pending:
        event = pending.pop(0)
        seen.append(event)
        if isinstance(event, TextReceived):
            pending = link.acknowledge(True, now) + pending
    return seen


def texts(events: Iterable[LinkEvent]) -> list[bytes]:
    return [e.text for e in events if isinstance(e, TextReceived)]


def of_type(events: Iterable[LinkEvent], kind: type) -> list[LinkEvent]:
    return [e for e in events if isinstance(e, kind)]


def record_types(data: Iterable[bytes]) -> Counter[str]:
    records = b"".join(data).split(b"\r")
    return Counter(chr(r[0]) for r in records if r)


def in_chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


# --- the table ------------------------------------------------------------------------


def test_every_action_in_the_table_exists() -> None:
    link = AstmLink()
    for name in TRANSITIONS.values():
        assert callable(getattr(link, name)), name


def test_every_received_byte_has_a_transition_in_every_listening_state() -> None:
    listening = set(LinkState) - {LinkState.AWAIT_ACKNOWLEDGE}  # that one holds bytes
    for state in listening:
        for inp in (Input.ENQ, Input.EOT, Input.ACK, Input.NAK, Input.JUNK, Input.TIMEOUT):
            if state is LinkState.IDLE or inp is not Input.TIMEOUT:
                assert (state, inp) in TRANSITIONS, (state, inp)
        assert (state, Input.SEND) in TRANSITIONS
    assert (LinkState.AWAIT_ACKNOWLEDGE, Input.SEND) in TRANSITIONS


@pytest.mark.parametrize("state", ["idle", "receiving"])
def test_acknowledge_without_a_pending_text_is_an_illegal_transition(state: str) -> None:
    link = AstmLink() if state == "idle" else established()
    with pytest.raises(LinkStateError, match="acknowledge"):
        link.acknowledge(True, 0.0)


def test_acknowledging_twice_raises() -> None:
    link = established()
    assert texts(link.receive(frame(1, MESSAGE), 1.0)) == [MESSAGE]
    link.acknowledge(True, 1.0)
    with pytest.raises(LinkStateError):
        link.acknowledge(True, 1.0)


@pytest.mark.parametrize("frame_size", [7, 64_001])
def test_settings_are_checked(frame_size: int) -> None:
    with pytest.raises(ValueError, match="frame_size"):
        LinkSettings(frame_size=frame_size)
    with pytest.raises(ValueError, match="max_attempts"):
        LinkSettings(max_attempts=0)


# --- establishment (6.2) --------------------------------------------------------------


def test_enq_when_idle_is_acked_and_starts_the_transfer() -> None:
    link = AstmLink()
    assert link.receive(ENQ, 5.0) == [TransferStarted()]
    assert link.data_to_send() == ACK
    assert link.data_to_send() == b""  # drained
    assert link.state is LinkState.RECEIVING
    assert link.next_deadline() == 35.0


def test_busy_receiver_answers_nak_and_stays_idle() -> None:
    link = AstmLink()
    link.busy = True
    assert link.receive(ENQ, 0.0) == [TransferRefused("busy")]
    assert link.data_to_send() == NAK
    assert link.state is LinkState.IDLE
    link.busy = False
    assert link.receive(ENQ, 10.0) == [TransferStarted()]
    assert link.data_to_send() == ACK


def test_junk_in_idle_is_reported_and_not_answered() -> None:
    link = AstmLink()
    assert link.receive(b"hello\r\n", 0.0) == [Junk(b"hello\r\n")]
    events = link.receive(frame(1, MESSAGE), 0.0)  # a frame without ENQ first
    assert events and all(isinstance(e, Junk) for e in events)
    assert b"".join(e.data for e in events if isinstance(e, Junk)) == frame(1, MESSAGE)
    assert link.receive(ACK + NAK, 0.0) == [Junk(ACK), Junk(NAK)]
    assert link.data_to_send() == b""
    assert link.state is LinkState.IDLE
    assert link.next_deadline() is None


def test_eot_in_idle_is_ignored_quietly() -> None:
    link = AstmLink()
    assert link.receive(EOT, 0.0) == []
    assert link.data_to_send() == b""
    assert link.state is LinkState.IDLE


# --- transfer, instrument sending (6.3) -----------------------------------------------


def test_final_frame_waits_for_the_application_before_its_ack() -> None:
    link = established()
    assert link.receive(frame(1, MESSAGE), 1.0) == [TextReceived(MESSAGE, 1)]
    assert link.data_to_send() == b""  # not ACKed until journaled
    states = [link.state]
    assert link.acknowledge(True, 2.0) == []
    assert link.data_to_send() == ACK
    states.append(link.state)
    assert states == [LinkState.AWAIT_ACKNOWLEDGE, LinkState.RECEIVING]
    assert link.receive(EOT, 3.0) == [TransferEnded(False, "EOT", b"")]
    assert link.state is LinkState.IDLE
    assert link.next_deadline() is None


def test_intermediate_frames_are_acked_at_once_and_joined() -> None:
    link = established()
    assert link.receive(frame(1, b"R|1|^^^GL", final=False), 1.0) == []
    assert link.data_to_send() == ACK
    assert link.receive(frame(2, b"U|5.", final=False), 1.0) == []
    assert link.data_to_send() == ACK
    joined = TextReceived(b"R|1|^^^GLU|5.4|mmol/l\r", 3)
    assert link.receive(frame(3, b"4|mmol/l\r"), 1.0) == [joined]
    assert link.data_to_send() == b""
    link.acknowledge(True, 1.0)
    assert link.data_to_send() == ACK
    assert link.receive(frame(4, b"L|1\r"), 1.0) == [TextReceived(b"L|1\r", 4)]  # not re-joined


def test_frame_numbers_wrap_7_0_1() -> None:
    link = established()
    got: list[LinkEvent] = []
    for i in range(1, 18):
        got += answer_all(link, link.receive(frame(i % 8, b"R|%d\r" % i), 1.0), 1.0)
    assert [e.frame_number for e in got if isinstance(e, TextReceived)] == [
        i % 8 for i in range(1, 18)
    ]
    assert link.data_to_send() == ACK * 17


def test_lowercase_checksum_is_accepted() -> None:
    raw = frame(1, b"O|1|S1\r")
    lower = raw[:-4] + raw[-4:-2].lower() + b"\r\n"
    assert lower != raw
    link = established()
    assert texts(link.receive(lower, 1.0)) == [b"O|1|S1\r"]


def test_bad_checksum_is_naked_and_the_repetition_accepted() -> None:
    good = frame(1, MESSAGE)
    bad = good[:-4] + (b"00" if good[-4:-2] != b"00" else b"01") + b"\r\n"
    link = established()
    events = link.receive(bad, 1.0)
    assert len(events) == 1 and isinstance(events[0], FrameRejected)
    assert "checksum" in events[0].reason and events[0].raw == bad
    assert link.data_to_send() == NAK
    assert link.receive(good, 2.0) == [TextReceived(MESSAGE, 1)]


def test_wrong_frame_number_is_naked() -> None:
    link = established()
    events = link.receive(frame(3, MESSAGE), 1.0)
    assert [type(e) for e in events] == [FrameRejected]
    assert "expected 1" in events[0].reason  # type: ignore[union-attr]
    assert link.data_to_send() == NAK


def test_frame_0_right_after_establishment_is_not_a_repetition() -> None:
    link = established()
    assert [type(e) for e in link.receive(frame(0, MESSAGE), 1.0)] == [FrameRejected]
    assert link.data_to_send() == NAK


def test_repeated_intermediate_frame_is_acked_but_not_joined_twice() -> None:
    link = established()
    link.receive(frame(1, b"AAA", final=False), 1.0)
    assert link.receive(frame(1, b"AAA", final=False), 2.0) == [DuplicateFrame(1)]
    assert link.data_to_send() == ACK + ACK
    assert texts(link.receive(frame(2, b"BBB\r"), 3.0)) == [b"AAABBB\r"]


def test_repeated_final_frame_after_our_ack_is_acked_not_delivered_again() -> None:
    link = established()
    answer_all(link, link.receive(frame(1, MESSAGE), 1.0), 1.0)
    assert link.receive(frame(1, MESSAGE), 2.0) == [DuplicateFrame(1)]
    assert link.data_to_send() == ACK + ACK
    assert texts(link.receive(frame(2, b"L|1\r"), 3.0)) == [b"L|1\r"]


def test_repetition_is_recognised_across_the_wrap() -> None:
    link = established()
    for i in range(1, 9):  # ... 7, 0
        answer_all(link, link.receive(frame(i % 8, b"R\r"), 1.0), 1.0)
    assert link.receive(frame(0, b"R\r"), 1.0) == [DuplicateFrame(0)]
    assert texts(link.receive(frame(1, b"R\r"), 1.0)) == [b"R\r"]


def test_application_nak_asks_for_the_final_frame_again() -> None:
    link = established()
    link.receive(frame(1, b"AAA", final=False), 1.0)
    link.data_to_send()
    assert texts(link.receive(frame(2, b"BBB\r"), 1.0)) == [b"AAABBB\r"]
    assert link.acknowledge(False, 1.0) == []  # e.g. the journal is full
    assert link.data_to_send() == NAK
    assert link.receive(frame(2, b"BBB\r"), 2.0) == [TextReceived(b"AAABBB\r", 2)]
    link.acknowledge(True, 2.0)
    assert link.data_to_send() == ACK


def test_frame_longer_than_frame_size_is_naked() -> None:
    link = established(LinkSettings(frame_size=247))
    exact = frame(1, b"R|" + b"x" * 237 + b"\r")
    assert len(exact) == 247
    assert texts(link.receive(exact, 1.0)) == [exact[2:-5]]
    link.acknowledge(True, 1.0)
    link.data_to_send()
    over = frame(2, b"R|" + b"x" * 238 + b"\r")
    events = link.receive(over, 2.0)
    assert [type(e) for e in events] == [FrameRejected]
    assert events[0].reason == "frame of 248 bytes, more than 247"  # type: ignore[union-attr]
    assert link.data_to_send() == NAK


def test_endless_frame_is_held_to_frame_size_and_naked_at_its_lf() -> None:
    link = established(LinkSettings(frame_size=64_000))
    link.receive(STX + b"1" + b"y" * 100_000, 1.0)
    events = link.receive(b"\x0300\r\n", 1.0)
    assert [type(e) for e in events] == [FrameRejected]
    rejected = events[0]
    assert isinstance(rejected, FrameRejected)
    assert rejected.reason == "frame of 100007 bytes, more than 64000"
    assert len(rejected.raw) == 64_001
    assert link.data_to_send() == NAK
    assert texts(link.receive(frame(1, b"L|1\r"), 2.0)) == [b"L|1\r"]


def test_eot_ends_the_transfer_and_discards_an_unfinished_etb_sequence() -> None:
    link = established()
    link.receive(frame(1, b"R|1|^^^GL", final=False), 1.0)
    ended = TransferEnded(True, "EOT before the end of an ETB frame sequence", b"R|1|^^^GL")
    assert link.receive(EOT, 2.0) == [ended]
    assert link.state is LinkState.IDLE
    assert link.receive(ENQ, 3.0) == [TransferStarted()]  # the next transfer starts clean
    assert texts(link.receive(frame(1, b"L|1\r"), 3.0)) == [b"L|1\r"]


def test_eot_inside_a_frame_aborts() -> None:
    link = established()
    events = link.receive(STX + b"1H|\\^&" + EOT, 1.0)
    assert events == [TransferEnded(True, "EOT inside a frame", b"")]
    assert link.state is LinkState.IDLE


def test_eot_after_a_rejected_frame_aborts() -> None:
    link = established()
    link.receive(frame(5, MESSAGE), 1.0)
    assert link.receive(EOT, 2.0) == [TransferEnded(True, "EOT after a rejected frame", b"")]


def test_enq_and_junk_while_receiving_are_ignored() -> None:
    link = established()
    assert link.receive(ENQ, 1.0) == [Junk(ENQ)]
    assert link.receive(b"\r\n", 1.0) == [Junk(b"\r\n")]
    assert link.data_to_send() == b""
    assert link.state is LinkState.RECEIVING
    assert texts(link.receive(b"zz" + frame(1, MESSAGE), 1.0)) == [MESSAGE]


def test_stx_inside_a_frame_drops_the_fragment_without_a_reply() -> None:
    link = established()
    events = link.receive(STX + b"1H|\\^" + frame(1, MESSAGE), 1.0)
    assert events == [
        FrameRejected("frame cut short by STX", STX + b"1H|\\^"),
        TextReceived(MESSAGE, 1),
    ]
    assert link.data_to_send() == b""  # only the complete frame gets a reply, later


def test_bytes_arriving_before_acknowledge_are_held_then_processed() -> None:
    link = established()
    assert link.receive(frame(1, MESSAGE) + frame(2, b"L|1\r") + EOT, 1.0) == [
        TextReceived(MESSAGE, 1)
    ]
    assert link.acknowledge(True, 2.0) == [TextReceived(b"L|1\r", 2)]
    assert link.acknowledge(True, 3.0) == [TransferEnded(False, "EOT", b"")]
    assert link.data_to_send() == ACK + ACK


def test_bytes_held_before_acknowledge_are_bounded() -> None:
    link = established(LinkSettings(max_held_bytes=300))
    link.receive(frame(1, MESSAGE), 1.0)
    assert link.receive(b"y" * 200, 1.0) == []
    assert link.receive(b"x" * 200 + EOT, 1.0) == [Junk(b"x" * 100 + EOT)]
    assert link.acknowledge(True, 2.0) == [Junk(b"y" * 200 + b"x" * 100)]


def test_intermediate_frames_beyond_max_text_bytes_are_naked() -> None:
    """An instrument that never sends ETX cannot fill memory: past the limit, NAK."""
    link = established(LinkSettings(max_text_bytes=300))
    assert link.receive(frame(1, b"a" * 200, final=False), 1.0) == []
    assert link.data_to_send() == ACK
    events = link.receive(frame(2, b"b" * 200, final=False), 1.0)
    assert [type(e) for e in events] == [FrameRejected]
    assert "exceed 300 bytes" in events[0].reason  # type: ignore[union-attr]
    assert link.data_to_send() == NAK
    # the instrument gives up (EOT): the partial text is discarded with the transfer
    ended = link.receive(EOT, 2.0)
    assert ended[0] == TransferEnded(
        True, "EOT before the end of an ETB frame sequence", b"a" * 200
    )


# --- receiver timer (6.5.2.3) ---------------------------------------------------------


def test_receive_timeout_after_30_s_without_a_frame() -> None:
    link = established(now=0.0)
    assert link.tick(29.9) == []
    assert link.tick(30.0) == [TransferEnded(True, "no frame or EOT within 30 s", b"")]
    assert link.state is LinkState.IDLE
    assert link.next_deadline() is None


def test_receive_timer_restarts_on_every_frame_and_discards_etb_text() -> None:
    link = established(now=0.0)
    link.receive(frame(1, b"R|1|", final=False), 20.0)
    assert link.next_deadline() == 50.0
    link.receive(frame(5, b"junk"), 45.0)  # rejected, but a frame all the same
    assert link.next_deadline() == 75.0
    assert link.tick(74.0) == []
    assert link.tick(75.0) == [TransferEnded(True, "no frame or EOT within 30 s", b"R|1|")]


def test_no_receive_timer_while_the_application_journals() -> None:
    link = established(now=0.0)
    link.receive(frame(1, MESSAGE), 1.0)
    assert link.next_deadline() is None
    assert link.tick(1000.0) == []
    link.acknowledge(True, 1000.0)
    assert link.next_deadline() == 1030.0


# --- sending (6.2 - 6.4, as the sender) -----------------------------------------------


def sender(text: bytes = MESSAGE) -> AstmLink:
    """A link that has sent ENQ for ``text`` (ref "m") at t=0 and got the ACK at t=1."""
    link = AstmLink()
    assert link.send(text, "m", 0.0) == []
    assert link.data_to_send() == ENQ
    assert link.state is LinkState.AWAIT_ENQ_REPLY
    assert link.next_deadline() == 15.0
    assert link.receive(ACK, 1.0) == []
    return link


def test_send_goes_one_record_per_frame_then_eot() -> None:
    link = sender()
    records = MESSAGE.split(b"\r")[:-1]
    for i, record in enumerate(records, start=1):
        assert link.data_to_send() == frame(i, record + b"\r")
        assert link.state is LinkState.AWAIT_FRAME_REPLY
        assert link.next_deadline() == i + 15.0  # sent at t=i (the ACK before it)
        events = link.receive(ACK, 1.0 + i)
    assert events == [MessageSent("m")]
    assert link.data_to_send() == EOT
    assert link.state is LinkState.IDLE
    assert link.next_deadline() is None
    assert link.queued == 0


def test_long_record_goes_out_as_etb_frames_of_247_bytes() -> None:
    record = b"R|1|^^^GLU|" + b"9" * 600 + b"|mmol/l\r"
    link = sender(record)
    sent = []
    while link.state is LinkState.AWAIT_FRAME_REPLY:
        sent.append(link.data_to_send())
        link.receive(ACK, 2.0)
    assert [len(f) for f in sent] == [247, 247, 7 + len(record) - 480]
    parsed = [parse_frame(f) for f in sent]
    assert [p.final for p in parsed] == [False, False, True]
    assert b"".join(p.text for p in parsed) == record


def test_frame_numbers_wrap_when_sending() -> None:
    text = b"".join(b"R|%d\r" % i for i in range(1, 11))
    link = sender(text)
    numbers = []
    while link.state is LinkState.AWAIT_FRAME_REPLY:
        numbers.append(parse_frame(link.data_to_send()).number)
        link.receive(ACK, 2.0)
    assert numbers == [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]


def test_queued_messages_share_one_session_with_continuing_numbers() -> None:
    link = AstmLink()
    link.send(b"H|1\rL|1\r", "a", 0.0)
    link.send(b"H|2\rL|1\r", "b", 0.0)
    assert link.data_to_send() == ENQ  # one ENQ for both
    assert link.queued == 2
    link.receive(ACK, 0.0)
    wire, events = [], []
    while link.state is LinkState.AWAIT_FRAME_REPLY:
        wire.append(link.data_to_send())
        events += link.receive(ACK, 0.0)
    assert wire == split_records(b"H|1\rL|1\rH|2\rL|1\r")
    assert events == [MessageSent("a"), MessageSent("b")]
    assert link.data_to_send() == EOT


def test_nak_repeats_the_frame_and_six_refusals_abort() -> None:
    link = sender(MESSAGE)
    link.send(b"H|next\rL|1\r", "next", 0.5)
    first = link.data_to_send()
    for attempt in range(2, 7):
        assert link.receive(NAK, float(attempt)) == []
        assert link.data_to_send() == first, attempt  # same frame, same number
    assert link.receive(NAK, 7.0) == [SendFailed("m", "frame refused 6 times")]
    assert link.data_to_send() == EOT
    assert link.state is LinkState.IDLE
    assert link.queued == 1
    assert link.next_deadline() == 17.0  # the next message waits 10 s
    assert link.tick(16.9) == []
    assert link.tick(17.0) == []
    assert link.data_to_send() == ENQ


def test_any_other_reply_to_a_frame_counts_as_nak() -> None:
    link = sender()
    first = link.data_to_send()
    assert link.receive(b"?!", 2.0) == []
    assert link.data_to_send() == first
    assert link.receive(ENQ, 3.0) == []
    assert link.data_to_send() == first
    link.receive(ACK, 4.0)
    assert parse_frame(link.data_to_send()).number == 2


def test_a_nak_after_acks_counts_attempts_per_frame() -> None:
    link = sender(b"A\rB\r")
    link.data_to_send()
    for _ in range(5):
        link.receive(NAK, 2.0)
    link.receive(ACK, 2.0)  # frame 1 got through on its 6th sending
    for _ in range(5):
        assert link.receive(NAK, 3.0) == []  # frame 2 starts with a fresh count
    assert link.receive(ACK, 3.0) == [MessageSent("m")]


def test_no_reply_to_a_frame_within_15_s_aborts() -> None:
    link = sender()
    link.data_to_send()
    assert link.next_deadline() == 16.0
    assert link.tick(15.9) == []
    assert link.tick(16.0) == [SendFailed("m", "no reply to a frame within 15 s")]
    assert link.data_to_send() == EOT
    assert link.state is LinkState.IDLE
    assert link.next_deadline() is None  # nothing else queued


def test_nak_to_enq_retries_every_10_s_with_an_event_each_time() -> None:
    link = AstmLink()
    link.send(MESSAGE, "m", 0.0)
    now = 0.0
    for _ in range(4):
        assert link.data_to_send() == ENQ
        assert link.receive(NAK, now + 1) == [EstablishmentFailed("ENQ answered NAK", now + 11)]
        assert link.state is LinkState.IDLE
        assert link.next_deadline() == now + 11
        assert link.tick(now + 10.9) == []
        now += 11
        assert link.tick(now) == []
    assert link.data_to_send() == ENQ
    assert link.queued == 1


def test_no_reply_to_enq_terminates_and_retries() -> None:
    link = AstmLink()
    link.send(MESSAGE, "m", 0.0)
    link.data_to_send()
    assert link.tick(15.0) == [EstablishmentFailed("no reply to ENQ within 15 s", 25.0)]
    assert link.data_to_send() == EOT
    assert link.tick(25.0) == []
    assert link.data_to_send() == ENQ


def test_stray_replies_to_enq_are_ignored() -> None:
    link = AstmLink()
    link.send(MESSAGE, "m", 0.0)
    link.data_to_send()
    assert link.receive(EOT + b"x", 1.0) == [Junk(EOT), Junk(b"x")]
    assert link.state is LinkState.AWAIT_ENQ_REPLY
    assert link.data_to_send() == b""


def test_message_queued_while_receiving_goes_after_the_instruments_eot() -> None:
    link = established()
    assert link.send(MESSAGE, "m", 1.0) == []
    assert link.data_to_send() == b""
    link.receive(frame(1, b"Q|1|^S-1\r"), 2.0)
    assert link.send(b"H|2\r", "m2", 2.5) == []  # while the application journals
    link.acknowledge(True, 3.0)
    assert link.data_to_send() == ACK
    assert link.receive(EOT, 4.0) == [TransferEnded(False, "EOT", b"")]
    assert link.data_to_send() == ENQ
    assert link.state is LinkState.AWAIT_ENQ_REPLY


@pytest.mark.parametrize("text", [b"", b"H|1\nL|1\r", b"H|\x02\r", b"H|\x17\r"])
def test_send_refuses_empty_text_and_restricted_characters(text: bytes) -> None:
    with pytest.raises(ValueError, match=r"empty|restricted"):
        AstmLink().send(text, "m", 0.0)


# --- receiver interrupt (6.3.5) -------------------------------------------------------


def test_receiver_interrupt_finishes_the_message_then_yields_the_line() -> None:
    link = sender(b"H|1\rL|1\r")
    link.send(b"H|2\rL|1\r", "later", 0.5)
    assert link.data_to_send() == frame(1, b"H|1\r")
    assert link.receive(EOT, 2.0) == [InterruptRequested()]  # EOT acknowledges frame 1
    assert link.data_to_send() == frame(2, b"L|1\r")  # the current message is finished
    assert link.receive(ACK, 3.0) == [MessageSent("m")]
    assert link.data_to_send() == EOT
    assert link.state is LinkState.IDLE
    assert link.next_deadline() == 18.0  # 15 s unless the instrument takes its turn
    assert link.receive(ENQ, 4.0) == [TransferStarted()]
    link.receive(frame(1, b"R|1\r"), 5.0)
    link.acknowledge(True, 5.0)
    link.receive(EOT, 6.0)
    assert link.data_to_send() == ACK + ACK + ENQ  # our turn again at once


def test_receiver_interrupt_without_an_instrument_transfer_waits_15_s() -> None:
    link = sender(b"H|1\r")
    link.send(b"H|2\r", "later", 0.5)
    link.data_to_send()
    assert link.receive(EOT, 2.0) == [InterruptRequested(), MessageSent("m")]
    assert link.data_to_send() == EOT
    assert link.tick(16.9) == []
    assert link.tick(17.0) == []
    assert link.data_to_send() == ENQ


# --- contention (6.2.7) ---------------------------------------------------------------


def test_contention_the_instrument_goes_first_and_we_wait_20_s_after() -> None:
    link = AstmLink()
    link.send(MESSAGE, "m", 0.0)
    assert link.data_to_send() == ENQ
    assert link.receive(ENQ, 0.1) == [ContentionLost()]
    assert link.data_to_send() == b""  # the colliding ENQ gets no reply (6.2.7.1)
    assert link.state is LinkState.IDLE
    assert link.receive(ENQ, 1.1) == [TransferStarted()]  # its next ENQ, after >= 1 s
    assert link.data_to_send() == ACK
    answer_all(link, link.receive(frame(1, b"R|1\r"), 2.0), 2.0)
    assert link.receive(EOT, 3.0) == [TransferEnded(False, "EOT", b"")]
    assert link.data_to_send() == ACK
    assert link.next_deadline() == 23.0
    assert link.tick(22.9) == []
    assert link.data_to_send() == b""
    assert link.tick(23.0) == []
    assert link.data_to_send() == ENQ
    link.receive(ACK, 24.0)
    assert link.data_to_send() == frame(1, b"H|\\^&|||medgw\r")


def test_contention_without_a_second_enq_retries_after_20_s() -> None:
    link = AstmLink()
    link.send(MESSAGE, "m", 0.0)
    link.data_to_send()
    link.receive(ENQ, 0.0)
    assert link.next_deadline() == 20.0
    link.tick(20.0)
    assert link.data_to_send() == ENQ


def test_contention_hold_is_forgotten_once_we_get_the_line() -> None:
    link = AstmLink()
    link.send(b"H|1\r", "m", 0.0)
    link.data_to_send()
    link.receive(ENQ, 0.0)
    link.tick(20.0)
    link.receive(ACK, 20.0)
    link.receive(ACK, 20.0)  # message sent, EOT
    link.data_to_send()
    link.receive(ENQ, 30.0)
    answer_all(link, link.receive(frame(1, b"R|1\r"), 31.0), 31.0)
    link.send(b"H|2\r", "m2", 31.5)
    link.receive(EOT, 32.0)
    assert link.data_to_send() == ACK + ACK + ENQ  # no second 20 s wait


# --- relaxations ----------------------------------------------------------------------


def test_bare_lf_is_refused_by_default_and_accepted_when_allowed() -> None:
    bare = frame(1, MESSAGE)[:-2] + b"\n"
    strict = established()
    assert [type(e) for e in strict.receive(bare, 1.0)] == [FrameRejected]
    assert strict.data_to_send() == NAK
    relaxed = established(LinkSettings(allow_bare_lf=True))
    assert relaxed.receive(bare, 1.0) == [TextReceived(MESSAGE, 1)]


def test_missing_frame_number_is_refused_by_default_and_accepted_when_allowed() -> None:
    body = MESSAGE + b"\x03"
    unnumbered = STX + body + b"%02X\r\n" % (sum(body) % 256)
    strict = established()
    assert [type(e) for e in strict.receive(unnumbered, 1.0)] == [FrameRejected]
    assert strict.data_to_send() == NAK
    relaxed = established(LinkSettings(allow_missing_number=True))
    assert relaxed.receive(unnumbered, 1.0) == [TextReceived(MESSAGE, -1)]
    relaxed.acknowledge(True, 1.0)
    assert relaxed.receive(unnumbered, 2.0) == [TextReceived(MESSAGE, -1)]  # no sequence
    assert relaxed.data_to_send() == ACK


# --- captures -------------------------------------------------------------------------

SESSIONS = [
    "07_astm_roche_cobas_e411_session.bin",
    "08_astm_hitachi_h7600_qc_session.bin",
    "09_astm_abbott_architect_i1000sr_session.bin",
    "10_astm_thermo_indiko_host_query.bin",
]
BARE_LF = ["01_astm_roche_cobas_c111.frames", "02_astm_horiba_pentra_xlr.frames"]


def capture(name: str) -> tuple[bytes, LinkSettings]:
    data = (SAMPLES / name).read_bytes()
    if name in BARE_LF:
        return ENQ + data + EOT, LinkSettings(allow_bare_lf=True)
    return data, LinkSettings()


def replay(name: str, chunks: list[bytes]) -> tuple[list[LinkEvent], bytes]:
    data, link_settings = capture(name)
    assert b"".join(chunks) == data
    link = AstmLink(link_settings)
    events: list[LinkEvent] = []
    for i, chunk in enumerate(chunks):
        events += answer_all(link, link.receive(chunk, float(i)), float(i))
    assert link.state is LinkState.IDLE
    return events, link.data_to_send()


def check_replay(name: str, events: list[LinkEvent], out: bytes) -> None:
    expected = MANIFEST[name]["expected"]
    assert out == ACK * (expected["frames"] + 1)  # the ENQ and each frame, no NAK
    assert record_types(texts(events)) == Counter(expected["record_types"])
    assert not of_type(events, FrameRejected) and not of_type(events, Junk)
    assert events[0] == TransferStarted()
    assert events[-1] == TransferEnded(False, "EOT", b"")


@pytest.mark.parametrize("name", SESSIONS + BARE_LF)
def test_capture_replayed_byte_by_byte(name: str) -> None:
    data, _ = capture(name)
    events, out = replay(name, [data[i : i + 1] for i in range(len(data))])
    check_replay(name, events, out)


@pytest.mark.parametrize("name", SESSIONS + BARE_LF)
@pytest.mark.parametrize("seed", range(5))
def test_capture_replayed_in_random_chunks(name: str, seed: int) -> None:
    data, _ = capture(name)
    rng = random.Random(seed)
    events, out = replay(name, in_chunks(data, [rng.randint(1, 97) for _ in range(50)]))
    check_replay(name, events, out)


@pytest.mark.parametrize("name", SESSIONS + BARE_LF)
def test_capture_replayed_in_one_chunk(name: str) -> None:
    data, _ = capture(name)
    check_replay(name, *replay(name, [data]))


@given(st.sampled_from(SESSIONS + BARE_LF), st.lists(st.integers(1, 300), min_size=1))
@settings(max_examples=60, deadline=None)
def test_capture_replayed_in_any_chunks(name: str, sizes: list[int]) -> None:
    data, _ = capture(name)
    check_replay(name, *replay(name, in_chunks(data, sizes)))


def test_e411_247_byte_etb_frame_split_inside_a_field_gives_one_text() -> None:
    name = "07_astm_roche_cobas_e411_session.bin"
    data = (SAMPLES / name).read_bytes()
    first, second = (parse_frame(f) for f in iter_frames(data))
    events, _ = replay(name, [data[i : i + 1] for i in range(len(data))])
    assert texts(events) == [first.text + second.text]
    assert b"R|2|^^^900/1/not|-1^0.521|COI" in texts(events)[0]


def test_pentra_capture_rolls_frame_numbers_over() -> None:
    events, _ = replay(BARE_LF[1], [capture(BARE_LF[1])[0]])
    numbers = [e.frame_number for e in events if isinstance(e, TextReceived)]
    assert numbers == [(1 + i) % 8 for i in range(28)]


def test_yumizen_large_frames_are_naked_at_247() -> None:
    data = ENQ + (SAMPLES / "03_astm_horiba_yumizen_h500.frames").read_bytes()
    link = AstmLink(LinkSettings(allow_bare_lf=True))
    events = answer_all(link, link.receive(data, 0.0), 0.0)
    rejected = [e for e in events if isinstance(e, FrameRejected)]
    assert rejected and all("more than 247" in e.reason for e in rejected[:1])


# --- two links back to back -----------------------------------------------------------


def run_pair(
    text: bytes,
    frame_size: int,
    *,
    corrupt: tuple[str, int, int] | None = None,
    chunk: int = 1 << 30,
) -> tuple[list[LinkEvent], list[LinkEvent]]:
    """Sender A to receiver B; ``corrupt`` = (direction, offset, xor) damages one byte."""
    link_settings = LinkSettings(frame_size=frame_size)
    a, b = AstmLink(link_settings), AstmLink(link_settings)
    got_a, got_b = a.send(text, "msg", 0.0), []
    now, sent = 0.0, {"a": 0, "b": 0}

    def wire(direction: str, data: bytes) -> bytes:
        if corrupt and corrupt[0] == direction:
            offset = corrupt[1] - sent[direction]
            if 0 <= offset < len(data):
                data = data[:offset] + bytes([data[offset] ^ corrupt[2]]) + data[offset + 1 :]
        sent[direction] += len(data)
        return data

    for _ in range(5000):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if out_a:
            for piece in in_chunks(wire("a", out_a), [chunk]):
                got_b += answer_all(b, b.receive(piece, now), now)
        if out_b:
            got_a += a.receive(wire("b", out_b), now)
        if out_a or out_b:
            continue
        deadlines = [d for d in (a.next_deadline(), b.next_deadline()) if d is not None]
        if not deadlines:
            break
        now = max(now, min(deadlines))
        got_a += a.tick(now)
        got_b += answer_all(b, b.tick(now), now)
    else:
        pytest.fail("the links never settled")
    assert a.state is LinkState.IDLE and b.state is LinkState.IDLE
    return got_a, got_b


PRINTABLE = bytes(range(0x20, 0x7F)) + bytes(range(0xA0, 0x100))  # printable latin-1
record_text = st.integers(1, 700).flatmap(
    lambda n: st.binary(min_size=n, max_size=n).map(
        lambda raw: bytes(PRINTABLE[c % len(PRINTABLE)] for c in raw)
    )
)
message_text = st.lists(record_text, min_size=1, max_size=6).map(
    lambda records: b"".join(r + b"\r" for r in records)
)


@given(message_text, st.sampled_from([247, 64_000]), st.integers(1, 300))
@settings(max_examples=80, deadline=None)
def test_any_message_crosses_two_links_intact(text: bytes, frame_size: int, chunk: int) -> None:
    got_a, got_b = run_pair(text, frame_size, chunk=chunk)
    assert got_a == [MessageSent("msg")]
    assert b"".join(texts(got_b)) == text
    assert record_types(texts(got_b)) == record_types([text])
    assert not of_type(got_b, FrameRejected)


@given(message_text, st.sampled_from([247, 64_000]), st.sampled_from(["a", "b"]), st.data())
@settings(max_examples=200, deadline=None)
def test_one_damaged_byte_is_repaired(
    text: bytes, frame_size: int, direction: str, data: st.DataObject
) -> None:
    """Frames: by NAK and repetition; replies and ENQ/EOT: by repetition or the timers."""
    frames = split_records(text, frame_size=frame_size)
    clean = ENQ + b"".join(frames) + EOT if direction == "a" else ACK * (len(frames) + 1)
    offset = data.draw(st.integers(0, len(clean) - 1), label="offset")
    xor = data.draw(st.integers(1, 255), label="xor")
    if direction == "a":
        # A damaged STX or LF, or an EOT or STX made inside a frame, breaks the framing
        # itself: the sender's timer then aborts the message (see the test below).
        assume(clean[offset] not in (0x02, 0x0A) and clean[offset] ^ xor not in (0x02, 0x04))
    got_a, got_b = run_pair(text, frame_size, corrupt=(direction, offset, xor))
    assert of_type(got_a, MessageSent) == [MessageSent("msg")]
    assert not of_type(got_a, SendFailed)
    assert b"".join(texts(got_b)) == text
    if direction == "a" and 0 < offset < len(clean) - 1:  # inside a frame: one NAK repairs it
        ends = [len(ENQ + b"".join(frames[: i + 1])) for i in range(len(frames))]
        checksum_digits = {end - k for end in ends for k in (3, 4)}
        lowercased = xor == 0x20 and clean[offset] in b"ABCDEF" and offset in checksum_digits
        assert len(of_type(got_b, FrameRejected)) == (0 if lowercased else 1)


def test_damaged_frame_is_naked_and_repeated() -> None:
    text = b"H|\\^&\rR|1|^^^GLU|5.4\rL|1|N\r"
    got_a, got_b = run_pair(text, 247, corrupt=("a", 1 + 3, 0x01))  # ENQ, STX, FN, 'H'->'I'
    assert got_a == [MessageSent("msg")]
    assert [type(e) for e in of_type(got_b, FrameRejected)] == [FrameRejected]
    assert b"".join(texts(got_b)) == text


@pytest.mark.parametrize("what", ["STX", "LF"])
def test_damaged_framing_aborts_the_message_after_the_reply_timeout(what: str) -> None:
    text = b"H|1\rL|1\r"
    offset = 1 if what == "STX" else len(ENQ + frame(1, b"H|1\r")) - 1
    got_a, got_b = run_pair(text, 247, corrupt=("a", offset, 0x40))
    assert got_a == [SendFailed("msg", "no reply to a frame within 15 s")]
    ended = of_type(got_b, TransferEnded)
    if what == "STX":  # the frame was junk to the receiver; the sender's EOT ended the transfer
        assert ended == [TransferEnded(False, "EOT", b"")] and of_type(got_b, Junk)
    else:  # the frame never ended: the EOT came inside it
        assert ended == [TransferEnded(True, "EOT inside a frame", b"")]
    assert texts(got_b) == []


def test_lost_ack_gives_a_repetition_that_is_not_delivered_twice() -> None:
    text = b"H|1\rL|1\r"
    got_a, got_b = run_pair(text, 247, corrupt=("b", 1, ACK[0] ^ NAK[0]))  # 2nd ACK -> NAK
    assert got_a == [MessageSent("msg")]
    assert of_type(got_b, DuplicateFrame) == [DuplicateFrame(1)]
    assert texts(got_b) == [b"H|1\r", b"L|1\r"]


def test_large_record_crosses_in_64000_byte_frames() -> None:
    text = b"M|1|" + b"Z" * 130_000 + b"\r" + b"L|1|N\r"
    got_a, got_b = run_pair(text, 64_000, chunk=4096)
    assert got_a == [MessageSent("msg")]
    assert texts(got_b) == [text[: text.index(b"\r") + 1], b"L|1|N\r"]
