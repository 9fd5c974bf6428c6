"""Orthanc as the PACS in tests: started on free loopback ports, checked over REST.

``Orthanc(workdir).start()`` writes a config (temporary storage and index, no
plugins, ``DicomCheckCalledAet: false``, 128 kB maximum PDU), runs
``/usr/sbin/Orthanc`` with ``TCP_NODELAY=1`` in its environment (Orthanc's DICOM
side is DCMTK, which reads that variable; Orthanc's own ``"TcpNoDelay"`` option
only concerns its HTTP server), and waits for ``GET /system``. It is stopped by
pid: SIGTERM, then SIGKILL after a grace period, or SIGKILL at once for a crash.

A Lua ``ReceivedInstanceFilter`` (called for every C-STORE that reaches Orthanc,
before Orthanc decides whether the instance is new) logs one line per instance
received, so a test can count deliveries attempted, not just instances stored:
Orthanc keeps one copy per SOP Instance UID and silently discards a resend
(``OverwriteInstances: false``). The log is appended over restarts.

``accepted_transfer_syntaxes`` restricts what Orthanc's C-STORE SCP accepts
(Orthanc >= 1.9 ``"AcceptedTransferSyntaxes"``, wildcards allowed), to make it
refuse compressed presentation contexts.

What Orthanc stores is not always the bytes it received: it writes its own file
meta (its DCMTK implementation class UID and version name; our Source AE title
and private meta elements dropped), and DCMTK writes every sequence and item
with an explicit length, so an instance that came with undefined-length
sequences is stored with the same elements and values, and the same pixel data
bytes, but a different encoding of those sequences. :func:`compare_stored`
checks exactly that and says which case it was.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from peers.gateway_proc import Proc, pick_free_port, wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
UNCOMPRESSED_ONLY = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]

LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('MEDGW-RECEIVED ' .. dicom.SOPInstanceUID .. ' ' .. (info['TransferSyntaxUID'] or '?')
        .. ' ' .. (origin['RemoteAet'] or '?'))
  return true
end
"""
RECEIVED = re.compile(r"MEDGW-RECEIVED (\S+) (\S+) (\S+)")


def available() -> bool:
    return Path(ORTHANC).exists()


class Orthanc(Proc):
    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        accepted_transfer_syntaxes: list[str] | None = None,
        unknown_sop_class_accepted: bool = False,
        max_pdu: int = 131072,
        scp_timeout_s: int = 30,
        verbose: bool = False,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = pick_free_port()
        self.http_port = pick_free_port()
        while self.http_port == self.dicom_port:
            self.http_port = pick_free_port()
        self.config = workdir / "orthanc.json"
        lua = workdir / "count.lua"
        lua.write_text(LUA, encoding="utf-8")
        doc: dict[str, Any] = {
            "Name": "medgw-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": unknown_sop_class_accepted,
            "MaximumPduLength": max_pdu,
            "DicomScpTimeout": scp_timeout_s,
            "OverwriteInstances": False,
            "StorageCompression": False,
            "SaveJobs": False,
            "Plugins": [],
            "LuaScripts": [str(lua)],
            "HttpTimeout": 60,
        }
        if accepted_transfer_syntaxes is not None:
            doc["AcceptedTransferSyntaxes"] = accepted_transfer_syntaxes
        self.config.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        argv = [ORTHANC, *(["--verbose"] if verbose else []), str(self.config)]
        super().__init__("orthanc", argv, workdir / "orthanc.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.dicom_port}"

    # -- process ------------------------------------------------------------------------

    def spawn(self) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log, "ab") as out:
            out.write(f"\n==== orthanc started {time.strftime('%H:%M:%S')} ====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.spawn()

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"Orthanc exited at start:\n{self.log_tail()}")
            try:
                return self.request("GET", "/system", timeout_s=1.0)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout_s, f"Orthanc's REST API on port {self.http_port}")
        return self

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``grace_s``."""
        if not self.running():
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.signal(signal.SIGTERM, grace_s)
        if self.running():
            self.kill()

    # -- REST ---------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 30.0
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: HTTP {status} {body[:200]!r}"
        return json.loads(body)

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        ids: list[str] = self.get_json("/instances")
        return ids

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10, as Orthanc wrote it)."""
        status, body = self.request("GET", f"/instances/{orthanc_id}/file")
        assert status == 200, f"instance {orthanc_id}: HTTP {status}"
        return body

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        tags: dict[str, Any] = self.get_json(f"/instances/{orthanc_id}/simplified-tags")
        return tags

    def lookup(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, if stored."""
        status, body = self.request("POST", "/tools/lookup", sop_instance_uid.encode())
        assert status == 200, f"lookup: HTTP {status}"
        for hit in json.loads(body):
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.get_json("/statistics")
        return stats

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def received(self) -> list[tuple[str, str, str]]:
        """(SOP Instance UID, transfer syntax, calling AE) of every C-STORE that reached
        Orthanc, resends included, over all its runs (from the Lua filter's log lines)."""
        if not self.log.exists():
            return []
        return RECEIVED.findall(self.log.read_text(errors="replace"))


@contextlib.contextmanager
def running_orthanc(workdir: Path, **options: Any) -> Iterator[Orthanc]:
    """An Orthanc for the duration of a ``with`` block (or a pytest fixture)."""
    orthanc = Orthanc(workdir, **options)
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop(grace_s=1.0)  # its storage is thrown away: no need to wait long


# -- what a PACS stored, compared with what was sent -----------------------------------

MIXED_SET = [
    "CT_small.dcm",  # CT, explicit VR LE
    "MR_small.dcm",  # MR, explicit VR LE
    "JPEG2000.dcm",  # secondary capture, JPEG 2000
    "RG1_J2KR.dcm",  # CR radiograph, JPEG 2000 lossless (4 MB)
    "RG3_UNCI.dcm",  # CR radiograph, uncompressed (6 MB)
    "emri_small_jpeg_ls_lossless.dcm",  # enhanced MR, JPEG-LS, 10 frames
    "SC_rgb_rle.dcm",  # RGB secondary capture, RLE
    "JPEG-LL.dcm",  # JPEG lossless (process 14)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
]


def sample_file(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data (RG1_J2KR.dcm, ...)."""
    found = get_testdata_file(name)
    assert isinstance(found, str), f"{name} not in pydicom's test data"
    return Path(found)


def dataset_part(data: bytes) -> bytes:
    """The dataset bytes of a Part-10 file: everything after the file meta (PS3.10 7.1)."""
    assert data[128:132] == b"DICM", "no DICM prefix"
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta does not start with its length"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def make_ct_series(folder: Path, count: int, source: str = "CT_small.dcm") -> list[Path]:
    """``count`` CT-like instances of one new study and series (new SOP Instance UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(sample_file(source))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for n in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        path = folder / f"ct{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _undefined_lengths(ds: Dataset) -> int:
    count = 0
    for elem in ds.iterall():
        if elem.VR == "SQ" and elem.is_undefined_length:
            count += 1
    return count


def compare_stored(sent: bytes, stored: bytes) -> set[str]:
    """Assert that a stored instance is the one sent and say how its bytes differ.

    ``{"identical"}``: the dataset bytes after the file meta are equal. Otherwise
    the elements, their values and the pixel data bytes must be equal, and each
    remaining difference must be one DCMTK makes when it writes a file:
    ``"sequence lengths"`` (undefined-length sequences written with explicit
    lengths) and ``"pixel data VR"`` (encapsulated pixel data declared OW by the
    sender written as OB, which PS3.5 A.4 requires).
    """
    if dataset_part(sent) == dataset_part(stored):
        return {"identical"}
    a, b = dcmread(BytesIO(sent)), dcmread(BytesIO(stored))
    how = set()
    if "PixelData" in a:
        assert a.PixelData == b.PixelData, "pixel data bytes differ"
        if a["PixelData"].VR != b["PixelData"].VR:
            assert a.file_meta.TransferSyntaxUID.is_encapsulated
            assert (a["PixelData"].VR, b["PixelData"].VR) == ("OW", "OB")
            a["PixelData"].VR = "OB"
            how.add("pixel data VR")
    assert a == b, "stored instance differs in its elements or values"
    if _undefined_lengths(a) > 0 and _undefined_lengths(b) == 0:
        how.add("sequence lengths")
    assert how, "dataset bytes differ for another reason"
    return how
