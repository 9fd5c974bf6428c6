"""Drop folders for scanned film and paper ECGs (``film-folder``, ``ecg-folder``) and
``medgw digitize``: file-name patterns, completeness (fake clock), matching against the
worklist, then real files through an in-process gateway with folder destinations
(pixels read back, dciodvfy), a chest route with AI triage, an order that arrives
later over HL7, and the technician's command line."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ai_models_fixtures import constant_model, write_card
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom.ecg_waveform import TWELVE_LEAD_ECG
from dicom.film import MF_GRAYSCALE_BYTE_SC, MF_GRAYSCALE_WORD_SC
from dicom.worklist import worklist_store
from drivers.ecg.digitize import digitize
from drivers.hl7.ack import parse_ack
from drivers.hl7.client import MllpClient
from drivers.scans import FilmFolderSettings, ScanFolderListener, pattern_regex
from gateway.cli import main
from gateway.config import load_config, parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.interfaces import Accepted
from gateway.orders import Order
from gateway.registry import PluginContext, default_registry
from gateway.service import Gateway

DCIODVFY = shutil.which("dciodvfy")
NAME = "Nguyễn^Thị^Hoa"


def film(shape: tuple[int, int] = (40, 56), *, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A noisy gradient over most of the range (something like a film)."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    ramp = np.linspace(0.1, 0.9, shape[1])[None, :] * np.linspace(0.5, 1.0, shape[0])[:, None]
    values = np.clip(np.rint(ramp * top + rng.normal(0, top * 0.02, shape)), 0, top)
    return values.astype(np.uint16 if bits > 8 else np.uint8)


def encode(array: np.ndarray, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **params)
    return out.getvalue()


FILM8, FILM16 = film(), film(bits=16, seed=1)
PNG8 = encode(FILM8, "PNG")
CORRUPT = PNG8[: len(PNG8) // 2]  # a copy cut short, and left so


def dciodvfy(tmp_path: Path, data: bytes, name: str) -> None:
    """Fails on any "Error" line of dciodvfy's report (the report is the message)."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    report = run.stdout + run.stderr
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def order(accession: str, patient_id: str = "PID-1", **more: str) -> Order:
    return Order(
        control="new",
        accession=accession,
        patient_id=patient_id,
        patient_name=NAME,
        birth_date="19800521",
        sex="F",
        **more,
    )


def files(folder: Path, pattern: str = "*") -> list[Path]:
    """The visible files of a folder (not a writer's hidden temp files), by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def names(folder: Path) -> list[str]:
    return [p.name for p in files(folder)]


# -- the listener alone: a recording intake and a fake clock ------------------------------


class Recorder:
    """The listener's view of the journal: what it staged and accepted, in order."""

    def __init__(self) -> None:
        self.accepted: list[Envelope] = []

    def stage(self, envelope: Envelope) -> Envelope:
        return envelope

    async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> Accepted:
        self.accepted.append(envelope)
        return Accepted(envelope.id)

    async def quarantine(
        self, source: str, raw: bytes, reason: str, peer: str = "", size: int | None = None
    ) -> int:
        raise AssertionError("scans are kept in failed/, not quarantined")

    async def record_session(
        self, source: str, peer: str, started_at: float, ended_at: float, details: dict[str, Any]
    ) -> None:
        return None


class Folder:
    """A ``film-folder`` listener on ``tmp_path/drop`` driven by ``scan_once(now)``."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.path = tmp_path / "drop"
        self.path.mkdir(exist_ok=True)
        self.ctx = PluginContext("t", str(tmp_path / "state"), None)
        self.store = worklist_store(self.ctx)
        defaults: dict[str, Any] = {"stable_s": 2.0, "rematch_s": 3600.0}
        cfg = FilmFolderSettings.model_validate(
            {"id": "film", "type": "film-folder", "path": self.path, "dpi": 150}
            | defaults
            | settings
        )
        self.intake = Recorder()
        self.listener = ScanFolderListener(cfg, self.intake, self.ctx)

    def drop(self, name: str, data: bytes = PNG8, ready: dict[str, str] | None = None) -> Path:
        path = self.path / name
        path.write_bytes(data)
        if ready is not None:
            path.with_name(name + ".ready").write_text(json.dumps(ready), encoding="utf-8")
        return path

    async def look(self, now: float) -> None:
        await self.listener.scan_once(now)

    def reason(self, sub: str, name: str) -> str:
        return (self.path / sub / f"{name}.reason.txt").read_text(encoding="utf-8")

    def only_sc(self) -> Dataset:
        assert len(self.intake.accepted) == 1, self.intake.accepted
        return read(self.intake.accepted[0].body)


# -- filename_pattern -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "groups"),
    [
        ("{accession}_{n}.png", "ACC-1_2.png", {"accession": "ACC-1", "n": "2"}),
        ("{accession}_{n}.png", "ACC-1_2.PNG", {"accession": "ACC-1", "n": "2"}),
        ("{accession}_{n}.*", "A.B_12.Tiff", {"accession": "A.B", "n": "12"}),
        ("{accession}_{n}.*", "ACC_7_3.jpg", {"accession": "ACC_7", "n": "3"}),
        ("{patient_id}-*.tif", "PID9-chest front.TIF", {"patient_id": "PID9"}),
        ("film({n})+{accession}.png", "film(4)+X1.png", {"n": "4", "accession": "X1"}),
        ("{accession}_{n}.png", "ACC-1_x.png", None),  # {n} is digits
        ("{accession}_{n}.png", "ACC 1_2.png", None),  # no spaces in an accession
        ("{accession}.png", "ACC1.png.part", None),  # anchored at both ends
        ("{accession}.png", "ACC1Xpng", None),  # the dot is a dot
    ],
)
def test_pattern_regex(pattern: str, name: str, groups: dict[str, str] | None) -> None:
    m = pattern_regex(pattern).match(name)
    assert (m.groupdict() if m else None) == groups


def test_unknown_pattern_field_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown field \{mrn\}"):
        pattern_regex("{mrn}_{n}.png")
    text = yaml.safe_dump(
        {
            "site": {"id": "t"},
            "state_dir": str(tmp_path / "state"),
            "http": {"listen": None},
            "listeners": [
                {"id": "ok", "type": "film-folder", "path": str(tmp_path / "a"), "dpi": 150},
                {
                    "id": "bad",
                    "type": "film-folder",
                    "path": str(tmp_path / "b"),
                    "dpi": 150,
                    "filename_pattern": "{mrn}_{n}.png",
                },
            ],
        }
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, default_registry())
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith("listeners[1].filename_pattern: unknown field {mrn}")


# -- completeness -----------------------------------------------------------------------


async def test_growing_file_is_taken_only_after_stable_s_unchanged(tmp_path: Path) -> None:
    folder = Folder(tmp_path, match=["filename"], stable_s=2.0)
    data = encode(FILM16, "PNG")
    path = folder.drop("ACC1_1.png", data[: len(data) // 3])  # the copy has begun
    await folder.look(100.0)
    with path.open("ab") as f:
        f.write(data[len(data) // 3 : 2 * len(data) // 3])
    await folder.look(101.9)  # grew: the clock starts again
    with path.open("ab") as f:
        f.write(data[2 * len(data) // 3 :])
    await folder.look(103.0)  # grew again
    await folder.look(104.9)  # 1.9 s unchanged: not yet
    assert path.exists() and folder.intake.accepted == []
    assert names(folder.path / "failed") == []  # the half copy was never read as corrupt
    await folder.look(105.0)
    assert not path.exists()
    assert names(folder.path / "done") == ["ACC1_1.png"]
    assert np.array_equal(folder.only_sc().pixel_array, FILM16)


async def test_ready_sidecar_makes_a_file_complete_at_once(tmp_path: Path) -> None:
    folder = Folder(tmp_path, match=["filename"], stable_s=3600.0)
    folder.drop("ACC2_1.png", ready={})
    await folder.look(0.0)
    assert names(folder.path / "done") == ["ACC2_1.png", "ACC2_1.png.ready"]
    assert folder.only_sc().AccessionNumber == "ACC2"


async def test_hidden_and_temporary_names_are_ignored(tmp_path: Path) -> None:
    folder = Folder(tmp_path, match=["filename"], stable_s=0.0)
    ignored = [
        ".ACC3_1.png",
        "ACC4_1.png.part",
        "ACC5_1.png.tmp",
        "ACC6_1.png.crdownload",
        "ACC7_1.png.ready",  # a sidecar alone is not a scan
    ]
    for name in ignored:
        folder.drop(name)
    folder.drop(".ACC8_1.png", ready={"accession": "ACC8"})
    for now in (0.0, 10.0, 20.0):
        await folder.look(now)
    assert folder.intake.accepted == []
    assert sorted(names(folder.path)) == sorted(
        ["ACC4_1.png.part", "ACC5_1.png.tmp", "ACC6_1.png.crdownload", "ACC7_1.png.ready"]
    )
    assert (folder.path / ".ACC3_1.png").exists() and (folder.path / ".ACC8_1.png").exists()
    for sub in ("done", "failed", "unmatched"):
        assert names(folder.path / sub) == []


# -- matching -----------------------------------------------------------------------------


async def test_accession_in_the_file_name_found_in_the_worklist(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.store.apply(order("ACC-100", procedure_text="Chest PA"))
    folder.drop("ACC-100_1.png", ready={})
    await folder.look(0.0)
    ds = folder.only_sc()
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        NAME,
        "PID-1",
        "19800521",
        "F",
    )
    assert ds.AccessionNumber == "ACC-100"
    assert ds.StudyDescription == "Chest PA"
    assert ds.StudyInstanceUID == folder.store.items("ACC-100")[0].study_uid
    assert names(folder.path / "done") == ["ACC-100_1.png", "ACC-100_1.png.ready"]


async def test_sidecar_json_names_the_order(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.store.apply(order("ACC-200", "PID-2"))
    folder.drop("scan-0001.png", ready={"accession": "ACC-200"})  # the name says nothing
    await folder.look(0.0)
    ds = folder.only_sc()
    assert (ds.AccessionNumber, ds.PatientID) == ("ACC-200", "PID-2")


def film_with_code(text: str) -> bytes:
    """A film image with a QR code printed in its corner (the label area)."""
    zxingcpp = pytest.importorskip("zxingcpp", reason="zxing-cpp (optional) not installed")
    code = np.asarray(
        zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.QRCode).to_image(scale=4)
    )
    page = np.full((400, 500), 255, dtype=np.uint8)
    page[40 : 40 + code.shape[0], 300 : 300 + code.shape[1]] = code
    return encode(page, "PNG")


async def test_a_code_on_the_sheet_names_the_order(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.store.apply(order("ACC-250", "PID-25"))
    folder.drop("scan-0002.png", data=film_with_code("ACC:ACC-250"))
    await folder.look(0.0)
    await folder.look(5.0)  # complete once unchanged for stable_s
    ds = folder.only_sc()
    assert (ds.AccessionNumber, ds.PatientID) == ("ACC-250", "PID-25")


async def test_without_the_barcode_package_a_sheet_waits_for_a_person(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zxing-cpp is optional: without it the code is not read, nothing fails."""
    data = film_with_code("ACC:ACC-251")
    monkeypatch.setitem(sys.modules, "zxingcpp", None)  # import now raises ImportError
    folder = Folder(tmp_path)
    folder.store.apply(order("ACC-251", "PID-26"))
    folder.drop("scan-0003.png", data=data)
    await folder.look(0.0)
    await folder.look(5.0)
    assert folder.intake.accepted == []
    assert "no readable code on the sheet" in folder.reason("unmatched", "scan-0003.png")


async def test_patient_id_with_exactly_one_scheduled_order(tmp_path: Path) -> None:
    folder = Folder(tmp_path, filename_pattern="{patient_id}_*.png")
    folder.store.apply(order("ACC-299", "PID-3"))
    folder.store.apply(Order(control="cancel", accession="ACC-299", patient_id="PID-3"))
    folder.store.apply(order("ACC-300", "PID-3"))
    folder.store.apply(order("ACC-301", "PID-4"))
    folder.drop("PID-3_front.png", ready={})
    await folder.look(0.0)
    ds = folder.only_sc()
    assert (ds.AccessionNumber, ds.PatientID) == ("ACC-300", "PID-3")
    assert ds.StudyInstanceUID == folder.store.items("ACC-300")[0].study_uid


async def test_two_scheduled_orders_for_the_patient_wait_in_unmatched(tmp_path: Path) -> None:
    folder = Folder(tmp_path, filename_pattern="{patient_id}_*.png")
    folder.store.apply(order("ACC-401", "PID-5"))
    folder.store.apply(order("ACC-402", "PID-5"))
    folder.drop("PID-5_front.png", ready={})
    await folder.look(0.0)
    assert folder.intake.accepted == []
    assert names(folder.path / "unmatched") == [
        "PID-5_front.png",
        "PID-5_front.png.ready",
        "PID-5_front.png.reason.txt",
    ]
    reason = folder.reason("unmatched", "PID-5_front.png")
    assert "2 scheduled orders" in reason and "ACC-401" in reason and "ACC-402" in reason


async def test_no_order_waits_in_unmatched_with_a_reason(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.drop("ACC-404_1.png", ready={})
    folder.drop("IMG0001.png", ready={})
    await folder.look(0.0)
    assert folder.intake.accepted == []
    assert "ACC-404" in folder.reason("unmatched", "ACC-404_1.png")
    assert "no scheduled order" in folder.reason("unmatched", "ACC-404_1.png")
    assert "does not match '{accession}_{n}.*'" in folder.reason("unmatched", "IMG0001.png")


async def test_sidecar_patient_that_contradicts_the_order_is_not_matched(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.store.apply(order("ACC-500", "PID-6"))
    folder.drop("scan.png", ready={"accession": "ACC-500", "patient_id": "PID-999"})
    await folder.look(0.0)
    assert folder.intake.accepted == []
    reason = folder.reason("unmatched", "scan.png")
    assert "PID-999" in reason and "ACC-500" in reason


async def test_order_arriving_later_takes_the_unmatched_file_at_the_next_rematch(
    tmp_path: Path,
) -> None:
    folder = Folder(tmp_path, rematch_s=60.0)
    folder.drop("ACC-600_1.png", ready={})
    await folder.look(1000.0)
    assert names(folder.path / "unmatched") == [
        "ACC-600_1.png",
        "ACC-600_1.png.ready",
        "ACC-600_1.png.reason.txt",
    ]
    folder.store.apply(order("ACC-600", "PID-7"))
    await folder.look(1030.0)  # not time to re-match yet
    assert folder.intake.accepted == []
    await folder.look(1060.0)
    ds = folder.only_sc()
    assert (ds.AccessionNumber, ds.PatientID, ds.PatientName) == ("ACC-600", "PID-7", NAME)
    assert names(folder.path / "done") == ["ACC-600_1.png", "ACC-600_1.png.ready"]
    assert names(folder.path / "unmatched") == []  # no stale reason left behind
    assert not (folder.path / "unmatched" / "done").exists()


# -- an in-process gateway ----------------------------------------------------------------


def write_config(
    tmp_path: Path,
    listeners: list[dict[str, Any]],
    routes: list[dict[str, Any]],
    destinations: tuple[str, ...] = ("out",),
    **more: Any,
) -> Path:
    doc: dict[str, Any] = {
        "site": {"id": "t"},
        "state_dir": str(tmp_path / "state"),
        "http": {"listen": None},
        "journal": {"min_free_mb": 0},
        **more,
        "listeners": listeners,
        "destinations": [
            {"id": d, "type": "folder", "path": str(tmp_path / d)} for d in destinations
        ],
        "routes": routes,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def drop_folder(tmp_path: Path, lid: str, kind: str = "film", **settings: Any) -> dict[str, Any]:
    return {
        "id": lid,
        "type": f"{kind}-folder",
        "path": str(tmp_path / lid),
        "dpi": 150 if kind == "film" else 200,
        "poll_s": 0.05,
        "stable_s": 0.2,
        **settings,
    }


@asynccontextmanager
async def running(config: Path) -> AsyncIterator[Gateway]:
    registry = default_registry()
    gw = Gateway(load_config(config, registry), registry, drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        await task  # raises the start failure
    assert gw.ready.is_set(), "gateway did not become ready"
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until(check: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def journal(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(tmp_path / "state" / "journal.sqlite")) as conn:
        return conn.execute(sql).fetchall()


def delivered(folder: Path) -> dict[str, Dataset]:
    """The DICOM files in a folder destination, by AccessionNumber (one each)."""
    out: dict[str, Dataset] = {}
    for path in files(folder, "*.dcm"):
        ds = dcmread(path)
        assert ds.AccessionNumber not in out, f"two files for {ds.AccessionNumber}"
        out[ds.AccessionNumber] = ds
    return out


async def test_film_folder_end_to_end_pixels_and_failures(tmp_path: Path) -> None:
    jpeg = encode(FILM8, "JPEG", quality=90)
    tiff16 = film(bits=16, seed=2)
    inputs: dict[str, tuple[str, bytes, np.ndarray, str]] = {
        "F8": ("F8_1.png", PNG8, FILM8, MF_GRAYSCALE_BYTE_SC),
        "F16": ("F16_1.png", encode(FILM16, "PNG"), FILM16, MF_GRAYSCALE_WORD_SC),
        "T16": ("T16_1.tif", encode(tiff16, "TIFF"), tiff16, MF_GRAYSCALE_WORD_SC),
        "J8": ("J8_1.JPG", jpeg, np.asarray(Image.open(io.BytesIO(jpeg))), MF_GRAYSCALE_BYTE_SC),
    }
    config = write_config(
        tmp_path,
        [drop_folder(tmp_path, "film")],
        [{"match": {"kind": "dicom", "source": "film"}, "to": ["out"]}],
    )
    drop, out = tmp_path / "film", tmp_path / "out"
    store = worklist_store(PluginContext("t", str(tmp_path / "state"), None))
    for n, accession in enumerate([*inputs, "BAD", "GOOD"]):
        store.apply(order(accession, f"PID-{n}"))
    async with running(config):
        for name, data, _, _ in inputs.values():
            (drop / name).write_bytes(data)
        (drop / "BAD_1.png").write_bytes(CORRUPT)
        await until(lambda: len(files(out, "*.dcm")) == 4, "four films delivered")
        await until(lambda: "BAD_1.png" in names(drop / "failed"), "the corrupt scan in failed/")
        (drop / "GOOD_1.png").write_bytes(PNG8)  # the listener is still at work
        await until(lambda: len(files(out, "*.dcm")) == 5, "the next film delivered")
        await until(lambda: "GOOD_1.png" in names(drop / "done"), "the next film in done/")
    assert names(drop) == []
    assert sorted(names(drop / "done")) == sorted([v[0] for v in inputs.values()] + ["GOOD_1.png"])
    assert names(drop / "failed") == ["BAD_1.png", "BAD_1.png.reason.txt"]
    reason = (drop / "failed" / "BAD_1.png.reason.txt").read_text(encoding="utf-8")
    assert reason.startswith("cannot digitize: corrupt or truncated PNG file"), reason
    got = delivered(out)
    assert sorted(got) == sorted([*inputs, "GOOD"])
    for accession, (_, _, pixels, sop_class) in inputs.items():
        ds = got[accession]
        assert ds.SOPClassUID == sop_class, accession
        assert np.array_equal(ds.pixel_array, pixels), accession
        assert (ds.PatientName, ds.AccessionNumber) == (NAME, accession)
        assert ds.StudyInstanceUID == store.items(accession)[0].study_uid
        assert ds.ConversionType == "DF"
        assert ds.LossyImageCompression == ("01" if accession == "J8" else "00")
        dciodvfy(tmp_path, Path(ds.filename).read_bytes(), f"{accession}.dcm")
    assert np.array_equal(got["GOOD"].pixel_array, FILM8)
    rows = journal(
        tmp_path, "SELECT e.source, d.state FROM envelopes e JOIN deliveries d USING (seq)"
    )
    assert rows == [("film", "done")] * 5


def chest_films(folder: Path) -> list[Dataset]:
    """The digitized films (not the AI's SR) delivered to the chest route's folder."""
    found = [dcmread(p) for p in files(folder, "*.dcm")]
    return [ds for ds in found if ds.SOPClassUID in (MF_GRAYSCALE_BYTE_SC, MF_GRAYSCALE_WORD_SC)]


async def test_chest_film_headers_select_the_chest_route_and_ai_triage(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    card = write_card(
        models,
        constant_model(models / "cxr.onnx", probabilities=[0.05, 0.1, 0.9]),
        id="cxr",
        # a digitized film has no View Position, and these test films are small
        applies_to={"view_positions": None, "min_rows": None, "min_columns": None},
    )
    config = write_config(
        tmp_path,
        [
            drop_folder(tmp_path, "chest", match=["filename"], modality="CR", body_part="CHEST"),
            drop_folder(tmp_path, "other", match=["filename"]),
        ],
        [
            {
                "id": "triage",
                "match": {"kind": "dicom", "modality": ["CR", "DX"], "body_part_examined": "CHEST"},
                "steps": [{"ai-triage": {"models": ["cxr"], "budget_s": 20}}],
                "to": ["chest-pacs"],
            },
            {"match": {"kind": "dicom", "source": ["chest", "other"]}, "to": ["out"]},
            {"match": {"kind": "event", "event": "ai.flagged"}, "to": ["events"]},
        ],
        destinations=("out", "chest-pacs", "events"),
        models=[{"id": "cxr", "card": str(card)}],
    )
    async with running(config):
        (tmp_path / "chest" / "CXR1_1.png").write_bytes(encode(FILM16, "PNG"))
        (tmp_path / "other" / "HAND1_1.png").write_bytes(PNG8)
        await until(lambda: len(files(tmp_path / "out", "*.dcm")) == 2, "both films delivered")
        await until(lambda: files(tmp_path / "events", "*.json"), "the AI triage event")
        await until(lambda: chest_films(tmp_path / "chest-pacs"), "the film on the chest route")
    headers = {
        source: json.loads(text)
        for source, text in journal(
            tmp_path, "SELECT source, headers FROM envelopes WHERE source IN ('chest', 'other')"
        )
    }
    assert headers["chest"]["Modality"] == "CR"
    assert headers["chest"]["BodyPartExamined"] == "CHEST"
    assert headers["chest"]["AccessionNumber"] == "CXR1"
    assert headers["other"]["Modality"] == "OT"
    assert "BodyPartExamined" not in headers["other"]
    films = chest_films(tmp_path / "chest-pacs")
    assert [ds.AccessionNumber for ds in films] == ["CXR1"]  # the hand film went elsewhere
    event = json.loads(files(tmp_path / "events", "*.json")[0].read_bytes())
    assert event["study_instance_uid"] == films[0].StudyInstanceUID
    assert event["priority"] == "urgent"


def blank_page() -> bytes:
    return encode(np.full((1700, 2200, 3), 255, dtype=np.uint8), "PNG")


async def test_paper_ecg_page_and_waveform_in_one_study(tmp_path: Path) -> None:
    try:
        from fakes.ecg_render import render_ecg  # noqa: PLC0415 - someone else's, in flux

        page = render_ecg(200.0).image
    except Exception as err:  # any failure of the fake printer is a skip
        pytest.skip(f"tests/fakes/ecg_render.py cannot render a page: {err!r}")
    rendered = io.BytesIO()
    page.save(rendered, "PNG")
    expected = digitize(np.asarray(page.convert("RGB")), dpi=200.0)  # what the listener must do
    config = write_config(
        tmp_path,
        [drop_folder(tmp_path, "ecg", kind="ecg", match=["filename"], hl7_oru=True)],
        [
            {"match": {"kind": "dicom", "source": "ecg"}, "to": ["out"]},
            {"match": {"kind": "hl7", "source": "ecg"}, "to": ["his"]},
        ],
        destinations=("out", "his"),
    )
    async with running(config):
        (tmp_path / "ecg" / "ECG1_1.png").write_bytes(rendered.getvalue())
        (tmp_path / "ecg" / "ECG2_1.png").write_bytes(blank_page())
        await until(lambda: len(names(tmp_path / "ecg" / "done")) == 2, "both pages taken")
        made = 3 if expected.ok else 2
        await until(lambda: len(files(tmp_path / "out", "*.dcm")) == made, "objects delivered")
        if expected.ok:
            await until(lambda: files(tmp_path / "his", "*.hl7"), "the heart-rate ORU delivered")
    objects = [dcmread(p) for p in files(tmp_path / "out", "*.dcm")]
    by = {(ds.AccessionNumber, ds.SOPClassUID): ds for ds in objects}
    page1, page2 = by["ECG1", MF_GRAYSCALE_BYTE_SC], by["ECG2", MF_GRAYSCALE_BYTE_SC]
    for ds in (page1, page2):
        assert (ds.Modality, ds.ConversionType, ds.BurnedInAnnotation) == ("ECG", "SD", "YES")
        dciodvfy(tmp_path, Path(ds.filename).read_bytes(), f"page-{ds.AccessionNumber}.dcm")
    headers = {
        json.loads(h)["SOPInstanceUID"]: json.loads(h)
        for (h,) in journal(tmp_path, "SELECT headers FROM envelopes WHERE kind = 'dicom'")
    }
    assert headers[page2.SOPInstanceUID]["ecg_not_digitized"] == "no grid found"
    assert page1.StudyInstanceUID != page2.StudyInstanceUID
    if not expected.ok:
        assert headers[page1.SOPInstanceUID]["ecg_not_digitized"] == "; ".join(expected.checks)
        return
    assert "ecg_not_digitized" not in headers[page1.SOPInstanceUID]
    wave = by["ECG1", TWELVE_LEAD_ECG]
    assert wave.StudyInstanceUID == page1.StudyInstanceUID
    assert (wave.Modality, wave.WaveformSequence[0].NumberOfWaveformChannels) == ("ECG", 12)
    dciodvfy(tmp_path, Path(wave.filename).read_bytes(), "waveform.dcm")
    assert ("ECG2", TWELVE_LEAD_ECG) not in by
    oru = files(tmp_path / "his", "*.hl7")
    assert len(oru) == 1 and b"ORU^R01" in oru[0].read_bytes()
    assert b"ECG1" in oru[0].read_bytes()


def orm(control_id: str, accession: str, patient_id: str) -> bytes:
    """ORM^O01 v2.3.1 (UTF-8) with one new order."""
    segments = [
        f"MSH|^~\\&|HIS|H|MEDGW|H|20240315083000||ORM^O01|{control_id}|P|2.3.1||||||UNICODE UTF-8",
        f"PID|1||{patient_id}^^^H^MR||{NAME}||19800521|F",
        f"ORC|NW|P{accession}^HIS|{accession}^RIS||SC||1^^^20240315090000^^R"
        "||20240315083000|||BS02^Lê^Minh",
        f"OBR|1|P{accession}^HIS|{accession}^RIS|XQ-NGUC^Chụp X-quang ngực thẳng^L"
        "||||||||||||||||||||CR",
    ]
    return ("\r".join(segments) + "\r").encode()


async def test_hl7_order_arriving_later_releases_the_waiting_film(
    tmp_path: Path, free_port: Callable[[], int], capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        [
            {"id": "his-orders", "type": "hl7-mllp", "listen": f"127.0.0.1:{port}"},
            drop_folder(tmp_path, "film", rematch_s=0.3),
        ],
        [
            {"id": "orders", "match": {"source": "his-orders"}, "steps": ["hl7-order", "worklist"]},
            {"match": {"kind": "dicom", "source": "film"}, "to": ["out"]},
        ],
    )
    drop = tmp_path / "film"
    async with running(config):
        (drop / "ACC-LATE_1.png").write_bytes(PNG8)
        await until(lambda: "ACC-LATE_1.png" in names(drop / "unmatched"), "unmatched")
        assert main(["digitize", "pending", "--config", str(config)]) == 0
        listing = capsys.readouterr().out
        assert "film unmatched ACC-LATE_1.png: no scheduled order" in listing, listing
        client = MllpClient("127.0.0.1", port)
        try:
            ack = parse_ack(await client.request(orm("M1", "ACC-LATE", "BN123456"), 10))
        finally:
            await client.close()
        assert ack.code == "AA"
        await until(lambda: files(tmp_path / "out", "*.dcm"), "the film delivered")
        await until(lambda: names(drop / "done"), "the film in done/")
    (ds,) = delivered(tmp_path / "out").values()
    assert (ds.AccessionNumber, ds.PatientID, ds.PatientName) == ("ACC-LATE", "BN123456", NAME)
    assert names(drop / "done") == ["ACC-LATE_1.png"]
    assert main(["digitize", "pending", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "nothing waiting\n"


# -- medgw digitize -----------------------------------------------------------------------


def test_digitize_to_output_writes_valid_dicom_with_a_progress_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(PNG8)
    (tmp_path / "b.tif").write_bytes(encode(FILM16, "TIFF"))
    out = tmp_path / "dicom"
    argv = ["digitize", "film", str(tmp_path / "a.png"), str(tmp_path / "b.tif")]
    code = main([*argv, "--accession", "ACC-CLI", "--body-part", "CHEST", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    lines = stdout.splitlines()
    assert len(lines) == 2
    assert " 1/2 a.png: " in lines[0] and " 2/2 b.tif: " in lines[1]
    written = files(out)
    assert len(written) == 2
    for path, pixels in zip(written, (FILM8, FILM16), strict=True):
        assert path.name in stdout
        ds = dcmread(path)
        assert (ds.AccessionNumber, ds.BodyPartExamined) == ("ACC-CLI", "CHEST")
        assert np.array_equal(ds.pixel_array, pixels)
        dciodvfy(tmp_path, path.read_bytes(), f"check-{path.name}")


def test_digitize_reports_a_corrupt_file_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.png").write_bytes(CORRUPT)
    (tmp_path / "good.png").write_bytes(PNG8)
    argv = ["digitize", "film", str(tmp_path / "bad.png"), str(tmp_path / "good.png")]
    code = main([*argv, "--patient-id", "PID-1", "--output", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "1/2 bad.png: FAILED corrupt or truncated PNG file" in lines[0]
    assert len(files(tmp_path / "out")) == 1


def test_digitize_without_accession_or_patient_id_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(PNG8)
    code = main(["digitize", "film", str(tmp_path / "a.png"), "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 2
    assert "give --accession or --patient-id" in captured.err
    assert not (tmp_path / "o").exists()


async def test_digitize_to_a_listener_hands_the_file_over_with_a_ready_sidecar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Folder(tmp_path, stable_s=3600.0)
    config = write_config(tmp_path, [drop_folder(tmp_path, "drop")], [])
    (tmp_path / "scan 1.png").write_bytes(PNG8)
    argv = ["digitize", "film", str(tmp_path / "scan 1.png"), "--patient-id", "PID-9"]
    assert main([*argv, "--to", "drop", "--config", str(config)]) == 0
    assert "1/1 scan 1.png: handed to drop" in capsys.readouterr().out
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "scan 1.png",
        "scan 1.png.ready",
    ]  # no temp file left; the sub-folders come with the listener
    assert (folder.path / "scan 1.png").read_bytes() == PNG8
    ready = json.loads((folder.path / "scan 1.png.ready").read_text(encoding="utf-8"))
    assert ready == {"patient_id": "PID-9"}
    assert main([*argv, "--to", "drop", "--config", str(config)]) == 2  # not taken yet
    assert "already waiting" in capsys.readouterr().err
    assert (folder.path / "scan 1.png").read_bytes() == PNG8
    # the gateway takes it at its next look, without waiting for stable_s
    folder.store.apply(order("ACC-900", "PID-9"))
    await folder.look(0.0)
    assert folder.only_sc().AccessionNumber == "ACC-900"

    assert main([*argv, "--to", "nope", "--config", str(config)]) == 2
    assert "no film-folder listener 'nope' (known: drop)" in capsys.readouterr().err
    ecg = ["digitize", "ecg", str(tmp_path / "scan 1.png"), "--patient-id", "PID-9"]
    assert main([*ecg, "--to", "drop", "--config", str(config)]) == 2
    assert "no ecg-folder listener 'drop' (known: none)" in capsys.readouterr().err


async def test_digitize_pending_lists_unmatched_and_failed_with_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Folder(tmp_path)
    config = write_config(tmp_path, [drop_folder(tmp_path, "drop")], [])
    assert main(["digitize", "pending", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "nothing waiting\n"
    folder.store.apply(order("ACC-BAD", "PID-1"))
    folder.drop("ACC-BAD_1.png", CORRUPT, ready={})
    folder.drop("ACC-NONE_1.png", ready={})
    await folder.look(0.0)
    assert main(["digitize", "pending", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("drop unmatched ACC-NONE_1.png: no scheduled order")
    assert lines[1].startswith("drop failed    ACC-BAD_1.png: cannot digitize: corrupt")
