"""End to end: storescu -> the gateway (dicom-scp, ai-triage) -> Orthanc as PACS and an
MLLP receiver as RIS, with tiny models built here (and the real MobileNet card where
../shared/models has its file).

The gateway, Orthanc, the RIS receiver and storescu are separate processes on free
loopback ports, stopped by pid; DCMTK and Orthanc run with ``TCP_NODELAY=1``. What
Orthanc stored is read over its REST API, what the RIS accepted from its record
file (MSH-10 and the sha256 of each message), what the gateway decided from
``medgw ai history`` and its journal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from ai_models_fixtures import constant_model, raising_model, slow_model, write_card
from dicom_peers import storescu
from peers.gateway_proc import Gateway, Receiver, medgw, pick_free_port, wait_for
from peers.mllp_receiver import read_record
from peers.orthanc import Orthanc, compare_stored, dataset_part, running_orthanc, sample_file

from gateway.registry import default_registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "ai-triage" not in default_registry().steps, reason="the ai-triage step is not installed"
    ),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="Orthanc not installed"),
]

CARDS = Path(__file__).parent / "cards"
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
MOBILENET_CARD = CARDS / "cxr-nih15-mobilenetv3.yaml"
MOBILENET = SHARED_MODELS / "cxr_nih15_mobilenetv3small_int8.onnx"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RG1, RG3, CT = "RG1_UNCR.dcm", "RG3_UNCI.dcm", "CT_small.dcm"


@dataclass
class Site:
    """A gateway with its PACS (Orthanc), RIS (MLLP receiver) and event folder."""

    gw: Gateway
    orthanc: Orthanc
    ris: Receiver
    state: Path
    events: Path
    work: Path

    def send(self, *names: str) -> list[Path]:
        files = [sample_file(n) for n in names]
        done = storescu(files, self.gw.mllp_port, self.work / "storescu")
        assert done.returncode == 0, done.stdout
        return files

    def journal(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        uri = f"file:{self.state / 'journal.sqlite'}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as db:
            return list(db.execute(sql, args))

    def stored(self) -> dict[str, dict[str, Any]]:
        """SOP Instance UID -> Orthanc's simplified tags (plus its id), for every instance."""
        out = {}
        for oid in self.orthanc.instances():
            tags = self.orthanc.instance_tags(oid)
            out[tags["SOPInstanceUID"]] = {**tags, "orthanc_id": oid}
        return out

    def history(self) -> list[dict[str, Any]]:
        """``medgw ai history --json`` as a technician runs it beside the gateway."""
        done = medgw("ai", "history", "--config", str(self.gw.config), "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def write_config(site_dir: Path, ports: dict[str, int], orthanc: Orthanc, **ai: Any) -> Path:
    """Chest CR/DX (and CT, which the card refuses) through ``ai-triage`` to the PACS,
    its notifications to the RIS; ``ai.flagged`` events to a folder; ``ai`` holds the
    ``models`` (id -> card) and the step's parameters."""
    models: dict[str, Path] = ai.pop("models")
    fast = {"backoff": {"initial_s": 0.1, "max_s": 1.0}}
    doc: dict[str, Any] = {
        "site": {"id": "e2e-ai"},
        "state_dir": str(site_dir / "state"),
        "http": {"listen": f"127.0.0.1:{ports['http']}"},
        "journal": {"min_free_mb": 0},
        "logging": {"level": "INFO", "format": "text"},
        "models": [{"id": k, "card": str(v)} for k, v in models.items()],
        "listeners": [
            {
                "id": "modalities",
                "type": "dicom-scp",
                "ae_title": "MEDGW",
                "listen": f"127.0.0.1:{ports['scp']}",
            }
        ],
        "destinations": [
            {
                "id": "pacs",
                "type": "dicom-store",
                "ae_title": orthanc.aet,
                "connect": orthanc.endpoint,
                "connect_timeout_s": 2,
                "delivery": fast,
            },
            {
                "id": "ris",
                "type": "hl7-mllp",
                "connect": f"127.0.0.1:{ports['ris']}",
                "connect_timeout_s": 2,
                "ack_timeout_s": 10,
                "delivery": fast,
            },
            {"id": "events", "type": "folder", "path": str(site_dir / "events")},
        ],
        "routes": [
            {
                "id": "triage",
                "match": {"kind": "dicom", "modality": ["CR", "DX", "CT"]},
                "steps": [{"ai-triage": {"models": list(models), **ai}}],
                "to": ["pacs"],
                "notify": ["ris"],
            },
            {"match": {"kind": "dicom", "Modality": ["MR"]}, "to": ["pacs"]},
            {"match": {"kind": "event", "event": "ai.flagged"}, "to": ["events"]},
        ],
    }
    path = site_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """``site(models={id: card}, budget_s=...)`` starts Orthanc, the RIS and the gateway."""
    with ExitStack() as stack:

        def start(**ai: Any) -> Site:
            orthanc = stack.enter_context(running_orthanc(tmp_path / "orthanc"))
            ports = {"http": pick_free_port(), "scp": pick_free_port(), "ris": pick_free_port()}
            ris = Receiver(ports["ris"], tmp_path / "ris.record").start()
            stack.callback(ris.terminate, 10)
            config = write_config(tmp_path, ports, orthanc, **ai)
            gw = Gateway(config, ports["http"], ports["scp"])
            stack.callback(lambda: gw.terminate(20) if gw.running() else None)
            gw.start()
            return Site(gw, orthanc, ris, tmp_path / "state", tmp_path / "events", tmp_path)

        yield start


def chest_model(folder: Path, model_id: str, probabilities: list[float], **card: Any) -> Path:
    """A constant model (No Finding, Effusion, Pneumothorax; sigmoid) and its card."""
    folder.mkdir(parents=True, exist_ok=True)
    model = constant_model(folder / f"{model_id}.onnx", probabilities=probabilities)
    return write_card(folder, model, id=model_id, **card)


def assert_original_unchanged(site: Site, sent: Path) -> set[str]:
    """Orthanc stored the data set the gateway received, and that is the file storescu
    sent (storescu drops the file's trailing padding; Orthanc writes undefined-length
    sequences with explicit lengths: see peers.orthanc.compare_stored). Returns how the
    stored bytes compare: ``{"identical"}`` when the data set bytes are the same."""
    uid = sop_uid(sent)
    (blob,) = site.journal(
        "SELECT blob FROM envelopes WHERE source = 'modalities' "
        "AND json_extract(headers, '$.SOPInstanceUID') = ?",
        uid,
    )[0]
    received = (site.state / "blobs" / blob).read_bytes()
    original = pydicom.dcmread(sent)
    original.pop(0xFFFCFFFC, None)  # data set trailing padding, not sent by storescu
    assert pydicom.dcmread(BytesIO(received)) == original, f"{sent.name} changed on the way in"
    oid = site.orthanc.lookup(uid)
    assert oid is not None, f"{sent.name} did not reach the PACS"
    stored = site.orthanc.instance_file(oid)
    how = compare_stored(received, stored)
    if how == {"identical"}:
        digest = hashlib.sha256(dataset_part(stored)).hexdigest()
        assert digest == hashlib.sha256(dataset_part(received)).hexdigest()
    return how


def references(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs an SR or SC says it was made from."""
    out = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


def field(segment: str, n: int) -> str:
    parts = segment.split("|")
    return parts[n] if n < len(parts) else ""


def segment(message: bytes, name: str) -> str:
    found = [s for s in message.decode("utf-8").split("\r") if s.startswith(name + "|")]
    assert len(found) == 1, (name, message)
    return found[0]


def oru_received(site: Site, count: int) -> list[bytes]:
    """The ORUs the RIS acknowledged: its record (MSH-10, sha256) matched to the journal."""

    def arrived() -> list[tuple[str, str]] | None:
        record = read_record(site.ris.record)
        return record if len(record) >= count else None

    record = wait_for(arrived, 20, f"{count} message(s) at the RIS")
    bodies = {
        hashlib.sha256(body).hexdigest(): bytes(body)
        for (body,) in site.journal("SELECT body FROM envelopes WHERE kind = 'hl7'")
    }
    out = []
    for control_id, sha in record:
        assert sha in bodies, "the RIS got bytes the gateway did not journal"
        assert field(segment(bodies[sha], "MSH"), 9) == control_id
        out.append(bodies[sha])
    return out


def test_chest_cr_goes_to_pacs_unchanged_with_sr_sc_and_an_urgent_oru(
    tmp_path: Path, site: Callable[..., Site]
) -> None:
    """RG1 (chest PA CR) with a model that says Pneumothorax 0.9: PACS gets RG1 byte for
    byte plus an SR and an SC in its study that reference it; the RIS an ORU with
    priority S; an ai.flagged event goes where the routing table says. RG3 (tibia) and a
    CT go through the same route untouched, the card's refusal recorded."""
    card = chest_model(tmp_path / "models", "cxr", [0.05, 0.1, 0.9], outputs={"sc": True})
    s = site(models={"cxr": card}, budget_s=20)
    rg1, rg3, ct = s.send(RG1, RG3, CT)
    s.gw.wait_drained(60)

    assert assert_original_unchanged(s, rg1) == {"identical"}
    assert assert_original_unchanged(s, ct) == {"identical"}
    assert assert_original_unchanged(s, rg3) <= {"identical", "sequence lengths"}
    originals = {sop_uid(p) for p in (rg1, rg3, ct)}
    derived = {uid: t for uid, t in s.stored().items() if uid not in originals}
    assert sorted(t["SOPClassUID"] for t in derived.values()) == sorted(
        [COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE]
    )
    for tags in derived.values():
        assert tags["StudyInstanceUID"] == study_uid(rg1)
        assert tags["PatientID"] == pydicom.dcmread(rg1, stop_before_pixels=True).PatientID
        ds = pydicom.dcmread(BytesIO(s.orthanc.instance_file(tags["orthanc_id"])))
        assert references(ds) == {sop_uid(rg1)}, tags["SOPClassUID"]
        if tags["SOPClassUID"] == COMPREHENSIVE_3D_SR:
            meanings = {str(e.value) for e in ds.iterall() if e.keyword == "CodeMeaning"}
            assert "Pneumothorax" in meanings
        else:
            assert ds.BurnedInAnnotation == "YES"

    (oru,) = oru_received(s, 1)
    assert field(segment(oru, "OBR"), 5) == "S"
    assert field(segment(oru, "ORC"), 7).split("^")[5] == "S"
    assert field(segment(oru, "OBR"), 20) == study_uid(rg1)
    assert field(segment(oru, "OBX"), 3).startswith("Pneumothorax^")

    (event,) = sorted(s.events.glob("*.json"))
    flagged = json.loads(event.read_bytes())
    assert (flagged["priority"], flagged["study_instance_uid"]) == ("urgent", study_uid(rg1))

    rows = {r["sop_uid"]: r for r in s.history()}
    assert rows[sop_uid(rg1)]["status"] == "done"
    assert rows[sop_uid(rg1)]["priority"] == "urgent"
    assert set(rows[sop_uid(rg1)]["sent"]) == {"sr", "sc", "hl7", "event"}
    assert set(rows[sop_uid(rg1)]["sent"].values()) >= set(derived)
    assert rows[sop_uid(rg3)]["status"] == "skipped"
    assert rows[sop_uid(rg3)]["reason"] == "BodyPartExamined EXTREMITY not in [CHEST, THORAX]"
    assert rows[sop_uid(ct)]["status"] == "skipped"
    assert rows[sop_uid(ct)]["reason"].startswith("Modality CT not in [CR, DX]")
    assert s.journal("SELECT COUNT(*) FROM deliveries WHERE state != 'done'") == [(0,)]


def test_failing_models_never_hold_the_study(tmp_path: Path, site: Callable[..., Site]) -> None:
    """A model that raises, one that overstays a 1 s budget, a missing model file and
    one whose sha256 is not the card's: RG1 reaches the PACS unchanged within the
    budget plus forwarding time, nothing derived is sent, and the history says why."""
    folder = tmp_path / "models"
    folder.mkdir()
    cards = {
        "raiser": write_card(folder, raising_model(folder / "raiser.onnx"), id="raiser"),
        "slow": write_card(folder, slow_model(folder / "slow.onnx", min_ms=3000), id="slow"),
        "missing": write_card(folder, folder / "missing.onnx", id="missing"),
        "badsha": chest_model(folder, "badsha", [0.05, 0.1, 0.9], sha256="f" * 64),
    }
    budget_s = 1.0
    s = site(models=cards, budget_s=budget_s, queue=0)
    started = time.monotonic()
    (rg1,) = s.send(RG1)
    wait_for(lambda: s.orthanc.lookup(sop_uid(rg1)), budget_s + 10, "RG1 in the PACS")
    assert time.monotonic() - started < budget_s + 10
    s.gw.wait_drained(30)
    assert assert_original_unchanged(s, rg1) == {"identical"}

    assert list(s.stored()) == [sop_uid(rg1)]
    assert read_record(s.ris.record) == []
    assert not s.events.exists() or list(s.events.iterdir()) == []
    assert s.journal("SELECT COUNT(*) FROM envelopes WHERE source = 'ai-triage'") == [(0,)]
    rows = {r["model_id"]: r for r in s.history()}
    assert rows["raiser"]["status"] == "failed"
    assert rows["raiser"]["reason"].startswith("model error:")
    assert rows["slow"]["status"] == "timeout"
    assert rows["slow"]["reason"] == "no result within 1 s"
    assert rows["slow"]["duration_ms"] < budget_s * 1000 + 500
    assert rows["missing"]["status"] == "skipped"
    assert "model file missing" in rows["missing"]["reason"]
    assert rows["badsha"]["status"] == "skipped"
    assert f"does not match card badsha 1.0 ({'f' * 64})" in rows["badsha"]["reason"]
    assert all(r["sent"] == {} and r["priority"] == "" for r in rows.values())


@pytest.mark.skipif(
    not MOBILENET.exists(),
    reason=f"real model absent: {MOBILENET} (see ../shared/models/README.md)",
)
def test_real_mobilenet_card_marks_rg1_abnormal(tmp_path: Path, site: Callable[..., Site]) -> None:
    """The real MobileNetV3 (NIH ChestX-ray14) through its card: RG1 with the tag window
    gives Mass about 0.98 (README), an abnormal finding: SR and SC in the study, ORU
    priority A."""
    s = site(models={"mobilenet": MOBILENET_CARD}, budget_s=20)
    (rg1,) = s.send(RG1)
    s.gw.wait_drained(60)
    assert assert_original_unchanged(s, rg1) == {"identical"}
    classes = sorted(t["SOPClassUID"] for u, t in s.stored().items() if u != sop_uid(rg1))
    assert classes == sorted([COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE])
    (oru,) = oru_received(s, 1)
    assert field(segment(oru, "OBR"), 5) == "A"
    assert field(segment(oru, "ORC"), 7).split("^")[5] == "A"
    (row,) = s.history()
    assert (row["status"], row["priority"]) == ("done", "abnormal")
    assert max(row["outputs"], key=row["outputs"].get) == "Mass"
