"""Lab results, protocol-neutral: what an analyzer's message becomes inside the gateway.

The ASTM and HL7 analyzer drivers turn a received message into :class:`LabReport`
objects (one per specimen), the ``map-codes`` step adds LIS codes and converts
units, the ``hl7-oru`` step builds the LIS message from them. Values are kept as
the analyzer sent them (``value``), with a parsed number beside them only when
the text is one (:func:`parse_value`): ``<2.00``, ``> 15000.00``, ``-----`` and
``7,41`` are all real analyzer output.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

LAB_RESULT_KIND = "lab-result"
# header of a lab-result envelope: raw analyzer bytes, or this model as JSON
FORMAT_NORMALIZED = "medgw-lab-report+json"

_NUMBER = re.compile(r"^([<>]=?|=)?\s*([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?)$")


def parse_value(text: str) -> tuple[float | None, str]:
    """``(number, comparator)`` of a result value, or ``(None, "")`` when it is not one.

    A single comma is a decimal comma (``7,41``); a comparator (``<``, ``>``, ``<=``,
    ``>=``) may precede the number with or without a space. Text values
    (``Positive``, ``NOT DETECTED``, ``-----``) are not numbers.
    """
    m = _NUMBER.match(text.strip())
    if m is None:
        return None, ""
    digits = m.group(2)
    if digits.count(",") == 1 and "." not in digits:
        digits = digits.replace(",", ".")
    try:
        return float(digits), m.group(1) or ""
    except ValueError:
        return None, ""


class LabResult(BaseModel):
    """One test's result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    test_code: str  # the analyzer's own code
    test_name: str = ""
    lis_code: str = ""  # after map-codes
    lis_name: str = ""
    loinc: str = ""
    value: str  # exactly as sent (after unescaping)
    number: float | None = None
    comparator: str = ""
    units: str = ""
    reference_range: str = ""
    flags: tuple[str, ...] = ()  # abnormal flags as sent: L, H, LL, HH, N, A, <, >, ...
    status: str = ""  # F final, C correction, P preliminary, X cannot be done, ...
    result_time: str = ""  # YYYYMMDDHHMMSS as sent
    operator: str = ""
    aspect: str = ""  # which result of the test when an analyzer sends several (F/I/P)
    comments: tuple[str, ...] = ()

    @classmethod
    def of(cls, test_code: str, value: str, **fields: object) -> LabResult:
        """A result with ``number``/``comparator`` filled from ``value``."""
        number, comparator = parse_value(value)
        return cls.model_validate(
            {"test_code": test_code, "value": value, "number": number, "comparator": comparator}
            | fields
        )


class LabReport(BaseModel):
    """One specimen's results from one analyzer message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str  # listener id (the analyzer as configured)
    profile: str = ""
    instrument_id: str = ""  # what the analyzer says it is (H.5, OBX-18, serial number)
    sample_id: str
    patient_id: str = ""
    patient_name: str = ""  # DICOM/HL7 form Family^Given; never logged
    birth_date: str = ""
    sex: str = ""
    qc: bool = False
    control: str = ""  # QC material / lot when qc
    priority: str = ""
    message_time: str = ""
    results: tuple[LabResult, ...] = ()
    comments: tuple[str, ...] = ()
    source_format: Literal["astm", "hl7"] = "astm"

    def fingerprint(self) -> str:
        """Identifies these results across retransmissions (ARCHITECTURE.md: analyzer +
        sample + test + result time): a resend with new framing or a new header time
        is the same report, a re-run with another value is a new one."""
        h = hashlib.sha256()
        for part in (self.instrument, self.sample_id, "qc" if self.qc else "patient"):
            h.update(part.encode() + b"\x1f")
        for r in self.results:
            for part in (r.test_code, r.aspect, r.value, r.units, r.status, r.result_time):
                h.update(part.encode() + b"\x1f")
            h.update(b"\x1e")
        return h.hexdigest()[:32]

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LabReport:
        return cls.model_validate_json(data)


def message_fingerprint(reports: list[LabReport]) -> str:
    """One key for a message holding several specimens' reports."""
    if len(reports) == 1:
        return reports[0].fingerprint()
    return hashlib.sha256("".join(r.fingerprint() for r in reports).encode()).hexdigest()[:32]
