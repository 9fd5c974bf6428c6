"""ASTM E1381 frames (section 6.3): checksum, building, reading and cutting, byte fixtures."""

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.astm.frames import (
    FRAME_OVERHEAD,
    LEGACY_FRAME_SIZE,
    RESTRICTED,
    Frame,
    FrameError,
    build_frame,
    checksum,
    iter_frames,
    parse_frame,
    split_message,
    split_records,
)

SAMPLES = Path("/work/shared/samples/lab")
MANIFEST = {e["file"]: e for e in json.loads((SAMPLES / "MANIFEST.json").read_text())}

# the last frame of capture 10 (Thermo Indiko): "3L|1|N" CR ETX sums to 518 = 0x206 -> "06"
L_FRAME = b"\x023L|1|N\r\x0306\r\n"

text_bytes = st.binary(max_size=600).filter(lambda b: not RESTRICTED.intersection(b))


def test_checksum_is_sum_modulo_256_in_uppercase_hex() -> None:
    assert checksum(b"") == b"00"
    assert checksum(b"3L|1|N\r\x03") == b"06"
    assert checksum(bytes([0xFF, 0xFF])) == b"FE"  # 510 % 256 = 254
    assert checksum(b"\x03" * 100) == b"2C"  # 300 % 256 = 44


def test_build_frame_layout() -> None:
    assert build_frame(3, b"L|1|N\r", final=True) == L_FRAME
    etb = build_frame(2, b"abc", final=False)
    assert etb[:1] == b"\x02" and etb[1:2] == b"2" and etb[5:6] == b"\x17"
    assert etb[-2:] == b"\r\n"
    assert build_frame(9, b"x", final=True)[1:2] == b"1"  # numbers wrap modulo 8


def test_parse_frame_reads_number_text_and_kind() -> None:
    assert parse_frame(L_FRAME) == Frame(3, b"L|1|N\r", final=True)
    assert parse_frame(build_frame(7, b"R|1", final=False)) == Frame(7, b"R|1", final=False)


def test_lowercase_checksum_accepted() -> None:
    frame = build_frame(3, b"O|1|S1\r", final=True)
    body, digits = frame[:-4], frame[-4:-2]
    assert any(c in b"ABCDEF" for c in digits), "pick a text whose checksum has a letter"
    assert parse_frame(body + digits.lower() + b"\r\n") == Frame(3, b"O|1|S1\r", final=True)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"3L|1|N\r\x0306\r\n", "STX"),
        (b"\x023L|1|N\r\x0306\n", "CR LF"),
        (b"\x023L|1|N\r\x0307\r\n", "checksum mismatch"),
        (b"\x023L|1|N\r\x0508\r\n", "ETX or ETB"),
        (b"\x02\x0307\r\n", "too short"),
        (b"\x02", "STX"),
    ],
)
def test_parse_frame_errors(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_frame(frame)


def test_frame_number_must_be_a_digit_0_to_7() -> None:
    body = b"8L|1|N\r\x03"
    with pytest.raises(FrameError, match="frame number"):
        parse_frame(b"\x02" + body + checksum(body) + b"\r\n")


def test_relaxations() -> None:
    bare = L_FRAME[:-2] + b"\n"
    with pytest.raises(FrameError):
        parse_frame(bare)
    assert parse_frame(bare, allow_bare_lf=True) == Frame(3, b"L|1|N\r", final=True)
    body = b"L|1|N\r\x03"
    unnumbered = b"\x02" + body + checksum(body) + b"\r\n"
    with pytest.raises(FrameError):
        parse_frame(unnumbered)
    assert parse_frame(unnumbered, allow_missing_number=True) == Frame(-1, b"L|1|N\r", True)


@given(st.integers(0, 7), text_bytes, st.booleans())
def test_build_parse_round_trip(number: int, text: bytes, final: bool) -> None:
    assert parse_frame(build_frame(number, text, final=final)) == Frame(number, text, final)


def test_split_message_at_247_cuts_inside_a_field() -> None:
    text = b"H|\\^&\r" + b"R|1|^^^GLU|" + b"5.4" * 100 + b"|mmol/l\r" + b"L|1|N\r"
    frames = split_message(text, frame_size=LEGACY_FRAME_SIZE)
    assert [len(f) for f in frames[:-1]] == [247] * (len(frames) - 1)
    parsed = [parse_frame(f) for f in frames]
    assert [p.number for p in parsed] == [1, 2][: len(parsed)]
    assert [p.final for p in parsed] == [False] * (len(parsed) - 1) + [True]
    assert b"".join(p.text for p in parsed) == text
    assert not parsed[0].text.endswith(b"\r")  # the cut falls inside the R record


def test_split_message_numbers_wrap_and_start_where_asked() -> None:
    frames = split_message(b"x" * 100, frame_size=FRAME_OVERHEAD + 10, first_number=5)
    assert [parse_frame(f).number for f in frames] == [5, 6, 7, 0, 1, 2, 3, 4, 5, 6]


def test_split_message_empty_and_too_small() -> None:
    assert split_message(b"") == [build_frame(1, b"", final=True)]
    with pytest.raises(ValueError, match="no room"):
        split_message(b"x", frame_size=FRAME_OVERHEAD)


@given(text_bytes, st.integers(FRAME_OVERHEAD + 1, 300))
def test_split_message_round_trip(text: bytes, frame_size: int) -> None:
    frames = split_message(text, frame_size=frame_size)
    assert all(len(f) <= frame_size for f in frames)
    assert b"".join(parse_frame(f).text for f in frames) == text


def test_split_records_one_record_per_frame() -> None:
    text = b"H|\\^&\rP|1\r" + b"R|1|" + b"9" * 300 + b"\r" + b"L|1|N\r"
    frames = split_records(text, frame_size=247)
    parsed = [parse_frame(f) for f in frames]
    assert [p.number for p in parsed] == [1, 2, 3, 4, 5]
    assert [p.final for p in parsed] == [True, True, False, True, True]
    assert [p.text for p in parsed][:2] == [b"H|\\^&\r", b"P|1\r"]
    assert parsed[2].text + parsed[3].text == b"R|1|" + b"9" * 300 + b"\r"
    assert len(frames[2]) == 247
    assert split_records(b"") == []
    assert [parse_frame(f).text for f in split_records(b"A\rB")] == [b"A\r", b"B"]


def test_restricted_characters_of_section_6_6() -> None:
    assert {0x02, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x15, 0x17} <= RESTRICTED
    assert 0x0D not in RESTRICTED  # CR ends records
    assert not RESTRICTED.intersection(b"|\\^&")


def test_iter_frames_ignores_bytes_between_frames() -> None:
    data = (SAMPLES / "07_astm_roche_cobas_e411_session.bin").read_bytes()
    frames = iter_frames(data)
    assert len(frames) == 2
    assert frames[0].startswith(b"\x02") and frames[0].endswith(b"\r\n")
    assert len(frames[0]) == 247
    assert iter_frames(b"\x05junk") == []
    assert iter_frames(b"\x05\x021abc") == [b"\x021abc"]  # an unterminated tail is kept


@pytest.mark.parametrize(
    "name",
    [
        "07_astm_roche_cobas_e411_session.bin",
        "08_astm_hitachi_h7600_qc_session.bin",
        "09_astm_abbott_architect_i1000sr_session.bin",
        "10_astm_thermo_indiko_host_query.bin",
        "01_astm_roche_cobas_c111.frames",
        "02_astm_horiba_pentra_xlr.frames",
    ],
)
def test_captures_parse_as_the_manifest_says(name: str) -> None:
    expected = MANIFEST[name]["expected"]
    frames = [
        parse_frame(f, allow_bare_lf=True) for f in iter_frames((SAMPLES / name).read_bytes())
    ]
    assert len(frames) == expected["frames"]
    assert sum(not f.final for f in frames) == expected["etb_frames"]
    assert frames[0].number == expected["first_fn"]
    first = expected["first_fn"]
    assert [f.number for f in frames] == [(first + i) % 8 for i in range(len(frames))]


def test_e411_frame_split_inside_a_field() -> None:
    data = (SAMPLES / "07_astm_roche_cobas_e411_session.bin").read_bytes()
    first, second = (parse_frame(f) for f in iter_frames(data))
    assert not first.final and second.final
    assert first.text.endswith(b"R|2|^^^900/1/not|-")
    assert second.text.startswith(b"1^0.521|COI")
