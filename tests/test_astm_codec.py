"""ASTM E1394 / LIS02-A2 record codec: delimiters, escapes, records, encoding, message assembly."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lab_samples import capture

from drivers.astm.codec import (
    FIELDS,
    AssembledMessage,
    AssemblyError,
    AstmError,
    Delimiters,
    FieldValue,
    MessageAssembler,
    Record,
    decode_records,
    encode_records,
    escape,
    unescape,
)

DEFAULT = Delimiters()
GENEXPERT = Delimiters("|", "@", "^", "\\")
SMALL = b"H|\\^&|||LIS\rP|1||PID-1||Doe^John\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.4|mmol/L\rL|1|N\r"


def text_of(prefix: str) -> bytes:
    return capture(prefix).text


# -- delimiters (E1394-97 7.1.2) --------------------------------------------------------------


def test_delimiters_from_default_header() -> None:
    assert Delimiters.from_header("H|\\^&|||c311^1") == DEFAULT
    assert DEFAULT.definition == "\\^&"


def test_delimiters_from_genexpert_header() -> None:
    d = Delimiters.from_header("H|@^\\|URM-8lT4abZA-06||.806149 Happy Hospital^GeneXpert^4.8")
    assert d == GENEXPERT
    assert (d.field, d.repeat, d.component, d.escape) == ("|", "@", "^", "\\")


def test_delimiters_from_bare_header() -> None:
    assert Delimiters.from_header("H|\\^&") == DEFAULT


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("H|||||", "not four distinct characters"),
        ("H|\\^\\|", "not four distinct characters"),
        ("H|a^&|", "must be ASCII punctuation"),
        ("H|\\^0|", "must be ASCII punctuation"),
        ("H| ^&|", "must be ASCII punctuation"),
        ("H|\\^\t|", "must be ASCII punctuation"),
        ("H|\\^", "too short"),
        ("H|\\^&X|||", "not followed by the field delimiter"),
    ],
)
def test_bad_delimiter_definitions_are_rejected(header: str, reason: str) -> None:
    with pytest.raises(AstmError, match=reason) as info:
        Delimiters.from_header(header)
    assert info.value.field == 2
    with pytest.raises(AstmError, match=rf"^record 1 \(H\), field H\.2: .*{reason}"):
        decode_records(header.encode() + b"\rL|1|N\r")


def test_from_header_needs_an_h_record() -> None:
    with pytest.raises(AstmError, match="not an H record"):
        Delimiters.from_header("P|1")


def test_delimiters_are_validated_when_built() -> None:
    with pytest.raises(AstmError, match="distinct"):
        Delimiters("|", "|", "^", "&")
    with pytest.raises(AstmError, match="punctuation"):
        Delimiters("||", "\\", "^", "&")


# -- escapes (E1394-97 section 6) -------------------------------------------------------------


def test_unescape_delimiter_sequences() -> None:
    assert unescape("a&F&b&S&c&R&d&E&e", DEFAULT) == "a|b^c\\d&e"
    assert unescape("a\\F\\b\\S\\c\\R\\d\\E\\e", GENEXPERT) == "a|b^c@d\\e"


def test_unescape_hex_sequences() -> None:
    assert unescape("&X41&", DEFAULT) == "A"
    assert unescape("x&X414243&y", DEFAULT) == "xABCy"
    assert unescape("&X0D0A&", DEFAULT) == "\r\n"
    assert unescape("&Xc3a9&", DEFAULT, encoding="utf-8") == "é"
    assert unescape("&XC3A9&", DEFAULT) == "Ã©"  # latin-1: one character per byte
    assert unescape("\\XE9\\", GENEXPERT) == "é"


@pytest.mark.parametrize(
    "value",
    ["&Z&", "A & B", "50&", "&X4&", "&XZZ&", "&X&", "&&", "&x41&", "&FF&", "&XFF&"],
)
def test_unknown_or_malformed_escapes_stay_literal(value: str) -> None:
    encoding = "utf-8" if value == "&XFF&" else "latin-1"  # 0xFF alone is not UTF-8
    assert unescape(value, DEFAULT, encoding=encoding) == value


def test_after_an_unknown_escape_its_closing_character_may_open_a_sequence() -> None:
    assert unescape("&Q&R&x", DEFAULT) == "&Q\\x"


def test_escape_delimiters_and_control_characters() -> None:
    assert escape("a|b\\c^d&e\rf\ng", DEFAULT) == "a&F&b&R&c&S&d&E&e&X0D&f&X0A&g"
    assert escape("a|b@c^d\\e", GENEXPERT) == "a\\F\\b\\R\\c\\S\\d\\E\\e"
    assert escape("plain text, 5.4 mmol/L", DEFAULT) == "plain text, 5.4 mmol/L"


def test_sysmex_image_reference_escapes_the_repeat_delimiter() -> None:
    records = decode_records(text_of("04"))
    scatter = next(r for r in records if r.type == "R" and r.get((3, 5)) == "SCAT_WDF")
    assert scatter.field(4) == "PNG&R&20240628&R&2024_06_27_13_54_27_WDF.PNG"
    assert scatter.text(4) == "PNG\\20240628\\2024_06_27_13_54_27_WDF.PNG"
    assert scatter.get(4) == scatter.text(4)
    assert scatter.repeats(4) == [["PNG\\20240628\\2024_06_27_13_54_27_WDF.PNG"]]
    assert scatter.text(4).split(scatter.delimiters.repeat) == [
        "PNG",
        "20240628",
        "2024_06_27_13_54_27_WDF.PNG",
    ]


# -- records ----------------------------------------------------------------------------------


def test_field_numbering_follows_e1394() -> None:
    header, patient, order, result, terminator = decode_records(SMALL)
    assert header.type == "H"
    assert header.field(1) == "H"
    assert header.field(4) == ""
    assert header.field(5) == "LIS"
    assert patient.fields == ("P", "1", "", "PID-1", "", "Doe^John")
    assert patient.named("lab_patient_id") == "PID-1"
    assert patient.get((6, 1)) == "Doe"
    assert patient.get("6.2") == "John"
    assert order.named("test_id") == "^^^GLU"
    assert (result.named("value"), result.named("units")) == ("5.4", "mmol/L")
    assert terminator.named("termination_code") == "N"


def test_header_delimiter_field_stays_verbatim() -> None:
    header = decode_records(SMALL)[0]
    assert header.field(2) == header.text(2) == header.get(2) == "\\^&"
    assert header.get((2, 1)) == "\\^&"
    assert header.get((2, 2)) == ""
    assert header.repeats(2) == [["\\^&"]]
    assert header.named("delimiters") == "\\^&"
    gx = decode_records(text_of("05"))[0]
    assert gx.text(2) == gx.repeats(2)[0][0] == "@^\\"


def test_missing_trailing_fields_are_empty() -> None:
    terminator = decode_records(text_of("09"))[-1]
    assert terminator.fields == ("L", "1")
    assert terminator.field(3) == ""
    assert terminator.get(3) == terminator.get("3.1") == terminator.get((3, 2, 4)) == ""
    assert terminator.text(40) == ""
    assert terminator.repeats(3) == []


def test_bad_paths_raise() -> None:
    record = decode_records(SMALL)[1]
    for path in ("a", "1.x", "0", "1.0", (3, 1, 0), "1.2.3.4", ()):
        with pytest.raises(ValueError, match="bad field path"):
            record.get(path)
    with pytest.raises(ValueError, match="start at 1"):
        record.field(0)
    with pytest.raises(KeyError, match="no field named"):
        record.named("value")


def test_cobas_c311_order_repeats_seven_tests() -> None:
    order = next(r for r in decode_records(text_of("06")) if r.type == "O")
    tests = order.repeats(5)
    assert len(tests) == 7
    assert tests[0] == ["", "", "", "685/"]
    assert [t[3] for t in tests] == ["685/", "687/", "712/", "158/", "735/", "717/", "690/"]
    assert order.get((5, 4)) == "685/"  # first repeat
    assert order.get((5, 4, 2)) == "687/"
    assert order.get((5, 4, 7)) == "690/"
    assert order.get((5, 4, 8)) == ""
    assert order.text(5) == order.field(5)  # no escapes: delimiters stay literal


def test_space_padding_is_kept_and_strippable() -> None:
    order = next(r for r in decode_records(text_of("06")) if r.type == "O")
    assert order.field(3) == "11625^CL-PL-24-0370         ^1^^004"
    assert order.get((3, 2)) == "CL-PL-24-0370         "
    assert order.get((3, 2), strip=True) == "CL-PL-24-0370"
    assert order.named("user_field_1") == "labo  "
    assert order.named("user_field_1", strip=True) == "labo"
    (blank,) = order.repeats(20)  # O.20 user field 2: five blank-padded components
    assert [len(c) for c in blank] == [30, 25, 20, 15, 10]
    assert order.get((20, 1), strip=True) == ""
    assert order.named("report_type") == "F"
    assert order.named("specimen_id", strip=True) == "11625^CL-PL-24-0370         ^1^^004"


def test_genexpert_components_with_its_own_delimiters() -> None:
    records = decode_records(text_of("05"))
    header = records[0]
    assert header.named("message_id") == "URM-8lT4abZA-06"
    assert header.get((5, 2)) == "GeneXpert"
    assert (header.named("processing_id"), header.named("version")) == ("P", "1394-97")
    result = records[3]
    assert result.type == "R"
    assert result.repeats(3) == [
        ["", "MTB-RIF", "", "Xpert", "Xpert MTB-RIF Ultra", "4", "MTB", ""]
    ]
    assert result.get((4, 1)) == "NOT DETECTED"
    assert result.named("instrument_id").startswith("Cepheid-44413S0^806149")
    assert result.get((14, 2)) == "806149"


def test_pentra_loinc_codes_and_alarm_comments() -> None:
    records = decode_records(text_of("02"))
    wbc = records[3]
    assert (wbc.get((3, 4)), wbc.get((3, 5)), wbc.get((3, 6))) == ("WBC", "804-5", "1")
    assert wbc.named("status") == "W"
    alarm = records[4]
    assert alarm.type == "C"
    assert alarm.repeats(4) == [["Alarm_WBC", "LMNE-", "BASO+", "LL", "NL", "LN", "NO", "SL1"]]
    assert records[1].named("birthdate") == "19771201"
    assert records[1].named("sex") == "F"


def test_field_tables_cover_every_record_type() -> None:
    assert set(FIELDS) == set("HPORCQLMS")
    assert FIELDS["H"]["processing_id"] == 12
    assert FIELDS["O"]["report_type"] == 26
    assert FIELDS["R"]["instrument_id"] == 14
    assert FIELDS["Q"]["status_codes"] == 13
    for table in FIELDS.values():
        assert len(set(table.values())) == len(table)


# -- decoding errors --------------------------------------------------------------------------


def test_latin1_by_default_utf8_strict() -> None:
    text = b"H|\\^&\rP|1||||M\xfcller^Hans\rL|1|N\r"
    assert decode_records(text)[1].get((6, 1)) == "Müller"
    with pytest.raises(
        AstmError, match=r"^record 2 \(P\): byte b'\\xfc' at offset 8 is not valid utf-8"
    ):
        decode_records(text, "utf-8")
    utf8 = "H|\\^&\rP|1||||Müller^Hans\rL|1|N\r".encode()
    assert decode_records(utf8, "utf-8")[1].get((6, 1)) == "Müller"
    with pytest.raises(AstmError, match="unknown encoding"):
        decode_records(SMALL, "no-such-codec")


def test_record_over_the_limit_is_rejected() -> None:
    big = b"H|\\^&\rM|1|" + b"A" * 100_000 + b"\rL|1|N\r"
    with pytest.raises(AstmError, match=r"^record 2 \(M\): 100004 bytes, over the 65536-byte"):
        decode_records(big)
    assert len(decode_records(big, max_record_bytes=200_000)) == 3
    assert len(decode_records(b"H|\\^&\rM|1|" + b"A" * 60_000 + b"\rL|1|N\r")) == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"hello world\r", r"record 1: a message must start with an H record"),
        (b"P|1\rL|1|N\r", r"record 1: a message must start with an H record"),
        (b"H|\\^&\rX|1\r", r"record 2: unknown record type 'X'"),
        (b"H|\\^&\rPQ|1\r", r"record 2: unknown record type 'PQ'"),
        (b"H|\\^&\r|1\r", r"record 2: unknown record type ''"),
        (b"H|\\^&\rp|1\r", r"record 2: unknown record type 'p'"),
        (b"H|\\^&\rP|1", r"record 2: last record does not end with CR"),
        (b"H|\\^&|\nP|1\r", r"record 1 \(H\): LF inside a record"),
        (b"H|\\^&\r\x021P|1\r", r"record 2: control character STX"),
        (b"H|\\^&\rR|1|5\x17A7\r", r"record 2: control character ETB"),
        (b"\x00\xff\xfe garbage", r"record 1: a message must start with an H record"),
    ],
)
def test_garbage_is_rejected(text: bytes, match: str) -> None:
    with pytest.raises(AstmError, match=match):
        decode_records(text)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_astm_error(data: bytes) -> None:
    try:
        records = decode_records(data)
    except AstmError:
        return
    assert all(r.type in "HPORCMQSL" for r in records)


def test_lf_after_cr_and_empty_records_are_tolerated() -> None:
    records = decode_records(b"H|\\^&\r\nP|1\r\n\r\nL|1|N\r\n")
    assert [r.type for r in records] == ["H", "P", "L"]
    assert decode_records(b"") == []


def test_records_without_header_need_delimiters() -> None:
    (result,) = decode_records(b"R|1|^^^K|4.1\r", delimiters=DEFAULT)
    assert result.get((3, 4)) == "K"
    (result,) = decode_records(b"R|1|^^^K@^^^NA|\\F\\\r", delimiters=GENEXPERT)
    assert result.repeats(3) == [["", "", "", "K"], ["", "", "", "NA"]]
    assert result.text(4) == "|"


def test_each_header_sets_the_delimiters_that_follow() -> None:
    records = decode_records(text_of("04") + text_of("05"))
    assert [r.delimiters for r in records if r.type == "H"] == [DEFAULT, GENEXPERT]
    assert records[-1].delimiters == GENEXPERT
    assert records[0].delimiters == DEFAULT


def test_decoding_a_40_record_message_is_fast() -> None:
    text = text_of("04")
    assert len(decode_records(text)) == 48
    runs = 200
    start = time.perf_counter()
    for _ in range(runs):
        decode_records(text)
    assert (time.perf_counter() - start) / runs < 1e-3


# -- encoding ---------------------------------------------------------------------------------


def test_encode_a_host_query_answer() -> None:
    records: list[list[FieldValue]] = [
        ["H", "", "", "", "LIS", "", "", "", "", "", "", "P", "1394-97"],
        ["P", 1, "", "PID-1", "", ["Doe", "John"], "", "19800101", "M"],
        ["O", 1, "S1", "", [["", "", "", "GLU"], ["", "", "", "K"]], "R"],
        ["L", 1, "N"],
    ]
    assert encode_records(records) == (
        b"H|\\^&|||LIS|||||||P|1394-97\r"
        b"P|1||PID-1||Doe^John||19800101|M\r"
        b"O|1|S1||^^^GLU\\^^^K|R\r"
        b"L|1|N\r"
    )
    assert encode_records([["H"], ["L", "1"]], GENEXPERT) == b"H|@^\\\rL|1\r"


def test_encode_escapes_values() -> None:
    text = encode_records([["H"], ["C", 1, "L", "a|b^c\\d&e"], ["L", 1, None]])
    assert text == b"H|\\^&\rC|1|L|a&F&b&S&c&R&d&E&e\rL|1|\r"
    assert decode_records(text)[1].text(4) == "a|b^c\\d&e"


def test_encode_mixed_repeats() -> None:
    text = encode_records([["H"], ["O", 1, "", "", ["^^^A", ["", "", "", "B"]]]])
    assert text == b"H|\\^&\rO|1|||&S&&S&&S&A\\^^^B\r"


def test_encode_errors() -> None:
    with pytest.raises(AstmError, match=r"record 1 \(H\), field H\.2: H\.2 is written"):
        encode_records([["H", "@^\\"]])
    with pytest.raises(AstmError, match="record 2: unknown record type 'X'"):
        encode_records([["H"], ["X", 1]])
    with pytest.raises(AstmError, match="record 1: a record starts with its type"):
        encode_records([[]])
    with pytest.raises(AstmError, match="record 2: cannot encode '€' in latin-1"):
        encode_records([["H"], ["C", 1, "I", "5 €"]])
    assert encode_records([["H"], ["C", 1, "I", "5 €"]], encoding="utf-8").endswith(
        b"5 \xe2\x82\xac\r"
    )


@pytest.mark.parametrize("prefix", ["01", "02", "03", "04", "06", "07", "08", "09", "10"])
def test_decoded_records_encode_back_byte_exact(prefix: str) -> None:
    text = text_of(prefix)
    assert encode_records(decode_records(text)) == text


def test_records_reencode_with_other_delimiters() -> None:
    original = decode_records(text_of("05"))
    converted = decode_records(encode_records(original, DEFAULT))
    assert converted[0].field(2) == "\\^&"
    assert [r.type for r in converted] == [r.type for r in original]
    for before, after in zip(original, converted, strict=True):
        for n in range(3, len(before.fields) + 1):
            assert after.repeats(n) == before.repeats(n)
    back = decode_records(encode_records(converted, GENEXPERT))
    assert encode_records(back, GENEXPERT) == text_of("05")


values = st.text(st.characters(codec="utf-8"), max_size=12)  # any but lone surrogates


@pytest.mark.parametrize("d", [DEFAULT, GENEXPERT], ids=["default", "genexpert"])
@given(
    plain=values,
    components=st.lists(values, min_size=2, max_size=4),
    repeats=st.lists(st.lists(values, min_size=1, max_size=3), min_size=2, max_size=3),
)
def test_values_survive_encode_and_decode(
    d: Delimiters, plain: str, components: list[str], repeats: list[list[str]]
) -> None:
    records: list[list[FieldValue]] = [["H"], ["C", 1, plain, components, repeats], ["L", 1]]
    text = encode_records(records, d, "utf-8")
    header, comment, _ = decode_records(text, "utf-8")
    assert header.delimiters == d
    assert comment.text(3) == comment.get(3) == plain
    assert [comment.get((4, c)) for c in range(1, len(components) + 1)] == components
    assert comment.repeats(5) == repeats
    assert comment.fields[1] == "1"
    for chunk in text.split(b"\r")[:-1]:
        assert not any(b < 0x20 or b == 0x7F for b in chunk)  # all controls escaped


# -- message assembly -------------------------------------------------------------------------


def assemble(*texts: bytes, assembler: MessageAssembler | None = None) -> list[object]:
    assembler = assembler or MessageAssembler()
    return [event for text in texts for event in assembler.feed(text)]


def test_message_split_at_every_byte_position() -> None:
    text = text_of("04")
    whole = AssembledMessage(text, decode_records(text))
    for cut in range(len(text) + 1):
        assert assemble(text[:cut], text[cut:]) == [whole], cut


def test_message_fed_byte_by_byte() -> None:
    text = text_of("07")
    assembler = MessageAssembler()
    events = []
    for i in range(len(text)):
        events += assembler.feed(text[i : i + 1])
        if i < len(text) - 1:
            assert assembler.pending == text[: i + 1]
    assert events == [AssembledMessage(text, decode_records(text))]


def test_two_messages_in_one_feed() -> None:
    first, second = text_of("04"), text_of("05")
    events = assemble(first + second)
    assert [e.raw for e in events if isinstance(e, AssembledMessage)] == [first, second]
    assert [e.header.delimiters for e in events if isinstance(e, AssembledMessage)] == [
        DEFAULT,
        GENEXPERT,
    ]


def test_junk_before_h_is_reported_then_the_message_assembles() -> None:
    events = assemble(b"garbage\r\nmore\r" + SMALL)
    assert events == [
        AssemblyError("text outside a message", b"garbage\r\nmore\r"),
        AssembledMessage(SMALL, decode_records(SMALL)),
    ]


def test_junk_without_cr_is_reported_per_feed() -> None:
    assembler = MessageAssembler()
    assert assembler.feed(b"\x06junk") == [AssemblyError("text outside a message", b"\x06junk")]
    assert assembler.feed(b"H|still junk\r") == [
        AssemblyError("text outside a message", b"H|still junk\r")
    ]
    assert assembler.feed(SMALL)[0].raw == SMALL


def test_h_without_l_then_h_again() -> None:
    partial = b"H|\\^&\rP|1\rO|1|S1\r"
    events = assemble(partial[:7], partial[7:] + SMALL)
    assert events == [
        AssemblyError("H record before the L record", partial),
        AssembledMessage(SMALL, decode_records(SMALL)),
    ]


def test_blank_lines_between_messages_are_dropped() -> None:
    events = assemble(b"\r\n" + SMALL + b"\n\r\n" + SMALL)
    assert [e.raw for e in events if isinstance(e, AssembledMessage)] == [SMALL, SMALL]
    assert len(events) == 2


def test_lf_after_cr_is_kept_in_raw() -> None:
    text = SMALL.replace(b"\r", b"\r\n")
    events = assemble(text)
    assert len(events) == 1
    assert isinstance(events[0], AssembledMessage)
    assert events[0].raw == text[:-1]  # the LF after L's CR is between messages
    assert [r.type for r in events[0].records] == ["H", "P", "O", "R", "L"]


def test_reset_returns_the_partial_message() -> None:
    assembler = MessageAssembler()
    assert assembler.feed(SMALL[:30]) == []
    assert assembler.pending == SMALL[:30]
    assert assembler.reset() == SMALL[:30]
    assert assembler.pending == b""
    assert assembler.feed(SMALL)[0].raw == SMALL


def test_bad_header_is_quarantined_with_what_follows() -> None:
    events = assemble(b"H|||||\rP|1\rL|1\r" + SMALL)
    assert events[0] == AssemblyError(
        "bad H record: field H.2: delimiters '||||' are not four distinct characters", b"H|||||\r"
    )
    assert events[1] == AssemblyError("text outside a message", b"P|1\rL|1\r")
    assert isinstance(events[2], AssembledMessage)


def test_undecodable_message_becomes_an_error_with_its_bytes() -> None:
    bad = b"H|\\^&\rX|1\rL|1|N\r"
    assert assemble(bad) == [
        AssemblyError("record 2: unknown record type 'X' (E1394: H P O R C M Q S L)", bad)
    ]
    latin = b"H|\\^&\rP|1||||M\xfcller\rL|1|N\r"
    (event,) = assemble(latin, assembler=MessageAssembler(encoding="utf-8"))
    assert isinstance(event, AssemblyError)
    assert event.raw == latin
    assert event.reason.startswith("record 2 (P): byte b'\\xfc'")


def test_record_starting_with_l_is_a_terminator_only_with_the_field_delimiter() -> None:
    text = b"H|\\^&\rLOG|x\rL|1|N\r"
    (event,) = assemble(text)
    assert isinstance(event, AssemblyError)
    assert event.raw == text
    assert "unknown record type 'LOG'" in event.reason
    (event,) = assemble(b"H|@^\\\rL\r")
    assert isinstance(event, AssembledMessage)


def test_oversize_record_in_the_assembler() -> None:
    assembler = MessageAssembler(max_record_bytes=100)
    head = b"H|\\^&\rM|1|"
    events = assembler.feed(head + b"A" * 60)
    assert events == []
    events = assembler.feed(b"A" * 60)
    assert events == [AssemblyError("record 2 over 100 bytes", head + b"A" * 120)]
    assert assembler.pending == b""
    events = assembler.feed(b"AAAA\rL|1|N\r" + SMALL)
    assert events == [
        AssemblyError("text outside a message", b"AAAA\rL|1|N\r"),
        AssembledMessage(SMALL, decode_records(SMALL)),
    ]


def test_oversize_message_in_the_assembler() -> None:
    assembler = MessageAssembler(max_record_bytes=100, max_message_bytes=200)
    text = b"H|\\^&\r" + b"R|1|^^^GLU|5.4\r" * 20
    events = assembler.feed(text)
    assert [e.reason for e in events if isinstance(e, AssemblyError)] == [
        "message over 200 bytes without an L record",
        "text outside a message",  # the records after it, until the next H
    ]
    assert b"".join(e.raw for e in events) == text
    assert 200 < len(events[0].raw) <= 200 + 15
    with pytest.raises(ValueError, match="max_record_bytes"):
        MessageAssembler(max_record_bytes=300, max_message_bytes=200)


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_assembler_accounts_for_every_byte(chunks: list[bytes]) -> None:
    assembler = MessageAssembler()
    events = [e for chunk in chunks for e in assembler.feed(chunk)]
    seen = b"".join(e.raw for e in events) + assembler.pending
    fed = b"".join(chunks)
    assert seen.replace(b"\r", b"").replace(b"\n", b"") == fed.replace(b"\r", b"").replace(
        b"\n", b""
    )


def test_assembled_records_are_records() -> None:
    (message,) = assemble(SMALL)
    assert isinstance(message, AssembledMessage)
    assert all(isinstance(r, Record) for r in message.records)
    assert message.header.get(5) == "LIS"
