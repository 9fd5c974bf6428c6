"""Digitized film: PNG/TIFF/JPEG scans (made here with PIL, and the NIH chest PNGs) ->
Multi-frame Grayscale Byte/Word SC, read back with pydicom and checked with dciodvfy."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom.film import (
    MF_GRAYSCALE_BYTE_SC,
    MF_GRAYSCALE_WORD_SC,
    FilmError,
    ScanImage,
    crop_border,
    film_sc,
    read_scan,
    stretch_levels,
    study_uid_for,
)
from gateway.errors import PermanentError
from gateway.orders import Order

DCIODVFY = shutil.which("dciodvfy")
CXR = Path(__file__).resolve().parents[2] / "shared" / "samples" / "cxr"
CREATED = datetime(2024, 3, 5, 14, 30, 15, tzinfo=timezone(timedelta(hours=7)))
ORDER = Order(
    control="new",
    accession="ACC-2024-001",
    patient_id="PID123",
    patient_id_issuer="HOSP",
    patient_name="Nguyễn^Văn^An",
    birth_date="19700102",
    sex="M",
    procedure_text="Chest X-ray (film)",
    referring_physician="Trần^Bình",
    study_uid="1.2.826.0.1.3680043.8.498.1",
)


def encode(array: np.ndarray, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **params)
    return out.getvalue()


def film(shape: tuple[int, int] = (64, 48), *, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A noisy gradient that uses most of the range (a film-like picture)."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    ramp = np.linspace(0.1, 0.9, shape[1])[None, :] * np.linspace(0.5, 1.0, shape[0])[:, None]
    values = ramp * top + rng.normal(0, top * 0.02, shape)
    return np.clip(np.rint(values), 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def validate(tmp_path: Path, data: bytes, name: str = "film.dcm") -> str:
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
    """dciodvfy's warnings, less the DICOMDIR ones (empty type 2 Study ID and the like)."""
    return [w for w in report.splitlines() if w.startswith("Warning") and "DICOMDIR" not in w]


# ------------------------------------------------------------------------------ inputs

GRAY8 = film()
GRAY16 = film(bits=16, seed=1)
GRAY12 = film(bits=12, seed=2)  # 12-bit data in 16-bit samples, as many scanners write
RGB = np.stack([GRAY8, np.roll(GRAY8, 3, axis=1), 255 - GRAY8], axis=2)


def rgb_luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


CASES = {
    "png-8": (encode(GRAY8, "PNG"), GRAY8, MF_GRAYSCALE_BYTE_SC),
    "png-16": (encode(GRAY16, "PNG"), GRAY16, MF_GRAYSCALE_WORD_SC),
    "png-12-in-16": (encode(GRAY12, "PNG"), GRAY12, MF_GRAYSCALE_WORD_SC),
    "tiff-16": (encode(GRAY16, "TIFF"), GRAY16, MF_GRAYSCALE_WORD_SC),
    "tiff-16-lzw": (
        encode(GRAY16, "TIFF", compression="tiff_lzw"),
        GRAY16,
        MF_GRAYSCALE_WORD_SC,
    ),
    "tiff-8": (encode(GRAY8, "TIFF"), GRAY8, MF_GRAYSCALE_BYTE_SC),
    "rgb-png": (encode(RGB, "PNG"), rgb_luma(RGB), MF_GRAYSCALE_BYTE_SC),
    "gray-as-rgb-png": (
        encode(np.repeat(GRAY8[..., None], 3, axis=2), "PNG"),
        GRAY8,
        MF_GRAYSCALE_BYTE_SC,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lossless_scan_becomes_valid_sc_with_the_same_pixels(tmp_path: Path, case: str) -> None:
    data, expected, sop_class = CASES[case]
    scan = read_scan(data)
    sc = film_sc(scan, ORDER, dpi=300.0, body_part="CHEST", created=CREATED)
    report = validate(tmp_path, sc)
    assert not warnings_of(report), report
    ds = read(sc)
    assert ds.SOPClassUID == sop_class
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.pixel_array.dtype == expected.dtype
    assert np.array_equal(ds.pixel_array, expected)
    assert int(ds.NumberOfFrames) == 1
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    bits = 16 if expected.dtype == np.uint16 else 8
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (bits, bits, bits - 1)
    assert ds.PixelRepresentation == 0
    assert ds.ConversionType == "DF"
    assert ds.PresentationLUTShape == "IDENTITY"
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (0.0, 1.0)
    assert ds.LossyImageCompression == "00"
    assert ds.ImageType == ["DERIVED", "SECONDARY"]


def test_jpeg_equals_pils_decode_and_is_marked_lossy(tmp_path: Path) -> None:
    data = encode(GRAY8, "JPEG", quality=90)
    sc = film_sc(read_scan(data), ORDER, dpi=150.0, body_part="CHEST")
    validate(tmp_path, sc)
    ds = read(sc)
    assert ds.SOPClassUID == MF_GRAYSCALE_BYTE_SC
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(ds.pixel_array, decoded)
    assert not np.array_equal(decoded, GRAY8)  # it is lossy: the test means something
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")


def test_camera_mpo_jpeg_uses_the_main_picture() -> None:
    """Phones write MPO: the main JPEG followed by preview pictures."""
    out = io.BytesIO()
    main, preview = Image.fromarray(GRAY8), Image.fromarray(GRAY8[:16, :16])
    main.save(out, "MPO", save_all=True, append_images=[preview])
    scan = read_scan(out.getvalue())
    assert (scan.format, scan.lossy, scan.pixels.shape) == ("JPEG", True, GRAY8.shape)
    with Image.open(io.BytesIO(out.getvalue())) as image:
        assert np.array_equal(scan.pixels, np.asarray(image))


def test_colour_jpeg_is_luma_of_pils_decode(tmp_path: Path) -> None:
    data = encode(RGB, "JPEG", quality=95)
    scan = read_scan(data)
    validate(tmp_path, film_sc(scan, None, dpi=200.0))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert np.array_equal(scan.pixels, expected)
    assert "luma" in " ".join(scan.changes)


def test_16bit_window_covers_the_values() -> None:
    ds = read(film_sc(read_scan(encode(GRAY12, "PNG")), None, dpi=300.0))
    low, high = int(GRAY12.min()), int(GRAY12.max())
    assert float(ds.WindowWidth) == high - low + 1
    assert float(ds.WindowCenter) == pytest.approx((low + high + 1) / 2)
    assert "WindowCenter" not in read(film_sc(read_scan(encode(GRAY8, "PNG")), None, dpi=300.0))


# ------------------------------------------------------------------------------ real films


def cxr(name: str) -> bytes:
    path = CXR / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path.read_bytes()


@pytest.mark.parametrize("name", ["00000075_000.png", "00000100_000.png"], ids=["L", "RGBA"])
def test_nih_chest_films(tmp_path: Path, name: str) -> None:
    data = cxr(name)
    scan = read_scan(data)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image)[..., 0] if image.mode == "RGBA" else np.asarray(image)
    assert np.array_equal(scan.pixels, expected)  # RGBA with equal channels: taken as is
    sc = film_sc(scan, ORDER, dpi=72.0, modality="RG", body_part="CHEST", burned_in_label=True)
    report = validate(tmp_path, sc)
    assert not warnings_of(report), report
    ds = read(sc)
    assert np.array_equal(ds.pixel_array, expected)
    assert (ds.Modality, ds.BodyPartExamined, ds.BurnedInAnnotation) == ("RG", "CHEST", "YES")
    assert "Laterality" not in ds  # unpaired body part


# ------------------------------------------------------------------------------ attributes


def test_nominal_scanned_pixel_spacing_from_dpi() -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    ds = read(film_sc(scan, None, dpi=300.0))
    assert [float(v) for v in ds.NominalScannedPixelSpacing] == pytest.approx([25.4 / 300] * 2)
    ds = read(film_sc(scan, None, dpi=(200.0, 400.0)))  # horizontal, vertical
    assert [float(v) for v in ds.NominalScannedPixelSpacing] == pytest.approx([0.0635, 0.127])
    assert "PixelSpacing" not in ds
    for bad in (0.0, 5.0, 20_000.0):
        with pytest.raises(FilmError, match="dpi"):
            film_sc(scan, None, dpi=bad)


def test_file_dpi_is_reported_not_used() -> None:
    scan = read_scan(encode(GRAY8, "PNG", dpi=(300, 300)))
    assert scan.dpi == (300.0, 300.0)
    assert read_scan(encode(GRAY8, "TIFF", dpi=(600, 600))).dpi == (600.0, 600.0)
    assert read_scan(encode(GRAY8, "PNG")).dpi is None


def test_patient_and_study_from_the_order(tmp_path: Path) -> None:
    sc = film_sc(read_scan(encode(GRAY8, "PNG")), ORDER, dpi=300.0, created=CREATED)
    validate(tmp_path, sc)
    ds = read(sc)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Nguyễn^Văn^An"
    assert (ds.PatientID, ds.IssuerOfPatientID) == ("PID123", "HOSP")
    assert (ds.PatientBirthDate, ds.PatientSex) == ("19700102", "M")
    assert ds.AccessionNumber == "ACC-2024-001"
    assert str(ds.ReferringPhysicianName) == "Trần^Bình"
    assert ds.StudyDescription == "Chest X-ray (film)"
    assert ds.StudyInstanceUID == ORDER.study_uid
    assert (ds.StudyDate, ds.StudyTime) == ("20240305", "143015")
    assert (ds.ContentDate, ds.ContentTime) == ("20240305", "143015")
    assert (ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture) == ("20240305", "143015")
    assert ds.TimezoneOffsetFromUTC == "+0700"
    assert ds.SeriesDescription == "Digitized film"
    assert ds.Modality == "OT"


def test_without_order_or_time_type2_attributes_are_empty(tmp_path: Path) -> None:
    sc = film_sc(read_scan(encode(GRAY8, "PNG")), None, dpi=300.0)
    validate(tmp_path, sc)
    ds = read(sc)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert ds[keyword].value in ("", None), keyword
    assert ds.StudyDate == ds.StudyTime == ""
    assert "ContentDate" not in ds and "DateOfSecondaryCapture" not in ds
    assert ds.Laterality == ""  # body part unknown: laterality unknown


def test_bad_order_values_are_left_empty() -> None:
    order = ORDER.model_copy(update={"birth_date": "1970", "sex": "X"})
    ds = read(film_sc(read_scan(encode(GRAY8, "PNG")), order, dpi=300.0))
    assert ds.PatientBirthDate == ds.PatientSex == ""


def test_study_uid_given_then_order_then_derived() -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    assert read(film_sc(scan, ORDER, dpi=300.0, study_uid="1.2.3")).StudyInstanceUID == "1.2.3"
    plain = ORDER.model_copy(update={"study_uid": ""})
    derived = read(film_sc(scan, plain, dpi=300.0)).StudyInstanceUID
    assert derived == study_uid_for(plain, None, "whatever")  # the ECG of the order uses it too
    other = read(film_sc(read_scan(encode(GRAY16, "PNG")), plain, dpi=300.0))
    assert other.StudyInstanceUID == derived
    alone = read(film_sc(scan, None, dpi=300.0)).StudyInstanceUID
    assert alone not in {derived, ORDER.study_uid}


def test_same_inputs_same_bytes_new_uids_per_film() -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    first = film_sc(scan, ORDER, dpi=300.0, created=CREATED)
    assert film_sc(read_scan(encode(GRAY8, "PNG")), ORDER, dpi=300.0, created=CREATED) == first
    a = read(first)
    b = read(film_sc(read_scan(encode(GRAY16, "PNG")), ORDER, dpi=300.0, created=CREATED))
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID  # the films of one order: one series
    assert a.StudyInstanceUID == b.StudyInstanceUID
    labelled = read(film_sc(scan, ORDER, dpi=300.0, created=CREATED, burned_in_label=True))
    assert labelled.SOPInstanceUID != a.SOPInstanceUID
    assert (a.BurnedInAnnotation, labelled.BurnedInAnnotation) == ("NO", "YES")
    given = read(film_sc(scan, ORDER, dpi=300.0, series_uid="1.2.3.4", instance_uid="1.2.3.5"))
    assert (given.SeriesInstanceUID, given.SOPInstanceUID) == ("1.2.3.4", "1.2.3.5")
    assert given.file_meta.MediaStorageSOPInstanceUID == "1.2.3.5"


@pytest.mark.parametrize(
    ("modality", "body_part", "laterality", "expected"),
    [
        ("CR", "CHEST", "", None),
        ("DX", "HAND", "R", "R"),
        ("RG", "KNEE", "", ""),
        ("OT", "", "L", "L"),
    ],
)
def test_modality_body_part_laterality(
    tmp_path: Path, modality: str, body_part: str, laterality: str, expected: str | None
) -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    sc = film_sc(
        scan, ORDER, dpi=300.0, modality=modality, body_part=body_part, laterality=laterality
    )
    validate(tmp_path, sc)
    ds = read(sc)
    assert ds.Modality == modality
    assert ds.get("Laterality") == expected


def test_bad_codes_are_refused() -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    signed = ScanImage(GRAY8.astype(np.int16), "0" * 64, "PNG", "I")
    with pytest.raises(FilmError, match="uint8 or uint16"):
        film_sc(signed, None, dpi=300.0)
    with pytest.raises(FilmError, match="laterality"):
        film_sc(scan, None, dpi=300.0, laterality="both")
    with pytest.raises(FilmError, match="modality"):
        film_sc(scan, None, dpi=300.0, modality="x-ray film")
    with pytest.raises(FilmError, match="conversion type"):
        film_sc(scan, None, dpi=300.0, conversion_type="XX")


# ------------------------------------------------------------------------------ orientation

ORIENTATIONS = range(1, 9)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_exif_orientation_is_applied_like_pil(orientation: int) -> None:
    picture = film((30, 20), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(picture, "PNG", exif=exif.tobytes())
    scan = read_scan(data)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image))
    assert np.array_equal(scan.pixels, expected)
    assert any("EXIF" in c for c in scan.changes) == (orientation != 1)


def test_orientation_kept_as_stored_and_turned_dpi_swaps() -> None:
    tall = film((40, 10))
    scan = read_scan(encode(tall, "TIFF", dpi=(100, 200)))
    assert scan.pixels.shape == (40, 10) and np.array_equal(scan.pixels, tall)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held sideways: shown turned 90 degrees clockwise
    turned = read_scan(encode(tall, "JPEG", exif=exif.tobytes(), dpi=(100, 200)))
    assert turned.pixels.shape == (10, 40)
    assert turned.dpi == (200.0, 100.0)
    ds = read(film_sc(turned, None, dpi=(200.0, 100.0)))
    assert "EXIF orientation 6" in ds.DerivationDescription


# ------------------------------------------------------------------------------ auto-crop, levels


def framed(inner: np.ndarray, *, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """``inner`` with a bright scanner border above and below, a dark one at the sides."""
    out = np.pad(inner, ((top, bottom), (0, 0)), constant_values=250)
    return np.pad(out, ((0, 0), (left, right)), constant_values=3)


def test_crop_border_finds_the_film() -> None:
    inner = film((50, 100))
    picture = framed(inner, top=7, bottom=3, left=5, right=9)
    picture[2, 50] = 0  # a speck of dust in the border does not stop the crop
    cropped, box = crop_border(picture)
    assert box == (7, 57, 5, 105)
    assert np.array_equal(cropped, inner)


def test_crop_border_leaves_films_without_border() -> None:
    picture = film((50, 40))
    cropped, box = crop_border(picture)
    assert box == (0, 50, 0, 40) and cropped is picture
    flat = np.full((10, 10), 7, dtype=np.uint8)
    assert crop_border(flat)[1] == (0, 10, 0, 10)


def test_auto_crop_in_film_sc(tmp_path: Path) -> None:
    inner = film((50, 40))
    scan = read_scan(encode(framed(inner, top=7, bottom=3, left=5, right=9), "PNG"))
    plain = read(film_sc(scan, None, dpi=300.0))
    assert (plain.Rows, plain.Columns) == (60, 54)  # off by default
    sc = film_sc(scan, None, dpi=300.0, auto_crop=True)
    validate(tmp_path, sc)
    ds = read(sc)
    assert np.array_equal(ds.pixel_array, inner)
    assert "rows 7:57, columns 5:45" in ds.DerivationDescription
    assert ds.SOPInstanceUID != plain.SOPInstanceUID


def test_stretch_levels_8_and_16_bit() -> None:
    rng = np.random.default_rng(4)
    dull = rng.integers(100, 151, (60, 60)).astype(np.uint8)
    out, (low, high) = stretch_levels(dull)
    assert out.dtype == np.uint8
    assert (low, high) == (float(np.percentile(dull, 1)), float(np.percentile(dull, 99)))
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel()[np.argsort(dull.ravel(), kind="stable")].astype(int)) >= 0)
    wide, _ = stretch_levels(GRAY12)
    assert wide.dtype == np.uint16 and wide.max() == 65535 and wide.min() == 0
    flat = np.full((5, 5), 9, dtype=np.uint8)
    assert stretch_levels(flat)[0] is flat


def test_auto_levels_in_film_sc(tmp_path: Path) -> None:
    scan = read_scan(encode(GRAY12, "TIFF"))
    sc = film_sc(scan, None, dpi=300.0, auto_levels=True)
    validate(tmp_path, sc)
    ds = read(sc)
    assert np.array_equal(ds.pixel_array, stretch_levels(GRAY12)[0])
    assert "levels stretched" in ds.DerivationDescription
    assert np.array_equal(read(film_sc(scan, None, dpi=300.0)).pixel_array, GRAY12)


# ------------------------------------------------------------------------------ refused


def png_16bit_rgb() -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one; Pillow reads it as 8-bit RGB)."""
    rows = b"".join(b"\x00" + bytes(range(24)) for _ in range(2))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 4, 2, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def multipage_tiff() -> bytes:
    out = io.BytesIO()
    first, second = Image.fromarray(GRAY8), Image.fromarray(GRAY8)
    first.save(out, "TIFF", save_all=True, append_images=[second])
    return out.getvalue()


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(RGB).convert("CMYK").save(out, "JPEG")
    return out.getvalue()


def transparent_png() -> bytes:
    rgba = np.dstack([RGB, np.full(GRAY8.shape, 255, np.uint8)])
    rgba[0, 0, 3] = 0
    return encode(rgba, "PNG")


REFUSED = {
    "garbage": (b"this is not an image", "not a readable image"),
    "empty": (b"", "not a readable image"),
    "truncated-png": (encode(GRAY8, "PNG")[:200], "corrupt or truncated PNG"),
    "truncated-jpeg": (encode(GRAY8, "JPEG")[:300], "corrupt or truncated JPEG"),
    "gif": (encode(GRAY8, "GIF"), "GIF files are not accepted"),
    "bmp": (encode(GRAY8, "BMP"), "BMP files are not accepted"),
    "bilevel": (encode(GRAY8 > 128, "PNG"), "mode 1"),
    "float-tiff": (encode(GRAY8.astype(np.float32), "TIFF"), "mode F"),
    "cmyk-jpeg": (cmyk_jpeg(), "mode CMYK"),
    "transparent": (transparent_png(), "transparent"),
    "16bit-rgb-png": (png_16bit_rgb(), "16-bit colour PNG"),
    "multipage-tiff": (multipage_tiff(), "2 pages"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_reason(case: str) -> None:
    data, reason = REFUSED[case]
    with pytest.raises(FilmError, match=reason) as caught:
        read_scan(data)
    assert isinstance(caught.value, PermanentError)
    assert isinstance(caught.value, ValueError)


def test_scan_is_read_only() -> None:
    scan = read_scan(encode(GRAY8, "PNG"))
    assert isinstance(scan, ScanImage)
    with pytest.raises(ValueError, match="read-only"):
        scan.pixels[0, 0] = 1
    assert scan.sha256 == read_scan(encode(GRAY8, "PNG")).sha256
    assert (scan.format, scan.mode, scan.bits, scan.lossy) == ("PNG", "L", 8, False)


def test_created_naive_time_has_no_offset() -> None:
    naive = datetime(2024, 1, 2, 3, 4, 5)  # a local clock reading, no zone
    ds = read(film_sc(read_scan(encode(GRAY8, "PNG")), None, dpi=300.0, created=naive))
    assert (ds.ContentDate, ds.ContentTime) == ("20240102", "030405")
    assert "TimezoneOffsetFromUTC" not in ds
    utc = read(
        film_sc(read_scan(encode(GRAY8, "PNG")), None, dpi=300.0, created=CREATED.astimezone(UTC))
    )
    assert utc.TimezoneOffsetFromUTC == "+0000"
