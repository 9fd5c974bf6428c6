"""AI triage benchmark: the model alone, decode + infer alone, gateway triage, latency, ingest.

    .venv/bin/python bench/ai.py [--quick] [--json FILE] [--models mobilenet,densenet]

For each model of ``../shared/models`` (the real MobileNetV3 int8 CXR classifier and
the DenseNet-121-sized graph with random weights, through their cards in
``tests/cards``), on this machine's onnxruntime provider:

1. the model alone: ``session.run`` on one prepared tensor for a few seconds, from
   1 and 2 threads at once (the session as the gateway opens it: ``ModelRuntime``,
   intra-op threads as configured, 0 = onnxruntime's default) -> images/s;
2. decode + preprocess + infer alone, no gateway: the chest set (RG1 chest CR from
   pydicom-data, uncompressed and JPEG 2000 lossless, and the five NIH PNGs wrapped
   as CR instances with BodyPartExamined CHEST and ViewPosition PA, each instance its
   own study) read from disk, ``prepare`` by the card's recipe and run, from 1 and 2
   worker threads -> images/s;
3. the gateway's triage: ``medgw run`` (one ``dicom-scp`` listener, a route
   ``{kind: dicom, modality: [CR, DX]}`` with ``ai-triage`` (SR on, SC/HL7/event
   off) to a DCMTK ``storescp`` acting as PACS), a burst of the chest set sent by one
   ``storescu`` (``TCP_NODELAY=1``); from the first send to the last SR written at
   the PACS -> studies/s, and its ratio to (2) at the same number of workers
   (target >= 70 %). Workers 1 and 2; for 2, once with ``ai-triage: {workers: 2}``
   alone and once with the route's ``delivery: {workers: 2, ordered: false}`` too.
   The step's other settings are the product's defaults (``isolation`` included)
   unless ``--triage-option KEY=VALUE`` says otherwise;
4. added latency per study: the chest studies one at a time (each sent when the
   previous one is complete), with and without the ``ai-triage`` step: original
   written at the PACS minus the time storescu was started, p50/p95; added = with -
   without (target for the DenseNet-sized model: p95 <= 1.5 s);
5. ingest unaffected: CT-sized non-AI instances (CT_small with new UIDs, a route
   without AI) streamed by storescu into the same gateway, alone and while a burst
   of chest studies is being triaged (the stream starts once the burst is received);
   ratio of the rates (target >= 90 %).

Sections 2 and 3 run ``--rounds`` times (default 2) and the fastest round counts
(others on the machine only ever slow a round down); 3b runs the 1-worker burst
once more with wall-clock timers on the triage and receive steps inside the gateway.
A summary with PASS/FAIL per target ends the run; bench/README.md ("AI triage")
explains every figure. Every process the bench starts is stopped by its pid. Never
run by the tests. Exit status 0 only when every target is met.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# ``python bench/ai.py`` puts bench/ first on sys.path, where bench/dicom.py would
# shadow the product's ``dicom`` package: the repository goes first instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))


def _sibling(name: str, file: str) -> Any:
    """A sibling bench script as a module (bench/dicom.py under another name)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_peers = _sibling("_peers", "_peers.py")
bd = _sibling("bench_dicom", "dicom.py")  # data, storescu profiles, process helpers
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]  # it added bench/

PYTHON = _peers.PYTHON
STORESCU, STORESCP = shutil.which("storescu"), shutil.which("storescp")
SHARED_MODELS = (REPO.parent / "shared/models").resolve()
SAMPLES = (REPO.parent / "shared/samples/cxr").resolve()
CARDS = REPO / "tests/cards"
MODELS = {  # key -> (card file, label)
    "mobilenet": ("cxr-nih15-mobilenetv3.yaml", "MobileNetV3-S int8 (real)"),
    "densenet": ("densenet121-xrv-random.yaml", "DenseNet-121 fp32 (random)"),
}
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
GATEWAY_AE, PACS_AE, CALLING_AE = "MEDGW", "PACS", "BENCH"

TARGET_RATIO = 0.70  # gateway triage / decode+preprocess+infer alone
TARGET_ADDED_P95_S = 1.5  # DenseNet-sized model, added latency p95
TARGET_INGEST = 0.90  # non-AI ingest during a triage burst / alone
OUTPUTS = {"sr": True, "sc": False, "hl7": False, "event": False}  # per route, every run
# section 5: (ai-triage workers, route delivery workers, onnxruntime threads, SR on); the
# last two are diagnostics: one core left to the rest, and no SR to build
TRIAGE_OPTIONS: dict[str, Any] = {}  # --triage-option key=value, added to every ai-triage step
INGEST_VARIANTS = ((1, 1, 0, True), (2, 2, 0, True), (1, 1, 1, True), (1, 1, 0, False))


def say(text: str = "") -> None:
    print(text, flush=True)


# -- processes: every one we start is registered, and stopped by its pid -------------------

_procs: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _procs.append(proc)
    return proc


def stop_all() -> None:
    for proc in reversed(_procs):
        bd.stop_pid(proc, 30.0)
    _procs.clear()


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


# -- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One chest instance, its own study: where it lies and what it is."""

    kind: str  # "RG1 CR", "RG1 J2K", "NIH PNG"
    path: Path
    sop: str
    size: int


def chest_templates() -> list[tuple[str, Any]]:
    """RG1 uncompressed and JPEG 2000 lossless, then each NIH PNG as a CR instance
    (1024x1024, 8-bit MONOCHROME2; ``00000100_000.png`` is RGBA and becomes luma)."""
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415

    from ai_models.preprocess import image_from_png  # noqa: PLC0415

    out = [
        (k, dcmread(bd.testdata(f)))
        for k, f in (("RG1 CR", "RG1_UNCR.dcm"), ("RG1 J2K", "RG1_J2KR.dcm"))
    ]
    for png in sorted(SAMPLES.glob("*.png")):
        ds = image_from_png(
            png, {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_SOP
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword, value in (
            ("PatientName", "BENCH^NIH"),
            ("PatientID", png.stem),
            ("PatientBirthDate", ""),
            ("PatientSex", "O"),
            ("StudyDate", "20260101"),
            ("StudyTime", "120000"),
            ("StudyID", "1"),
            ("ReferringPhysicianName", ""),
            ("SeriesNumber", 1),
            ("InstanceNumber", 1),
            ("ImageLaterality", ""),
            ("PatientOrientation", ""),
        ):
            setattr(ds, keyword, value)
        out.append(("NIH PNG", ds))
    return out


def chest_set(root: Path, count: int, templates: list[tuple[str, Any]]) -> list[Study]:
    """``count`` instances, templates in turn, each with new Study/Series/SOP UIDs and
    accession number; read once so every run reads them from the page cache."""
    from pydicom.uid import generate_uid  # noqa: PLC0415

    root.mkdir(parents=True)
    studies = []
    for i in range(count):
        kind, ds = templates[i % len(templates)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = f"AI{i:05d}"
        path = root / f"cxr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        path.read_bytes()
        studies.append(Study(kind, path, str(ds.SOPInstanceUID), path.stat().st_size))
    return studies


def ct_set(root: Path, count: int) -> list[Path]:
    """``count`` copies of pydicom's CT_small (128x128, 39 kB) with new UIDs, one study."""
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.uid import generate_uid  # noqa: PLC0415

    root.mkdir(parents=True)
    ds = dcmread(bd.testdata("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = root / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        path.read_bytes()
        paths.append(path)
    return paths


def pairs_of(paths: Iterable[Path]) -> list[tuple[str, str]]:
    from pydicom import dcmread  # noqa: PLC0415

    out = set()
    for p in paths:
        meta = dcmread(p, stop_before_pixels=True).file_meta
        out.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    return sorted(out)


# -- models --------------------------------------------------------------------------------


@dataclass
class Model:
    key: str
    label: str
    card_file: Path
    card: Any
    model_file: Path


def load_models(keys: list[str]) -> tuple[list[Model], list[str]]:
    """The models whose file is present; the reasons for those skipped."""
    from ai_models.card import load_card, model_path  # noqa: PLC0415

    found, skipped = [], []
    for key in keys:
        card_name, label = MODELS[key]
        card_file = CARDS / card_name
        card = load_card(card_file)
        path = model_path(card, card_file)
        if not path.exists():
            skipped.append(f"{key}: {path} absent (../shared/models missing)")
            continue
        found.append(Model(key, label, card_file, card, path))
    return found, skipped


def runtime(model: Model, workers: int = 1) -> Any:
    from ai_models.runtime import ModelRuntime, RuntimeSettings  # noqa: PLC0415

    rt = ModelRuntime(model.card, model.model_file, RuntimeSettings(workers=workers))
    if not rt.load():
        raise RuntimeError(f"{model.key}: {rt.unavailable}")
    return rt


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Window:
    """Wall time, this process's CPU and the machine's busy CPU over a measured window."""

    def __enter__(self) -> Window:
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), own_cpu_s(), _peers.machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = own_cpu_s() - self.cpu0
        self.busy = _peers.machine_busy() - self.busy0

    def figures(self, others_cpu: float = 0.0) -> dict[str, float]:
        ours = self.cpu + others_cpu
        return {
            "wall_s": self.wall,
            "machine_busy_cores": self.busy / self.wall,
            "foreign_cores": max(0.0, self.busy - ours) / self.wall,
        }


def flag(r: dict[str, Any], limit: float = _peers.QUIET_CORES) -> str:
    f = r.get("foreign_cores", 0.0)
    return f"  [!] others {f:.2f} cores" if f >= limit else ""


def bench_model_alone(model: Model, seconds: float, threads: tuple[int, ...]) -> dict[str, Any]:
    """``session.run`` on one prepared RG1 tensor, from ``n`` threads at once."""
    from pydicom import dcmread  # noqa: PLC0415

    from ai_models.preprocess import prepare  # noqa: PLC0415

    rt = runtime(model)
    tensor = prepare(
        dcmread(bd.testdata("RG1_UNCR.dcm")), model.card.preprocessing, model.card.input
    ).tensor
    feed = {model.card.input.name: tensor}
    names = [model.card.output.name]
    for _ in range(5):
        rt.session.run(names, feed)
    res: dict[str, Any] = {"provider": rt.provider}
    for n in threads:
        res[str(n)] = out = _peers.wait_quiet(_peers.quiet_wait_s)
        counts = [0] * n
        lat: list[float] = []
        deadline = time.perf_counter() + seconds

        def loop(
            i: int, deadline: float = deadline, counts: list[int] = counts, lat: list[float] = lat
        ) -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                rt.session.run(names, feed)
                lat.append(time.perf_counter() - t)
                counts[i] += 1

        with Window() as w:
            workers = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
        lat.sort()
        out |= w.figures() | {
            "runs": sum(counts),
            "images_per_s": sum(counts) / w.wall,
            "ms_p50": lat[len(lat) // 2] * 1e3,
            "cpu_cores": w.cpu / w.wall,
        }
    rt.close()
    return res


def bench_pipeline_alone(
    model: Model, studies: list[Study], workers: tuple[int, ...], rounds: int
) -> dict[str, Any]:
    """Read + prepare + infer each chest instance, from ``n`` worker threads (one
    session shared, as in the gateway); a warm-up pass over one of each kind first."""
    from pydicom import dcmread  # noqa: PLC0415

    from ai_models.preprocess import prepare  # noqa: PLC0415

    rt = runtime(model, max(workers))
    card = model.card

    def one(s: Study) -> tuple[str, float, float]:
        t0 = time.perf_counter()
        prepared = prepare(dcmread(s.path), card.preprocessing, card.input)
        t1 = time.perf_counter()
        rt.run_sync(prepared.tensor)
        return s.kind, t1 - t0, time.perf_counter() - t1

    seen: dict[str, Study] = {}
    for s in studies:
        seen.setdefault(s.kind, s)
    for s in seen.values():
        one(s)
    res: dict[str, Any] = {}
    for n in workers:
        res[str(n)] = best_of([pipeline_once(one, studies, n) for _ in range(rounds)])
    rt.close()
    return res


def pipeline_once(
    one: Callable[[Study], tuple[str, float, float]], studies: list[Study], n: int
) -> dict[str, Any]:
    out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
    with Window() as w, ThreadPoolExecutor(n) as pool:
        rows = list(pool.map(one, studies))
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, prep, infer in rows:
        by_kind.setdefault(kind, []).append((prep, infer))
    out |= w.figures() | {
        "images": len(studies),
        "images_per_s": len(studies) / w.wall,
        "cpu_cores": w.cpu / w.wall,
        "per_kind_ms": {
            k: {
                "n": len(v),
                "read_prepare": 1e3 * sum(a for a, _ in v) / len(v),
                "infer": 1e3 * sum(b for _, b in v) / len(v),
            }
            for k, v in by_kind.items()
        },
    }
    return out


def best_of(tries: list[dict[str, Any]], key: str = "images_per_s") -> dict[str, Any]:
    """The fastest of the rounds: others on the machine only ever slow a round down."""
    return max(tries, key=lambda r: r[key]) | {"rounds": [r[key] for r in tries]}


# -- peers: the PACS and the gateway ---------------------------------------------------------


class Pacs:
    """DCMTK storescp as the PACS: one process (no ``--fork``: the gateway's dicom-store
    opens one association per worker, and its CPU stays visible), bit-preserving,
    every transfer syntax, 128 kB PDU, ``TCP_NODELAY=1``. Arrival time of a file =
    its mtime (storescp writes it as the data arrive and closes it before the
    C-STORE response)."""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.out = self.dir / "out"
        self.out.mkdir(parents=True)
        self.port = _peers.free_port()
        self.log = self.dir / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Pacs:
        assert STORESCP is not None
        argv = [STORESCP, "-aet", PACS_AE, "+xa", "+B", "-pdu", str(bd.DCMTK_MAX_PDU)]
        self.proc = spawn([*argv, "-od", str(self.out), str(self.port)], self.log, bd.dcmtk_env())
        bd.wait_until(lambda: bd.port_open(self.port), 30, "storescp to listen", 0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        bd.stop_pid(self.proc, 10.0)

    def files(self, prefix: str = "") -> dict[str, float]:
        """SOP Instance UID -> arrival time (mtime, unix seconds) of every file so far
        whose modality starts with ``prefix`` (storescp names files ``<modality>.<SOP
        Instance UID>``: ``CR.1.2...``, ``SRc.1.2...``)."""
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.out):
                if not e.name.startswith(".") and e.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        out[e.name.split(".", 1)[1]] = e.stat().st_mtime
        return out

    def cpu_s(self) -> float:
        return bd.proc_cpu_s(self.proc.pid) if self.proc else 0.0


def ai_route(
    model_id: str, workers: int, route_workers: int, threads: int = 0, sr: bool = True
) -> dict[str, Any]:
    outputs = OUTPUTS if sr else {**OUTPUTS, "sr": False}
    step = {"models": [model_id], "budget_s": 20, "workers": workers, "outputs": outputs}
    step |= TRIAGE_OPTIONS
    if threads:
        step["threads"] = threads
    route: dict[str, Any] = {
        "id": "cxr-ai",
        "match": {"kind": "dicom", "modality": ["CR", "DX"]},
        "steps": [{"ai-triage": step}],
        "to": ["pacs"],
    }
    if route_workers > 1:
        route["delivery"] = {"workers": route_workers, "ordered": False}
    return route


class Gateway:
    """``medgw run``: one dicom-scp listener (study grouping off: no study.complete
    events to route), log INFO (one ``ai.triaged`` line per image), the given routes,
    one dicom-store destination ``pacs`` with its defaults (1 worker, ordered)."""

    def __init__(
        self,
        work: Path,
        name: str,
        pacs: Pacs,
        routes: list[dict[str, Any]],
        models: list[Model] | None = None,
        timings: Path | None = None,
    ) -> None:
        self.timings = timings
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.port, self.http_port = _peers.free_port(), _peers.free_port()
        self.log = self.dir / "gateway.log"
        config = {
            "site": {"id": "bench"},
            "state_dir": str(self.dir / "state"),
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "journal": {"min_free_mb": 256},
            "logging": {"level": "INFO", "format": "text"},
            "listeners": [
                {
                    "id": "in",
                    "type": "dicom-scp",
                    "ae_title": GATEWAY_AE,
                    "listen": f"127.0.0.1:{self.port}",
                    "study_quiet_s": None,
                }
            ],
            "destinations": [
                {
                    "id": "pacs",
                    "type": "dicom-store",
                    "ae_title": PACS_AE,
                    "connect": f"127.0.0.1:{pacs.port}",
                }
            ],
            "routes": routes,
            "models": [{"id": m.card.id, "card": str(m.card_file)} for m in models or []],
        }
        self.config = self.dir / "gateway.yaml"
        self.config.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def __enter__(self) -> Gateway:
        argv = [PYTHON, "-m", "gateway.cli", "run", "--config", str(self.config)]
        if self.timings:
            argv[1:3] = [__file__, "--timings", str(self.timings), "--gateway-cli"]
        self.proc = spawn(argv, self.log)
        t0 = time.monotonic()
        try:
            bd.wait_until(self._ready, 90, "the gateway's /healthz", 0.05)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log_tail()}")
        return bd.http_get(self.http_port, "/healthz", 1.0)[0] == 200

    def __exit__(self, *exc: object) -> None:
        bd.stop_pid(self.proc, 30.0)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def problems(self) -> list[str]:
        return [
            line[:300]
            for line in self.log_text().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]

    def triage_lines(self) -> list[dict[str, str]]:
        """``ai.triaged`` / ``ai.not_triaged`` / ``ai.skipped`` lines as key=value dicts."""
        out = []
        for line in self.log_text().splitlines():
            m = re.search(r"\b(ai\.triaged|ai\.not_triaged|ai\.skipped)\b(.*)", line)
            if m:
                out.append({"event": m.group(1)} | dict(re.findall(r"(\w+)=(\S+)", m.group(2))))
        return out

    def provider(self) -> str:
        m = re.findall(r"ai\.model_loaded model=(\S+) .*provider=(\S+)", self.log_text())
        return ", ".join(f"{a}: {b}" for a, b in m)


def storescu(files: list[Path], port: int, profile: Path, log: Path) -> subprocess.Popen[bytes]:
    """One storescu association sending ``files`` in order (each in its own syntax)."""
    assert STORESCU is not None
    argv = [STORESCU, "-aet", CALLING_AE, "-aec", GATEWAY_AE, "-xf", str(profile), "Bench"]
    return spawn([*argv, "127.0.0.1", str(port), *map(str, files)], log, bd.dcmtk_env())


def finish(proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        bd.stop_pid(proc, 5.0)
        raise RuntimeError(f"storescu still running after {timeout_s:g} s") from None
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise RuntimeError(f"storescu exited {proc.returncode}:\n{tail}")


def wait_triaged(
    gw: Gateway,
    pacs: Pacs,
    studies: list[Study],
    timeout_s: float,
    srs_before: int = 0,
    poll_s: float = 0.02,
    expect_sr: bool = True,
) -> dict[str, float]:
    """Until every original is at the PACS and, per study, a new SR is too or the log
    says it was not triaged; returns the PACS's files. Raises after ``timeout_s``.
    Without SRs the originals are enough: the route forwards each once its step is done."""
    originals = {s.sop for s in studies}
    deadline = time.monotonic() + timeout_s
    next_log = 0.0
    not_triaged = not_triaged_before = sum(
        1 for x in gw.triage_lines() if x["event"] != "ai.triaged"
    )
    while True:
        files = pacs.files()
        have = sum(1 for u in files if u in originals)
        derived = len(pacs.files("SR")) - srs_before if expect_sr else len(originals)
        if have == len(originals) and derived + not_triaged - not_triaged_before >= len(originals):
            time.sleep(0.1)  # the last file closed (storescp writes while receiving)
            return pacs.files()
        if time.monotonic() > next_log:
            next_log = time.monotonic() + 0.5
            not_triaged = sum(1 for x in gw.triage_lines() if x["event"] != "ai.triaged")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"after {timeout_s:g} s: {have} of {len(originals)} originals and "
                f"{derived} new SRs at the PACS\n{gw.log_tail()}"
            )
        time.sleep(poll_s)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants, live or reaped (triage may run in
    worker processes of the gateway)."""
    kids: list[str] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    return bd.proc_cpu_s(pid) + sum(tree_cpu_s(int(k)) for k in kids)


def gw_window(gw: Gateway, pacs: Pacs) -> Callable[[], dict[str, float]]:
    """Start counting; the returned function gives cores used by the gateway, the PACS
    and others (the machine's busy time less ours) since."""
    t0, busy0 = time.monotonic(), _peers.machine_busy()
    g0, p0, own0 = tree_cpu_s(gw.pid), pacs.cpu_s(), own_cpu_s()
    kids0 = os.times()

    def done() -> dict[str, float]:
        wall = time.monotonic() - t0
        g, p = tree_cpu_s(gw.pid) - g0, pacs.cpu_s() - p0
        k = os.times()
        kids = k.children_user + k.children_system - kids0.children_user - kids0.children_system
        busy = _peers.machine_busy() - busy0
        ours = g + p + kids + own_cpu_s() - own0
        return {
            "gateway_cores": g / wall,
            "pacs_cores": p / wall,
            "machine_busy_cores": busy / wall,
            "foreign_cores": max(0.0, busy - ours) / wall,
        }

    return done


# -- 3. the gateway's triage throughput ---------------------------------------------------------


def bench_gateway_burst(
    model: Model,
    studies: list[Study],
    profile: Path,
    work: Path,
    name: str,
    workers: int,
    route_workers: int,
    timings: Path | None = None,
) -> dict[str, Any]:
    route = ai_route(model.card.id, workers, route_workers)
    with (
        Pacs(work, f"{name}-pacs") as pacs,
        Gateway(work, f"{name}-gw", pacs, [route], [model], timings) as gw,
    ):
        out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
        out["gateway_start_s"] = gw.start_s
        window = gw_window(gw, pacs)
        log = gw.dir / "storescu.log"
        t0 = time.time()
        proc = storescu([s.path for s in studies], gw.port, profile, log)
        files = wait_triaged(gw, pacs, studies, 120 + 10 * len(studies))
        out |= window()
        finish(proc, 30, log)
        originals = {s.sop for s in studies}
        orig_t = [t for u, t in files.items() if u in originals]
        sr_t = list(pacs.files("SR").values())
        lines = gw.triage_lines()
        ms = sorted(float(x["ms"]) for x in lines if x["event"] == "ai.triaged")
        last = max(sr_t or orig_t) - t0
        out |= {
            "studies": len(studies),
            "srs": len(sr_t),
            "not_triaged": [x for x in lines if x["event"] != "ai.triaged"],
            "seconds": last,
            "studies_per_s": len(studies) / last,
            "originals_done_s": max(orig_t) - t0,
            "triage_ms_p50": ms[len(ms) // 2] if ms else None,
            "triage_ms_max": ms[-1] if ms else None,
            "provider": gw.provider(),
            "problems": gw.problems()[-8:],
        }
    return out


# -- 3b. where a study's time goes in the gateway --------------------------------------------------

STEPS = {  # label -> (module, owner attribute or "", function name, coroutine)
    "route chain, per study (StepChain.send)": ("gateway.steps", "StepChain", "send", True),
    "  ai-triage step (TriageStep.run)": ("ai_models.triage", "TriageStep", "run", True),
    "    prepare (decode, window, resize, scale)": ("ai_models.triage", "", "prepare", False),
    "    session.run + activation": ("ai_models.runtime", "ModelRuntime", "run_sync", False),
    "    job in a worker process (TriageStep._remote)": (
        "ai_models.triage",
        "TriageStep",
        "_remote",
        True,
    ),
    "    build_sr (highdicom)": ("ai_models.triage", "", "build_sr", False),
    "    history.beats": ("ai_models.history", "History", "beats", False),
    "    history.keep_best": ("ai_models.history", "History", "keep_best", False),
    "    history.record": ("ai_models.history", "History", "record", False),
    "dicom-store: StoreLink.store (to the PACS)": ("dicom.scu", "StoreLink", "store", False),
    "dicom-store: StoreLink.associate": ("dicom.scu", "StoreLink", "associate", False),
}


def install_triage_timings(t: Any) -> None:
    """Wall-clock timers around the triage path's steps, in the gateway process (the
    product code is not changed; a step the code no longer has is skipped), and
    bench/dicom.py's timers on the receive path (C-STORE handler, blob, journal)."""
    bd.install_gateway_timings(t)
    for label, (module_name, owner_name, name, coroutine) in STEPS.items():
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        fn = getattr(owner, name, None)
        if fn is not None:
            setattr(owner, name, (t.timed_async if coroutine else t.timed)(label, fn))
    triage = importlib.import_module("ai_models.triage")
    read = getattr(triage, "_read", None)
    if read is not None:  # _read(envelope, header_only): one timer per mode
        header, full = t.timed("    dcmread header", read), t.timed("    dcmread full", read)

        def timed_read(envelope: Any, header_only: bool) -> Any:
            return (header if header_only else full)(envelope, header_only)

        triage._read = timed_read


def timings_process(args: argparse.Namespace) -> int:
    """``--timings FILE --gateway-cli ARGS...``: the gateway with the step timers."""

    def timed(t: Any) -> int:
        install_triage_timings(t)
        from gateway.cli import main as gateway_main  # noqa: PLC0415

        return int(gateway_main(args.gateway_cli) or 0)

    return int(bd.run_timed(Path(args.timings), timed))


# -- 4. added latency per study --------------------------------------------------------------------


def bench_latency(
    model: Model | None, studies: list[Study], profile: Path, work: Path, name: str, gap_s: float
) -> dict[str, Any]:
    """One study at a time; each sent ``gap_s`` after the previous one is complete."""
    routes = (
        [ai_route(model.card.id, 1, 1)] if model else [{"match": {"kind": "dicom"}, "to": ["pacs"]}]
    )
    rows = []
    with (
        Pacs(work, f"{name}-pacs") as pacs,
        Gateway(work, f"{name}-gw", pacs, routes, [model] if model else []) as gw,
    ):
        out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
        window = gw_window(gw, pacs)
        log = gw.dir / "storescu.log"
        for s in studies:
            before, srs0 = set(pacs.files()), len(pacs.files("SR"))
            t0 = time.time()
            proc = storescu([s.path], gw.port, profile, log)
            if model:
                files = wait_triaged(gw, pacs, [s], 60, srs0)
            else:
                bd.wait_until(lambda s=s: s.sop in pacs.files(), 60, "the original", 0.005)
                time.sleep(0.05)
                files = pacs.files()
            finish(proc, 30, log)
            new = {u: t for u, t in files.items() if u not in before}
            sr = [t for u, t in new.items() if u != s.sop]
            rows.append(
                {
                    "kind": s.kind,
                    "original_s": new[s.sop] - t0,
                    "sr_s": max(sr) - t0 if sr else None,
                }
            )
            time.sleep(gap_s)
        out |= window()
        out["problems"] = gw.problems()[-8:]
        if model:
            out["provider"] = gw.provider()
    out["rows"] = rows
    out |= latency_stats(rows)
    return out


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    orig = [r["original_s"] for r in rows]
    srs = [r["sr_s"] for r in rows if r["sr_s"] is not None]
    kinds: dict[str, list[float]] = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r["original_s"])
    return {
        "p50_s": pct(orig, 50),
        "p95_s": pct(orig, 95),
        "max_s": max(orig),
        "sr_p50_s": pct(srs, 50) if srs else None,
        "sr_p95_s": pct(srs, 95) if srs else None,
        "by_kind_p50_s": {k: pct(v, 50) for k, v in kinds.items()},
    }


# -- 5. ingest of non-AI traffic during a triage burst ---------------------------------------------


def ct_stream(gw: Gateway, files: list[Path], profile: Path) -> dict[str, Any]:
    """storescu sends the CT instances in one association; rate = files / its wall time
    (every C-STORE answered, i.e. journaled)."""
    log = gw.dir / "storescu-ct.log"
    t0 = time.monotonic()
    finish(storescu(files, gw.port, profile, log), 300, log)
    wall = time.monotonic() - t0
    return {
        "files": len(files),
        "seconds": wall,
        "images_per_s": len(files) / wall,
        "t0": t0,
        "t1": t0 + wall,
    }


def drained(pacs: Pacs, prefix: str, count: int, timeout_s: float = 120.0) -> None:
    """Until the PACS has ``count`` files of that modality (the gateway's backlog is out)."""
    bd.wait_until(lambda: len(pacs.files(prefix)) >= count, timeout_s, "the backlog", 0.05)
    time.sleep(0.2)


def bench_ingest(
    model: Model,
    studies: list[Study],
    chest_profile: Path,
    ct_sets: list[list[Path]],
    ct_profile: Path,
    work: Path,
    name: str,
    workers: int,
    route_workers: int,
    threads: int = 0,
    sr: bool = True,
) -> dict[str, Any]:
    """CT alone, CT while the chest burst is triaged, CT alone again (each set new)."""
    routes = [
        ai_route(model.card.id, workers, route_workers, threads, sr),
        {"match": {"kind": "dicom", "modality": ["CT", "MR"]}, "to": ["pacs"]},
    ]
    with (
        Pacs(work, f"{name}-pacs") as pacs,
        Gateway(work, f"{name}-gw", pacs, routes, [model]) as gw,
    ):
        out: dict[str, Any] = _peers.wait_quiet(_peers.quiet_wait_s)
        alone1 = ct_stream(gw, ct_sets[0], ct_profile)
        drained(pacs, "CT", len(ct_sets[0]))  # each stream starts with no backlog
        _peers.wait_quiet(_peers.quiet_wait_s)
        log = gw.dir / "storescu.log"
        burst_t0 = time.monotonic()
        wall_t0 = time.time()
        finish(storescu([s.path for s in studies], gw.port, chest_profile, log), 120, log)
        received_s = time.monotonic() - burst_t0
        window = gw_window(gw, pacs)
        during = ct_stream(gw, ct_sets[1], ct_profile)
        during |= window()
        files = wait_triaged(gw, pacs, studies, 120 + 10 * len(studies), expect_sr=sr)
        originals = {s.sop for s in studies}
        ends = pacs.files("SR").values() if sr else [t for u, t in files.items() if u in originals]
        sr_end = max(ends) - wall_t0
        # the stream's end in the burst's clock
        ct_end = during["t1"] - burst_t0
        drained(pacs, "CT", len(ct_sets[0]) + len(ct_sets[1]))
        _peers.wait_quiet(_peers.quiet_wait_s)
        alone2 = ct_stream(gw, ct_sets[2], ct_profile)
        out |= {
            "alone": [alone1, alone2],
            "during": during,
            "burst_received_s": received_s,
            "triage_done_s": sr_end,
            "stream_end_s": ct_end,
            "overlap": min(1.0, max(0.0, sr_end - received_s) / max(1e-9, ct_end - received_s)),
            "problems": gw.problems()[-8:],
        }
    base = (alone1["images_per_s"] + alone2["images_per_s"]) / 2
    out["alone_images_per_s"] = base
    out["ratio"] = during["images_per_s"] / base
    return out


# -- report ----------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def variant_label(workers: int, route_workers: int, threads: int = 0, sr: bool = True) -> str:
    if not sr:
        return f"{variant_label(workers, route_workers, threads)}, SR off"
    if threads:
        return f"{variant_label(workers, route_workers)}, threads: {threads}"
    if route_workers > 1:
        return f"{workers} workers + route delivery {route_workers} unordered"
    return f"{workers} worker{'s' if workers > 1 else ''} (ai-triage workers: {workers})"


def summarize(res: dict[str, Any]) -> tuple[list[str], bool]:
    lines: list[str] = []
    ok = True
    for key, m in res["models"].items():
        lines.append(f"{m['label']} ({m['provider']}):")
        alone = m.get("alone", {})
        for n in ("1", "2"):
            if n in alone:
                a = alone[n]
                lines.append(
                    f"  model alone, {n} thread(s): {a['images_per_s']:7.1f} images/s "
                    f"(session.run p50 {a['ms_p50']:.1f} ms){flag(a)}"
                )
        pipe = m.get("pipeline", {})
        for n in ("1", "2"):
            if n in pipe:
                lines.append(
                    f"  decode+preprocess+infer alone, {n} worker(s): "
                    f"{pipe[n]['images_per_s']:6.2f} images/s{flag(pipe[n])}"
                )
        for label, g in m.get("gateway", {}).items():
            ref = pipe.get(str(g["workers"]))
            ratio = g["studies_per_s"] / ref["images_per_s"] if ref else float("nan")
            passed = ratio >= TARGET_RATIO
            ok &= passed
            lines.append(
                f"  gateway triage, {label}: {g['studies_per_s']:6.2f} studies/s = "
                f"{ratio:4.0%} of alone {verdict(passed)} (target ≥ {TARGET_RATIO:.0%})"
                f"{flag(g, 0.3)}"
            )
        lat, base = m.get("latency"), res.get("latency_no_ai")
        if lat and base:
            add50, add95 = lat["p50_s"] - base["p50_s"], lat["p95_s"] - base["p95_s"]
            judged = key == "densenet"
            passed = add95 <= TARGET_ADDED_P95_S
            ok &= passed or not judged
            lines.append(
                f"  latency receive→PACS p50/p95: with AI {lat['p50_s']:.2f}/{lat['p95_s']:.2f} s, "
                f"without {base['p50_s']:.2f}/{base['p95_s']:.2f} s → added "
                f"{add50:.2f}/{add95:.2f} s"
                + (
                    f" {verdict(passed)} (target p95 ≤ {TARGET_ADDED_P95_S:g} s)"
                    if judged
                    else " (no target)"
                )
            )
        for label, ing in m.get("ingest", {}).items():
            passed = ing["ratio"] >= TARGET_INGEST
            judged = not ing.get("diagnostic")
            ok &= passed or not judged
            lines.append(
                f"  ingest of CT during a burst, {label}: {ing['during']['images_per_s']:.0f} vs "
                f"{ing['alone_images_per_s']:.0f} images/s alone = {ing['ratio']:.0%} "
                + (
                    f"{verdict(passed)} (target ≥ {TARGET_INGEST:.0%})"
                    if judged
                    else "(diagnostic, not judged)"
                )
                + f"; triage overlapped {ing['overlap']:.0%} of the stream"
                + flag(ing["during"], 0.3)
            )
        lines.append("")
    return lines, ok


CODE = ("ai_models", "dicom", "gateway")


def code_version() -> dict[str, Any]:
    """The commit measured, files changed since, and a digest of the product code the
    bench runs (others edit it while we run: compare the digest at the end)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    digest = hashlib.sha256()
    for folder in CODE:
        for f in sorted((REPO / folder).glob("*.py")):
            digest.update(f.name.encode() + f.read_bytes())
    dirty = git("status", "--porcelain", "--", *CODE, "pyproject.toml")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": dirty.splitlines(),
        "digest": digest.hexdigest()[:12],
    }


def pick_json(name: str) -> Path:
    path = Path(name)
    if path.parent == Path():
        path = REPO / "bench/out" / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small runs: checks that the bench works")
    p.add_argument("--models", default="mobilenet,densenet", help="subset, comma-separated")
    p.add_argument("--studies", type=int, help="chest studies per burst (default 21; --quick 7)")
    p.add_argument("--latency", type=int, help="studies sent one at a time (default 14; --quick 7)")
    p.add_argument("--ct", type=int, help="CT instances per stream (default 300; --quick 100)")
    p.add_argument("--seconds", type=float, help="model-alone run per thread count (default 3)")
    p.add_argument("--gap", type=float, default=0.3, help="latency: pause between studies (s)")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds of sections 2 and 3, the best counts (default 2; --quick 1)",
    )
    p.add_argument("--no-ingest", action="store_true", help="skip section 5")
    p.add_argument("--json", metavar="FILE", help="every figure as JSON (a bare name: bench/out/)")
    p.add_argument("--workdir", help="scratch folder (default: temp dir if on the repo's disk)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=10.0,
        metavar="S",
        help="before each measurement wait up to S s for the machine to go idle",
    )
    p.add_argument("--no-timings", action="store_true", help="skip the step-timed burst (3b)")
    p.add_argument(
        "--triage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ai-triage setting for every run (value as YAML), e.g. isolation=thread",
    )
    p.add_argument("--timings", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--gateway-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.gateway_cli:  # the gateway under the step timers (3b)
        return timings_process(args)
    if STORESCU is None or STORESCP is None:
        raise SystemExit("needs DCMTK storescu and storescp")
    signal.signal(signal.SIGTERM, _terminated)
    _peers.quiet_wait_s = args.wait_quiet
    for item in args.triage_option:
        key, _, value = item.partition("=")
        TRIAGE_OPTIONS[key.strip()] = yaml.safe_load(value)
    quick = args.quick
    n_studies = args.studies or (7 if quick else 21)
    n_latency = args.latency or (7 if quick else 14)
    n_ct = args.ct or (100 if quick else 300)
    rounds = args.rounds or (1 if quick else 2)
    seconds = args.seconds or (1.0 if quick else 3.0)
    keys = [k for k in args.models.split(",") if k]
    models, skipped = load_models(keys)
    started = time.monotonic()
    import onnxruntime as ort  # noqa: PLC0415

    res: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "loadavg_start": os.getloadavg(),
        },
        "code": code_version(),
        "outputs": OUTPUTS,
        "triage_options": TRIAGE_OPTIONS,
        "skipped": skipped,
        "models": {},
    }
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    say(
        f"medgw AI triage bench: {os.cpu_count()} CPUs, onnxruntime {ort.__version__} "
        f"({', '.join(ort.get_available_providers())}), code {res['code']['commit']}"
        f"{' + local changes' if res['code']['dirty'] else ''} (digest {res['code']['digest']})"
    )
    if not gpu:
        say("  no CUDA provider here: every figure is CPU")
    if TRIAGE_OPTIONS:
        say(f"  ai-triage options for every run: {TRIAGE_OPTIONS}")
    for reason in skipped:
        say(f"  SKIPPED {reason}")
    if not models:
        say("no model to measure")
        return 0
    work = bd.pick_workdir(args.workdir)
    try:
        say("\n0. data")
        templates = chest_templates()
        studies = chest_set(work / "data/chest", max(n_studies, n_latency), templates)
        burst, one_by_one = studies[:n_studies], studies[:n_latency]
        chest_profile = bd.storescu_profile(
            pairs_of(s.path for s in studies), work / "data/chest.cfg"
        )
        ct_sets = [ct_set(work / f"data/ct{i}", n_ct) for i in range(3)]
        ct_profile = bd.storescu_profile(pairs_of(ct_sets[0][:1]), work / "data/ct.cfg")
        kinds = sorted({s.kind for s in burst})
        say(
            f"  chest: {len(burst)} studies per burst ("
            + ", ".join(
                f"{sum(1 for s in burst if s.kind == k)} {k} "
                f"{next(s.size for s in burst if s.kind == k) / 1e6:.1f} MB"
                for k in kinds
            )
            + f"), {len(one_by_one)} sent one at a time; CT: 3 x {n_ct} x CT_small "
            f"{ct_sets[0][0].stat().st_size / 1e3:.0f} kB"
        )
        res["data"] = {
            "burst": [s.kind for s in burst],
            "latency": [s.kind for s in one_by_one],
            "ct_per_stream": n_ct,
        }

        for m in models:
            r: dict[str, Any] = {"label": m.label, "card": str(m.card_file.relative_to(REPO))}
            res["models"][m.key] = r
            say(f"\n== {m.label}: {m.model_file.name}")
            say("1. model alone (session.run, one prepared tensor)")
            a = bench_model_alone(m, seconds, (1, 2))
            r["provider"] = a.pop("provider")
            r["alone"] = a
            for n, x in a.items():
                say(
                    f"  {n} thread(s): {x['images_per_s']:7.1f} images/s, p50 {x['ms_p50']:.1f} "
                    f"ms, {x['cpu_cores']:.2f} cores{flag(x)}"
                )
            say("2. decode + preprocess + infer alone (no gateway)")
            r["pipeline"] = pipe = bench_pipeline_alone(m, burst, (1, 2), rounds)
            for n, x in pipe.items():
                say(
                    f"  {n} worker(s): {x['images_per_s']:6.2f} images/s (rounds "
                    + " ".join(f"{v:.2f}" for v in x["rounds"])
                    + f"), {x['cpu_cores']:.2f} cores{flag(x)}"
                )
            for k, v in pipe["1"]["per_kind_ms"].items():
                say(
                    f"    {k:<8} read+prepare {v['read_prepare']:6.0f} ms, "
                    f"infer {v['infer']:5.0f} ms (1 worker, mean of {v['n']})"
                )
            say("3. the gateway's triage: burst via storescu, first send → last SR at the PACS")
            r["gateway"] = {}
            for workers, route_workers in ((1, 1), (2, 1), (2, 2)):
                label = variant_label(workers, route_workers)
                tries = [
                    bench_gateway_burst(
                        m,
                        burst,
                        chest_profile,
                        work,
                        f"{m.key}-burst-{workers}-{route_workers}-{n}",
                        workers,
                        route_workers,
                    )
                    for n in range(rounds)
                ]
                g = best_of(tries, "studies_per_s")
                g |= {"workers": workers, "route_workers": route_workers}
                r["gateway"][label] = g
                ref = pipe[str(workers)]["images_per_s"]
                say(
                    f"  {label}: {g['studies_per_s']:6.2f} studies/s "
                    f"({g['studies_per_s'] / ref:4.0%} of alone; rounds "
                    + " ".join(f"{x:.2f}" for x in g["rounds"])
                    + f"), last SR at {g['seconds']:.2f} s, "
                    f"originals at {g['originals_done_s']:.2f} s, {g['srs']} SRs, triage p50 "
                    f"{g['triage_ms_p50']:.0f} ms, gateway {g['gateway_cores']:.2f} cores"
                    f"{flag(g, 0.3)}"
                )
                for line in g["problems"]:
                    say(f"      log: {line}")
            if not args.no_timings:
                say("3b. where the time goes: the 1-worker burst again, step timers in the gateway")
                out = work / f"timings-{m.key}.json"
                g = bench_gateway_burst(
                    m, burst, chest_profile, work, f"{m.key}-timed", 1, 1, timings=out
                )
                r["timings"] = {"studies_per_s": g["studies_per_s"]}
                r["timings"]["steps"] = steps = json.loads(out.read_text())
                say(
                    f"  {g['studies_per_s']:.2f} studies/s under the timers; wall ms per study "
                    "(sum over the burst ÷ studies; threads overlap):"
                )
                order = list(STEPS)
                order[2:2] = ["    dcmread header", "    dcmread full"]
                order += [k for k in steps if k not in order]
                for label in order:
                    st = steps.get(label)
                    if st and "total_s" in st:
                        say(
                            f"    {label.rstrip():<52} {st['total_s'] / len(burst) * 1e3:7.1f}"
                            f"  (n={st['n']}, p50 {st['p50_ms']:.1f} ms)"
                        )
            say("4. latency receive → PACS, one study at a time, with the ai-triage step")
            if "latency_no_ai" not in res:
                base = bench_latency(None, one_by_one, chest_profile, work, "lat-none", args.gap)
                res["latency_no_ai"] = base
                say(
                    f"  without AI: p50 {base['p50_s']:.3f} s, p95 {base['p95_s']:.3f} s, "
                    f"max {base['max_s']:.3f} s{flag(base, 0.3)}"
                )
            base = res["latency_no_ai"]
            lat = bench_latency(m, one_by_one, chest_profile, work, f"lat-{m.key}", args.gap)
            r["latency"] = lat
            say(
                f"  with AI:    p50 {lat['p50_s']:.3f} s, p95 {lat['p95_s']:.3f} s, "
                f"max {lat['max_s']:.3f} s; SR p50 {lat['sr_p50_s']:.3f} s{flag(lat, 0.3)}"
            )
            for k in lat["by_kind_p50_s"]:
                say(
                    f"    {k:<8} p50 with {lat['by_kind_p50_s'][k]:.3f} s, without "
                    f"{base['by_kind_p50_s'][k]:.3f} s"
                )
            for line in lat["problems"]:
                say(f"      log: {line}")
            if not args.no_ingest and m.key == "densenet":
                say("5. ingest of CT (no AI) alone vs during a chest burst's triage")
                r["ingest"] = {}
                for workers, route_workers, threads, sr in INGEST_VARIANTS:
                    label = variant_label(workers, route_workers, threads, sr)
                    ing = bench_ingest(
                        m,
                        burst,
                        chest_profile,
                        ct_sets,
                        ct_profile,
                        work,
                        f"ingest-{workers}-{route_workers}-{threads}-{int(sr)}",
                        workers,
                        route_workers,
                        threads,
                        sr,
                    )
                    ing["diagnostic"] = bool(threads) or not sr
                    r["ingest"][label] = ing
                    d = ing["during"]
                    say(
                        f"  {label}: alone {ing['alone'][0]['images_per_s']:.0f} / "
                        f"{ing['alone'][1]['images_per_s']:.0f}, during "
                        f"{d['images_per_s']:.0f} images/s = {ing['ratio']:.0%}; burst "
                        f"received in {ing['burst_received_s']:.2f} s, stream ended at "
                        f"{ing['stream_end_s']:.2f} s, last SR at {ing['triage_done_s']:.2f} s; "
                        f"gateway {d['gateway_cores']:.2f} cores{flag(d, 0.3)}"
                    )
                    for line in ing["problems"]:
                        say(f"      log: {line}")
    finally:
        stop_all()
        if args.keep:
            say(f"\nscratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["seconds"] = time.monotonic() - started
    res["code_after"] = code_version()
    say(
        f"\n6. summary ({res['seconds']:.0f} s; no GPU here: CPU provider only)"
        if not gpu
        else f"\n6. summary ({res['seconds']:.0f} s)"
    )
    lines, ok = summarize(res)
    for line in lines:
        say(f"  {line}" if line else "")
    if res["code_after"]["digest"] != res["code"]["digest"]:
        say("  [!] the product code changed during this run: figures mix two versions")
    say("  (2 shared cores: storescu, storescp, the gateway and the models share them)")
    res["summary"], res["all_targets_met"] = lines, ok
    if args.json:
        path = pick_json(args.json)
        path.write_text(json.dumps(res, indent=1, default=str))
        say(f"results written to {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
