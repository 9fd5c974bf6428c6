"""DICOM benchmark: durable receive against DCMTK, Orthanc and pynetdicom; forwarding end to end.

    .venv/bin/python bench/dicom.py [--quick] [--repeat N] [--json FILE] [--no-profile]

One run, the same files and the same sender (DCMTK ``storescu`` with
``TCP_NODELAY=1``: all files of a set in one association, and the set split
between 4 ``storescu`` processes at once), receivers side by side on free
loopback ports, each started fresh for every transfer with its storage in a
scratch folder on the repository's disk:

- ``storescp --ignore``: receives and throws away (the sender + loopback floor);
- DCMTK ``storescp`` (``--fork``, bit-preserving, no fsync): the C reference;
- Orthanc (``TCP_NODELAY=1``, ``TcpNoDelay``, ``SyncStorageArea``: one fsync a file);
- the gateway (``medgw run``, one ``dicom-scp`` listener, log WARNING) whose one
  destination is unreachable: durable receive (blob fsync + journal commit
  before each C-STORE response) and nothing else;
- a pynetdicom receiver whose C-STORE handler discards the data, with the
  gateway's AE settings (``dicom.net``: maximum PDU, TCP_NODELAY, contexts): the
  library's own ceiling on this machine.

Then the forward rate, storescu -> gateway (dicom-scp -> dicom-store) -> a second
storescp, from the first send to the last file at the second storescp, against
storescu -> storescp directly. ``--profile`` (default on) runs the gateway's
receive and the ceiling once more under a per-thread CPU profiler (cProfile with
``time.thread_time`` in every thread, pynetdicom's included). bench/README.md
(DICOM section) explains every figure. Never run by the tests.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import cProfile
import hashlib
import json
import os
import platform
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

REPO, PYTHON = _peers.REPO, _peers.PYTHON
STORESCU, STORESCP = shutil.which("storescu"), shutil.which("storescp")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
CALLING_AE = "BENCH"
DCMTK_MAX_PDU = 131072  # the largest DCMTK (storescp, Orthanc) accepts
SENDERS = (1, 4)

TARGET_VS_ORTHANC = 1.2  # durable receive / Orthanc, both sets
TARGET_VS_CEILING = 0.85  # durable receive / pynetdicom discard ceiling
TARGET_CONCURRENT = 1.0  # 4 senders / 1 sender, total rate
TARGET_FORWARD = {"ct": 0.60, "cr": 0.80}  # forwarded / direct rate

RECEIVERS = {
    "floor": "storescp --ignore (floor)",
    "storescp": "DCMTK storescp",
    "orthanc": "Orthanc",
    "gateway": "medgw durable receive",
    "ceiling": "pynetdicom discard ceiling",
}
OPTIONAL_RECEIVERS = {  # not in the default list: --receivers ...,gateway-nospool
    "gateway-nospool": "medgw, spool_from_kb: 0",
}
LABELS = RECEIVERS | OPTIONAL_RECEIVERS


FORWARDS = {
    "direct": "storescu -> storescp (direct)",
    "relay": "pynetdicom relay ceiling",
    "gateway-1w": "gateway, 1 dicom-store worker",
    "gateway-4w": "gateway, 4 workers, unordered",
}


def say(text: str = "") -> None:
    print(text, flush=True)


# -- data --------------------------------------------------------------------------------


@dataclass
class FileSet:
    """Instances split into 4 folders (one per concurrent sender); one storescu
    association profile proposing each file's (SOP class, transfer syntax)."""

    key: str
    label: str
    parts: list[Path]
    files: int = 0
    bytes: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # template -> file size
    profile: Path = Path()
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, transfer syntax)

    @property
    def mb(self) -> float:
        return self.bytes / 1e6


def testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file  # noqa: PLC0415 - only the data step needs it

    found = get_testdata_file(name)
    if not isinstance(found, str):
        raise SystemExit(f"{name} not found: the bench needs pydicom's test data and pydicom-data")
    return Path(found)


def ct_templates() -> list[tuple[str, Any]]:
    """CT-sized instances (~40 kB to ~0.5 MB): pydicom's CT_small (128x128), MR_small
    scaled to 256x256, a 512x512 CT slice and a 484x484 MR slice from pydicom-data."""
    import numpy as np  # noqa: PLC0415
    from pydicom import dcmread  # noqa: PLC0415

    mr = dcmread(testdata("MR_small.dcm"))
    small = mr.pixel_array
    big = np.kron(small, np.ones((4, 4), dtype=small.dtype))
    mr.Rows, mr.Columns = big.shape
    mr.PixelData = big.tobytes()
    return [
        ("CT_small 128x128", dcmread(testdata("CT_small.dcm"))),
        ("CT_small 128x128", dcmread(testdata("CT_small.dcm"))),
        ("MR_small as 256x256", mr),
        ("693_UNCR CT 512x512", dcmread(testdata("693_UNCR.dcm"))),
        ("MR-SIEMENS 484x484", dcmread(testdata("MR-SIEMENS-DICOM-WithOverlays.dcm"))),
    ]


def cr_templates() -> list[tuple[str, Any]]:
    """Radiographs of 6-7 MB: pydicom-data's uncompressed CR images."""
    from pydicom import dcmread  # noqa: PLC0415

    return [(n, dcmread(testdata(f"{n}.dcm"))) for n in ("RG1_UNCR", "RG3_UNCI")]


def make_set(
    key: str, label: str, root: Path, count: int, templates: list[tuple[str, Any]]
) -> FileSet:
    """``count`` clones of the templates in turn, each with new SOP Instance UIDs (a new
    study per 100 instances, a series per template), spread over 4 folders."""
    from pydicom.uid import generate_uid  # noqa: PLC0415

    fs = FileSet(key, label, [root / key / f"part{n}" for n in range(4)])
    for p in fs.parts:
        p.mkdir(parents=True)
    series = {name: generate_uid() for name, _ in templates}
    study = generate_uid()
    pairs = set()
    for i in range(count):
        name, ds = templates[i % len(templates)]
        if i and i % 100 == 0:
            study = generate_uid()
            series = {n: generate_uid() for n, _ in templates}
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[name]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = fs.parts[i % 4] / f"{key}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size = path.stat().st_size
        fs.files += 1
        fs.bytes += size
        fs.sizes[name] = size
        pairs.add((str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    fs.pairs = sorted(pairs)
    fs.profile = storescu_profile(fs.pairs, root / key / "storescu.cfg")
    for p in fs.parts:  # read once: every transfer then reads from the page cache
        for f in p.iterdir():
            f.read_bytes()
    return fs


def storescu_profile(pairs: list[tuple[str, str]], path: Path) -> Path:
    """A storescu ``-xf`` association profile: one context per (SOP class, the files'
    own transfer syntax), so nothing is converted on the way out."""
    syntaxes = sorted({ts for _, ts in pairs})
    names = {ts: f"TS{n}" for n, ts in enumerate(syntaxes, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts in syntaxes:
        lines += [f"[{names[ts]}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[BenchContexts]"]
    lines += [f"PresentationContext{n} = {s}\\{names[t]}" for n, (s, t) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", "[Bench]", "PresentationContexts = BenchContexts"]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


# -- processes ---------------------------------------------------------------------------


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` (all threads) plus its children it has reaped; 0 once gone."""
    with (
        contextlib.suppress(FileNotFoundError, ProcessLookupError),
        open(f"/proc/{pid}/stat") as f,
    ):
        rest = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in rest[11:15]) / _peers.TICK
    return 0.0


def stop_pid(proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> None:
    """SIGTERM the process we started (by its pid), SIGKILL if it outlives ``grace_s``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def files_in(folder: Path) -> int:
    """Files a storescp wrote (names not starting with a dot)."""
    try:
        return sum(1 for e in os.scandir(folder) if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


class Receiver(abc.ABC):
    """One receiver process on a free loopback port, its data under ``dir``."""

    key = ""
    ae_title = ""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.port = _peers.free_port()
        self.log = self.dir / "receiver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The receiver's command line."""

    def env(self) -> dict[str, str] | None:
        return None

    def ready(self) -> bool:
        return port_open(self.port)

    def __enter__(self) -> Receiver:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_until(self._alive_and_ready, 60, f"{self.key} to listen", 0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _alive_and_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.key} exited {self.proc.returncode}:\n{self.log_tail()}")
        return self.ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_pid(self.proc)

    @abc.abstractmethod
    def count(self) -> int:
        """Instances stored (or, for the discard receiver, handled) so far."""

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class StoreScp(Receiver):
    """DCMTK storescp: one process per association (``--fork``), bit-preserving (``+B``:
    the data set written as received, like the gateway), any transfer syntax (``+xa``),
    128 kB maximum PDU. It writes files without fsync. ``ignore``: receive, store nothing."""

    ae_title = "STORESCP"

    def __init__(self, work: Path, name: str, *, ignore: bool = False) -> None:
        super().__init__(work, name)
        self.key = "floor" if ignore else "storescp"
        self.ignore = ignore
        self.out = self.dir / "out"
        self.out.mkdir()

    def argv(self) -> list[str]:
        assert STORESCP is not None
        argv = [STORESCP, "--fork", "-aet", self.ae_title, "+xa", "+B"]
        argv += ["-pdu", str(DCMTK_MAX_PDU), "-od", str(self.out), str(self.port)]
        if self.ignore:
            argv.insert(1, "--ignore")
        return argv

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def count(self) -> int:
        return -1 if self.ignore else files_in(self.out)


class OrthancRx(Receiver):
    """Orthanc with its shipped defaults but: temporary storage, no plugins, 128 kB PDU,
    ``TcpNoDelay`` and ``TCP_NODELAY=1`` (its DICOM side is DCMTK). ``SyncStorageArea``
    stays on (its default): each file is fsynced, so Orthanc too is durable."""

    key = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, work: Path, name: str) -> None:
        super().__init__(work, name)
        self.http_port = _peers.free_port()
        self.config = self.dir / "orthanc.json"
        doc = {
            "Name": "medgw-bench",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "MaximumPduLength": DCMTK_MAX_PDU,
            "TcpNoDelay": True,
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
        }
        self.config.write_text(json.dumps(doc, indent=1))

    def argv(self) -> list[str]:
        return [ORTHANC, str(self.config)]

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def ready(self) -> bool:
        return http_get(self.http_port, "/system", 1.0)[0] == 200

    def count(self) -> int:
        status, body = http_get(self.http_port, "/statistics", 30.0)
        return int(json.loads(body)["CountInstances"]) if status == 200 else -1


class GatewayRx(Receiver):
    """``medgw run`` with one ``dicom-scp`` listener (AE MEDGW, its defaults: 1 MiB
    maximum PDU, TCP_NODELAY, study grouping on) routed to one ``dicom-store``
    destination: ``forward_to`` a storescp, or (receive alone) a port that refuses
    connections with an hour's backoff, so the pump's first attempt fails once and
    it then sleeps: no delivery work runs while the receive is measured."""

    key = "gateway"
    ae_title = "MEDGW"

    def __init__(
        self,
        work: Path,
        name: str,
        *,
        forward_to: int = 0,
        workers: int = 1,
        wrap: tuple[str, ...] = (),
        listener: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(work, name)
        self.http_port = _peers.free_port()
        self.wrap = wrap  # bench/dicom.py options: --profiled FILE or --timings FILE
        self._hold: socket.socket | None = None
        if forward_to:
            destination: dict[str, Any] = {
                "id": "pacs",
                "type": "dicom-store",
                "ae_title": StoreScp.ae_title,
                "connect": f"127.0.0.1:{forward_to}",
                "delivery": {"workers": workers, "ordered": workers == 1},
            }
        else:
            self._hold = socket.socket()
            self._hold.bind(("127.0.0.1", 0))  # bound, never listening: refused at once
            destination = {
                "id": "pacs",
                "type": "dicom-store",
                "ae_title": "NOWHERE",
                "connect": f"127.0.0.1:{self._hold.getsockname()[1]}",
                "connect_timeout_s": 1,
                "delivery": {"backoff": {"initial_s": 3600, "max_s": 3600}},
            }
        config = {
            "site": {"id": "bench"},
            "state_dir": str(self.dir / "state"),
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "journal": {"min_free_mb": 256},
            "logging": {"level": "WARNING", "format": "text"},
            "listeners": [
                {
                    "id": "in",
                    "type": "dicom-scp",
                    "ae_title": self.ae_title,
                    "listen": f"127.0.0.1:{self.port}",
                    **(listener or {}),
                }
            ],
            "destinations": [destination],
            "routes": [{"match": {"kind": "dicom"}, "to": ["pacs"]}],
        }
        self.config = self.dir / "gateway.yaml"
        self.config.write_text(json.dumps(config, indent=1))  # JSON is YAML

    def argv(self) -> list[str]:
        run = ["run", "--config", str(self.config)]
        if self.wrap:
            return [PYTHON, __file__, *self.wrap, "--gateway-cli", *run]
        return [PYTHON, "-m", "gateway.cli", *run]

    def ready(self) -> bool:
        return http_get(self.http_port, "/healthz", 1.0)[0] == 200

    def metrics(self) -> dict[str, float]:
        out = {}
        status, body = http_get(self.http_port, "/metrics", 10.0)
        for line in body.decode().splitlines() if status == 200 else []:
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def count(self) -> int:
        return int(self.metrics().get('medgw_messages_received_total{listener="in"}', -1))

    def delivered(self) -> int:
        return int(self.metrics().get('medgw_messages_delivered_total{destination="pacs"}', -1))

    def stop(self) -> None:
        super().stop()
        if self._hold is not None:
            self._hold.close()
            self._hold = None


class CeilingRx(Receiver):
    """``bench/dicom.py --serve-discard PORT``: pynetdicom with the gateway's AE settings,
    a C-STORE handler that returns 0x0000 and keeps nothing."""

    key = "ceiling"
    ae_title = "DISCARD"

    def __init__(self, work: Path, name: str, *, wrap: tuple[str, ...] = ()) -> None:
        super().__init__(work, name)
        self.wrap = wrap
        self._count = -1

    def argv(self) -> list[str]:
        return [PYTHON, __file__, *self.wrap, "--serve-discard", str(self.port)]

    def ready(self) -> bool:
        return self.log.exists() and b"READY" in self.log.read_bytes()

    def count(self) -> int:
        """It reports its count when it stops: stop it first."""
        self.stop()
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("STORED "):
                self._count = int(line.split()[1])
        return self._count


def serve_discard(port: int, on_store: Callable[[Any], int] | None = None) -> int:
    """The ceiling receiver (runs in its own process): stops on SIGTERM, prints its count."""
    import logging  # noqa: PLC0415

    from pynetdicom import AE, evt  # noqa: PLC0415

    from dicom.net import (  # noqa: PLC0415 - the gateway's own AE plumbing
        DEFAULT_MAX_PDU,
        AssociationServer,
        storage_contexts,
        verification_context,
    )

    logging.basicConfig(level=logging.WARNING)
    stored = [0]

    def discard(event: Any) -> int:
        stored[0] += 1  # one C-STORE at a time per association; += under the GIL is enough
        return 0x0000

    ae = AE(ae_title=CeilingRx.ae_title)
    ae.maximum_associations = 25  # ScpSettings' defaults from here on
    ae.maximum_pdu_size = DEFAULT_MAX_PDU
    ae.network_timeout, ae.acse_timeout, ae.dimse_timeout = 60.0, 30.0, 60.0
    server = ae.make_server(
        ("127.0.0.1", port),
        ae_title=CeilingRx.ae_title,
        contexts=[verification_context(), *storage_contexts()],
        evt_handlers=[(evt.EVT_C_STORE, on_store(discard) if on_store else discard)],
        server_class=AssociationServer,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    thread.join()
    deadline = time.monotonic() + 10
    while any(a.is_alive() for a in server.active_associations) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"STORED {stored[0]}", flush=True)
    return 0


class RelayRx(Receiver):
    """``bench/dicom.py --serve-relay PORT DEST_PORT PAIRS``: the most a single pynetdicom
    process can forward. Its C-STORE handler puts the received file in tmpfs (no fsync,
    no journal) and answers at once; one thread sends the queue on over one association
    (``STORE_SEND_CHUNKED_DATASET``, as the gateway's dicom-store does)."""

    key = "relay"
    ae_title = "RELAY"

    def __init__(
        self, work: Path, name: str, *, forward_to: int, pairs: list[tuple[str, str]]
    ) -> None:
        super().__init__(work, name)
        self.forward_to = forward_to
        self.pairs = ",".join(f"{sop}:{ts}" for sop, ts in pairs)

    def argv(self) -> list[str]:
        return [PYTHON, __file__, "--serve-relay", str(self.port), str(self.forward_to), self.pairs]

    def ready(self) -> bool:
        return self.log.exists() and b"READY" in self.log.read_bytes()

    def count(self) -> int:
        return -1


def serve_relay(port: int, dest_port: int, pairs_text: str) -> int:
    """The relay ceiling (its own process): see :class:`RelayRx`; stops on SIGTERM."""
    import logging  # noqa: PLC0415
    import queue  # noqa: PLC0415

    from pynetdicom import AE, _config, build_context, evt  # noqa: PLC0415

    from dicom.net import (  # noqa: PLC0415
        DEFAULT_MAX_PDU,
        NODELAY_HANDLER,
        AssociationServer,
        storage_contexts,
        verification_context,
    )

    logging.basicConfig(level=logging.WARNING)
    _config.STORE_SEND_CHUNKED_DATASET = True
    shm = Path("/dev/shm")
    spool = Path(tempfile.mkdtemp(prefix="medgw-relay-", dir=shm if shm.is_dir() else None))
    todo: queue.Queue[Path | None] = queue.Queue(maxsize=256)
    seq = [0]

    def on_store(event: Any) -> int:
        seq[0] += 1
        path = spool / f"{threading.get_ident()}-{seq[0]}.dcm"
        path.write_bytes(event.encoded_dataset(include_meta=True))
        todo.put(path)
        return 0x0000

    def forward() -> None:
        out = AE(ae_title=RelayRx.ae_title)
        contexts = [build_context(*p.split(":")) for p in pairs_text.split(",")]
        assoc = out.associate(
            "127.0.0.1",
            dest_port,
            contexts=contexts,
            ae_title=StoreScp.ae_title,
            max_pdu=131072,
            evt_handlers=[NODELAY_HANDLER],
        )
        while (path := todo.get()) is not None:
            status = assoc.send_c_store(path)
            if status.get("Status") != 0:
                print(f"FORWARD FAILED {path.name} {status}", flush=True)
            path.unlink()
            # pynetdicom 3.0.4 race: send_c_store() resumes the association's reactor and
            # the next call trusts ``_is_paused`` - still True until the reactor thread
            # runs again - so the reactor can take the next C-STORE-RSP ("Received
            # unexpected C-STORE service message") and the send waits for the DIMSE
            # timeout. Back-to-back sends wait for the reactor to come round first.
            deadline = time.monotonic() + 0.01
            while assoc._is_paused and time.monotonic() < deadline:
                time.sleep(0.00005)
        assoc.release()

    ae = AE(ae_title=RelayRx.ae_title)
    ae.maximum_associations = 25
    ae.maximum_pdu_size = DEFAULT_MAX_PDU
    server = ae.make_server(
        ("127.0.0.1", port),
        ae_title=RelayRx.ae_title,
        contexts=[verification_context(), *storage_contexts()],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        server_class=AssociationServer,
    )
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}),
        threading.Thread(target=forward),
    ]
    for t in threads:
        t.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    todo.put(None)
    for t in threads:
        t.join(10)
    shutil.rmtree(spool, ignore_errors=True)
    return 0


# -- wall-clock timings inside the receiver -------------------------------------------------


class Timings:
    """Wall time of named steps, and the gap between one C-STORE handler's end and the
    next one's start on the same association (pynetdicom's share of the cycle: the
    response out, the next request and data set in, and the sender's own time)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.batches: list[int] = []
        self._last_end: dict[int, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)  # list.append: atomic under the GIL

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return wrapper

    def timed_async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return wrapper

    def handler(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The C-STORE handler, timed, and the gap since the previous one on its thread."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            me, t = threading.get_ident(), time.perf_counter()
            last = self._last_end.get(me)
            if last is not None:
                self.add("between handlers (pynetdicom + sender)", t - last)
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.add("C-STORE handler", end - t)
                self._last_end[me] = end

        return wrapper

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, samples in self.samples.items():
            xs = sorted(samples)
            out[name] = {
                "n": len(xs),
                "mean_ms": sum(xs) / len(xs) * 1e3,
                "p50_ms": xs[len(xs) // 2] * 1e3,
                "p90_ms": xs[len(xs) * 9 // 10] * 1e3,
                "total_s": sum(xs),
            }
        if self.batches:
            out["journal ops per commit"] = {"mean": sum(self.batches) / len(self.batches)}
        return out


def install_gateway_timings(t: Timings) -> None:
    """Wrap the receive path's steps in the gateway process (this process only; the
    product code is not changed). Steps the code no longer has are skipped, so the
    timers follow the receive path as it evolves: the handler, the Part-10 bytes, the
    header scan, staging the blob in the association thread, the blob write (sha256,
    write, fsync, rename), the wait for the event loop, journal.accept, the folder
    fsyncs before a commit, and each commit with its batch size."""
    import hashlib as real_hashlib  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from pynetdicom import events  # noqa: PLC0415

    import dicom.scp as scp  # noqa: PLC0415
    import gateway.journal as journal  # noqa: PLC0415

    def patch(owner: Any, name: str, label: str, *, coroutine: bool = False) -> None:
        fn = getattr(owner, name, None)
        if fn is not None:
            setattr(owner, name, (t.timed_async if coroutine else t.timed)(label, fn))

    scp.DicomScp._store = t.handler(scp.DicomScp._store)  # type: ignore[method-assign]
    patch(scp, "received_file", "received_file(event)")
    patch(events.Event, "encoded_dataset", "event.encoded_dataset()")
    patch(scp, "routing_headers", "routing_headers()")
    patch(journal.Journal, "stage", "journal.stage() (association thread)")
    patch(journal.Journal, "_write_blob", "  blob: sha256+write+fsync+rename")
    journal.hashlib = SimpleNamespace(  # type: ignore[assignment]
        sha256=t.timed("    sha256(body)", real_hashlib.sha256)
    )
    patch(scp, "run_in_loop", "run_in_loop(accept): wait for the loop")
    patch(journal.Journal, "accept", "  journal.accept() on the loop", coroutine=True)
    patch(journal.Journal, "_sync_blob_dirs", "    folder fsyncs before a commit")
    commit = journal._Writer._commit

    def timed_commit(self: Any, batch: list[Any]) -> None:
        t.batches.append(len(batch))
        start = time.perf_counter()
        try:
            commit(self, batch)
        finally:
            t.add("    journal commit (writer thread)", time.perf_counter() - start)

    journal._Writer._commit = timed_commit  # type: ignore[method-assign]


def run_timed(out: Path, target: Callable[[Timings], int]) -> int:
    timings = Timings()
    try:
        return target(timings)
    finally:
        out.write_text(json.dumps(timings.summary(), indent=1))


# -- per-thread CPU profile ----------------------------------------------------------------


def run_profiled(out: Path, target: Callable[[], int]) -> int:
    """Run ``target`` with a CPU-time cProfile in the main thread and in every thread
    started meanwhile (``python -m cProfile`` sees the main thread only, and the
    C-STORE work runs in pynetdicom's threads); merge the finished threads' stats."""
    finished: list[cProfile.Profile] = []
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def profiled_bootstrap(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            bootstrap(self)
        finally:
            prof.disable()
            finished.append(prof)

    threading.Thread._bootstrap_inner = profiled_bootstrap  # type: ignore[attr-defined]
    main = cProfile.Profile(time.thread_time)
    main.enable()
    try:
        return target()
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for prof in list(finished):
            stats.add(prof)
        stats.dump_stats(str(out))


def profile_groups(path: Path, baseline: Path, images: int, n: int = 20) -> dict[str, Any]:
    """CPU per image by package and the top functions by own CPU time, with what the
    same receiver spent starting and stopping with no traffic (``baseline``) taken off."""
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    base = pstats.Stats(str(baseline)).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    rows = []
    for key, entry in raw.items():
        b = base.get(key, (0, 0, 0.0, 0.0))
        nc, tt, ct = entry[1] - b[1], max(0.0, entry[2] - b[2]), max(0.0, entry[3] - b[3])
        if nc <= 0 and tt <= 0:
            continue
        file, line, func = key
        group = _group(file, func)
        groups[group] = groups.get(group, 0.0) + tt
        where = "/".join(Path(file).parts[-2:]) + f":{line}" if line else file
        rows.append(
            {"function": f"{func} ({where})", "group": group, "ncalls": nc, "tt": tt, "ct": ct}
        )
    total = sum(groups.values())
    return {
        "cpu_s": total,
        "cpu_ms_per_image": total / images * 1e3,
        "groups": [
            {"group": g, "cpu_s": s, "share": s / total, "us_per_image": s / images * 1e6}
            for g, s in sorted(groups.items(), key=lambda kv: -kv[1])
        ],
        "top": [
            r | {"us_per_image": r["tt"] / images * 1e6}
            for r in sorted(rows, key=lambda r: -r["tt"])[:n]
        ],
    }


def _group(file: str, func: str) -> str:
    """Which code a profile entry belongs to (the package, or what a builtin does)."""
    if file == "~":
        name = func.strip("<>")
        for key, label in (
            ("sqlite3", "sqlite (C)"),
            ("fsync", "fsync"),
            ("posix.write", "file write"),
            ("_io.BufferedWriter", "file write"),
            ("_socket.socket", "socket I/O"),
            ("select", "select/poll"),
            ("_thread.lock", "lock waits"),
            ("hashlib", "sha256"),
            ("_hashlib", "sha256"),
            ("bytes", "bytes copy/join"),
            ("bytearray", "bytes copy/join"),
            ("memoryview", "bytes copy/join"),
        ):
            if key in name:
                return label
        return "other builtins"
    p = Path(file)
    parts = p.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    try:
        rel = p.resolve().relative_to(REPO)
        return f"medgw {rel.parts[0]}/"
    except ValueError:
        pass
    return f"stdlib {p.stem}"


# -- sending -------------------------------------------------------------------------------


class Senders:
    """``count`` storescu processes: one sends every folder of the set, or each of 4
    sends one folder; all files of a process go in one association."""

    def __init__(self, fs: FileSet, port: int, called: str, count: int, log: Path) -> None:
        assert STORESCU is not None
        groups = [fs.parts] if count == 1 else [[p] for p in fs.parts]
        if count not in (1, len(fs.parts)):
            raise ValueError(f"1 or {len(fs.parts)} senders")
        self.argvs = [
            [
                STORESCU,
                "-aet",
                CALLING_AE,
                "-aec",
                called,
                "-xf",
                str(fs.profile),
                "Bench",
                "+sd",
                "127.0.0.1",
                str(port),
                *map(str, dirs),
            ]
            for dirs in groups
        ]
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []
        self.t0 = self.t_end = 0.0
        self._ru0: Any = None

    def start(self) -> None:
        self._ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.monotonic()
        with open(self.log, "ab") as log:
            for argv in self.argvs:
                self.procs.append(
                    subprocess.Popen(
                        argv,
                        env=dcmtk_env(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )

    def done(self) -> bool:
        if all(p.poll() is not None for p in self.procs):
            if not self.t_end:
                self.t_end = time.monotonic()
            return True
        return False

    def wait(self, timeout_s: float) -> float:
        wait_until(self.done, timeout_s, "storescu to finish", 0.005)
        bad = [p.returncode for p in self.procs if p.returncode]
        if bad:
            tail = self.log.read_text(errors="replace").splitlines()[-10:]
            raise RuntimeError(f"storescu exited {bad}:\n" + "\n".join(tail))
        return self.t_end - self.t0

    def cpu_s(self) -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime - self._ru0.ru_utime - self._ru0.ru_stime

    def stop(self) -> None:
        for p in self.procs:
            stop_pid(p, 5.0)


# -- 1. receive ------------------------------------------------------------------------------


def make_receiver(key: str, work: Path, name: str, wrap: tuple[str, ...] = ()) -> Receiver:
    if key == "floor":
        return StoreScp(work, name, ignore=True)
    if key == "storescp":
        return StoreScp(work, name)
    if key == "orthanc":
        return OrthancRx(work, name)
    if key == "gateway":
        return GatewayRx(work, name, wrap=wrap)
    if key == "gateway-nospool":  # the handler writes each file after its last PDU
        return GatewayRx(work, name, wrap=wrap, listener={"spool_from_kb": 0})
    if key == "ceiling":
        return CeilingRx(work, name, wrap=wrap)
    raise ValueError(key)


def receive_once(
    key: str,
    fs: FileSet,
    senders: int,
    work: Path,
    name: str,
    *,
    wrap: tuple[str, ...] = (),
    spy: Path | None = None,
) -> dict[str, Any]:
    """A fresh receiver, the set sent to it, the count checked, the receiver stopped and
    its storage synced and removed (outside the timed window). ``spy``: py-spy samples
    the receiver while the set is sent, into that file (raw, ``PySpy``)."""
    rx = make_receiver(key, work, name, wrap)
    try:
        with rx:
            out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
            send = Senders(fs, rx.port, rx.ae_title, senders, rx.dir / "storescu.log")
            sampler = PySpy(rx.pid, spy) if spy else None
            busy0, cpu0 = _peers.machine_busy(), proc_cpu_s(rx.pid)
            try:
                send.start()
                wall = send.wait(max(120.0, fs.files / 2))
            finally:
                send.stop()
                if sampler:
                    sampler.stop()
            busy = _peers.machine_busy() - busy0
            cpu = proc_cpu_s(rx.pid) - cpu0
            sender_cpu = send.cpu_s()
            received = rx.count()
    finally:
        rx.stop()
        os.sync()  # storescp's dirty pages go out now, not during the next run
        shutil.rmtree(rx.dir, ignore_errors=True)
    if received not in (fs.files, -1):
        raise RuntimeError(f"{key}: {received} of {fs.files} instances arrived")
    rx_cpu = cpu if key != "storescp" and key != "floor" else None  # forked children: unseen
    ours = sender_cpu + (rx_cpu or 0.0)
    return out | {
        "seconds": wall,
        "images_per_s": fs.files / wall,
        "mb_per_s": fs.mb / wall,
        "received": received,
        "receiver_cores": rx_cpu / wall if rx_cpu is not None else None,
        "receiver_cpu_ms_per_image": rx_cpu / fs.files * 1e3 if rx_cpu is not None else None,
        "sender_cores": sender_cpu / wall,
        "machine_busy_cores": busy / wall,
        "foreign_cores": max(0.0, busy - ours) / wall if rx_cpu is not None else None,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (so its other figures belong to the same run)."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    mid = ranked[(len(ranked) - 1) // 2]  # the lower one of two middles
    return mid | {
        "runs_images_per_s": [r["images_per_s"] for r in runs],
        "spread": (ranked[-1]["images_per_s"] - ranked[0]["images_per_s"]) / mid["images_per_s"],
    }


def bench_receive(fs: FileSet, work: Path, keys: list[str], repeat: int) -> dict[str, Any]:
    """Every receiver x (1, 4) senders, ``repeat`` rounds; within a round the receivers
    go in a rotated order, so slow drift of the machine falls on all of them."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {s: [] for s in SENDERS} for k in keys}
    for rnd in range(repeat):
        order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
        for senders in SENDERS:
            for key in order:
                r = receive_once(key, fs, senders, work, f"{fs.key}-{key}-{senders}-{rnd}")
                runs[key][senders].append(r)
                say(
                    f"  round {rnd + 1} {LABELS[key]:<28} {senders} sender(s): "
                    f"{r['images_per_s']:7.1f} img/s {r['mb_per_s']:7.1f} MB/s"
                    + (
                        f"  receiver {r['receiver_cores']:.2f} cores"
                        if r["receiver_cores"] is not None
                        else ""
                    )
                    + noisy(r)
                )
    return {
        k: {str(s): median_of(v) | {"runs": v} for s, v in by.items()} for k, by in runs.items()
    }


def noisy(r: dict[str, Any]) -> str:
    f = r.get("foreign_cores")
    busy = r.get("busy_before_cores", 0.0)
    if (f is not None and f >= 0.15) or busy >= _peers.QUIET_CORES:
        return f"  [!] machine not quiet (other processes {f or busy:.2f} cores)"
    return ""


# -- 2. forward end to end ------------------------------------------------------------------


def forward_once(fs: FileSet, work: Path, name: str, via: str, workers: int = 1) -> dict[str, Any]:
    """storescu -> [gateway | relay ->] storescp; the time from the first send until the
    last file is in the storescp's folder (polled every 5 ms). ``via``: ``direct``,
    ``gateway`` (``workers`` dicom-store workers) or ``relay`` (the pynetdicom ceiling)."""
    pacs = StoreScp(work, f"{name}-pacs")
    hop: GatewayRx | RelayRx | None = None
    try:
        with pacs:
            target: Receiver = pacs
            if via == "gateway":
                hop = GatewayRx(work, f"{name}-gw", forward_to=pacs.port, workers=workers)
            elif via == "relay":
                hop = RelayRx(work, f"{name}-relay", forward_to=pacs.port, pairs=fs.pairs)
            if hop is not None:
                target = hop.__enter__()
            out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
            send = Senders(fs, target.port, target.ae_title, 1, pacs.dir / "storescu.log")
            cpu0 = proc_cpu_s(hop.pid) if hop else 0.0
            deadline = time.monotonic() + max(180.0, fs.files)
            try:
                send.start()
                while files_in(pacs.out) < fs.files:
                    if time.monotonic() > deadline:
                        logs = [f"--- {r.key} log:\n{r.log_tail()}" for r in (pacs, hop) if r]
                        raise RuntimeError(
                            f"{via}: {files_in(pacs.out)} of {fs.files} arrived in time\n"
                            + "\n".join(logs)
                        )
                    send.done()
                    time.sleep(0.005)
                t_last = time.monotonic()
                sent_s = send.wait(60.0)
            finally:
                send.stop()
            wall = t_last - send.t0
            out |= {
                "seconds": wall,
                "images_per_s": fs.files / wall,
                "mb_per_s": fs.mb / wall,
                "sender_done_s": sent_s,
                "accepted_images_per_s": fs.files / sent_s,
                "arrived": files_in(pacs.out),
                "hop_cores": (proc_cpu_s(hop.pid) - cpu0) / wall if hop else None,
            }
            if isinstance(hop, GatewayRx):
                out["delivered_metric"] = hop.delivered()
            if hop is not None:  # a stall shows here (the gateway logs at WARNING)
                text = hop.log.read_text(errors="replace") if hop.log.exists() else ""
                out["hop_warnings"] = [
                    line[:300] for line in text.splitlines() if "WARNING" in line or "ERROR" in line
                ][-8:]
    finally:
        if hop is not None:
            hop.stop()
        pacs.stop()
        os.sync()
        shutil.rmtree(pacs.dir, ignore_errors=True)
        if hop is not None:
            shutil.rmtree(hop.dir, ignore_errors=True)
    return out


def bench_forward(fs: FileSet, work: Path, repeat: int, workers: tuple[int, ...]) -> dict[str, Any]:
    variants = [("direct", "direct", 1), ("relay", "relay", 1)]
    variants += [(f"gateway-{w}w", "gateway", w) for w in workers]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v, _, _ in variants}
    for rnd in range(repeat):
        for label, via, w in variants:
            r = forward_once(fs, work, f"{fs.key}-fwd-{label}-{rnd}", via, w)
            runs[label].append(r)
            extra = (
                f"  (storescu done after {r['sender_done_s']:.2f} s, "
                f"hop {r['hop_cores']:.2f} cores)"
                if r["hop_cores"] is not None
                else ""
            )
            say(
                f"  round {rnd + 1} {FORWARDS.get(label, label):<34} {r['images_per_s']:7.1f} "
                f"img/s {r['mb_per_s']:7.1f} MB/s{extra}" + noisy(r)
            )
            for line in r.get("hop_warnings", []):
                say(f"      log: {line}")
    return {k: median_of(v) | {"runs": v} for k, v in runs.items()}


# -- 3. profile -------------------------------------------------------------------------------


def bench_timings(sets: dict[str, FileSet], work: Path) -> dict[str, Any]:
    """The gateway and the ceiling once more with step timers (``Timings``), per set and
    number of senders: where the wall time of one C-STORE cycle goes."""
    res: dict[str, Any] = {}
    for fs in sets.values():
        for senders in SENDERS:
            for key in ("gateway", "ceiling"):
                out = work / f"timings-{key}-{fs.key}-{senders}.json"
                name = f"timed-{key}-{fs.key}-{senders}"
                r = receive_once(key, fs, senders, work, name, wrap=("--timings", str(out)))
                res[f"{key} {fs.key} {senders}"] = {
                    "images_per_s": r["images_per_s"],
                    "steps": json.loads(out.read_text()),
                }
    return res


def print_timings(res: dict[str, Any]) -> None:
    for label, r in res.items():
        key, set_key, senders = label.split()
        say(
            f"  {RECEIVERS[key]}, set {set_key}, {senders} sender(s): "
            f"{r['images_per_s']:.1f} img/s "
            f"(cycle {1e3 * int(senders) / r['images_per_s']:.2f} ms per image per association)"
        )
        for name, st in r["steps"].items():
            if "mean_ms" in st:
                say(
                    f"    {name:<42} n={st['n']:<5} mean {st['mean_ms']:7.2f} ms  "
                    f"p50 {st['p50_ms']:7.2f}  p90 {st['p90_ms']:7.2f}"
                )
            else:
                say(f"    {name:<42} {st['mean']:.2f}")


def bench_profile(fs: FileSet, work: Path, out_dir: Path) -> dict[str, Any]:
    """The gateway and the ceiling under the per-thread CPU profiler: once idle (start,
    2 s, stop) and once receiving the set from 1 sender; the difference is reported."""
    res = {}
    for key in ("gateway", "ceiling"):
        prof = out_dir / f"dicom-{key}-{fs.key}.prof"
        base = out_dir / f"dicom-{key}-idle.prof"
        for f in (prof, base):
            f.unlink(missing_ok=True)
        idle = make_receiver(key, work, f"profile-idle-{key}", ("--profiled", str(base)))
        with idle:
            time.sleep(2.0)
        idle.count()  # the ceiling reports at exit; stops it
        idle.stop()
        shutil.rmtree(idle.dir, ignore_errors=True)
        wrap = ("--profiled", str(prof))
        r = receive_once(key, fs, 1, work, f"profile-{key}-{fs.key}", wrap=wrap)
        res[key] = {"images_per_s": r["images_per_s"], "file": str(prof.relative_to(REPO))}
        res[key] |= profile_groups(prof, base, fs.files)
    return res


PY_SPY = shutil.which("py-spy", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}")


class PySpy:
    """``py-spy record`` attached to a running receiver: samples every thread's Python
    stack 100 times a second from outside the process (no instrumentation), keeping
    only samples where the thread is running, not waiting (py-spy's idle filter);
    stopped with SIGINT, it writes collapsed stacks (``--format raw``)."""

    RATE = 100

    def __init__(self, pid: int, out: Path) -> None:
        if PY_SPY is None:
            raise SystemExit("--py-spy needs py-spy (in requirements-dev.lock: make venv)")
        self.out = out
        out.unlink(missing_ok=True)
        argv = [PY_SPY, "record", "--pid", str(pid), "--rate", str(self.RATE)]
        argv += ["--format", "raw", "--output", str(out), "--threads", "--full-filenames"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        time.sleep(0.5)  # attached before the first image

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def pyspy_summary(path: Path, images: int, n: int = 15) -> dict[str, Any]:
    """Sampled running time per image, by thread, by code (the innermost Python frame's
    package, ``_group``) and by innermost function."""
    threads: dict[str, int] = {}
    groups: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]  # "thread (TID): NAME"
        role = thread.rstrip("0123456789-_@:. ").split("@")[0] or "?"
        threads[role] = threads.get(role, 0) + int(count)
        if len(frames) > 1:  # the innermost Python frame: "FUNCTION (FILE:LINE)"
            func, _, where = frames[-1].rpartition(" (")
            file = where.rstrip(")").rsplit(":", 1)[0]
            group, key = _group(file, func), f"{func} ({'/'.join(Path(file).parts[-2:])})"
        else:  # a thread sampled outside any Python frame
            group = key = "(no Python frame)"
        groups[group] = groups.get(group, 0) + int(count)
        leaves[key] = leaves.get(key, 0) + int(count)
    total = sum(threads.values()) or 1

    def table(d: dict[str, int], limit: int) -> list[dict[str, Any]]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:limit]
        return [
            {"name": k, "share": v / total, "ms_per_image": v / PySpy.RATE / images * 1e3}
            for k, v in rows
        ]

    return {
        "file": str(path.relative_to(REPO)),
        "samples": total,
        "running_ms_per_image": total / PySpy.RATE / images * 1e3,
        "threads": table(threads, 10),
        "groups": table(groups, n),
        "top": table(leaves, n),
    }


def bench_pyspy(fs: FileSet, work: Path, out_dir: Path) -> dict[str, Any]:
    """The gateway and the ceiling receiving the set from 1 sender, sampled by py-spy."""
    res = {}
    for key in ("gateway", "ceiling"):
        spy = out_dir / f"dicom-pyspy-{key}-{fs.key}.txt"
        r = receive_once(key, fs, 1, work, f"pyspy-{key}-{fs.key}", spy=spy)
        res[key] = {"images_per_s": r["images_per_s"]} | pyspy_summary(spy, fs.files)
    return res


def print_pyspy(key: str, p: dict[str, Any]) -> None:
    say(
        f"  {RECEIVERS[key]} sampled by py-spy: {p['images_per_s']:.1f} img/s, "
        f"threads running {p['running_ms_per_image']:.2f} ms per image in all ({p['file']})"
    )
    for title, rows in (("by thread", "threads"), ("by code", "groups"), ("by function", "top")):
        say(f"    {title}:")
        for r in p[rows]:
            say(f"      {r['ms_per_image']:7.2f} ms/img {r['share']:6.1%}  {r['name']}")


def print_profile(key: str, p: dict[str, Any], groups: int = 12, top: int = 15) -> None:
    say(
        f"  {RECEIVERS[key]} under the profiler: {p['images_per_s']:.1f} img/s, "
        f"{p['cpu_ms_per_image']:.2f} ms CPU per image, all threads, idle start/stop taken off "
        f"({p['file']})"
    )
    say("    CPU by package / builtin:")
    for g in p["groups"][:groups]:
        say(f"      {g['group']:<26} {g['us_per_image']:8.0f} µs/img  {g['share']:6.1%}")
    say(f"    top {top} functions by own CPU:")
    for r in p["top"][:top]:
        say(f"      {r['us_per_image']:8.0f} µs/img  {r['ncalls']:>8}  {r['function']}")


# -- report ---------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def summarize(res: dict[str, Any]) -> list[str]:
    lines = []
    for key, fs in res["sets"].items():
        rec = res["receive"].get(key, {})
        if not rec and not res["forward"].get(key):
            continue
        lines.append(
            f"set {key}: {fs['files']} x {fs['label']}, {fs['mb']:.0f} MB "
            f"(mean {fs['mb'] / fs['files'] * 1e3:.0f} kB); median of {res['repeat']}"
        )
        if rec:
            lines.append(
                f"  {'receiver':<28} {'1 sender':>17} {'4 senders':>17} {'4÷1':>6} "
                f"{'rx cores':>9} {'rx CPU':>10}"
            )
            lines.append(
                f"  {'':<28} {'img/s':>8} {'MB/s':>8} {'img/s':>8} {'MB/s':>8} {'':>6} "
                f"{'(1 snd)':>9} {'ms/img':>10}"
            )
        for k, label in LABELS.items():
            if k not in rec:
                continue
            one, four = rec[k]["1"], rec[k]["4"]
            cores = one["receiver_cores"]
            cpu = one["receiver_cpu_ms_per_image"]
            lines.append(
                f"  {label:<28} {one['images_per_s']:8.1f} {one['mb_per_s']:8.1f} "
                f"{four['images_per_s']:8.1f} {four['mb_per_s']:8.1f} "
                f"{four['images_per_s'] / one['images_per_s']:6.2f} "
                + (f"{cores:9.2f} {cpu:10.2f}" if cores is not None else f"{'-':>9} {'-':>10}")
            )
        if "gateway" in rec:
            gw = rec["gateway"]
            for other, target, what in (
                ("orthanc", TARGET_VS_ORTHANC, "gateway ÷ Orthanc"),
                ("ceiling", TARGET_VS_CEILING, "gateway ÷ pynetdicom ceiling"),
                ("storescp", 0.0, "gateway ÷ DCMTK storescp"),
                ("gateway-nospool", 0.0, "gateway ÷ itself, spool off"),
            ):
                if other not in rec:
                    continue
                ratios = [gw[s]["images_per_s"] / rec[other][s]["images_per_s"] for s in ("1", "4")]
                tail = "  ".join(
                    f"{s} snd {r:.2f}" + (f" {verdict(r, target)}" if target else "")
                    for s, r in zip(("1", "4"), ratios, strict=True)
                )
                lines.append(
                    f"  {what:<30} {tail}" + (f"   (target ≥ {target:g})" if target else "")
                )
            c = gw["4"]["images_per_s"] / gw["1"]["images_per_s"]
            lines.append(
                f"  {'gateway 4 senders ÷ 1':<30} {c:.2f} {verdict(c, TARGET_CONCURRENT)}"
                f"   (target ≥ {TARGET_CONCURRENT:g})"
            )
        fwd = res["forward"].get(key)
        if fwd:
            direct = fwd["direct"]
            lines.append(
                f"  forward, 1 sender: direct storescu->storescp "
                f"{direct['images_per_s']:.1f} img/s {direct['mb_per_s']:.1f} MB/s"
            )
            target = TARGET_FORWARD[key]
            for label, r in fwd.items():
                if label == "direct":
                    continue
                ratio = r["images_per_s"] / direct["images_per_s"]
                judged = f"{verdict(ratio, target)} (target ≥ {target:.0%})"
                lines.append(
                    f"    {FORWARDS.get(label, label):<32} {r['images_per_s']:7.1f} img/s "
                    f"{r['mb_per_s']:7.1f} MB/s = {ratio:4.0%} of direct "
                    + (judged if label.startswith("gateway") else "(no durability: the bound)")
                )
                lines.append(
                    f"    {'':<32} storescu done at {r['accepted_images_per_s']:.1f} img/s, "
                    f"hop process {r['hop_cores']:.2f} cores"
                )
        lines.append("")
    return lines


def code_version() -> dict[str, Any]:
    """The commit measured, files changed since, and a digest of the DICOM code (others
    edit it while we run: the digest at the end says whether it changed meanwhile)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    digest = hashlib.sha256()
    for rel in (
        "dicom/scp.py",
        "dicom/scu.py",
        "dicom/net.py",
        "dicom/headers.py",
        "gateway/journal.py",
        "gateway/delivery.py",
        "gateway/service.py",
    ):
        with contextlib.suppress(OSError):
            digest.update((REPO / rel).read_bytes())
    dirty = git("status", "--porcelain", "--", "gateway", "dicom", "drivers", "pyproject.toml")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": dirty.splitlines(),
        "digest": digest.hexdigest()[:12],
    }


def mount_of(path: Path) -> tuple[str, str, str]:
    real, best = str(path.resolve()), ("/", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return best


def pick_workdir(requested: str | None) -> Path:
    """A scratch folder on a real disk: the temp dir if it shares the repository's."""
    if requested:
        base = Path(requested)
    else:
        tmp = Path(tempfile.gettempdir())
        same = os.stat(tmp).st_dev == os.stat(REPO).st_dev
        base = tmp if same and mount_of(tmp)[2] not in ("tmpfs", "ramfs") else REPO / "var/bench"
    base.mkdir(parents=True, exist_ok=True)
    if mount_of(base)[2] in ("tmpfs", "ramfs"):
        say(f"WARNING: {base} is on {mount_of(base)[2]}: fsync costs nothing there")
    return Path(tempfile.mkdtemp(prefix="medgw-dicom-bench-", dir=base))


def orthanc_version() -> str:
    done = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout.splitlines() or ["?"])[0]


# -- main -------------------------------------------------------------------------------------


def receiver_process(args: argparse.Namespace) -> int:
    """``--serve-discard PORT`` or ``--gateway-cli ARGS...``, optionally under the
    per-thread profiler (``--profiled FILE``) or the step timers (``--timings FILE``)."""
    sys.path.insert(0, str(REPO))
    if args.timings:

        def timed(t: Timings) -> int:
            if args.serve_discard:
                return serve_discard(args.serve_discard, t.handler)
            install_gateway_timings(t)
            from gateway.cli import main as gateway_main  # noqa: PLC0415

            return gateway_main(args.gateway_cli)

        return run_timed(Path(args.timings), timed)

    def plain() -> int:
        if args.serve_discard:
            return serve_discard(args.serve_discard)
        from gateway.cli import main as gateway_main  # noqa: PLC0415

        return gateway_main(args.gateway_cli)

    return run_profiled(Path(args.profiled), plain) if args.profiled else plain()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sets, one round: a smoke test")
    p.add_argument("--repeat", type=int, help="rounds per figure (default 3; --quick 1)")
    p.add_argument("--ct", type=int, help="CT-sized instances (default 500; --quick 100)")
    p.add_argument("--cr", type=int, help="radiographs (default 50; --quick 12)")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    p.add_argument("--workdir", help="scratch folder (default: temp dir if on the repo's disk)")
    p.add_argument("--receivers", default=",".join(RECEIVERS), help="subset, comma-separated")
    p.add_argument("--forward-workers", default="1,4", help="dicom-store workers to try")
    p.add_argument("--no-forward", action="store_true")
    p.add_argument("--no-receive", action="store_true", help="skip section 1")
    p.add_argument("--forward-rounds", type=int, help="rounds of section 2 (default 2)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled runs")
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="add section 3c: gateway and ceiling sampled by py-spy while receiving",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="S",
        help="before each transfer wait up to S s for the machine to go idle",
    )
    p.add_argument("--serve-discard", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument(
        "--serve-relay", nargs=3, metavar=("PORT", "DEST", "PAIRS"), help=argparse.SUPPRESS
    )
    p.add_argument("--profiled", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--timings", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--gateway-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve_discard or args.gateway_cli:  # a receiver process of ours
        return receiver_process(args)
    if args.serve_relay:
        sys.path.insert(0, str(REPO))
        port, dest, pairs = args.serve_relay
        return serve_relay(int(port), int(dest), pairs)

    missing = [n for n, w in (("storescu", STORESCU), ("storescp", STORESCP)) if w is None]
    if missing or not Path(ORTHANC).exists():
        raise SystemExit(f"needs DCMTK and Orthanc (missing: {missing or ['Orthanc']})")
    _peers.quiet_wait_s = args.wait_quiet
    repeat = args.repeat or (1 if args.quick else 3)
    n_ct = args.ct or (100 if args.quick else 500)
    n_cr = args.cr or (12 if args.quick else 50)
    keys = [k for k in args.receivers.split(",") if k]
    workers = tuple(int(w) for w in args.forward_workers.split(",") if w)
    work = pick_workdir(args.workdir)
    out_dir = REPO / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    mnt, dev, fstype = mount_of(work)
    res: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "state_fs": f"{dev} {fstype} on {mnt}",
            "loadavg_start": os.getloadavg(),
            "orthanc": orthanc_version(),
        },
        "code": code_version(),
        "repeat": repeat,
        "sets": {},
        "receive": {},
        "forward": {},
    }
    say(
        f"medgw DICOM bench: {os.cpu_count()} CPUs, scratch {work} ({dev} {fstype}), "
        f"code {res['code']['commit']}{' + local changes' if res['code']['dirty'] else ''} "
        f"(digest {res['code']['digest']}), {res['machine']['orthanc']}, {repeat} round(s)"
    )
    try:
        say("\n0. data")
        sets = {
            "ct": make_set("ct", "CT/MR-sized", work / "data", n_ct, ct_templates()),
            "cr": make_set("cr", "CR radiograph", work / "data", n_cr, cr_templates()),
        }
        for fs in sets.values():
            res["sets"][fs.key] = {
                "files": fs.files,
                "bytes": fs.bytes,
                "mb": fs.mb,
                "label": fs.label,
                "templates": fs.sizes,
            }
            sizes = ", ".join(f"{n} {s / 1e3:,.0f} kB" for n, s in fs.sizes.items())
            say(f"  {fs.key}: {fs.files} files, {fs.mb:.1f} MB ({sizes})")

        for fs in sets.values():
            say(f"\n1. receive, set {fs.key} ({fs.files} files, {fs.mb:.0f} MB)")
            if not args.no_receive:
                res["receive"][fs.key] = bench_receive(fs, work, keys, repeat)
            if not args.no_forward:
                say(f"\n2. forward end to end, set {fs.key}")
                rounds = args.forward_rounds or max(1, min(repeat, 2))
                res["forward"][fs.key] = bench_forward(fs, work, rounds, workers)

        if args.py_spy:
            res["pyspy"] = {}
            for fs in sets.values():
                say(f"\n3c. where the running time goes (set {fs.key}, 1 sender, py-spy)")
                res["pyspy"][fs.key] = spied = bench_pyspy(fs, work, out_dir)
                for key in ("gateway", "ceiling"):
                    print_pyspy(key, spied[key])
        if not args.no_profile and "gateway" in keys:
            say("\n3a. where the wall time of a C-STORE goes (step timers in the receiver)")
            res["timings"] = bench_timings(sets, work)
            print_timings(res["timings"])
            say("\n3b. where the CPU goes (CT-sized set, 1 sender, CPU profile of every thread)")
            res["profile"] = prof = bench_profile(sets["ct"], work, out_dir)
            for key in ("gateway", "ceiling"):
                print_profile(key, prof[key])
    finally:
        if args.keep:
            say(f"\nscratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["code_after"] = code_version()
    say("\n4. summary (MB = 10^6 bytes; receivers restarted for every transfer)")
    lines = summarize(res)
    for line in lines:
        say(f"  {line}" if line else "")
    if res["code_after"]["digest"] != res["code"]["digest"]:
        say("  [!] the DICOM/gateway code changed during this run: figures mix two versions")
    say("  (storescu, receivers and the gateway share the same 2 cores; see bench/README.md)")
    res["summary"] = lines
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        say(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
