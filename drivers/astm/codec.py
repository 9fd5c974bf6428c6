"""ASTM E1394-97 / CLSI LIS02-A2 record layer (sans-IO): delimiters, escapes, records, messages.

A message is records from an H (header) through an L (terminator) record, each record
ending in CR (E1394-97 section 6); fields are split by the delimiters that the H record
defines in its characters 1..4 (field 7.1.2, e.g. ``H|\\^&``). Section numbers below are
E1394-97's (header 7, patient 8, order 9.4, result 10, comment 11, request 12,
terminator 13, scientific 14, manufacturer 15); LIS02-A2 keeps the records and their
field order. The link layer (E1381 / LIS01-A2, :mod:`drivers.astm.frames`) delivers
the texts that :class:`MessageAssembler` turns into complete messages.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "COMMENT_FIELDS", "DEFAULT_DELIMITERS", "FIELDS", "HEADER_FIELDS", "MANUFACTURER_FIELDS",
    "MAX_MESSAGE_BYTES", "MAX_RECORD_BYTES", "ORDER_FIELDS", "PATIENT_FIELDS", "RECORD_TYPES",
    "REQUEST_FIELDS", "RESULT_FIELDS", "SCIENTIFIC_FIELDS", "TERMINATOR_FIELDS",
    "AssembledMessage", "AssemblyError", "AssemblyEvent", "AstmError", "Delimiters",
    "FieldPath", "FieldValue", "MessageAssembler", "Record",
    "decode_records", "encode_records", "escape", "unescape",
]  # fmt: skip
MAX_RECORD_BYTES = 64 * 1024
"""Default bound on one record (a real Yumizen H500 M record fills a 26,651-byte frame)."""
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default bound on a message held by :class:`MessageAssembler` before its L record."""

RECORD_TYPES = frozenset("HPOCRMQSL")
"""E1394-97 record type IDs (sections 7-15)."""

# Typed views: E1394 field number N (== Record.fields[N-1]) by name; read with Record.named.
HEADER_FIELDS = {  # 7.1.n
    "delimiters": 2,  # 7.1.2, kept verbatim (never split or unescaped)
    "message_id": 3, "password": 4, "sender": 5, "sender_address": 6, "sender_phone": 8,
    "sender_characteristics": 9, "receiver": 10, "comment": 11,
    "processing_id": 12,  # P production, T training, D debugging, Q quality control
    "version": 13, "timestamp": 14,
}  # fmt: skip
PATIENT_FIELDS = {  # 8.1.n
    "sequence": 2, "practice_patient_id": 3, "lab_patient_id": 4, "patient_id_3": 5,
    "name": 6, "mother_maiden_name": 7, "birthdate": 8, "sex": 9, "race": 10, "address": 11,
    "phone": 13, "attending_physician": 14, "special_1": 15, "special_2": 16, "height": 17,
    "weight": 18, "diagnosis": 19, "medications": 20, "diet": 21, "practice_field_1": 22,
    "practice_field_2": 23, "admission_dates": 24, "admission_status": 25, "location": 26,
    "diagnostic_code_nature": 27, "diagnostic_code": 28, "religion": 29, "marital_status": 30,
    "isolation_status": 31, "language": 32, "hospital_service": 33,
    "hospital_institution": 34, "dosage_category": 35,
}  # fmt: skip
ORDER_FIELDS = {  # 9.4.n
    "sequence": 2, "specimen_id": 3, "instrument_specimen_id": 4,
    "test_id": 5,  # universal test ID (^^^local code); repeats order several tests
    "priority": 6,  # S stat, A ASAP, R routine, C callback, P preoperative
    "requested_at": 7, "collected_at": 8, "collection_end_at": 9, "collection_volume": 10,
    "collector_id": 11,
    "action_code": 12,  # C cancel, A add, N new, P pending, L reserved, X in process, Q QC
    "danger_code": 13, "clinical_info": 14, "received_at": 15,
    "specimen_descriptor": 16,  # specimen type ^ source
    "ordering_physician": 17, "physician_phone": 18, "user_field_1": 19, "user_field_2": 20,
    "lab_field_1": 21, "lab_field_2": 22, "reported_at": 23, "instrument_charge": 24,
    "instrument_section": 25,
    "report_type": 26,  # O order, C correction, P preliminary, F final, X cannot be done, ...
    "collection_location": 28, "nosocomial_infection_flag": 29, "specimen_service": 30,
    "specimen_institution": 31,
}  # fmt: skip
RESULT_FIELDS = {  # 10.1.n
    "sequence": 2, "test_id": 3, "value": 4, "units": 5, "reference_range": 6,
    "abnormal_flags": 7, "abnormality_nature": 8,
    "status": 9,  # C correction, P preliminary, F final, X cannot be done, ...
    "normatives_changed_at": 10, "operator": 11, "started_at": 12, "completed_at": 13,
    "instrument_id": 14,
}  # fmt: skip
COMMENT_FIELDS = {"sequence": 2, "source": 3, "text": 4, "type": 5}  # 11.1.n
REQUEST_FIELDS = {  # 12.1.n
    "sequence": 2, "starting_range": 3, "ending_range": 4, "test_id": 5,
    "time_limits_nature": 6, "results_from": 7, "results_to": 8, "physician_name": 9,
    "physician_phone": 10, "user_field_1": 11, "user_field_2": 12,
    "status_codes": 13,  # request information status codes (O: orders/demographics only, ...)
}  # fmt: skip
TERMINATOR_FIELDS = {"sequence": 2, "termination_code": 3}  # 13.1.n; N normal, Q query error
MANUFACTURER_FIELDS = {"sequence": 2}  # 15.1.n; the rest is defined by each vendor
SCIENTIFIC_FIELDS = {"sequence": 2}  # 14.1.n; rarely sent, read by number
FIELDS: dict[str, dict[str, int]] = {
    "H": HEADER_FIELDS,
    "P": PATIENT_FIELDS,
    "O": ORDER_FIELDS,
    "R": RESULT_FIELDS,
    "C": COMMENT_FIELDS,
    "Q": REQUEST_FIELDS,
    "L": TERMINATOR_FIELDS,
    "M": MANUFACTURER_FIELDS,
    "S": SCIENTIFIC_FIELDS,
}

# E1381 section 6.6.2 / LIS01-A2: control characters restricted from message text
_RESTRICTED_NAMES = {
    "\x01": "SOH", "\x02": "STX", "\x03": "ETX", "\x04": "EOT", "\x05": "ENQ", "\x06": "ACK",
    "\x10": "DLE", "\x11": "DC1", "\x12": "DC2", "\x13": "DC3", "\x14": "DC4", "\x15": "NAK",
    "\x16": "SYN", "\x17": "ETB",
}  # fmt: skip
_RESTRICTED = re.compile("[" + "".join(_RESTRICTED_NAMES) + "]")
_DELIMITER_CHARS = frozenset(string.punctuation)
_HEX = frozenset(string.hexdigits)


class AstmError(ValueError):
    """A record or message that breaks E1394 / LIS02-A2 or our bounds: where, and what."""

    def __init__(
        self,
        reason: str,
        *,
        index: int | None = None,
        record_type: str | None = None,
        field: int | None = None,
    ) -> None:
        self.reason = reason
        self.index = index  # 1-based position of the record in the decoded text
        self.record_type = record_type
        self.field = field
        where = []
        if index is not None:
            shown = record_type if record_type in RECORD_TYPES else repr(record_type)
            where.append(f"record {index}" + (f" ({shown})" if record_type else ""))
        if field is not None:
            where.append(f"field {record_type or '?'}.{field}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)


@dataclass(frozen=True, slots=True)
class Delimiters:
    """Field, repeat, component and escape delimiters (E1394-97 section 6, field 7.1.2)."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"

    def __post_init__(self) -> None:
        chars = (self.field, self.repeat, self.component, self.escape)
        if any(len(c) != 1 or c not in _DELIMITER_CHARS for c in chars):
            raise AstmError(f"delimiters {''.join(chars)!r} must be ASCII punctuation")
        if len(set(chars)) != 4:
            raise AstmError(f"delimiters {''.join(chars)!r} are not four distinct characters")

    @property
    def definition(self) -> str:
        """H.2 as sent: repeat, component, escape (``\\^&``)."""
        return self.repeat + self.component + self.escape

    @classmethod
    def from_header(cls, record: str) -> Delimiters:
        """Read the delimiters from an H record's characters 1..4 (``H|\\^&``, ``H|@^\\``)."""
        if not record.startswith("H"):
            raise AstmError(f"not an H record: {_head(record)}")
        if len(record) < 5:
            raise AstmError(f"H record too short to define delimiters: {record!r}", field=2)
        try:
            d = cls(record[1], record[2], record[3], record[4])
        except AstmError as err:
            raise AstmError(err.reason, record_type="H", field=2) from err
        if len(record) > 5 and record[5] != d.field:
            raise AstmError(
                f"delimiter definition {record[1:6]!r} is not followed by the field delimiter",
                record_type="H",
                field=2,
            )
        return d


DEFAULT_DELIMITERS = Delimiters()


def unescape(value: str, d: Delimiters, *, encoding: str = "latin-1") -> str:
    """Replace E1394 escape sequences: &F& &S& &R& &E& and &Xhh..& (bytes in ``encoding``).

    Unknown or malformed sequences are kept literally (a lone escape character too).
    """
    esc = d.escape
    if esc not in value:
        return value
    out: list[str] = []
    pos = 0
    while (start := value.find(esc, pos)) >= 0:
        end = value.find(esc, start + 1)
        if end < 0:
            break
        replacement = _sequence(value[start + 1 : end], d, encoding)
        if replacement is None:  # keep the escape character; its partner may open a sequence
            out.append(value[pos : start + 1])
            pos = start + 1
            continue
        out.append(value[pos:start])
        out.append(replacement)
        pos = end + 1
    out.append(value[pos:])
    return "".join(out)


def _sequence(seq: str, d: Delimiters, encoding: str) -> str | None:
    if len(seq) == 1:
        return {"F": d.field, "S": d.component, "R": d.repeat, "E": d.escape}.get(seq)
    digits = seq[1:]
    if seq[:1] != "X" or not digits or len(digits) % 2 or not _HEX.issuperset(digits):
        return None
    try:
        return bytes.fromhex(digits).decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


@functools.lru_cache(maxsize=16)
def _escape_table(d: Delimiters) -> dict[int, str]:
    e = d.escape
    table = {c: f"{e}X{c:02X}{e}" for c in (*range(0x20), 0x7F)}  # CR, LF, link controls
    table |= {ord(d.field): f"{e}F{e}", ord(d.repeat): f"{e}R{e}"}
    table |= {ord(d.component): f"{e}S{e}", ord(d.escape): f"{e}E{e}"}
    return table


def escape(value: str, d: Delimiters) -> str:
    """Escape delimiters (&F& &R& &S& &E&) and control characters (&Xhh&) for sending."""
    return value.translate(_escape_table(d))


FieldPath = str | int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One record: ``fields`` are the raw (escaped) strings, ``fields[N-1]`` is field N."""

    type: str
    fields: tuple[str, ...]
    delimiters: Delimiters = DEFAULT_DELIMITERS
    encoding: str = "latin-1"  # of the message; &Xhh& escapes are bytes in it

    def field(self, n: int) -> str:
        """Raw field N (E1394 numbering; 1 is the type); '' when the record omits it."""
        if n < 1:
            raise ValueError(f"field numbers start at 1, not {n}")
        return self.fields[n - 1] if n <= len(self.fields) else ""

    def _verbatim(self, n: int) -> bool:
        return n == 2 and self.type == "H"

    def text(self, n: int) -> str:
        """Whole field N unescaped; repeat and component delimiters in it stay literal."""
        raw = self.field(n)
        return raw if self._verbatim(n) else unescape(raw, self.delimiters, encoding=self.encoding)

    def repeats(self, n: int) -> list[list[str]]:
        """Field N as repeats, each a list of unescaped components; [] when empty."""
        raw = self.field(n)
        if not raw:
            return []
        if self._verbatim(n):
            return [[raw]]
        d, enc = self.delimiters, self.encoding
        return [
            [unescape(c, d, encoding=enc) for c in r.split(d.component)]
            for r in raw.split(d.repeat)
        ]

    def get(self, path: FieldPath, *, strip: bool = False) -> str:
        """Unescaped value at ``path``; '' when missing.

        ``"N"`` / ``N`` / ``(N,)``: the whole field (as :meth:`text`); ``"N.C"`` /
        ``(N, C)``: component C of the first repeat; ``"N.C.R"`` / ``(N, C, R)``:
        component C of repeat R. ``strip`` drops the space padding some analyzers send.
        """
        n, component, repeat = _parse_path(path)
        if component == 0:
            value = self.text(n)
        elif self._verbatim(n):
            value = self.field(n) if (component, repeat) == (1, 1) else ""
        else:
            d = self.delimiters
            repeats = self.field(n).split(d.repeat)
            components = repeats[repeat - 1].split(d.component) if repeat <= len(repeats) else []
            raw = components[component - 1] if component <= len(components) else ""
            value = unescape(raw, d, encoding=self.encoding)
        return value.strip() if strip else value

    def named(self, name: str, *, strip: bool = False) -> str:
        """Whole field by its name in :data:`FIELDS` (``record.named("value")`` == R.4)."""
        try:
            n = FIELDS[self.type][name]
        except KeyError:
            raise KeyError(f"{self.type} records have no field named {name!r}") from None
        return self.get(n, strip=strip)


def _parse_path(path: FieldPath) -> tuple[int, int, int]:
    if isinstance(path, int):
        parts: tuple[int, ...] = (path,)
    elif isinstance(path, str):
        try:
            parts = tuple(int(p) for p in path.split("."))
        except ValueError:
            raise ValueError(f"bad field path {path!r}: expected N, N.C or N.C.R") from None
    else:
        parts = path
    if not 1 <= len(parts) <= 3 or any(p < 1 for p in parts):
        raise ValueError(f"bad field path {path!r}: expected N, N.C or N.C.R, each >= 1")
    component = parts[1] if len(parts) > 1 else 0  # 0: the whole field
    repeat = parts[2] if len(parts) > 2 else 1
    return parts[0], component, repeat


def _head(text: str, size: int = 16) -> str:
    return repr(text[:size] + "…" if len(text) > size else text)


def decode_records(
    text: bytes,
    encoding: str = "latin-1",
    *,
    delimiters: Delimiters | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> list[Record]:
    """Records from ``text``: each ends in CR (an LF right after the CR is tolerated).

    Delimiters come from each H record; a text that does not start with one needs
    ``delimiters``. Raises :class:`AstmError` (with the record's position) on bytes
    that are not ``encoding`` (an ASCII-compatible one), a record over
    ``max_record_bytes``, restricted control characters, a stray LF, an unknown
    record type, bad delimiters, or a last record without its CR.
    """
    if len(text) > max_record_bytes:
        for i, chunk in enumerate(text.split(b"\r"), 1):
            if len(chunk.lstrip(b"\n")) > max_record_bytes:
                rtype = chunk.lstrip(b"\n")[:1].decode("latin-1")
                raise AstmError(
                    f"{len(chunk)} bytes, over the {max_record_bytes}-byte record limit",
                    index=i,
                    record_type=rtype,
                )
    try:
        decoded = text.decode(encoding)
    except UnicodeDecodeError as err:
        index = text.count(b"\r", 0, err.start) + 1
        offset = err.start - (text.rfind(b"\r", 0, err.start) + 1)
        byte = text[err.start : err.start + 1]
        raise AstmError(
            f"byte {byte!r} at offset {offset} is not valid {encoding} ({err.reason})",
            index=index,
            record_type=text[err.start - offset : err.start - offset + 1].decode("latin-1"),
        ) from err
    except LookupError as err:
        raise AstmError(f"unknown encoding {encoding!r}") from err
    if bad := _RESTRICTED.search(decoded):
        index = decoded.count("\r", 0, bad.start()) + 1
        raise AstmError(
            f"control character {_RESTRICTED_NAMES[bad.group()]} inside a record "
            "(E1381 restricts it to the link layer)",
            index=index,
        )
    lines = decoded.split("\r")
    d = delimiters
    records: list[Record] = []
    for i, line in enumerate(lines, 1):
        if line.startswith("\n"):
            line = line.lstrip("\n")  # noqa: PLW2901 - LF after CR belongs to the separator
        if not line:
            continue
        if line[0] == "H":
            try:
                d = Delimiters.from_header(line)
            except AstmError as err:
                raise AstmError(err.reason, index=i, record_type="H", field=err.field) from err
        elif d is None:
            raise AstmError(f"a message must start with an H record, not {_head(line)}", index=i)
        if "\n" in line:
            raise AstmError(
                "LF inside a record (records end with CR; LF is only tolerated after one)",
                index=i,
                record_type=line[0],
            )
        fields = tuple(line.split(d.field))
        if fields[0] not in RECORD_TYPES:
            raise AstmError(
                f"unknown record type {_head(fields[0])} (E1394: H P O R C M Q S L)", index=i
            )
        if i == len(lines):
            raise AstmError(
                f"last record does not end with CR (truncated?): {_head(line)}", index=i
            )
        records.append(Record(fields[0], fields, d, encoding))
    return records


Component = str | int | None
FieldValue = Component | Sequence[Component | Sequence[Component]]


def _component(value: Component, d: Delimiters) -> str:
    if value is None:
        return ""
    return escape(value if isinstance(value, str) else str(value), d)


def _repeat(value: Component | Sequence[Component], d: Delimiters) -> str:
    if value is None or isinstance(value, str | int):
        return _component(value, d)
    return d.component.join(_component(c, d) for c in value)


def _encode_field(value: FieldValue, d: Delimiters) -> str:
    """str/int/None: one value; a list of values: components; a list with lists: repeats."""
    if value is None or isinstance(value, str | int):
        return _component(value, d)
    if any(not (v is None or isinstance(v, str | int)) for v in value):
        return d.repeat.join(_repeat(r, d) for r in value)
    return d.component.join(_repeat(v, d) for v in value)  # each v is one value here


def _record_text(record: Record | Sequence[FieldValue], index: int, d: Delimiters) -> str:
    if isinstance(record, Record):
        rtype = record.type
        if record.delimiters == d:
            fields = list(record.fields)
        else:
            fields = [rtype] + [
                d.repeat.join(d.component.join(escape(c, d) for c in r) for r in record.repeats(n))
                for n in range(2, len(record.fields) + 1)
            ]
    else:
        if not record or not isinstance(record[0], str):
            raise AstmError("a record starts with its type (a string)", index=index)
        rtype = record[0]
        fields = [rtype] + [_encode_field(v, d) for v in record[1:]]
    if rtype not in RECORD_TYPES:
        raise AstmError(
            f"unknown record type {_head(rtype)} (E1394: H P O R C M Q S L)", index=index
        )
    if rtype == "H":
        given = record[1] if not isinstance(record, Record) and len(record) > 1 else None
        if given not in (None, "", d.definition):
            raise AstmError(
                f"H.2 is written from the delimiters ({d.definition!r}), not {given!r}",
                index=index,
                record_type="H",
                field=2,
            )
        fields[1:2] = [d.definition]
    return d.field.join(fields) + "\r"


def encode_records(
    records: Iterable[Record | Sequence[FieldValue]],
    d: Delimiters = DEFAULT_DELIMITERS,
    encoding: str = "latin-1",
) -> bytes:
    """Records for sending, each ending in CR; values are escaped for ``d``.

    A record is a :class:`Record` or a list ``[type, field 2, field 3, ...]`` whose
    values are a str/int/None, a list of components, or a list of repeats (lists of
    components). H.2 is written from ``d`` (leave it '' or omit it).
    """
    text = "".join(_record_text(r, i, d) for i, r in enumerate(records, 1))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as err:
        index = text.count("\r", 0, err.start) + 1
        raise AstmError(
            f"cannot encode {err.object[err.start]!r} in {encoding}", index=index
        ) from err
    except LookupError as err:
        raise AstmError(f"unknown encoding {encoding!r}") from err


# -- message assembly ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssembledMessage:
    """A complete message, H through L: ``raw`` exactly as received, and its records."""

    raw: bytes
    records: list[Record]  # as decode_records returns them

    @property
    def header(self) -> Record:
        return self.records[0]


@dataclass(frozen=True, slots=True)
class AssemblyError:
    """Bytes that make no valid message (to quarantine), and why."""

    reason: str
    raw: bytes


AssemblyEvent = AssembledMessage | AssemblyError

_CR, _LF, _H, _L = 0x0D, 0x0A, ord("H"), ord("L")


class _State(Enum):
    IDLE = "at a record start, no message open"
    JUNK = "inside a record that is outside any message"
    MESSAGE = "inside a message (after its H record)"


class MessageAssembler:
    """Texts from the link layer in, :data:`AssemblyEvent` list out (E1394 section 5.1).

    Records may be cut anywhere by framing; a record is complete at its CR. Text
    outside a message (before an H) is reported as an :class:`AssemblyError`, one per
    run per feed; a second H before the L reports the open message as an error and
    starts a new one. CR or LF between messages is dropped silently. The link adapter
    calls :meth:`reset` on an aborted transfer (or an EOT with a message still open).
    """

    def __init__(
        self,
        *,
        encoding: str = "latin-1",
        max_record_bytes: int = MAX_RECORD_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not 0 < max_record_bytes <= max_message_bytes:
            raise ValueError("need 0 < max_record_bytes <= max_message_bytes")
        self._encoding = encoding
        self._max_record = max_record_bytes
        self._max_message = max_message_bytes
        self._state = _State.IDLE
        self._buf = bytearray()  # the open message: its complete records, then a partial one
        self._record_start = 0  # where the partial record starts in _buf
        self._records = 0  # complete records in _buf
        self._field = ord("|")  # field delimiter of the open message

    @property
    def pending(self) -> bytes:
        """The open message's bytes so far (complete records and a partial one)."""
        return bytes(self._buf)

    def reset(self) -> bytes:
        """Drop the open message (link abort) and return its bytes."""
        partial = bytes(self._buf)
        self._clear(_State.IDLE)
        return partial

    def feed(self, text: bytes) -> list[AssemblyEvent]:
        """Add one text (any cut); return the messages and errors it completes, in order."""
        events: list[AssemblyEvent] = []
        junk = bytearray()
        pos, n = 0, len(text)
        while pos < n:
            if self._state is _State.IDLE:
                byte = text[pos]
                if byte in (_CR, _LF):
                    if junk:
                        junk.append(byte)
                    pos += 1
                elif byte == _H:
                    if junk:
                        events.append(AssemblyError("text outside a message", bytes(junk)))
                        junk.clear()
                    self._state = _State.MESSAGE
                else:
                    self._state = _State.JUNK
                continue
            cr = text.find(b"\r", pos)
            end = n if cr < 0 else cr + 1
            if self._state is _State.JUNK:
                junk += text[pos:end]
                if cr >= 0:
                    self._state = _State.IDLE
            else:
                self._buf += text[pos:end]
                if self._within_bounds(events, complete=cr >= 0) and cr >= 0:
                    self._record_done(events)
            pos = end
        if junk:
            events.append(AssemblyError("text outside a message", bytes(junk)))
        return events

    def _clear(self, state: _State) -> None:
        self._buf.clear()
        self._record_start = self._records = 0
        self._state = state

    def _within_bounds(self, events: list[AssemblyEvent], *, complete: bool) -> bool:
        size = len(self._buf) - self._record_start - (1 if complete else 0)
        if size > self._max_record:
            reason = f"record {self._records + 1} over {self._max_record} bytes"
        elif len(self._buf) > self._max_message:
            reason = f"message over {self._max_message} bytes without an L record"
        else:
            return True
        events.append(AssemblyError(reason, bytes(self._buf)))
        self._clear(_State.IDLE if complete else _State.JUNK)  # the rest of the record is junk
        return False

    def _record_done(self, events: list[AssemblyEvent]) -> None:
        buf = self._buf
        first = self._record_start
        while buf[first] == _LF:  # an LF after the previous record's CR
            first += 1
        kind = buf[first]
        if kind == _H:
            if first > 0:
                events.append(AssemblyError("H record before the L record", bytes(buf[:first])))
                del buf[:first]
                self._records = 0
            header = bytes(buf)
            try:
                d = Delimiters.from_header(header[:-1].decode(self._encoding))
            except (AstmError, UnicodeDecodeError, LookupError) as err:
                events.append(AssemblyError(f"bad H record: {err}", header))
                self._clear(_State.IDLE)
                return
            self._field = ord(d.field)
        elif kind == _L and buf[first + 1] in (self._field, _CR):
            raw = bytes(buf)
            self._clear(_State.IDLE)
            try:
                records = decode_records(raw, self._encoding, max_record_bytes=self._max_record)
            except AstmError as err:
                events.append(AssemblyError(str(err), raw))
            else:
                events.append(AssembledMessage(raw, records))
            return
        self._records += 1
        self._record_start = len(buf)
