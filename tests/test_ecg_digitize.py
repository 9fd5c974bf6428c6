"""Paper ECG round trips: pydicom's 12-lead record printed by the test printer, read back.

The printer (``fakes.ecg_render``) draws waveform_ecg.dcm as a 3x4 + II page at
25 mm/s and 10 mm/mV; ``drivers.ecg.digitize`` reads it back and each lead is
compared with the original samples by the PhysioNet/CinC 2024 SNR (no alignment).
The reference heart rate comes from the original lead II at 1 kHz through the
printer module's own Pan-Tompkins-style detector, independent of the digitizer's
R-peak detector. Noise is seeded, so every figure here is deterministic.

Measured when these bounds were set (2024 rule, mean / worst lead): 100 dpi 13.1 /
7.9 dB, 200 dpi 19.8 / 11.4, 300 dpi 18.6 / 12.5; lead III (0.09 mV rms, with
0.01 mV of sample-to-sample jitter a 0.3 mm pen cannot draw) is always the worst.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from fakes.ecg_render import (
    Distortion,
    RenderedEcg,
    load_record,
    reference_heart_rate,
    render_ecg,
    resample_to,
    snr_db,
    snr_db_aligned,
)
from PIL import Image

from drivers.ecg.digitize import LEAD_NAMES, EcgDigitization, digitize

CLEAN = Distortion()


@cache
def page(dpi: float, distortion: Distortion = CLEAN) -> RenderedEcg:
    """One rendered page per (dpi, distortion), shared by the tests."""
    return render_ecg(dpi, distortion)


@cache
def read(dpi: float, distortion: Distortion = CLEAN) -> EcgDigitization:
    """The digitizer's reading of :func:`page`, told the page's dpi."""
    return digitize(page(dpi, distortion).image, dpi=dpi)


def lead_snrs(rendered: RenderedEcg, got: EcgDigitization) -> dict[str, float]:
    """2024-rule SNR per lead: the digitized segment at the original rate vs the original."""
    out = {}
    for name, truth in rendered.leads.items():
        est = resample_to(got.leads[name], got.sampling_hz, len(truth.mv), rendered.fs)
        out[name] = snr_db(truth.mv, est)
    return out


def assert_round_trip(dpi: float, distortion: Distortion, mean_db: float, worst_db: float) -> None:
    rendered, got = page(dpi, distortion), read(dpi, distortion)
    assert got.ok, got.checks
    snrs = lead_snrs(rendered, got)
    assert set(snrs) == set(LEAD_NAMES)
    table = ", ".join(f"{k} {v:.1f}" for k, v in snrs.items())
    assert np.mean(list(snrs.values())) >= mean_db, table
    assert min(snrs.values()) >= worst_db, table


def test_round_trip_200_dpi_clean() -> None:
    assert_round_trip(200, CLEAN, mean_db=15.0, worst_db=10.0)


def test_200_dpi_calibration_pitch_and_heart_rate() -> None:
    rendered, got = page(200), read(200)
    assert got.calibration_mv == pytest.approx(1.0, rel=0.05)
    assert got.pixels_per_mm == pytest.approx(200 / 25.4, rel=0.02)
    assert got.heart_rate_bpm is not None
    assert abs(got.heart_rate_bpm - rendered.heart_rate_bpm) <= 3.0
    assert 55 < rendered.heart_rate_bpm < 70  # the record is a ~61 bpm sinus rhythm


def test_output_shapes_and_slots() -> None:
    got = read(200)
    assert got.sampling_hz == 500
    for name in LEAD_NAMES:
        assert got.leads[name].dtype == np.float32
        assert len(got.leads[name]) == 1250  # 2.5 s
    assert got.lead_start_s == {
        **dict.fromkeys(("I", "II", "III"), 0.0),
        **dict.fromkeys(("aVR", "aVL", "aVF"), 2.5),
        **dict.fromkeys(("V1", "V2", "V3"), 5.0),
        **dict.fromkeys(("V4", "V5", "V6"), 7.5),
    }
    assert list(got.rhythm) == ["II"]
    assert len(got.rhythm["II"]) == 5000


def test_rhythm_strip_round_trip() -> None:
    rendered, got = page(200), read(200)
    truth = rendered.rhythm["II"]
    est = resample_to(got.rhythm["II"], got.sampling_hz, len(truth), rendered.fs)
    assert snr_db(truth, est) >= 15.0


@pytest.mark.parametrize(("dpi", "mean_db", "worst_db"), [(100, 12.0, 6.0), (300, 18.0, 10.0)])
def test_round_trip_other_resolutions(dpi: int, mean_db: float, worst_db: float) -> None:
    assert_round_trip(dpi, CLEAN, mean_db=mean_db, worst_db=worst_db)
    assert read(dpi).pixels_per_mm == pytest.approx(dpi / 25.4, rel=0.02)
    assert read(dpi).calibration_mv == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("angle", [2.5, -3.0])
def test_rotated_page_is_deskewed(angle: float) -> None:
    distortion = Distortion(rotation_deg=angle)
    assert read(200, distortion).rotation_deg == pytest.approx(angle, abs=0.3)
    assert_round_trip(200, distortion, mean_db=15.0, worst_db=10.0)


def test_noisy_page() -> None:
    assert_round_trip(200, Distortion(noise_sigma=8.0, seed=7), mean_db=15.0, worst_db=10.0)


def test_scan_with_everything_wrong() -> None:
    """Noise, 2° of rotation, JPEG at quality 70 and a dark corner at once."""
    distortion = Distortion(noise_sigma=8.0, rotation_deg=2.0, jpeg_quality=70, uneven_light=0.6)
    assert_round_trip(200, distortion, mean_db=12.0, worst_db=8.0)


def test_grey_scan() -> None:
    rendered = page(200)
    got = digitize(np.asarray(rendered.image.convert("L")), dpi=200)
    assert got.ok, got.checks
    snrs = lead_snrs(rendered, got)
    assert np.mean(list(snrs.values())) >= 15.0


def test_blank_page_has_no_grid() -> None:
    rng = np.random.default_rng(1)
    blank = np.clip(rng.normal(248.0, 5.0, (1700, 2200, 3)), 0, 255).astype(np.uint8)
    got = digitize(blank, dpi=200)
    assert not got.ok
    assert got.checks == ("no grid found",)
    assert got.leads == {}


def test_printout_without_grid_is_refused() -> None:
    """A photo of traces on plain paper: nothing to measure millimetres by."""
    got = digitize(render_ecg(200, Distortion(noise_sigma=5.0, seed=2), grid=False).image, dpi=200)
    assert not got.ok
    assert "no grid found" in got.checks


def test_photo_without_grid_is_refused() -> None:
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((2200, 1700), Image.Resampling.BICUBIC)
    got = digitize(photo, dpi=200)
    assert got.checks == ("no grid found",)


def test_flat_traces_fail_the_flat_lead_check() -> None:
    signals, fs = load_record()
    flat = {name: np.zeros_like(mv) for name, mv in signals.items()}
    got = digitize(render_ecg(200, signals=flat, fs=fs).image, dpi=200)
    assert not got.ok
    assert any(check.startswith("flat lead") for check in got.checks), got.checks
    assert got.calibration_mv == pytest.approx(1.0, rel=0.05)  # the pulses are still there
    assert got.heart_rate_bpm is None


def test_wrong_dpi_is_a_failed_check() -> None:
    got = digitize(page(200).image, dpi=300)
    assert any(check.startswith("grid pitch disagrees with dpi") for check in got.checks)


def test_wrong_gain_shows_in_the_calibration_pulse() -> None:
    got = digitize(page(200).image, dpi=200, gain_mm_mv=20.0)
    assert got.calibration_mv == pytest.approx(0.5, rel=0.05)
    assert any("calibration pulse" in check for check in got.checks)


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="unknown ECG layout"):
        digitize(page(100).image, dpi=100, layout="4x3")


def test_reference_heart_rate_of_the_record() -> None:
    signals, fs = load_record()
    assert reference_heart_rate(signals["II"], fs) == pytest.approx(61.0, abs=1.0)


def test_snr_rules() -> None:
    fs = 1000.0
    t = np.arange(2500) / fs
    ref = np.sin(2 * np.pi * 1.3 * t) + 0.5 * np.sin(2 * np.pi * 7.0 * t)
    assert snr_db(ref, ref + 0.01 * ref) == pytest.approx(40.0, abs=0.01)
    late = np.interp(t - 0.05, t, ref) + 0.3  # 50 ms late and 0.3 mV up
    assert snr_db(ref, late) < 5.0
    assert snr_db_aligned(ref, late, fs) > 25.0
    too_late = np.interp(t - 0.3, t, ref)
    assert snr_db_aligned(ref, too_late, fs) < 10.0
