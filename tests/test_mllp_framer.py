"""MLLP framer (HL7 v2.5.1 Appendix C): byte fixtures in, events out."""

from hypothesis import given
from hypothesis import strategies as st

from drivers.hl7.mllp import (
    FrameReceived,
    FramerEvent,
    FrameTooLarge,
    FrameTruncated,
    JunkReceived,
    MllpFramer,
    frame,
)

MSG = b"MSH|^~\\&|LAB|HOSP|LIS|HOSP|20240101120000||ORU^R01|42|P|2.5.1\rOBX|1|NM|GLU||5.4|mmol/L\r"


def feed_all(framer: MllpFramer, chunks: list[bytes]) -> list[FramerEvent]:
    events: list[FramerEvent] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events


def test_frame_wraps_message() -> None:
    assert frame(b"abc") == b"\x0babc\x1c\r"


def test_single_message() -> None:
    framer = MllpFramer()
    assert framer.feed(frame(MSG)) == [FrameReceived(MSG)]
    assert framer.buffered == 0


def test_split_at_every_position() -> None:
    stream = frame(MSG)
    for cut in range(len(stream) + 1):
        framer = MllpFramer()
        events = feed_all(framer, [stream[:cut], stream[cut:]])
        assert events == [FrameReceived(MSG)], cut
        assert framer.buffered == 0


def test_one_byte_at_a_time() -> None:
    stream = frame(MSG) + frame(b"second")
    framer = MllpFramer()
    events = feed_all(framer, [stream[i : i + 1] for i in range(len(stream))])
    assert events == [FrameReceived(MSG), FrameReceived(b"second")]


def test_buffered_counts_incomplete_frame() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bMSH|^~") == []
    assert framer.buffered == 6
    assert framer.feed(b"\\&\x1c\r") == [FrameReceived(b"MSH|^~\\&")]
    assert framer.buffered == 0


def test_many_messages_in_one_feed() -> None:
    messages = [MSG.replace(b"|42|", f"|{i}|".encode()) for i in range(50)]
    events = MllpFramer().feed(b"".join(frame(m) for m in messages))
    assert events == [FrameReceived(m) for m in messages]


def test_junk_before_start_block() -> None:
    events = MllpFramer().feed(b"GET / HTTP/1.0" + frame(MSG))
    assert events == [JunkReceived(b"GET / HTTP/1.0", 14), FrameReceived(MSG)]


def test_junk_keeps_head_and_counts_size() -> None:
    events = MllpFramer().feed(b"x" * 10_000)
    assert events == [JunkReceived(b"x" * 4096, 10_000)]


def test_junk_split_across_feeds_is_reported_per_feed() -> None:
    events = feed_all(MllpFramer(), [b"abc", b"de" + frame(b"m")])
    assert events == [JunkReceived(b"abc", 3), JunkReceived(b"de", 2), FrameReceived(b"m")]


def test_whitespace_between_frames_dropped() -> None:
    stream = b"\r\n" + frame(b"one") + b"\n\r\n  " + frame(b"two") + b"\r\n"
    assert MllpFramer().feed(stream) == [FrameReceived(b"one"), FrameReceived(b"two")]


def test_fs_and_cr_split_across_feeds() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bone\x1c") == [FrameReceived(b"one")]
    # The CR that completes the end block is consumed, not reported as junk.
    assert framer.feed(b"\rX\x0btwo\x1c\r") == [JunkReceived(b"X", 1), FrameReceived(b"two")]


def test_cr_after_fs_consumed_when_next_feed_is_empty_first() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bone\x1c") == [FrameReceived(b"one")]
    assert framer.feed(b"") == []
    assert framer.feed(b"\rZ") == [JunkReceived(b"Z", 1)]


def test_fs_without_cr_ends_frame() -> None:
    events = MllpFramer().feed(b"\x0bone\x1c\x0btwo\x1cjunk\x0bthree\x1c\r")
    assert events == [
        FrameReceived(b"one"),
        FrameReceived(b"two"),
        JunkReceived(b"junk", 4),
        FrameReceived(b"three"),
    ]


def test_start_block_inside_frame_truncates_it() -> None:
    framer = MllpFramer()
    events = feed_all(framer, [b"\x0bMSH|partial", b"\x0b" + MSG + b"\x1c\r"])
    assert events == [FrameTruncated(b"MSH|partial"), FrameReceived(MSG)]


def test_truncation_in_one_feed() -> None:
    events = MllpFramer().feed(b"\x0babc\x0b\x0bdef\x1c\r")
    assert events == [FrameTruncated(b"abc"), FrameTruncated(b""), FrameReceived(b"def")]


def test_oversize_frame_then_next_message() -> None:
    framer = MllpFramer(max_size=10_000)
    big = bytes(range(0x20, 0x100)) * 100  # 22,400 bytes, no VT or FS
    events = feed_all(framer, [b"\x0b" + big[:5000], big[5000:], b"\x1c\r" + frame(MSG)])
    assert events == [FrameTooLarge(big[:4096], len(big)), FrameReceived(MSG)]
    assert framer.buffered == 0


def test_oversize_frame_in_one_feed() -> None:
    big = b"y" * 20
    events = MllpFramer(max_size=19).feed(frame(big) + frame(b"ok"))
    assert events == [FrameTooLarge(big, 20), FrameReceived(b"ok")]


def test_frame_of_exactly_max_size_is_received() -> None:
    framer = MllpFramer(max_size=20)
    assert feed_all(framer, [b"\x0b" + b"a" * 10, b"a" * 10 + b"\x1c"]) == [
        FrameReceived(b"a" * 20)
    ]


def test_oversize_memory_is_bounded_and_reported_at_new_start_block() -> None:
    framer = MllpFramer(max_size=100_000)
    events = feed_all(framer, [b"\x0b"] + [b"z" * 65536] * 10)
    assert events == []
    assert framer.buffered == 4096
    events = framer.feed(b"\x0b" + MSG + b"\x1c\r")
    assert events == [FrameTooLarge(b"z" * 4096, 655_360), FrameReceived(MSG)]


def test_twenty_megabyte_message_in_64k_chunks() -> None:
    body = b"MSH|^~\\&|\r" + b"OBX|1|ED|IMG||" + b"A" * 20_000_000 + b"\r"
    stream = frame(body)
    framer = MllpFramer()
    events = feed_all(framer, [stream[i : i + 65536] for i in range(0, len(stream), 65536)])
    assert len(events) == 1
    assert isinstance(events[0], FrameReceived)
    assert events[0].data == body


messages_strategy = st.lists(
    st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")),
    max_size=8,
)


@given(messages=messages_strategy, data=st.data())
def test_any_split_yields_the_messages(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    framer = MllpFramer()
    events = feed_all(framer, chunks)
    assert events == [FrameReceived(m) for m in messages]
    assert framer.buffered == 0
