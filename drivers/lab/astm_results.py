"""ASTM E1394 records -> :class:`gateway.lab.LabReport`, reading fields where the profile says.

E1394 section 5 nests records: H, then per patient P, per order O (the specimen),
per result R; C comments follow the record they comment on (section 10). One
report is made per O record that has results; R records before any O (some
instruments skip it) belong to one report read with the H and P in scope.
Report-level paths that name R (instrument id in R.14) read the first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.astm.codec import Record
from drivers.lab.profiles import Profile
from gateway.lab import LabReport, LabResult


def read(records: Sequence[Record], path: str) -> str:
    """Value at ``path`` (``O.3.1`` or ``R.6``) in the first record of that type given."""
    kind, _, rest = path.partition(".")
    for rec in records:
        if rec.type == kind:
            return _read(rec, rest)
    return ""


def _read(rec: Record, rest: str) -> str:
    if "." in rest:
        return rec.get(rest).strip()
    text = rec.text(int(rest)).strip()
    d = rec.delimiters
    # a field of empty components (``^^^^``, as GeneXpert sends P.6) holds nothing
    return text if text.strip(d.component + d.repeat + " ") else ""


def _comment(rec: Record) -> str:
    """C.4 comment text: every non-empty component (``Alarm_WBC^LMNE-^BASO+``,
    ``CONTROL_FAILED^^PLT_ABOVE_TOLERANCE``), joined by spaces."""
    return " ".join(c.strip() for rep in rec.repeats(4) for c in rep if c.strip())


def first(context: dict[str, Record], paths: Sequence[str]) -> str:
    for path in paths:
        kind, _, rest = path.partition(".")
        rec = context.get(kind)
        if rec is not None:
            value = _read(rec, rest)
            if value:
                return value
    return ""


@dataclass
class _Open:
    """The report being built: the records in scope (last H, P, O, R) and its results."""

    context: dict[str, Record]
    results: list[LabResult] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    first_result: Record | None = None  # report-level paths (R.14 ...) read the first R


def reports_from_records(
    records: Sequence[Record], profile: Profile, instrument: str
) -> list[LabReport]:
    """One report per specimen (O record) that carries results, in message order."""
    context: dict[str, Record] = {}
    built: list[_Open] = []
    current: _Open | None = None
    for rec in records:
        if rec.type in ("H", "P"):
            context = {k: v for k, v in context.items() if k == "H"} if rec.type == "P" else {}
            context[rec.type] = rec
            current = None
        elif rec.type == "O":
            context = {k: v for k, v in context.items() if k in ("H", "P")}
            context["O"] = rec
            current = _Open(dict(context))
            built.append(current)
        elif rec.type == "R":
            if current is None:
                current = _Open(dict(context))
                built.append(current)
            current.context["R"] = rec
            current.first_result = current.first_result or rec
            current.results.append(_result(current.context, profile))
        elif rec.type == "C" and current is not None:
            text = _comment(rec)
            if not text:
                continue
            if current.results and "R" in current.context:
                last = current.results[-1]
                current.results[-1] = last.model_copy(update={"comments": (*last.comments, text)})
            else:
                current.comments.append(text)
    return [_report(b, profile, instrument) for b in built if b.results]


def _result(ctx: dict[str, Record], profile: Profile) -> LabResult:
    f = profile.astm
    rec = ctx["R"]
    flags_text = _read(rec, f.flags.partition(".")[2]) if f.flags else ""
    delims = rec.delimiters
    # one flag per repeat; some instruments (ARCHITECT) separate them with components
    parts = flags_text.replace(delims.component, delims.repeat).split(delims.repeat)
    flags = tuple(x.strip() for x in parts if x.strip())
    return LabResult.of(
        profile.code_of(first(ctx, f.test_code)),
        first(ctx, f.value),
        test_name=first(ctx, (f.test_name,)) if f.test_name else "",
        units=first(ctx, (f.units,)) if f.units else "",
        reference_range=first(ctx, (f.reference_range,)) if f.reference_range else "",
        flags=flags,
        status=first(ctx, (f.status,)) if f.status else "",
        result_time=first(ctx, f.result_time),
        operator=first(ctx, (f.operator,)) if f.operator else "",
        aspect=first(ctx, (f.aspect,)) if f.aspect else "",
    )


def _is_qc(ctx: dict[str, Record], profile: Profile) -> bool:
    for rule in profile.qc:
        kind, _, rest = rule.field.partition(".")
        rec = ctx.get(kind)
        if rec is not None and rule.matches(_read(rec, rest)):
            return True
    return False


def _report(b: _Open, profile: Profile, instrument: str) -> LabReport:
    f = profile.astm
    ctx = dict(b.context)
    if b.first_result is not None:
        ctx["R"] = b.first_result
    qc = _is_qc(ctx, profile)
    sample_id = first(ctx, f.sample_id)
    return LabReport(
        instrument=instrument,
        profile=profile.name,
        instrument_id=first(ctx, f.instrument_id),
        sample_id=sample_id,
        patient_id="" if qc else first(ctx, f.patient_id),
        patient_name="" if qc else first(ctx, (f.patient_name,)),
        birth_date="" if qc else first(ctx, (f.birth_date,)),
        sex="" if qc else first(ctx, (f.sex,)),
        qc=qc,
        control=(first(ctx, f.control) or sample_id) if qc else "",
        priority=first(ctx, (f.priority,)),
        message_time=first(ctx, (f.message_time,)),
        results=tuple(b.results),
        comments=tuple(b.comments),
        source_format="astm",
    )
