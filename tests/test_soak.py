"""The soak's short form: ``bench/soak.py`` for 1.5 minutes, its report checked here.

DICOM (a pynetdicom modality), HL7 (a HIS over MLLP) and ASTM (the real XN-550
capture over TCP) flow at once through the real gateway to DCMTK ``storescp``
and an MLLP LIS, while the gateway is SIGKILLed at random, the PACS is killed
and the LIS goes down. The long form is the same script run for 30 minutes or
more (bench/README.md). ``MEDGW_SOAK_SEED`` replays a run; the seed is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MEDGW_SOAK_SEED", "20261123"))
MINUTES = 1.5
KILL_EVERY_S = 25

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK not installed (storescp): apt-get install dcmtk")
    work = tmp_path_factory.mktemp("soak")
    out = work / "report.json"
    argv = [sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", str(MINUTES)]
    argv += ["--kill-every", str(KILL_EVERY_S), "--seed", str(SEED)]
    argv += ["--workdir", str(work / "run"), "--json", str(out)]
    print(f"soak seed={SEED} (MEDGW_SOAK_SEED to replay), work folder {work}")
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout[-4000:], done.stderr[-4000:])
    assert out.exists(), f"the soak wrote no report (exit {done.returncode})"
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.mark.timeout(660)
def test_nothing_accepted_is_lost_or_altered(report: dict[str, Any]) -> None:
    for name, flow in report["flows"].items():
        assert flow["accepted"] > 0, f"{name}: the gateway accepted nothing"
        assert flow["lost_count"] == 0, f"{name}: lost {flow['lost']}"
        assert flow["delivered"] == flow["accepted"], name
        assert not flow["altered"], f"{name}: altered on the way: {flow['altered']}"
        assert not flow["unknown"], f"{name}: delivered what nobody sent: {flow['unknown']}"
    assert report["flows"]["astm"]["distinct_result_sets"] == 1
    assert not any(report["dead"].values()), report["dead"]


def test_the_faults_really_happened(report: dict[str, Any]) -> None:
    """A soak in which nothing failed proves nothing: kills, outages and refusals are counted."""
    assert report["kills"] >= 2, report["events"]
    assert report["pacs_outages"] >= 1 and report["lis_outages"] >= 1, report["events"]
    refused = {name: sum(f["failed_attempts"].values()) for name, f in report["flows"].items()}
    assert all(n > 0 for n in refused.values()), f"no sender ever saw the gateway gone: {refused}"
    assert report["resources"]["samples"] > 60, report["resources"]


def test_the_gateway_ends_clean_without_leaked_descriptors(report: dict[str, Any]) -> None:
    assert report["clean_exit_code"] == 0
    fds = report["fds_idle"]
    assert 0 < fds["end"] <= fds["start"] + 10, fds
    assert report["sender_errors"] == [] and report["chaos_error"] is None
    assert report["verdict"] == [], report["verdict"]


def test_the_report_counts_made_up_losses_duplicates_and_alterations() -> None:
    """The soak's own bookkeeping, on made-up deliveries: each failure is seen."""
    sys.path.insert(0, str(REPO / "bench"))
    from _soak_peers import Tally  # noqa: PLC0415
    from soak import flow_report, slope_per_min  # noqa: PLC0415

    tally = Tally("hl7")
    for item in ("a", "b", "c", "d"):
        tally.accept(item, f"sha-{item}")
    delivered = [("a", "sha-a"), ("a", "sha-a"), ("b", "sha-b"), ("c", "other"), ("x", "sha-x")]
    flow = flow_report(tally, delivered, {"a": tally.accepted_at["a"] + 2}, check_bytes=True)
    assert flow["lost"] == ["d"] and flow["lost_count"] == 1
    assert flow["duplicate_deliveries"] == 1
    assert flow["altered"] == ["c"]
    assert flow["unknown"] == ["x"]
    assert flow["delivered"] == 3
    assert flow["latency_s"]["max"] == pytest.approx(2, abs=0.01)
    assert slope_per_min([(0, 100), (60, 102), (120, 104)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 100), (60, 100)]) == 0
