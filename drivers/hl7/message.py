"""HL7 v2 message layer: reading MSH and decoding text (HL7 v2.5.1 §2.5, §2.15.9; table 0211).

Only the MSH segment is read on the receive path, with ``str.split``: the raw bytes
are journaled as received and parsed fully later, off the hot path.
"""

from dataclasses import dataclass

_WHITESPACE = b" \t\r\n"


class Hl7Error(Exception):
    """A problem with a received message, reported to the sender in the ACK.

    ``ack_code`` is MSA-1 ("AE" application error or "AR" application reject),
    ``error_code`` a value of HL7 table 0357 (100 segment sequence error, 101
    required field missing, 102 data type error, 103 table value not found,
    200 unsupported message type, 203 unsupported version, 207 application
    internal error) and ``location`` an ERR-2 location such as ``"MSH^1^10"``.
    """

    def __init__(
        self, text: str, *, ack_code: str = "AR", error_code: str = "207", location: str = ""
    ) -> None:
        if ack_code not in ("AE", "AR"):
            raise ValueError(f"ack_code must be 'AE' or 'AR', not {ack_code!r}")
        super().__init__(text)
        self.text = text
        self.ack_code = ack_code
        self.error_code = error_code
        self.location = location


@dataclass(frozen=True, slots=True)
class Msh:
    """The MSH fields the gateway needs; field text is raw (components kept)."""

    field_sep: str  # MSH-1
    encoding_chars: str  # MSH-2, e.g. "^~\\&"
    sending_app: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_app: str  # MSH-5
    receiving_facility: str  # MSH-6
    timestamp: str  # MSH-7
    message_type: str  # MSH-9, e.g. "ORU^R01^ORU_R01"
    message_code: str  # MSH-9.1
    trigger_event: str  # MSH-9.2
    control_id: str  # MSH-10
    processing_id: str  # MSH-11.1, e.g. "P"
    version: str  # MSH-12.1, e.g. "2.5.1"
    charset: str  # MSH-18, first repetition; "" when absent


def parse_msh(raw: bytes) -> Msh:
    """Read the MSH segment at the start of ``raw`` (leading CR/LF/blanks tolerated).

    The segment ends at the first CR or LF. It is decoded as latin-1, which never
    fails and keeps every byte; MSH content is ASCII in practice. MSH-1 is the
    field separator itself, so ``seg.split(sep)[n]`` is MSH-(n+1).

    Raises :class:`Hl7Error` (AR) for: no MSH (100), a missing or alphanumeric
    field separator (102), empty MSH-2, MSH-9, MSH-10 or MSH-12 (101).
    """
    start = 0
    while start < len(raw) and raw[start] in _WHITESPACE:
        start += 1
    end = raw.find(b"\r", start)
    lf = raw.find(b"\n", start, len(raw) if end < 0 else end)
    if lf >= 0:
        end = lf
    elif end < 0:
        end = len(raw)
    seg = raw[start:end].decode("latin-1")

    if not seg.startswith("MSH"):
        raise Hl7Error("message does not start with an MSH segment", error_code="100")
    if len(seg) < 4 or seg[3].isalnum() or seg[3].isspace():
        raise Hl7Error("MSH has no valid field separator", error_code="102", location="MSH^1^1")
    sep = seg[3]
    fields = seg.split(sep)

    def field(number: int) -> str:
        return fields[number - 1] if number - 1 < len(fields) else ""

    enc = field(2)
    if not enc:
        raise Hl7Error("MSH-2 encoding characters missing", error_code="101", location="MSH^1^2")
    comp = enc[0]
    rep = enc[1] if len(enc) > 1 else "~"
    message_type = field(9)
    if not message_type:
        raise Hl7Error("MSH-9 message type missing", error_code="101", location="MSH^1^9")
    control_id = field(10)
    if not control_id:
        raise Hl7Error("MSH-10 message control ID missing", error_code="101", location="MSH^1^10")
    version = field(12).split(comp, 1)[0]
    if not version:
        raise Hl7Error("MSH-12 version ID missing", error_code="101", location="MSH^1^12")
    type_parts = message_type.split(comp)
    return Msh(
        field_sep=sep,
        encoding_chars=enc,
        sending_app=field(3),
        sending_facility=field(4),
        receiving_app=field(5),
        receiving_facility=field(6),
        timestamp=field(7),
        message_type=message_type,
        message_code=type_parts[0],
        trigger_event=type_parts[1] if len(type_parts) > 1 else "",
        control_id=control_id,
        processing_id=field(11).split(comp, 1)[0],
        version=version,
        charset=field(18).split(rep, 1)[0],
    )


# HL7 table 0211 (alternate character sets), plus spellings seen from real senders.
# "UNICODE" alone is ambiguous in HL7 (no encoding form) and "CNS 11643-1992" has no
# Python codec: both are left out, so they come back as unknown (None).
_CODECS = {
    "": "ascii",
    "ASCII": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",
    "BIG-5": "big5",
    "WINDOWS-1258": "cp1258",
    "CP1258": "cp1258",
}


def python_codec(hl7_charset: str) -> str | None:
    """The Python codec for an HL7 table 0211 value (case-insensitive); None if unknown."""
    return _CODECS.get(hl7_charset.strip().upper())


def decode_message(raw: bytes, msh: Msh, *, encoding: str | None, fallback: str) -> tuple[str, str]:
    """Decode a whole message strictly; return ``(text, codec used)``.

    The codec is the listener's ``encoding`` override if set, else MSH-18's codec
    if MSH-18 is present, else ``fallback``. An MSH-18 value with no known codec
    raises AR 103 (table value not found); bytes invalid in the codec raise AE 102.
    Nothing is ever replaced silently.
    """
    if encoding:
        codec = encoding
    elif msh.charset:
        known = python_codec(msh.charset)
        if known is None:
            raise Hl7Error(
                f"unsupported character set in MSH-18: {msh.charset!r}",
                error_code="103",
                location="MSH^1^18",
            )
        codec = known
    else:
        codec = fallback
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as err:
        raise Hl7Error(
            f"cannot decode as {codec}: byte 0x{raw[err.start]:02x} at offset {err.start}",
            ack_code="AE",
            error_code="102",
        ) from err
