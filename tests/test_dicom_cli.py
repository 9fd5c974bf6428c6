"""``medgw dicom echo|send|complete`` as a technician runs them (subprocesses), against
DCMTK's storescp, a closed port, and the gateway itself.

``send`` does not decode or re-encode: with DCMTK's bit-preserving storescp on the
other end (and with the gateway), the data set bytes that arrive are the source
file's bytes after its file meta, byte for byte.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from dicom_peers import (
    copy_testdata,
    eventually,
    file_info,
    free_port,
    medgw,
    need_dcmtk,
    running_gateway,
    storescp,
)
from pydicom import dcmread

SET = ("CT_small.dcm", "RG1_J2KR.dcm", "JPEG-LL.dcm", "ExplVR_BigEnd.dcm", "rtplan.dcm")


def _data_set(path: Path) -> bytes:
    return path.read_bytes()[file_info(path).dataset_offset :]


def _tracked(state: Path) -> int:
    db = state / "dicom-studies.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.slow
def test_echo_and_send_to_storescp(tmp_path: Path) -> None:
    need_dcmtk("storescp")
    files = copy_testdata(SET, tmp_path / "in")
    loose = copy_testdata(["MR_small.dcm"], tmp_path / "loose")[0]
    (tmp_path / "in" / "notes.txt").write_text("not DICOM\n")
    received = tmp_path / "received"
    with storescp(received) as port:
        echo = medgw("dicom", "echo", f"STORESCP@127.0.0.1:{port}")
        send = medgw(
            "dicom", "send", str(tmp_path / "in"), str(loose), f"STORESCP@127.0.0.1:{port}"
        )
    assert echo.returncode == 0, echo.stdout
    assert "C-ECHO 0x0000 Success" in echo.stdout
    assert " ms" in echo.stdout
    assert send.returncode == 1, send.stdout  # notes.txt was not DICOM
    assert "notes.txt: SKIPPED" in send.stdout
    assert f"{len(files) + 1} sent, 1 failed" in send.stdout
    got = {_sop(p): _data_set(p) for p in received.iterdir()}
    for source in [*files, loose]:
        assert got[_sop(source)] == _data_set(source), source.name


def test_echo_and_send_to_a_closed_port_fail_cleanly(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    copy_testdata(["CT_small.dcm", "MR_small.dcm"], tmp_path / "in")
    echo = medgw("dicom", "echo", f"PACS@127.0.0.1:{port}", "--timeout", "3")
    send = medgw("dicom", "send", str(tmp_path / "in"), f"PACS@127.0.0.1:{port}", "--timeout", "3")
    assert echo.returncode == 1
    assert "FAILED cannot connect" in echo.stdout
    assert "Traceback" not in echo.stdout
    assert send.returncode == 1
    assert "CT_small.dcm: FAILED cannot connect" in send.stdout
    assert "1 more file(s) not sent" in send.stdout  # no second attempt per file
    assert "0 sent, 2 failed" in send.stdout
    assert "Traceback" not in send.stdout


def test_bad_address_is_a_usage_error() -> None:
    result = medgw("dicom", "echo", "127.0.0.1:104")
    assert result.returncode == 2
    assert "AE@host:port" in result.stdout
    result = medgw("dicom", "echo", "A_TITLE_LONGER_THAN_16@127.0.0.1:104")
    assert result.returncode == 2


@pytest.mark.slow
async def test_send_through_the_gateway_is_byte_exact_and_rejection_is_reported(
    tmp_path: Path,
) -> None:
    files = copy_testdata(SET, tmp_path / "in")
    async with running_gateway(tmp_path, ", allowed_calling_aes: [MEDGW]") as gw:
        target = f"MEDGW@127.0.0.1:{gw.port}"
        sent = await asyncio.to_thread(medgw, "dicom", "send", str(tmp_path / "in"), target)
        refused = await asyncio.to_thread(
            medgw, "dicom", "echo", target, "--calling-ae", "STRANGER"
        )
        await eventually(lambda: len(gw.outbox_files()) == len(files), what="the outbox")
        outbox = {_sop(p): p for p in gw.outbox_files()}
    assert sent.returncode == 0, sent.stdout
    assert refused.returncode == 1
    assert "association rejected" in refused.stdout
    assert "Calling AE" in refused.stdout
    for source in files:
        assert _data_set(outbox[_sop(source)]) == _data_set(source), source.name


@pytest.mark.slow
async def test_complete_forces_the_study_event_running_and_stopped(tmp_path: Path) -> None:
    ct, nm = copy_testdata(["CT_small.dcm", "JPEG2000.dcm"], tmp_path / "in")
    ct_study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    nm_study = str(dcmread(nm, stop_before_pixels=True).StudyInstanceUID)
    async with running_gateway(tmp_path, ", study_quiet_s: 3600") as gw:
        target = f"MEDGW@127.0.0.1:{gw.port}"
        sent = await asyncio.to_thread(medgw, "dicom", "send", str(ct), str(nm), target)
        assert sent.returncode == 0, sent.stdout
        await eventually(lambda: len(gw.outbox_files()) == 2, what="both instances")
        config = str(gw.config_file)
        # the SCP notes instances for the tracker after the ACK, off the receive path
        await eventually(lambda: _tracked(gw.state) == 2, what="the tracker's notes")
        forced = await asyncio.to_thread(medgw, "dicom", "complete", ct_study, "--config", config)
        assert forced.returncode == 0, forced.stdout
        await eventually(lambda: len(gw.event_files()) == 1, what="the forced event (running)")
        again = await asyncio.to_thread(medgw, "dicom", "complete", ct_study, "--config", config)
        unknown = await asyncio.to_thread(medgw, "dicom", "complete", "1.2.3.4", "--config", config)
    assert f"{ct_study}: study.complete with 1 instances" in forced.stdout
    assert "for events" in forced.stdout
    assert again.returncode == 0
    assert "already complete" in again.stdout
    assert unknown.returncode == 1
    assert "unknown study" in unknown.stdout

    # the gateway is stopped: the event waits in the journal and goes out at the next start
    stopped = medgw("dicom", "complete", nm_study, "--config", config)
    assert stopped.returncode == 0, stopped.stdout
    async with running_gateway(tmp_path, ", study_quiet_s: 3600") as gw:
        await eventually(lambda: len(gw.event_files()) == 2, what="the forced event (stopped)")
        headers = {h["study_uid"]: h for h in gw.headers("event")}
    assert headers[nm_study]["modality"] == "NM"
    assert headers[nm_study]["instances"] == "1"


def test_complete_with_a_broken_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("site: {id: x}\nlisteners: 3\n")
    result = medgw("dicom", "complete", "1.2.3", "--config", str(config))
    assert result.returncode == 2
    assert "listeners" in result.stdout
