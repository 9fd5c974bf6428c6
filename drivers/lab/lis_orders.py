"""Lab orders from the LIS: OML^O21 (HL7 v2.5.1 section 4.4.6) and ORM^O01 (4.4.1) ->
one :class:`gateway.orders.Order` per specimen, with the tests ordered for it.

The specimen id is what analyzers read from the tube's barcode and send back in
their queries; it is taken from the first field of ``specimen_from`` that has
one (SPM-2 placer id in OML^O21, else the filler or placer order number). Each
OBR's OBR-4.1 is a test (the LIS code); OBRs of one specimen form one order.
"""

from __future__ import annotations

import re
from typing import Literal

from drivers.hl7.message import Hl7Error, Msh, decode_message, parse_msh
from drivers.hl7.orders import (
    CANCELLED_STATUS,
    CONTROL,
    SEX,
    Delimiters,
    Segment,
    dicom_datetime,
    split_segments,
    xpn,
)
from gateway.errors import PermanentError
from gateway.orders import Order

LAB_ORDER_MESSAGES = frozenset({"OML", "ORM"})
FIELD_REF = re.compile(r"(SPM|OBR|ORC)-([1-9][0-9]?)")
DEFAULT_SPECIMEN_FROM = ("SPM-2", "OBR-3", "OBR-2", "ORC-3", "ORC-2")
Control = Literal["new", "update", "cancel"]


def parse_lab_orders(
    raw: bytes,
    *,
    specimen_from: tuple[str, ...] = DEFAULT_SPECIMEN_FROM,
    encoding: str | None = None,
    fallback: str = "utf-8",
) -> tuple[Msh, list[Order]]:
    """Orders of an OML^O21 / ORM^O01; other message types give none.

    Raises PermanentError naming the message and the missing field when an order
    message cannot be read (no specimen id, unknown order control, no tests)."""
    try:
        msh = parse_msh(raw)
        text, codec = decode_message(raw, msh, encoding=encoding, fallback=fallback)
    except Hl7Error as err:
        raise PermanentError(f"unreadable HL7 message: {err}") from err
    if msh.message_code.upper() not in LAB_ORDER_MESSAGES:
        return msh, []
    where = f"{msh.message_code}^{msh.trigger_event} control id {msh.control_id}"
    segments = split_segments(text, Delimiters.of(msh), codec)
    pid = next((s for s in segments if s.name == "PID"), None)
    patient = _patient(pid)
    # one order per specimen, accession and order control: a message may add some
    # tests of an order and cancel others
    by_specimen: dict[tuple[str, str, Control], dict[str, object]] = {}
    orc: Segment | None = None
    obr: Segment | None = None
    groups: list[tuple[Segment, Segment, list[Segment]]] = []
    for seg in segments:
        if seg.name == "ORC":
            orc, obr = seg, None
        elif seg.name == "OBR" and orc is not None:
            obr = seg
            groups.append((orc, obr, []))
        elif seg.name == "SPM" and obr is not None:
            groups[-1][2].append(seg)
    if not groups:
        raise PermanentError(f"{where}: no ORC/OBR order group")
    for n, (orc_seg, obr_seg, spms) in enumerate(groups, 1):
        code = orc_seg.get(1).upper()
        control: Control | None = CONTROL.get(code)
        if control is None:
            raise PermanentError(f"{where}, group {n}: unknown order control ORC-1 {code!r}")
        if code == "SC":
            if orc_seg.get(5).upper() not in CANCELLED_STATUS:
                # a status change (in process, completed) says nothing about which tests
                # the analyzer should run: the stored order stays as it is
                continue
            control = "cancel"
        specimen = _specimen(specimen_from, orc_seg, obr_seg, spms)
        if not specimen:
            refs = ", ".join(specimen_from)
            raise PermanentError(f"{where}, group {n}: no specimen id (looked in {refs})")
        test = obr_seg.get(4, 1)
        if not test:
            raise PermanentError(f"{where}, group {n}: OBR-4 test code is empty")
        accession = orc_seg.get(2) or obr_seg.get(2) or specimen
        entry = by_specimen.setdefault(
            (specimen, accession, control),
            {
                "tests": [],
                "priority": obr_seg.get(27, 6) or orc_seg.get(7, 6) or obr_seg.get(5),
                "filler_order": obr_seg.get(3) or orc_seg.get(3),
            },
        )
        tests = entry["tests"]
        assert isinstance(tests, list)
        if test not in tests:
            tests.append(test)
    orders = [
        Order(
            control=control,
            accession=accession,
            specimen_id=specimen,
            tests=tuple(entry["tests"]),  # type: ignore[arg-type]
            priority=str(entry["priority"]),
            placer_order=accession,
            filler_order=str(entry["filler_order"]),
            message_control_id=msh.control_id,
            **patient,
        )
        for (specimen, accession, control), entry in by_specimen.items()
    ]
    return msh, orders


def _specimen(refs: tuple[str, ...], orc: Segment, obr: Segment, spms: list[Segment]) -> str:
    for ref in refs:
        m = FIELD_REF.fullmatch(ref)
        if m is None:
            continue
        name, n = m.group(1), int(m.group(2))
        seg = {"ORC": orc, "OBR": obr}.get(name) or (spms[0] if spms and name == "SPM" else None)
        if seg is not None and (value := seg.get(n, 1, 1)):
            return value
    return ""


def _patient(pid: Segment | None) -> dict[str, str]:
    if pid is None:
        return {"patient_id": ""}
    return {
        "patient_id": pid.get(3, 1),
        "patient_id_issuer": pid.get(3, 4),
        "patient_name": xpn(pid.components(5)),
        "birth_date": dicom_datetime(pid.get(7))[:8],
        "sex": SEX.get(pid.get(8).upper(), ""),
    }
