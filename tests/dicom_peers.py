"""Real DICOM peers for the tests: DCMTK tools run as subprocesses, and test data.

Every DCMTK process gets ``TCP_NODELAY=1`` (DCMTK leaves Nagle's algorithm on
otherwise: 62x slower on small instances). ``storescu`` is given a generated
association profile (``-xf``) proposing, for each file, its SOP class with its
own transfer syntax, so compressed files go out as they are (storescu's
built-in proposals are uncompressed only and it would try to decompress).

``running_gateway`` runs the real gateway in-process with a ``dicom-scp``
listener routed to folders. Import read-only from other tests:
``from dicom_peers import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from gateway.config import parse_config
from gateway.registry import default_registry
from gateway.service import Gateway

REPO = Path(__file__).resolve().parents[1]

DCMTK_TOOLS = ("echoscu", "storescu", "storescp", "findscu")

# pydicom's own test files and pydicom-data's radiographs: one per transfer syntax
# family, distinct SOP Instance UIDs
MIXED_SET = (
    "CT_small.dcm",  # explicit VR LE, CT
    "MR_small.dcm",  # explicit VR LE, MR
    "rtplan.dcm",  # implicit VR LE, no pixel data
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "RG1_J2KR.dcm",  # JPEG 2000 lossless, 4 MB CR
    "RG3_UNCI.dcm",  # uncompressed 6 MB CR
    "ExplVR_BigEnd.dcm",  # explicit VR big endian, US
    "image_dfl.dcm",  # deflated explicit VR LE
    "SC_rgb_rle.dcm",  # RLE lossless
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless, enhanced MR
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",  # JPEG extended
)


def need_dcmtk(*tools: str) -> None:
    """Skip the test, naming what is missing, when DCMTK is not installed."""
    missing = [t for t in tools or DCMTK_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"DCMTK not installed ({', '.join(missing)} missing): apt-get install dcmtk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def sample_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"test file {name} not available (pydicom / pydicom-data)")
    return Path(str(path))


def copy_testdata(names: Iterable[str], folder: Path) -> list[Path]:
    """Copy test files into ``folder`` (so that tests may send a whole folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = folder / name
        shutil.copyfile(sample_file(name), target)
        out.append(target)
    return out


def medgw(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``medgw ARGS...`` as a technician runs it (stdout and stderr together)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class FileInfo:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset_offset: int  # where the data set starts (after the file meta)

    @property
    def dataset_bytes(self) -> bytes:
        return self.path.read_bytes()[self.dataset_offset :]


def file_info(path: Path) -> FileInfo:
    meta, offset = split_dataset(path)
    return FileInfo(
        path,
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        offset,
    )


def storescu_profile(files: Iterable[Path], folder: Path) -> list[str]:
    """``-xf CONFIG Medgw``: one context per (SOP class, file's transfer syntax)."""
    pairs = sorted({(i.sop_class, i.transfer_syntax) for i in map(file_info, files)})
    syntaxes = sorted({ts for _, ts in pairs})
    names = {ts: f"TS{n}" for n, ts in enumerate(syntaxes, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts in syntaxes:
        lines += [f"[{names[ts]}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[MedgwContexts]"]
    lines += [
        f"PresentationContext{n} = {sop}\\{names[ts]}" for n, (sop, ts) in enumerate(pairs, 1)
    ]
    lines += ["[[Profiles]]", "[Medgw]", "PresentationContexts = MedgwContexts"]
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "storescu-medgw.cfg"
    config.write_text("\n".join(lines) + "\n", encoding="ascii")
    return ["-xf", str(config), "Medgw"]


def storescu_args(
    files: Iterable[Path],
    port: int,
    work: Path,
    *,
    calling: str = "STORESCU",
    called: str = "MEDGW",
) -> list[str]:
    files = list(files)
    return [
        "storescu",
        "-aet",
        calling,
        "-aec",
        called,
        *storescu_profile(files, work),
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]


def run_tool(argv: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool to the end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        argv,
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def storescu(
    files: Iterable[Path],
    port: int,
    work: Path,
    *,
    calling: str = "STORESCU",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    argv = storescu_args(files, port, work, calling=calling)
    return run_tool([argv[0], *extra, *argv[1:]])


def spawn_tool(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Stop a process we started, by its pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def storescp(folder: Path, *, ae_title: str = "STORESCP", log: Path | None = None) -> Iterator[int]:
    """DCMTK ``storescp`` on a free loopback port, writing into ``folder``; yields the port.

    Bit-preserving (``+B``): each file holds the data set exactly as received.
    """
    need_dcmtk("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = spawn_tool(
        ["storescp", "-aet", ae_title, "+xa", "+B", "-od", str(folder), str(port)],
        log or folder.parent / f"storescp-{port}.log",
    )
    try:
        wait_port(port)
        yield port
    finally:
        stop(proc)


# -- a gateway with a dicom-scp listener, in-process ---------------------------------------


@dataclass
class Running:
    """A running gateway: listener ``modalities`` (AE MEDGW) on ``port``; instances go
    to the ``outbox`` folder, ``study.complete`` events to ``events``."""

    gw: Gateway
    port: int
    state: Path
    outbox: Path
    events: Path
    config_file: Path

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
            return list(c.execute(sql, args))

    def count(self, table: str, where: str = "1") -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {table} WHERE {where}")[0][0])

    def headers(self, kind: str = "dicom") -> list[dict[str, str]]:
        rows = self.query("SELECT headers FROM envelopes WHERE kind = ? ORDER BY seq", kind)
        return [json.loads(h) for (h,) in rows]

    def sessions(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT peer, details FROM sessions WHERE source = 'modalities'")
        return [{"peer": p, **json.loads(d)} for p, d in rows]

    def outbox_files(self) -> list[Path]:
        return sorted(self.outbox.glob("*.dcm")) if self.outbox.exists() else []

    def event_files(self) -> list[Path]:
        return sorted(self.events.glob("*.json")) if self.events.exists() else []


@asynccontextmanager
async def running_gateway(tmp_path: Path, listener: str = "") -> AsyncIterator[Running]:
    """Run the gateway on the test's event loop; ``listener`` adds YAML flow-mapping
    settings to the listener (``", study_quiet_s: 0.5"``)."""
    port = free_port()
    state, outbox, events = tmp_path / "state", tmp_path / "outbox", tmp_path / "events"
    text = (
        f"site: {{id: test-site}}\n"
        f"state_dir: {state}\n"
        f"http: {{listen: null}}\n"
        f"journal: {{min_free_mb: 0}}\n"
        f"listeners:\n"
        f"  - {{id: modalities, type: dicom-scp, ae_title: MEDGW, "
        f"listen: 127.0.0.1:{port}, drain_timeout_s: 2{listener}}}\n"
        f"destinations:\n"
        f"  - {{id: outbox, type: folder, path: {outbox}}}\n"
        f"  - {{id: events, type: folder, path: {events}}}\n"
        f"routes:\n"
        f"  - {{match: {{kind: dicom}}, to: [outbox]}}\n"
        f"  - {{match: {{kind: event, event: study.complete}}, to: [events]}}\n"
    )
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(text, encoding="utf-8")
    registry = default_registry()
    gw = Gateway(parse_config(text, registry, str(config_file)), registry, drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not gw.ready.is_set():
        ready.cancel()
        stop.set()
        await task
        raise AssertionError("gateway did not become ready")
    try:
        yield Running(gw, port, state, outbox, events, config_file)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or check}")
        await asyncio.sleep(0.05)
