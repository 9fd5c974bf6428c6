"""Paper ECG -> waveform: grid, deskew, layout, calibration pulse and traces in millivolts.

Pure image processing (numpy and PIL), no I/O: :func:`digitize` takes one page
image and returns an :class:`EcgDigitization`. The steps, each a function below:

1. ``_normalize_light``: every channel divided by the local paper white (90th
   percentile in blocks), so uneven lighting and colour casts cancel.
2. ``_grid_strength``: the red/pink grid is what darkens green while red stays
   bright (luminance-driven, so JPEG's halved colour resolution does not blur it);
   ``_ink``: black ink from the red channel, in which a red grid is invisible.
3. ``_estimate_rotation``: the angle within ±6° at which the grid pixels project
   most sharply onto both axes (sum of squared histogram counts), 0.25° then 0.02°
   steps and a parabola; ``_rotate`` undoes it with PIL before anything is read.
4. ``_grid_pitch``: px/mm on each axis from the grid profiles' period: the
   autocorrelation's 1 mm peak (checked by its 5 mm multiple), sharpened at 5 and
   25 mm, then the spectral peak on a fine frequency grid. No such period: "no
   grid found".
5. ``_find_rows``: the layout's rows are the most inked lines (a trace's
   baseline); ``_time_origin``: t = 0 from where each row's ink starts and ends,
   one record (10 s x speed) apart, to a fraction of a pixel.
6. ``_calibration_pulse``: left of t = 0 in each row, the pulse's feet (the row's
   0 mV baseline) and plateau; its height over pitch x gain must be 1 mV ± 5 %.
7. ``_erase_ticks`` removes the lead-change marks; ``_trace_segment`` then reads
   each lead's segment: the runs of ink in each pixel column, one run per column
   chosen by a least-jump path (Viterbi, columns may be skipped) so labels and the
   neighbouring rows' big waves are passed over; ``_column_values`` and
   ``_steep_values`` turn a run into the curve's y at the column's centre (middle,
   pen-tip-corrected peaks and troughs, steep strokes read across). y becomes mV
   against the baseline, t comes from the column, resampled to ``sampling_hz``.
8. ``_heart_rate``: R peaks of the rhythm strip (largest deflections of the
   high-passed signal, 0.3 s apart), 60 over the median R-R interval.

Checks (any failed one makes ``ok`` false: the scan goes on as an image, to human
review): "no grid found"; "grid pitch disagrees with dpi" (> 5 %); "layout ...:
rows found"; "no trace found"; "calibration pulse missing"; "calibration pulse
... mV: grid pitch and pulse disagree" (> 5 %); "flat lead: ..." (peak-to-peak
under 0.1 mV).

Output choice: each lead of a 3x4 page is printed for only 2.5 s, so ``leads``
holds each lead's own segment and ``lead_start_s`` where it sits in the 10 s
record; ``rhythm`` holds the full-length strips. A DICOM 12-lead object needs one
length per multiplex group: four 2.5 s groups (one per column of the page) plus
a 10 s group for the rhythm strip keep every sample as printed, with no padding.

Speed and gain come from the caller's configuration; printed labels are not read
(a gain that disagrees with the page shows as a failed calibration check).
Assumes a standard grid: 1 mm minor lines and darker 5 mm major lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

FloatArray = NDArray[np.float32]
Float64Array = NDArray[np.float64]

LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
ROWS_3X4 = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))


@dataclass(frozen=True)
class Layout:
    """Rows of equal-duration lead segments, then full-length rhythm strips."""

    rows: tuple[tuple[str, ...], ...]
    rhythm: tuple[str, ...] = ()
    record_s: float = 10.0


LAYOUTS: dict[str, Layout] = {
    "3x4": Layout(ROWS_3X4),
    "3x4+II": Layout(ROWS_3X4, ("II",)),
    "3x4+V1+II+V5": Layout(ROWS_3X4, ("V1", "II", "V5")),
    "6x2": Layout(tuple(zip(LEAD_NAMES[:6], LEAD_NAMES[6:], strict=True))),
    "12x1": Layout(tuple((name,) for name in LEAD_NAMES)),
}

CALIBRATION_TOLERANCE = 0.05  # pulse vs 1 mV, and grid pitch vs dpi
GRID_MIN_CONTRAST = 12.0  # 1 mm line's spectral peak over the spectrum's median
FLAT_MV = 0.1  # a lead whose peak-to-peak is below this is flat
ROTATION_LIMIT_DEG = 6.0
GREY_INK = 0.6  # in a grey scan, darkness above this is ink, below it grid or paper


@dataclass(frozen=True)
class EcgDigitization:
    """What one page gave: leads in mV, what was measured, and the checks that failed.

    ``leads``: each lead's printed segment in mV (float32, ``sampling_hz``), starting
    ``lead_start_s[name]`` seconds into the record; ``rhythm``: full-length strips.
    ``pixels_per_mm`` is the mean of the grid's x and y pitch (``pixels_per_mm_xy``);
    ``rotation_deg`` is the page's rotation found and undone (counter-clockwise
    positive); ``calibration_mv`` the pulse's height read as mV (None: no pulse);
    ``baselines_px`` each row's 0 mV line after deskewing.
    """

    leads: dict[str, FloatArray]
    lead_start_s: dict[str, float]
    rhythm: dict[str, FloatArray]
    sampling_hz: int
    pixels_per_mm: float
    rotation_deg: float
    calibration_mv: float | None
    heart_rate_bpm: float | None
    checks: tuple[str, ...]
    pixels_per_mm_xy: tuple[float, float] = (math.nan, math.nan)
    baselines_px: tuple[float, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every sanity check passed: the page may be sent as a waveform."""
        return not self.checks


@dataclass(frozen=True)
class _Pitch:
    x: float
    y: float


def digitize(
    image: NDArray[np.uint8] | Image.Image,
    *,
    dpi: float | None,
    layout: str = "3x4+II",
    speed_mm_s: float = 25.0,
    gain_mm_mv: float = 10.0,
    sampling_hz: int = 500,
) -> EcgDigitization:
    """Digitize one printed ECG page (RGB or grey, 8 bits) laid out as ``layout``.

    ``dpi`` (the scanner's, when known) is only checked against the grid's pitch;
    ``speed_mm_s`` and ``gain_mm_mv`` are the printout's paper speed and gain
    (from the configuration); the leads come out at ``sampling_hz``. Never raises
    for a bad page: what is wrong with it is in ``checks``.
    """
    spec = LAYOUTS.get(layout)
    if spec is None:
        raise ValueError(f"unknown ECG layout {layout!r}; known: {', '.join(LAYOUTS)}")
    rgb = _to_rgb(image)
    page = _normalize_light(rgb)
    grey = _is_grey(rgb)
    angle = _estimate_rotation(_grid_strength(page, grey))
    if abs(angle) >= 0.05:
        page = _rotate(page, -angle)
    pitch = _grid_pitch(_grid_strength(page, grey))

    def failed(*checks: str, ppmm: float = math.nan) -> EcgDigitization:
        return EcgDigitization({}, {}, {}, sampling_hz, ppmm, angle, None, None, checks)

    if pitch is None:
        return failed("no grid found")
    checks: list[str] = []
    ppmm = (pitch.x + pitch.y) / 2
    if dpi is not None and abs(ppmm / (dpi / 25.4) - 1) > CALIBRATION_TOLERANCE:
        checks.append(f"grid pitch disagrees with dpi: {ppmm:.2f} px/mm, dpi says {dpi / 25.4:.2f}")
    ink = _ink(page, grey, pitch.y)
    mask = ink > 0.45
    n_rows = len(spec.rows) + len(spec.rhythm)
    rows = _find_rows(mask, n_rows, pitch.y)
    if len(rows) < n_rows:
        return failed(*checks, f"layout {layout}: {len(rows)} of {n_rows} rows found", ppmm=ppmm)
    px_per_s = pitch.x * speed_mm_s
    lw = _line_width(mask, rows, pitch)
    x0 = _time_origin(
        mask, page, grey=grey, rows=rows, length_px=spec.record_s * px_per_s, pitch=pitch, lw=lw
    )
    if x0 is None:
        return failed(*checks, "no trace found", ppmm=ppmm)
    pulses = [_calibration_pulse(mask, ink, row_y=y, x0=x0, pitch=pitch, lw=lw) for y in rows]
    heights = [p[1] for p in pulses if p is not None]
    calibration = float(np.median(heights)) / (pitch.y * gain_mm_mv) if heights else None
    if calibration is None:
        checks.append("calibration pulse missing")
    elif abs(calibration - 1.0) > CALIBRATION_TOLERANCE:
        checks.append(f"calibration pulse {calibration:.3f} mV: grid pitch and pulse disagree")
    baselines = [p[0] if p is not None else y for p, y in zip(pulses, rows, strict=True)]
    mv_per_px = 1.0 / (pitch.y * gain_mm_mv)
    bands = _row_bands(rows, mask.shape[0])
    mask = _erase_ticks(mask, spec, baselines=baselines, x0=x0, px_per_s=px_per_s, lw=lw)

    def trace(row: int, t0: float, t1: float) -> FloatArray:
        c0, c1 = x0 + t0 * px_per_s, x0 + t1 * px_per_s
        cols, ys = _trace_segment(
            mask, ink, band=bands[row], baseline=rows[row], c0=c0, c1=c1, lw=lw
        )
        n = round((t1 - t0) * sampling_hz)
        if len(cols) < 0.1 * (c1 - c0):
            return np.zeros(n, dtype=np.float32)
        t_cols = (cols + 0.5 - x0) / px_per_s
        mv = (baselines[row] - ys) * mv_per_px
        return np.interp(t0 + np.arange(n) / sampling_hz, t_cols, mv).astype(np.float32)

    leads: dict[str, FloatArray] = {}
    starts: dict[str, float] = {}
    for r, names in enumerate(spec.rows):
        seg_s = spec.record_s / len(names)
        for k, name in enumerate(names):
            starts[name] = k * seg_s
            leads[name] = trace(r, k * seg_s, (k + 1) * seg_s)
    rhythm = {
        name: trace(len(spec.rows) + i, 0.0, spec.record_s) for i, name in enumerate(spec.rhythm)
    }
    flat = [n for n, v in leads.items() if float(np.ptp(v)) < FLAT_MV]
    flat += [f"{n} (rhythm)" for n, v in rhythm.items() if float(np.ptp(v)) < FLAT_MV]
    if flat:
        checks.append("flat lead: " + ", ".join(flat))
    beat_lead = next(iter(rhythm.values()), leads.get("II"))
    rate = _heart_rate(beat_lead, sampling_hz) if beat_lead is not None else None
    return EcgDigitization(
        leads,
        starts,
        rhythm,
        sampling_hz,
        ppmm,
        angle,
        calibration,
        rate,
        tuple(checks),
        (pitch.x, pitch.y),
        tuple(baselines),
    )


def _to_rgb(image: NDArray[np.uint8] | Image.Image) -> NDArray[np.uint8]:
    """The page as an (H, W, 3) uint8 array; grey is repeated, alpha dropped."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected an 8-bit image, got {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[:, :, :3]
    raise ValueError(f"expected an (H, W) or (H, W, 3|4) image, got shape {arr.shape}")


def _normalize_light(rgb: NDArray[np.uint8]) -> FloatArray:
    """Each channel divided by the local paper white: 90th percentile in blocks, bilinear."""
    h, w, _ = rgb.shape
    step = 2
    block = max(8, min(h, w) // 12 // step)
    sub = rgb[::step, ::step]
    ny, nx = max(sub.shape[0] // block, 1), max(sub.shape[1] // block, 1)
    by, bx = sub.shape[0] // ny, sub.shape[1] // nx
    tiles = sub[: ny * by, : nx * bx].reshape(ny, by, nx, bx, 3).transpose(0, 2, 1, 3, 4)
    white = np.percentile(tiles.reshape(ny, nx, by * bx, 3), 90, axis=2)
    page = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        small = Image.fromarray(np.maximum(white[:, :, c], 40.0).astype(np.float32), "F")
        full = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        np.divide(rgb[:, :, c], full, out=page[:, :, c], dtype=np.float32)
    return page


def _is_grey(rgb: NDArray[np.uint8]) -> bool:
    """True when the three channels are the same (a grey scan): no colour to separate by."""
    red, green, blue = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    return bool(np.array_equal(red, green) and np.array_equal(green, blue))


def _grid_strength(page: FloatArray, grey: bool) -> FloatArray:
    """How grid-like each pixel is: its green darkness where red stays bright.

    A red or pink line absorbs green and blue but not red; black ink absorbs all
    three, so it is left out. Green rather than a red-minus-green difference because
    JPEG keeps luminance sharp and halves colour resolution. In a grey scan the grid
    is whatever is darker than paper but well lighter than ink.
    """
    if grey:
        grid = 1.0 - page[:, :, 0]
        grid[grid > GREY_INK] = 0.0
    else:
        grid = 1.0 - page[:, :, 1]
        grid[page[:, :, 0] < 0.6] = 0.0
    return np.clip(grid, 0.0, 1.0, out=grid)


def _ink(page: FloatArray, grey: bool, ppmm: float) -> FloatArray:
    """How inked each pixel is, 0..1, from the red channel (a red grid is white there).

    From 6.5 px/mm up (165 dpi), pixels less than half covered count for nothing and
    those 90 % covered fully: a thin core of the line, which keeps a QRS complex's up
    and down strokes apart (pen width and the signal's own jitter make a full-width
    line much fatter than the curve it draws). At 4.5 px/mm and below a 0.3 mm line
    is barely a pixel wide, so any darkening counts, in proportion; in between the
    two blend. In a grey scan a red grid line is as dark as half-inked paper, so only
    what is darker than :data:`GREY_INK` counts.
    """
    if grey:
        dark = (1.0 - GREY_INK + 0.05 - page[:, :, 0]) / 0.5
    else:
        core = float(np.clip((ppmm - 4.5) / 2.0, 0.0, 1.0))
        top, span = 0.95 - 0.45 * core, 0.9 - 0.5 * core
        dark = (top - page[:, :, 0]) / span
    return np.clip(dark, 0.0, 1.0, out=dark)


def _estimate_rotation(grid: FloatArray) -> float:
    """Page rotation in degrees (counter-clockwise as seen) that the grid lines show.

    Grid pixels are projected onto both axes of a candidate frame; the frame where
    the lines project sharpest (largest sum of squared histogram counts) wins.
    Coarse 0.25° steps over ±6°, then 0.02° steps, with a parabolic peak fit.
    """
    ys, xs = np.nonzero(grid > 0.15)
    if len(xs) < 1000:
        return 0.0
    keep = max(len(xs) // 150_000, 1)
    ys, xs = ys[::keep].astype(np.float64), xs[::keep].astype(np.float64)
    wt = grid[ys.astype(np.intp), xs.astype(np.intp)].astype(np.float64)

    def sharpness(deg: float) -> float:
        t = math.tan(math.radians(deg))
        u = np.rint(ys + xs * t).astype(np.intp)
        v = np.rint(xs - ys * t).astype(np.intp)
        hu = np.bincount(u - u.min(), weights=wt)
        hv = np.bincount(v - v.min(), weights=wt)
        return float(hu @ hu + hv @ hv)

    coarse = np.arange(-ROTATION_LIMIT_DEG, ROTATION_LIMIT_DEG + 1e-9, 0.25)
    best = float(coarse[int(np.argmax([sharpness(a) for a in coarse]))])
    fine = best + np.arange(-0.3, 0.3 + 1e-9, 0.02)
    scores = np.array([sharpness(a) for a in fine])
    return float(fine[0] + _parabolic_peak(scores, int(np.argmax(scores))) * 0.02)


def _rotate(page: FloatArray, deg: float) -> FloatArray:
    """``page`` turned ``deg`` counter-clockwise about its centre; paper white where nothing was.

    Turned after the lighting is normalized, so the corners it brings in are paper
    like the rest (8 bits of 1/200 each on the way through PIL, bicubic).
    """
    scale = 200
    scaled = page * np.float32(scale)
    u8 = np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)
    img = Image.fromarray(u8, "RGB").rotate(deg, Image.Resampling.BICUBIC, fillcolor=(scale,) * 3)
    out = np.asarray(img).astype(np.float32)
    out *= np.float32(1 / scale)
    return out


def _grid_pitch(grid: FloatArray) -> _Pitch | None:
    """Pixels per mm along x and y from the grid's period; None when there is no grid."""
    px = _profile_pitch(grid.mean(axis=0, dtype=np.float64))
    py = _profile_pitch(grid.mean(axis=1, dtype=np.float64))
    if px is None or py is None or abs(px / py - 1) > CALIBRATION_TOLERANCE:
        return None
    return _Pitch(px, py)


def _profile_pitch(profile: Float64Array) -> float | None:
    """The 1 mm period (px) of a grid profile, or None when it has no strong period.

    The autocorrelation's first peak after its central lobe whose fivefold lag
    peaks strongly too is the 1 mm line spacing (thin lines do not overlap at any
    shorter shift; the 5 mm major lines repeat at five of them). Its 5th and 25th
    multiples refine it to a fraction of a pixel; the spectrum's peak near that
    frequency, on a fine grid, gives the final value, and must stand well above the
    spectrum's median (:data:`GRID_MIN_CONTRAST`).
    """
    n = len(profile)
    if n < 200:
        return None
    x = profile - profile.mean()
    spec = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(spec * np.conj(spec))[: n // 2]
    if acf[0] <= 0:
        return None
    acf /= acf[0]
    lobe = int(np.argmax(acf < 0.2)) if np.any(acf < 0.2) else len(acf)
    peaks = [
        i
        for i in range(max(lobe, 2), min(len(acf) // 5 - 2, 60))
        if acf[i] >= acf[i - 1]
        and acf[i] >= acf[i + 1]
        and acf[i] > 0.15
        and acf[5 * i - 2 : 5 * i + 3].max() > 0.5  # and its 5 mm multiple repeats
    ]
    if not peaks:
        return None
    p = _parabolic_peak(acf, peaks[0])
    for times in (5, 25):  # the same line 5 and 25 lines on: a longer lever
        far = round(times * p)
        if far + 2 >= len(acf):
            break
        window = np.arange(far - 2, far + 3)
        p = _parabolic_peak(acf, int(window[np.argmax(acf[window])])) / times
    window_fn = np.hanning(n)
    f = 1 / p + np.linspace(-1.0, 1.0, 81) / n
    fine = np.abs(np.exp(-2j * np.pi * np.outer(f, np.arange(n))) @ (x * window_fn))
    i = int(np.argmax(fine))
    floor = float(np.median(np.abs(np.fft.rfft(x * window_fn))[n // 50 :])) + 1e-12
    if fine[i] / floor < GRID_MIN_CONTRAST:
        return None
    if 0 < i < len(f) - 1:
        return float(1 / (f[0] + _parabolic_peak(fine, i) * (f[1] - f[0])))
    return float(1 / f[i])


def _parabolic_peak(values: Float64Array, i: int) -> float:
    """The sub-sample position of the peak of ``values`` at index ``i`` (a parabola's top)."""
    if not 0 < i < len(values) - 1:
        return float(i)
    a, b, c = values[i - 1], values[i], values[i + 1]
    denom = a - 2 * b + c
    return float(i + 0.5 * (a - c) / denom) if denom < 0 else float(i)


def _find_rows(mask: NDArray[np.bool_], n_rows: int, ppmm_y: float) -> list[float]:
    """The y of each layout row: the ``n_rows`` most inked lines, at least 12 mm apart."""
    win = max(round(ppmm_y), 1)
    profile = np.convolve(mask.sum(axis=1, dtype=np.float64), np.ones(win) / win, mode="same")
    rows: list[float] = []
    work = profile.copy()
    top = float(profile.max())
    while len(rows) < n_rows and top > 0:
        i = int(np.argmax(work))
        if work[i] < 0.2 * top:
            break
        rows.append(float(i) + 0.5)
        lo, hi = max(i - round(12 * ppmm_y), 0), i + round(12 * ppmm_y)
        work[lo:hi] = 0.0
    return sorted(rows)


def _row_bands(rows: list[float], height: int) -> list[tuple[int, int]]:
    """Rows of pixels searched for each row's trace: most of the way to its neighbours."""
    bands = []
    for i, y in enumerate(rows):
        up = y - rows[i - 1] if i else (rows[1] - y if len(rows) > 1 else height)
        down = rows[i + 1] - y if i + 1 < len(rows) else up
        bands.append((max(int(y - 0.9 * up), 0), min(int(y + 0.9 * down) + 1, height)))
    return bands


def _time_origin(
    mask: NDArray[np.bool_],
    page: FloatArray,
    *,
    grey: bool,
    rows: list[float],
    length_px: float,
    pitch: _Pitch,
    lw: float,
) -> float | None:
    """The x of t = 0 (sub-pixel): each row's trace ends ``length_px`` after it starts.

    A row's right end is past its last inked column; its left end is where the run
    of inked columns reaching back from the right end's estimate begins, used when
    it is within 1 mm of it (the pulse is drawn apart from the trace). The pen's
    round tip reaches half a line beyond both ends, so their mean cancels it; a
    right end alone is corrected by half the measured line width.
    """
    estimates = []
    half = 2 * pitch.y
    for y in rows:
        y0 = max(int(y - half), 0)
        band = mask[y0 : int(y + half) + 1]
        cols = np.flatnonzero(band.any(axis=0))
        if len(cols) < 2:
            continue
        breaks = np.flatnonzero(np.diff(cols) > 1)  # the last 1 mm of contiguous ink ends it
        run_starts = np.concatenate([[0], breaks + 1])
        run_ends = np.concatenate([breaks, [len(cols) - 1]])
        long_runs = np.flatnonzero(cols[run_ends] - cols[run_starts] >= pitch.x)
        if len(long_runs) == 0:
            continue
        last = int(cols[run_ends[long_runs[-1]]])
        right = _edge(page, band, grey=grey, y0=y0, end=last, inward=-1)
        guess = right - length_px
        i = min(int(np.searchsorted(cols, guess + pitch.x)), len(cols) - 1)
        while i > 0 and cols[i - 1] == cols[i] - 1:
            i -= 1
        left = _edge(page, band, grey=grey, y0=y0, end=int(cols[i]), inward=1)
        if abs(left - guess) <= pitch.x:
            estimates.append((left + guess) / 2)
        else:
            estimates.append(guess - lw / 2)
    return float(np.median(estimates)) if estimates else None


def _edge(
    page: FloatArray, band: NDArray[np.bool_], *, grey: bool, y0: int, end: int, inward: int
) -> float:
    """Sub-pixel x where a trace ends at column ``end`` (``inward`` = +1: it goes right).

    Along the rows where the trace ends, a column's coverage is the best among them
    (the pen tip's centre line): full inside, a fraction in the column the tip only
    partly covers, the paper's (or a grid line's) beyond. Scaled between the columns
    beyond and those inside, the partial columns add up to where the edge is.
    """
    w = band.shape[1]
    cols = [end + inward * k for k in range(-6, 6)]
    if not all(0 <= c < w for c in cols):
        return float(end + (inward < 0))
    rows = np.flatnonzero(band[:, [end, end + inward]].any(axis=1))
    if len(rows) == 0:
        return float(end + (inward < 0))
    block = page[y0 + rows.min() : y0 + rows.max() + 1, cols, 0]
    cover = np.clip((GREY_INK - block) / GREY_INK if grey else 1.0 - block, 0.0, 1.0)
    best = cover.max(axis=0)
    floor, full = float(np.median(best[:4])), float(np.median(best[8:]))
    if full - floor <= 0.2:
        return float(end + (inward < 0))
    inked = float(np.clip((best[4:8] - floor) / (full - floor), 0.0, 1.0).sum())  # end-2 .. end+1
    if inward > 0:
        return end + 2 - inked
    return end - 1 + inked


def _line_width(mask: NDArray[np.bool_], rows: list[float], pitch: _Pitch) -> float:
    """The trace's width in px: the median vertical run of ink near the rows' baselines."""
    runs: list[int] = []
    for y in rows:
        band = mask[max(int(y - 3 * pitch.y), 0) : int(y + 3 * pitch.y)]
        counts = band.sum(axis=0)
        runs.extend(int(c) for c in counts[(counts > 0) & (counts < 3 * pitch.y)])
    return float(np.median(runs)) if runs else 0.3 * pitch.y


@dataclass(frozen=True)
class _Runs:
    """Vertical runs of ink in a band, sorted by column then row (band coordinates).

    ``top`` and ``bottom`` are sub-pixel edges: the ink-weighted centre less and plus
    half the ink's mass (its covered length), counting one pixel beyond each end.
    """

    col: NDArray[np.intp]
    first: NDArray[np.intp]  # first inked row
    end: NDArray[np.intp]  # one past the last
    top: Float64Array
    bottom: Float64Array
    centre: Float64Array


def _column_runs(mask: NDArray[np.bool_], ink: FloatArray, merge_gap: float) -> _Runs:
    """The runs of ``mask`` in each column; runs closer than ``merge_gap`` px are one."""
    h, w = mask.shape
    pad = np.zeros((1, w), dtype=bool)
    edges = np.diff(np.vstack([pad, mask, pad]).astype(np.int8), axis=0)
    col, first = np.nonzero(edges.T == 1)
    _, end = np.nonzero(edges.T == -1)
    if len(col) > 1:
        joined = (col[1:] == col[:-1]) & (first[1:] - end[:-1] <= merge_gap)
        keep_first = np.concatenate([[True], ~joined])
        keep_end = np.concatenate([~joined, [True]])
        col, first, end = col[keep_first], first[keep_first], end[keep_end]
    if len(col) == 0:
        none = np.zeros(0)
        return _Runs(col, first, end, none, none, none)
    lo, hi = np.maximum(first - 1, 0), np.minimum(end + 1, h)  # one pixel of edge each side
    lengths = hi - lo
    offsets = np.cumsum(lengths) - lengths
    rows = np.repeat(lo - offsets, lengths) + np.arange(int(lengths.sum()))
    weights = ink[rows, np.repeat(col, lengths)].astype(np.float64)
    mass = np.maximum(np.add.reduceat(weights, offsets), 1e-9)
    centre = np.add.reduceat(weights * (rows + 0.5), offsets) / mass
    return _Runs(col, first, end, centre - mass / 2, centre + mass / 2, centre)


def _erase_ticks(
    mask: NDArray[np.bool_],
    spec: Layout,
    *,
    baselines: list[float],
    x0: float,
    px_per_s: float,
    lw: float,
) -> NDArray[np.bool_]:
    """``mask`` without the lead-change marks: short vertical strokes across the baseline.

    Each boundary between two leads of a row is looked at: the ink through the
    baseline in the boundary's column, up and down; the shorter way is the mark's
    half height (the longer may be a QRS passing by). With the median over all
    boundaries at least 2 px, that much ink around the baseline is erased across the
    mark's width, so the traces' own ink beyond it is still read.
    """
    marks = [
        (base, x0 + k * spec.record_s / len(names) * px_per_s)
        for base, names in zip(baselines, spec.rows, strict=False)
        for k in range(1, len(names))
    ]
    halves = []
    for base, x in marks:
        if not 0 <= int(x) < mask.shape[1]:
            continue
        col, y = mask[:, int(x)], int(base)
        if not 0 <= y < len(col) or not col[y]:
            halves.append(0)
            continue
        up = int(np.argmin(col[y::-1])) if not col[y::-1].all() else y
        down = int(np.argmin(col[y:])) if not col[y:].all() else len(col) - y
        halves.append(min(up, down))
    half = float(np.median(halves)) if halves else 0.0
    if half < 2:
        return mask
    out = mask.copy()
    for base, x in marks:
        rows = slice(int(base - half - 1), int(base + half + 2))
        out[rows, int(x - lw / 2 - 1) : int(x + lw / 2 + 2)] = False
    return out


def _trace_segment(
    mask: NDArray[np.bool_],
    ink: FloatArray,
    *,
    band: tuple[int, int],
    baseline: float,
    c0: float,
    c1: float,
    lw: float,
) -> tuple[Float64Array, Float64Array]:
    """The trace between columns ``c0`` and ``c1`` of one row: (column indices, y in px).

    A least-cost path picks one run of ink per column: a jump between runs costs
    the vertical gap between them (0 when they touch), plus a small pull towards
    the row's baseline so the neighbouring rows' traces are not followed. Then
    ``_column_values`` and ``_steep_values`` turn the chosen runs into one y per
    column.
    """
    guard = 0.5  # half a pixel: the column on a lead change holds both leads' pen tips
    lo, hi = max(math.ceil(c0 + guard), 0), min(math.floor(c1 - guard), mask.shape[1])
    if hi - lo < 2:
        return np.zeros(0), np.zeros(0)
    y0, y1 = band
    runs = _column_runs(mask[y0:y1, lo:hi], ink[y0:y1, lo:hi], merge_gap=lw)
    if len(runs.col) == 0:
        return np.zeros(0), np.zeros(0)
    top, bottom, centre = runs.top, runs.bottom, runs.centre
    prior = 0.02 * np.abs(centre + y0 - baseline)
    path = _best_path(runs, prior, skip=4 * lw + 2)
    cols = runs.col[path]
    ys, steep = _column_values(top[path], bottom[path], lw / 2)
    ys = _steep_values(
        ink[y0:y1, lo:hi],
        cols,
        first=runs.first[path],
        end=runs.end[path],
        ys=ys,
        steep=steep,
        lw=lw,
    )
    return (cols + lo).astype(np.float64), ys + y0


def _best_path(runs: _Runs, prior: Float64Array, skip: float) -> NDArray[np.intp]:
    """Indices of the runs on the least-cost path through the columns (Viterbi).

    States are a column's runs, "skip" (no run here, at cost ``skip``, keeping the
    position of the run it came from) and "not started" (every column so far
    skipped, no position). Moving between runs costs the vertical gap between them
    and a hundredth of the distance between their centres; each chosen run adds its
    ``prior``.
    """
    n = len(runs.col)
    starts = np.flatnonzero(np.diff(runs.col, prepend=-1))
    ends = np.append(starts[1:], n)
    back = np.full(n + len(starts), -1, dtype=np.intp)
    nan = np.array([np.nan, np.nan])
    first = slice(0, ends[0])
    cost = np.concatenate([prior[first], [skip, skip]])
    s_top, s_bot, s_cen = (np.append(a[first], nan) for a in (runs.top, runs.bottom, runs.centre))
    ids = np.concatenate([np.arange(ends[0]), [n, -1]])
    for g in range(1, len(starts)):
        cur = slice(starts[g], ends[g])
        tc, bc, cc = runs.top[cur], runs.bottom[cur], runs.centre[cur]
        # fmax ignores NaN: no position means no gap
        gap = np.fmax(np.fmax(tc[:, None] - s_bot[None, :], s_top[None, :] - bc[:, None]), 0.0)
        shift = np.fmax(np.abs(cc[:, None] - s_cen[None, :]), 0.0)
        total = cost[None, :] + gap + 0.01 * shift
        choice = np.argmin(total, axis=1)
        back[cur] = ids[choice]
        best = int(np.argmin(cost[:-1]))  # skipping continues a started path
        back[n + g] = ids[best]
        run_cost = total[np.arange(len(tc)), choice] + prior[cur]
        cost = np.concatenate([run_cost, [cost[best] + skip, cost[-1] + skip]])
        s_top = np.concatenate([tc, [s_top[best], np.nan]])
        s_bot = np.concatenate([bc, [s_bot[best], np.nan]])
        s_cen = np.concatenate([cc, [s_cen[best], np.nan]])
        ids = np.concatenate([np.arange(starts[g], ends[g]), [n + g, -1]])
    path: list[int] = []
    state = int(ids[int(np.argmin(cost))])
    while state >= 0:
        if state < n:
            path.append(state)
        state = int(back[state])
    return np.array(path[::-1], dtype=np.intp)


def _column_values(
    top: Float64Array, bottom: Float64Array, radius: float
) -> tuple[Float64Array, NDArray[np.bool_]]:
    """One y per column from the top and bottom edges of its ink, and which are steep.

    The middle of the run, except at a peak: a tall run whose top is the highest of
    its neighbours' while both neighbours' middles lie lower is a peak inked by the
    pen's round tip, so the curve reached its top plus the pen's radius (the same,
    mirrored, for a trough). The other tall runs are steep strokes.
    """
    mid = (top + bottom) / 2
    tall = (bottom - top) > 2 * radius + 1.5

    def before(a: Float64Array) -> Float64Array:
        return np.concatenate([a[:1], a[:-1]])

    def after(a: Float64Array) -> Float64Array:
        return np.concatenate([a[1:], a[-1:]])

    peak = tall & (top <= before(top)) & (top <= after(top))
    peak &= (before(mid) > top + radius) & (after(mid) > top + radius)
    trough = tall & (bottom >= before(bottom)) & (bottom >= after(bottom)) & ~peak
    trough &= (before(mid) < bottom - radius) & (after(mid) < bottom - radius)
    ys = np.where(peak, top + radius, np.where(trough, bottom - radius, mid))
    return ys, tall & ~peak & ~trough


def _steep_values(
    ink: FloatArray,
    cols: NDArray[np.intp],
    *,
    first: NDArray[np.intp],
    end: NDArray[np.intp],
    ys: Float64Array,
    steep: NDArray[np.bool_],
    lw: float,
) -> Float64Array:
    """Steep strokes read across: where the stroke's centre line crosses the column's centre.

    Only the ink of the chosen runs counts. In each of its rows a steep stroke is a
    short horizontal run whose ink-weighted centre is a point of the curve; the
    curve's y at the column's centre is interpolated between the two rows whose
    centres straddle it (the crossing nearest the run's middle when there are more).
    """
    if not steep.any():
        return ys
    h, w = ink.shape
    trace = np.zeros((h, w), dtype=bool)
    lengths = end - first
    offsets = np.cumsum(lengths) - lengths
    rows = np.repeat(first - offsets, lengths) + np.arange(int(lengths.sum()))
    trace[rows, np.repeat(cols, lengths)] = True
    across = _column_runs(trace.T, ink.T, merge_gap=0)
    centre = np.full((h, w), np.nan)
    width = np.zeros((h, w))
    counts = across.end - across.first
    where = np.nonzero(trace)
    centre[where] = np.repeat(across.centre, counts)
    width[where] = np.repeat(across.bottom - across.top, counts)
    out = ys.copy()
    for j in np.flatnonzero(steep):
        c, f, e = int(cols[j]), int(first[j]), int(end[j])
        d = centre[f:e, c] - (c + 0.5)
        d[width[f:e, c] > 1.5 * lw + 1] = np.nan
        i = np.flatnonzero(d[:-1] * d[1:] <= 0)
        i = i[(d[i] != d[i + 1]) & (np.abs(d[i] - d[i + 1]) <= lw)]  # one stroke, not two
        if len(i) == 0:
            continue
        cross = f + i + 0.5 + d[i] / (d[i] - d[i + 1])
        out[j] = cross[int(np.argmin(np.abs(cross - ys[j])))]
    return out


def _calibration_pulse(
    mask: NDArray[np.bool_], ink: FloatArray, *, row_y: float, x0: float, pitch: _Pitch, lw: float
) -> tuple[float, float] | None:
    """(baseline y, height in px) of the 1 mV pulse left of t = 0 in one row, if found.

    In the 20 mm before the trace, the columns whose ink is one short run are the
    pulse's flat parts: of their levels (1 mm apart or more), the two most common
    are its plateau (the upper) and its feet (the lower, the 0 mV baseline). Both
    must be there, the plateau at least 2 mm long.
    """
    c0, c1 = max(int(x0 - 20 * pitch.x), 0), int(x0 - 0.5 * pitch.x)
    y0 = max(int(row_y - 30 * pitch.y), 0)
    y1 = min(int(row_y + 10 * pitch.y), mask.shape[0])
    if c1 - c0 < 3 * pitch.x or y1 <= y0:
        return None
    runs = _column_runs(mask[y0:y1, c0:c1], ink[y0:y1, c0:c1], merge_gap=0)
    alone = np.bincount(runs.col)[runs.col] == 1  # a broken vertical edge is many short runs
    flat = alone & ((runs.bottom - runs.top) <= max(2.0 * lw, 2.0))
    ys = runs.centre[flat] + y0
    if len(ys) < 3 * pitch.x:
        return None
    ys = np.sort(ys)
    clusters = np.split(ys, np.flatnonzero(np.diff(ys) > pitch.y) + 1)  # levels 1 mm apart
    clusters.sort(key=len, reverse=True)
    if len(clusters) < 2:
        return None
    plateau, foot = sorted(clusters[:2], key=lambda c: float(c[0]))
    if len(plateau) < 2 * pitch.x or len(foot) < 0.5 * pitch.x:
        return None
    base = float(np.median(foot))
    height = base - float(np.median(plateau))
    if height < 2 * pitch.y:
        return None
    return base, height


def _heart_rate(mv: FloatArray, fs: int) -> float | None:
    """Beats per minute from R peaks: largest |deflections| after a 0.3 s moving-mean high-pass.

    Peaks are local maxima of |x| above half its 99.5th percentile, at least 0.3 s
    apart (the larger wins); the rate is 60 over the median R-R interval.
    """
    x = np.asarray(mv, dtype=np.float64)
    win = max(round(0.3 * fs), 1)
    if len(x) < 2 * win:
        return None
    high = np.abs(x - np.convolve(x, np.ones(win) / win, mode="same"))
    edge = max(win // 2, 1)  # the moving mean is not a mean there
    high[:edge] = high[-edge:] = 0.0
    level = 0.5 * float(np.percentile(high, 99.5))
    if level < FLAT_MV / 2:
        return None
    refractory = round(0.3 * fs)
    peaks: list[int] = []
    for i in np.argsort(-high):
        if high[i] < level:
            break
        if all(abs(int(i) - p) >= refractory for p in peaks):
            peaks.append(int(i))
    if len(peaks) < 3:
        return None
    rr = np.diff(np.sort(peaks)) / fs
    return float(60.0 / np.median(rr))
