"""Paper ECG: the digitized traces as a DICOM 12-Lead ECG Waveform, the page as an SC image,
and the heart rate as an HL7 ORU^R01 for the HIS.

:func:`ecg_12lead` writes a 12-Lead ECG Waveform object (PS3.3 A.34.3, SOP Class
1.2.840.10008.5.1.4.1.1.9.1.1): Patient, General Study, General Series (Modality
``ECG``), General Equipment, Waveform Identification (C.10.8), Waveform (C.10.9),
Acquisition Context (C.7.6.14, empty: a printout does not say how the electrodes
were placed), Waveform Annotation (C.10.10, the heart rate when given) and SOP
Common. One multiplex group ``RHYTHM`` holds the twelve leads in the order I, II,
III, aVR, aVL, aVF, V1..V6; each channel's source is its PS3.16 CID 3001 code
(MDC ``2:1`` "Lead I" ... ``2:8`` "Lead V6"), its sensitivity 1 uV per unit
(UCUM ``uV``, CID 3082), baseline 0, skew 0, 16 bits stored, filters only where the
caller knows them from the printout. Samples are signed 16-bit (SS), so the
range is +-32.767 mV in 1 uV steps -- finer than any paper trace. The PS3.3
A.34.3.4 limits are checked: 200..1000 Hz, at most 16384 samples per channel.
Waveform Originality is ``DERIVED``: the samples come from paper, not from the
acquisition device.

A 3x4 printout shows each lead for 2.5 s (I, II, III from 0 s; aVR, aVL, aVF from
2.5 s; V1..V3 from 5 s; V4..V6 from 7.5 s) and often a 10 s rhythm strip. All
channels of a multiplex group are sampled together (C.10.9.1), so the leads are
not pressed into one common 2.5 s window, which would show events that happened
at different times as simultaneous. Each lead is given over the whole record,
at its true time, with NaN where the paper does not show it; those samples are
written as 0 uV, a flat line at the baseline, which every reader draws as "no
trace". (Waveform Padding Value would be the standard's mark for them, but a
reader that ignores it would draw a -32 mV spike, far worse than a flat line.)

:func:`scan_sc` stores the scanned page as a Multi-frame Grayscale SC image
(:func:`dicom.film.film_sc`) with Conversion Type ``SD`` (scanned document: a
paper printout is not film, and ``DF`` would claim it is), Modality ``ECG``
(the source equipment, C.8.6.1) and Burned In Annotation ``YES`` (a printout
carries the patient's name and the device's header). :func:`paper_ecg` builds
both with the same Study Instance UID.

:func:`r_peaks` and :func:`heart_rate` find the heart rate from the R-R intervals
of one lead; :func:`hr_oru` reports it to the HIS as ORU^R01^ORU_R01 v2.5.1 (HL7
ch. 7.3.1) with one OBX, LOINC 8867-4 "Heart rate" in ``/min`` (UCUM).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime, tzinfo
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from dicom.film import ScanImage, film_sc, part10, patient_study, set_times, study_uid_for
from gateway.errors import PermanentError
from gateway.orders import Order

TWELVE_LEAD_ECG: Final = "1.2.840.10008.5.1.4.1.1.9.1.1"
ECG_SERIES_NUMBER: Final = 9811
ECG_SCAN_SERIES_NUMBER: Final = 9812
UTF8: Final = "ISO_IR 192"
MIN_HZ, MAX_HZ, MAX_SAMPLES = 200.0, 1000.0, 16384  # PS3.3 A.34.3.4.2
UV_PER_UNIT: Final = 1.0  # Channel Sensitivity: 1 uV per stored unit

# PS3.16 CID 3001 "ECG Leads" (MDC): the label a printout uses -> (code, meaning)
LEAD_CODES: Final[dict[str, tuple[str, str]]] = {
    "I": ("2:1", "Lead I"),
    "II": ("2:2", "Lead II"),
    "III": ("2:61", "Lead III"),
    "aVR": ("2:62", "aVR, augmented voltage, right"),
    "aVL": ("2:63", "aVL, augmented voltage, left"),
    "aVF": ("2:64", "aVF, augmented voltage, foot"),
    "V1": ("2:3", "Lead V1"),
    "V2": ("2:4", "Lead V2"),
    "V3": ("2:5", "Lead V3"),
    "V4": ("2:6", "Lead V4"),
    "V5": ("2:7", "Lead V5"),
    "V6": ("2:8", "Lead V6"),
}
LEADS: Final = tuple(LEAD_CODES)
_BY_FOLDED = {name.upper(): name for name in LEADS}
# (code, scheme, meaning): the annotation's concept (PS3.16 lists LOINC 8867-4) and units
HEART_RATE: Final = ("8867-4", "LN", "Heart rate")
PER_MINUTE: Final = ("/min", "UCUM", "/min")
ECG_PANEL: Final = ("34534-8", "12 lead EKG panel", "LN")  # OBR-4 without an order code


class EcgError(PermanentError, ValueError):
    """The traces or the measurements cannot make a valid ECG object or message."""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# ---------------------------------------------------------------------------- input


def lead_name(label: str) -> str:
    """The standard label for a printout's lead label (``avr`` -> ``aVR``)."""
    name = _BY_FOLDED.get(label.strip().upper())
    if name is None:
        raise EcgError(f"unknown lead {label!r}: expected {', '.join(LEADS)}")
    return name


def to_samples(leads: Mapping[str, np.ndarray]) -> np.ndarray:
    """The twelve leads (mV, NaN = not on the paper) as int16 uV, shape (samples, 12)."""
    named: dict[str, np.ndarray] = {}
    for label, values in leads.items():
        name = lead_name(label)
        if name in named:
            raise EcgError(f"lead {name} given twice")
        named[name] = np.asarray(values, dtype=np.float64)
    missing = [name for name in LEADS if name not in named]
    if missing:
        raise EcgError(f"a 12-lead ECG needs every lead; missing {', '.join(missing)}")
    lengths = {v.shape for v in named.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise EcgError(f"the leads must be 1-D and of one length, got shapes {sorted(lengths)}")
    table = np.stack([named[name] for name in LEADS], axis=1)
    for name, column in zip(LEADS, table.T, strict=True):
        if np.isnan(column).all():
            raise EcgError(f"lead {name} has no samples")
    if np.isinf(table).any():
        raise EcgError("the leads hold infinite values")
    micro = np.rint(np.nan_to_num(table, nan=0.0) * (1000.0 / UV_PER_UNIT))
    limit = np.iinfo(np.int16).max
    if np.abs(micro).max() > limit:
        raise EcgError(f"a sample exceeds +-{limit * UV_PER_UNIT / 1000:g} mV: not an ECG trace")
    out: np.ndarray = micro.astype("<i2")
    return out


# ---------------------------------------------------------------------------- DICOM


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["medgw-ecg", *parts]))


def _in_zone(when: datetime, zone: tzinfo | None) -> datetime:
    if zone is None or when.tzinfo is None:
        return when
    return when.astimezone(zone)


def _channel(name: str, filters: tuple[float | None, float | None, float | None]) -> Dataset:
    code, meaning = LEAD_CODES[name]
    ch = Dataset()
    ch.ChannelSourceSequence = DicomSequence([_code(code, "MDC", meaning)])
    ch.ChannelLabel = name
    ch.ChannelSensitivity = format_number_as_ds(UV_PER_UNIT)
    ch.ChannelSensitivityUnitsSequence = DicomSequence([_code("uV", "UCUM", "microvolt")])
    ch.ChannelSensitivityCorrectionFactor = "1"
    ch.ChannelBaseline = "0"
    ch.ChannelSampleSkew = "0"
    ch.WaveformBitsStored = 16
    low, high, notch = filters
    if low is not None:
        ch.FilterLowFrequency = format_number_as_ds(float(low))
    if high is not None:
        ch.FilterHighFrequency = format_number_as_ds(float(high))
    if notch is not None:
        ch.NotchFilterFrequency = format_number_as_ds(float(notch))
    return ch


def _heart_rate_annotation(bpm: float) -> Dataset:
    """C.10.10: a numeric annotation of multiplex group 1 as a whole: channel ``0``, as
    the Mortara device's object in pydicom's test data writes its global measurements."""
    item = Dataset()
    item.ConceptNameCodeSequence = DicomSequence([_code(*HEART_RATE)])
    item.NumericValue = format_number_as_ds(round(float(bpm), 1))
    item.MeasurementUnitsCodeSequence = DicomSequence([_code(*PER_MINUTE)])
    item.ReferencedWaveformChannels = [1, 0]
    item.AnnotationGroupNumber = 1
    return item


def ecg_12lead(
    leads: Mapping[str, np.ndarray],
    sampling_hz: float,
    order: Order | None,
    *,
    acquired: datetime | None = None,
    created: datetime | None = None,
    heart_rate_bpm: float | None = None,
    filter_low_hz: float | None = None,
    filter_high_hz: float | None = None,
    notch_hz: float | None = None,
    institution: str = "",
    manufacturer: str = "medgw",
    device: str = "paper ECG digitizer",
    series_description: str = "ECG (digitized from paper)",
    series_number: int = ECG_SERIES_NUMBER,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> bytes:
    """The leads (mV, one 1-D array each, NaN where not printed) as a 12-Lead ECG object.

    ``acquired`` is when the ECG was recorded (the printout's header): Acquisition
    DateTime and Study Date/Time. ``created`` is when it was digitized: Content and
    Instance Creation date and time. Either stands in for the other; one is
    needed (Acquisition DateTime is type 1) and neither is read from the clock.
    Aware times are written in the recording's zone (else the digitizing time's)
    with Timezone Offset From UTC; naive times as given.
    """
    if not MIN_HZ <= float(sampling_hz) <= MAX_HZ:
        raise EcgError(f"sampling frequency {sampling_hz} Hz is outside {MIN_HZ:g}..{MAX_HZ:g}")
    samples = to_samples(leads)
    if len(samples) > MAX_SAMPLES:
        raise EcgError(f"{len(samples)} samples per lead; a 12-lead ECG holds {MAX_SAMPLES}")
    if heart_rate_bpm is not None and not 0 < heart_rate_bpm < 400:
        raise EcgError(f"heart rate {heart_rate_bpm} /min is not plausible")
    recorded = acquired or created
    made = created or acquired
    if recorded is None or made is None:
        raise EcgError("neither the recording time nor the digitizing time is known")
    zone = recorded.tzinfo or made.tzinfo
    recorded, made = _in_zone(recorded, zone), _in_zone(made, zone)

    data = samples.tobytes()
    digest = hashlib.sha256(data).hexdigest()
    study = study_uid_for(order, study_uid, digest)
    series = series_uid or _uid("series", study, series_description)
    instance = instance_uid or _uid(
        "instance",
        digest,
        format_number_as_ds(float(sampling_hz)),
        study,
        series,
        order.to_json().decode() if order else "",
        recorded.isoformat(),
        made.isoformat(),
        repr((heart_rate_bpm, filter_low_hz, filter_high_hz, notch_hz)),
        institution,
        manufacturer,
        device,
        series_description,
    )

    ds = Dataset()
    ds.SpecificCharacterSet = UTF8
    ds.SOPClassUID = TWELVE_LEAD_ECG
    ds.SOPInstanceUID = instance
    patient_study(ds, order, study)
    set_times(ds, recorded, "Study")
    set_times(ds, made, "Content", "InstanceCreation")
    ds.AcquisitionDateTime = recorded.strftime("%Y%m%d%H%M%S")

    ds.Modality = "ECG"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = device
    if institution:
        ds.InstitutionName = institution
    ds.InstanceNumber = 1
    ds.AcquisitionContextSequence = DicomSequence([])

    group = Dataset()
    group.WaveformOriginality = "DERIVED"
    group.NumberOfWaveformChannels = len(LEADS)
    group.NumberOfWaveformSamples = len(samples)
    group.SamplingFrequency = format_number_as_ds(float(sampling_hz))
    group.MultiplexGroupLabel = "RHYTHM"
    filters = (filter_low_hz, filter_high_hz, notch_hz)
    group.ChannelDefinitionSequence = DicomSequence([_channel(n, filters) for n in LEADS])
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = data
    group["WaveformData"].VR = "OW"
    ds.WaveformSequence = DicomSequence([group])
    if heart_rate_bpm is not None:
        ds.WaveformAnnotationSequence = DicomSequence([_heart_rate_annotation(heart_rate_bpm)])
    return part10(ds)


def scan_sc(
    scan: ScanImage,
    order: Order | None,
    *,
    dpi: float | tuple[float, float],
    created: datetime | None = None,
    institution: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> bytes:
    """The scanned printout as a Multi-frame Grayscale SC image (``SD``, Modality ECG)."""
    return film_sc(
        scan,
        order,
        dpi=dpi,
        modality="ECG",
        conversion_type="SD",
        burned_in_label=True,
        series_description="ECG printout (scan)",
        series_number=ECG_SCAN_SERIES_NUMBER,
        institution=institution,
        created=created,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_uid=instance_uid,
    )


def paper_ecg(
    scan: ScanImage,
    leads: Mapping[str, np.ndarray],
    sampling_hz: float,
    order: Order | None,
    *,
    dpi: float | tuple[float, float],
    acquired: datetime | None = None,
    created: datetime | None = None,
    heart_rate_bpm: float | None = None,
    institution: str = "",
    study_uid: str | None = None,
) -> tuple[bytes, bytes]:
    """(waveform, scan SC) in one study: the given one, the order's, or one derived
    from the order or, without an order, from the scan."""
    study = study_uid_for(order, study_uid, scan.sha256)
    waveform = ecg_12lead(
        leads,
        sampling_hz,
        order,
        acquired=acquired,
        created=created,
        heart_rate_bpm=heart_rate_bpm,
        institution=institution,
        study_uid=study,
    )
    image = scan_sc(scan, order, dpi=dpi, created=created, institution=institution, study_uid=study)
    return waveform, image


# ---------------------------------------------------------------------------- heart rate


def _moving_sum(values: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(max(1, width), dtype=np.float64)
    out: np.ndarray = np.convolve(values, kernel, mode="same")
    return out


def r_peaks(signal_mv: np.ndarray, sampling_hz: float) -> np.ndarray:
    """Sample indexes of the R peaks in one lead (a Pan-Tompkins-like detector).

    The slope is squared and summed over 150 ms; regions above 30 % of its 99th
    percentile are QRS complexes, merged when closer than 250 ms (refractory
    period); each R peak is the sample of largest deviation from the lead's median
    within the region. NaN samples (not on the paper) count as baseline.
    """
    values = np.asarray(signal_mv, dtype=np.float64)
    baseline = float(np.nanmedian(values)) if np.isfinite(values).any() else 0.0
    values = np.where(np.isfinite(values), values, baseline) - baseline
    if len(values) < 3:
        return np.zeros(0, dtype=np.int64)
    energy = _moving_sum(np.diff(values, prepend=values[0]) ** 2, round(0.15 * sampling_hz))
    level = 0.3 * float(np.percentile(energy, 99))
    if level <= 0:
        return np.zeros(0, dtype=np.int64)
    above = np.flatnonzero(energy > level)
    refractory = round(0.25 * sampling_hz)
    starts = above[np.r_[True, np.diff(above) > refractory]]
    ends = above[np.r_[np.diff(above) > refractory, True]]
    peaks = [
        int(start + np.argmax(np.abs(values[start : end + 1])))
        for start, end in zip(starts, ends, strict=True)
    ]
    return np.asarray(peaks, dtype=np.int64)


def heart_rate(peaks: np.ndarray, sampling_hz: float) -> float | None:
    """60 / mean R-R interval (s), or None with fewer than two R peaks."""
    if len(peaks) < 2:
        return None
    mean_rr = float(np.mean(np.diff(np.sort(peaks)))) / float(sampling_hz)
    return 60.0 / mean_rr if mean_rr > 0 else None


# ---------------------------------------------------------------------------- HL7


_ESCAPES = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"})
_BREAKS = re.compile(r"[\r\n]+")
HL7_STATUS = frozenset("CDFINOPRSUWX")  # table 0085


def _esc(text: str) -> str:
    """A component's text escaped (HL7 2.7); line breaks become spaces."""
    return _BREAKS.sub(" ", text.translate(_ESCAPES))


def _comp(*parts: str) -> str:
    return "^".join(_esc(p) for p in parts).rstrip("^")


def _ce(code: str, scheme: str, meaning: str) -> str:
    """CE/CWE identifier^text^coding system from a (code, scheme, meaning) triple."""
    return _comp(code, meaning, scheme)


def _seg(name: str, *fields: str) -> str:
    return "|".join((name, *fields)).rstrip("|")


def _ts(when: datetime) -> str:
    """HL7 DTM, with the offset when ``when`` is aware."""
    return when.strftime("%Y%m%d%H%M%S%z")


def hr_oru(
    order: Order,
    heart_rate_bpm: float,
    *,
    observed: datetime | None = None,
    timestamp: datetime | None = None,
    control_id: str = "",
    sending_app: str = "MEDGW",
    sending_facility: str = "",
    receiving_app: str = "HIS",
    receiving_facility: str = "",
    result_status: str = "F",
) -> bytes:
    """ORU^R01^ORU_R01 v2.5.1: MSH, PID, ORC, OBR, OBX (heart rate), UTF-8.

    The order is required: the HIS files the result under its patient and order.
    PID from it (PID-3 id^^^issuer, PID-5 the name, PID-7, PID-8; ``""`` where the
    order has no id or name); ORC-1 ``RE``, ORC-2/OBR-2 the placer order,
    ORC-3/OBR-3 the accession; OBR-4 the ordered procedure or LOINC 34534-8 "12
    lead EKG panel"; OBR-7 and OBX-14 ``observed`` (the recording), MSH-7 and
    OBR-22 ``timestamp`` (when the result was made; ``observed`` when not given --
    one of the two is needed, the clock is never read); OBR-25 and OBX-11
    ``result_status`` (table 0085). OBX: NM, 8867-4^Heart rate^LN, the rate rounded
    to a whole number, ``/min^/min^UCUM``. MSH-10 is ``control_id``, else derived
    from the content (``ECG`` + 17 hex digits), so a re-run sends the same message.
    """
    if not 0 < heart_rate_bpm < 400:
        raise EcgError(f"heart rate {heart_rate_bpm} /min is not plausible")
    if result_status not in HL7_STATUS:
        raise EcgError(f"result status {result_status!r} is not in HL7 table 0085")
    made = timestamp or observed
    if made is None:
        raise EcgError("the ORU needs the recording time or the result time (MSH-7)")
    when = _ts(observed) if observed else ""
    if not control_id:
        content = f"{order.to_json().decode()}|{round(heart_rate_bpm)}|{when}|{_ts(made)}"
        control_id = "ECG" + hashlib.sha256(content.encode()).hexdigest()[:17]
    o = order
    name = [*o.patient_name.split("^"), "", "", "", "", ""][:5]
    service = (
        (o.procedure_code, o.procedure_text, o.procedure_scheme or "L")
        if o.procedure_code
        else ECG_PANEL
    )
    lines = [
        _seg(
            "MSH",
            "^~\\&",
            _comp(sending_app),
            _comp(sending_facility),
            _comp(receiving_app),
            _comp(receiving_facility),
            _ts(made),
            "",
            "ORU^R01^ORU_R01",
            _esc(control_id),
            "P",
            "2.5.1",
            *[""] * 5,
            "UNICODE UTF-8",
        ),
        _seg(
            "PID",
            "1",
            "",
            _comp(o.patient_id, "", "", o.patient_id_issuer) if o.patient_id else '""',
            "",
            _comp(name[0], name[1], name[2], name[4], name[3]) if o.patient_name else '""',
            "",
            _esc(o.birth_date),
            _esc(o.sex),
        ),
        _seg("ORC", "RE", _comp(o.placer_order), _comp(o.accession)),
        _seg(
            "OBR",
            "1",
            _comp(o.placer_order),
            _comp(o.accession),
            _comp(*service),
            "",
            "",
            when,
            *[""] * 14,
            _ts(made),
            "",
            "",
            result_status,
        ),
        _seg(
            "OBX",
            "1",
            "NM",
            _ce(*HEART_RATE),
            "",
            str(round(heart_rate_bpm)),
            _ce(*PER_MINUTE),
            "",
            "",
            "",
            "",
            result_status,
            "",
            "",
            when,
        ),
    ]
    return ("\r".join(lines) + "\r").encode("utf-8")
