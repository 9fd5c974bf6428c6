"""Routing headers from a received DICOM file's header (PS3.5 section 7, PS3.10 section 7.1).

:func:`routing_headers` reads the few top-level attributes that routes match on
from the Part-10 bytes exactly as they will be journaled, without decoding the
data set: a small scanner walks the elements (explicit or implicit VR, little
or big endian, deflated), skips sequences, and stops at the first tag after the
last one it wants, so the pixel data is never touched. When the scanner meets
something it does not handle, pydicom reads the header instead
(``stop_before_pixels``); when neither can, :class:`HeaderError`.

Patient attributes are never read: headers are logged and shown to technicians.

:func:`part10_prefix` is the other direction: the preamble and file meta
information put in front of a data set received over the network (PS3.10
section 7.1), encoded directly (pydicom's writer costs about 0.3 ms a file).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Final

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.errors import InvalidDicomError

# (group << 16 | element) -> header name (the DICOM keyword)
ROUTING_TAGS: Final[dict[int, str]] = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00081010: "StationName",
    0x00180015: "BodyPartExamined",
    0x00185101: "ViewPosition",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200062: "ImageLaterality",
}
_CHARSET_TAG: Final = 0x00080005  # Specific Character Set: how SH/LO values are encoded
_WANTED: Final = frozenset((*ROUTING_TAGS, _CHARSET_TAG))
_LAST: Final = max(ROUTING_TAGS)
_TRANSFER_SYNTAX_TAG: Final = 0x00020010

# PS3.5 section 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_VRS: Final = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD

_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_DEFLATED: Final = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
_INFLATE_FIRST: Final = 1 << 20  # deflated data sets: inflate this much first, all if short


class HeaderError(ValueError):
    """The bytes are not a DICOM file whose header can be read."""


class _Unsupported(Exception):
    """The scanner cannot read this encoding; pydicom may."""


def routing_headers(encoded: bytes) -> dict[str, str]:
    """Header name -> string value for routing; attributes absent or empty are left out.

    ``encoded`` is a Part-10 file: 128-byte preamble, ``DICM``, file meta
    information, data set (what ``event.encoded_dataset()`` returns).
    ``TransferSyntaxUID`` comes from the file meta information.
    """
    try:
        return _scan(encoded)
    except (_Unsupported, struct.error, zlib.error, IndexError, UnicodeDecodeError):
        return _with_pydicom(encoded)


def part10_prefix(
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    implementation_uid: str,
    implementation_version: str = "",
) -> bytes:
    """Preamble, ``DICM`` and the file meta information (group 0002, explicit VR little
    endian) for a data set of ``sop_class`` / ``sop_instance`` in ``transfer_syntax``:
    the same bytes pynetdicom's ``event.encoded_dataset()`` puts before the data set."""

    def element(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2s2xL", 0x0002, elem, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", uid(sop_class)),
            element(0x0003, b"UI", uid(sop_instance)),
            element(0x0010, b"UI", uid(transfer_syntax)),
            element(0x0012, b"UI", uid(implementation_uid)),
        )
    )
    if implementation_version:
        version = implementation_version.encode("ascii")
        body += element(0x0013, b"SH", version + b" " if len(version) % 2 else version)
    group_length = element(0x0000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


# -- the scanner -------------------------------------------------------------------------


def _scan(data: bytes) -> dict[str, str]:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise HeaderError("not a DICOM Part-10 file (no 'DICM' after the preamble)")
    pos, syntax = _file_meta(data, 132)
    if not syntax:
        raise _Unsupported("no transfer syntax in the file meta information")
    little = syntax != _EXPLICIT_BE
    explicit = syntax != _IMPLICIT_LE
    raw: dict[int, bytes] = {}
    if syntax in _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        body = inflater.decompress(data[pos:], _INFLATE_FIRST)
        try:
            _walk(body, 0, len(body), little, explicit, raw=raw, top=True)
        except _Truncated:
            if not inflater.unconsumed_tail:
                raise _Unsupported("truncated deflated data set") from None
            body += inflater.decompress(inflater.unconsumed_tail) + inflater.flush()
            raw.clear()
            _walk(body, 0, len(body), little, explicit, raw=raw, top=True)
    else:
        try:
            _walk(data, pos, len(data), little, explicit, raw=raw, top=True)
        except _Truncated:
            raise _Unsupported("data set ends inside an element") from None
    out = {"TransferSyntaxUID": syntax}
    charset = raw.pop(_CHARSET_TAG, b"")
    for tag, value in sorted(raw.items()):
        text = _text(value, charset)
        if text:
            out[ROUTING_TAGS[tag]] = text
    return out


class _Truncated(Exception):
    """An element runs past the end of the bytes."""


def _file_meta(data: bytes, pos: int) -> tuple[int, str]:
    """Walk group 0002 (always explicit VR little endian); return where the data set
    starts and the transfer syntax UID."""
    syntax = ""
    end = len(data)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if length == _UNDEFINED or start + length > end:
            raise HeaderError("file meta information is truncated or malformed")
        if (group << 16 | elem) == _TRANSFER_SYNTAX_TAG:
            syntax = data[start : start + length].rstrip(b"\x00 ").decode("ascii").strip()
        pos = start + length
    return pos, syntax


def _walk(
    data: bytes,
    pos: int,
    end: int,
    little: bool,
    explicit: bool,
    *,
    raw: dict[int, bytes] | None,
    top: bool = False,
) -> int:
    """Read elements from ``pos``; collect wanted top-level values into ``raw``.

    Returns where it stopped: after an item delimiter (inside an item of undefined
    length), at ``end``, or, at the top level, at the first tag after the last
    wanted one.
    """
    tag_fmt = "<HH" if little else ">HH"
    u16 = "<H" if little else ">H"
    u32 = "<L" if little else ">L"
    while pos < end:
        if pos + 8 > end:
            raise _Truncated
        group, elem = struct.unpack_from(tag_fmt, data, pos)
        tag = group << 16 | elem
        if top and tag > _LAST:
            return pos
        if tag == _ITEM_END:
            return pos + 8
        if group == 0xFFFE:
            raise _Unsupported(f"unexpected delimiter {tag:08X}")
        vr = b""
        if explicit:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Truncated
                (length,) = struct.unpack_from(u32, data, pos + 8)
                start = pos + 12
            elif vr.isalpha() and vr.isupper():
                (length,) = struct.unpack_from(u16, data, pos + 6)
                start = pos + 8
            else:
                raise _Unsupported(f"no VR at {tag:08X} in an explicit VR data set")
        else:
            (length,) = struct.unpack_from(u32, data, pos + 4)
            start = pos + 8
        if length == _UNDEFINED:
            if tag == 0x7FE00010:
                raise _Unsupported("encapsulated pixel data before the routing attributes")
            # a sequence; an explicit 'UN' of undefined length is implicit VR inside (CP-246)
            pos = _skip_sequence(data, start, end, little, explicit and vr != b"UN")
            continue
        if start + length > end:
            raise _Truncated
        if raw is not None and tag in _WANTED:
            raw[tag] = data[start : start + length]
        pos = start + length
    return pos


def _skip_sequence(data: bytes, pos: int, end: int, little: bool, explicit: bool) -> int:
    """Skip the items of a sequence of undefined length; return the position after its
    sequence delimiter."""
    fmt = "<HHL" if little else ">HHL"
    while True:
        if pos + 8 > end:
            raise _Truncated
        group, elem, length = struct.unpack_from(fmt, data, pos)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM:
            raise _Unsupported(f"expected an item in a sequence, found {tag:08X}")
        if length == _UNDEFINED:
            pos = _walk(data, pos + 8, end, little, explicit, raw=None)
        else:
            pos += 8 + length


def _text(value: bytes, charset: bytes) -> str:
    """A value as text: padding and insignificant spaces removed (PS3.5 section 6.2)."""
    value = value.rstrip(b"\x00 ").lstrip(b" ")
    if not value:
        return ""
    if value.isascii():
        return value.decode("ascii")
    terms = [t.strip() for t in charset.decode("ascii", "replace").split("\\")]
    return decode_bytes(value, convert_encodings(terms or [""]), set()).strip()


# -- the fallback --------------------------------------------------------------------------


def _with_pydicom(data: bytes) -> dict[str, str]:
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        out = {"TransferSyntaxUID": syntax} if syntax else {}
        for keyword in ROUTING_TAGS.values():
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            text = "\\".join(str(v) for v in value) if _is_multi(value) else str(value)
            if text.strip():
                out[keyword] = text.strip()
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise HeaderError(f"cannot read the DICOM header: {err}") from err
    return out


def _is_multi(value: object) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
