"""HL7 v2 analyzer messages -> :class:`gateway.lab.LabReport`; host queries -> :class:`LabQuery`.

Results: ORU^R01 (HL7 v2.5.1 §7.3.1; v2.3.1 as Mindray BS-series send it) and
OUL^R22 (ch. 7; IHE LAW LAB-29 "AWOS Status Change", e.g. Biosystems BA400).
Fields are read where the profile's :class:`~drivers.lab.profiles.Hl7Fields` say,
with ``str.split`` (:mod:`drivers.hl7.orders`), never with a full HL7 parser: this
runs for every received message. A path ``SEG-n.c`` reads the nearest preceding
segment ``SEG`` of the current specimen/order group (then of the patient, then
MSH); a tuple of paths means "the first non-empty one".

Grouping, one report per specimen:

- OUL^R22: an SPM opens a specimen; its ORDER groups (OBR, ORC, TQ1, OBX, NTE)
  follow. OBX directly after SPM (before any OBR) describe the specimen, not a
  test, and are not results.
- ORU^R01: an OBR (with the ORC before it) opens a group; an SPM inside the
  group (v2.5.1 ORU_R01_SPECIMEN) belongs to it and its OBX are not results.
- Groups with the same sample and patient id become one report (an analyzer
  that sends one OBR per test still gives one report per specimen).

QC: a report is QC when a ``profile.qc`` rule with an HL7 path matches, or when
SPM-11 (specimen role, HL7 table 0369) is ``Q`` ("control specimen"), which is how
IHE LAW (LAB-28/LAB-29) marks QC specimens. Mindray BS put the sample kind in
MSH-16 (0 patient, 1 calibration, 2 QC): their profile says ``{field: MSH-16, equals: ["2"]}``.
QC reports carry no patient fields; ``control`` is INV-1 (LAW's control material)
or else the sample id.

Host queries: :func:`parse_query` reads QBP^Q11 (IHE LAW LAB-27 "Query for AWOS":
QPD-1 ``WOS^Work Order Step^IHE_LABTF``, QPD-2 query tag, QPD-3 the specimen
container id) and Mindray's QRY^Q02 (HL7 v2.3.1 ch. 2 original-mode query; QRD-4
query id, QRD-8 the sample barcode).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from drivers.hl7.message import Hl7Error, Msh, decode_message, parse_msh
from drivers.hl7.orders import Delimiters, Segment, split_segments
from drivers.lab.profiles import Profile
from gateway.lab import LabReport, LabResult

RESULT_MESSAGES = frozenset({("ORU", "R01"), ("OUL", "R22")})
QUERY_MESSAGES = frozenset({("QBP", "Q11"), ("QRY", "Q02")})
LAW_QC_ROLE = "Q"  # SPM-11, HL7 table 0369: Q = control specimen

_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?$")
_PATIENT_LEVEL = frozenset({"MSH", "PID", "PD1", "PV1", "PV2"})
_VT, _FS = b"\x0b", b"\x1c"


class LabMessageError(ValueError):
    """A message that cannot give lab reports or a query. ``error_code`` is an HL7
    table 0357 value and ``location`` an ERR-2 location, for the ACK's ERR segment."""

    def __init__(self, text: str, *, error_code: str = "207", location: str = "") -> None:
        super().__init__(text)
        self.error_code = error_code
        self.location = location


def is_result_message(msh: Msh) -> bool:
    """ORU^R01 or OUL^R22 (MSH-9.1, MSH-9.2; case-insensitive)."""
    return (msh.message_code.upper(), msh.trigger_event.upper()) in RESULT_MESSAGES


def is_query_message(msh: Msh) -> bool:
    """QBP^Q11 (IHE LAW LAB-27) or QRY^Q02 (Mindray host query)."""
    return (msh.message_code.upper(), msh.trigger_event.upper()) in QUERY_MESSAGES


# -- reading ---------------------------------------------------------------------------------


def unframe(raw: bytes) -> bytes:
    """``raw`` without MLLP framing (VT ... FS CR) if it still has it."""
    start = raw.find(_VT)
    if start >= 0 and not raw[:start].strip():
        raw = raw[start + 1 :]
    end = raw.rfind(_FS)
    if end >= 0 and not raw[end + 1 :].strip():
        raw = raw[:end]
    return raw


def _decode(raw: bytes, fallback: str, force: bool = False) -> tuple[Msh, list[Segment]]:
    raw = unframe(raw)
    try:
        msh = parse_msh(raw)
        text, codec = decode_message(
            raw, msh, encoding=fallback if force else None, fallback=fallback
        )
    except Hl7Error as err:
        raise LabMessageError(
            f"unreadable HL7 message: {err}", error_code=err.error_code, location=err.location
        ) from err
    return msh, split_segments(text, Delimiters.of(msh), codec)


def field_text(seg: Segment, n: int) -> str:
    """Field n's first repetition, unescaped, components joined by ``^`` (trailing
    empty ones dropped); ``""`` (HL7 null) components are empty."""
    return "^".join(seg.components(n)).rstrip("^")


def read(ctx: dict[str, Segment], path: str) -> str:
    """The value at ``path`` (``OBX-5``, ``SPM-2.1``) in the segments in scope."""
    m = _PATH.match(path)
    if m is None:
        return ""
    seg = ctx.get(m.group(1))
    if seg is None:
        return ""
    n = int(m.group(2))
    if m.group(3) is None:
        return field_text(seg, n)
    return seg.get(n, int(m.group(3)))


def first(ctx: dict[str, Segment], paths: Sequence[str]) -> str:
    for path in paths:
        value = read(ctx, path)
        if value:
            return value
    return ""


def _value(ctx: dict[str, Segment], path: str) -> str:
    """OBX-5 as text; an SN value (comparator^num1^separator^num2, ch. 2A) is
    written back as one string (``<^2.00`` -> ``<2.00``) so it parses as a number."""
    obx = ctx.get("OBX")
    if path == "OBX-5" and obx is not None and obx.get(2).upper() == "SN":
        return "".join(obx.components(5)[:4]).strip()
    return read(ctx, path)


def _flags(ctx: dict[str, Segment], path: str) -> tuple[str, ...]:
    """Abnormal flags as sent, one per repetition (OBX-8 repeats from v2.5)."""
    m = _PATH.match(path)
    seg = ctx.get(m.group(1)) if m else None
    if m is None or seg is None:
        return ()
    n = int(m.group(2))
    comp = int(m.group(3) or 1)
    return tuple(
        flag for rep in range(len(seg.repetitions(n))) if (flag := seg.get(n, comp, rep=rep))
    )


def _is_qc(ctx: dict[str, Segment], profile: Profile) -> bool:
    if read(ctx, "SPM-11.1").upper() == LAW_QC_ROLE:
        return True
    return any(
        _PATH.match(rule.field) and rule.matches(read(ctx, rule.field)) for rule in profile.qc
    )


# -- grouping --------------------------------------------------------------------------------


@dataclass
class _Group:
    """One specimen (OUL) or order (ORU) group: segments in scope and its results."""

    ctx: dict[str, Segment]
    results: list[LabResult] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    first_obx: Segment | None = None
    specimen_obs: bool = False  # OBX now describe the specimen, not a test
    last: str = ""  # the segment before an NTE: OBX -> result comment


def reports_from_hl7(raw: bytes, profile: Profile, instrument: str) -> list[LabReport]:
    """One report per specimen of an ORU^R01 / OUL^R22, in message order.

    The text is decoded with MSH-18's character set, else ``profile.encoding``.
    Raises :class:`LabMessageError` for other message types, unreadable messages
    and messages without a single OBX result.
    """
    msh, segments = _decode(raw, profile.encoding, profile.hl7_behaviour.force_encoding)
    where = f"{msh.message_code}^{msh.trigger_event} control id {msh.control_id}"
    if not is_result_message(msh):
        raise LabMessageError(
            f"{where}: not a result message (ORU^R01 or OUL^R22)", error_code="200"
        )
    oul = msh.message_code.upper() == "OUL"
    patient: dict[str, Segment] = {}
    pending: dict[str, Segment] = {}  # ORU: an ORC waits for its OBR
    groups: list[_Group] = []
    current: _Group | None = None
    for seg in segments:
        name = seg.name
        if name in _PATIENT_LEVEL:
            if name == "PID":
                patient = {k: v for k, v in patient.items() if k == "MSH"}
                current, pending = None, {}
            patient[name] = seg
        elif name == "SPM" and (oul or current is None):
            current = _Group({**patient, "SPM": seg}, specimen_obs=True)
            groups.append(current)
        elif name == "OBR" and not (oul and current is not None):
            current = _Group({**patient, **pending, "OBR": seg})
            groups.append(current)
            pending = {}
        elif current is None:
            if name == "ORC":
                pending["ORC"] = seg
        elif name == "OBR":  # OUL: next ORDER group of the specimen
            for key in ("ORC", "TQ1", "OBX"):
                current.ctx.pop(key, None)
            current.ctx["OBR"] = seg
            current.specimen_obs = False
        elif name == "ORC" and not oul:
            pending["ORC"] = seg  # belongs to the next OBR
        elif name == "OBX":
            current.ctx["OBX"] = seg
            if not current.specimen_obs:
                current.first_obx = current.first_obx or seg
                current.results.append(_result(current.ctx, profile))
        elif name == "NTE":
            _comment(current, seg)
        else:  # SPM (ORU), ORC (OUL), TQ1, SAC, INV, ...
            current.ctx[name] = seg
            current.specimen_obs = current.specimen_obs or name == "SPM"
        if current is not None and name != "NTE":
            current.last = name
    reports = _merge([_report(g, profile, instrument) for g in groups if g.results])
    if not reports:
        raise LabMessageError(f"{where}: no OBX results", error_code="101")
    return reports


def _comment(group: _Group, nte: Segment) -> None:
    reps = range(len(nte.repetitions(3)))
    text = " ".join(" ".join(c for c in nte.components(3, r) if c) for r in reps).strip()
    if not text or group.specimen_obs:
        return
    if group.last == "OBX" and group.results:
        last = group.results[-1]
        group.results[-1] = last.model_copy(update={"comments": (*last.comments, text)})
    else:
        group.comments.append(text)


def _result(ctx: dict[str, Segment], profile: Profile) -> LabResult:
    f = profile.hl7
    return LabResult.of(
        profile.code_of(first(ctx, f.test_code)),
        _value(ctx, f.value) if f.value else "",
        test_name=first(ctx, f.test_name),
        units=read(ctx, f.units) if f.units else "",
        reference_range=read(ctx, f.reference_range) if f.reference_range else "",
        flags=_flags(ctx, f.flags) if f.flags else (),
        status=read(ctx, f.status) if f.status else "",
        result_time=first(ctx, f.result_time),
        operator=read(ctx, "OBX-16.1"),  # responsible observer (XCN id)
    )


def _report(group: _Group, profile: Profile, instrument: str) -> LabReport:
    f = profile.hl7
    ctx = dict(group.ctx)
    if group.first_obx is not None:
        ctx["OBX"] = group.first_obx  # report-level paths read the first result
    qc = _is_qc(ctx, profile)
    sample_id = first(ctx, f.sample_id)
    return LabReport(
        instrument=instrument,
        profile=profile.name,
        instrument_id=first(ctx, f.instrument_id),
        sample_id=sample_id,
        patient_id="" if qc else first(ctx, f.patient_id),
        patient_name="" if qc or not f.patient_name else read(ctx, f.patient_name),
        birth_date="" if qc or not f.birth_date else read(ctx, f.birth_date),
        sex="" if qc or not f.sex else read(ctx, f.sex),
        qc=qc,
        control=(read(ctx, "INV-1.1") or sample_id) if qc else "",
        message_time=read(ctx, "MSH-7.1"),
        results=tuple(group.results),
        comments=tuple(group.comments),
        source_format="hl7",
    )


def _merge(reports: list[LabReport]) -> list[LabReport]:
    """Reports of one specimen (same sample, patient and QC state) joined, in order."""
    out: dict[tuple[str, str, bool], LabReport] = {}
    for report in reports:
        key = (report.sample_id, report.patient_id, report.qc)
        before = out.get(key)
        if before is None:
            out[key] = report
        else:
            out[key] = before.model_copy(
                update={
                    "results": before.results + report.results,
                    "comments": before.comments + report.comments,
                }
            )
    return list(out.values())


# -- host queries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabQuery:
    """An analyzer's host query.

    ``specimen_ids``: what to look up (empty for LAW ``WOS_ALL`` and rack/tray
    queries); ``query_tag``: QPD-2 (LAW) or QRD-4 query id (Mindray), echoed in the
    answer; ``query_name``: QPD-1 as sent (HL7-encoded, for QAK-3);
    ``echo``: the query's QPD (LAW) or QRD and QRF (Mindray) segments as sent,
    re-encoded with the default delimiters ``|^~\\&``, for the answer to repeat.
    """

    kind: Literal["law", "mindray"]
    specimen_ids: tuple[str, ...]
    query_tag: str
    msh: Msh
    query_name: str = ""
    echo: tuple[str, ...] = ()


def parse_query(raw: bytes, *, fallback: str = "latin-1") -> LabQuery:
    """Read a QBP^Q11 (IHE LAW LAB-27) or QRY^Q02 (Mindray) host query.

    Raises :class:`LabMessageError` for other messages and for a query without
    its QPD (LAW) or QRD (Mindray) segment.
    """
    msh, segments = _decode(raw, fallback)
    where = f"{msh.message_code}^{msh.trigger_event} control id {msh.control_id}"
    if not is_query_message(msh):
        raise LabMessageError(f"{where}: not a host query (QBP^Q11 or QRY^Q02)", error_code="200")
    d = Delimiters.of(msh)
    by_name = {seg.name: seg for seg in reversed(segments)}  # the first of each name
    if msh.message_code.upper() == "QBP":
        qpd = by_name.get("QPD")
        if qpd is None:
            raise LabMessageError(f"{where}: no QPD segment", error_code="100")
        specimen = qpd.get(3)
        return LabQuery(
            kind="law",
            specimen_ids=(specimen,) if specimen else (),
            query_tag=qpd.get(2),
            msh=msh,
            query_name=_reencode(qpd.fields[1] if len(qpd.fields) > 1 else "", d),
            echo=(_reencode(d.field.join(qpd.fields), d),),
        )
    qrd = by_name.get("QRD")
    if qrd is None:
        raise LabMessageError(f"{where}: no QRD segment", error_code="100")
    barcode = qrd.get(8)
    echo = [_reencode(d.field.join(qrd.fields), d)]
    if "QRF" in by_name:
        echo.append(_reencode(d.field.join(by_name["QRF"].fields), d))
    return LabQuery(
        kind="mindray",
        specimen_ids=(barcode,) if barcode else (),
        query_tag=qrd.get(4),
        msh=msh,
        echo=tuple(echo),
    )


def _reencode(text: str, d: Delimiters) -> str:
    """Segment or field text written with the default delimiters ``|^~\\&``: the
    sender's delimiters become ours (escape sequences such as ``\\F\\`` are named,
    so they keep their meaning) and its plain characters that are our delimiters
    are escaped (§2.7)."""
    theirs = {d.field: "|", d.component: "^", d.repetition: "~", d.subcomponent: "&"}
    theirs[d.escape or "\\"] = "\\"
    if all(k == v for k, v in theirs.items()):
        return text
    names = {"|": "F", "^": "S", "~": "R", "\\": "E", "&": "T"}
    return "".join(
        theirs[ch] if ch in theirs else f"\\{names[ch]}\\" if ch in names else ch for ch in text
    )
