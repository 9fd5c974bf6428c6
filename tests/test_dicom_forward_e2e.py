"""End to end: DCMTK storescu -> the gateway (dicom-scp, journal, dicom-store) -> Orthanc.

The gateway runs as its own process (``tests/peers/gateway_proc.py``); storescu and
Orthanc run with ``TCP_NODELAY=1``. What the gateway received is read from its
blob folder (the Part-10 files as journaled), what Orthanc stored from its REST API.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from peers.gateway_proc import Gateway, Proc, pick_free_port, wait_for
from peers.orthanc import (
    MIXED_SET,
    UNCOMPRESSED_ONLY,
    Orthanc,
    compare_stored,
    make_ct_series,
    running_orthanc,
    sample_file,
)
from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info

from gateway.registry import default_registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "dicom-scp" not in default_registry().listeners,
        reason="the dicom-scp listener is not available yet",
    ),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="Orthanc not installed"),
]

CALLING_AE = "CT01"
# storescu proposes uncompressed syntaxes unless told which compressed one to offer
PROPOSE = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


def sop_uid(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def write_config(path: Path, state_dir: Path, http: int, scp: int, orthanc: Orthanc) -> Path:
    doc: dict[str, Any] = {
        "site": {"id": "e2e-dicom"},
        "state_dir": str(state_dir),
        "http": {"listen": f"127.0.0.1:{http}"},
        "journal": {"min_free_mb": 0},
        "logging": {"level": "INFO", "format": "text"},
        "listeners": [
            {
                "id": "modalities",
                "type": "dicom-scp",
                "ae_title": "MEDGW",
                "listen": f"127.0.0.1:{scp}",
            }
        ],
        "destinations": [
            {
                "id": "pacs",
                "type": "dicom-store",
                "ae_title": orthanc.aet,
                "connect": orthanc.endpoint,
                "connect_timeout_s": 2,
                "delivery": {
                    "backoff": {"initial_s": 0.1, "max_s": 1.0},
                    "breaker": {"failures": 1000, "cooldown_s": 1.0},
                },
            }
        ],
        "routes": [{"match": {"kind": "dicom"}, "to": ["pacs"]}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


class StoreScu(Proc):
    """DCMTK storescu (``-v``), its output in a log; ``acked()`` parses what succeeded."""

    def __init__(self, port: int, files: list[Path], log: Path, *options: str) -> None:
        argv = ["storescu", "-v", *options, "-aet", CALLING_AE, "-aec", "MEDGW"]
        super().__init__("storescu", [*argv, "127.0.0.1", str(port), *map(str, files)], log)

    def spawn(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def acked(self) -> list[Path]:
        """Files for which storescu received a C-STORE response with status Success."""
        out, current = [], None
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("I: Sending file: "):
                current = line.removeprefix("I: Sending file: ").strip()
            elif line.startswith("I: Received Store Response (Success)") and current:
                out.append(Path(current))
                current = None
        return out


def storescu(port: int, files: list[Path], log: Path, *options: str) -> StoreScu:
    scu = StoreScu(port, files, log, *options)
    scu.spawn()
    rc = scu.wait(120)
    assert rc == 0, f"storescu exited {rc}:\n{scu.log_tail()}"
    return scu


def received_files(state_dir: Path) -> dict[str, Path]:
    """SOP Instance UID -> the Part-10 file the gateway journaled for it."""
    out = {}
    for blob in (state_dir / "blobs").rglob("*"):
        if blob.is_file() and not blob.name.endswith(".tmp"):
            out[sop_uid(blob)] = blob
    return out


def same_content(sent: Dataset, original: Dataset) -> bool:
    """Equal elements and values, allowing for what storescu changes when it re-encodes
    a file: data set trailing padding (FFFC,FFFC) dropped, encapsulated pixel data
    declared OW written as OB, sequences written with explicit lengths."""
    if "PixelData" in original and sent.PixelData != original.PixelData:
        return False
    for ds in (sent, original):
        ds.pop(0xFFFCFFFC, None)
        if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds["PixelData"].VR = "OB"
    return sent == original


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def make(orthanc: Orthanc) -> Gateway:
        http, scp = pick_free_port(), pick_free_port()
        cfg = write_config(tmp_path / "gateway.yaml", tmp_path / "state", http, scp, orthanc)
        gw = Gateway(cfg, http, scp)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        if gw.running():
            gw.kill()


def scp_port(gw: Gateway) -> int:
    return gw.mllp_port  # gateway_proc's Gateway keeps the listener port under this name


def confirmations(state_dir: Path) -> dict[str, str]:
    """SOP Instance UID -> the PACS's confirmation, from the gateway's journal."""
    with closing(sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT e.blob, d.confirmation FROM envelopes e JOIN deliveries d "
            "ON d.seq = e.seq WHERE d.destination = 'pacs' AND d.state = 'done'"
        ).fetchall()
    return {sop_uid(state_dir / "blobs" / blob): str(conf) for blob, conf in rows}


@pytest.mark.parametrize("uncompressed_only", [False, True], ids=["pacs-any", "pacs-plain"])
def test_mixed_set_arrives_in_orthanc_as_received(
    tmp_path: Path, gateway_factory: Any, uncompressed_only: bool
) -> None:
    files = [sample_file(n) for n in MIXED_SET]
    options = {"accepted_transfer_syntaxes": UNCOMPRESSED_ONLY} if uncompressed_only else {}
    with running_orthanc(tmp_path / "orthanc", **options) as orthanc:
        gw = gateway_factory(orthanc).start()
        groups: dict[str, list[Path]] = {}
        for p in files:
            groups.setdefault(str(read_file_meta_info(p).TransferSyntaxUID), []).append(p)
        acked = []
        for n, (ts, group) in enumerate(sorted(groups.items())):
            scu = storescu(scp_port(gw), group, tmp_path / f"storescu{n}.log", *PROPOSE[ts])
            acked += scu.acked()
        assert sorted(acked) == sorted(files)
        gw.wait_drained(60)
        received = received_files(tmp_path / "state")
        answers = confirmations(tmp_path / "state")
        syntaxes = {uid: ts for uid, ts, _ in orthanc.received()}
        how = {}
        for p in files:
            uid = sop_uid(p)
            # what storescu sent is what the file holds, as DCMTK re-encodes it
            assert same_content(dcmread(received[uid]), dcmread(p))
            oid = orthanc.lookup(uid)
            assert oid is not None, f"{p.name} did not reach Orthanc"
            stored = orthanc.instance_file(oid)
            ts = read_file_meta_info(p).TransferSyntaxUID
            if uncompressed_only and ts.is_compressed:
                # refused as sent: decompressed by the gateway, the same pixels arrive
                assert syntaxes[uid] == "1.2.840.10008.1.2.1"
                assert answers[uid] == f"0x0000 decompressed from {ts}"
                original = dcmread(received[uid]).pixel_array
                assert np.array_equal(dcmread(BytesIO(stored)).pixel_array, original)
                continue
            # forwarded in the syntax it came in, the bytes the gateway received, up to
            # Orthanc's own re-encoding (see peers.orthanc.compare_stored)
            assert syntaxes[uid] == ts
            assert answers[uid] == "0x0000"
            how[p.name] = compare_stored(received[uid].read_bytes(), stored)
        assert orthanc.count_instances() == len(files)
        gw.terminate()
    assert all(h <= {"identical", "sequence lengths", "pixel data VR"} for h in how.values())


def test_gateway_killed_during_a_500_image_send_loses_nothing_acked(
    tmp_path: Path, gateway_factory: Any
) -> None:
    files = make_ct_series(tmp_path / "ct", 500)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        gw = gateway_factory(orthanc).start()
        scu = StoreScu(scp_port(gw), files, tmp_path / "storescu.log")
        scu.spawn()
        blobs = tmp_path / "state" / "blobs"

        def journaled() -> int:
            return sum(1 for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0

        wait_for(lambda: journaled() >= 120, 60, "120 instances journaled")
        gw.kill()  # SIGKILL in the middle of the association
        rc = scu.wait(60)
        acked = scu.acked()
        # killed mid-association: storescu fails, with some (not all) instances acked
        assert rc != 0 and 100 <= len(acked) < len(files), f"storescu rc={rc}, {len(acked)} acked"
        gw.start()
        gw.wait_drained(120)
        missing = [p.name for p in acked if orthanc.lookup(sop_uid(p)) is None]
        assert missing == [], f"{len(missing)} acknowledged instances lost: {missing[:5]}"
        # the modality resends what it got no success for; then all 500 are there, once
        rest = [p for p in files if p not in set(acked)]
        storescu(scp_port(gw), rest, tmp_path / "storescu-rest.log")
        gw.wait_drained(120)
        assert orthanc.count_instances() == len(files)
        stored = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}
        assert stored == {sop_uid(p) for p in files}
        # delivery is at-least-once: an instance forwarded just before the kill, whose
        # "done" was not yet committed, is forwarded again after the restart; Orthanc
        # keeps one copy per SOP Instance UID, so none is stored twice
        sent = [uid for uid, _, _ in orthanc.received()]
        assert set(sent) == stored and len(sent) >= len(files)
        gw.terminate()
