"""The RIS message of a triage result: HL7 v2.5.1 ORU^R01 carrying the priority.

The RIS re-sorts its reading worklist on the order's priority: OBR-5 (priority,
HL7 v2.5.1 section 4.5.3.5, table 0027: ``S`` stat, ``A`` as soon as possible,
``R`` routine) and ORC-7.6 (quantity/timing priority) say ``S`` for an urgent
study and ``A`` for an abnormal one. ORC-3/OBR-3 carry the accession number (the
RIS's key for the study), OBR-4 says what this is (AI triage), one OBX per label
above its threshold with the probability, and an NTE that it is for triage only.
"""

from __future__ import annotations

from drivers.lab.hl7_build import escape as _esc  # the one HL7 field escaper (§2.7)
from gateway.triage import TriageResult

PRIORITY = {"urgent": "S", "abnormal": "A", "normal": "R"}
NULL = '""'  # HL7 explicit null (section 2.5.3): a required field with no value


def build_priority_oru(
    result: TriageResult,
    *,
    control_id: str,
    timestamp: str,
    sending_app: str = "MEDGW",
    sending_facility: str = "",
    receiving_app: str = "RIS",
    receiving_facility: str = "",
) -> bytes:
    p = PRIORITY[result.priority]
    accession = _esc(result.accession_number)
    model = f"{_esc(result.model_id)} {_esc(result.model_version)}"
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                _esc(sending_app),
                _esc(sending_facility),
                _esc(receiving_app),
                _esc(receiving_facility),
                timestamp,
                "",
                "ORU^R01^ORU_R01",
                _esc(control_id),
                "P",
                "2.5.1",
                "",
                "",
                "AL",
                "NE",
                "",
                "UNICODE UTF-8",
            ]
        ),
        # PID-3 and PID-5 are required (the result holds no name): the explicit null ""
        # (section 2.5.3, "no value") where the study has no value, never an invented one
        "|".join(["PID", "1", "", _esc(result.patient_id) or NULL, "", NULL]),
        f"ORC|SC||{accession}||CM||^^^^^{p}",
        "|".join(
            [
                "OBR",
                "1",
                "",
                accession,
                "AI-TRIAGE^AI triage^99MEDGW",
                p,
                "",
                timestamp,
                # OBR-8..19 empty, OBR-20 filler field 1: the study, OBR-22 status time,
                # OBR-25 result status P (preliminary: a triage, not a report)
                *([""] * 12),
                _esc(result.study_instance_uid),
                "",
                timestamp,
                "",
                "",
                "P",
            ]
        ),
    ]
    for n, finding in enumerate(result.positives, 1):
        segments.append(
            f"OBX|{n}|NM|{_esc(finding.label)}^{_esc(finding.label)}^99MEDGW||"
            f"{finding.probability:.3f}|1|>={finding.threshold:g}|{'HH' if finding.urgent else 'A'}"
            f"|||P|||{timestamp}"
        )
    segments.append(f"NTE|1||AI triage by {model}: for triage only, not for diagnosis")
    return ("\r".join(segments) + "\r").encode("utf-8")
