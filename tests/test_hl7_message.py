"""MSH reading and decoding (HL7 v2.5.1 §2.5, §2.15.9, table 0211): byte fixtures."""

import json
from collections import Counter
from pathlib import Path

import pytest

from drivers.hl7.files import read_messages
from drivers.hl7.message import Hl7Error, Msh, decode_message, parse_msh, python_codec

SAMPLES = Path("/work/shared/samples/lab")

ORU_231 = (
    b"MSH|^~\\&|LAB|CENTRAL^1.2.3^ISO|LIS|HOSP|20240418124118||ORU^R01|MSG00001|P|2.3.1\r"
    b"PID|1||12345^^^HOSP^MR||DOE^JOHN\r"
    b"OBR|1||S-1|GLU^Glucose\r"
    b"OBX|1|NM|GLU^Glucose||5.4|mmol/L|3.9-6.1|N|||F\r"
)
ORU_251 = (
    b"MSH|^~\\&|BA400|Biosystems|Host|Host provider|20230511165533||ORU^R01^ORU_R01|"
    b"c-251|T^A|2.5.1^VNM|||ER|AL||8859/1~UNICODE UTF-8\r"
    b"OBX|1|NM|CHOL^Cholesterol||177.7|mg/dL||N|||F\r"
)


def msh_with(**fields: str) -> bytes:
    """A v2.5.1 MSH built from numbered fields (key 'f9' = MSH-9), defaults filled in."""
    values = {"f9": "ADT^A01", "f10": "ID1", "f11": "P", "f12": "2.5.1"} | fields
    parts = ["MSH", "^~\\&"] + [values.get(f"f{n}", "") for n in range(3, 19)]
    return "|".join(parts).encode("latin-1") + b"\rEVN|A01\r"


def test_parse_msh_oru_231() -> None:
    msh = parse_msh(ORU_231)
    assert msh == Msh(
        field_sep="|",
        encoding_chars="^~\\&",
        sending_app="LAB",
        sending_facility="CENTRAL^1.2.3^ISO",
        receiving_app="LIS",
        receiving_facility="HOSP",
        timestamp="20240418124118",
        message_type="ORU^R01",
        message_code="ORU",
        trigger_event="R01",
        control_id="MSG00001",
        processing_id="P",
        version="2.3.1",
        charset="",
    )


def test_parse_msh_oru_251_components_and_repetitions() -> None:
    msh = parse_msh(ORU_251)
    assert msh.message_type == "ORU^R01^ORU_R01"
    assert (msh.message_code, msh.trigger_event) == ("ORU", "R01")
    assert msh.control_id == "c-251"
    assert msh.processing_id == "T"
    assert msh.version == "2.5.1"
    assert msh.charset == "8859/1"


def test_parse_msh_lf_separators_and_leading_whitespace() -> None:
    msh = parse_msh(b"\r\n\n  " + ORU_231.replace(b"\r", b"\n"))
    assert msh.control_id == "MSG00001"
    assert msh.version == "2.3.1"


def test_parse_msh_reads_only_first_segment() -> None:
    msh = parse_msh(b"MSH|^~\\&|A|B|C|D|T||ACK|X|P|2.5\rMSA|AA|1|2|3|4|5|6|7|8|9|10|11|12|13|14|15")
    assert msh.charset == ""
    assert msh.trigger_event == ""


def test_parse_msh_other_delimiters() -> None:
    msh = parse_msh(b"MSH#*~\\&#APP#FAC###T##ORU*R01#9#P#2.4\r")
    assert msh.field_sep == "#"
    assert msh.encoding_chars == "*~\\&"
    assert (msh.message_code, msh.trigger_event) == ("ORU", "R01")
    assert msh.sending_facility == "FAC"


def assert_error(raw: bytes, ack_code: str, error_code: str, location: str) -> Hl7Error:
    with pytest.raises(Hl7Error) as info:
        parse_msh(raw)
    assert (info.value.ack_code, info.value.error_code) == (ack_code, error_code)
    assert info.value.location == location
    return info.value


def test_no_msh() -> None:
    err = assert_error(b"PID|1||123\r", "AR", "100", "")
    assert err.text == "message does not start with an MSH segment"
    assert str(err) == err.text
    assert_error(b"", "AR", "100", "")


@pytest.mark.parametrize("raw", [b"MSH", b"MSHA^~\\&|", b"MSH ^~\\&|", b"MSH\r|^~"])
def test_bad_field_separator(raw: bytes) -> None:
    assert_error(raw, "AR", "102", "MSH^1^1")


def test_empty_control_id() -> None:
    assert_error(msh_with(f10=""), "AR", "101", "MSH^1^10")


def test_empty_message_type() -> None:
    assert_error(msh_with(f9=""), "AR", "101", "MSH^1^9")


def test_empty_version() -> None:
    assert_error(msh_with(f12=""), "AR", "101", "MSH^1^12")


def test_short_msh_missing_control_id() -> None:
    assert_error(b"MSH|^~\\&|A|B|C|D|T||ORU^R01\r", "AR", "101", "MSH^1^10")


def test_empty_encoding_characters() -> None:
    assert_error(b"MSH||A|B\r", "AR", "101", "MSH^1^2")


def test_hl7_error_rejects_bad_ack_code() -> None:
    with pytest.raises(ValueError):
        Hl7Error("x", ack_code="AA")


# --- real captures ------------------------------------------------------------------------


def load_sample(name: str) -> tuple[list[bytes], list[dict[str, object]]]:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample captures not available at {SAMPLES}")
    manifest = json.loads((SAMPLES / "MANIFEST.json").read_text())
    (entry,) = [e for e in manifest if e["file"] == name]
    return read_messages((SAMPLES / name).read_bytes()), entry["expected"]


@pytest.mark.parametrize(
    ("name", "control_ids"),
    [
        ("11_hl7_biosystems_ba400_oul_r22.mllp", ["f7c9b548-0a48-49c2-9223-9f488efbfdeb"]),
        ("12_hl7_biosystems_ba400_qbp_q11.mllp", ["105c0474-b00b-4c72-8492-fba65c1563d6"]),
        ("13_hl7_mindray_bs_oru_r01_and_qry_q02.mllp", ["7", "1"]),
    ],
)
def test_real_captures(name: str, control_ids: list[str]) -> None:
    messages, expected = load_sample(name)
    assert len(messages) == len(expected) == len(control_ids)
    for raw, facts, control_id in zip(messages, expected, control_ids, strict=True):
        msh = parse_msh(raw)
        assert msh.control_id == control_id
        assert msh.message_type == facts["type"]
        assert msh.version == facts["version"]
        segments = Counter(seg[:3] for seg in raw.split(b"\r") if seg)
        assert {k.decode(): v for k, v in segments.items()} == facts["segments"]


def test_real_capture_ba400_fields() -> None:
    messages, _ = load_sample("11_hl7_biosystems_ba400_oul_r22.mllp")
    msh = parse_msh(messages[0])
    assert (msh.sending_app, msh.sending_facility) == ("BA400", "Biosystems")
    assert (msh.receiving_app, msh.receiving_facility) == ("Host", "Host provider")
    assert msh.charset == "UNICODE UTF-8"
    text, codec = decode_message(messages[0], msh, encoding=None, fallback="latin-1")
    assert codec == "utf-8"
    assert "CHOL HDL DIRECT" in text


def test_real_capture_mindray_is_ascii() -> None:
    messages, _ = load_sample("13_hl7_mindray_bs_oru_r01_and_qry_q02.mllp")
    msh = parse_msh(messages[0])
    assert (msh.sending_app, msh.receiving_app) == ("", "")
    assert msh.charset == "ASCII"
    text, codec = decode_message(messages[0], msh, encoding=None, fallback="utf-8")
    assert codec == "ascii"
    assert "Amilas 405 AA l?quida" in text


# --- character sets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "codec"),
    [
        ("", "ascii"),
        ("ASCII", "ascii"),
        ("8859/1", "iso8859-1"),
        ("8859/9", "iso8859-9"),
        ("8859/15", "iso8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("unicode utf-8", "utf-8"),
        ("UNICODE", None),
        ("ISO IR192", "utf-8"),
        ("ISO IR6", "ascii"),
        ("ISO IR100", "latin-1"),
        ("CNS 11643-1992", None),
        ("GB 18030-2000", "gb18030"),
        ("KS X 1001", "euc-kr"),
        ("BIG-5", "big5"),
        ("UNICODE UTF-16", "utf-16"),
        ("UNICODE UTF-32", "utf-32"),
        ("UTF-8", "utf-8"),
        ("utf8", "utf-8"),
        ("windows-1258", "cp1258"),
        ("Cp1258", "cp1258"),
        ("8859/10", None),
        ("KLINGON", None),
    ],
)
def test_python_codec(charset: str, codec: str | None) -> None:
    assert python_codec(charset) == codec


def test_decode_latin1_from_msh18() -> None:
    raw = msh_with(f18="8859/1") + "PID|1||1||Andr\u00e9\r".encode("latin-1")
    text, codec = decode_message(raw, parse_msh(raw), encoding=None, fallback="ascii")
    assert codec == "iso8859-1"
    assert "Andr\u00e9" in text


def test_decode_utf8_vietnamese() -> None:
    name = "Nguy\u1ec5n V\u0103n \u00c1nh"
    raw = msh_with(f18="UNICODE UTF-8") + f"PID|1||1||{name}\r".encode()
    text, codec = decode_message(raw, parse_msh(raw), encoding=None, fallback="ascii")
    assert codec == "utf-8"
    assert name in text


def test_decode_invalid_utf8_reports_offset() -> None:
    head = msh_with(f18="UNICODE UTF-8") + b"PID|1||1||Nguy"
    raw = head + b"\xff\xfen\r"
    with pytest.raises(Hl7Error) as info:
        decode_message(raw, parse_msh(raw), encoding=None, fallback="ascii")
    assert (info.value.ack_code, info.value.error_code) == ("AE", "102")
    assert info.value.text == f"cannot decode as utf-8: byte 0xff at offset {len(head)}"
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_decode_unknown_charset_rejected() -> None:
    raw = msh_with(f18="KLINGON")
    with pytest.raises(Hl7Error) as info:
        decode_message(raw, parse_msh(raw), encoding=None, fallback="utf-8")
    assert (info.value.ack_code, info.value.error_code) == ("AR", "103")
    assert info.value.location == "MSH^1^18"
    assert "KLINGON" in info.value.text


def test_decode_override_wins() -> None:
    # The sender claims UTF-8 but really writes Windows-1258; the listener overrides.
    raw = msh_with(f18="UNICODE UTF-8") + "PID|1||1||V\u0103n\r".encode("cp1258")
    text, codec = decode_message(raw, parse_msh(raw), encoding="cp1258", fallback="ascii")
    assert codec == "cp1258"
    assert "V\u0103n" in text


def test_decode_override_wins_over_unknown_charset() -> None:
    raw = msh_with(f18="KLINGON")
    _, codec = decode_message(raw, parse_msh(raw), encoding="latin-1", fallback="ascii")
    assert codec == "latin-1"


def test_decode_without_msh18_uses_fallback() -> None:
    raw = ORU_231 + "NTE|1||\u00e9\r".encode()
    text, codec = decode_message(raw, parse_msh(raw), encoding=None, fallback="utf-8")
    assert codec == "utf-8"
    assert text.endswith("NTE|1||\u00e9\r")
    with pytest.raises(Hl7Error):
        decode_message(raw, parse_msh(raw), encoding=None, fallback="ascii")
