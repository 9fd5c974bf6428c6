"""HL7 v2 order messages -> protocol-neutral orders: ORM^O01 (v2.3.1-2.5.1, HL7 v2.5.1
§4.4.1) and OMI^O23 (v2.5-2.5.1, §4.4.11; IHE RAD TF-2 RAD-4).

The route step ``hl7-order`` reads an ``hl7`` envelope's raw bytes and returns one
``order`` envelope (body :class:`gateway.orders.Order` as JSON) per ORC/OBR group,
or per IPC segment of a group when it has several scheduled steps. Other message
types produce nothing. Fields are read with ``str.split`` on the delimiters of
MSH-1/MSH-2, then unescaped (§2.7). docs/worklist.md has the field mapping.
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drivers.hl7.message import Hl7Error, Msh, decode_message, parse_msh
from gateway.envelope import Envelope
from gateway.errors import PermanentError
from gateway.orders import ORDER_KIND, Order
from gateway.registry import PluginContext, Registry
from gateway.steps import AnyEnvelope

log = logging.getLogger(__name__)

ORDER_MESSAGES = frozenset({"ORM", "OMI"})

# ORC-1 order control (HL7 table 0119) -> Order.control. SC (status changed) is an
# update, or a cancel when ORC-5 order status (table 0038) says CA or DC.
CONTROL: dict[str, Literal["new", "update", "cancel"]] = {
    "NW": "new",
    "XO": "update",
    "SC": "update",
    "CA": "cancel",
    "DC": "cancel",
    "OC": "cancel",
    "OD": "cancel",
}
CANCELLED_STATUS = frozenset({"CA", "DC"})

# DICOM Modality defined terms (PS3.3 C.7.3.1.1.1) accepted as they are.
DICOM_MODALITIES = frozenset(
    {"BMD", "CR", "CT", "DX", "ECG", "ES", "IO", "MG", "MR", "NM", "OP", "OT", "PT", "PX"}
    | {"RF", "US", "XA", "XC"}
)
# HL7 table 0074 (diagnostic service section) values that name one modality only.
# RAD, RX, XRC, CTH ... name several (or none) and are left unmapped.
HL7_SECTIONS = {"NMR": "MR", "NMS": "NM", "RUS": "US", "OUS": "US", "VUS": "US", "CUS": "US"}

SEX = {"M": "M", "F": "F", "O": "O", "A": "O"}  # table 0001; U (unknown), N -> empty
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TS = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2})?)?)?(?:\.\d{1,4})?(?:[+-]\d{4})?")
_FIELD_REF = re.compile(r"(ORC|OBR|IPC|TQ1|ZDS)-([1-9][0-9]?)")
ACCESSION_MAX = 16  # DICOM SH
PATIENT_ID_MAX = 64  # DICOM LO
AE_MAX = 16


class Hl7OrderParams(BaseModel):
    """Parameters of the ``hl7-order`` step.

    ``encoding``: decode with this codec whatever the message says (default: the
    codec the listener used, from the envelope's ``charset`` header; else MSH-18;
    else ``fallback_encoding``). ``accession_from``: fields tried in order for the
    accession (component 1); IHE RAD-4 ORM senders use ``[OBR-18]``.
    ``patient_id_type``: pick the PID-3 repetition with this CX.5 identifier type
    (e.g. ``MR``) instead of the first. ``modality_map``: site codes -> DICOM
    modality, looked up for IPC-5, OBR-24 and OBR-4.1 (e.g. ``{XQ: DX}``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    encoding: str | None = None
    fallback_encoding: str = "utf-8"
    accession_from: tuple[str, ...] = Field(
        default=("IPC-1", "OBR-3", "ORC-3", "OBR-2", "ORC-2"), min_length=1
    )
    patient_id_type: str = ""
    modality_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("encoding", "fallback_encoding")
    @classmethod
    def _codec(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown character encoding {value!r}") from None

    @field_validator("accession_from")
    @classmethod
    def _refs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ref in value:
            if not _FIELD_REF.fullmatch(ref):
                raise ValueError(f"expected SEGMENT-FIELD of ORC, OBR, IPC, TQ1, ZDS; got {ref!r}")
        return value

    @field_validator("modality_map")
    @classmethod
    def _modalities(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, modality in value.items():
            if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
                raise ValueError(f"{key}: {modality!r} is not a DICOM modality (CS, A-Z 0-9)")
            out[key.strip().upper()] = modality
        return out


# -- segments, fields, escapes (HL7 v2.5.1 §2.5-2.7) ----------------------------------


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    @classmethod
    def of(cls, msh: Msh) -> Delimiters:
        enc = msh.encoding_chars
        return cls(
            field=msh.field_sep,
            component=enc[0],
            repetition=enc[1] if len(enc) > 1 else "~",
            escape=enc[2] if len(enc) > 2 else "",
            subcomponent=enc[3] if len(enc) > 3 else "&",
        )


_FORMATTING = re.compile(r"\.(br|sp|fi|nf|in|ti|sk|ce)[0-9+-]*")


def unescape(text: str, d: Delimiters, codec: str) -> str:
    r"""Resolve HL7 escapes (§2.7): \F\ \S\ \T\ \R\ \E\, \Xhh..\ (bytes in the
    message's character set), highlighting and formatting (dropped, \.br\ -> space).
    An escape that cannot be read is kept as it was written."""
    esc = d.escape
    if not esc or esc not in text:
        return text
    named = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": esc}
    out: list[str] = []
    i = 0
    while i < len(text):
        start = text.find(esc, i)
        end = text.find(esc, start + 1) if start >= 0 else -1
        if end < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        seq = text[start + 1 : end]
        if seq in named:
            out.append(named[seq])
        elif seq in ("H", "N") or _FORMATTING.fullmatch(seq):
            out.append(" " if seq == ".br" else "")
        elif seq[:1] == "X" and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", seq[1:]):
            try:
                out.append(bytes.fromhex(seq[1:]).decode(codec))
            except (UnicodeDecodeError, LookupError):
                out.append(text[start : end + 1])
        else:
            out.append(text[start : end + 1])
        i = end + 1
    return "".join(out)


class Segment:
    """One segment split into fields; ``seg[n]`` is field n (MSH-1 is the separator)."""

    __slots__ = ("codec", "d", "fields", "name")

    def __init__(self, text: str, d: Delimiters, codec: str) -> None:
        parts = text.split(d.field)
        if parts[0] == "MSH":
            parts = ["MSH", d.field, *parts[1:]]
        self.name = parts[0].strip()
        self.fields = parts
        self.d = d
        self.codec = codec

    def repetitions(self, n: int) -> list[str]:
        raw = self.fields[n] if n < len(self.fields) else ""
        return raw.split(self.d.repetition) if raw else []

    def components(self, n: int, rep: int = 0) -> list[str]:
        """Field n's components (repetition ``rep``), unescaped, first subcomponent each."""
        reps = self.repetitions(n)
        if rep >= len(reps):
            return []
        return [
            self._leaf(c.split(self.d.subcomponent)[0]) for c in reps[rep].split(self.d.component)
        ]

    def get(self, n: int, component: int = 1, sub: int = 1, rep: int = 0) -> str:
        """One value, unescaped and stripped; "" when absent. HL7's null ``""`` is ""."""
        reps = self.repetitions(n)
        if rep >= len(reps):
            return ""
        comps = reps[rep].split(self.d.component)
        if component > len(comps):
            return ""
        subs = comps[component - 1].split(self.d.subcomponent)
        return self._leaf(subs[sub - 1]) if sub <= len(subs) else ""

    def _leaf(self, raw: str) -> str:
        value = unescape(raw, self.d, self.codec).strip()
        return "" if value == '""' else value


def split_segments(text: str, d: Delimiters, codec: str) -> list[Segment]:
    """Segments end with CR; LF and CR LF are tolerated; blank lines are skipped."""
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return [Segment(line.lstrip(), d, codec) for line in lines if line.strip()]


# -- message structure -----------------------------------------------------------------


@dataclass
class OrderGroup:
    """ORC with what belongs to it: [TQ1] [OBR] [ZDS] {IPC}."""

    number: int
    orc: Segment
    obr: Segment | None = None
    tq1: Segment | None = None
    zds: Segment | None = None
    ipcs: list[Segment] = field(default_factory=list)

    def segment(self, name: str, ipc: Segment | None) -> Segment | None:
        if name == "IPC":
            return ipc
        found: Segment | None = getattr(self, name.lower())
        return found


def group_segments(
    segments: list[Segment],
) -> tuple[Segment | None, Segment | None, list[OrderGroup]]:
    """(PID, PV1, groups). An ORC starts a group; a second OBR without its own ORC
    starts a group that shares the ORC (lenient: some senders do this)."""
    pid = pv1 = None
    groups: list[OrderGroup] = []
    for seg in segments:
        if seg.name == "PID" and pid is None:
            pid = seg
        elif seg.name == "PV1" and pv1 is None:
            pv1 = seg
        elif seg.name == "ORC":
            groups.append(OrderGroup(len(groups) + 1, seg))
        elif not groups:
            continue
        elif seg.name == "OBR":
            if groups[-1].obr is not None:
                groups.append(OrderGroup(len(groups) + 1, groups[-1].orc))
            groups[-1].obr = seg
        elif seg.name == "TQ1" and groups[-1].tq1 is None:
            groups[-1].tq1 = seg
        elif seg.name == "ZDS":
            groups[-1].zds = seg
        elif seg.name == "IPC":
            groups[-1].ipcs.append(seg)
    return pid, pv1, groups


# -- field conversions -------------------------------------------------------------------


def _pn_part(text: str) -> str:
    """A DICOM PN component cannot hold ^, = or backslash."""
    return " ".join(text.replace("^", " ").replace("=", " ").replace("\\", " ").split())


def person_name(family: str, given: str, middle: str, suffix: str, prefix: str) -> str:
    """HL7 order (family, given, middle, suffix, prefix) -> DICOM PN
    ``Family^Given^Middle^Prefix^Suffix`` without trailing empty components."""
    parts = [_pn_part(p) for p in (family, given, middle, prefix, suffix)]
    return "^".join(parts).rstrip("^")


def xpn(comps: list[str]) -> str:
    """XPN: family^given^middle^suffix^prefix^degree."""
    c = [*comps, "", "", "", "", ""]
    return person_name(c[0], c[1], c[2], c[3], c[4])


def xcn(comps: list[str]) -> str:
    """XCN: id^family^given^middle^suffix^prefix^degree (the id is not part of the name)."""
    c = [*comps, "", "", "", "", "", ""]
    return person_name(c[1], c[2], c[3], c[4], c[5])


def dicom_datetime(ts: str) -> str:
    """HL7 TS/DTM -> ``YYYYMMDD[HHMM[SS]]`` in the sender's local time (offset and
    fraction dropped); "" unless it holds at least a full, valid date."""
    m = _TS.fullmatch(ts.strip())
    if not m:
        return ""
    date, time_ = m.group(1), m.group(2) or ""
    if len(time_) == 2:
        time_ += "00"  # an hour alone: on the hour
    value = date + time_
    try:
        datetime.strptime(value, "%Y%m%d%H%M%S"[: {8: 6, 12: 10, 14: 12}[len(value)]])
    except ValueError:
        return ""
    return value


class OrderParser:
    """One message's groups -> Orders, with the step's parameters."""

    def __init__(self, params: Hl7OrderParams, msh: Msh) -> None:
        self.params = params
        self.msh = msh

    def orders(
        self, pid: Segment | None, pv1: Segment | None, groups: list[OrderGroup]
    ) -> list[Order]:
        if not groups:
            raise PermanentError(f"{self._where()}: no ORC segment, nothing to order")
        patient = self._patient(pid)
        steps: list[tuple[OrderGroup, Segment | None]] = []
        for group in groups:
            steps.extend((group, ipc) for ipc in group.ipcs)
            if not group.ipcs:
                steps.append((group, None))
        return [self._order(group, ipc, patient, pv1) for group, ipc in steps]

    def _where(self, group: OrderGroup | None = None) -> str:
        where = f"{self.msh.message_code}^{self.msh.trigger_event} control id {self.msh.control_id}"
        return f"{where}, order group {group.number}" if group else where

    def _patient(self, pid: Segment | None) -> dict[str, str]:
        if pid is None:
            return {}
        rep = 0
        if self.params.patient_id_type:
            for n in range(len(pid.repetitions(3))):
                if pid.get(3, 5, rep=n) == self.params.patient_id_type:
                    rep = n
                    break
        issuer = pid.get(3, 4, 1, rep=rep) or pid.get(3, 4, 2, rep=rep)
        return {
            "patient_id": pid.get(3, 1, rep=rep),
            "patient_id_issuer": issuer,
            "patient_name": xpn(pid.components(5)),
            "birth_date": dicom_datetime(pid.get(7))[:8],
            "sex": SEX.get(pid.get(8).upper(), ""),
        }

    def _order(
        self, group: OrderGroup, ipc: Segment | None, patient: dict[str, str], pv1: Segment | None
    ) -> Order:
        empty = Segment("", group.orc.d, group.orc.codec)
        orc, obr, tq1 = group.orc, group.obr or empty, group.tq1 or empty
        zds, ipc_seg = group.zds or empty, ipc or empty
        code = orc.get(1).upper()
        control = CONTROL.get(code)
        if control is None:
            known = ", ".join(CONTROL)
            raise PermanentError(
                f"{self._where(group)}: unknown order control ORC-1 {code!r} (handled: {known})"
                if code
                else f"{self._where(group)}: ORC-1 order control is empty"
            )
        if code == "SC" and orc.get(5).upper() in CANCELLED_STATUS:
            control = "cancel"

        accession = ""
        for ref in self.params.accession_from:
            m = _FIELD_REF.fullmatch(ref)
            assert m is not None  # validated by Hl7OrderParams
            seg = group.segment(m.group(1), ipc)
            if seg is not None and (accession := seg.get(int(m.group(2)))):
                break
        if not accession:
            refs = ", ".join(self.params.accession_from)
            raise PermanentError(f"{self._where(group)}: no accession number (looked in {refs})")
        if len(accession) > ACCESSION_MAX:
            raise PermanentError(
                f"{self._where(group)}: accession {accession!r} is longer than "
                f"{ACCESSION_MAX} characters (DICOM SH)"
            )
        if control == "new" and not patient.get("patient_id"):
            raise PermanentError(f"{self._where(group)}: PID-3 patient identifier missing")
        if len(patient.get("patient_id", "")) > PATIENT_ID_MAX:
            raise PermanentError(
                f"{self._where(group)}: PID-3 longer than {PATIENT_ID_MAX} characters"
            )

        def first(*values: str) -> str:
            return next((v for v in values if v), "")

        start = first(
            dicom_datetime(tq1.get(7)),
            dicom_datetime(orc.get(7, 4)),
            dicom_datetime(obr.get(27, 4)),
            dicom_datetime(obr.get(36)),
        )
        study_uid = first(ipc_seg.get(3), zds.get(1))
        if study_uid and (len(study_uid) > 64 or not _UID.fullmatch(study_uid)):
            raise PermanentError(
                f"{self._where(group)}: study instance UID {study_uid!r} is not a UID"
            )
        station = first(ipc_seg.get(9), orc.get(18))
        if len(station) > AE_MAX:
            log.warning("hl7_order.station_ae_too_long %s: ignored", self._where(group))
            station = ""
        referring = first(
            xcn(obr.components(16)),
            xcn(orc.components(12)),
            xcn(pv1.components(8)) if pv1 is not None else "",
        )
        try:
            return Order(
                control=control,
                accession=accession,
                patient_id=patient.get("patient_id", ""),
                patient_id_issuer=patient.get("patient_id_issuer", ""),
                patient_name=patient.get("patient_name", ""),
                birth_date=patient.get("birth_date", ""),
                sex=patient.get("sex", ""),
                placer_order=first(obr.get(2), orc.get(2)),
                filler_order=first(obr.get(3), orc.get(3)),
                procedure_code=obr.get(4, 1),
                procedure_text=obr.get(4, 2),
                procedure_scheme=obr.get(4, 3),
                modality=self._modality(ipc_seg.get(5), obr.get(24), obr.get(4, 1)),
                scheduled_start=start,
                station_ae=station,
                study_uid=study_uid,
                step_id=ipc_seg.get(4),
                priority=first(tq1.get(9), orc.get(7, 6), obr.get(27, 6)),
                referring_physician=referring,
                message_control_id=self.msh.control_id,
            )
        except ValidationError as err:
            raise PermanentError(f"{self._where(group)}: {err}") from err

    def _modality(self, ipc5: str, obr24: str, procedure_code: str) -> str:
        """IPC-5, else OBR-24, else the site's map for the OBR-4 code; never guessed."""
        table = self.params.modality_map
        for value in (ipc5.upper(), obr24.upper()):
            if not value:
                continue
            modality = table.get(value) or (value if value in DICOM_MODALITIES else "")
            modality = modality or HL7_SECTIONS.get(value, "")
            if modality:
                return modality
            log.debug("hl7_order.unknown_modality value=%r", value)
        return table.get(procedure_code.upper(), "")


def parse_orders(
    raw: bytes, params: Hl7OrderParams, *, encoding: str | None = None
) -> tuple[Msh, list[Order]]:
    """Read an ORM^O01 / OMI^O23 message; other message types give no orders.

    Raises :class:`PermanentError` when the message is an order message that cannot
    be turned into orders (the text names the message, the group and the field).
    """
    try:
        msh = parse_msh(raw)
        text, codec = decode_message(
            raw, msh, encoding=params.encoding or encoding, fallback=params.fallback_encoding
        )
    except Hl7Error as err:
        raise PermanentError(f"unreadable HL7 message: {err}") from err
    if msh.message_code.upper() not in ORDER_MESSAGES:
        return msh, []
    segments = split_segments(text, Delimiters.of(msh), codec)
    if sum(seg.name == "PID" for seg in segments) > 1:
        # never attach one patient's orders to another: ORM/OMI carry one patient
        raise PermanentError(
            f"{msh.message_code}^{msh.trigger_event} control id {msh.control_id}: "
            "more than one PID segment (one patient per order message)"
        )
    pid, pv1, groups = group_segments(segments)
    return msh, OrderParser(params, msh).orders(pid, pv1, groups)


class Hl7OrderStep:
    """Route step ``hl7-order``: ``hl7`` envelopes -> ``order`` envelopes."""

    def __init__(self, params: Hl7OrderParams) -> None:
        self.params = params

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != "hl7":
            log.warning(
                "hl7_order.not_hl7 envelope=%s kind=%s: ignored", envelope.id, envelope.kind
            )
            return []
        msh, orders = parse_orders(
            envelope.body, self.params, encoding=envelope.headers.get("charset") or None
        )
        if not orders:
            log.debug("hl7_order.not_an_order envelope=%s type=%s", envelope.id, msh.message_type)
            return []
        message_type = f"{msh.message_code}^{msh.trigger_event}"
        log.info(
            "hl7_order.parsed envelope=%s type=%s control_id=%s orders=%d",
            envelope.id,
            message_type,
            msh.control_id,
            len(orders),
        )
        return [
            Envelope(
                kind=ORDER_KIND,
                source=envelope.source,
                body=order.to_json(),
                headers={
                    "control": order.control,
                    "accession": order.accession,
                    "modality": order.modality,
                    "message_type": message_type,
                },
            )
            for order in orders
        ]


def register(registry: Registry) -> None:
    def factory(params: Hl7OrderParams, ctx: PluginContext) -> Hl7OrderStep:
        return Hl7OrderStep(params)

    registry.step(
        "hl7-order",
        Hl7OrderParams,
        factory,
        "HL7 ORM^O01 / OMI^O23 -> order envelopes (one per ORC/OBR or IPC); others dropped",
    )
