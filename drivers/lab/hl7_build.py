"""HL7 v2 messages medgw sends about lab work, built as plain strings (no HL7 library).

- :func:`build_oru_r01`: results for the LIS, ORU^R01^ORU_R01 v2.5.1 (§7.3.1).
- :func:`build_oul_r22`: results as OUL^R22^OUL_R22 v2.5.1 (ch. 7), shaped like
  IHE LAW LAB-29 (SPM, then one OBR/ORC/OBX group per test).
- :func:`build_rsp_k11`: IHE LAW LAB-27 answer to a QBP^Q11 work order query.
- :func:`build_oml_o33`, :func:`build_oml_o33_no_work`: IHE LAW LAB-28 "AWOS
  Broadcast" (OML^O33^OML_O33 v2.5.1, §4.4.7), the work itself or "no work" (DC).
- :func:`build_qck_q02`, :func:`build_dsr_q03`: the Mindray BS host query answer.
- :func:`build_ack_for`: an ACK for an analyzer that asked for enhanced mode.

Every text value is escaped (§2.7: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``), segments end
with CR (§2.5), trailing empty fields and components are left out, and the
output depends only on the arguments (control id and timestamp are the caller's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from drivers.hl7.ack import build_ack
from drivers.hl7.message import Hl7Error, parse_msh, python_codec
from drivers.lab.hl7_results import LabQuery, unframe
from gateway.lab import LabReport, LabResult
from gateway.orders import Order

ENCODING_CHARS = "^~\\&"
UTF8 = "UNICODE UTF-8"
VERSION = "2.5.1"
ANALYZER_CODES = "99MGW"  # HL7 table 0396 "99zzz": local codes, here the analyzer's own
_NM = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_SN_COMPARATORS = frozenset({">", "<", ">=", "<=", "=", "<>"})
_ESCAPES = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"})
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
ACK_TYPES = frozenset({"AL", "NE", "ER", "SU"})  # HL7 table 0155 (MSH-15, MSH-16)

# ASTM E1394 result status (R.9) -> HL7 table 0085 (OBX-11). HL7 analyzers' values
# that are already table 0085 codes pass unchanged. Every other ASTM status (V
# operator verified, R re-sent, M MIC, Q query answer, W warning, empty) becomes F:
# the analyzer released the value; its flags and comments travel with it.
ASTM_STATUS = {"F": "F", "C": "C", "P": "P", "X": "X", "I": "I", "S": "S"}
HL7_STATUS = frozenset("CDFINOPRSUWX")


def escape(text: str, *, formatted: bool = False) -> str:
    """``text`` as a field component (§2.7). Line breaks become ``\\.br\\`` in
    formatted text (FT: NTE-3) and a space elsewhere, where a CR would end the segment."""
    text = text.translate(_ESCAPES)
    return _LINE_BREAK.sub("\\\\.br\\\\" if formatted else " ", text)


def comp(*parts: str) -> str:
    """Components, each escaped, joined by ``^`` without trailing empty ones."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def seg(name: str, *fields: str) -> str:
    """A segment from already encoded fields, without trailing empty fields."""
    return "|".join((name, *fields)).rstrip("|")


def message(segments: Iterable[str], charset: str = UTF8) -> bytes:
    """Segments joined and ended by CR, encoded in MSH-18's character set."""
    codec = python_codec(charset)
    if codec is None:
        raise ValueError(f"no codec for HL7 character set {charset!r} (table 0211)")
    return ("\r".join(segments) + "\r").encode(codec, "replace")


def msh(
    message_type: str,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str,
    sending_facility: str,
    receiving_app: str,
    receiving_facility: str,
    version: str = VERSION,
    accept_ack: str = "",
    app_ack: str = "",
    charset: str = UTF8,
    profile: str = "",
) -> str:
    """MSH (§2.15.9): MSH-9 is given encoded (``ORU^R01^ORU_R01``), MSH-21 too."""
    return seg(
        "MSH",
        ENCODING_CHARS,
        comp(sending_app),
        comp(sending_facility),
        comp(receiving_app),
        comp(receiving_facility),
        escape(timestamp),
        "",
        message_type,
        escape(control_id),
        "P",
        version,
        "",
        "",
        accept_ack,
        app_ack,
        "",
        charset,
        "",
        "",
        profile,
    )


def xpn(name: str) -> str:
    """A ``Family^Given^Middle`` name as XPN family^given^middle (escaped parts)."""
    return comp(*name.split("^")[:3])


def pn_xpn(name: str) -> str:
    """A DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as XPN family^given^middle^suffix^prefix."""
    parts = [*name.split("^"), "", "", "", "", ""][:5]
    return comp(parts[0], parts[1], parts[2], parts[4], parts[3])


# -- results ---------------------------------------------------------------------------------


def value_type(result: LabResult) -> tuple[str, str]:
    """(OBX-2, OBX-5): NM for a plain number, SN ``comparator^number`` (ch. 2A) for
    a number with a comparator, ST otherwise. A decimal comma becomes a point."""
    text = result.value.strip()
    if result.number is not None:
        digits = text.lstrip("<>=").strip().replace(",", ".")
        if _NM.match(digits):
            if not result.comparator:
                return "NM", digits
            if result.comparator in _SN_COMPARATORS:
                return "SN", f"{escape(result.comparator)}^{digits}"
    return "ST", escape(text)


def observation_id(result: LabResult) -> str:
    """OBX-3 (CE): the LIS code (``L``) when mapped, else the analyzer's code
    (``99MGW``); LOINC as the alternate identifier (``^^LN``) when known."""
    if result.lis_code:
        primary = (result.lis_code, result.lis_name or result.test_name, "L")
    else:
        primary = (result.test_code, result.test_name, ANALYZER_CODES)
    alternate = (result.loinc, "", "LN") if result.loinc else ("", "", "")
    return comp(*primary, *alternate)


def result_status(result: LabResult, source_format: str) -> str:
    """OBX-11 (table 0085); see :data:`ASTM_STATUS`."""
    status = result.status.strip().upper()
    if source_format == "hl7" and status in HL7_STATUS:
        return status
    return ASTM_STATUS.get(status, "F")


def order_status(statuses: Sequence[str]) -> str:
    """OBR-25 (table 0123): C if any result is corrected, P if any is preliminary,
    X when none could be done, else F."""
    if "C" in statuses:
        return "C"
    if "P" in statuses:
        return "P"
    if statuses and all(s == "X" for s in statuses):
        return "X"
    return "F"


def obx_segments(report: LabReport, set_id: int, result: LabResult) -> list[str]:
    """OBX (§7.4.2) and one NTE per comment. OBX-14 and OBX-19 are the result time,
    OBX-18 the instrument."""
    kind, value = value_type(result)
    equipment = report.instrument_id or report.instrument
    lines = [
        seg(
            "OBX",
            str(set_id),
            kind,
            observation_id(result),
            "",
            value,
            comp(result.units),
            escape(result.reference_range),
            "~".join(escape(f) for f in result.flags),
            "",
            "",
            result_status(result, report.source_format),
            "",
            "",
            escape(result.result_time),
            "",
            comp(result.operator),
            "",
            comp(equipment),
            escape(result.result_time),
        )
    ]
    lines += notes(result.comments)
    return lines


def notes(comments: Sequence[str]) -> list[str]:
    """NTE segments (§2.15.10): NTE-2 ``L`` (comment from the filler, here the analyzer)."""
    return [seg("NTE", str(i), "L", escape(c, formatted=True)) for i, c in enumerate(comments, 1)]


def pid(report: LabReport) -> list[str]:
    """PID (§3.4.2) for a patient report; none for QC or when nothing identifies one.
    PID-3 and PID-5 are required: the one the analyzer did not send is the explicit
    null ``""`` (§2.5.3: "no value"), never an invented value."""
    if report.qc or not (report.patient_id or report.patient_name):
        return []
    return [
        seg(
            "PID",
            "1",
            "",
            comp(report.patient_id) if report.patient_id else '""',
            "",
            xpn(report.patient_name) if report.patient_name else '""',
            "",
            escape(report.birth_date),
            escape(report.sex),
        )
    ]


def observation_time(report: LabReport, timestamp: str) -> str:
    return next((r.result_time for r in report.results if r.result_time), "") or (
        report.message_time or timestamp
    )


def build_oru_r01(
    report: LabReport,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str,
    receiving_app: str = "LIS",
    receiving_facility: str = "",
    charset: str = UTF8,
) -> bytes:
    """ORU^R01^ORU_R01 v2.5.1 (§7.3.1): MSH, [PID], ORC, OBR, {OBX, {NTE}}, [SPM].

    The PATIENT group is optional in v2.5.1, so a QC report has no PID; it gets an
    SPM with SPM-11 ``Q`` (control specimen) instead, as IHE LAW marks QC. ORC-1 is
    ``RE`` (observations to follow); ORC-3 and OBR-3 (filler order number) are the
    sample id; OBR-4 is the single test, or the instrument for several; OBR-7 the
    first result time; OBR-22 the message time; OBR-25 the overall status.
    """
    statuses = [result_status(r, report.source_format) for r in report.results]
    lines = [
        msh(
            "ORU^R01^ORU_R01",
            control_id=control_id,
            timestamp=timestamp,
            sending_app=sending_app,
            sending_facility=sending_facility,
            receiving_app=receiving_app,
            receiving_facility=receiving_facility,
            charset=charset,
        ),
        *pid(report),
        seg("ORC", "RE", "", comp(report.sample_id)),
        seg(
            "OBR",
            "1",
            "",
            comp(report.sample_id),
            _service(report),
            "",
            "",
            escape(observation_time(report, timestamp)),
            *[""] * 14,
            escape(timestamp),
            "",
            "",
            order_status(statuses),
        ),
        *notes(report.comments),
    ]
    for i, result in enumerate(report.results, 1):
        lines += obx_segments(report, i, result)
    if report.qc:
        lines.append(_spm(report.sample_id, "^Quality control material", "Q"))
    return message(lines, charset)


def _service(report: LabReport) -> str:
    """OBR-4 (required): the test itself when there is one, else the analyzer."""
    if len(report.results) == 1:
        return observation_id(report.results[0])
    name = report.instrument_id or report.instrument
    return comp(name, f"{name} results", ANALYZER_CODES)


def _spm(specimen_id: str, specimen_type: str, role: str) -> str:
    """SPM (§7.4.3): SPM-2 specimen id, SPM-4 type (required; encoded CWE), SPM-11 role."""
    return seg("SPM", "1", comp(specimen_id), "", specimen_type or "^Unknown", *[""] * 6, role)


def build_oul_r22(
    report: LabReport,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str,
    receiving_app: str = "LIS",
    receiving_facility: str = "",
    charset: str = UTF8,
    specimen_type: str = "",
) -> bytes:
    """OUL^R22^OUL_R22 v2.5.1 (ch. 7) in the IHE LAW LAB-29 shape: MSH (ER/AL,
    MSH-21 ``LAB-29^IHE``), [PID], SPM (SPM-11 ``P`` or ``Q``), then per result an
    ORDER group OBR (OBR-3 sample id, OBR-4 the test), ORC (``SC``, status ``CM``),
    OBX and its NTEs. ``specimen_type`` is SPM-4 as encoded CWE (e.g. ``SER``)."""
    lines = [
        msh(
            "OUL^R22^OUL_R22",
            control_id=control_id,
            timestamp=timestamp,
            sending_app=sending_app,
            sending_facility=sending_facility,
            receiving_app=receiving_app,
            receiving_facility=receiving_facility,
            accept_ack="ER",
            app_ack="AL",
            charset=charset,
            profile="LAB-29^IHE",
        ),
        *pid(report),
        _spm(report.sample_id, specimen_type, "Q" if report.qc else "P"),
        *notes(report.comments),
    ]
    for i, result in enumerate(report.results, 1):
        status = result_status(result, report.source_format)
        lines += [
            seg("OBR", str(i), "", comp(report.sample_id), observation_id(result)),
            seg("ORC", "SC", "", "", "", "CM" if status != "X" else "CA"),
            *obx_segments(report, 1, result),
        ]
    return message(lines, charset)


# -- IHE LAW work orders ---------------------------------------------------------------------


def build_rsp_k11(
    query: LabQuery,
    orders: Sequence[Order],
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str = "",
    charset: str = "",
) -> bytes:
    """IHE LAW LAB-27 answer: RSP^K11^RSP_K11 v2.5.1 (ch. 5) = MSH, MSA, QAK, QPD.

    LAB-27 is an acknowledgement of the query only (assertion LAB27-002); the work
    follows as a LAB-28 AWOS Broadcast (LAB27-003: :func:`build_oml_o33`), and "no
    work" as a LAB-28 with ORC-1 ``DC`` (LAB27-004: :func:`build_oml_o33_no_work`).
    So ``orders`` only decide QAK-2 (table 0208): ``OK`` when one is not cancelled,
    else ``NF``. MSA-2 and QAK-1 echo the query's MSH-10 and QPD-2; QAK-3 and the
    QPD are the query's own. The charset defaults to the query's MSH-18.
    """
    charset = charset or query.msh.charset or UTF8
    found = any(o.control != "cancel" for o in orders)
    lines = [
        msh(
            "RSP^K11^RSP_K11",
            control_id=control_id,
            timestamp=timestamp,
            sending_app=sending_app,
            sending_facility=sending_facility,
            receiving_app=query.msh.sending_app,
            receiving_facility=query.msh.sending_facility,
            charset=charset,
            profile="LAB-27^IHE",
        ),
        seg("MSA", "AA", escape(query.msh.control_id)),
        seg("QAK", escape(query.query_tag), "OK" if found else "NF", query.query_name),
        *(query.echo or [_qpd(query)]),
    ]
    return message(lines, charset)


def _qpd(query: LabQuery) -> str:
    """A QPD for a query known only by its fields (IHE LAW LAB-27: QPD-1 query name,
    QPD-2 query tag, QPD-3 the specimen container id)."""
    name = query.query_name or "WOS^Work Order Step^IHE_LABTF"
    return seg("QPD", name, escape(query.query_tag), comp(*query.specimen_ids[:1]))


def build_oml_o33(
    order: Order,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str = "",
    receiving_app: str = "",
    receiving_facility: str = "",
    charset: str = UTF8,
    specimen_type: str = "",
) -> bytes:
    """IHE LAW LAB-28 AWOS Broadcast: OML^O33^OML_O33 v2.5.1 (§4.4.7).

    MSH (ER/AL, MSH-21 ``LAB-28^IHE``), [PID], SPM (SPM-2 the specimen id, SPM-11
    ``P``), SAC (SAC-3 container id = the specimen id), then per test one AWOS:
    ORC (ORC-1 ``NW`` or ``CA``; ORC-2 the AWOS id ``<accession>-<n>``), TQ1 (TQ1-9
    priority, when ordered) and OBR (OBR-2 AWOS id, OBR-4 the analyzer's test code).
    An ``update`` has no LAW equivalent (the analyzer refuses a reused AWOS id,
    LAB28-006): the caller cancels and orders again. Raises ValueError for it and
    for an order without tests.
    """
    controls = {"new": "NW", "cancel": "CA"}
    if order.control not in controls:
        raise ValueError(f"order {order.accession}: LAB-28 has no {order.control!r} (NW, CA)")
    if not order.tests:
        raise ValueError(f"order {order.accession}: no tests to order")
    specimen = order.specimen_id or order.accession
    lines = [
        _law_msh(
            "OML^O33^OML_O33",
            "LAB-28^IHE",
            control_id=control_id,
            timestamp=timestamp,
            charset=charset,
            sending_app=sending_app,
            sending_facility=sending_facility,
            receiving_app=receiving_app,
            receiving_facility=receiving_facility,
        ),
    ]
    if order.patient_id:
        issuer = f"^^^{escape(order.patient_id_issuer)}" if order.patient_id_issuer else ""
        lines.append(
            seg(
                "PID",
                "1",
                "",
                escape(order.patient_id) + issuer,
                "",
                pn_xpn(order.patient_name),
                "",
                escape(order.birth_date),
                escape(order.sex),
            )
        )
    lines += [_spm(specimen, specimen_type, "P"), seg("SAC", "", "", comp(specimen))]
    for i, test in enumerate(order.tests, 1):
        awos = comp(f"{order.accession}-{i}")
        lines.append(seg("ORC", controls[order.control], awos))
        if order.priority:
            lines.append(seg("TQ1", *[""] * 8, comp(order.priority)))
        lines.append(seg("OBR", str(i), awos, "", comp(test)))
    return message(lines, charset)


def build_oml_o33_no_work(
    query: LabQuery,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str = "",
    charset: str = "",
    specimen_type: str = "",
) -> bytes:
    """IHE LAW LAB-28 negative query response (LAB27-004): OML^O33 with, for each
    queried specimen, SPM, SAC and ``ORC|DC`` (discontinue: no work for it).
    Raises ValueError for a query that names no specimen."""
    if not query.specimen_ids:
        raise ValueError("the query names no specimen: nothing to answer 'no work' for")
    charset = charset or query.msh.charset or UTF8
    lines = [
        _law_msh(
            "OML^O33^OML_O33",
            "LAB-28^IHE",
            control_id=control_id,
            timestamp=timestamp,
            charset=charset,
            sending_app=sending_app,
            sending_facility=sending_facility,
            receiving_app=query.msh.sending_app,
            receiving_facility=query.msh.sending_facility,
        ),
    ]
    for specimen in query.specimen_ids:
        lines += [
            _spm(specimen, specimen_type, "P"),
            seg("SAC", "", "", comp(specimen)),
            seg("ORC", "DC"),
        ]
    return message(lines, charset)


def _law_msh(
    message_type: str,
    transaction: str,
    *,
    control_id: str,
    timestamp: str,
    charset: str,
    sending_app: str,
    sending_facility: str,
    receiving_app: str,
    receiving_facility: str,
) -> str:
    return msh(
        message_type,
        control_id=control_id,
        timestamp=timestamp,
        sending_app=sending_app,
        sending_facility=sending_facility,
        receiving_app=receiving_app,
        receiving_facility=receiving_facility,
        accept_ack="ER",
        app_ack="AL",
        charset=charset,
        profile=transaction,
    )


# -- Mindray BS host query answer ------------------------------------------------------------
#
# Mindray BS-series "Host Interface Manual" (BS-200/220/120/130/180, v1.2, 2009; HL7
# v2.3.1): to a QRY^Q02 the host answers QCK^Q02 (MSA|AA|<id>|Message accepted|||0|,
# ERR|0|, QAK|SR|OK or NF), then, when it has the sample, DSR^Q03 with the QRD/QRF
# echoed, DSP|1..28 (one field each: 1 admission number, 2 bed, 3 patient name,
# 4 birth date YYYYMMDDHHMMSS, 5 sex M/F/O, 6 blood type, 7 race, 8 address,
# 9 postcode, 10 home phone, 11 business phone, 12 language, 13 marital status,
# 14 religion, 15 patient type, 16 SSN, 17 charge type, 18 ethnic group, 19 birth
# place, 20 nationality, 21 sample barcode, 22 sample id, 23 sample time, 24 STAT
# Y/N, 25 collection volume, 26 sample type, 27 sending doctor, 28 department),
# DSP|29.. one test each (``id^name^unit^normal range``; the id alone is enough:
# ``ALT^^^``) and DSC||. The layout was checked against public LIS code that talks to
# these analyzers (e.g. a BK-280/Mindray-compatible QRY^Q02 handler's DSP table and
# Getein/Zybio tests asserting ``DSP|21||<barcode>|||``, ``DSP|29||1^^^|||``). The
# segments are written exactly as the manual prints them, trailing ``|`` included.

_MINDRAY_ACCEPT = ("MSA|AA|{id}|Message accepted|||0|", "ERR|0|", "QAK|SR|{status}|")


def _mindray_charset(query: LabQuery, charset: str) -> str:
    chosen = charset or query.msh.charset or "ASCII"
    return chosen if python_codec(chosen) else "ASCII"


def _mindray_msh(
    message_type: str,
    query: LabQuery,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str,
    charset: str,
) -> str:
    return (
        f"MSH|{ENCODING_CHARS}|{escape(sending_app)}||{escape(query.msh.sending_app)}|"
        f"{escape(query.msh.sending_facility)}|{escape(timestamp)}||{message_type}|"
        f"{escape(control_id)}|P|{query.msh.version or '2.3.1'}||||||{charset}|||"
    )


def _qrd(query: LabQuery, timestamp: str) -> str:
    """A QRD as Mindray writes it, for a query known only by its fields."""
    barcode = escape(query.specimen_ids[0]) if query.specimen_ids else ""
    return f"QRD|{escape(timestamp)}|R|D|{escape(query.query_tag)}|||RD|{barcode}|OTH|||T|"


def build_qck_q02(
    query: LabQuery,
    has_orders: bool,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    charset: str = "",
) -> bytes:
    """Mindray QCK^Q02: the query accepted, QAK-2 ``OK`` (a DSR^Q03 follows) or
    ``NF`` (no such sample). MSA-2 echoes the query's MSH-10."""
    charset = _mindray_charset(query, charset)
    accept = [
        line.format(id=escape(query.msh.control_id), status="OK" if has_orders else "NF")
        for line in _MINDRAY_ACCEPT
    ]
    lines = [
        _mindray_msh(
            "QCK^Q02",
            query,
            control_id=control_id,
            timestamp=timestamp,
            sending_app=sending_app,
            charset=charset,
        ),
        *accept,
    ]
    return message(lines, charset)


def build_dsr_q03(
    query: LabQuery,
    order: Order | None,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    charset: str = "",
    sample_type: str = "",
) -> bytes:
    """Mindray DSR^Q03: the sample's patient and tests as DSP lines (see above).

    ``sample_type`` is DSP-26 as the analyzer names it (``serum``, ``plasma``,
    ``urine``...; the order does not say). With ``order`` None, QAK-2 is ``NF`` and
    only DSP-21 (the barcode) is filled: Mindray analyzers expect just the
    QCK^Q02 ``NF`` then, this is for those that wait for a DSR regardless.
    """
    charset = _mindray_charset(query, charset)
    barcode = query.specimen_ids[0] if query.specimen_ids else ""
    data = [""] * 28
    data[20] = barcode
    if order is not None:
        data[0] = order.patient_id
        data[2] = " ".join(p for p in order.patient_name.split("^") if p)
        data[3] = f"{order.birth_date}000000"[:14] if order.birth_date else ""
        data[4] = order.sex
        data[20] = barcode or order.specimen_id or order.accession
        data[22] = order.scheduled_start.ljust(14, "0")[:14] if order.scheduled_start else ""
        data[23] = "Y" if order.priority.upper() == "S" else "N"
        data[25] = sample_type
        data[26] = " ".join(p for p in order.referring_physician.split("^") if p)
        data += [f"{escape(test)}^^^" for test in order.tests]
    accept = [
        line.format(id=escape(query.msh.control_id), status="NF" if order is None else "OK")
        for line in _MINDRAY_ACCEPT
    ]
    lines = [
        _mindray_msh(
            "DSR^Q03",
            query,
            control_id=control_id,
            timestamp=timestamp,
            sending_app=sending_app,
            charset=charset,
        ),
        *accept,
        *(query.echo or [_qrd(query, timestamp)]),
        *(f"DSP|{i}||{v if i > 28 else escape(v)}|||" for i, v in enumerate(data, 1)),
        "DSC||",
    ]
    return message(lines, charset)


# -- acknowledgements ------------------------------------------------------------------------


def build_ack_for(
    raw: bytes,
    code: str,
    *,
    control_id: str,
    timestamp: str,
    error: Hl7Error | None = None,
    text: str = "",
) -> bytes:
    """:func:`drivers.hl7.ack.build_ack` for a received analyzer message, plus what
    enhanced-mode senders (MSH-15/MSH-16 holding table 0155 values, §2.9.3; IHE LAW
    sends ``ER``/``AL``) need: the ACK's own MSH-15 and MSH-16 are ``NE``, an
    acknowledgement is never acknowledged. Mindray's MSH-16 ``0``/``1``/``2`` is its
    sample-kind flag, not an acknowledgement type: those get the original-mode ACK.
    The message type stays ``ACK^<trigger>^ACK`` (ACK^R22^ACK for LAB-29). Raises
    :class:`Hl7Error` when ``raw`` has no readable MSH.
    """
    raw = unframe(raw)
    received = parse_msh(raw)
    ack = build_ack(
        received, code, control_id=control_id, timestamp=timestamp, error=error, text=text
    )
    line = raw.lstrip().split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    fields = [*line.split(received.field_sep), "", "", "", "", "", ""]
    if not {fields[14].strip().upper(), fields[15].strip().upper()} & ACK_TYPES:
        return ack
    head, _, rest = ack.partition(b"\r")
    ours = head.decode("latin-1").split(received.field_sep)
    ours += [""] * (16 - len(ours))
    ours[14] = ours[15] = "NE"
    return received.field_sep.join(ours).encode("latin-1") + b"\r" + rest
