"""Digitized film: a scanned radiograph (PNG, TIFF, JPEG) as a Multi-frame Grayscale SC image.

:func:`read_scan` decodes the scanner's file into a :class:`ScanImage` (2-D
``uint8`` or ``uint16``); :func:`film_sc` builds the DICOM object from it and,
when there is one, the order the film belongs to.

IOD: Multi-frame Grayscale Byte SC Image (PS3.3 A.8.3, SOP Class
1.2.840.10008.5.1.4.1.1.7.2) for 8-bit scans, Multi-frame Grayscale Word SC
Image (PS3.3 A.8.4, 1.2.840.10008.5.1.4.1.1.7.3) for 16-bit ones, one frame.
Not the single-frame SC (A.8.1, which the standard no longer recommends for new
objects) and not DX (A.26), whose acquisition attributes (exposure, detector,
imager pixel spacing) a scan of a film does not have. Modules and what fills them:

- Patient (C.7.1.1), General Study (C.7.2.1): from the :class:`~gateway.orders.Order`
  (name, id, issuer, birth date, sex, accession, referring physician, the
  procedure text as Study Description); empty where there is no order (type 2).
  Study Instance UID: the one given, else the order's, else derived from the
  accession and patient id (so that a film and a paper ECG of one order share it),
  else from the scan. A caller that matched the order in the worklist
  (:meth:`dicom.worklist.WorklistStore.items` by accession) passes the item's
  ``study_uid``: the store keeps one for orders that carry none.
- General Series (C.7.3.1): Modality ``OT`` unless the site says which modality
  made the film; SC Equipment (C.8.6.1) says that (0008,0060) is the *source*
  equipment, so ``RG`` (film/screen radiography), ``CR`` or ``DX`` are honest
  choices for a plain radiograph, and they let AI triage cards whose applies-to
  rules name a modality see the film. Body Part Examined if given (``CHEST`` lets
  chest triage cards see it); Laterality R/L if given, absent for an unpaired body
  part (:data:`UNPAIRED_BODY_PARTS`) and for an ECG printout, empty ("unknown")
  otherwise (type 2C).
- SC Equipment (C.8.6.1): Conversion Type ``DF`` (digitized film); a scanned paper
  document (the printout of an ECG) is ``SD``.
- General Image (C.7.6.1): Image Type ``DERIVED\\SECONDARY``, Patient Orientation
  empty (type 2: a scan does not say which way the patient faced), Burned In
  Annotation ``YES`` when the caller says the film carries a label (name plate,
  markers with text) else ``NO``, Lossy Image Compression ``01`` when the file was
  JPEG, Derivation Description naming every change made to the pixels.
- Image Pixel (C.7.6.3): MONOCHROME2, Bits Allocated 8 / Bits Stored 8 or Bits
  Allocated 16 / Bits Stored 16 -- the file's sample depth, never guessed from the
  values (a scanner that writes 12-bit data in 16-bit samples gets a window, below).
- Multi-frame (C.7.6.6): Number of Frames 1.
- SC Image (C.8.6.2) and SC Multi-frame Image (C.8.6.3): Nominal Scanned Pixel
  Spacing = 25.4 / dpi mm (row spacing from the vertical dpi, column spacing from
  the horizontal one), Presentation LUT Shape IDENTITY, Rescale 0 / 1 / US.
  Pixel Spacing is left out: a scan knows the film's scale, not the patient's
  (the projection magnifies), and PS3.3 A.8.1.3 keeps the two apart.
- VOI LUT (C.11.2): for 16-bit scans a window over the values present, so that
  a viewer does not show 12-bit data in a 16-bit range as black.
- SOP Common (C.12.1): Specific Character Set ISO_IR 192 (UTF-8 names).

Orientation: the pixels are stored the way the file asks to be shown. A file
with an EXIF/TIFF Orientation tag (a phone photo of a light box, a scanner that
writes one) is turned as its tag says -- every image viewer shows it that way, so
that is the orientation the operator saw; film scanners write none (or 1), which
leaves the pixels as stored. Nothing else turns or flips the film.

Colour: RGB(A), palette and gray+alpha files become gray: when the three
channels are equal everywhere (gray stored as colour, as some scanners and the
NIH PNGs do) the first channel is taken as is; otherwise ITU-R BT.601 luma with
Pillow's integer rounding, ``(19595 R + 38470 G + 7471 B + 32768) >> 16``. Alpha
must be opaque everywhere (a scan has no transparency). Other modes -- 1-bit,
CMYK, 32-bit float, 16-bit colour (which Pillow would silently reduce to 8
bits) -- are refused with :class:`FilmError`.

Optional steps, off by default (they change the pixels and the description says
so): :func:`crop_border` removes the uniform border a scanner leaves around the
film, :func:`stretch_levels` stretches the 1st..99th percentile to the full range.

Explicit VR Little Endian, uncompressed. The bytes depend only on the inputs: UIDs
derive from the scan's sha256 and the arguments, times come from ``created``.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from gateway.errors import PermanentError
from gateway.orders import Order

MF_GRAYSCALE_BYTE_SC: Final = "1.2.840.10008.5.1.4.1.1.7.2"
MF_GRAYSCALE_WORD_SC: Final = "1.2.840.10008.5.1.4.1.1.7.3"
FILM_SERIES_NUMBER: Final = 9801
UTF8: Final = "ISO_IR 192"
FORMATS: Final = frozenset({"PNG", "TIFF", "JPEG"})
# Conversion Type (0008,0064), PS3.3 C.8.6.1.1
CONVERSION_TYPES: Final = frozenset({"DV", "DI", "DF", "WSD", "SD", "SI", "DRW", "SYN"})
MIN_DPI, MAX_DPI = 10.0, 10_000.0
_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_DATE = re.compile(r"^\d{8}$")
# Body Part Examined terms (PS3.16 Annex L) of unpaired parts, as dciodvfy knows them:
# General Series Laterality (C.7.3.1, type 2C) is absent for these, R/L/empty otherwise.
UNPAIRED_BODY_PARTS: Final = frozenset(
    [
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BLADDER",
        "BRAIN",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "COCCYX",
        "COLON",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "ESOPHAGUS",
        "FACE",
        "HEAD",
        "HEADNECK",
        "HEART",
        "JAW",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PROSTATE",
        "RECTUM",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "THYROID",
        "TLSPINE",
        "TRACHEA",
        "TSPINE",
        "UTERUS",
        "WHOLEBODY",
    ]
)
# electrophysiology modalities: no body part, so no Laterality either (the scan of an ECG)
NO_LATERALITY_MODALITIES: Final = frozenset({"ECG", "EPS", "RESP"})

# EXIF/TIFF Orientation (tag 0x0112) -> numpy steps that show the image as tagged
_ORIENT: Final[dict[int, str]] = {
    2: "flip-lr",
    3: "rot180",
    4: "flip-ud",
    5: "transpose",
    6: "rot90cw",
    7: "transverse",
    8: "rot90ccw",
}


class FilmError(PermanentError, ValueError):
    """The file cannot become a film image (format, mode, content); retrying cannot help."""


@dataclass(frozen=True)
class ScanImage:
    """A decoded scan: ``pixels`` 2-D ``uint8`` or ``uint16`` (read-only), rows first."""

    pixels: np.ndarray
    sha256: str  # of the file's bytes
    format: str  # PNG, TIFF or JPEG
    mode: str  # Pillow's mode of the file (L, I;16, RGB, ...)
    dpi: tuple[float, float] | None = None  # (horizontal, vertical) as the file says
    lossy: bool = False  # JPEG-compressed data (a JPEG file, a JPEG-in-TIFF)
    changes: tuple[str, ...] = field(default=())  # conversions read_scan made

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


# ---------------------------------------------------------------------------- reading


def read_scan(data: bytes) -> ScanImage:
    """Decode a PNG, TIFF or JPEG scan into gray pixels (see the module docstring)."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError as err:  # its text names a memory address: not shown
        raise FilmError(
            f"not a readable image ({len(data)} bytes; PNG, TIFF or JPEG expected)"
        ) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise FilmError(f"image too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise FilmError(f"corrupt or truncated {_kind(data)} file: {err}") from err
    with image:
        # MPO: a camera's JPEG with preview pictures after the main one (frame 0, loaded)
        fmt = "JPEG" if image.format == "MPO" else str(image.format)
        if fmt not in FORMATS:
            raise FilmError(f"{image.format} files are not accepted; send PNG, TIFF or JPEG")
        pages = int(getattr(image, "n_frames", 1))
        if pages != 1 and image.format != "MPO":
            raise FilmError(f"{image.format} with {pages} pages: send one film per file")
        mode = image.mode
        _refuse_16bit_colour(image, data)
        pixels, changes = _gray(image)
        orientation = _orientation(image)
        dpi = _dpi(image)
        lossy = fmt == "JPEG" or str(image.info.get("compression", "")) in {"jpeg", "tiff_jpeg"}
    if orientation in _ORIENT:
        pixels = _orient(pixels, orientation)
        changes = (*changes, f"EXIF orientation {orientation} applied ({_ORIENT[orientation]})")
        if orientation in {5, 6, 7, 8} and dpi is not None:
            dpi = (dpi[1], dpi[0])
    if pixels.size == 0:
        raise FilmError("the image has no pixels")
    pixels = np.ascontiguousarray(pixels)
    pixels.setflags(write=False)
    return ScanImage(pixels, digest, fmt, mode, dpi, lossy, changes)


def _kind(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "PNG"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    return "image"


def _refuse_16bit_colour(image: Image.Image, data: bytes) -> None:
    """Pillow decodes 16-bit colour PNG and TIFF to 8 bits without a word: refuse them."""
    if image.mode not in {"RGB", "RGBA", "LA", "P", "PA"}:
        return
    if image.format == "PNG" and len(data) > 24 and data[12:16] == b"IHDR" and data[24] == 16:
        raise FilmError("16-bit colour PNG: export the scan as 16-bit grayscale")
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258, (8,))
        if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
            raise FilmError("16-bit colour TIFF: export the scan as 16-bit grayscale")


def _gray(image: Image.Image) -> tuple[np.ndarray, tuple[str, ...]]:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8), ()
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), ()
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise FilmError("32-bit integer image with values outside 0..65535")
        return values.astype(np.uint16), ()
    if mode in {"P", "PA"}:
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in {"LA", "RGB", "RGBA"}:
        values = np.asarray(image, dtype=np.uint8)
        if mode in {"LA", "RGBA"}:
            if values[..., -1].min() < 255:
                raise FilmError(f"{mode} image with transparent pixels: a scan has none")
            values = values[..., :-1]
        if values.shape[-1] == 1:
            return values[..., 0], (f"{image.mode}: alpha (opaque) dropped",)
        return _luma(values, image.mode)
    raise FilmError(f"image mode {mode} is not a film scan: send 8- or 16-bit grayscale (or RGB)")


def _luma(rgb: np.ndarray, mode: str) -> tuple[np.ndarray, tuple[str, ...]]:
    red, green, blue = (rgb[..., i] for i in range(3))
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return red.copy(), (f"{mode} with equal channels: first channel taken",)
    luma = (
        red.astype(np.uint32) * 19595
        + green.astype(np.uint32) * 38470
        + blue.astype(np.uint32) * 7471
        + 0x8000
    ) >> 16
    return luma.astype(np.uint8), (f"{mode} to gray: ITU-R BT.601 luma",)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: show as stored
        return 1
    return value if isinstance(value, int) else 1


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned as EXIF orientation 2..8 asks (as Pillow's exif_transpose)."""
    steps: dict[int, np.ndarray] = {
        2: pixels[:, ::-1],
        3: pixels[::-1, ::-1],
        4: pixels[::-1, :],
        5: pixels.T,
        6: np.rot90(pixels, -1),
        7: pixels[::-1, ::-1].T,
        8: np.rot90(pixels, 1),
    }
    return steps[orientation]


def _dpi(image: Image.Image) -> tuple[float, float] | None:
    """The file's resolution, or None where it says nothing (or 1 dpi: no unit)."""
    dpi = image.info.get("dpi")
    if not isinstance(dpi, tuple) or len(dpi) != 2:
        return None
    try:
        x, y = (round(float(v), 1) for v in dpi)
    except (TypeError, ValueError):
        return None
    return (x, y) if x > 1 and y > 1 else None


# ---------------------------------------------------------------------------- optional steps


def crop_border(
    pixels: np.ndarray, *, tolerance: float = 0.04, coverage: float = 0.98
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Remove the uniform border around a film: ``(cropped, (top, bottom, left, right))``.

    Each side has its own border level, the median of its outermost line (a
    light box above the film and a dark scanner lid beside it are both borders).
    The outermost line of a side, within what the other sides have left, is
    border while at least ``coverage`` of its pixels lie within ``tolerance`` x
    (max - min of the image) of that side's level; border lines are removed, side
    after side, until no side has one (so the corners where two borders meet go
    too). A side whose outermost line is not uniform keeps everything; an image
    that is all border is returned whole. The result is a view of ``pixels``
    (rows ``top:bottom``, columns ``left:right``).
    """
    rows, cols = pixels.shape
    values = pixels.astype(np.float64)
    whole = (0, rows, 0, cols)
    span = float(values.max() - values.min()) if values.size else 0.0
    if span == 0.0:
        return pixels, whole
    tol = tolerance * span
    levels = [
        float(np.median(line)) for line in (values[0], values[-1], values[:, 0], values[:, -1])
    ]
    box = list(whole)  # top, bottom, left, right

    def outer(side: int) -> np.ndarray:
        top, bottom, left, right = box
        return (
            values[top, left:right],
            values[bottom - 1, left:right],
            values[top:bottom, left],
            values[top:bottom, right - 1],
        )[side]

    changed = True
    while changed:
        changed = False
        for side, step in enumerate((1, -1, 1, -1)):
            while box[0] < box[1] and box[2] < box[3]:
                near = np.abs(outer(side) - levels[side]) <= tol
                if near.mean() < coverage:
                    break
                box[side] += step
                changed = True
    top, bottom, left, right = box
    if top >= bottom or left >= right or (top, bottom, left, right) == whole:
        return pixels, whole
    return pixels[top:bottom, left:right], (top, bottom, left, right)


def stretch_levels(
    pixels: np.ndarray, *, low: float = 1.0, high: float = 99.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Stretch the ``low``..``high`` percentile to the dtype's full range (clipped).

    Returns the new pixels (same dtype) and the two percentile values; a flat
    image is returned unchanged.
    """
    top = float(np.iinfo(pixels.dtype).max)
    lo, hi = (float(v) for v in np.percentile(pixels, [low, high]))
    if hi <= lo:
        return pixels, (lo, hi)
    scaled = (pixels.astype(np.float64) - lo) * (top / (hi - lo))
    out = np.clip(np.rint(scaled), 0.0, top).astype(pixels.dtype)
    return out, (lo, hi)


# ---------------------------------------------------------------------------- DICOM


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["medgw-film", *parts]))


def study_uid_for(order: Order | None, study_uid: str | None, fallback: str) -> str:
    """The Study Instance UID: given, else the order's, else derived from the order's
    accession and patient, else from ``fallback`` (what the object is made from)."""
    if study_uid:
        return study_uid
    if order is not None and order.study_uid:
        return order.study_uid
    if order is not None:
        return str(generate_uid(entropy_srcs=["medgw-study", order.accession, order.patient_id]))
    return _uid("study", fallback)


def patient_study(ds: Dataset, order: Order | None, study_uid: str) -> None:
    """Patient (C.7.1.1) and General Study (C.7.2.1) attributes from the order.

    Type 2 attributes stay present and empty where the order has no value; a birth
    date that is not ``YYYYMMDD`` and a sex other than M, F, O are left empty.
    """
    o = order
    ds.PatientName = o.patient_name if o else ""
    ds.PatientID = o.patient_id if o else ""
    if o and o.patient_id_issuer:
        ds.IssuerOfPatientID = o.patient_id_issuer
    ds.PatientBirthDate = o.birth_date if o and _DATE.match(o.birth_date) else ""
    ds.PatientSex = o.sex if o and o.sex in {"M", "F", "O"} else ""
    ds.StudyInstanceUID = study_uid
    ds.AccessionNumber = o.accession if o else ""
    ds.ReferringPhysicianName = o.referring_physician if o else ""
    ds.StudyID = ""
    if o and o.procedure_text:
        ds.StudyDescription = o.procedure_text


def set_times(ds: Dataset, when: datetime, *keywords: str) -> None:
    """``<kw>Date``/``<kw>Time`` pairs from ``when``, as given (local time); an aware
    time also sets Timezone Offset From UTC (PS3.3 C.12.1.1.8)."""
    for keyword in keywords:
        setattr(ds, f"{keyword}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{keyword}Time", when.strftime("%H%M%S"))
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        ds.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def part10(ds: Dataset) -> bytes:
    """The data set as a DICOM file, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDGW"
    ds.file_meta = meta
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _spacing(dpi: float | tuple[float, float]) -> list[str]:
    """Nominal Scanned Pixel Spacing (row spacing, column spacing) in mm."""
    x, y = (dpi, dpi) if isinstance(dpi, float | int) else dpi
    for value in (x, y):
        if not MIN_DPI <= float(value) <= MAX_DPI:
            raise FilmError(f"scanner resolution {value} dpi is outside {MIN_DPI}..{MAX_DPI}")
    return [format_number_as_ds(25.4 / float(y)), format_number_as_ds(25.4 / float(x))]


def _cs(value: str, what: str) -> str:
    value = value.strip().upper()
    if not _CS.match(value):
        raise FilmError(f"{what} {value!r} is not a DICOM code string (A-Z 0-9 _, 16 at most)")
    return value


def film_sc(
    scan: ScanImage,
    order: Order | None,
    *,
    dpi: float | tuple[float, float],
    modality: str = "OT",
    body_part: str = "",
    laterality: str = "",
    burned_in_label: bool = False,
    auto_crop: bool = False,
    auto_levels: bool = False,
    conversion_type: str = "DF",
    series_description: str = "Digitized film",
    series_number: int = FILM_SERIES_NUMBER,
    instance_number: int = 1,
    institution: str = "",
    manufacturer: str = "medgw",
    digitizer: str = "",
    created: datetime | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> bytes:
    """The scan as a Multi-frame Grayscale Byte/Word SC image (PS3.3 A.8.3 / A.8.4).

    ``dpi`` is the scanner's resolution (one value, or horizontal and vertical);
    the site's configuration should say it -- ``scan.dpi`` is what the file claims
    and may be a default (72, 96). ``created`` is when the film was digitized
    (Content, Secondary Capture and Instance Creation date and time, and Study
    Date/Time); without it those are empty, never the clock's. The Series
    Instance UID derives from the study and the series description (the films of
    one order share a series), the SOP Instance UID from the scan's sha256 and
    every argument that shapes the object.
    """
    if scan.pixels.ndim != 2 or scan.pixels.dtype not in (np.uint8, np.uint16):
        raise FilmError(f"pixels must be 2-D uint8 or uint16, got {scan.pixels.dtype}")
    conversion = _cs(conversion_type, "conversion type")
    if conversion not in CONVERSION_TYPES:
        raise FilmError(f"conversion type {conversion} is not one of PS3.3 C.8.6.1.1")
    modality = _cs(modality, "modality")
    body = _cs(body_part, "body part") if body_part.strip() else ""
    side = laterality.strip().upper()
    if side not in {"", "R", "L"}:
        raise FilmError(f"laterality {laterality!r} is not R or L")
    spacing = _spacing(dpi)

    pixels = scan.pixels
    derivation = list(scan.changes)
    if auto_crop:
        pixels, (top, bottom, left, right) = crop_border(pixels)
        if (top, bottom, left, right) != (0, scan.pixels.shape[0], 0, scan.pixels.shape[1]):
            derivation.append(f"border cropped to rows {top}:{bottom}, columns {left}:{right}")
    if auto_levels:
        pixels, (lo, hi) = stretch_levels(pixels)
        derivation.append(f"levels stretched: {lo:g}..{hi:g} to full range")
    pixels = np.ascontiguousarray(pixels)
    bits = scan.bits

    study = study_uid_for(order, study_uid, scan.sha256)
    series = series_uid or _uid("series", study, modality, series_description)
    instance = instance_uid or _uid(
        "instance",
        scan.sha256,
        study,
        series,
        repr(spacing),
        modality,
        body,
        side,
        conversion,
        str(burned_in_label),
        str(auto_crop),
        str(auto_levels),
        order.to_json().decode() if order else "",
        created.isoformat() if created else "",
        str(instance_number),
        institution,
        manufacturer,
        digitizer,
        series_description,
    )

    ds = Dataset()
    ds.SpecificCharacterSet = UTF8
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = MF_GRAYSCALE_WORD_SC if bits == 16 else MF_GRAYSCALE_BYTE_SC
    ds.SOPInstanceUID = instance
    ds.StudyDate = ds.StudyTime = ""  # type 2
    if created is not None:
        set_times(ds, created, "Study", "InstanceCreation", "Content")
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.ContentDate, ds.ContentTime
    patient_study(ds, order, study)

    ds.Modality = modality  # C.7.3.1 and C.8.6.1: the source equipment's modality
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    if body:
        ds.BodyPartExamined = body
    if side or (body not in UNPAIRED_BODY_PARTS and modality not in NO_LATERALITY_MODALITIES):
        ds.Laterality = side

    ds.Manufacturer = manufacturer  # General Equipment (C.7.5.1), type 2
    if institution:
        ds.InstitutionName = institution
    ds.ConversionType = conversion  # SC Equipment (C.8.6.1)
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = "medgw film digitizer"
    if digitizer:
        ds.SecondaryCaptureDeviceID = digitizer[:64]

    ds.InstanceNumber = instance_number  # General Image (C.7.6.1)
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES" if burned_in_label else "NO"
    if scan.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"
    source = f"{scan.format} {scan.mode} scan"
    ds.DerivationDescription = "; ".join([source, *derivation])[:1024]

    ds.NominalScannedPixelSpacing = spacing  # SC Multi-frame Image (C.8.6.3)
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"

    ds.SamplesPerPixel = 1  # Image Pixel (C.7.6.3), constrained by A.8.3.4 / A.8.4.4
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1  # Multi-frame (C.7.6.6)
    if bits == 16:
        lo_value, hi_value = int(pixels.min()), int(pixels.max())
        ds.WindowCenter = format_number_as_ds((lo_value + hi_value + 1) / 2)
        ds.WindowWidth = max(1, hi_value - lo_value + 1)
        ds.VOILUTFunction = "LINEAR"
    data = pixels.astype("<u2" if bits == 16 else "u1").tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    return part10(ds)
