"""Preprocessing recipes on real radiographs (pydicom-data's RG1 chest CR) and real
DICOM test files: every transfer syntax gives the same tensor, MONOCHROME1 vs 2, VOI
LUT vs window, 8/12/16-bit inputs, each scaling and resize policy, PNG input."""

from __future__ import annotations

import copy
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ai_models.card import CustomScale, InputSpec, Recipe
from ai_models.preprocess import (
    PreprocessError,
    apply_scale,
    full_range,
    image_from_png,
    invert_if_monochrome1,
    modality_lut,
    percentile_window,
    pixels,
    prepare,
    resize,
    scale_custom,
    scale_imagenet,
    scale_unit,
    scale_xrv,
    voi_window,
    window,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "cxr"
F32 = np.float32


def read(name: str, **kwargs: Any) -> Dataset:
    """A DICOM file of pydicom's test data (pydicom-data for RG1/RG3)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return pydicom.dcmread(path, **kwargs)


def recipe(size: tuple[int, int] = (64, 64), **changes: Any) -> Recipe:
    base: dict[str, Any] = {"window": "tags", "resize": {"policy": "stretch", "size": size}}
    return Recipe.model_validate(base | changes)


def spec(size: tuple[int, int] = (64, 64), channels: int = 1, layout: str = "NCHW") -> InputSpec:
    shape = (1, channels, *size) if layout == "NCHW" else (1, *size, channels)
    return InputSpec.model_validate(
        {"name": "input", "shape": shape, "channels": channels, "layout": layout}
    )


def tensor(ds: Dataset, **changes: Any) -> np.ndarray:
    return prepare(ds, recipe(**changes), spec()).tensor


def with_pixels(ds: Dataset, arr: np.ndarray, **attrs: Any) -> Dataset:
    """A copy of ``ds`` (uncompressed) holding ``arr`` (2-D or frames) and ``attrs``."""
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in attrs.items():
        setattr(out, keyword, value)
    bits = attrs.get("BitsStored", out.BitsStored)
    photometric = attrs.get("PhotometricInterpretation", out.PhotometricInterpretation)
    out.set_pixel_data(arr, photometric, bits)
    for keyword, value in attrs.items():  # set_pixel_data resets some
        setattr(out, keyword, value)
    return out


def reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def jpeg_lossless(arr: np.ndarray, precision: int) -> bytes:
    """A JPEG lossless frame (ITU-T T.81 Annex H, process 14, predictor 1, one
    component, a fixed Huffman table whose 17 codes are 5 bits long), since no encoder
    for it is installed: what the decoder must give back is exactly ``arr``."""
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)  # H.1.2.1: first sample of the first line
    pred[0, 1:] = x[0, :-1]  # first line: Ra
    pred[1:, 0] = x[:-1, 0]  # first column: Rb
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: Ra
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)
    bits = []
    for d in diff.ravel().tolist():
        ssss = 16 if d == -32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    rows, cols = x.shape
    sof3 = struct.pack(">HBHHBBBB", 11, precision, rows, cols, 1, 1, 0x11, 0)
    dht = struct.pack(">HB", 36, 0) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = struct.pack(">HBBBBBB", 8, 1, 1, 0, 1, 0, 0)
    return b"".join(
        (b"\xff\xd8\xff\xc3", sof3, b"\xff\xc4", dht, b"\xff\xda", sos, data, b"\xff\xd9")
    )


def encapsulated(ds: Dataset, syntax: UID, frame: bytes) -> Dataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    out.PixelData = encapsulate([frame])
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return reread(out)


def encoded(ds: Dataset, syntax: UID) -> Dataset:
    """``ds`` written in ``syntax`` and read back."""
    if syntax == JPEGLosslessSV1:
        return encapsulated(ds, syntax, jpeg_lossless(ds.pixel_array, ds.BitsStored))
    out = copy.deepcopy(ds)
    if syntax.is_compressed:
        if not get_encoder(syntax).is_available:
            pytest.skip(f"no {syntax.name} encoder installed")
        out.compress(syntax)
    else:
        out.file_meta.TransferSyntaxUID = syntax
    return reread(out)


@pytest.fixture(scope="module")
def rg1() -> Dataset:
    return read("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def crop(rg1: Dataset) -> Dataset:
    """256x240 real pixels from the middle of RG1 (15 bits stored, MONOCHROME1)."""
    return with_pixels(rg1, rg1.pixel_array[800:1056, 700:940].copy())


# -- decoding: every transfer syntax, the same tensor ------------------------------------


def test_rg1_j2k_lossless_gives_the_same_tensor_as_uncompressed(rg1: Dataset) -> None:
    j2k = read("RG1_J2KR.dcm")
    card_recipe = recipe((224, 224), scale="imagenet")
    a = prepare(rg1, card_recipe, spec((224, 224)))
    b = prepare(j2k, card_recipe, spec((224, 224)))
    assert np.array_equal(a.tensor, b.tensor)
    assert np.array_equal(a.display, b.display)
    assert a.window == b.window == "window center 15000 width 30000 (LINEAR)"
    assert a.inverted and b.inverted


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLosslessSV1,
    ],
    ids=lambda uid: UID(uid).keyword,
)
def test_lossless_transfer_syntaxes_give_identical_tensors(crop: Dataset, syntax: UID) -> None:
    ds = encoded(crop, syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(pixels(ds), crop.pixel_array)
    for window_kind in ("tags", "percentile", "none"):
        assert np.array_equal(tensor(ds, window=window_kind), tensor(crop, window=window_kind))


def test_jpeg_baseline_decodes_as_pil_does(crop: Dataset) -> None:
    gray = (crop.pixel_array >> 7).astype(np.uint8)
    eight = with_pixels(crop, gray, BitsAllocated=8, BitsStored=8, HighBit=7)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=90)
    ds = encapsulated(eight, JPEGBaseline8Bit, buffer.getvalue())
    decoded = pixels(ds)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.int16)
    assert decoded.shape == gray.shape
    assert np.abs(decoded.astype(np.int16) - expected).max() <= 1  # IDCT rounding
    ours = tensor(ds, window="none")
    theirs = tensor(with_pixels(eight, expected.astype(np.uint8)), window="none")
    assert np.abs(ours - theirs).max() <= 1 / 255


@pytest.mark.parametrize(
    ("reference", "variant"),
    [
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_implicit.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ],
)
def test_real_encoded_files_give_the_reference_tensor(reference: str, variant: str) -> None:
    ref = read(reference)
    ds = read(variant)
    assert np.array_equal(pixels(ds), pixels(ref))
    assert np.array_equal(tensor(ds), tensor(ref))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPEG-LL.dcm", (1024, 256)),  # JPEG lossless, 16-bit signed
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024)),  # JPEG lossless, 8-bit
        ("JPGExtended.dcm", (1024, 256)),  # JPEG extended, 12-bit
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),  # JPEG baseline, YBR_FULL colour
        ("image_dfl.dcm", (512, 512)),  # deflated
        ("JPEG2000.dcm", (1024, 256)),
    ],
)
def test_real_compressed_files_prepare(name: str, shape: tuple[int, int]) -> None:
    ds = read(name)
    assert pixels(ds).shape == shape
    prepared = prepare(ds, recipe(), spec())
    assert prepared.tensor.shape == (1, 1, 64, 64)
    assert prepared.tensor.dtype == F32
    assert 0.0 <= prepared.tensor.min() < prepared.tensor.max() <= 1.0
    assert prepared.display.shape == shape


def test_multi_frame_gives_the_first_frame(crop: Dataset) -> None:
    frames = np.stack([crop.pixel_array, crop.pixel_array[::-1]])
    ds = reread(with_pixels(crop, frames))
    assert ds.NumberOfFrames == 2
    assert np.array_equal(pixels(ds), crop.pixel_array)


def test_colour_becomes_bt601_luma() -> None:
    ds = read("SC_rgb.dcm")
    rgb = ds.pixel_array.astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(pixels(ds), expected, atol=1e-9)
    assert tensor(ds, window="none").max() <= 1.0


def test_what_cannot_be_decoded_is_a_preprocess_error(crop: Dataset) -> None:
    no_pixels = copy.deepcopy(crop)
    del no_pixels.PixelData
    with pytest.raises(PreprocessError, match="no pixel data"):
        pixels(no_pixels)
    no_meta = copy.deepcopy(crop)
    del no_meta.file_meta.TransferSyntaxUID
    with pytest.raises(PreprocessError, match="no transfer syntax"):
        pixels(no_meta)
    unknown = copy.deepcopy(crop)
    unknown.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2
    with pytest.raises(PreprocessError, match="no decoder for MPEG2"):
        pixels(unknown)
    broken = encapsulated(crop, JPEGLosslessSV1, b"\xff\xd8 not a jpeg \xff\xd9")
    with pytest.raises(PreprocessError, match="cannot decode JPEG Lossless"):
        pixels(broken)


# -- Modality LUT (PS3.3 C.11.1) ---------------------------------------------------------


def test_rescale_slope_and_intercept() -> None:
    ds = read("CT_small.dcm")
    stored = pixels(ds)
    assert np.array_equal(modality_lut(stored, ds), stored.astype(np.float64) - 1024.0)
    ds.RescaleSlope = "0.5"
    assert np.array_equal(modality_lut(stored, ds), stored * 0.5 - 1024.0)


def test_modality_lut_sequence() -> None:
    ds = read("mlut_18.dcm")
    stored = pixels(ds)
    item = ds.ModalityLUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    first = item.LUTDescriptor[1]
    assert first == -2048
    expected = lut[np.clip(stored.astype(np.int64) - first, 0, lut.size - 1)]
    assert np.array_equal(modality_lut(stored, ds), expected)
    y, how = full_range(modality_lut(stored, ds), ds)
    assert np.array_equal(y, expected / 65535.0)
    assert how == "no window: full range 0..65535"


# -- windows (PS3.3 C.11.2) --------------------------------------------------------------


def test_linear_window() -> None:
    x = np.array([0.0, 75.0, 75.5, 99.5, 100.0, 124.0, 124.5, 200.0])
    y = window(x, center=100, width=50)
    expected = np.array([0, 0, 0.5 / 49, 0.5, 0.5 + 0.5 / 49, 1, 1, 1])
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-15)
    assert np.array_equal(window(np.array([99.0, 99.5, 100.0]), 100, 1), [0.0, 0.0, 1.0])


def test_linear_exact_and_sigmoid_windows() -> None:
    x = np.array([0.0, 75.0, 87.5, 100.0, 125.0, 200.0])
    assert np.array_equal(window(x, 100, 50, "LINEAR_EXACT"), [0, 0, 0.25, 0.5, 1, 1])
    y = window(x, 100, 50, "SIGMOID")
    assert y[3] == 0.5
    np.testing.assert_allclose(y[4], 1 / (1 + np.exp(-2.0)), rtol=1e-15)
    assert np.all(np.diff(y) > 0) and 0 < y[0] < y[-1] < 1


def test_a_bad_window_falls_back_to_percentile_and_says_why(crop: Dataset) -> None:
    ds = with_pixels(crop, crop.pixel_array, WindowWidth="0")
    y, how = voi_window(modality_lut(pixels(ds), ds), ds, (2.0, 98.0))
    assert how == "LINEAR window width must be >= 1, got 0: percentile window 2-98 %"
    assert np.array_equal(y, percentile_window(pixels(ds), 2, 98))
    ds.VOILUTFunction = "GAMMA"
    ds.WindowWidth = "100"
    assert voi_window(pixels(ds), ds)[1].startswith("unknown VOI LUT Function 'GAMMA'")


def test_recipe_and_input_sizes_must_agree(crop: Dataset) -> None:
    with pytest.raises(PreprocessError, match=r"resizes to \[64, 64\], the input takes \[32, 32\]"):
        prepare(crop, recipe(), spec((32, 32)))


def test_no_window_in_the_header_falls_back_to_percentile(crop: Dataset) -> None:
    ds = copy.deepcopy(crop)
    del ds.WindowCenter, ds.WindowWidth
    prepared = prepare(ds, recipe(percentile=[0.5, 99.5]), spec())
    assert prepared.window == "no VOI LUT or window in the header: percentile window 0.5-99.5 %"
    assert np.array_equal(
        prepared.tensor, tensor(crop, window="percentile", percentile=[0.5, 99.5])
    )


def test_the_first_of_several_windows_is_used(crop: Dataset) -> None:
    ds = with_pixels(crop, crop.pixel_array, WindowCenter=[8000, 15000], WindowWidth=[4000, 30000])
    assert voi_window(pixels(ds), ds)[1] == "window center 8000 width 4000 (LINEAR)"


def test_percentile_window() -> None:
    x = np.arange(101, dtype=np.float64)
    y = percentile_window(x, 10, 90)
    assert y[10] == 0 and y[50] == 0.5 and y[90] == 1
    assert y[:10].max() == 0 and y[90:].min() == 1
    assert not percentile_window(np.full((4, 4), 7.0), 1, 99).any()  # flat: all black


def _window_as_voi_lut(ds: Dataset, center: float, width: float) -> Dataset:
    """``ds`` with its window written as a 16-bit VOI LUT over the stored range."""
    out = copy.deepcopy(ds)
    first = 0
    inputs = np.arange(first, 1 << ds.BitsStored, dtype=np.float64)
    lut = np.rint(window(inputs, center, width) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [0 if lut.size == 65536 else lut.size, first, 16]
    item.LUTExplanation = "window as LUT"
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data as OW bytes
    out.VOILUTSequence = [item]
    del out.WindowCenter, out.WindowWidth
    return out


def test_a_voi_lut_equal_to_the_window_gives_the_same_tensor(crop: Dataset) -> None:
    lut = reread(_window_as_voi_lut(crop, 15000, 30000))
    prepared = prepare(lut, recipe(), spec())
    assert prepared.window == "VOI LUT sequence (window as LUT)"
    assert np.abs(prepared.tensor - tensor(crop)).max() <= 0.6 / 65535 + 1e-6


def test_a_voi_lut_wins_over_the_window(crop: Dataset) -> None:
    ds = _window_as_voi_lut(crop, 15000, 30000)
    ds.WindowCenter, ds.WindowWidth = "5000", "100"
    assert voi_window(pixels(ds), ds)[1] == "VOI LUT sequence (window as LUT)"


def test_a_real_voi_lut() -> None:
    ds = read("vlut_04.dcm")
    stored = pixels(ds)
    item = ds.VOILUTSequence[0]
    count, first, bits = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    y, how = voi_window(modality_lut(stored, ds), ds)
    expected = lut[np.clip(stored.astype(np.int64) - first, 0, count - 1)] / (2**bits - 1)
    assert np.array_equal(y, expected)
    assert how.startswith("VOI LUT sequence")


def test_full_range_without_a_window() -> None:
    ds = read("image_dfl.dcm")  # 8-bit
    stored = pixels(ds)
    y, how = full_range(modality_lut(stored, ds), ds)
    assert np.array_equal(y, stored / 255.0)
    assert how == "no window: full range 0..255"
    ds.PixelRepresentation, ds.BitsStored = 1, 8
    ds.RescaleSlope, ds.RescaleIntercept = "2", "10"
    assert full_range(np.array([-246.0, 264.0]), ds)[1] == "no window: full range -246..264"


# -- MONOCHROME1 / MONOCHROME2 (PS3.3 C.7.6.3.1.2) ---------------------------------------


@pytest.mark.parametrize("window_kind", ["tags", "percentile", "none"])
def test_monochrome1_and_its_monochrome2_copy_give_the_same_tensor(
    crop: Dataset, window_kind: str
) -> None:
    top = (1 << crop.BitsStored) - 1
    # LINEAR is centred on c - 0.5: the mirrored centre is top - c + 1 (C.11.2.1.2)
    center = top - float(crop.WindowCenter) + 1
    mono2 = with_pixels(
        crop,
        (top - crop.pixel_array).astype(np.uint16),
        PhotometricInterpretation="MONOCHROME2",
        WindowCenter=f"{center:g}",
    )
    a = prepare(crop, recipe(window=window_kind), spec())
    b = prepare(mono2, recipe(window=window_kind), spec())
    assert a.inverted and not b.inverted
    np.testing.assert_allclose(a.tensor, b.tensor, rtol=0, atol=1e-6)
    assert np.abs(a.display.astype(int) - b.display).max() <= 1


def test_invert_monochrome1_can_be_turned_off(crop: Dataset) -> None:
    kept = prepare(crop, recipe(invert_monochrome1=False), spec())
    inverted = prepare(crop, recipe(), spec())
    assert not kept.inverted
    np.testing.assert_allclose(kept.tensor, 1 - inverted.tensor, rtol=0, atol=1e-6)
    x = np.array([0.0, 0.25, 1.0])
    assert np.array_equal(invert_if_monochrome1(x, "MONOCHROME1 "), [1.0, 0.75, 0.0])
    assert invert_if_monochrome1(x, "MONOCHROME2") is x


# -- 8, 12 and 16 bits -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "tolerance"),
    [(8, 0.01), (12, 0.001), (16, 1e-4)],
)
def test_bit_depths_give_the_same_tensor(crop: Dataset, bits: int, tolerance: float) -> None:
    """RG1 stores 15 bits; the same pixels shifted to 8, 12 and 16 bits (window tags
    scaled alike) give the 15-bit tensors within the quantisation step."""
    shift = bits - crop.BitsStored
    stored = crop.pixel_array.astype(np.int64)
    arr = stored << shift if shift > 0 else stored >> -shift
    factor = 2.0**shift
    ds = with_pixels(
        crop,
        arr.astype(np.uint8 if bits == 8 else np.uint16),
        BitsAllocated=8 if bits == 8 else 16,
        BitsStored=bits,
        HighBit=bits - 1,
        WindowCenter=f"{float(crop.WindowCenter) * factor:g}",
        WindowWidth=f"{float(crop.WindowWidth) * factor:g}",
    )
    assert ds.pixel_array.dtype == (np.uint8 if bits == 8 else np.uint16)
    for window_kind in ("tags", "percentile", "none"):
        ours, reference = tensor(ds, window=window_kind), tensor(crop, window=window_kind)
        assert np.abs(ours - reference).max() <= tolerance, window_kind


# -- resize ------------------------------------------------------------------------------


def test_stretch_to_the_same_size_keeps_every_value() -> None:
    x = np.random.default_rng(1).random((64, 64))
    out = resize(x, "stretch", (64, 64))
    assert out.dtype == F32
    assert np.array_equal(out, x.astype(F32))


def test_crop_center_keeps_the_middle() -> None:
    wide = np.arange(4 * 8, dtype=np.float64).reshape(4, 8)
    assert np.array_equal(resize(wide, "crop-center", (4, 4)), wide[:, 2:6])
    tall = wide.T.copy()
    assert np.array_equal(resize(tall, "crop-center", (4, 4)), tall[2:6, :])
    same_aspect = resize(wide, "crop-center", (2, 4))  # nothing to crop
    assert np.array_equal(same_aspect, resize(wide, "stretch", (2, 4)))
    assert resize(wide, "crop-center", (2, 2)).shape == (2, 2)


def test_pad_adds_black_evenly() -> None:
    wide = np.ones((4, 8))
    padded = resize(wide, "pad", (8, 8))
    assert np.array_equal(padded[2:6], np.ones((4, 8)))
    assert not padded[:2].any() and not padded[6:].any()
    odd = resize(np.ones((8, 5)), "pad", (8, 8))
    assert np.array_equal(odd.sum(axis=0), [0, 8, 8, 8, 8, 8, 0, 0])  # the odd column right


def test_resize_is_deterministic_and_averages_when_shrinking() -> None:
    x = np.random.default_rng(2).random((500, 400))
    a = resize(x, "stretch", (50, 40))
    assert np.array_equal(a, resize(x, "stretch", (50, 40)))
    assert a.shape == (50, 40)
    assert a.std() < x.std() / 3  # an area filter, not point sampling
    np.testing.assert_allclose(resize(np.full((300, 200), 0.25), "pad", (64, 64))[:, 32], 0.25)
    with pytest.raises(ValueError, match="unknown resize policy"):
        resize(x, "squash", (10, 10))


# -- scaling -----------------------------------------------------------------------------


def test_scalings_exactly() -> None:
    x = np.array([[[0.0, 0.5, 1.0]]])
    assert np.array_equal(scale_unit(x), x)
    assert np.array_equal(scale_xrv(x), [[[-1024.0, 0.0, 1024.0]]])
    assert np.array_equal(
        scale_imagenet(x), [[[-0.485 / 0.229, (0.5 - 0.485) / 0.229, (1 - 0.485) / 0.229]]]
    )
    rgb = np.ones((3, 1, 1))
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert np.array_equal(scale_imagenet(rgb).ravel(), expected)
    assert np.array_equal(scale_custom(x, [0.5], [0.25]), [[[-2.0, 0.0, 2.0]]])
    custom = CustomScale(mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 2.0))
    assert np.array_equal(apply_scale(rgb, custom).ravel(), [1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("scale", "low", "high"),
    [
        ("unit", 0.0, 1.0),
        ("imagenet", -0.485 / 0.229, (1 - 0.485) / 0.229),
        ("xrv", -1024.0, 1024.0),
        ({"mean": [0.5], "std": [0.5]}, -1.0, 1.0),
    ],
)
def test_prepared_ranges_are_exact(crop: Dataset, scale: Any, low: float, high: float) -> None:
    """The percentile window clips at both ends, so the tensor reaches both limits."""
    size = (crop.Rows, crop.Columns)
    out = prepare(crop, recipe(size, window="percentile", scale=scale), spec(size))
    assert out.tensor.min() == F32(low) and out.tensor.max() == F32(high)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_three_channels_repeat_the_image(crop: Dataset, layout: str) -> None:
    out = prepare(crop, recipe(scale="imagenet"), spec(channels=3, layout=layout)).tensor
    gray = tensor(crop)[0, 0].astype(np.float64)
    channels = out[0] if layout == "NCHW" else out[0].transpose(2, 0, 1)
    assert out.shape == ((1, 3, 64, 64) if layout == "NCHW" else (1, 64, 64, 3))
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        np.testing.assert_allclose(channels[c], (gray - mean) / std, rtol=0, atol=1e-5)


# -- the display image -------------------------------------------------------------------


def test_the_display_image_is_full_size_windowed_and_inverted(rg1: Dataset) -> None:
    prepared = prepare(rg1, recipe(), spec())
    assert prepared.display.dtype == np.uint8
    assert prepared.display.shape == (rg1.Rows, rg1.Columns)
    y, _ = voi_window(modality_lut(pixels(rg1), rg1), rg1)
    assert np.array_equal(prepared.display, np.rint((1 - y) * 255).astype(np.uint8))


# -- PNG input ---------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(path)
    return path


def test_an_8_bit_png_is_x_over_255(tmp_path: Path) -> None:
    gray = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    ds = image_from_png(_png(tmp_path / "a.png", gray), {"Modality": "DX"})
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored) == ("DX", "MONOCHROME2", 8)
    prepared = prepare(ds, recipe(), spec())
    assert prepared.window == "window center 127.5 width 255 (LINEAR_EXACT)"
    np.testing.assert_allclose(prepared.tensor[0, 0], gray / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tensor(ds, window="none"), prepared.tensor, rtol=0, atol=1e-7)
    assert image_from_png(tmp_path / "a.png").SOPInstanceUID == ds.SOPInstanceUID  # stable


def test_16_bit_and_rgba_pngs(tmp_path: Path) -> None:
    deep = np.random.default_rng(4).integers(0, 65536, (64, 64), dtype=np.uint16)
    ds = image_from_png(_png(tmp_path / "deep.png", deep))
    assert ds.BitsStored == 16
    np.testing.assert_allclose(tensor(ds)[0, 0], deep / 65535.0, rtol=0, atol=1e-7)
    gray = np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)
    rgba = image_from_png(_png(tmp_path / "rgba.png", gray, "RGBA"))
    assert np.array_equal(pixels(rgba), gray)
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        image_from_png(tmp_path / "rgba.png", {"Bodypart": "CHEST"})


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"NIH PNG samples absent: {SAMPLES}")
def test_the_nih_samples(tmp_path: Path) -> None:
    plain = image_from_png(SAMPLES / "00000075_000.png")
    rgba = image_from_png(SAMPLES / "00000100_000.png")  # stored as RGBA in the source
    for ds in (plain, rgba):
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (1024, 1024, 8)
        out = prepare(ds, recipe((224, 224), scale="imagenet"), spec((224, 224)))
        assert out.tensor.shape == (1, 1, 224, 224)
    with Image.open(SAMPLES / "00000100_000.png") as img:
        assert img.mode == "RGBA"
        assert np.array_equal(pixels(rgba), np.asarray(img.convert("L")))
