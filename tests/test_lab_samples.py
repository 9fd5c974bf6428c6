"""Real analyzer captures (samples/lab) against their MANIFEST: frames, records, HL7 segments."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from lab_samples import SAMPLES, astm_prefixes, capture, entry, manifest, read

from drivers.astm import frames
from drivers.astm.codec import (
    AssembledMessage,
    AssemblyError,
    AstmError,
    Delimiters,
    MessageAssembler,
    decode_records,
)
from drivers.hl7.mllp import FrameReceived, MllpFramer

ASTM = astm_prefixes()
HL7 = ["11", "12", "13"]
PROPRIETARY = ["14", "15", "16"]


def test_manifest_covers_every_sample() -> None:
    files = {p.name for p in SAMPLES.iterdir()} - {"MANIFEST.json", "README.md"}
    assert files == {e["file"] for e in manifest()}
    assert ASTM == ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]


@pytest.mark.parametrize("prefix", ASTM + HL7 + PROPRIETARY)
def test_file_is_the_one_the_manifest_describes(prefix: str) -> None:
    data = read(prefix)
    assert len(data) == entry(prefix)["bytes"]
    assert hashlib.sha256(data).hexdigest() == entry(prefix)["sha256"]


def frame_numbers_run_on(numbers: list[int]) -> bool:
    """E1381 section 6.3.2: frame numbers start at 1 and run 1..7, 0, 1, ..."""
    return numbers == [(i + 1) % 8 for i in range(len(numbers))]


@pytest.mark.parametrize("prefix", ASTM)
def test_astm_frames_match_manifest(prefix: str) -> None:
    expected = entry(prefix)["expected"]
    cap = capture(prefix)  # parse_frame raises on any bad checksum: bad_checksums == 0
    assert expected["bad_checksums"] == 0
    assert len(cap.stored) == len(cap.parsed) == expected["frames"]
    assert max(len(f) for f in cap.stored) == expected["max_frame_len"]
    assert sum(not f.final for f in cap.parsed) == expected["etb_frames"]
    assert cap.parsed[-1].final
    numbers = [f.number for f in cap.parsed]
    assert numbers[0] == expected["first_fn"]
    assert frame_numbers_run_on(numbers) is expected["fn_sequence_ok"]
    assert (frames.ENQ in cap.between) is expected["enq"]
    assert (frames.EOT in cap.between) is expected["eot"]
    assert set(cap.between) <= {frames.ENQ, frames.EOT}


@pytest.mark.parametrize("prefix", ASTM)
def test_astm_records_match_manifest(prefix: str) -> None:
    expected = entry(prefix)["expected"]
    cap = capture(prefix)
    records = decode_records(cap.text)
    assert dict(Counter(r.type for r in records)) == expected["record_types"]
    assert records[0].type == "H"
    assert records[-1].type == "L"
    d = records[0].delimiters
    assert d.field + d.definition == expected["delimiters"]
    assert d == Delimiters.from_header(cap.text.split(b"\r")[0].decode("latin-1"))
    assert all(r.delimiters == d for r in records)
    assert records[0].field(2) == expected["delimiters"][1:]  # H.2 verbatim


@pytest.mark.parametrize("prefix", ASTM)
def test_astm_texts_assemble_into_one_message(prefix: str) -> None:
    cap = capture(prefix)
    assembler = MessageAssembler()
    events = [event for f in cap.parsed for event in assembler.feed(f.text)]
    (message,) = events
    assert isinstance(message, AssembledMessage)
    assert message.raw == cap.text  # byte-exact, for the journal
    assert message.records == decode_records(cap.text)
    assert assembler.pending == b""


def test_yumizen_m_record_of_26_651_bytes_frame_passes_the_record_limit() -> None:
    cap = capture("03")
    records = decode_records(cap.text)
    sizes = sorted(len("|".join(r.fields)) for r in records if r.type == "M")
    assert sizes[-1] > 26_000  # the M|3 LMNE matrix, base64
    assert records[0].get(12) == "Q"  # processing ID: quality control
    assert records[0].get(13) == "LIS2-A2"
    assert records[2].get((16, 1)) == "CTRL"
    assert records[2].get((16, 3)) == "CTRL MEDIUM"
    result = next(r for r in records if r.type == "R")
    assert (result.get((3, 4)), result.get(4), result.get(5)) == ("MCV", "90.6", "um3")
    assert result.get((6, 1)) == "84.0 - 94.0"
    assert result.repeats(11) == [["MATYL", "", "USER"]]


def test_e411_record_split_inside_a_field_by_an_etb_frame() -> None:
    cap = capture("07")
    assert cap.parsed[0].text.endswith(b"R|2|^^^900/1/not|-")
    records = decode_records(cap.text)
    r2 = [r for r in records if r.type == "R"][1]
    assert r2.get(4) == "-1^0.521"
    assert (r2.get((4, 1)), r2.get((4, 2))) == ("-1", "0.521")
    assert records[0].get(10) == "host"
    assert records[0].repeats(11) == [["RSUPL", "BATCH"]]


def test_h7600_record_split_inside_r14() -> None:
    cap = capture("08")
    assert cap.parsed[0].text.endswith(b"|||P")
    records = decode_records(cap.text)
    assert [r.get(14) for r in records if r.type == "R"] == ["P1"] * 5
    order = records[2]
    assert order.get(3) == "PCCC2                 "
    assert order.get(3, strip=True) == "PCCC2"
    assert order.named("action_code") == "Q"


def test_architect_one_test_three_results_and_l_without_code() -> None:
    records = decode_records(capture("09").text)
    assert records[0].get((5, 4)) == "H1P1O1R1C1Q1L1"
    results = [r for r in records if r.type == "R"]
    assert [r.get((3, 11)) for r in results] == ["F", "I", "P"]
    assert results[0].get((3, 5)) == "_B-hCG"
    assert [r.named("value") for r in results] == ["> 15000.00", "Positive", "2423973"]
    assert results[0].named("abnormal_flags") == ">"
    terminator = records[-1]
    assert terminator.fields == ("L", "1")
    assert terminator.named("termination_code") == ""


def test_indiko_host_query() -> None:
    query = decode_records(capture("10").text)[1]
    assert query.type == "Q"
    assert query.get((3, 2)) == "2240801063"
    assert query.get((5, 4)) == "ALL"
    assert query.named("status_codes") == "O"


# -- HL7 v2 over MLLP (11-13) ---------------------------------------------------------------


@pytest.mark.parametrize("prefix", HL7)
def test_hl7_messages_match_manifest(prefix: str) -> None:
    expected = entry(prefix)["expected"]
    events = MllpFramer().feed(read(prefix))
    assert all(isinstance(e, FrameReceived) for e in events)
    assert len(events) == len(expected)
    for event, want in zip(events, expected, strict=True):
        assert isinstance(event, FrameReceived)
        segments = [s.lstrip(b"\n") for s in event.data.split(b"\r") if s.strip()]
        msh = segments[0].decode("latin-1")
        fields = msh.split(msh[3])  # MSH-1 is the character after "MSH"; MSH-n == fields[n-1]
        assert fields[8] == want["type"]
        assert fields[11] == want["version"]
        assert dict(Counter(s[:3].decode() for s in segments)) == want["segments"]


# -- proprietary protocols (14-16): negative samples for the ASTM codec ---------------------


def proprietary_texts(data: bytes) -> list[bytes]:
    """What a link layer would hand on: each STX..ETX body (or up to the end)."""
    texts = []
    for chunk in data.split(b"\x02")[1:]:
        texts.append(chunk.split(b"\x03")[0])
    return texts


@pytest.mark.parametrize("prefix", PROPRIETARY)
def test_proprietary_capture_is_rejected_by_decode_records(prefix: str) -> None:
    data = read(prefix)
    assert data.count(b"\x02") == entry(prefix)["expected"]["stx"]
    assert data.count(b"\x03") == entry(prefix)["expected"]["etx"]
    with pytest.raises(AstmError, match=r"record 1: control character (ENQ|STX)"):
        decode_records(data)
    for text in proprietary_texts(data):
        with pytest.raises(AstmError, match="record 1") as info:
            decode_records(text)
        assert "H record" in str(info.value) or "control character" in str(info.value)


@pytest.mark.parametrize("prefix", PROPRIETARY)
def test_proprietary_frames_fail_the_e1381_frame_check(prefix: str) -> None:
    for frame in frames.iter_frames(read(prefix)):
        with pytest.raises(frames.FrameError):
            frames.parse_frame(frame, allow_bare_lf=True)


@pytest.mark.parametrize("prefix", PROPRIETARY)
def test_proprietary_texts_are_quarantined_by_the_assembler(prefix: str) -> None:
    assembler = MessageAssembler()
    for text in proprietary_texts(read(prefix)):
        assert assembler.feed(text) == [AssemblyError("text outside a message", text)]
        assert assembler.pending == b""


def test_sysmex_xs500i_text_is_not_an_astm_message() -> None:
    (first, *_) = proprietary_texts(read("14"))
    with pytest.raises(AstmError, match=r"record 1: a message must start with an H record"):
        decode_records(first + b"\r")
