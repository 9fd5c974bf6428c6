"""AI triage results as DICOM objects for the radiologist: an SR document and a summary image.

:func:`build_sr` writes a Comprehensive 3D SR document (PS3.3 A.35.13; the SR
Document General and SR Document Content modules of PS3.3 C.17.2 and C.17.3)
whose content tree is a PS3.16 TID 1500 "Measurement Report", built with
highdicom. The root container holds the language (TID 1204), the model as the
device observer (TID 1002 / TID 1004: name = model id, model name = model id and
version, serial number = the first 16 hex digits of the model's sha256), the
procedure reported, an Image Library (TID 1600) entry for the evaluated image
where its header describes it well enough for highdicom, one Measurement Group
(TID 1501) per positive finding (the label as the coded "Finding", TID 4019
algorithm identification, the probability and the threshold as NUM items
without units, "urgent finding" yes/no, the evaluated images as "Source") -- or
one group whose finding is "No finding above threshold" -- and a "Qualitative
Evaluations" container with "For triage only — not for diagnosis", the triage
priority, the model id, version and intended use. The document is
COMPLETE, UNVERIFIED and PRELIMINARY (PS3.3 C.17.2.1): nobody signed it.

:func:`build_sc` writes a Secondary Capture image (PS3.3 A.8.1): the windowed
image downsized to at most 1024 px, the heat map blended over it in colour where
the model gives one, and a banner above it with "AI triage — not for diagnosis",
the model and the positive findings burned in (Burned In Annotation YES). It is
RGB, 8 bits, Explicit VR Little Endian, uncompressed.

Both join the evaluated study (patient and study modules copied from the source)
in series of their own (an SR and an OT series cannot share one) and reference
the evaluated instances, which go to PACS first. UIDs are derived from the
inputs unless given (``generate_uid(entropy_srcs=...)``) and the times in the
objects come from ``created`` or the source, never from the clock: a re-run after
a crash builds the same bytes and the journal drops the duplicate.

Finding codes (:data:`FINDING_CODES`): each code was checked against PS3.16
(pydicom's concept dictionary, generated from it) or a published terminology
source before it was listed; a label without a checked code gets a code of the
private scheme ``99MEDGW`` (declared in the Coding Scheme Identification
Sequence of the SOP Common module, PS3.3 C.12.1) whose meaning is the label.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Final

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DS, TM

from gateway.errors import PermanentError
from gateway.triage import Finding, TriageResult

log = logging.getLogger(__name__)


class _NoPatientNames(logging.Filter):
    """Drop highdicom's warning that quotes a patient name (STYLE.md rule 9)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "patient_name" not in str(record.msg)


logging.getLogger("highdicom.base").addFilter(_NoPatientNames())
# highdicom warns about one-component person names, quoting the name (rule 9 again)
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent the intended person name"
)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "AI triage (medgw)"
SC_SERIES_DESCRIPTION = "AI triage summary (medgw)"
DISCLAIMER = "For triage only — not for diagnosis"
BANNER = "AI triage — not for diagnosis"
MAX_SC_SIZE = 1024
PRIVATE_SCHEME = "99MEDGW"
UTF8 = "ISO_IR 192"  # the disclaimer's dash is not in ISO_IR 100 (PS3.3 C.12.1.1.2)
HEAT_ALPHA = 0.5  # opacity of the overlay where the heat map is 1


class AIObjectError(PermanentError):
    """The source instance or the result cannot make a valid SR or SC (retrying cannot help)."""


def _coded(value: str, scheme: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _private(value: str, meaning: str) -> CodedConcept:
    return _coded(value, PRIVATE_SCHEME, meaning)


# Normalised label -> (code value, scheme, meaning). Where each one was checked:
# PS3.16 (pydicom.sr concept dictionary): 36118008, 60046008, 287272002 (CID 12248;
#   not 8186001), 4147007, 27925004 (CID 6104), 19242006, 112674009, DCM 112121 (CID 6102).
# Published terminology pages: 233604007 Pneumonia (tx.fhir.org expansion),
#   95436008 Lung consolidation (SNOMED CT browser: parent of 233604007),
#   87433001 Pulmonary emphysema (HL7 LT lung IG), 46621007 Atelectasis (MII
#   MedDRA->SNOMED CT map checked against the International 2025-07 release).
# Not checked, so private: Hernia, Pleural thickening, Fracture, Lung opacity, ...
FINDING_CODES: Final[dict[str, tuple[str, str, str]]] = {
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "pleural effusion": ("60046008", "SCT", "Pleural effusion"),
    "effusion": ("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
    "mass": ("4147007", "SCT", "Mass"),
    "nodule": ("27925004", "SCT", "Nodule"),
    "edema": ("19242006", "SCT", "Pulmonary edema"),
    "pulmonary edema": ("19242006", "SCT", "Pulmonary edema"),
    "fibrosis": ("112674009", "SCT", "Fibrosis"),
    "infiltration": ("112121", "DCM", "Infiltrate"),
    "infiltrate": ("112121", "DCM", "Infiltrate"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "consolidation": ("95436008", "SCT", "Lung consolidation"),
    "emphysema": ("87433001", "SCT", "Pulmonary emphysema"),
    "atelectasis": ("46621007", "SCT", "Atelectasis"),
}

PROBABILITY = _coded("122157", "DCM", "Probability")
THRESHOLD = _coded("122411", "DCM", "Threshold Value")
NO_UNITS = _coded("1", "UCUM", "no units")  # CID 7181
COMMENT = _coded("121106", "DCM", "Comment")
ALGORITHM_NAME = _coded("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = _coded("111003", "DCM", "Algorithm Version")
QUALITATIVE_EVALUATIONS = _coded("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500
PLAIN_CHEST_XRAY = _coded("399208008", "SCT", "Plain chest X-ray")
IMAGING_PROCEDURE = _coded("363679005", "SCT", "Imaging procedure")  # CID 100
URGENT_FINDING = _private("URGENT", "Urgent finding")
TRIAGE_PRIORITY = _private("TRIAGEPRIORITY", "AI triage priority")
PRIORITY_VALUES: Final[dict[str, CodedConcept]] = {
    "urgent": _private("PRIO-URGENT", "Urgent"),
    "abnormal": _private("PRIO-ABNORMAL", "Abnormal"),
    "normal": _private("PRIO-NORMAL", "Normal"),
}
NO_FINDING = _private("NOFINDING", "No finding above threshold")
INTENDED_USE = _private("INTENDEDUSE", "Intended use")
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment.value  # highdicom's own equipment item


def finding_code(label: str) -> CodedConcept:
    """The coded concept for a model label: checked SCT/DCM code, else ``99MEDGW``."""
    key = " ".join(re.split(r"[\s_\-]+", label.strip().lower()))
    known = FINDING_CODES.get(key)
    if known is not None:
        return _coded(*known)
    value = re.sub(r"[^A-Z0-9]+", "-", label.upper()).strip("-") or "LABEL"
    if len(value) > 16:  # SH (PS3.5 6.2); keep it unique with a digest of the label
        value = value[:7] + "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return _private(value, label.strip()[:64] or value)


# ---------------------------------------------------------------------------- sources


def source_header(source: str | os.PathLike[str] | bytes, *, pixels: bool = False) -> Dataset:
    """Read an evaluated instance: the header only (for the SR) or with pixels (for the SC)."""
    where = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        ds = pydicom.dcmread(where, stop_before_pixels=not pixels, force=True)
    except (InvalidDicomError, ValueError, EOFError, KeyError) as err:
        raise AIObjectError(f"cannot read the evaluated instance: {err}") from err
    if not ds.get("SOPInstanceUID"):  # force=True reads almost anything
        raise AIObjectError("the evaluated instance has no SOP Instance UID")
    return ds


PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def _reference(result: TriageResult, source: Dataset) -> Dataset:
    """A shallow copy of the source with empty type 2 patient/study attributes filled in."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not source.get(keyword):
            raise AIObjectError(f"the evaluated instance has no {keyword}")
    if source.StudyInstanceUID != result.study_instance_uid:
        raise AIObjectError(
            f"result is for study {result.study_instance_uid}, "
            f"the instance belongs to {source.StudyInstanceUID}"
        )
    ref = Dataset()
    ref.update(source)
    if hasattr(source, "file_meta"):
        ref.file_meta = source.file_meta
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ref:
            setattr(ref, keyword, "")
    return ref


def _evidence(result: TriageResult, ref: Dataset) -> list[Dataset]:
    """The source first (patient and study come from it), then the other evaluated images."""
    out = [ref]
    seen = {str(ref.SOPInstanceUID)}
    for image in result.images:
        if image.sop_instance_uid in seen:
            continue
        seen.add(image.sop_instance_uid)
        item = Dataset()
        item.SOPClassUID = image.sop_class_uid
        item.SOPInstanceUID = image.sop_instance_uid
        item.SeriesInstanceUID = image.series_instance_uid
        item.StudyInstanceUID = image.study_instance_uid
        out.append(item)
    return out


# ---------------------------------------------------------------------------- UIDs, times


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["medgw-ai", *parts]))


def _result_entropy(result: TriageResult, source: Dataset) -> list[str]:
    """What makes a result itself: model, study, image, findings (probabilities to 4 places)."""
    return [
        result.model_id,
        result.model_version,
        result.model_sha256,
        result.study_instance_uid,
        str(source.SOPInstanceUID),
        result.priority,
        *(
            f"{f.label}|{f.probability:.4f}|{f.threshold:.4f}|{f.positive}|{f.urgent}"
            for f in result.findings
        ),
        *(image.sop_instance_uid for image in result.images),
    ]


def _parse_offset(value: object) -> timezone | None:
    match = re.fullmatch(r"([+-])(\d\d)(\d\d)", str(value or "").strip())
    if match is None:
        return None
    delta = timedelta(hours=int(match[2]), minutes=int(match[3]))
    return timezone(-delta if match[1] == "-" else delta)


def _created(created: datetime | None, source: Dataset) -> datetime:
    """The content time, naive, in the source's time zone (PS3.3 C.12.1.1.8)."""
    if created is not None:
        if created.tzinfo is None:
            return created.replace(microsecond=0)
        zone = _parse_offset(source.get("TimezoneOffsetFromUTC"))
        return created.astimezone(zone).replace(tzinfo=None, microsecond=0)
    for date_kw, time_kw in (
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("StudyDate", "StudyTime"),
    ):
        try:
            day = DA(str(source.get(date_kw) or ""))
            clock = TM(str(source.get(time_kw) or "000000"))
        except ValueError:
            continue
        if day is not None and clock is not None:
            return datetime.combine(day, clock).replace(microsecond=0, tzinfo=None)
    raise AIObjectError("no created time given and the source has no content or study date")


def _pin_times(ds: Dataset, when: datetime, source: Dataset) -> None:
    """Replace what highdicom took from the clock, so that a re-run builds the same bytes."""
    day, clock = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = day, clock
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = day, clock
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        if purpose[0].get("CodeValue") == PROCESSING_EQUIPMENT:
            item.ContributionDateTime = day + clock
    if source.get("TimezoneOffsetFromUTC"):
        ds.TimezoneOffsetFromUTC = source.TimezoneOffsetFromUTC


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


# ---------------------------------------------------------------------------- SR


def _procedure(source: Dataset) -> CodedConcept:
    chest = str(source.get("BodyPartExamined", "")).upper() == "CHEST"
    if chest and source.get("Modality") in {"CR", "DX"}:
        return PLAIN_CHEST_XRAY
    return IMAGING_PROCEDURE


def _library(ref: Dataset) -> list[Dataset]:
    """The Image Library (TID 1600) for the source, or none where its header is too thin.

    highdicom describes projection images from their Imager Pixel Spacing and the
    like; a CR header may lack them, and the library is optional in TID 1500. The
    common case (a projection image without Imager Pixel Spacing, which highdicom
    refuses) is answered without asking highdicom, which is slow to refuse.
    """
    if ref.get("Modality") in PROJECTION_MODALITIES and "ImagerPixelSpacing" not in ref:
        log.debug(
            "ai.sr image library left out for %s: no Imager Pixel Spacing", ref.SOPInstanceUID
        )
        return []
    try:
        return list(hd.sr.ImageLibrary([ref]))
    except (ValueError, TypeError, AttributeError) as err:
        log.debug("ai.sr image library left out for %s: %s", ref.SOPInstanceUID, err)
        return []


# The content tree is built directly as pydicom data sets: highdicom's template
# classes validate and deep-copy every item (several times over in the document
# constructor), which made up most of the time to build an SR. The items below
# are what highdicom writes for the same templates (PS3.3 C.17.3 content items).
Triplet = tuple[str, str, str]  # code value, coding scheme designator, code meaning

CONTAINS, CONCEPT_MOD, OBS_CONTEXT = "CONTAINS", "HAS CONCEPT MOD", "HAS OBS CONTEXT"
PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})  # highdicom's
MEASUREMENT_REPORT: Final[Triplet] = ("126000", "DCM", "Imaging Measurement Report")
LANGUAGE: Final[Triplet] = ("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH_US: Final[Triplet] = ("en-US", "RFC5646", "English (United States)")
OBSERVER_TYPE: Final[Triplet] = ("121005", "DCM", "Observer Type")
DEVICE: Final[Triplet] = ("121007", "DCM", "Device")  # CID 270
DEVICE_UID: Final[Triplet] = ("121012", "DCM", "Device Observer UID")
DEVICE_NAME: Final[Triplet] = ("121013", "DCM", "Device Observer Name")
DEVICE_MANUFACTURER: Final[Triplet] = ("121014", "DCM", "Device Observer Manufacturer")
DEVICE_MODEL: Final[Triplet] = ("121015", "DCM", "Device Observer Model Name")
DEVICE_SERIAL: Final[Triplet] = ("121016", "DCM", "Device Observer Serial Number")
PROCEDURE_REPORTED: Final[Triplet] = ("121058", "DCM", "Procedure reported")
IMAGING_MEASUREMENTS: Final[Triplet] = ("126010", "DCM", "Imaging Measurements")
MEASUREMENT_GROUP: Final[Triplet] = ("125007", "DCM", "Measurement Group")
TRACKING_ID: Final[Triplet] = ("112039", "DCM", "Tracking Identifier")
TRACKING_UID: Final[Triplet] = ("112040", "DCM", "Tracking Unique Identifier")
FINDING: Final[Triplet] = ("121071", "DCM", "Finding")
SOURCE_OF_MEASUREMENT: Final[Triplet] = ("121112", "DCM", "Source of Measurement")
YES: Final[Triplet] = ("373066001", "SCT", "Yes")
NO: Final[Triplet] = ("373067005", "SCT", "No")


def _triplet(concept: CodedConcept) -> Triplet:
    return (concept.value, concept.scheme_designator, concept.meaning)


@functools.lru_cache(maxsize=1024)
def _finding_triplet(label: str) -> Triplet:
    return _triplet(finding_code(label))


def _code(code: Triplet) -> Dataset:
    """A Code Sequence item (PS3.3 8.8): all our code values fit Code Value (SH)."""
    item = Dataset()
    item.add_new(0x00080100, "SH", code[0])
    item.add_new(0x00080102, "SH", code[1])
    item.add_new(0x00080104, "LO", code[2])
    return item


def _item(value_type: str, name: Triplet, relationship: str | None) -> Dataset:
    item = Dataset()
    if relationship is not None:
        item.add_new(0x0040A010, "CS", relationship)
    item.add_new(0x0040A040, "CS", value_type)
    item.add_new(0x0040A043, "SQ", [_code(name)])
    return item


def _text(name: Triplet, text: str, relationship: str) -> Dataset:
    item = _item("TEXT", name, relationship)
    item.add_new(0x0040A160, "UT", text)
    return item


def _coded_item(name: Triplet, value: Triplet, relationship: str) -> Dataset:
    item = _item("CODE", name, relationship)
    item.add_new(0x0040A168, "SQ", [_code(value)])
    return item


def _uidref(name: Triplet, uid: str, relationship: str) -> Dataset:
    item = _item("UIDREF", name, relationship)
    item.add_new(0x0040A124, "UI", uid)
    return item


def _num(name: Triplet, value: float, relationship: str) -> Dataset:
    """A NUM item without units (UCUM "1"), as highdicom's Measurement writes it."""
    measured = Dataset()
    measured.add_new(0x004008EA, "SQ", [_code(NO_UNITS_CODE)])
    measured.add_new(0x0040A30A, "DS", DS(value, auto_format=True))
    measured.add_new(0x0040A161, "FD", value)
    item = _item("NUM", name, relationship)
    item.add_new(0x0040A300, "SQ", [measured])
    return item


def _image(name: Triplet, sop_class_uid: str, sop_instance_uid: str, relationship: str) -> Dataset:
    ref = Dataset()
    ref.add_new(0x00081150, "UI", sop_class_uid)
    ref.add_new(0x00081155, "UI", sop_instance_uid)
    item = _item("IMAGE", name, relationship)
    item.add_new(0x00081199, "SQ", [ref])
    return item


def _container(
    name: Triplet,
    items: list[Dataset],
    relationship: str | None = CONTAINS,
    *,
    continuous: bool = True,
    template: str | None = None,
) -> Dataset:
    item = _item("CONTAINER", name, relationship)
    item.add_new(0x0040A050, "CS", "CONTINUOUS" if continuous else "SEPARATE")
    if template is not None:
        tid = Dataset()
        tid.add_new(0x00080105, "CS", "DCMR")
        tid.add_new(0x0040DB00, "CS", template)
        item.add_new(0x0040A504, "SQ", [tid])
    item.add_new(0x0040A730, "SQ", items)
    return item


NO_UNITS_CODE: Final[Triplet] = _triplet(NO_UNITS)


def _observer(result: TriageResult, manufacturer: str) -> list[Dataset]:
    """TID 1002 observer context with the model as the device (TID 1004)."""
    items = [
        _coded_item(OBSERVER_TYPE, DEVICE, OBS_CONTEXT),
        _uidref(
            DEVICE_UID,
            _uid("device", result.model_id, result.model_version, result.model_sha256),
            OBS_CONTEXT,
        ),
        _text(DEVICE_NAME, result.model_id, OBS_CONTEXT),
        _text(DEVICE_MANUFACTURER, manufacturer, OBS_CONTEXT),
        _text(DEVICE_MODEL, f"{result.model_id} {result.model_version}", OBS_CONTEXT),
    ]
    if result.model_sha256[:16]:
        items.append(_text(DEVICE_SERIAL, result.model_sha256[:16], OBS_CONTEXT))
    return items


def _group(
    finding: Finding | None,
    result: TriageResult,
    evidence: Sequence[Dataset],
    instance_uid: str,
) -> Dataset:
    """TID 1501 for one positive finding, or for "no finding above threshold" (``None``)."""
    label = finding.label if finding is not None else NO_FINDING.meaning
    items = [
        _text(TRACKING_ID, f"{result.model_id}: {label}", OBS_CONTEXT),
        _uidref(TRACKING_UID, _uid(instance_uid, "tracking", label), OBS_CONTEXT),
        _coded_item(
            FINDING,
            _finding_triplet(finding.label) if finding is not None else _triplet(NO_FINDING),
            CONTAINS,
        ),
        _text(_triplet(ALGORITHM_NAME), result.model_id, CONCEPT_MOD),  # TID 4019
        _text(_triplet(ALGORITHM_VERSION), result.model_version, CONCEPT_MOD),
    ]
    if finding is not None:
        items += [
            _num(_triplet(PROBABILITY), round(finding.probability, 4), CONTAINS),
            _num(_triplet(THRESHOLD), round(finding.threshold, 4), CONTAINS),
            _coded_item(_triplet(URGENT_FINDING), YES if finding.urgent else NO, CONTAINS),
        ]
    items += [
        _image(SOURCE_OF_MEASUREMENT, str(ds.SOPClassUID), str(ds.SOPInstanceUID), CONTAINS)
        for ds in evidence
    ]
    return _container(MEASUREMENT_GROUP, items, template="1501")


def _evaluations(result: TriageResult) -> Dataset:
    """TID 1500 "Qualitative Evaluations": the disclaimer, the priority and the model."""
    items = [
        _text(_triplet(COMMENT), DISCLAIMER, CONTAINS),
        _coded_item(
            _triplet(TRIAGE_PRIORITY), _triplet(PRIORITY_VALUES[result.priority]), CONTAINS
        ),
        _text(_triplet(ALGORITHM_NAME), result.model_id, CONTAINS),
        _text(_triplet(ALGORITHM_VERSION), result.model_version, CONTAINS),
    ]
    if result.intended_use:
        items.append(_text(_triplet(INTENDED_USE), result.intended_use, CONTAINS))
    return _container(_triplet(QUALITATIVE_EVALUATIONS), items, continuous=False)


def _report(
    result: TriageResult,
    ref: Dataset,
    evidence: Sequence[Dataset],
    procedure: CodedConcept,
    *,
    instance_uid: str,
    manufacturer: str,
) -> Dataset:
    """The root container: TID 1500 "Imaging Measurement Report"."""
    groups = [_group(f, result, evidence, instance_uid) for f in result.positives]
    return _container(
        MEASUREMENT_REPORT,
        [
            _coded_item(LANGUAGE, ENGLISH_US, CONCEPT_MOD),  # TID 1204
            *_observer(result, manufacturer),
            _coded_item(PROCEDURE_REPORTED, _triplet(procedure), CONCEPT_MOD),
            *_library(ref),
            _container(
                IMAGING_MEASUREMENTS,
                groups or [_group(None, result, evidence, instance_uid)],
            ),
            _evaluations(result),
        ],
        relationship=None,
        template="1500",
    )


def build_sr(
    result: TriageResult,
    source: Dataset,
    *,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    manufacturer: str = "medgw",
    device_serial: str = "",
    institution: str = "",
    series_number: int = SR_SERIES_NUMBER,
    created: datetime | None = None,
    procedure: CodedConcept | None = None,
) -> bytes:
    """The result as a TID 1500 Comprehensive 3D SR in the source's study (PS3.3 A.35.13).

    ``source`` is the evaluated instance (a header is enough). ``created`` is the
    content time (aware times are shown in the source's time zone); without it the
    source's content, acquisition or study date and time are used, so that the
    same inputs always make the same bytes. It does not enter the UIDs: a re-run
    with another time replaces the object instead of adding one.
    """
    ref = _reference(result, source)
    when = _created(created, ref)
    procedure = _procedure(ref) if procedure is None else procedure
    entropy = [
        *_result_entropy(result, ref),
        f"{procedure.scheme_designator}:{procedure.value}",
        manufacturer,
        device_serial,
        institution,
    ]
    series_uid = series_uid or _uid("sr-series", result.study_instance_uid, result.model_id)
    instance_uid = instance_uid or _uid("sr", *entropy)
    evidence = _evidence(result, ref)
    report = _report(
        result, ref, evidence, procedure, instance_uid=instance_uid, manufacturer=manufacturer
    )
    # highdicom writes the document around a childless root and the content goes in
    # afterwards: it would otherwise copy and re-parse the whole tree (the content
    # references only the evidence, which highdicom lists in the evidence sequences)
    root = _container(MEASUREMENT_REPORT, [], relationship=None, template="1500")
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=root,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=SR_SERIES_DESCRIPTION,
            content_date=when.strftime("%Y%m%d"),
            content_time=when.strftime("%H%M%S"),
            series_date=when.strftime("%Y%m%d"),
            series_time=when.strftime("%H%M%S"),
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    PRIVATE_SCHEME, name="medgw local codes", responsible_organization=manufacturer
                )
            ],
            specific_character_set=UTF8,
            manufacturer_model_name="medgw",
            device_serial_number=device_serial or None,
            institution_name=institution or None,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise AIObjectError(f"cannot build the AI triage SR: {err}") from err
    sr.ContentSequence = report.ContentSequence
    _pin_times(sr, when, ref)
    return _part10(sr)


# ---------------------------------------------------------------------------- SC


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font only
        return ImageFont.load_default()


def has_glyph(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> bool:
    """Whether the font draws ``char`` as itself rather than as its "missing" box."""
    missing = font.getmask("\U000f0000")  # plane 15 private use: no font has it
    drawn = font.getmask(char)
    return drawn.size != missing.size or bytes(drawn) != bytes(missing)


def banner_title(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """The banner's first line, with a hyphen where the font has no em dash."""
    return BANNER if has_glyph(font, "—") else BANNER.replace("—", "-")


def _banner_lines(result: TriageResult) -> list[tuple[str, tuple[int, int, int]]]:
    white, yellow, red = (255, 255, 255), (255, 220, 0), (255, 70, 70)
    lines = [(f"Model {result.model_id} {result.model_version}", white)]
    for f in result.positives:
        urgent = " URGENT" if f.urgent else ""
        text = f"{f.label}: {f.probability:.2f} (threshold {f.threshold:.2f}){urgent}"
        lines.append((text, red if f.urgent else yellow))
    if not result.positives:
        lines.append(("No finding above threshold", white))
    return lines


def _heat_overlay(base: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a 0..1 heat map (any size) over an RGB image: transparent where it is 0."""
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"the heat map must be 2-D, got shape {heat.shape}")
    height, width = base.shape[:2]
    heat = np.asarray(
        Image.fromarray(np.clip(heat, 0.0, 1.0)).resize((width, height), Image.Resampling.BILINEAR)
    )
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    colour = np.concatenate([np.ones_like(heat), heat, np.zeros_like(heat)], axis=2) * 255.0
    alpha = HEAT_ALPHA * heat
    blended = base.astype(np.float32) * (1.0 - alpha) + colour * alpha
    out: np.ndarray = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def render_summary(
    result: TriageResult,
    display: np.ndarray,
    heatmap: np.ndarray | None = None,
    *,
    max_size: int = MAX_SC_SIZE,
) -> np.ndarray:
    """The summary picture (rows, columns, 3): banner on top, image (and heat map) below."""
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(f"display must be 2-D uint8, got {display.dtype} {display.shape}")
    height, width = display.shape
    scale = min(1.0, max_size / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(display)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image.convert("RGB"))
    if heatmap is not None:
        pixels = _heat_overlay(pixels, heatmap)

    font_size = min(32, max(12, size[0] // 40))
    font, pad = _font(font_size), max(4, font_size // 3)
    line = font_size + pad
    lines = [(banner_title(font), (255, 255, 255)), *_banner_lines(result)]
    banner = Image.new("RGB", (size[0], pad + line * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(banner)
    for row, (text, colour) in enumerate(lines):
        draw.text((pad, pad + row * line), text, fill=colour, font=font)
    return np.concatenate([np.asarray(banner), pixels], axis=0)


def _digest(array: np.ndarray | None) -> str:
    if array is None:
        return "-"
    data = np.ascontiguousarray(array)
    return f"{data.dtype}{data.shape}" + hashlib.sha256(data.tobytes()).hexdigest()


def build_sc(
    result: TriageResult,
    source: Dataset,
    display: np.ndarray,
    heatmap: np.ndarray | None = None,
    *,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    manufacturer: str = "medgw",
    device_serial: str = "",
    institution: str = "",
    series_number: int = SC_SERIES_NUMBER,
    created: datetime | None = None,
    max_size: int = MAX_SC_SIZE,
) -> bytes:
    """The summary image as a Secondary Capture in the source's study (PS3.3 A.8.1).

    ``display`` is the windowed image (2-D uint8), ``heatmap`` the model's map
    (0..1, any size) or ``None``; ``created`` as for :func:`build_sr`.
    """
    ref = _reference(result, source)
    when = _created(created, ref)
    pixels = render_summary(result, display, heatmap, max_size=max_size)
    entropy = [
        *_result_entropy(result, ref),
        _digest(display),
        _digest(heatmap),
        str(max_size),
        manufacturer,
        device_serial,
        institution,
    ]
    series_uid = series_uid or _uid("sc-series", result.study_instance_uid, result.model_id)
    instance_uid = instance_uid or _uid("sc", *entropy)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            # replaced below by the source's own value (or left empty, type 2)
            patient_orientation=("L", "F"),
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=SC_SERIES_DESCRIPTION,
            content_date=when.strftime("%Y%m%d"),
            content_time=when.strftime("%H%M%S"),
            series_date=when.strftime("%Y%m%d"),
            series_time=when.strftime("%H%M%S"),
            manufacturer_model_name="medgw",
            device_serial_number=device_serial or None,
            institution_name=institution or None,
            specific_character_set=UTF8,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise AIObjectError(f"cannot build the AI triage summary image: {err}") from err
    orientation = ref.get("PatientOrientation")
    sc["PatientOrientation"].value = orientation if orientation and len(orientation) == 2 else None
    if ref.get("BodyPartExamined"):
        sc.BodyPartExamined = ref.BodyPartExamined
    sc.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = BANNER.replace("—", "-")
    sc.DerivationDescription = (
        f"AI triage summary by {result.model_id} {result.model_version}: findings burned in"
        + (", heat map overlay" if heatmap is not None else "")
    )
    sc.SourceImageSequence = _source_images(ref)
    _pin_times(sc, when, ref)
    return _part10(sc)


def _source_images(ref: Dataset) -> list[Dataset]:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    return [item]
