"""AI triage objects: the TID 1500 SR and the summary Secondary Capture, built from the
RG1 chest radiograph, read back with pydicom and checked with dicom3tools' dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom.ai_objects import (
    AIObjectError,
    banner_title,
    build_sc,
    build_sr,
    finding_code,
    render_summary,
    source_header,
)
from gateway.triage import EvaluatedImage, Finding, TriageResult

RG1 = Path(str(get_testdata_file("RG1_UNCR.dcm")))
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DCIODVFY = shutil.which("dciodvfy")

# RG1's referring physician "ward" has one component: highdicom warns, quoting it
# (ai_objects silences that at import; pytest resets warning filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")


@pytest.fixture(scope="module")
def header() -> Dataset:
    return source_header(RG1)


@pytest.fixture(scope="module")
def full() -> Dataset:
    return source_header(RG1.read_bytes(), pixels=True)


@pytest.fixture(scope="module")
def display(full: Dataset) -> np.ndarray:
    """A windowed 8-bit view of RG1 (MONOCHROME1: inverted so that bone is white)."""
    raw = full.pixel_array.astype(np.float32)
    scaled = (raw - raw.min()) / (raw.max() - raw.min()) * 255.0
    out: np.ndarray = (255.0 - scaled).astype(np.uint8)
    return out


def result_for(header: Dataset, *, positive: bool) -> TriageResult:
    image = EvaluatedImage(
        sop_class_uid=header.SOPClassUID,
        sop_instance_uid=header.SOPInstanceUID,
        series_instance_uid=header.SeriesInstanceUID,
        study_instance_uid=header.StudyInstanceUID,
    )
    findings = (
        Finding(
            label="Pneumothorax",
            probability=0.9134,
            threshold=0.5,
            positive=positive,
            urgent=positive,
        ),
        Finding(label="Hernia", probability=0.7, threshold=0.4, positive=positive),
        Finding(label="Cardiomegaly", probability=0.12, threshold=0.5, positive=False),
    )
    return TriageResult(
        model_id="cxr14-densenet",
        model_version="1.2.0",
        model_sha256="0123456789abcdef" * 4,
        intended_use="Adult chest X-ray worklist triage",
        study_instance_uid=header.StudyInstanceUID,
        accession_number=header.AccessionNumber,
        patient_id=header.PatientID,
        priority="urgent" if positive else "normal",
        findings=findings,
        images=(image,),
        inference_ms=42.0,
    )


@pytest.fixture(scope="module")
def positive(header: Dataset) -> TriageResult:
    return result_for(header, positive=True)


@pytest.fixture(scope="module")
def negative(header: Dataset) -> TriageResult:
    return result_for(header, positive=False)


def heat() -> np.ndarray:
    """A 32x32 map, hot in one block (rows and columns 8..15), zero elsewhere."""
    grid = np.zeros((32, 32), dtype=np.float32)
    grid[8:16, 8:16] = 1.0
    return grid


def read(data: bytes) -> Dataset:
    return dcmread(BytesIO(data))


def content_items(items: Iterator[Dataset] | list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def texts(ds: Dataset) -> list[str]:
    return [i.TextValue for i in content_items(ds.ContentSequence) if i.ValueType == "TEXT"]


def codes_of(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(concept name, code value, scheme, meaning) of every CODE item."""
    return [
        (
            i.ConceptNameCodeSequence[0].CodeMeaning,
            i.ConceptCodeSequence[0].CodeValue,
            i.ConceptCodeSequence[0].CodingSchemeDesignator,
            i.ConceptCodeSequence[0].CodeMeaning,
        )
        for i in content_items(ds.ContentSequence)
        if i.ValueType == "CODE"
    ]


def numbers(ds: Dataset) -> list[tuple[str, float]]:
    return [
        (i.ConceptNameCodeSequence[0].CodeMeaning, float(i.MeasuredValueSequence[0].NumericValue))
        for i in content_items(ds.ContentSequence)
        if i.ValueType == "NUM"
    ]


def validate(tmp_path: Path, data: bytes, name: str) -> str:
    """dciodvfy's report; fails on any line that starts with "Error"."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    report = run.stdout + run.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    return report


# ------------------------------------------------------------------------------ SR


@pytest.mark.parametrize("is_positive", [True, False], ids=["positive", "negative"])
def test_sr_joins_the_study_in_a_new_series(header: Dataset, is_positive: bool) -> None:
    sr = read(build_sr(result_for(header, positive=is_positive), header))
    for keyword in PATIENT_STUDY:
        assert sr[keyword].value == header[keyword].value, keyword
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != header.SeriesInstanceUID
    assert sr.SeriesNumber == 9901
    assert sr.SeriesDescription == "AI triage (medgw)"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_sr_references_the_evaluated_image(header: Dataset, positive: TriageResult) -> None:
    sr = read(build_sr(positive, header))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == header.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == header.SeriesInstanceUID
    ref = series.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        header.SOPClassUID,
        header.SOPInstanceUID,
    )
    images = [i for i in content_items(sr.ContentSequence) if i.ValueType == "IMAGE"]
    assert images, "no IMAGE item references the radiograph"
    for item in images:
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID


def test_sr_has_one_group_per_positive_finding(header: Dataset, positive: TriageResult) -> None:
    sr = read(build_sr(positive, header))
    findings = [c for c in codes_of(sr) if c[0] == "Finding"]
    assert findings == [
        ("Finding", "36118008", "SCT", "Pneumothorax"),
        ("Finding", "HERNIA", "99MEDGW", "Hernia"),
    ]
    assert "Cardiomegaly" not in str(codes_of(sr))  # below its threshold
    assert numbers(sr) == [
        ("Probability", 0.9134),
        ("Threshold Value", 0.5),
        ("Probability", 0.7),
        ("Threshold Value", 0.4),
    ]
    urgent = [c[3] for c in codes_of(sr) if c[0] == "Urgent finding"]
    assert urgent == ["Yes", "No"]
    assert ("AI triage priority", "PRIO-URGENT", "99MEDGW", "Urgent") in codes_of(sr)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MEDGW"


def test_sr_says_triage_only_and_names_the_model(header: Dataset, positive: TriageResult) -> None:
    sr = read(build_sr(positive, header))
    assert "For triage only — not for diagnosis" in texts(sr)
    assert sr.SpecificCharacterSet == "ISO_IR 192"  # the dash needs UTF-8
    assert {"cxr14-densenet", "1.2.0", "Adult chest X-ray worklist triage"} <= set(texts(sr))
    observer = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.get("TextValue")
        for i in sr.ContentSequence
        if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer["Device Observer Name"] == "cxr14-densenet"
    assert observer["Device Observer Model Name"] == "cxr14-densenet 1.2.0"
    assert observer["Device Observer Serial Number"] == "0123456789abcdef"
    procedure = [c for c in codes_of(sr) if c[0] == "Procedure reported"]
    assert procedure == [("Procedure reported", "399208008", "SCT", "Plain chest X-ray")]


def test_sr_without_positives_states_no_finding(header: Dataset, negative: TriageResult) -> None:
    sr = read(build_sr(negative, header))
    findings = [c for c in codes_of(sr) if c[0] == "Finding"]
    assert findings == [("Finding", "NOFINDING", "99MEDGW", "No finding above threshold")]
    assert numbers(sr) == []
    assert "For triage only — not for diagnosis" in texts(sr)
    assert ("AI triage priority", "PRIO-NORMAL", "99MEDGW", "Normal") in codes_of(sr)


@pytest.mark.parametrize("is_positive", [True, False], ids=["positive", "negative"])
def test_sr_passes_dciodvfy(tmp_path: Path, header: Dataset, is_positive: bool) -> None:
    data = build_sr(result_for(header, positive=is_positive), header)
    report = validate(tmp_path, data, "sr.dcm")
    assert "Comprehensive3DSR" in report


def test_sr_lists_the_image_library_where_the_header_allows(
    tmp_path: Path, header: Dataset, positive: TriageResult
) -> None:
    """RG1 lacks Imager Pixel Spacing, so its SR has no TID 1600 library; a DX-like one has."""
    assert not any(
        i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
        for i in read(build_sr(positive, header)).ContentSequence
    )
    described = Dataset()
    described.update(header)
    described.ImagerPixelSpacing = [0.2, 0.2]
    data = build_sr(positive, described)
    library = [
        i
        for i in read(data).ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    ]
    assert len(library) == 1
    validate(tmp_path, data, "sr-library.dcm")


def test_sr_references_every_evaluated_image(
    tmp_path: Path, header: Dataset, positive: TriageResult
) -> None:
    lateral = EvaluatedImage(
        sop_class_uid=header.SOPClassUID,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        study_instance_uid=header.StudyInstanceUID,
    )
    both = positive.model_copy(update={"images": (*positive.images, lateral)})
    data = build_sr(both, header)
    sr = read(data)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in evidence}
    assert referenced == {header.SOPInstanceUID, lateral.sop_instance_uid}
    validate(tmp_path, data, "sr-two-images.dcm")


def test_sr_is_deterministic(header: Dataset, positive: TriageResult) -> None:
    first = build_sr(positive, header)
    assert build_sr(positive, header) == first  # no clock in it
    again = positive.model_copy(update={"inference_ms": 99.0})  # timing is not content
    assert build_sr(again, header) == first
    other = positive.model_copy(update={"model_version": "1.2.1"})
    assert read(build_sr(other, header)).SOPInstanceUID != read(first).SOPInstanceUID
    assert read(build_sr(other, header)).SeriesInstanceUID == read(first).SeriesInstanceUID


def test_sr_takes_given_uids_and_time(header: Dataset, positive: TriageResult) -> None:
    sr = read(
        build_sr(
            positive,
            header,
            series_uid="1.2.3.4",
            instance_uid="1.2.3.4.5",
            created=datetime(2024, 5, 1, 12, 30, 15, 999, tzinfo=UTC),
            institution="Lao Cai GH",
            device_serial="GW-0001",
        )
    )
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
    assert sr.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    # shown in the source's zone (RG1: -0400), the offset copied with it
    assert (sr.ContentDate, sr.ContentTime) == ("20240501", "083015")
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == ("20240501", "083015")
    assert sr.TimezoneOffsetFromUTC == "-0400"
    assert (sr.InstitutionName, sr.DeviceSerialNumber) == ("Lao Cai GH", "GW-0001")


def test_sr_refuses_another_studys_instance(header: Dataset, positive: TriageResult) -> None:
    other = positive.model_copy(update={"study_instance_uid": "1.2.3"})
    with pytest.raises(AIObjectError, match="study"):
        build_sr(other, header)


def test_sr_from_a_thin_header(positive: TriageResult, header: Dataset) -> None:
    """Type 2 patient attributes missing from the source are written empty, not refused."""
    thin = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "Modality",
        "Rows",
        "Columns",
    ):
        thin[keyword] = header[keyword]
    sr = read(build_sr(positive, thin))
    assert sr.PatientName == ""
    assert (sr.ContentDate, sr.ContentTime) == (header.StudyDate, header.StudyTime)


def test_finding_codes() -> None:
    assert finding_code("Pleural_Effusion").value == "60046008"
    assert finding_code("effusion").value == "60046008"
    assert (finding_code("Infiltration").value, finding_code("Infiltration").scheme_designator) == (
        "112121",
        "DCM",
    )
    lesion = finding_code("Enlarged Cardiomediastinum")
    assert lesion.scheme_designator == "99MEDGW"
    assert len(lesion.value) <= 16
    assert lesion.meaning == "Enlarged Cardiomediastinum"


# ------------------------------------------------------------------------------ SC


def test_sc_joins_the_study_and_references_the_image(
    header: Dataset, full: Dataset, display: np.ndarray, positive: TriageResult
) -> None:
    sc = read(build_sc(positive, full, display))
    for keyword in PATIENT_STUDY:
        assert sc[keyword].value == header[keyword].value, keyword
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.SeriesInstanceUID not in {
        header.SeriesInstanceUID,
        read(build_sr(positive, header)).SeriesInstanceUID,
    }
    assert sc.SeriesNumber == 9902
    assert sc.BurnedInAnnotation == "YES"
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SamplesPerPixel == 3
    source = sc.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert sc.PatientOrientation == header.PatientOrientation


def test_sc_pixels_decode_to_the_summary(
    full: Dataset, display: np.ndarray, positive: TriageResult
) -> None:
    sc = read(build_sc(positive, full, display))
    expected = render_summary(positive, display)
    assert sc.pixel_array.shape == expected.shape == (sc.Rows, sc.Columns, 3)
    assert np.array_equal(sc.pixel_array, expected)
    # RG1 is 1841 x 1955: the longer side becomes 1024, the banner sits on top
    assert sc.Columns == round(1841 * 1024 / 1955)
    banner_rows = sc.Rows - 1024
    assert 0 < banner_rows < 200
    banner = sc.pixel_array[:banner_rows]
    assert banner.max() > 200 and banner.min() == 0  # text on black


def test_heatmap_colours_only_where_it_is_hot(display: np.ndarray, positive: TriageResult) -> None:
    plain = render_summary(positive, display)
    hot = render_summary(positive, display, heat())
    assert plain.shape == hot.shape
    top = plain.shape[0] - 1024
    rows, cols = 1024, plain.shape[1]
    # the block's centre (rows/cols 8..15 of 32) changed, towards red/yellow
    centre = (
        slice(top + rows * 11 // 32, top + rows * 13 // 32),
        slice(cols * 11 // 32, cols * 13 // 32),
    )
    assert (hot[centre] != plain[centre]).any(axis=2).all()
    assert (hot[centre][..., 0] >= plain[centre][..., 0]).all()
    # far from the block (bilinear spreads it by less than one map cell): untouched
    far = (slice(top + rows * 24 // 32, None), slice(cols * 24 // 32, None))
    assert np.array_equal(hot[far], plain[far])
    assert np.array_equal(hot[:top], plain[:top])  # the banner too


@pytest.mark.parametrize(
    ("is_positive", "with_heat"),
    [(True, True), (False, False)],
    ids=["positive-heatmap", "negative-plain"],
)
def test_sc_passes_dciodvfy(
    tmp_path: Path,
    header: Dataset,
    full: Dataset,
    display: np.ndarray,
    is_positive: bool,
    with_heat: bool,
) -> None:
    result = result_for(header, positive=is_positive)
    data = build_sc(result, full, display, heat() if with_heat else None)
    report = validate(tmp_path, data, "sc.dcm")
    assert "SCImage" in report


def test_sc_is_deterministic(full: Dataset, display: np.ndarray, positive: TriageResult) -> None:
    first = build_sc(positive, full, display, heat())
    assert build_sc(positive, full, display, heat()) == first
    plain = build_sc(positive, full, display)
    assert read(plain).SOPInstanceUID != read(first).SOPInstanceUID  # another picture


def test_small_display_is_not_enlarged(positive: TriageResult) -> None:
    small = np.full((300, 200), 128, dtype=np.uint8)
    out = render_summary(positive, small)
    assert out.shape[1] == 200
    assert np.array_equal(out[-300:], np.repeat(small[..., None], 3, axis=2))


def test_banner_title_falls_back_to_ascii() -> None:
    title = banner_title(ImageFont.load_default(size=20))
    assert title in {"AI triage — not for diagnosis", "AI triage - not for diagnosis"}


def test_bad_display_is_refused(full: Dataset, positive: TriageResult) -> None:
    with pytest.raises(ValueError, match="uint8"):
        build_sc(positive, full, np.zeros((4, 4), dtype=np.float32))


# ------------------------------------------------------------------------------ sources


def test_source_header_reads_path_or_bytes() -> None:
    by_path = source_header(RG1)
    assert "PixelData" not in by_path
    with_pixels = source_header(RG1.read_bytes(), pixels=True)
    assert "PixelData" in with_pixels
    assert by_path.SOPInstanceUID == with_pixels.SOPInstanceUID


def test_source_header_refuses_garbage() -> None:
    with pytest.raises(AIObjectError):
        source_header(b"hello world, not dicom")
