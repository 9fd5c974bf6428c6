"""HL7 acknowledgement layer: original-mode ACK (HL7 v2.5.1 §2.9.2, §2.14.1 ACK, §2.15 MSA/ERR).

Encoding of the ACK: the fields mirrored from the received MSH (applications,
facilities, MSH-10) were read as latin-1, so they are written back as latin-1 and
reach the sender as the very bytes it sent, whatever its character set. Our own
text (MSA-3, ERR) is ASCII, other characters replaced by "?", HL7-escaped, and
CR/LF removed. MSH-18 is omitted (ASCII, the HL7 default).
"""

from dataclasses import dataclass

from drivers.hl7.message import Hl7Error, Msh

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
"""HL7 table 0008 acknowledgment codes (original and enhanced mode)."""

_DEFAULT_SEP = "|"
_DEFAULT_ENC = "^~\\&"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.5.1' -> (2, 5, 1); an unreadable version -> (0,)."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def _text(text: str, sep: str, enc: str) -> str:
    """Our text for a field: ASCII ('?' for others), no CR/LF, delimiters escaped (§2.7)."""
    comp, rep, esc, sub = tuple((enc + _DEFAULT_ENC[len(enc) :])[:4])
    table: dict[int, str | None] = {ord("\r"): None, ord("\n"): None}
    for char, name in ((esc, "E"), (sep, "F"), (comp, "S"), (sub, "T"), (rep, "R")):
        table[ord(char)] = f"{esc}{name}{esc}"
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return ascii_text.translate(table)


def build_ack(
    msh: Msh | None,
    code: str,
    *,
    control_id: str,
    timestamp: str,
    error: Hl7Error | None = None,
    text: str = "",
) -> bytes:
    """Build the ACK for a received message (segments ended by CR; not MLLP-framed).

    ``control_id`` and ``timestamp`` are the ACK's own MSH-10 and MSH-7. The ACK
    swaps the received sending/receiving application and facility, mirrors
    MSH-11/MSH-12 (defaults "P", "2.5.1") and puts the received MSH-10 in MSA-2.
    With ``error``, an ERR segment follows: ERR-2 location, ERR-3 code, ERR-4
    severity "E" from v2.5 on; ERR-1 (segment^sequence^field^code&text&HL70357)
    before. With ``msh`` None (MSH unreadable) the defaults are used and MSA-2 is empty.
    """
    if code not in ACK_CODES:
        raise ValueError(f"not an HL7 acknowledgment code: {code!r}")
    if msh is None:
        sep, enc = _DEFAULT_SEP, _DEFAULT_ENC
        sending = receiving = sep  # two empty fields
        trigger, processing, version, received_id = "", "P", "2.5.1", ""
    else:
        sep, enc = msh.field_sep, msh.encoding_chars
        sending = f"{msh.receiving_app}{sep}{msh.receiving_facility}"
        receiving = f"{msh.sending_app}{sep}{msh.sending_facility}"
        trigger = msh.trigger_event
        processing = msh.processing_id or "P"
        version = msh.version or "2.5.1"
        received_id = msh.control_id
    comp = enc[0]
    sub = enc[3] if len(enc) > 3 else "&"
    message_type = f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK"
    msh_fields = ("MSH", enc, sending, receiving, timestamp, "", message_type, control_id)
    msa_fields = ["MSA", code, received_id]
    if text:
        msa_fields.append(_text(text, sep, enc))
    segments = [sep.join((*msh_fields, processing, version)), sep.join(msa_fields)]
    if error is not None:
        err_text = _text(error.text, sep, enc)
        location = error.location.split("^")
        if _version_tuple(version) >= (2, 5):
            erl = comp.join(location) if error.location else ""
            cwe = comp.join((error.error_code, err_text, "HL70357"))
            segments.append(sep.join(("ERR", "", erl, cwe, "E")))
        else:
            seg_seq_field = [*location, "", "", ""][:3]
            ce = sub.join((error.error_code, err_text, "HL70357"))
            segments.append(sep.join(("ERR", comp.join([*seg_seq_field, ce]))))
    return ("\r".join(segments) + "\r").encode("latin-1", "replace")


@dataclass(frozen=True, slots=True)
class AckInfo:
    """What a received ACK says: MSA-1 (upper-cased), MSA-2, MSA-3 (escapes kept), first ERR."""

    code: str
    control_id: str
    text: str
    error: str


def parse_ack(raw: bytes) -> AckInfo:
    """Read MSA (and ERR) from an ACK; segments may end in CR, LF or CR LF.

    Raises :class:`Hl7Error` (AR 100) when there is no MSA segment.
    """
    segments = raw.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r").split("\r")
    sep = _DEFAULT_SEP
    msa: list[str] | None = None
    error = ""
    for segment in segments:
        seg = segment.lstrip()
        if seg.startswith("MSH") and len(seg) > 3:
            sep = seg[3]
        elif seg.startswith("MSA") and msa is None:
            msa = seg.split(sep)
        elif seg.startswith("ERR") and not error:
            error = seg
    if msa is None:
        raise Hl7Error("acknowledgement has no MSA segment", error_code="100")
    msa += ["", "", ""]
    return AckInfo(code=msa[1].strip().upper(), control_id=msa[2], text=msa[3], error=error)
