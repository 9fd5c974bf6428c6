"""Original-mode ACK building and parsing (HL7 v2.5.1 §2.9.2, §2.15 MSA/ERR)."""

import pytest

from drivers.hl7.ack import AckInfo, build_ack, parse_ack
from drivers.hl7.message import Hl7Error, parse_msh

ORU_251 = (
    b"MSH|^~\\&|BA400|LAB^1.2.3^ISO|LIS|HOSP|20230511165533||ORU^R01^ORU_R01|"
    b"ctl-42|T|2.5.1|||ER|AL||UNICODE UTF-8\rOBX|1|NM|GLU||5.4\r"
)
ORU_231 = b"MSH|^~\\&|MINDRAY|BS|HOST|LAB|20240418124118||ORU^R01|7|D|2.3.1||||0||ASCII\r"


def segments(ack: bytes) -> list[list[str]]:
    assert ack.endswith(b"\r")
    return [seg.split("|") for seg in ack.decode("ascii").split("\r")[:-1]]


def test_accept_ack_fields() -> None:
    ack = build_ack(parse_msh(ORU_251), "AA", control_id="ACK1", timestamp="20240101120000")
    assert ack == (
        b"MSH|^~\\&|LIS|HOSP|BA400|LAB^1.2.3^ISO|20240101120000||ACK^R01^ACK|ACK1|T|2.5.1\r"
        b"MSA|AA|ctl-42\r"
    )


def test_version_and_processing_mirrored() -> None:
    msh, msa = segments(build_ack(parse_msh(ORU_231), "AA", control_id="9", timestamp="T"))
    assert (msh[2], msh[3], msh[4], msh[5]) == ("HOST", "LAB", "MINDRAY", "BS")
    assert msh[8] == "ACK^R01^ACK"
    assert (msh[9], msh[10], msh[11]) == ("9", "D", "2.3.1")
    assert len(msh) == 12  # no MSH-18
    assert msa == ["MSA", "AA", "7"]


def test_ack_without_trigger() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|T||ORU|1|P|2.4\r"
    msh, _ = segments(build_ack(parse_msh(raw), "AA", control_id="2", timestamp="T"))
    assert msh[8] == "ACK"


def test_err_segment_v251() -> None:
    error = Hl7Error("MSH-10 missing", ack_code="AR", error_code="101", location="MSH^1^10")
    ack = build_ack(parse_msh(ORU_251), "AR", control_id="A", timestamp="T", error=error)
    assert ack.split(b"\r")[1:] == [
        b"MSA|AR|ctl-42",
        b"ERR||MSH^1^10|101^MSH-10 missing^HL70357|E",
        b"",
    ]


def test_err_segment_v251_without_location() -> None:
    error = Hl7Error("disk full", ack_code="AE")
    ack = build_ack(parse_msh(ORU_251), "AE", control_id="A", timestamp="T", error=error)
    assert ack.split(b"\r")[2] == b"ERR|||207^disk full^HL70357|E"


def test_err_segment_v231() -> None:
    error = Hl7Error("bad type", ack_code="AE", error_code="102", location="OBX^3^5^1")
    ack = build_ack(parse_msh(ORU_231), "AE", control_id="A", timestamp="T", error=error)
    assert ack.split(b"\r")[2] == b"ERR|OBX^3^5^102&bad type&HL70357"


def test_err_segment_v231_without_location() -> None:
    error = Hl7Error("unsupported", error_code="200")
    ack = build_ack(parse_msh(ORU_231), "AR", control_id="A", timestamp="T", error=error)
    assert ack.split(b"\r")[2] == b"ERR|^^^200&unsupported&HL70357"


def test_text_escaped_and_line_breaks_removed() -> None:
    error = Hl7Error("a|b^c~d\\e&f\r\ng", error_code="207")
    ack = build_ack(
        parse_msh(ORU_251), "AE", control_id="A", timestamp="T", error=error, text="x|y\nz"
    )
    lines = ack.split(b"\r")
    assert lines[1] == b"MSA|AE|ctl-42|x\\F\\yz"
    assert lines[2] == b"ERR|||207^a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\fg^HL70357|E"


def test_text_escaped_with_senders_delimiters() -> None:
    raw = b"MSH#*~!$#A#B#C#D#T##ORU*R01#9#P#2.5.1\r"
    error = Hl7Error("x#y*z!w", location="PID^1^3")
    ack = build_ack(parse_msh(raw), "AR", control_id="A", timestamp="T", error=error)
    assert ack.split(b"\r") == [
        b"MSH#*~!$#C#D#A#B#T##ACK*R01*ACK#A#P#2.5.1",
        b"MSA#AR#9",
        b"ERR##PID*1*3#207*x!F!y!S!z!E!w*HL70357#E",
        b"",
    ]


def test_non_ascii_text_replaced() -> None:
    ack = build_ack(parse_msh(ORU_251), "AE", control_id="A", timestamp="T", text="l\u00edquido")
    assert ack.split(b"\r")[1] == b"MSA|AE|ctl-42|l?quido"


def test_mirrored_fields_keep_senders_bytes() -> None:
    raw = "MSH|^~\\&|M\u00c1Y|B\u1ec6NH VI\u1ec6N|LIS|H|T||ORU^R01|\u00e91|P|2.5.1\r".encode()
    ack = build_ack(parse_msh(raw), "AA", control_id="A", timestamp="T")
    assert "|M\u00c1Y|B\u1ec6NH VI\u1ec6N|".encode() in ack
    assert "MSA|AA|\u00e91\r".encode() in ack


def test_msh_none() -> None:
    error = Hl7Error("message does not start with an MSH segment", error_code="100")
    ack = build_ack(None, "AR", control_id="N1", timestamp="20240101", error=error)
    assert ack.split(b"\r") == [
        b"MSH|^~\\&|||||20240101||ACK|N1|P|2.5.1",
        b"MSA|AR|",
        b"ERR|||100^message does not start with an MSH segment^HL70357|E",
        b"",
    ]


def test_bad_ack_code_rejected() -> None:
    with pytest.raises(ValueError):
        build_ack(None, "OK", control_id="1", timestamp="T")


def test_round_trip() -> None:
    error = Hl7Error("OBX-5 not numeric | really", ack_code="AE", error_code="102")
    ack = build_ack(
        parse_msh(ORU_251), "AE", control_id="A", timestamp="T", error=error, text="rejected"
    )
    info = parse_ack(ack)
    assert info == AckInfo(
        code="AE",
        control_id="ctl-42",
        text="rejected",
        error="ERR|||102^OBX-5 not numeric \\F\\ really^HL70357|E",
    )
    assert parse_msh(ack).message_type == "ACK^R01^ACK"


def test_parse_ack_lf_separators_and_lowercase_code() -> None:
    raw = b"MSH|^~\\&|LIS|H|GW|H|T||ACK|9|P|2.5.1\nMSA|aa|ctl-1|fine\n"
    assert parse_ack(raw) == AckInfo(code="AA", control_id="ctl-1", text="fine", error="")


def test_parse_ack_crlf_and_other_field_separator() -> None:
    raw = b"MSH#^~\\&#LIS#H#GW#H#T##ACK#9#P#2.3\r\nMSA#CE#77\r\nERR#MSH^1^10^101\r\n"
    assert parse_ack(raw) == AckInfo(code="CE", control_id="77", text="", error="ERR#MSH^1^10^101")


def test_parse_ack_without_msa() -> None:
    with pytest.raises(Hl7Error) as info:
        parse_ack(b"MSH|^~\\&|LIS|H|GW|H|T||ACK|9|P|2.5.1\r")
    assert (info.value.ack_code, info.value.error_code) == ("AR", "100")
    assert info.value.text == "acknowledgement has no MSA segment"
