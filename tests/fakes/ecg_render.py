"""A paper-ECG printer for tests and benchmarks: pydicom's 12-lead record drawn as a scan.

Not product code: it draws what ``drivers.ecg.digitize`` has to read back, and it
imports nothing from ``drivers``, so a misreading of the printout is not repeated here.

The page (US Letter, landscape, 279.4 x 215.9 mm) is what a resting-ECG cart prints:

* a red/pink grid over the page less 5 mm margins: thin pink lines every 1 mm,
  thicker red lines every 5 mm, anti-aliased (line coverage per pixel);
* the standard ``3x4 + II`` layout at 25 mm/s and 10 mm/mV: rows ``I aVR V1 V4`` /
  ``II aVL V2 V5`` / ``III aVF V3 V6``, each column 2.5 s of the same 10 s record
  (column ``k`` shows seconds ``2.5k .. 2.5k + 2.5``), and a rhythm strip of lead II
  over the whole 10 s; a short vertical tick marks each change of lead;
* a 1 mV calibration pulse (0.2 s wide) at the start of each row, lead labels, a
  header and a footer line of text; black traces 0.3 mm wide with round caps.

Distortions, in the order a scan meets them: rotation on the scanner bed (PIL,
counter-clockwise for positive degrees, bicubic, white fill), uneven lighting (a
gradient times a vignette), Gaussian sensor noise (seeded) and JPEG compression.

The metrics of the PhysioNet/CinC Challenges live here too: :func:`snr_db` (2024:
10·log10 of signal power over error power, per lead, no alignment) and
:func:`snr_db_aligned` (2025: the best shift within ±0.2 s and a constant offset
removed first). :func:`reference_heart_rate` is a detector independent of the
digitizer's (Pan-Tompkins style: slope energy, integration window, threshold).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file

Array = NDArray[np.float64]

PAGE_W_MM, PAGE_H_MM = 279.4, 215.9
GRID_MARGIN_MM = 5.0
PULSE_X_MM = 8.0  # left foot of the calibration pulse
TRACE_X_MM = 18.0  # t = 0 of the record
ROW_BASELINES_MM = (52.0, 92.0, 132.0, 175.0)  # 3 lead rows, then the rhythm strip
LAYOUT_3X4 = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
RECORD_S = 10.0
TRACE_WIDTH_MM = 0.3
PAPER_RGB = (255.0, 253.0, 250.0)
MINOR_RGB, MINOR_WIDTH_MM = (245.0, 175.0, 175.0), 0.1
MAJOR_RGB, MAJOR_WIDTH_MM = (228.0, 90.0, 90.0), 0.2


@dataclass(frozen=True)
class Distortion:
    """How the printout is spoiled on its way to the scanner's file."""

    noise_sigma: float = 0.0  # Gaussian, in 0..255 grey levels, every channel
    rotation_deg: float = 0.0  # counter-clockwise as seen
    jpeg_quality: int | None = None
    uneven_light: float = 0.0  # L in 0..1: darkest corner (1 - 0.6 L)(1 - 0.4 L) of the brightest
    seed: int = 0


@dataclass(frozen=True)
class LeadTruth:
    """One printed lead segment: its samples in mV and where it sits in the record."""

    start_s: float
    mv: Array


@dataclass
class RenderedEcg:
    """The page image and everything the digitizer should find on it."""

    image: Image.Image
    dpi: float
    fs: float  # sampling rate of the truth arrays
    leads: dict[str, LeadTruth]  # the 3x4 segments
    rhythm: dict[str, Array]  # full 10 s
    speed_mm_s: float = 25.0
    gain_mm_mv: float = 10.0
    distortion: Distortion = field(default_factory=Distortion)

    @property
    def heart_rate_bpm(self) -> float:
        """Heart rate of the original rhythm lead, by :func:`reference_heart_rate`."""
        return reference_heart_rate(self.rhythm[RHYTHM_LEAD], self.fs)


@lru_cache(maxsize=1)
def load_record() -> tuple[dict[str, Array], float]:
    """pydicom's waveform_ecg.dcm, first multiplex group (10 s rhythm): lead -> mV, fs."""
    path = get_testdata_file("waveform_ecg.dcm")
    assert path is not None, "pydicom's test files are missing"
    ds = pydicom.dcmread(path)
    group = ds.WaveformSequence[0]
    data = ds.waveform_array(0)  # sensitivity applied: in the channel's units
    scale = {"uV": 1e-3, "mV": 1.0, "V": 1e3}
    leads: dict[str, Array] = {}
    for i, channel in enumerate(group.ChannelDefinitionSequence):
        meaning = str(channel.ChannelSourceSequence[0].CodeMeaning)
        name = meaning.removeprefix("Lead ").split(" ")[0]
        unit = str(channel.ChannelSensitivityUnitsSequence[0].CodeValue)
        leads[name] = np.asarray(data[:, i], dtype=np.float64) * scale[unit]
    return leads, float(group.SamplingFrequency)


def render_ecg(
    dpi: float,
    distortion: Distortion | None = None,
    *,
    grid: bool = True,
    signals: dict[str, Array] | None = None,
    fs: float | None = None,
    speed_mm_s: float = 25.0,
    gain_mm_mv: float = 10.0,
) -> RenderedEcg:
    """Print the record (or ``signals`` at ``fs``) at ``dpi`` and spoil it as asked.

    Clean pages are cached (a few): treat ``image`` as read-only. ``grid=False``
    prints on plain paper.
    """
    if signals is None:
        signals, fs = load_record()
    assert fs is not None
    distortion = distortion or Distortion()
    clean = _clean_page(dpi, grid, _freeze(signals), fs, speed_mm_s, gain_mm_mv)
    image = spoil(clean, distortion)
    n_col = round(RECORD_S * fs / 4)
    truth = {
        lead: LeadTruth(col * n_col / fs, signals[lead][col * n_col : (col + 1) * n_col].copy())
        for row in LAYOUT_3X4
        for col, lead in enumerate(row)
    }
    rhythm = {RHYTHM_LEAD: signals[RHYTHM_LEAD][: round(RECORD_S * fs)].copy()}
    return RenderedEcg(image, dpi, fs, truth, rhythm, speed_mm_s, gain_mm_mv, distortion)


def _freeze(signals: dict[str, Array]) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, np.asarray(v, dtype=np.float64).tobytes()) for k, v in sorted(signals.items()))


@lru_cache(maxsize=8)
def _clean_page(
    dpi: float,
    grid: bool,
    frozen: tuple[tuple[str, bytes], ...],
    fs: float,
    speed: float,
    gain: float,
) -> Image.Image:
    signals = {k: np.frombuffer(v, dtype=np.float64) for k, v in frozen}
    ppmm = dpi / 25.4
    w, h = round(PAGE_W_MM * ppmm), round(PAGE_H_MM * ppmm)
    page = np.empty((h, w, 3), dtype=np.float32)
    page[:] = PAPER_RGB
    if grid:
        _draw_grid(page, ppmm)
    ink = np.zeros((h, w), dtype=np.float32)  # coverage of black ink, 0..1
    lw = TRACE_WIDTH_MM * ppmm
    dx = speed * ppmm / fs  # px per sample
    n_col = round(RECORD_S * fs / 4)
    pulse = _pulse_mv(fs)
    for r, baseline_mm in enumerate(ROW_BASELINES_MM):
        base = baseline_mm * ppmm
        _draw_curve(ink, PULSE_X_MM * ppmm, dx, base - pulse * gain * ppmm, lw)
        if r < len(LAYOUT_3X4):
            for col, lead in enumerate(LAYOUT_3X4[r]):
                seg = signals[lead][col * n_col : (col + 1) * n_col]
                x0 = TRACE_X_MM * ppmm + col * n_col * dx
                _draw_curve(ink, x0, dx, base - seg * gain * ppmm, lw)
                if col:
                    _draw_tick(ink, x0, base, ppmm, lw)
        else:
            seg = signals[RHYTHM_LEAD][: round(RECORD_S * fs)]
            _draw_curve(ink, TRACE_X_MM * ppmm, dx, base - seg * gain * ppmm, lw)
    _draw_text(ink, ppmm, speed, gain)
    page *= 1.0 - ink[:, :, None]
    return Image.fromarray(np.clip(page + 0.5, 0, 255).astype(np.uint8), "RGB")


def _pulse_mv(fs: float) -> Array:
    """The calibration pulse as samples: 1 mm foot, 0.2 s at 1 mV, 1 mm foot (25 mm/s)."""
    n = round(0.28 * fs)
    t = np.arange(n) / fs
    return np.where((t >= 0.04) & (t < 0.24), 1.0, 0.0)


def _line_profile(n_px: int, ppmm: float, step_mm: float, width_mm: float, skip: int) -> Array:
    """Coverage of each pixel column by lines every ``step_mm`` (every ``skip``-th left out)."""
    cov = np.zeros(n_px + 8, dtype=np.float64)
    start, stop = GRID_MARGIN_MM, n_px / ppmm - GRID_MARGIN_MM
    k = np.arange(int((stop - start) / step_mm + 1e-9) + 1)
    if skip:
        k = k[k % skip != 0]
    centre = (start + k * step_mm) * ppmm
    a, b = centre - width_mm * ppmm / 2, centre + width_mm * ppmm / 2
    first = np.floor(a).astype(int)
    for off in range(int(np.ceil(width_mm * ppmm)) + 2):
        idx = first + off
        part = np.clip(np.minimum(b, idx + 1) - np.maximum(a, idx), 0.0, 1.0)
        np.add.at(cov, np.clip(idx, 0, n_px + 7), part)
    return np.clip(cov[:n_px], 0.0, 1.0)


def _draw_grid(page: NDArray[np.float32], ppmm: float) -> None:
    """Pink 1 mm lines, then red 5 mm lines, blended by their coverage."""
    h, w, _ = page.shape
    inside_x = np.zeros(w)
    inside_y = np.zeros(h)
    lo, hi_x, hi_y = GRID_MARGIN_MM * ppmm, w - GRID_MARGIN_MM * ppmm, h - GRID_MARGIN_MM * ppmm
    inside_x[int(lo) : int(np.ceil(hi_x))] = 1.0
    inside_y[int(lo) : int(np.ceil(hi_y))] = 1.0
    for step, width, skip, rgb in (
        (1.0, MINOR_WIDTH_MM, 5, MINOR_RGB),
        (5.0, MAJOR_WIDTH_MM, 0, MAJOR_RGB),
    ):
        vertical = np.outer(inside_y, _line_profile(w, ppmm, step, width, skip) * inside_x)
        horizontal = np.outer(_line_profile(h, ppmm, step, width, skip) * inside_y, inside_x)
        alpha32 = (1.0 - (1.0 - vertical) * (1.0 - horizontal)).astype(np.float32)
        for c in range(3):
            page[:, :, c] += (np.float32(rgb[c]) - page[:, :, c]) * alpha32


def _draw_curve(ink: NDArray[np.float32], x0: float, dx: float, y: Array, lw: float) -> None:
    """Ink a polyline y(x) (px; sample i at x0 + i*dx) of width ``lw``, anti-aliased.

    Each pixel column is split into 4 sub-columns; in each the curve spans
    [min y, max y]; that span is dilated by a disk of radius lw/2 (round caps and
    joins) and each pixel gets the fraction of it the span covers, averaged over
    its sub-columns.
    """
    sub, per = 4, 4
    xs_end = x0 + (len(y) - 1) * dx
    s0, s1 = int(np.floor(x0)) * sub, int(np.ceil(xs_end * sub))
    n_sub = s1 - s0
    pos = (s0 + np.arange(n_sub * per + 1) / per) / sub
    vals = np.interp(pos, x0 + np.arange(len(y)) * dx, y)
    outside = (pos < x0) | (pos > xs_end)
    win = np.lib.stride_tricks.sliding_window_view(np.where(outside, np.inf, vals), per + 1)[::per]
    win_hi = np.lib.stride_tricks.sliding_window_view(np.where(outside, -np.inf, vals), per + 1)[
        ::per
    ]
    lo0, hi0 = win.min(axis=1), win_hi.max(axis=1)
    r = lw / 2
    reach = int(np.floor(r * sub))
    pad = reach
    lo = np.full(n_sub + 2 * pad, np.inf)
    hi = np.full(n_sub + 2 * pad, -np.inf)
    for d in range(-reach, reach + 1):
        half = np.sqrt(max(r * r - (d / sub) ** 2, 0.0))
        sl = slice(pad + d, pad + d + n_sub)
        lo[sl] = np.minimum(lo[sl], lo0 - half)
        hi[sl] = np.maximum(hi[sl], hi0 + half)
    s0 -= pad
    extra = s0 % sub  # align the first sub-column to a pixel
    s0 -= extra
    lo = np.concatenate([np.full(extra, np.inf), lo])
    hi = np.concatenate([np.full(extra, -np.inf), hi])
    tail = (-len(lo)) % sub
    lo = np.concatenate([lo, np.full(tail, np.inf)])
    hi = np.concatenate([hi, np.full(tail, -np.inf)])
    finite = np.isfinite(lo)
    top, bottom = int(np.floor(lo[finite].min())), int(np.ceil(hi[finite].max()))
    rows = np.arange(top, bottom)[:, None]
    cov = np.clip(np.minimum(hi[None, :], rows + 1) - np.maximum(lo[None, :], rows), 0.0, 1.0)
    cov = cov.reshape(len(rows), -1, sub).mean(axis=2)
    c0 = s0 // sub
    h, w = ink.shape
    r0, r1 = max(top, 0), min(bottom, h)
    k0, k1 = max(c0, 0), min(c0 + cov.shape[1], w)
    if r0 >= r1 or k0 >= k1:
        return
    part = cov[r0 - top : r1 - top, k0 - c0 : k1 - c0].astype(np.float32)
    np.maximum(ink[r0:r1, k0:k1], part, out=ink[r0:r1, k0:k1])


def _draw_tick(ink: NDArray[np.float32], x: float, base: float, ppmm: float, lw: float) -> None:
    """The lead-change mark: a vertical stroke ``lw`` wide, 4 mm tall, centred on the baseline."""
    h, w = ink.shape
    cx = _interval_coverage(w, x - lw / 2, x + lw / 2)
    cy = _interval_coverage(h, base - 2.0 * ppmm, base + 2.0 * ppmm)
    rows, cols = np.flatnonzero(cy), np.flatnonzero(cx)
    block = (cy[rows, None] * cx[None, cols]).astype(np.float32)
    sl = np.ix_(rows, cols)
    ink[sl] = np.maximum(ink[sl], block)


def _interval_coverage(n: int, a: float, b: float) -> Array:
    """The fraction of each of ``n`` pixels [i, i+1) inside [a, b]."""
    i = np.arange(n, dtype=np.float64)
    out: Array = np.clip(np.minimum(b, i + 1) - np.maximum(a, i), 0.0, 1.0)
    return out


def _draw_text(ink: NDArray[np.float32], ppmm: float, speed: float, gain: float) -> None:
    """Lead labels above each segment, a header and a footer, anti-aliased by FreeType."""
    h, w = ink.shape
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(3.5 * ppmm, 6))
    small = ImageFont.load_default(size=max(3.0 * ppmm, 6))
    for r, row in enumerate(LAYOUT_3X4):
        base = ROW_BASELINES_MM[r]
        for col, lead in enumerate(row):
            x = TRACE_X_MM + col * RECORD_S * speed / 4 + 1.5
            draw.text((x * ppmm, (base - 9.0) * ppmm), lead, fill=255, font=font)
    draw.text(
        ((TRACE_X_MM + 1.5) * ppmm, (ROW_BASELINES_MM[-1] - 9.0) * ppmm), RHYTHM_LEAD, 255, font
    )
    draw.text((TRACE_X_MM * ppmm, 10.0 * ppmm), "medgw test print  waveform_ecg.dcm", 255, small)
    footer = f"{speed:g} mm/s   {gain:g} mm/mV   0.05-150 Hz   12 leads + 1 rhythm"
    draw.text((TRACE_X_MM * ppmm, 200.0 * ppmm), footer, 255, small)
    text = np.asarray(layer, dtype=np.float32) / 255.0
    np.maximum(ink, text, out=ink)


def spoil(clean: Image.Image, d: Distortion) -> Image.Image:
    """Rotation, uneven light, noise, JPEG, in that order; the identity when all are off."""
    img = clean
    if d.rotation_deg:
        img = img.rotate(d.rotation_deg, Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    arr = np.asarray(img, dtype=np.float32) if d.uneven_light or d.noise_sigma else None
    if arr is not None and d.uneven_light:
        h, w = arr.shape[:2]
        yy = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
        xx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
        gradient = 1.0 - 0.6 * d.uneven_light * (xx + 1.0) / 2.0 * (0.6 + 0.4 * (yy + 1.0) / 2.0)
        vignette = 1.0 - 0.4 * d.uneven_light * (xx * xx + yy * yy) / 2.0
        arr *= (gradient * vignette).astype(np.float32)[:, :, None]
    if arr is not None and d.noise_sigma:
        rng = np.random.default_rng(d.seed)
        arr = arr + rng.normal(0.0, d.noise_sigma, arr.shape).astype(np.float32)
    if arr is not None:
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    if d.jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=d.jpeg_quality)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    return img


# --- metrics (PhysioNet/CinC Challenges 2024 and 2025) ---------------------------------


def resample_to(
    est: NDArray[np.floating[Any]], est_fs: float, n: int, fs: float, start_s: float = 0.0
) -> Array:
    """``est`` (sample 0 at ``start_s``) linearly interpolated at ``n`` samples of ``fs``."""
    t_est = start_s + np.arange(len(est)) / est_fs
    return np.interp(start_s + np.arange(n) / fs, t_est, np.asarray(est, dtype=np.float64))


def snr_db(ref: Array, est: Array) -> float:
    """2024 rule: 10·log10(Σ ref² / Σ (ref - est)²), same rate, no alignment; NaN -> 0."""
    ref = np.asarray(ref, dtype=np.float64)
    est = np.nan_to_num(np.asarray(est, dtype=np.float64)[: len(ref)])
    if len(est) < len(ref):
        est = np.concatenate([est, np.zeros(len(ref) - len(est))])
    noise = float(np.sum((ref - est) ** 2))
    signal = float(np.sum(ref**2))
    return float(10.0 * np.log10(signal / max(noise, 1e-20)))


def snr_db_aligned(ref: Array, est: Array, fs: float, max_shift_s: float = 0.2) -> float:
    """2025 rule: the best shift within ±``max_shift_s`` and a constant offset removed.

    For each shift the overlap of ``ref`` and the shifted ``est`` is compared after
    removing the mean difference; the shift with the least error power wins, and SNR
    is ``ref``'s power over that error power (both over the overlap).
    """
    ref = np.asarray(ref, dtype=np.float64)
    est = np.nan_to_num(np.asarray(est, dtype=np.float64)[: len(ref)])
    best = -np.inf
    for k in range(-round(max_shift_s * fs), round(max_shift_s * fs) + 1):
        r = ref[max(k, 0) : len(ref) + min(k, 0)]
        e = est[max(-k, 0) : len(est) + min(-k, 0)]
        m = min(len(r), len(e))
        if m < len(ref) // 2:
            continue
        diff = r[:m] - e[:m]
        noise = float(np.sum((diff - diff.mean()) ** 2))
        best = max(best, 10.0 * np.log10(float(np.sum(r[:m] ** 2)) / max(noise, 1e-20)))
    return float(best)


def reference_heart_rate(mv: Array, fs: float) -> float:
    """Heart rate (bpm) by a Pan-Tompkins-style detector, independent of the digitizer's.

    Slope (first difference) squared, integrated over 150 ms; beats are the rising
    crossings of 30 % of that energy's 99.5th percentile, at least 250 ms apart; the
    rate is beats-1 over the time from the first beat to the last.
    """
    x = np.asarray(mv, dtype=np.float64)
    energy = np.diff(x, prepend=x[0]) ** 2
    win = max(round(0.15 * fs), 1)
    energy = np.convolve(energy, np.ones(win) / win, mode="same")
    above = energy > 0.3 * np.percentile(energy, 99.5)
    onsets = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    beats: list[int] = []
    for i in onsets:
        if not beats or i - beats[-1] >= 0.25 * fs:
            beats.append(int(i))
    if len(beats) < 2:
        return float("nan")
    return 60.0 * (len(beats) - 1) / ((beats[-1] - beats[0]) / fs)
