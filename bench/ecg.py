"""ECG digitization benchmark: SNR per resolution x distortion, seconds per page, reviews.

    .venv/bin/python bench/ecg.py [--quick] [--pages N] [--json [FILE]]

Every page is pydicom's waveform_ecg.dcm (12 leads, 10 s at 1 kHz) printed by the
test printer ``tests/fakes/ecg_render.py`` as a 3x4 + II page (25 mm/s, 10 mm/mV,
red/pink grid, 1 mV pulses, lead labels, lead-change ticks) at 100, 200 and 300 dpi,
then spoiled:

* clean;
* noise: Gaussian, sigma 8 grey levels on every channel (``--pages`` seeds);
* rotation: +3 and -3 degrees (bicubic, white corners);
* JPEG at quality 65 (PIL's default 4:2:0 chroma subsampling);
* uneven light: a left-to-right gradient times a vignette, the darkest corner at
  about half the brightest;
* all combined: noise, rotation +-2.3 degrees, JPEG 70 and the uneven light
  (``--pages`` seeds, alternating the sign of the rotation).

``drivers.ecg.digitize`` reads each page, told its dpi, in this one process pinned
to one CPU with BLAS/OpenMP held to one thread; its CPU time
(``time.process_time``) is the seconds per page. Each of the 12 leads' 2.5 s segment
is compared with the original samples in its time slot (resampled to 1 kHz) by the
PhysioNet/CinC Challenge rules: 2024, 10*log10(signal power / error power), no
alignment; 2025, the best shift within +-0.2 s and a constant offset removed first.
A cell's SNR is the mean over its pages of the 12-lead mean; "worst" is the lowest
single lead. A page whose own checks fail (no grid, pitch vs dpi, calibration pulse,
flat lead) is not sent as a waveform: it goes to human review, is counted as such
and left out of the SNR.

Targets (2024 rule): mean >= 18 dB on clean 300 dpi pages; >= 12 dB on the noisy,
rotated, JPEG, uneven-light (and combined) pages at 200 and 300 dpi; every page
under 3 s of CPU. Exit status 0 only when all are met. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one thread

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]  # bench/dicom.py
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
from fakes.ecg_render import (  # noqa: E402
    Distortion,
    RenderedEcg,
    render_ecg,
    resample_to,
    snr_db,
    snr_db_aligned,
)

from drivers.ecg.digitize import EcgDigitization, digitize  # noqa: E402

DPIS = (100, 200, 300)
TARGET_CLEAN_300 = 18.0
TARGET_SPOILED = 12.0  # at 200 and 300 dpi
TARGET_PAGE_S = 3.0


def distortions(pages: int) -> dict[str, list[Distortion]]:
    """The table's columns: the pages rendered for each."""
    return {
        "clean": [Distortion()],
        "noise": [Distortion(noise_sigma=8.0, seed=s) for s in range(pages)],
        "rotation ±3°": [Distortion(rotation_deg=3.0), Distortion(rotation_deg=-3.0)],
        "JPEG q65": [Distortion(jpeg_quality=65)],
        "uneven light": [Distortion(uneven_light=0.6)],
        "all combined": [
            Distortion(
                noise_sigma=8.0,
                rotation_deg=2.3 if s % 2 == 0 else -2.3,
                jpeg_quality=70,
                uneven_light=0.6,
                seed=100 + s,
            )
            for s in range(pages)
        ],
    }


@dataclass
class PageResult:
    dpi: int
    column: str
    distortion: dict[str, Any]
    cpu_s: float
    wall_s: float
    checks: list[str]
    snr_2024: dict[str, float]
    snr_2025: dict[str, float]
    rhythm_snr_2024: float | None
    heart_rate_error_bpm: float | None
    calibration_mv: float | None
    rotation_error_deg: float
    pixels_per_mm_error: float

    @property
    def review(self) -> bool:
        return bool(self.checks)


def measure(rendered: RenderedEcg, column: str) -> PageResult:
    """Digitize one page (timed) and score it against the original record."""
    image = np.asarray(rendered.image)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    got: EcgDigitization = digitize(image, dpi=rendered.dpi)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    snr24: dict[str, float] = {}
    snr25: dict[str, float] = {}
    for name, truth in rendered.leads.items():
        if name not in got.leads:
            continue
        est = resample_to(got.leads[name], got.sampling_hz, len(truth.mv), rendered.fs)
        snr24[name] = round(snr_db(truth.mv, est), 2)
        snr25[name] = round(snr_db_aligned(truth.mv, est, rendered.fs), 2)
    rhythm = None
    if "II" in got.rhythm:
        truth_ii = rendered.rhythm["II"]
        est = resample_to(got.rhythm["II"], got.sampling_hz, len(truth_ii), rendered.fs)
        rhythm = round(snr_db(truth_ii, est), 2)
    hr_error = None
    if got.heart_rate_bpm is not None:
        hr_error = round(got.heart_rate_bpm - rendered.heart_rate_bpm, 2)
    return PageResult(
        dpi=int(rendered.dpi),
        column=column,
        distortion=asdict(rendered.distortion),
        cpu_s=round(cpu, 3),
        wall_s=round(wall, 3),
        checks=list(got.checks),
        snr_2024=snr24,
        snr_2025=snr25,
        rhythm_snr_2024=rhythm,
        heart_rate_error_bpm=hr_error,
        calibration_mv=None if got.calibration_mv is None else round(got.calibration_mv, 4),
        rotation_error_deg=round(got.rotation_deg - rendered.distortion.rotation_deg, 3),
        pixels_per_mm_error=round(got.pixels_per_mm / (rendered.dpi / 25.4) - 1, 5),
    )


@dataclass
class Cell:
    pages: int
    review: int
    snr_2024: float | None  # mean over sent pages of the 12-lead mean
    snr_2025: float | None
    worst_2024: float | None
    cpu_mean_s: float
    cpu_max_s: float


def summarize(results: list[PageResult]) -> Cell:
    sent = [r for r in results if not r.review and r.snr_2024]
    cpu = [r.cpu_s for r in results]

    def mean_of(key: str) -> float | None:
        if not sent:
            return None
        return round(float(np.mean([np.mean(list(getattr(r, key).values())) for r in sent])), 2)

    worst = round(min(min(r.snr_2024.values()) for r in sent), 2) if sent else None
    return Cell(
        pages=len(results),
        review=len(results) - len(sent),
        snr_2024=mean_of("snr_2024"),
        snr_2025=mean_of("snr_2025"),
        worst_2024=worst,
        cpu_mean_s=round(float(np.mean(cpu)), 3),
        cpu_max_s=round(float(np.max(cpu)), 3),
    )


def table(title: str, cells: dict[tuple[int, str], Cell], columns: list[str], fmt: Any) -> str:
    head = f"| dpi | {' | '.join(columns)} |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = [
        f"| {dpi} | "
        + " | ".join(fmt(cells[dpi, c]) if (dpi, c) in cells else "" for c in columns)
        + " |"
        for dpi in sorted({d for d, _ in cells})
    ]
    return "\n".join([f"\n{title}\n", head, rule, *rows])


def db(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def targets(cells: dict[tuple[int, str], Cell]) -> list[tuple[str, bool | None, str]]:
    """(target, met, figure) for each target; met None when the run did not measure it."""
    out: list[tuple[str, bool | None, str]] = []
    clean = cells.get((300, "clean"))
    if clean is None:
        out.append((f"clean 300 dpi mean >= {TARGET_CLEAN_300:g} dB", None, "not run"))
    else:
        ok = clean.snr_2024 is not None and clean.snr_2024 >= TARGET_CLEAN_300
        out.append(
            (f"clean 300 dpi mean >= {TARGET_CLEAN_300:g} dB", ok, f"{db(clean.snr_2024)} dB")
        )
    spoiled = {k: c for k, c in cells.items() if k[0] in (200, 300) and k[1] != "clean"}
    if spoiled:
        low = min(
            spoiled.items(), key=lambda kv: -1e9 if kv[1].snr_2024 is None else kv[1].snr_2024
        )
        ok = all(c.snr_2024 is not None and c.snr_2024 >= TARGET_SPOILED for c in spoiled.values())
        (dpi, column), cell = low
        out.append(
            (
                f"spoiled pages, 200-300 dpi: every cell >= {TARGET_SPOILED:g} dB",
                ok,
                f"lowest {db(cell.snr_2024)} dB ({column}, {dpi} dpi)",
            )
        )
    worst_cpu = max(c.cpu_max_s for c in cells.values())
    out.append(
        (
            f"every page < {TARGET_PAGE_S:g} s CPU, one core",
            worst_cpu < TARGET_PAGE_S,
            f"max {worst_cpu:.2f} s",
        )
    )
    return out


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "drivers/ecg", "tests/fakes/ecg_render.py")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty.splitlines()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 dpi only, one page per column")
    p.add_argument("--pages", type=int, help="seeds for noise and combined (default 2)")
    p.add_argument(
        "--json",
        nargs="?",
        const="ecg.json",
        metavar="FILE",
        help="every page's figures as JSON (default bench/out/ecg.json; bare names go there)",
    )
    args = p.parse_args(argv)
    pages = args.pages or (1 if args.quick else 2)
    dpis = (200,) if args.quick else DPIS
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    columns = distortions(pages)
    print(
        f"medgw ECG digitization bench: dpi {', '.join(map(str, dpis))}, {pages} page(s) per "
        f"seeded column, one CPU (of {os.cpu_count()}), numpy {np.__version__}",
        flush=True,
    )
    results: list[PageResult] = []
    cells: dict[tuple[int, str], Cell] = {}
    for dpi in dpis:
        for column, spoils in columns.items():
            cell_results = [measure(render_ecg(dpi, d), column) for d in spoils]
            results += cell_results
            cells[dpi, column] = cell = summarize(cell_results)
            print(
                f"  {dpi} dpi {column:13s} 2024 {db(cell.snr_2024):>5} dB  2025 "
                f"{db(cell.snr_2025):>5} dB  worst lead {db(cell.worst_2024):>5} dB  "
                f"{cell.cpu_mean_s:.2f} s/page  review {cell.review}/{cell.pages}",
                flush=True,
            )
    names = list(columns)
    print(
        table(
            "SNR, 2024 rule (no alignment), dB: mean of 12 leads (worst lead)",
            cells,
            names,
            lambda c: f"{db(c.snr_2024)} ({db(c.worst_2024)})",
        )
    )
    print(
        table(
            "SNR, 2025 rule (best shift within ±0.2 s, offset removed), dB: mean of 12 leads",
            cells,
            names,
            lambda c: db(c.snr_2025),
        )
    )
    print(
        table(
            "CPU seconds per page, one core: mean (max)",
            cells,
            names,
            lambda c: f"{c.cpu_mean_s:.2f} ({c.cpu_max_s:.2f})",
        )
    )
    print(
        table(
            "Pages sent to human review (own checks failed) / pages",
            cells,
            names,
            lambda c: f"{c.review}/{c.pages}",
        )
    )
    sent = [r for r in results if not r.review]
    hr = [abs(r.heart_rate_error_bpm) for r in sent if r.heart_rate_error_bpm is not None]
    cal = [r.calibration_mv for r in sent if r.calibration_mv is not None]
    rot = [abs(r.rotation_error_deg) for r in results]
    rhythm = [r.rhythm_snr_2024 for r in sent if r.rhythm_snr_2024 is not None]
    nan = float("nan")
    print(
        f"\nsent pages: heart rate error max {max(hr, default=nan):.2f} bpm; "
        f"calibration pulse {min(cal, default=nan):.3f}-{max(cal, default=nan):.3f} mV; "
        f"rotation error max {max(rot, default=nan):.3f}°; "
        f"rhythm strip II (10 s) 2024 SNR {min(rhythm, default=nan):.1f}-"
        f"{max(rhythm, default=nan):.1f} dB"
    )
    for r in results:
        if r.review:
            print(f"  review: {r.dpi} dpi {r.column} {r.distortion}: {'; '.join(r.checks)}")
    print("\ntargets (2024 rule):")
    verdicts = targets(cells)
    for name, met, figure in verdicts:
        mark = "n/a " if met is None else ("PASS" if met else "FAIL")
        print(f"  [{mark}] {name}: {figure}")
    if args.json:
        path = Path(args.json)
        if path.parent == Path():
            path = BENCH / "out" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "processor": platform.processor() or platform.machine(),
            },
            "code": code_version(),
            "options": {"dpis": list(dpis), "pages": pages},
            "cells": [{"dpi": d, "column": c, **asdict(cell)} for (d, c), cell in cells.items()],
            "targets": [{"target": n, "met": m, "figure": f} for n, m, f in verdicts],
            "pages": [asdict(r) for r in results],
        }
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        print(f"JSON written to {path}")
    return 0 if all(met is not False for _, met, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
