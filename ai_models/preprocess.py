"""DICOM (or PNG) image -> model input tensor, in small named steps (numpy, pydicom, PIL).

The steps follow the grayscale pipeline of PS3.4 N.2; a card's
:class:`~ai_models.card.Recipe` picks the window, the resize policy and the scaling:

1. :func:`pixels`: the stored values of the first frame, from any transfer syntax
   pydicom decodes here (implicit/explicit VR little endian, deflated, RLE, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000); colour becomes luma (BT.601).
2. :func:`modality_lut`: PS3.3 C.11.1, the Modality LUT Sequence or Rescale
   Slope/Intercept: stored values -> modality values.
3. A window to 0-1: :func:`voi_window` (PS3.3 C.11.2: the VOI LUT Sequence, else
   Window Center/Width with its VOI LUT Function, else a percentile window, and it
   says which), :func:`percentile_window`, or :func:`full_range` (no window).
4. :func:`invert_if_monochrome1`: PS3.3 C.7.6.3.1.2, MONOCHROME1 shows its lowest
   value as white; after this, 0 is black (air in a radiograph). The uint8 copy of
   this image is the display image of :class:`PreparedImage`.
5. :func:`resize`: ``stretch``, ``crop-center`` or ``pad`` (black), then PIL's
   bilinear filter on float32 (it widens its support when shrinking): deterministic.
6. :func:`scale_unit`, :func:`scale_imagenet`, :func:`scale_xrv`, :func:`scale_custom`,
   channels repeated, laid out as the input spec says (batch of one).

Everything here is pure: no onnxruntime, no file writes (``image_from_png`` reads).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ai_models.card import CustomScale, InputSpec, Recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PS3.3 C.7.6.3.1.2 YBR_FULL


class PreprocessError(ValueError):
    """The image cannot be turned into a tensor (no pixels, no decoder, odd LUT)."""


@dataclass(frozen=True, slots=True)
class PreparedImage:
    tensor: np.ndarray  # float32 in the input's shape, batch of one
    display: np.ndarray  # uint8, 2-D, full resolution, after window and inversion
    window: str  # which window was applied, in words
    inverted: bool  # MONOCHROME1 was inverted


# -- 1. pixels -------------------------------------------------------------------------


def pixels(ds: Dataset) -> np.ndarray:
    """Stored values of the first frame (2-D); colour images as BT.601 luma (float)."""
    if "PixelData" not in ds:
        raise PreprocessError("the data set has no pixel data")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise PreprocessError("no transfer syntax (file meta information) to decode the pixels")
    name = UID(syntax).name
    if str(ds.get("PhotometricInterpretation", "")).startswith("PALETTE"):
        raise PreprocessError("PALETTE COLOR images are not supported")
    try:
        arr, _ = get_decoder(syntax).as_array(ds, index=0)
    except NotImplementedError:
        raise PreprocessError(f"no decoder for {name}") from None
    except Exception as err:  # each decoder plugin raises its own types
        raise PreprocessError(f"cannot decode {name}: {err}") from err
    if arr.ndim == 3:  # as_array gives RGB for RGB and YBR_* (as_rgb)
        return np.asarray(np.asarray(arr[..., :3], dtype=np.float64) @ np.asarray(_LUMA))
    return np.asarray(arr)


# -- 2. Modality LUT (PS3.3 C.11.1) -----------------------------------------------------


def _lut(item: Dataset, values: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(first mapped value, bits per entry, entries) of a LUT item (PS3.3 C.11.1.1.1)."""
    try:
        count, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
    except (AttributeError, TypeError, ValueError) as err:
        raise PreprocessError(f"LUT without a valid descriptor or data: {err}") from None
    count = count or 65536  # 0 means 2**16 entries
    if first >= 1 << 15 and values.size and values.min() < 0:
        first -= 1 << 16  # written as US where the input values are signed
    if isinstance(raw, bytes):
        data = np.frombuffer(raw, dtype="<u2" if len(raw) >= 2 * count else np.uint8)
    else:
        data = np.asarray(raw, dtype=np.int64).reshape(-1)
    if data.size < count:
        raise PreprocessError(f"LUT has {data.size} entries, its descriptor says {count}")
    return first, bits, data[:count].astype(np.float64)


def _apply_lut(values: np.ndarray, first: int, data: np.ndarray) -> np.ndarray:
    """Values below the first entry map to it, above the last to it (C.11.1.1.1)."""
    index = np.floor(values).astype(np.int64) - first
    return np.asarray(data[np.clip(index, 0, data.size - 1)])


def _number(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values (float64): the Modality LUT Sequence if present,
    else Rescale Slope and Intercept (1 and 0 when absent)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        first, _, data = _lut(seq[0], arr)
        return _apply_lut(arr, first, data)
    slope = _number(ds.get("RescaleSlope"), 1.0) or 1.0
    intercept = _number(ds.get("RescaleIntercept"), 0.0)
    return np.asarray(arr, dtype=np.float64) * slope + intercept


# -- 3. windows to 0-1 (PS3.3 C.11.2) ------------------------------------------------


def window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window Center/Width with a VOI LUT Function, to 0-1 (PS3.3 C.11.2.1.2, C.11.2.1.3).

    LINEAR: 0 at or below c - 0.5 - (w-1)/2, 1 above c - 0.5 + (w-1)/2, else
    ((x - (c - 0.5)) / (w - 1) + 0.5); LINEAR_EXACT: (x - c) / w + 0.5, clipped;
    SIGMOID: 1 / (1 + exp(-4 (x - c) / w)).
    """
    x = np.asarray(arr, dtype=np.float64)
    function = function.strip().upper() or "LINEAR"
    if function == "SIGMOID":
        if width <= 0:
            raise PreprocessError(f"SIGMOID window width must be > 0, got {width:g}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PreprocessError(f"LINEAR_EXACT window width must be > 0, got {width:g}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise PreprocessError(f"unknown VOI LUT Function {function!r}")
    if width < 1:
        raise PreprocessError(f"LINEAR window width must be >= 1, got {width:g}")
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0)


def percentile_window(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """The image's ``low``..``high`` percentiles to 0..1, clipped (a flat image gives 0)."""
    x = np.asarray(arr, dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(x, [low, high]))
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _values(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return [float(v) for v in items]


def voi_window(
    arr: np.ndarray, ds: Dataset, fallback: tuple[float, float] = (1.0, 99.0)
) -> tuple[np.ndarray, str]:
    """Modality values -> 0-1 by the header's VOI (PS3.3 C.11.2), and how, in words.

    The first VOI LUT Sequence item when present (entries over 2**bits - 1), else the
    first Window Center/Width with the VOI LUT Function (LINEAR when absent), else a
    ``fallback`` percentile window, which the description says.
    """
    seq = ds.get("VOILUTSequence")
    if seq:
        first, bits, data = _lut(seq[0], arr)
        top = float((1 << bits) - 1)
        if data.max() > top:  # descriptor understates the bits: scale by the data
            top = float((1 << int(data.max()).bit_length()) - 1)
        explanation = str(seq[0].get("LUTExplanation", "") or "").strip()
        what = f"VOI LUT sequence ({explanation or f'{data.size} entries'})"
        return _apply_lut(arr, first, data) / top, what
    centers, widths = _values(ds.get("WindowCenter")), _values(ds.get("WindowWidth"))
    problem = "no VOI LUT or window in the header"
    if centers and widths:
        center, width = centers[0], widths[0]
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        try:
            y = window(arr, center, width, function)
        except PreprocessError as err:
            problem = str(err)
        else:
            return y, f"window center {center:g} width {width:g} ({function})"
    low, high = fallback
    return percentile_window(arr, low, high), f"{problem}: percentile window {low:g}-{high:g} %"


def full_range(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """No window: the whole range the stored bits can hold (after the Modality LUT) to
    0-1, so an 8-bit image becomes x / 255."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        bits = 8 * ((bits + 7) // 8)
    seq = ds.get("ModalityLUTSequence")
    if seq:
        _, lut_bits, _ = _lut(seq[0], arr)
        lo, hi = 0.0, float((1 << lut_bits) - 1)
    else:
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        stored = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        slope = _number(ds.get("RescaleSlope"), 1.0) or 1.0
        intercept = _number(ds.get("RescaleIntercept"), 0.0)
        lo, hi = sorted(v * slope + intercept for v in stored)
    y = np.clip((np.asarray(arr, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return y, f"no window: full range {lo:g}..{hi:g}"


# -- 4. presentation ---------------------------------------------------------------------


def invert_if_monochrome1(arr: np.ndarray, photometric: str) -> np.ndarray:
    """1 - x for a MONOCHROME1 image in 0-1 (PS3.3 C.7.6.3.1.2), else x unchanged."""
    return 1.0 - arr if photometric.strip().upper() == "MONOCHROME1" else arr


# -- 5. resize ---------------------------------------------------------------------------


def resize(arr: np.ndarray, policy: str, size: Sequence[int]) -> np.ndarray:
    """A 2-D image to ``size`` (height, width) as float32.

    ``stretch``: the whole image, aspect ratio not kept; ``crop-center``: the largest
    centred box with the target's aspect ratio; ``pad``: zeros (black) added evenly
    to reach the target's aspect ratio (the odd row or column at the bottom/right).
    """
    h, w = (int(v) for v in size)
    img = np.asarray(arr, dtype=np.float32)
    rows, cols = img.shape
    wider = cols * h > rows * w
    taller = cols * h < rows * w
    if policy == "crop-center":
        if wider:
            keep = max(1, round(rows * w / h))
            start = (cols - keep) // 2
            img = img[:, start : start + keep]
        elif taller:
            keep = max(1, round(cols * h / w))
            start = (rows - keep) // 2
            img = img[start : start + keep, :]
    elif policy == "pad":
        if wider:
            extra = round(cols * h / w) - rows
            img = np.pad(img, ((extra // 2, extra - extra // 2), (0, 0)))
        elif taller:
            extra = round(rows * w / h) - cols
            img = np.pad(img, ((0, 0), (extra // 2, extra - extra // 2)))
    elif policy != "stretch":
        raise ValueError(f"unknown resize policy {policy!r}")
    if img.shape == (h, w):
        return np.array(img, dtype=np.float32)
    out = Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


# -- 6. scaling (channel-first arrays, 0-1 in) -------------------------------------------


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    shape = (-1,) + (1,) * (x.ndim - 1)
    m = np.asarray(mean, dtype=np.float64).reshape(shape)
    s = np.asarray(std, dtype=np.float64).reshape(shape)
    return (np.asarray(x, dtype=np.float64) - m) / s


def scale_unit(x: np.ndarray) -> np.ndarray:
    """0-1 as it is."""
    return np.asarray(x, dtype=np.float64)


def scale_imagenet(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std with ImageNet's values: 0.485/0.229 for one channel, per channel
    (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for three (channel-first ``x``)."""
    channels = x.shape[0] if x.ndim == 3 else 1
    if channels == 3:
        return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return _normalize(x, IMAGENET_MEAN[:1], IMAGENET_STD[:1])


def scale_xrv(x: np.ndarray) -> np.ndarray:
    """TorchXRayVision's range: 0-1 to [-1024, 1024]."""
    return np.asarray(x, dtype=np.float64) * 2048.0 - 1024.0


def scale_custom(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std, one value for all channels or one per channel (channel-first)."""
    return _normalize(x, mean, std)


def apply_scale(x: np.ndarray, scale: str | CustomScale) -> np.ndarray:
    """The card's ``scale`` on a channel-first 0-1 array."""
    if isinstance(scale, CustomScale):
        return scale_custom(x, scale.mean, scale.std)
    if scale == "imagenet":
        return scale_imagenet(x)
    if scale == "xrv":
        return scale_xrv(x)
    if scale == "unit":
        return scale_unit(x)
    raise ValueError(f"unknown scale {scale!r}")


# -- the whole recipe --------------------------------------------------------------------


def prepare(ds: Dataset, recipe: Recipe, spec: InputSpec) -> PreparedImage:
    """The model's input for ``ds`` (float32, ``spec``'s shape with a batch of one) and
    the display image, by the card's recipe."""
    if tuple(recipe.resize.size) != spec.spatial:
        size, spatial = list(recipe.resize.size), list(spec.spatial)
        raise PreprocessError(f"the recipe resizes to {size}, the input takes {spatial}")
    values = modality_lut(pixels(ds), ds)
    if recipe.window == "tags":
        y, how = voi_window(values, ds, recipe.percentile)
    elif recipe.window == "percentile":
        low, high = recipe.percentile
        y, how = percentile_window(values, low, high), f"percentile window {low:g}-{high:g} %"
    else:
        y, how = full_range(values, ds)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    inverted = recipe.invert_monochrome1 and photometric.strip().upper() == "MONOCHROME1"
    if inverted:
        y = invert_if_monochrome1(y, photometric)
    display = np.rint(y * 255.0).astype(np.uint8)
    small = resize(y, recipe.resize.policy, recipe.resize.size)
    scaled = apply_scale(np.repeat(small[None], spec.channels, axis=0), recipe.scale)
    if spec.layout == "NHWC":
        scaled = scaled.transpose(1, 2, 0)
    return PreparedImage(scaled[None].astype(np.float32), display, how, inverted)


# -- PNG input ---------------------------------------------------------------------------


def _png_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 0xFFFF:
            raise PreprocessError("32-bit PNG values outside 0..65535")
        return arr.astype(np.uint16)
    if img.mode == "F":
        raise PreprocessError("floating-point images are not supported")
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def image_from_png(path: str | Path, headers: Mapping[str, str] | None = None) -> Dataset:
    """A grayscale PNG (e.g. an NIH ChestX-ray14 image) as a MONOCHROME2 data set that
    :func:`prepare` takes: colour and alpha become luma (PIL ``L``); 8 or 16 bits; a
    LINEAR_EXACT window over the whole range, so the ``tags`` window gives x / 255.
    ``headers`` sets attributes by keyword (Modality, BodyPartExamined, ...); the
    default Modality is OT. The SOP Instance UID derives from the file's bytes."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            arr = _png_array(img)
    except (OSError, ValueError) as err:
        raise PreprocessError(f"cannot read {path}: {err}") from err
    uid = generate_uid(entropy_srcs=[hashlib.sha256(data).hexdigest()])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    bits = arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, "MONOCHROME2", bits, generate_instance_uid=False)
    top = (1 << bits) - 1
    ds.WindowCenter = f"{top / 2:g}"
    ds.WindowWidth = str(top)
    ds.VOILUTFunction = "LINEAR_EXACT"
    for keyword, value in (headers or {}).items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        setattr(ds, keyword, value)
    return ds
