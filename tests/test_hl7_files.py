"""Reading technicians' HL7 files: MLLP-framed captures and plain text with LF/CR LF."""

import pytest

from drivers.hl7.files import read_messages
from drivers.hl7.mllp import frame

M1 = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5.1\rPID|1||111\rOBX|1|NM|GLU||5.4\r"
M2 = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|2|P|2.5.1\rPID|1||222\r"
M3 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|3|P|2.5.1\rEVN|A01\rPID|1||333\r"


def test_framed_file() -> None:
    data = frame(M1) + b"\r\n" + frame(M2) + frame(M3)
    assert read_messages(data) == [M1, M2, M3]


def test_framed_file_keeps_content_exactly() -> None:
    # Inside a frame nothing is normalized: LF separators stay as sent.
    body = M1.replace(b"\r", b"\n")
    assert read_messages(frame(body)) == [body]


@pytest.mark.parametrize(
    "data",
    [
        b"junk" + frame(M1),
        b"\x0bMSH|^~\\&|truncated" + frame(M1),
        frame(M1) + b"\x0bMSH|^~\\&|no end block",
        frame(M1) + b"\x0b",
    ],
)
def test_framed_file_problems_raise(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a clean MLLP capture"):
        read_messages(data)


def test_lf_text_file_with_three_messages() -> None:
    text = b"\n".join([M1.rstrip(b"\r"), b"", M2.rstrip(b"\r"), b"   ", M3.rstrip(b"\r"), b""])
    data = text.replace(b"\r", b"\n")
    assert read_messages(data) == [M1, M2, M3]


def test_crlf_text_file() -> None:
    data = (M1 + M2).replace(b"\r", b"\r\n")
    assert read_messages(data) == [M1, M2]


def test_cr_text_file_without_final_newline() -> None:
    assert read_messages(M1.rstrip(b"\r")) == [M1]


def test_text_file_with_utf8_bom() -> None:
    assert read_messages(b"\xef\xbb\xbf" + M2.replace(b"\r", b"\r\n")) == [M2]


def test_text_before_first_msh_raises() -> None:
    with pytest.raises(ValueError, match="before the first MSH"):
        read_messages(b"# sample\n" + M1)


def test_empty_file() -> None:
    assert read_messages(b"") == []
    assert read_messages(b"\n\r\n") == []
