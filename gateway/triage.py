"""AI triage results, protocol-neutral: what a model said about a study.

``ai_models`` produces a :class:`TriageResult` per study; ``dicom`` turns it into a
Structured Report and a summary Secondary Capture, the HL7 side into a priority
message for the RIS. Results are for triage only: they reorder worklists, they
never replace a radiologist's reading, and the original images are never changed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

TRIAGE_KIND = "ai-result"
Priority = Literal["urgent", "abnormal", "normal"]


class Finding(BaseModel):
    """One label of the model's output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    probability: float
    threshold: float
    positive: bool  # probability >= threshold
    urgent: bool = False  # positive and the card lists the label as urgent


class EvaluatedImage(BaseModel):
    """An instance the model looked at (the SR and SC reference it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


class TriageResult(BaseModel):
    """One model's result for one study (the most suspicious of its eligible images)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    model_version: str
    model_sha256: str
    intended_use: str = ""
    study_instance_uid: str
    accession_number: str = ""
    patient_id: str = ""
    priority: Priority
    findings: tuple[Finding, ...]  # every label, in the card's order
    images: tuple[EvaluatedImage, ...]
    inference_ms: float = 0.0
    heatmap_available: bool = False

    @property
    def positives(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.positive)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> TriageResult:
        return cls.model_validate_json(data)
