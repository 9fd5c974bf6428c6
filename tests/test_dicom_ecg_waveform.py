"""Paper ECG: the twelve leads of pydicom's real 12-lead ECG (waveform_ecg.dcm, Mortara
ELI 250) -> 12-Lead ECG Waveform, read back with pydicom and checked with dciodvfy; the
printout as SC; the heart rate from R-R intervals as an ORU^R01 validated by hl7apy."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL  # type: ignore[import-untyped]
from hl7apy.core import Message  # type: ignore[import-untyped]
from hl7apy.parser import parse_message  # type: ignore[import-untyped]
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom.ecg_waveform import (
    LEAD_CODES,
    LEADS,
    TWELVE_LEAD_ECG,
    EcgError,
    ecg_12lead,
    heart_rate,
    hr_oru,
    lead_name,
    paper_ecg,
    r_peaks,
    scan_sc,
)
from dicom.film import MF_GRAYSCALE_BYTE_SC, read_scan, study_uid_for
from gateway.errors import PermanentError
from gateway.orders import Order

DCIODVFY = shutil.which("dciodvfy")
SOURCE = dcmread(str(get_testdata_file("waveform_ecg.dcm")))
FS = float(SOURCE.WaveformSequence[0].SamplingFrequency)  # 1000 Hz, 10 s
ACQUIRED = datetime(2013, 1, 25, 10, 59, 19, tzinfo=timezone(timedelta(hours=1)))
DIGITIZED = datetime(2024, 3, 5, 8, 0, 0, tzinfo=UTC)
ORDER = Order(
    control="new",
    accession="ECG-77",
    patient_id="PID9",
    patient_id_issuer="HOSP",
    patient_name="Lê^Thị^Hoa",
    birth_date="19710123",
    sex="F",
    placer_order="PL-1",
    procedure_text="12-lead ECG",
    referring_physician="Phạm^Minh",
)
# the source's own leads, in its channel order, as the SCPECG code meanings name them
SOURCE_ORDER = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def source_leads() -> dict[str, np.ndarray]:
    """The rhythm group of the real ECG in mV (pydicom gives uV)."""
    channels = SOURCE.WaveformSequence[0].ChannelDefinitionSequence
    meanings = [ch.ChannelSourceSequence[0].CodeMeaning for ch in channels]
    assert meanings[0] == "Lead I (Einthoven)" and meanings[5] == "Lead aVF"
    micro = SOURCE.waveform_array(0)
    return {name: micro[:, i] / 1000.0 for i, name in enumerate(SOURCE_ORDER)}


LEADS_MV = source_leads()


def read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def validate(tmp_path: Path, data: bytes, name: str = "ecg.dcm") -> str:
    """dciodvfy's report; fails on any line that starts with "Error" (the report, with its
    warnings, is the failure message)."""
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


def warnings_of(report: str) -> list[str]:
    return [w for w in report.splitlines() if w.startswith("Warning") and "DICOMDIR" not in w]


def build(**kwargs: object) -> bytes:
    params: dict[str, object] = {"acquired": ACQUIRED, "created": DIGITIZED}
    params.update(kwargs)
    return ecg_12lead(LEADS_MV, FS, ORDER, **params)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ waveform


def test_real_ecg_round_trips_within_one_microvolt(tmp_path: Path) -> None:
    data = build(heart_rate_bpm=61.1)
    report = validate(tmp_path, data)
    assert "TwelveLeadECG" in report
    assert not warnings_of(report), report
    ds = read(data)
    assert ds.SOPClassUID == TWELVE_LEAD_ECG
    assert ds.Modality == "ECG"
    back = ds.waveform_array(0) / 1000.0  # uV -> mV
    expected = np.stack([LEADS_MV[name] for name in LEADS], axis=1)
    assert back.shape == expected.shape == (10000, 12)
    assert np.abs(back - expected).max() <= 0.0005 + 1e-9  # half a 1 uV step


def test_channel_definitions(tmp_path: Path) -> None:
    ds = read(build(filter_low_hz=0.05, filter_high_hz=150, notch_hz=50))
    validate(tmp_path, build(filter_low_hz=0.05, filter_high_hz=150, notch_hz=50))
    (group,) = ds.WaveformSequence
    assert float(group.SamplingFrequency) == FS
    assert (group.NumberOfWaveformChannels, group.NumberOfWaveformSamples) == (12, 10000)
    assert (group.WaveformBitsAllocated, group.WaveformSampleInterpretation) == (16, "SS")
    assert group.WaveformOriginality == "DERIVED"
    assert group.MultiplexGroupLabel == "RHYTHM"
    expected = {
        "I": "2:1",
        "II": "2:2",
        "III": "2:61",
        "aVR": "2:62",
        "aVL": "2:63",
        "aVF": "2:64",
        "V1": "2:3",
        "V2": "2:4",
        "V3": "2:5",
        "V4": "2:6",
        "V5": "2:7",
        "V6": "2:8",
    }
    labels = []
    for ch in group.ChannelDefinitionSequence:
        source = ch.ChannelSourceSequence[0]
        labels.append(ch.ChannelLabel)
        assert source.CodingSchemeDesignator == "MDC"
        assert source.CodeValue == expected[ch.ChannelLabel]
        assert source.CodeMeaning == LEAD_CODES[ch.ChannelLabel][1]
        units = ch.ChannelSensitivityUnitsSequence[0]
        assert (units.CodeValue, units.CodingSchemeDesignator) == ("uV", "UCUM")
        assert float(ch.ChannelSensitivity) == 1.0
        assert float(ch.ChannelSensitivityCorrectionFactor) == 1.0
        assert float(ch.ChannelBaseline) == 0.0
        assert float(ch.ChannelSampleSkew) == 0.0
        assert ch.WaveformBitsStored == 16
        assert (float(ch.FilterLowFrequency), float(ch.FilterHighFrequency)) == (0.05, 150.0)
        assert float(ch.NotchFilterFrequency) == 50.0
    assert labels == list(LEADS) == list(expected)
    assert (
        "FilterLowFrequency" not in read(build()).WaveformSequence[0].ChannelDefinitionSequence[0]
    )


def test_patient_study_and_times_from_the_order() -> None:
    ds = read(build())
    assert str(ds.PatientName) == "Lê^Thị^Hoa"
    assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientSex) == ("PID9", "HOSP", "F")
    assert ds.PatientBirthDate == "19710123"
    assert ds.AccessionNumber == "ECG-77"
    assert str(ds.ReferringPhysicianName) == "Phạm^Minh"
    assert ds.StudyDescription == "12-lead ECG"
    assert ds.StudyInstanceUID == study_uid_for(ORDER, None, "")
    assert ds.AcquisitionDateTime == "20130125105919"
    assert (ds.StudyDate, ds.StudyTime) == ("20130125", "105919")
    assert (ds.ContentDate, ds.ContentTime) == ("20240305", "090000")  # in the ECG's zone
    assert ds.TimezoneOffsetFromUTC == "+0100"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "Laterality" not in ds


def test_heart_rate_annotation() -> None:
    ds = read(build(heart_rate_bpm=61.06))
    (item,) = ds.WaveformAnnotationSequence
    concept = item.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("8867-4", "LN")
    assert float(item.NumericValue) == 61.1
    assert item.MeasurementUnitsCodeSequence[0].CodeValue == "/min"
    assert list(item.ReferencedWaveformChannels) == [1, 0]
    assert "WaveformAnnotationSequence" not in read(build())


def test_3x4_printout_keeps_each_lead_at_its_time(tmp_path: Path) -> None:
    """Each lead only in its 2.5 s column (NaN elsewhere), lead II as a 10 s rhythm strip."""
    fs, n = 500.0, 5000
    t = np.arange(n) / fs
    columns = [("I", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6")]
    leads: dict[str, np.ndarray] = {}
    for k, names in enumerate(columns):
        for name in names:
            trace = np.full(n, np.nan)
            window = slice(k * 1250, (k + 1) * 1250)
            trace[window] = 0.5 * np.sin(2 * np.pi * 1.2 * t[window] + k)
            leads[name.lower()] = trace  # printouts' labels in any case
    leads["II"] = np.sin(2 * np.pi * 1.2 * t)
    data = ecg_12lead(leads, fs, None, created=DIGITIZED)
    validate(tmp_path, data)
    back = read(data).waveform_array(0)
    v1 = back[:, LEADS.index("V1")]
    assert np.all(v1[:2500] == 0) and np.all(v1[3750:] == 0)  # flat outside its column
    assert np.allclose(v1[2500:3750] / 1000, leads["v1"][2500:3750], atol=0.0005)
    assert np.allclose(back[:, LEADS.index("II")] / 1000, leads["II"], atol=0.0005)


def test_same_inputs_same_bytes() -> None:
    first = build()
    assert build() == first
    other = read(build(heart_rate_bpm=60.0))
    assert other.SOPInstanceUID != read(first).SOPInstanceUID
    assert other.SeriesInstanceUID == read(first).SeriesInstanceUID
    given = read(build(study_uid="1.2.3", series_uid="1.2.3.4", instance_uid="1.2.3.5"))
    assert (given.StudyInstanceUID, given.SeriesInstanceUID, given.SOPInstanceUID) == (
        "1.2.3",
        "1.2.3.4",
        "1.2.3.5",
    )


def test_only_one_time_needed() -> None:
    ds = read(ecg_12lead(LEADS_MV, FS, None, created=DIGITIZED))
    assert ds.AcquisitionDateTime == "20240305080000"  # the digitizing time stands in
    with pytest.raises(EcgError, match="time"):
        ecg_12lead(LEADS_MV, FS, None)


def test_lead_names() -> None:
    assert [lead_name(x) for x in ("i", "AVR", "avl", "aVF", "v6")] == [
        "I",
        "aVR",
        "aVL",
        "aVF",
        "V6",
    ]
    with pytest.raises(EcgError, match="unknown lead"):
        lead_name("V7")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("V3"), "missing V3"),
        (lambda d: d.update({"v1": d["V1"]}), "V1 given twice"),
        (lambda d: d.update({"X": d["I"]}), "unknown lead"),
        (lambda d: d.update({"I": d["I"][:-1]}), "one length"),
        (lambda d: d.update({"I": np.full(10000, np.nan)}), "lead I has no samples"),
        (lambda d: d.update({"I": np.full(10000, 40.0)}), "exceeds"),
        (lambda d: d.update({"I": np.full(10000, np.inf)}), "infinite"),
    ],
)
def test_bad_leads_are_refused(change: object, reason: str) -> None:
    leads = dict(LEADS_MV)
    change(leads)  # type: ignore[operator]
    with pytest.raises(EcgError, match=reason) as caught:
        ecg_12lead(leads, FS, ORDER, acquired=ACQUIRED)
    assert isinstance(caught.value, PermanentError)


def test_iod_limits() -> None:
    with pytest.raises(EcgError, match="sampling frequency"):
        ecg_12lead(LEADS_MV, 100.0, ORDER, acquired=ACQUIRED)
    long = {name: np.zeros(20000) for name in LEADS}
    with pytest.raises(EcgError, match="16384"):
        ecg_12lead(long, 1000.0, ORDER, acquired=ACQUIRED)
    with pytest.raises(EcgError, match="heart rate"):
        ecg_12lead(LEADS_MV, FS, ORDER, acquired=ACQUIRED, heart_rate_bpm=0)


# ------------------------------------------------------------------------------ heart rate


def source_rr_ms() -> float:
    """The Mortara device's own R-R interval measurement in the source object."""
    for item in SOURCE.WaveformAnnotationSequence:
        names = item.get("ConceptNameCodeSequence") or []
        if names and names[0].CodeMeaning == "RR Interval":
            return float(item.NumericValue)
    raise AssertionError("no RR interval in the source")


def test_heart_rate_of_the_real_ecg_matches_the_device() -> None:
    peaks = r_peaks(LEADS_MV["II"], FS)
    assert len(peaks) == 10  # ten beats in 10 s
    rate = heart_rate(peaks, FS)
    assert rate is not None
    assert rate == pytest.approx(60_000 / source_rr_ms(), abs=1.0)  # 982 ms -> 61 /min


def test_heart_rate_of_a_synthetic_trace_with_gaps() -> None:
    fs = 500.0
    trace = np.zeros(5000)
    beats = np.arange(100, 5000, 400)  # every 0.8 s: 75 /min
    for b in beats:
        trace[b - 5 : b + 6] += np.hanning(11) * 1.5  # narrow R waves
    trace += 0.05 * np.sin(np.arange(5000) / fs * 2 * np.pi * 0.3)  # baseline wander
    assert np.array_equal(r_peaks(trace, fs), beats)
    assert heart_rate(r_peaks(trace, fs), fs) == pytest.approx(75.0)
    assert heart_rate(np.array([10]), fs) is None
    assert len(r_peaks(np.zeros(100), fs)) == 0
    assert len(r_peaks(np.full(100, np.nan), fs)) == 0


# ------------------------------------------------------------------------------ scan, both objects


def printout() -> bytes:
    """A pink-grid "ECG paper" with a black trace, as a colour JPEG."""
    page = np.full((120, 200, 3), 255, dtype=np.uint8)
    page[::10, :, 1:] = 180
    page[:, ::10, 1:] = 180
    rows = (60 + 20 * np.sin(np.arange(200) / 7)).astype(int)
    page[rows, np.arange(200)] = 0
    out = io.BytesIO()
    Image.fromarray(page).save(out, "JPEG", quality=92)
    return out.getvalue()


def test_scan_sc_is_a_scanned_document(tmp_path: Path) -> None:
    sc = scan_sc(read_scan(printout()), ORDER, dpi=200.0, created=DIGITIZED)
    report = validate(tmp_path, sc, "scan.dcm")
    assert not warnings_of(report), report
    ds = read(sc)
    assert ds.SOPClassUID == MF_GRAYSCALE_BYTE_SC
    assert (ds.ConversionType, ds.Modality, ds.BurnedInAnnotation) == ("SD", "ECG", "YES")
    assert "Laterality" not in ds
    assert [float(v) for v in ds.NominalScannedPixelSpacing] == pytest.approx([0.127, 0.127])


@pytest.mark.parametrize("order", [ORDER, None], ids=["order", "no-order"])
def test_paper_ecg_puts_both_objects_in_one_study(tmp_path: Path, order: Order | None) -> None:
    scan = read_scan(printout())
    waveform, image = paper_ecg(
        scan, LEADS_MV, FS, order, dpi=200.0, acquired=ACQUIRED, heart_rate_bpm=61.0
    )
    validate(tmp_path, waveform, "w.dcm")
    validate(tmp_path, image, "i.dcm")
    w, i = read(waveform), read(image)
    assert w.StudyInstanceUID == i.StudyInstanceUID
    assert w.SeriesInstanceUID != i.SeriesInstanceUID
    assert (w.SeriesNumber, i.SeriesNumber) == (9811, 9812)
    assert w.AccessionNumber == i.AccessionNumber == (order.accession if order else "")
    again = paper_ecg(scan, LEADS_MV, FS, order, dpi=200.0, acquired=ACQUIRED, heart_rate_bpm=61.0)
    assert again == (waveform, image)


# ------------------------------------------------------------------------------ HL7


def strict(raw: bytes) -> Message:
    """hl7apy's STRICT parse and validation (structure, groups, required fields, types)."""
    msg = parse_message(
        raw.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    msg.validate()
    return msg


def oru(order: Order = ORDER, **kwargs: object) -> bytes:
    params: dict[str, object] = {
        "observed": ACQUIRED,
        "control_id": "MSG-1",
        "timestamp": DIGITIZED,
        "sending_facility": "SITE",
    }
    params.update(kwargs)
    return hr_oru(order, 61.07, **params)  # type: ignore[arg-type]


def test_oru_is_valid_hl7() -> None:
    raw = oru()
    msg = strict(raw)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    lines = raw.decode("utf-8").split("\r")
    assert lines[-1] == ""
    assert lines[0] == (
        "MSH|^~\\&|MEDGW|SITE|HIS||20240305080000+0000||ORU^R01^ORU_R01|MSG-1|P|2.5.1"
        "||||||UNICODE UTF-8"
    )
    assert lines[1] == "PID|1||PID9^^^HOSP||Lê^Thị^Hoa||19710123|F"
    assert lines[2] == "ORC|RE|PL-1|ECG-77"
    assert lines[3].startswith(
        "OBR|1|PL-1|ECG-77|34534-8^12 lead EKG panel^LN|||20130125105919+0100|"
    )
    assert lines[3].endswith("|20240305080000+0000|||F")
    assert lines[4] == (
        "OBX|1|NM|8867-4^Heart rate^LN||61|/min^/min^UCUM|||||F|||20130125105919+0100"
    )


def test_oru_uses_the_ordered_procedure_and_escapes() -> None:
    order = ORDER.model_copy(
        update={
            "procedure_code": "ECG12",
            "procedure_scheme": "L",
            "procedure_text": "ECG | 12^lead",
            "patient_name": "O&Brien^Mary",
        }
    )
    raw = oru(order, result_status="P")
    strict(raw)
    text = raw.decode("utf-8")
    assert "|ECG12^ECG \\F\\ 12\\S\\lead^L|" in text
    assert "|O\\T\\Brien^Mary|" in text
    assert text.split("\r")[4].split("|")[11] == "P"


def test_oru_without_patient_id_uses_explicit_null() -> None:
    raw = oru(ORDER.model_copy(update={"patient_id": "", "patient_name": ""}))
    strict(raw)
    assert 'PID|1||""||""' in raw.decode("utf-8")


def test_oru_defaults_are_deterministic() -> None:
    """No control id: one derived from the content; no result time: the recording's."""
    raw = hr_oru(ORDER, 61.0, observed=ACQUIRED)
    strict(raw)
    assert hr_oru(ORDER, 61.2, observed=ACQUIRED) == raw  # the same rounded rate
    msh = raw.decode("utf-8").split("\r")[0].split("|")
    assert msh[6] == "20130125105919+0100"
    assert msh[9].startswith("ECG") and len(msh[9]) == 20
    assert hr_oru(ORDER, 75.0, observed=ACQUIRED).split(b"|")[9] != msh[9].encode()
    unobserved = hr_oru(ORDER, 61.0, timestamp=DIGITIZED)
    strict(unobserved)
    obr = unobserved.decode("utf-8").split("\r")[3].split("|")
    assert (obr[0], obr[7], obr[22], obr[25]) == ("OBR", "", "20240305080000+0000", "F")


def test_oru_refuses_nonsense() -> None:
    with pytest.raises(EcgError, match="heart rate"):
        hr_oru(ORDER, 0.0, observed=ACQUIRED)
    with pytest.raises(EcgError, match="0085"):
        oru(result_status="Z")
    with pytest.raises(EcgError, match="MSH-7"):
        hr_oru(ORDER, 61.0)
