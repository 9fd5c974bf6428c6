"""The ai-triage step with tiny models, in-process: the original always first and
unchanged, one result per study, outputs per card and per route, priorities from the
card's labels, the envelopes it derives and where the chain sends them, every way a
model can fail (through a running gateway with folder destinations), the HL7 priority
message (validated with hl7apy) and the AI history."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from ai_models_fixtures import (
    constant_model,
    echo_mean_model,
    raising_model,
    slow_model,
    write_card,
)
from dicom_peers import eventually
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid

from ai_models.history import History
from ai_models.ingest import QUIET_S, IngestWatch
from ai_models.notify import build_priority_oru
from ai_models.triage import TriageParams, TriageStep, control_id
from dicom.headers import routing_headers
from gateway.config import parse_config
from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import ConfigError
from gateway.events import Event, EventBus
from gateway.registry import PluginContext, default_registry
from gateway.service import Gateway
from gateway.steps import AnyEnvelope, StepChain
from gateway.triage import EvaluatedImage, Finding, TriageResult

# RG1's referring physician "ward" has one component: highdicom warns when it copies it
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")

LABELS = ("No Finding", "Effusion", "Pneumothorax")  # Pneumothorax: threshold 0.3, urgent
URGENT = [0.05, 0.1, 0.9]


def sample(name: str) -> bytes:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data)")
    return Path(str(path)).read_bytes()


def dicom_envelope(body: bytes) -> Envelope:
    return Envelope(
        kind="dicom", source="modalities", body=body, headers=routing_headers(body), as_file=True
    )


def chest(value: int, study: str, sop: str | None = None, **changes: Any) -> bytes:
    """A chest PA CR (RG1's header) whose pixels are all ``value`` (8 bits, MONOCHROME2):
    with ``window: none`` and unit scale the model sees ``value / 255`` everywhere."""
    ds = pydicom.dcmread(BytesIO(sample("RG1_UNCR.dcm")), stop_before_pixels=True)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop or generate_uid())
    ds.set_pixel_data(
        np.full((256, 256), value, np.uint8), "MONOCHROME2", 8, generate_instance_uid=False
    )
    for keyword, new in changes.items():
        if new is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, new)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def segment(message: bytes, name: str) -> list[str]:
    """The fields of the one segment ``name``: ``[name, field 1, field 2, ...]``."""
    found = [s for s in message.decode("utf-8").split("\r") if s.startswith(name + "|")]
    assert len(found) == 1, (name, message)
    return found[0].split("|") + [""] * 30


def msh(message: bytes, n: int) -> str:
    """MSH-n (MSH-1 is the field separator itself)."""
    return segment(message, "MSH")[n - 1]


def strict(message: bytes) -> Any:
    """hl7apy's STRICT parse and validation (structure, required fields, data types)."""
    parsed = parse_message(
        message.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    assert parsed.validate()
    return parsed


@pytest.fixture
def ctx(tmp_path: Path) -> PluginContext:
    """One gateway's plugin context: steps made with it share the history and runtimes."""
    return PluginContext("site-a", str(tmp_path / "state"), None)


@pytest.fixture
def make_step(tmp_path: Path, ctx: PluginContext) -> Any:
    """``make_step({model id: card}, **params)``: a TriageStep as the config builds it."""
    steps: list[TriageStep] = []

    def make(cards: dict[str, Path], **params: Any) -> TriageStep:
        # in-process by default here: these tests look at the runtime's own behaviour
        # (terminate on timeout, busy); the worker-process mode has its own tests
        validated = TriageParams.model_validate(
            {"models": list(cards), "isolation": "thread", **params}, context={"models": cards}
        )
        step = TriageStep(validated, ctx)
        steps.append(step)
        return step

    yield make
    for step in steps:
        for runtime in step.models:
            runtime.close()
        if step._procs is not None:
            step._procs.close()


def card_for(tmp_path: Path, model_id: str, probabilities: Sequence[float], **card: Any) -> Path:
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    model = constant_model(folder / f"{model_id}.onnx", probabilities=probabilities)
    return write_card(folder, model, id=model_id, **card)


def echo_card(tmp_path: Path) -> Path:
    """Effusion = sigmoid(10 m - 5) and Pneumothorax = sigmoid(10 m - 9) of the image's
    mean ``m`` (0-1): 153 -> Effusion 0.73 (abnormal), 140 -> 0.62 (abnormal, weaker),
    230 -> Effusion 0.98 and Pneumothorax 0.50 (urgent)."""
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    model = echo_mean_model(
        folder / "echo.onnx", weights=[0.0, 10.0, 10.0], bias=[-100.0, -5.0, -9.0]
    )
    return write_card(
        folder,
        model,
        id="echo",
        preprocessing={"window": "none"},
        applies_to={"photometric": ["MONOCHROME2"]},
    )


def kinds(out: Sequence[AnyEnvelope]) -> list[str]:
    return [e.headers.get("ai", e.kind) for e in out]


# -- the original, and what is derived ---------------------------------------------------


async def test_the_original_goes_first_unchanged_then_sr_hl7_and_event(
    tmp_path: Path, make_step: Any
) -> None:
    step = make_step({"cxr": card_for(tmp_path, "cxr", URGENT)})
    assert step.passes_first  # the chain forwards the original before the model runs
    body = sample("RG1_UNCR.dcm")
    original = dicom_envelope(body)
    out = await step.run(original)
    assert out[0] is original and out[0].body == body
    assert kinds(out) == ["dicom", "sr", "hl7", "event"]  # the card: sc false
    rg1 = pydicom.dcmread(BytesIO(body), stop_before_pixels=True)

    sr = out[1]
    assert isinstance(sr, Envelope) and sr.kind == "dicom" and sr.as_file
    assert sr.headers["Modality"] == "SR"
    assert sr.headers["StudyInstanceUID"] == rg1.StudyInstanceUID
    assert sr.idem_key == f"dicom:{sr.headers['SOPInstanceUID']}"
    assert "notify" not in sr.headers and "route" not in sr.headers  # to the route's `to`
    report = pydicom.dcmread(BytesIO(sr.body))
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID

    hl7 = out[2]
    assert hl7.kind == "hl7"
    assert hl7.headers == {"message_type": "ORU^R01", "notify": "true", "priority": "urgent"}
    strict(hl7.body)
    assert segment(hl7.body, "OBR")[5] == "S"
    assert segment(hl7.body, "ORC")[7] == "^^^^^S"
    assert msh(hl7.body, 4) == "site-a"

    event = out[3]
    assert event.kind == "event"
    assert event.headers == {
        "event": "ai.flagged",
        "route": "true",
        "priority": "urgent",
        "model": "cxr",
        "StudyInstanceUID": rg1.StudyInstanceUID,
    }
    result = TriageResult.from_json(event.body)
    assert result.priority == "urgent"
    assert [f.label for f in result.positives] == ["Pneumothorax"]
    assert result.images[0].sop_instance_uid == rg1.SOPInstanceUID


async def test_the_chain_sends_each_derived_envelope_where_it_belongs(
    tmp_path: Path, make_step: Any
) -> None:
    """SR/SC to ``to``, the ORU to ``notify``, the event to the routing table; the
    original to ``to`` before the model runs."""
    step = make_step({"cxr": card_for(tmp_path, "cxr", URGENT)}, outputs={"sc": True})
    calls: list[tuple[str, Any]] = []

    class Recorder:
        async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> None:
            calls.append((envelope.headers.get("ai", envelope.kind), destinations))

        async def forward(self, seq: int, destinations: list[str]) -> None:
            calls.append(("original", destinations))

    chain = StepChain("steps:triage", [step], ["pacs"], Recorder(), notify=["ris"])
    body = sample("RG1_UNCR.dcm")
    stored = StoredEnvelope(
        "e1",
        1,
        "dicom",
        "modalities",
        routing_headers(body),
        None,
        None,
        dicom_envelope(body).received_at,
        body,
    )
    assert await chain.send(stored) == "passed=1 new=4"
    assert calls == [
        ("original", ["pacs"]),
        ("sr", ["pacs"]),
        ("sc", ["pacs"]),
        ("hl7", ["ris"]),
        ("event", None),
    ]


@pytest.mark.filterwarnings("ignore:Expected implicit VR, but found explicit VR:UserWarning")
async def test_ineligible_and_non_dicom_pass_without_inference(
    tmp_path: Path, make_step: Any
) -> None:
    step = make_step({"cxr": card_for(tmp_path, "cxr", URGENT)})
    rg3, ct = dicom_envelope(sample("RG3_UNCI.dcm")), dicom_envelope(sample("CT_small.dcm"))
    hl7 = Envelope(kind="hl7", source="his", body=b"MSH|^~\\&|A\r")
    junk = Envelope(kind="dicom", source="modalities", body=b"no DICOM here")
    for envelope in (rg3, ct, hl7, junk):
        assert await step.run(envelope) == [envelope]
    by_envelope = {r["sop_uid"]: r for r in step.history.rows()}
    assert len(by_envelope) == 3  # the HL7 message is not an image: no row
    rg3_row = by_envelope[rg3.headers["SOPInstanceUID"]]
    assert (rg3_row["status"], rg3_row["reason"]) == (
        "skipped",
        "BodyPartExamined EXTREMITY not in [CHEST, THORAX]",
    )
    ct_row = by_envelope[ct.headers["SOPInstanceUID"]]
    assert ct_row["status"] == "skipped"
    assert ct_row["reason"].startswith("Modality CT not in [CR, DX]; BodyPartExamined missing")
    assert by_envelope[""]["reason"].startswith("Modality missing (expected one of [CR, DX])")
    assert all(r["duration_ms"] is None and r["sent"] == {} for r in by_envelope.values())


# -- priorities and outputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("probabilities", "output", "priority", "expected"),
    [
        ([0.9, 0.1, 0.1], {}, "normal", ["dicom", "sr"]),  # No Finding is never positive
        ([0.1, 0.6, 0.1], {}, "abnormal", ["dicom", "sr", "hl7", "event"]),
        ([0.1, 0.1, 0.35], {}, "urgent", ["dicom", "sr", "hl7", "event"]),  # threshold 0.3
        ([0.1, 0.1, 0.25], {}, "normal", ["dicom", "sr"]),
        # abnormal listed: a positive label that is not listed is no reason to flag
        ([0.1, 0.6, 0.1], {"urgent": [], "abnormal": ["Pneumothorax"]}, "normal", ["dicom", "sr"]),
        ([0.1, 0.1, 0.6], {"urgent": [], "abnormal": ["Pneumothorax"]}, "abnormal", None),
    ],
)
async def test_priority_comes_from_the_cards_labels(
    tmp_path: Path,
    make_step: Any,
    probabilities: list[float],
    output: dict[str, Any],
    priority: str,
    expected: list[str] | None,
) -> None:
    step = make_step({"cxr": card_for(tmp_path, "cxr", probabilities, output=output)})
    out = await step.run(dicom_envelope(sample("RG1_UNCR.dcm")))
    assert kinds(out) == (expected or ["dicom", "sr", "hl7", "event"])
    (row,) = step.history.rows()
    assert (row["status"], row["priority"]) == ("done", priority)
    assert row["outputs"] == dict(zip(LABELS, probabilities, strict=True))
    if priority != "normal":
        assert segment(out[2].body, "OBR")[5] == {"urgent": "S", "abnormal": "A"}[priority]


@pytest.mark.parametrize(
    ("card_outputs", "route_outputs", "expected"),
    [
        ({}, {}, ["dicom", "sr", "hl7", "event"]),
        ({}, {"sc": True}, ["dicom", "sr", "sc", "hl7", "event"]),
        ({"sc": True}, {"sc": False}, ["dicom", "sr", "hl7", "event"]),
        ({}, {"sr": False, "event": False}, ["dicom", "hl7"]),
        ({"hl7": False}, {}, ["dicom", "sr", "event"]),
        ({"hl7": False}, {"hl7": True}, ["dicom", "sr", "hl7", "event"]),
        ({"sr": False, "hl7": False, "event": False}, {}, ["dicom"]),
    ],
)
async def test_outputs_per_card_and_per_route(
    tmp_path: Path,
    make_step: Any,
    card_outputs: dict[str, bool],
    route_outputs: dict[str, bool],
    expected: list[str],
) -> None:
    card = card_for(tmp_path, "cxr", URGENT, outputs=card_outputs)
    step = make_step({"cxr": card}, outputs=route_outputs)
    out = await step.run(dicom_envelope(sample("RG1_UNCR.dcm")))
    assert kinds(out) == expected
    (row,) = step.history.rows()
    assert sorted(row["sent"]) == sorted(k for k in expected if k != "dicom")
    sc = [e for e in out if e.headers.get("ai") == "sc"]
    if sc:
        image = pydicom.dcmread(BytesIO(sc[0].body))
        assert (image.Modality, image.BurnedInAnnotation) == ("OT", "YES")
        assert (
            image.SourceImageSequence[0].ReferencedSOPInstanceUID
            == out[0].headers["SOPInstanceUID"]
        )
        assert row["sent"]["sc"] == image.SOPInstanceUID


# -- one result per study -----------------------------------------------------------------


async def test_one_result_per_study_reissued_only_when_stronger(
    tmp_path: Path, make_step: Any
) -> None:
    step = make_step({"echo": echo_card(tmp_path)})
    study = generate_uid()
    first = await step.run(dicom_envelope(chest(153, study)))
    assert kinds(first) == ["dicom", "sr", "hl7", "event"]
    assert segment(first[2].body, "OBR")[5] == "A"

    weaker = await step.run(dicom_envelope(chest(140, study)))
    assert kinds(weaker) == ["dicom"]
    same = await step.run(dicom_envelope(chest(153, study)))  # as strong: nothing new
    assert kinds(same) == ["dicom"]

    stronger = await step.run(dicom_envelope(chest(230, study)))
    assert kinds(stronger) == ["dicom", "sr", "hl7", "event"]
    assert segment(stronger[2].body, "OBR")[5] == "S"
    assert stronger[1].headers["SOPInstanceUID"] != first[1].headers["SOPInstanceUID"]
    assert msh(stronger[2].body, 10) != msh(first[2].body, 10)  # a RIS sees a new message

    other_study = await step.run(dicom_envelope(chest(140, generate_uid())))
    assert kinds(other_study) == ["dicom", "sr", "hl7", "event"]

    rows = step.history.rows(study)
    assert [(r["status"], r["priority"], bool(r["sent"])) for r in reversed(rows)] == [
        ("done", "abnormal", True),
        ("done", "abnormal", False),
        ("done", "abnormal", False),
        ("done", "urgent", True),
    ]
    assert rows[2]["reason"] == "not re-issued: the study already has as strong a result"
    assert rows[0]["outputs"]["Pneumothorax"] == pytest.approx(0.5, abs=0.02)
    best = step.history.best(study, "echo")
    assert best is not None and TriageResult.from_json(best[1]).priority == "urgent"


async def test_a_rerun_of_the_same_image_issues_its_outputs_again(
    tmp_path: Path, make_step: Any
) -> None:
    """A retry of the chain, or a restart before the derived envelopes were journaled:
    the image's outputs come again, byte for byte (the journal drops the duplicates)."""
    step = make_step({"cxr": card_for(tmp_path, "cxr", URGENT)})
    original = dicom_envelope(sample("RG1_UNCR.dcm"))
    first = await step.run(original)
    again = await step.run(original)
    assert kinds(again) == kinds(first) == ["dicom", "sr", "hl7", "event"]
    assert again[1].body == first[1].body and again[1].idem_key == first[1].idem_key
    assert msh(again[2].body, 10) == msh(first[2].body, 10)


async def test_an_sr_the_header_cannot_support_does_not_hold_anything(
    tmp_path: Path, make_step: Any
) -> None:
    """No content, acquisition or study date: the SR and SC cannot be built (a permanent
    error in dicom.ai_objects). The original still passes and the RIS still gets the
    priority; the history says what was not built."""
    step = make_step({"echo": echo_card(tmp_path)}, outputs={"sc": True})
    body = chest(230, generate_uid(), ContentDate=None, StudyDate=None, ContentTime=None)
    original = dicom_envelope(body)
    out = await step.run(original)
    assert out[0] is original
    assert kinds(out) == ["dicom", "hl7", "event"]
    (row,) = step.history.rows()
    assert (row["status"], row["priority"]) == ("done", "urgent")
    assert row["reason"].startswith("SR not built: no created time given")
    assert "; SC not built: " in row["reason"]
    assert set(row["sent"]) == {"hl7", "event"}


# -- budget, queue -------------------------------------------------------------------------


async def test_a_timeout_frees_the_model_for_the_next_image(tmp_path: Path, make_step: Any) -> None:
    """The step's budget stops the run (RunOptions.terminate): the next image gets the
    model, instead of a "busy" refusal while the first run goes on for seconds."""
    folder = tmp_path / "models"
    folder.mkdir()
    card = write_card(folder, slow_model(folder / "slow.onnx", min_ms=3000), id="slow")
    step = make_step({"slow": card}, budget_s=0.3, queue=0)
    for _ in range(2):
        started = time.monotonic()
        original = dicom_envelope(sample("RG1_UNCR.dcm"))
        assert await step.run(original) == [original]
        assert time.monotonic() - started < 0.3 + 0.5
    assert [(r["status"], r["reason"]) for r in step.history.rows()] == [
        ("timeout", "no result within 0.3 s")
    ] * 2


async def test_a_full_queue_is_recorded_and_the_image_passes(
    tmp_path: Path, make_step: Any
) -> None:
    """workers 1, queue 0: while one image runs, the next is refused at once ("busy"),
    recorded, and passed on; it never waits for a worker."""
    folder = tmp_path / "models"
    folder.mkdir()
    card = write_card(folder, slow_model(folder / "slow.onnx", min_ms=300), id="slow")
    step = make_step({"slow": card}, budget_s=5, queue=0, workers=1)
    images = [dicom_envelope(chest(100, generate_uid())) for _ in range(2)]
    out = await asyncio.gather(*(step.run(e) for e in images))
    assert [o[0] for o in out] == images
    rows = sorted(step.history.rows(), key=lambda r: r["status"])
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("done", ""),
        ("failed", "busy: more than 0 images waiting"),
    ]


async def test_worker_processes_triage_and_a_run_past_the_budget_is_replaced(
    tmp_path: Path, make_step: Any
) -> None:
    """isolation: process (the default in a gateway): results and outputs come from
    worker processes; a run past its budget has its worker replaced, so the next image
    is triaged instead of being refused as busy."""
    urgent = card_for(tmp_path, "c", URGENT)
    folder = tmp_path / "models"
    step = make_step({"c": urgent}, budget_s=20, isolation="process")
    image = dicom_envelope(chest(100, generate_uid()))
    out = await step.run(image)
    assert out[0] is image
    assert {e.kind for e in out[1:]} >= {"dicom", "hl7"}
    (row,) = step.history.rows()
    assert (row["status"], row["priority"]) == ("done", "urgent")

    slow = write_card(folder, slow_model(folder / "slow.onnx", min_ms=1500), id="slow")
    step = make_step({"slow": slow}, budget_s=0.5, queue=0, workers=1, isolation="process")
    first = await step.run(dicom_envelope(chest(100, generate_uid())))
    # the worker that held the run is replaced; images meanwhile pass as "busy: starting"
    assert await asyncio.to_thread(step._procs.ready.wait, 60)
    second = await step.run(dicom_envelope(chest(100, generate_uid())))
    assert len(first) == len(second) == 1  # both forwarded, nothing derived
    statuses = [(r["status"], r["reason"]) for r in step.history.rows()][:2]
    assert statuses == [("timeout", "no result within 0.5 s")] * 2  # not "busy"


# -- through a running gateway: every failure forwards the study -------------------------


@dataclass
class Running:
    gw: Gateway
    pacs: Path
    ris: Path
    events: Path
    state: Path


@asynccontextmanager
async def gateway(
    tmp_path: Path, cards: dict[str, Path], budget_s: float, step_params: str = ""
) -> AsyncIterator[Running]:
    """The gateway in-process: chest images through ai-triage to a folder PACS, its
    notifications to a folder RIS, ai.flagged events to a third folder."""
    pacs, ris, events, state = (tmp_path / n for n in ("pacs", "ris", "events", "state"))
    models = "".join(f"  - {{id: {k}, card: {v}}}\n" for k, v in cards.items())
    text = (
        f"site: {{id: t}}\nstate_dir: {state}\nhttp: {{listen: null}}\n"
        f"journal: {{min_free_mb: 0}}\nmodels:\n{models}"
        f"destinations:\n"
        f"  - {{id: pacs, type: folder, path: {pacs}}}\n"
        f"  - {{id: ris, type: folder, path: {ris}}}\n"
        f"  - {{id: events, type: folder, path: {events}}}\n"
        f"routes:\n"
        f"  - id: triage\n"
        f"    match: {{kind: dicom, modality: [CR, DX]}}\n"
        f"    steps: [{{ai-triage: {{models: [{', '.join(cards)}], budget_s: {budget_s}"
        f"{step_params}}}}}]\n"
        f"    to: [pacs]\n    notify: [ris]\n"
        f"  - {{match: {{kind: event, event: ai.flagged}}, to: [events]}}\n"
    )
    registry = default_registry()
    gw = Gateway(parse_config(text, registry, str(tmp_path / "gateway.yaml")), registry)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        yield Running(gw, pacs, ris, events, state)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def files(folder: Path) -> list[Path]:
    """Delivered files (the folder destination writes ``.NAME.tmp`` first, then renames)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def failing_card(folder: Path, case: str) -> Path:
    if case == "raises":
        return write_card(folder, raising_model(folder / "m.onnx"), id=case)
    if case == "timeout":
        return write_card(folder, slow_model(folder / "m.onnx", min_ms=3000), id=case)
    if case == "missing":
        return write_card(folder, folder / "absent.onnx", id=case)
    model = constant_model(folder / "m.onnx", probabilities=URGENT)
    return write_card(folder, model, id=case, sha256="e" * 64)


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("raises", "failed", "model error: "),
        ("timeout", "timeout", "no result within 0.5 s"),
        ("missing", "skipped", "model unavailable: "),
        ("sha256", "skipped", "model unavailable: "),
    ],
)
async def test_a_failing_model_forwards_the_study_unchanged(
    tmp_path: Path, case: str, status: str, reason: str
) -> None:
    budget_s = 0.5
    card = failing_card(tmp_path, case)
    body = sample("RG1_UNCR.dcm")
    async with gateway(tmp_path, {case: card}, budget_s) as site:
        seen: list[Any] = []
        site.gw.events.subscribe(seen.append)
        started = time.monotonic()
        await site.gw.accept(dicom_envelope(body))
        (sent,) = await eventually(lambda: files(site.pacs), budget_s + 5, "RG1 in the PACS")
        assert time.monotonic() - started < budget_s + 5
        assert sent.read_bytes() == body
        history = History(site.state)
        (row,) = await eventually(history.rows, 10, "the history row")
    assert (row["status"], row["reason"][: len(reason)]) == (status, reason)
    if case == "missing":
        assert "model file missing" in row["reason"]
    if case == "sha256":
        assert f"does not match card sha256 1.0 ({'e' * 64})" in row["reason"]
    assert row["sent"] == {} and row["priority"] == ""
    # the reason reaches telemetry and the audit trail too, and nothing is flagged
    (failed,) = [e for e in seen if e.event == "ai.failed"]
    assert failed.detail["status"] == status and failed.detail["model"] == case
    assert failed.detail["reason"].startswith(reason)
    assert not [e for e in seen if e.event == "ai.flagged"]
    assert files(site.pacs) == [sent]  # nothing derived
    assert files(site.ris) == files(site.events) == []
    history.close()


async def test_an_urgent_result_emits_ai_flagged(tmp_path: Path) -> None:
    card = card_for(tmp_path, "cxr", URGENT)
    async with gateway(tmp_path, {"cxr": card}, 30) as site:
        seen: list[Any] = []
        site.gw.events.subscribe(seen.append)
        env = dicom_envelope(sample("RG1_UNCR.dcm"))
        await site.gw.accept(env)
        await eventually(lambda: [e for e in seen if e.event == "ai.flagged"], 30, "ai.flagged")
    (flag,) = [e for e in seen if e.event == "ai.flagged"]
    assert flag.envelope == env.id and flag.detail["model"] == "cxr"
    assert flag.detail["priority"] == "urgent" and flag.detail["findings"]
    assert flag.ids["study_uid"]


# -- configuration ------------------------------------------------------------------------


def test_the_step_names_configured_models_only(tmp_path: Path) -> None:
    card = card_for(tmp_path, "cxr", URGENT)
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: broken\n", encoding="utf-8")
    text = (
        f"site: {{id: t}}\nstate_dir: {tmp_path}\n"
        f"models: [{{id: cxr, card: {card}}}, {{id: broken, card: {broken}}}]\n"
        f"destinations: [{{id: pacs, type: folder, path: {tmp_path}}}]\n"
        f"routes:\n"
        f"  - {{match: {{kind: dicom}}, to: [pacs],\n"
        f"     steps: [{{ai-triage: {{models: [cxr, nope]}}}}]}}\n"
        f"  - {{match: {{kind: x}}, steps: [{{ai-triage: {{models: [broken]}}}}], to: [pacs]}}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, default_registry(), str(tmp_path / "gateway.yaml"))
    problems = "\n".join(err.value.problems)
    assert "unknown model 'nope' (configured: broken, cxr)" in problems
    assert "broken.yaml: " in problems and "required field is missing" in problems


# -- the RIS message -----------------------------------------------------------------------


def result(priority: str, **changes: Any) -> TriageResult:
    findings = (
        Finding(label="No Finding", probability=0.01, threshold=0.5, positive=False),
        Finding(label="Effusion", probability=0.61, threshold=0.5, positive=True),
        Finding(label="Pneumothorax", probability=0.9, threshold=0.3, positive=True, urgent=True),
    )
    data: dict[str, Any] = {
        "model_id": "cxr",
        "model_version": "2.1",
        "model_sha256": "ab" * 32,
        "study_instance_uid": "1.2.3.4",
        "accession_number": "ACC1",
        "patient_id": "PAT1",
        "priority": priority,
        "findings": findings if priority == "urgent" else findings[:2],
        "images": (
            EvaluatedImage(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                sop_instance_uid="1.2.3.4.5",
                series_instance_uid="1.2.3.4.6",
                study_instance_uid="1.2.3.4",
            ),
        ),
    }
    return TriageResult(**{**data, **changes})


@pytest.mark.parametrize(("priority", "code"), [("urgent", "S"), ("abnormal", "A")])
def test_the_priority_oru_is_valid_hl7(priority: str, code: str) -> None:
    message = build_priority_oru(
        result(priority),
        control_id="AI0001",
        timestamp="20240102030405+0000",
        sending_facility="SITE",
    )
    parsed = strict(message)
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert parsed.msh.msh_10.to_er7() == "AI0001"
    assert parsed.msh.msh_12.to_er7() == "2.5.1"
    assert (msh(message, 3), msh(message, 4), msh(message, 5)) == ("MEDGW", "SITE", "RIS")
    pid, orc, obr = segment(message, "PID"), segment(message, "ORC"), segment(message, "OBR")
    assert (pid[3], pid[5]) == ("PAT1", '""')  # no name in a result: the explicit null
    assert (orc[1], orc[3], orc[7]) == ("SC", "ACC1", f"^^^^^{code}")
    assert (obr[3], obr[4], obr[5]) == ("ACC1", "AI-TRIAGE^AI triage^99MEDGW", code)
    assert (obr[20], obr[25]) == ("1.2.3.4", "P")
    obx = [s.split("|") for s in message.decode().split("\r") if s.startswith("OBX|")]
    expected = [["Effusion", "0.610", ">=0.5", "A"]]
    if priority == "urgent":
        expected.append(["Pneumothorax", "0.900", ">=0.3", "HH"])
    assert [[o[3].split("^")[0], o[5], o[7], o[8]] for o in obx] == expected
    assert message.decode().endswith(
        "NTE|1||AI triage by cxr 2.1: for triage only, not for diagnosis\r"
    )


def test_the_priority_oru_escapes_and_fills_required_fields() -> None:
    message = build_priority_oru(
        result("urgent", accession_number="A|B^C&D~E\\F", patient_id=""),
        control_id="AI0002",
        timestamp="20240102030405+0000",
    )
    strict(message)
    assert segment(message, "OBR")[3] == "A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F"
    assert segment(message, "PID")[3] == '""'


def test_control_ids_are_stable_per_result_and_new_per_reissue() -> None:
    urgent = control_id(result("urgent"))
    assert urgent == control_id(result("urgent")) and len(urgent) <= 20
    assert urgent != control_id(result("abnormal"))
    other_image = EvaluatedImage(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        sop_instance_uid="1.2.3.4.9",
        series_instance_uid="1.2.3.4.6",
        study_instance_uid="1.2.3.4",
    )
    assert urgent != control_id(result("urgent", images=(other_image,)))


# -- the history ---------------------------------------------------------------------------


def test_history_rows_and_the_best_result(tmp_path: Path) -> None:
    history = History(tmp_path)
    model = ("cxr", "1.0", "ab" * 32)
    history.record(
        envelope="e1",
        study_uid="S1",
        sop_uid="I1",
        model=model,
        status="skipped",
        reason="BodyPartExamined EXTREMITY not in [CHEST, THORAX]",
    )
    history.record(
        envelope="e2",
        study_uid="S2",
        sop_uid="I2",
        model=model,
        status="done",
        priority="urgent",
        duration_ms=12.5,
        inputs={"Modality": "CR"},
        outputs={"Pneumothorax": 0.9},
        sent={"sr": "1.2.3"},
    )
    rows = history.rows()
    assert [r["sop_uid"] for r in rows] == ["I2", "I1"]  # newest first
    assert rows[0]["outputs"] == {"Pneumothorax": 0.9} and rows[0]["sent"] == {"sr": "1.2.3"}
    assert (rows[0]["model_id"], rows[0]["model_version"]) == ("cxr", "1.0")
    assert rows[1]["duration_ms"] is None and rows[1]["priority"] == ""
    assert [r["sop_uid"] for r in history.rows("S1")] == ["I1"]
    assert len(history.rows(limit=1)) == 1

    assert history.keep_best("S2", "cxr", 2.9, b'{"a": 1}', "e2")
    assert not history.beats("S2", "cxr", 2.9, "e3") and history.beats("S2", "cxr", 2.95, "e3")
    assert not history.keep_best("S2", "cxr", 1.5, b'{"a": 2}', "e3")
    assert history.keep_best("S2", "cxr", 2.9, b'{"a": 1}', "e2")  # the same image, again
    assert history.keep_best("S2", "other", 0.0, b'{"b": 1}', "e2")  # per model
    assert history.best("S2", "cxr") == (2.9, b'{"a": 1}')
    history.close()

    reopened = History(tmp_path)  # a restart keeps both
    assert len(reopened.rows()) == 2 and reopened.best("S2", "cxr") == (2.9, b'{"a": 1}')
    reopened.close()


def test_a_history_file_without_the_envelope_column_is_upgraded(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "ai_history.sqlite")) as db:
        db.execute(
            "CREATE TABLE study_results (study_uid TEXT NOT NULL, model_id TEXT NOT NULL, "
            "score REAL NOT NULL, result TEXT NOT NULL, PRIMARY KEY (study_uid, model_id))"
        )
        db.execute("INSERT INTO study_results VALUES ('S1', 'cxr', 1.5, '{}')")
        db.commit()
    history = History(tmp_path)
    assert not history.keep_best("S1", "cxr", 1.2, b"{}", "e1")
    assert history.keep_best("S1", "cxr", 1.7, b'{"n": 2}', "e1")
    assert history.keep_best("S1", "cxr", 1.7, b'{"n": 2}', "e1")
    assert history.best("S1", "cxr") == (1.7, b'{"n": 2}')
    history.close()


# -- ingest first -----------------------------------------------------------------------------


def received(bus: EventBus, to: list[str], kind: str = "dicom") -> None:
    bus.emit("message.received", source="modalities", kind=kind, detail={"to": to})


async def test_triage_waits_while_other_routes_receive_then_runs(tmp_path: Path) -> None:
    """A CT series arriving for another route defers the chest image's triage (never
    the image itself: the chain has forwarded it); the wait is recorded."""
    bus = EventBus()
    context = PluginContext("site-a", str(tmp_path / "state"), None, events=bus, route="steps:cxr")
    cards = {"cxr": card_for(tmp_path, "cxr", URGENT)}
    params = TriageParams.model_validate(
        {"models": ["cxr"], "isolation": "thread", "yield_to_ingest_s": 5},
        context={"models": cards},
    )
    step = TriageStep(params, context)
    try:
        received(bus, ["steps:cxr"])  # chest images for this very route: no reason to wait
        received(bus, [], kind="event")  # a study's "complete" notice is not traffic
        started = time.monotonic()
        await step.run(dicom_envelope(chest(153, "1.2.826.0.1.3680043.10.1437.91")))
        assert time.monotonic() - started < QUIET_S
        assert "deferred_s" not in step.history.rows()[0]["inputs"]

        async def ct_series() -> None:  # another route's images, one every 0.3 s for 1.5 s
            for _ in range(6):
                received(bus, ["pacs"])
                await asyncio.sleep(0.3)

        feeding = asyncio.create_task(ct_series())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        out = await step.run(dicom_envelope(chest(153, "1.2.826.0.1.3680043.10.1437.92")))
        waited = time.monotonic() - started
        await feeding
        assert kinds(out) == ["dicom", "sr", "hl7", "event"]  # then it ran in full
        assert waited >= 1.5 + QUIET_S - 0.35  # until a quiet second after the series
        assert step.history.rows()[0]["inputs"]["deferred_s"] >= 1.5
    finally:
        for runtime in step.models:
            runtime.close()


async def test_the_wait_for_quiet_ingest_is_bounded() -> None:
    now = [100.0]
    watch = IngestWatch("steps:cxr", clock=lambda: now[0])
    watch.on_event(Event("message.received", at=0, kind="hl7", detail={"to": ["lis"]}))
    assert watch.busy()
    now[0] += QUIET_S + 0.01
    assert not watch.busy()
    assert await watch.wait_quiet(10) == 0
    real = IngestWatch("steps:cxr")
    real.on_event(Event("message.received", at=0, kind="dicom", detail={"to": ["pacs"]}))
    started = time.monotonic()
    for _ in range(4):  # traffic that never stops: the wait ends at its limit
        waited = await real.wait_quiet(0.2)
        real.on_event(Event("message.received", at=0, kind="dicom", detail={"to": ["pacs"]}))
    assert 0.2 <= waited < 0.5
    assert time.monotonic() - started < 4 * 0.5


async def test_the_gateway_tells_the_step_its_route_and_other_traffic_defers_it(
    tmp_path: Path,
) -> None:
    card = card_for(tmp_path, "cxr", URGENT)
    params = ", isolation: thread, yield_to_ingest_s: 5"
    async with gateway(tmp_path, {"cxr": card}, 30, params) as site:
        chain = site.gw.pumps["steps:triage"].destination
        (step,) = chain.steps
        assert step._ingest is not None and step._ingest.own_route == "steps:triage"
        ct = dicom_envelope(sample("CT_small.dcm"))  # no route takes it: still traffic
        await site.gw.accept(ct)
        await site.gw.accept(dicom_envelope(sample("RG1_UNCR.dcm")))
        (row,) = await eventually(step.history.rows, 30, "the triage record")
    assert row["status"] == "done"
    assert QUIET_S - 0.3 <= row["inputs"]["deferred_s"] <= 5
