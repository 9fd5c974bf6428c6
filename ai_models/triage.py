"""The ``ai-triage`` route step: run the configured models on each eligible image.

```yaml
models:
  - {id: cxr-triage, card: /etc/medgw/models/cxr-triage.yaml}
routes:
  - match: {kind: dicom, modality: [CR, DX]}
    steps: [{ai-triage: {models: [cxr-triage], budget_s: 20}}]
    to: [pacs]
    notify: [ris]
```

The original instance is always passed on unchanged (ARCHITECTURE.md: AI never
holds clinical data hostage), and before the model runs (``passes_first``): an
image the card does not apply to, a missing or altered model, an error, a full
queue or a run past ``budget_s`` is recorded in the AI history with its reason
and the image goes on as it came. When the model
runs, the study's result (the most suspicious of its images so far) produces, as
the card and the step allow: a DICOM SR and a summary Secondary Capture in the
study (to ``to``, after the original), an HL7 ORU with the triage priority for
the RIS (to ``notify``), and an ``ai.flagged`` event (routed like any message).
A later image of the study re-issues them only when it makes the study more
suspicious.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ai_models import worker
from ai_models.card import CardError, ModelCard, load_card, model_path
from ai_models.history import History
from ai_models.ingest import POLL_S, IngestWatch
from ai_models.notify import build_priority_oru
from ai_models.preprocess import prepare
from ai_models.runtime import (
    InferenceError,
    ModelBusy,
    ModelRuntime,
    ModelTimeout,
    RuntimeSettings,
)
from dicom.ai_objects import build_sc, build_sr
from dicom.headers import routing_headers
from gateway.envelope import Envelope
from gateway.events import ids_from_headers
from gateway.registry import PluginContext
from gateway.steps import AnyEnvelope
from gateway.triage import EvaluatedImage, Finding, Priority, TriageResult

log = logging.getLogger(__name__)

RANK: dict[str, float] = {"normal": 0.0, "abnormal": 1.0, "urgent": 2.0}
# what the card's applies-to rules look at, read from the data set (no pixels)
ELIGIBILITY = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "SOPClassUID",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)


class Outputs(BaseModel):
    """Per-route switches; ``None`` keeps what the card says."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sr: bool | None = None
    sc: bool | None = None
    hl7: bool | None = None
    event: bool | None = None


class TriageParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[str, ...] = Field(min_length=1)
    budget_s: float = Field(default=20.0, gt=0, le=600)
    workers: int = Field(default=1, ge=1, le=8)
    queue: int = Field(default=8, ge=0, le=1000)
    threads: int = Field(default=0, ge=0, le=64)  # onnxruntime intra-op threads (0: default)
    # process: decode/infer/SR in worker processes at a lower CPU priority (ingest first);
    # thread: in the gateway's process (tests, or a machine with cores to spare)
    isolation: Literal["process", "thread"] = "process"
    nice: int = Field(default=19, ge=0, le=19)  # 19: the least CPU while ingest needs it
    # ingest first: wait up to this long while other routes' messages arrive (0: never)
    yield_to_ingest_s: float = Field(default=30.0, ge=0, le=3600)
    outputs: Outputs = Outputs()
    sending_app: str = "MEDGW"
    receiving_app: str = "RIS"
    cards: dict[str, Path] = Field(default_factory=dict)  # filled from the config's models

    @model_validator(mode="before")
    @classmethod
    def _cards(cls, data: Any, info: ValidationInfo) -> Any:
        """Every model named must be configured (``models:``); its card must load."""
        known: dict[str, Path] = (info.context or {}).get("models") or {}
        if not isinstance(data, dict) or not info.context or "models" not in info.context:
            return data
        names = data.get("models") or []
        missing = [m for m in names if m not in known]
        if missing:
            raise ValueError(
                f"unknown model {missing[0]!r} (configured: {', '.join(sorted(known)) or 'none'})"
            )
        return {**data, "cards": {m: known[m] for m in names}}

    @field_validator("cards")
    @classmethod
    def _load(cls, cards: dict[str, Path]) -> dict[str, Path]:
        for path in cards.values():
            try:
                load_card(path)
            except CardError as err:
                raise ValueError(str(err)) from None
        return cards


def priority_of(card: ModelCard, findings: Sequence[Finding]) -> Priority:
    """The card decides: urgent labels, abnormal labels, labels that mean "normal"."""
    return card.output.priority(f.label for f in findings if f.positive)


def result_of(
    template: TriageResult, card: ModelCard, probs: np.ndarray, infer_ms: float
) -> TriageResult:
    """The study's result: the template (model, study, image) with the findings."""
    findings = findings_of(card, probs)
    return template.model_copy(
        update={
            "findings": findings,
            "priority": priority_of(card, findings),
            "inference_ms": round(infer_ms, 1),
        }
    )


def findings_of(card: ModelCard, probs: np.ndarray) -> tuple[Finding, ...]:
    out = []
    spec = card.output
    for label, p in zip(spec.labels, probs.tolist(), strict=True):
        threshold = spec.threshold_for(label)
        positive = p >= threshold and label not in spec.normal_labels
        out.append(
            Finding(
                label=label,
                probability=round(float(p), 4),
                threshold=threshold,
                positive=positive,
                urgent=positive and label in spec.urgent,
            )
        )
    return tuple(out)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


class TriageStep:
    # it always passes the original on unchanged: the chain forwards it before running
    passes_first = True

    def __init__(self, params: TriageParams, ctx: PluginContext) -> None:
        self.params = params
        self.site_id = ctx.site_id
        self.events = ctx.events  # gateway.events.EventBus (None outside a gateway)
        self.history = history(ctx)
        self.models = [
            runtime_for(ctx, model_id, path, params) for model_id, path in params.cards.items()
        ]
        # the card file of each runtime (the config's model id may differ from the card's)
        self._card_files = {
            id(runtime): str(path)
            for runtime, path in zip(self.models, params.cards.values(), strict=True)
        }
        self._prep = ThreadPoolExecutor(params.workers, thread_name_prefix="ai-prep")
        self._procs: WorkerPool | None = None
        if params.isolation == "process":
            self._procs = worker_pool(ctx, params)
        self._ingest: IngestWatch | None = None
        if params.yield_to_ingest_s > 0 and ctx.events is not None and ctx.route:
            self._ingest = IngestWatch(ctx.route)
            ctx.events.subscribe(self._ingest.on_event)

    async def _remote(self, job: Callable[..., Any], *args: Any) -> Any:
        """Run a job in a worker process (bounded: busy beyond workers + queue)."""
        assert self._procs is not None
        return await self._procs.run(job, *args)

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != "dicom":
            return [envelope]
        out: list[AnyEnvelope] = [envelope]
        try:
            header = await asyncio.to_thread(_read, envelope, True)
        except Exception as err:  # noqa: BLE001 - an unreadable file is forwarded as it is
            log.warning("ai.unreadable envelope=%s error=%s", envelope.id, err)
            return out
        facts = {k: _text(header, k) for k in ELIGIBILITY}
        for runtime in self.models:
            out.extend(await self._one(envelope, header, facts, runtime))
        return out

    async def _one(
        self,
        envelope: AnyEnvelope,
        header: pydicom.Dataset,
        facts: dict[str, str],
        runtime: ModelRuntime,
    ) -> list[Envelope]:
        card = runtime.card
        study, sop = _text(header, "StudyInstanceUID"), _text(header, "SOPInstanceUID")
        model = (card.id, card.version, card.sha256)
        record: dict[str, Any] = {
            "envelope": envelope.id,
            "study_uid": study,
            "sop_uid": sop,
            "model": model,
        }
        refusal = card.applies_to.refusal(facts)
        if refusal is None and runtime.session is None:
            refusal = f"model unavailable: {runtime.unavailable}"
        if refusal is not None:
            if runtime.session is None:  # not an image the card refuses: the model is missing
                self._emit_failed(record, "skipped", refusal)
            await asyncio.to_thread(self.history.record, status="skipped", reason=refusal, **record)
            log.info("ai.skipped model=%s envelope=%s reason=%s", card.id, envelope.id, refusal)
            return []
        deferred = 0.0
        if self._ingest is not None:  # the original is on its way already: only we wait
            deferred = await self._ingest.wait_quiet(self.params.yield_to_ingest_s)
            if deferred >= POLL_S:
                log.info(
                    "ai.deferred model=%s envelope=%s seconds=%.1f reason=ingest busy",
                    card.id,
                    envelope.id,
                    deferred,
                )
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        template = TriageResult(
            model_id=card.id,
            model_version=card.version,
            model_sha256=card.sha256,
            intended_use=card.intended_use,
            study_instance_uid=study,
            accession_number=_text(header, "AccessionNumber"),
            patient_id=_text(header, "PatientID"),
            priority="normal",
            findings=(),
            images=(
                EvaluatedImage(
                    sop_class_uid=_text(header, "SOPClassUID"),
                    sop_instance_uid=sop,
                    series_instance_uid=_text(header, "SeriesInstanceUID"),
                    study_instance_uid=study,
                ),
            ),
        )
        speculative: tuple[dict[str, bytes], list[str]] | None = None
        try:
            async with asyncio.timeout(self.params.budget_s):
                if self._procs is not None:
                    # one job: infer, and build the SR/SC at once (a study almost always
                    # gets them: one IPC round trip and one read of the file, not two)
                    full = None
                    values, infer_ms, display, speculative = await self._remote(
                        worker.infer,
                        self._card_files[id(runtime)],
                        worker.source_of(envelope),
                        self._enabled("sc", card),
                        template.to_json(),
                        self._enabled("sr", card),
                    )
                    probs = np.asarray(values)
                    prepared: Any = _Display(display)
                else:
                    full = await loop.run_in_executor(self._prep, _read, envelope, False)
                    prepared = await loop.run_in_executor(
                        self._prep, prepare, full, card.preprocessing, card.input
                    )
                    left = self.params.budget_s - (time.perf_counter() - started)
                    probs, infer_ms = await runtime.infer(prepared.tensor, max(left, 0.001))
        except (TimeoutError, ModelTimeout):
            return await self._failed(
                record, "timeout", f"no result within {self.params.budget_s:g} s", started
            )
        except InferenceError as err:
            return await self._failed(record, "failed", str(err), started)
        except Exception as err:  # noqa: BLE001 - decoding/preprocessing of odd images
            return await self._failed(record, "failed", f"{type(err).__name__}: {err}", started)
        result = result_of(template, card, probs, infer_ms)
        findings = result.findings
        elapsed = (time.perf_counter() - started) * 1000.0
        top = max((f.probability for f in findings if f.positive), default=0.0)
        score = RANK[result.priority] + top
        outputs = {f.label: f.probability for f in findings}
        inputs: dict[str, Any] = {**facts, "recipe": card.preprocessing.model_dump(mode="json")}
        if deferred >= POLL_S:
            inputs["deferred_s"] = round(deferred, 1)
        done = {
            "priority": result.priority,
            "duration_ms": elapsed,
            "inputs": inputs,
            "outputs": outputs,
            **record,
        }
        weaker = "not re-issued: the study already has as strong a result"
        if not await asyncio.to_thread(self.history.beats, study, card.id, score, envelope.id):
            await asyncio.to_thread(self.history.record, status="done", reason=weaker, **done)
            return []
        try:
            prebuilt = speculative
            if self._procs is not None and prebuilt is None:
                prebuilt = await self._remote(
                    worker.build,
                    result.to_json(),
                    worker.source_of(envelope),
                    self._enabled("sr", card),
                    self._enabled("sc", card),
                    prepared.display,
                )
            made, sent, problems = await loop.run_in_executor(
                self._prep, self._outputs, result, card, header, full, prepared, prebuilt
            )
        except Exception as err:  # noqa: BLE001 - outputs never hold the original back
            reason = f"outputs not built: {type(err).__name__}: {err}"
            self._emit_failed(record, "failed", reason)
            await asyncio.to_thread(self.history.record, status="failed", reason=reason, **done)
            log.warning("ai.outputs_failed model=%s envelope=%s %s", card.id, envelope.id, reason)
            return []
        # stored only now that the outputs exist: a study's best is one that was issued
        if not await asyncio.to_thread(
            self.history.keep_best, study, card.id, score, result.to_json(), envelope.id
        ):  # a stronger image of the study was triaged meanwhile
            await asyncio.to_thread(self.history.record, status="done", reason=weaker, **done)
            return []
        await asyncio.to_thread(
            self.history.record, status="done", reason="; ".join(problems), sent=sent, **done
        )
        log.info(
            "ai.triaged model=%s envelope=%s priority=%s positives=%d ms=%.0f sent=%s",
            card.id,
            envelope.id,
            result.priority,
            len(result.positives),
            elapsed,
            ",".join(sent) or "-",
        )
        if self.events is not None and result.priority != "normal":
            self.events.emit(
                "ai.flagged",
                source=envelope.source,
                envelope=envelope.id,
                kind=envelope.kind,
                ids=ids_from_headers(envelope.headers),
                detail={
                    "model": card.id,
                    "priority": result.priority,
                    "findings": [f.label for f in result.positives],
                },
            )
        return made

    async def _failed(
        self, record: dict[str, Any], status: str, reason: str, started: float
    ) -> list[Envelope]:
        ms = (time.perf_counter() - started) * 1000.0
        self._emit_failed(record, status, reason)
        await asyncio.to_thread(
            self.history.record, status=status, reason=reason, duration_ms=ms, **record
        )
        log.warning(
            "ai.not_triaged model=%s envelope=%s status=%s reason=%s: forwarded unchanged",
            record["model"][0],
            record["envelope"],
            status,
            reason,
        )
        return []

    def _emit_failed(self, record: dict[str, Any], status: str, reason: str) -> None:
        if self.events is not None:
            self.events.emit(
                "ai.failed",
                envelope=str(record["envelope"]),
                outcome="failed",
                ids={"study_uid": record["study_uid"], "sop_instance_uid": record["sop_uid"]},
                detail={"model": str(record["model"][0]), "status": status, "reason": reason},
            )

    def _enabled(self, name: str, card: ModelCard) -> bool:
        override = getattr(self.params.outputs, name)
        return bool(getattr(card.outputs, name) if override is None else override)

    def _outputs(  # noqa: PLR0917 - called through run_in_executor (positional only)
        self,
        result: TriageResult,
        card: ModelCard,
        header: pydicom.Dataset,
        full: pydicom.Dataset | None,
        prepared: Any,
        prebuilt: tuple[dict[str, bytes], list[str]] | None = None,
    ) -> tuple[list[Envelope], dict[str, Any], list[str]]:
        """The derived objects (built in a worker thread), what was sent, for the audit,
        and the objects that could not be built (the others still go: an SR that the
        source's header cannot support must not hold back the RIS's priority)."""
        made: list[Envelope] = []
        sent: dict[str, Any] = {}
        problems: list[str] = []
        if prebuilt is not None:  # built in a worker process
            objects, problems = prebuilt[0], list(prebuilt[1])
            for what, data in objects.items():
                made.append(_dicom_envelope(data, what))
                sent[what] = made[-1].headers.get("SOPInstanceUID", "")
        else:
            builders: dict[str, Callable[[], bytes]] = {
                "sr": lambda: build_sr(result, header),
                "sc": lambda: build_sc(
                    result,
                    full if full is not None else header,
                    prepared.display,
                    getattr(prepared, "heatmap", None),
                ),
            }
            for what, build in builders.items():
                if not self._enabled(what, card):
                    continue
                try:
                    made.append(_dicom_envelope(build(), what))
                except Exception as err:  # noqa: BLE001 - odd source headers; highdicom's types
                    problems.append(f"{what.upper()} not built: {err}")
                    continue
                sent[what] = made[-1].headers.get("SOPInstanceUID", "")
        flagged = result.priority != "normal"
        stamp = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())
        if self._enabled("hl7", card) and flagged:
            made.append(
                Envelope(
                    kind="hl7",
                    source="ai-triage",
                    body=build_priority_oru(
                        result,
                        control_id=control_id(result),
                        timestamp=stamp,
                        sending_app=self.params.sending_app,
                        sending_facility=self.site_id,
                        receiving_app=self.params.receiving_app,
                    ),
                    headers={
                        "message_type": "ORU^R01",
                        "notify": "true",
                        "priority": result.priority,
                    },
                )
            )
            sent["hl7"] = result.priority
        if self._enabled("event", card) and flagged:
            made.append(
                Envelope(
                    kind="event",
                    source="ai-triage",
                    body=result.to_json(),
                    headers={
                        "event": "ai.flagged",
                        "route": "true",
                        "priority": result.priority,
                        "model": card.id,
                        "StudyInstanceUID": result.study_instance_uid,
                    },
                )
            )
            sent["event"] = "ai.flagged"
        return made, sent, problems


def control_id(result: TriageResult) -> str:
    """MSH-10 (at most 20 characters): the same for a re-run of the same result, new for
    each result the study gets, so that a RIS that drops repeated control ids still
    sees a study re-issued as more urgent."""
    image = result.images[0].sop_instance_uid if result.images else ""
    key = "|".join((result.study_instance_uid, result.model_id, image, result.priority))
    return "AI" + hashlib.sha256(key.encode()).hexdigest()[:18]


def _read(envelope: AnyEnvelope, header_only: bool) -> pydicom.Dataset:
    path = getattr(envelope, "blob_path", None)
    source: Any = str(path) if path is not None else io.BytesIO(envelope.body)
    return pydicom.dcmread(source, stop_before_pixels=header_only, force=True)


def _dicom_envelope(data: bytes, what: str) -> Envelope:
    headers = routing_headers(data)
    headers["ai"] = what
    return Envelope(
        kind="dicom",
        source="ai-triage",
        body=data,
        headers=headers,
        idem_key=f"dicom:{headers.get('SOPInstanceUID', '')}",
        as_file=True,
    )


def history(ctx: PluginContext) -> History:
    found = ctx.services.get("ai-history")
    if found is None:
        found = ctx.services["ai-history"] = History(ctx.state_dir)
    assert isinstance(found, History)
    return found


def runtime_for(
    ctx: PluginContext, model_id: str, card_file: Path, params: TriageParams
) -> ModelRuntime:
    """One loaded runtime per model for the whole gateway (routes share it)."""
    key = f"ai-model:{model_id}"
    found = ctx.services.get(key)
    if found is None:
        card = load_card(card_file)
        found = ModelRuntime(
            card,
            model_path(card, card_file),
            RuntimeSettings(
                workers=params.workers, queue=params.queue, intra_op_threads=params.threads
            ),
        )
        found.load()
        ctx.services[key] = found
    assert isinstance(found, ModelRuntime)
    return found


class _Display:
    """What the SC needs of a prepared image when the worker prepared it."""

    def __init__(self, display: Any) -> None:
        self.display = display
        self.heatmap = None


WARM_TIMEOUT_S = 120.0


class WorkerPool:
    """Worker processes of the gateway's triage (spawned, not forked: the gateway has
    threads), at ``nice`` priority, each with its models loaded once."""

    def __init__(self, params: TriageParams) -> None:
        self.params = params
        self._slots = threading.BoundedSemaphore(params.workers + params.queue)
        self.ready = threading.Event()
        self.pool = self._start()
        # the gateway starts once its models are loaded (a model that cannot load is
        # reported by its runtime, and its images pass untriaged)
        self.ready.wait(WARM_TIMEOUT_S)

    def _start(self) -> ProcessPoolExecutor:
        """New worker processes; ``ready`` is set once each has loaded the models."""
        self.ready = ready = threading.Event()
        pool = ProcessPoolExecutor(
            self.params.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(self.params.nice, self.params.threads or 1),
        )
        cards = [str(p) for p in self.params.cards.values()]
        pending = [pool.submit(worker.warm, cards) for _ in range(self.params.workers)]

        def warmed(_: object) -> None:
            if all(f.done() for f in pending):
                ready.set()

        for future in pending:
            future.add_done_callback(warmed)
        return pool

    async def run(self, job: Callable[..., Any], *args: Any) -> Any:
        if not self.ready.is_set():  # never queue behind workers that are still starting
            raise ModelBusy("busy: the triage workers are starting")
        if not self._slots.acquire(blocking=False):
            raise ModelBusy("busy: too many images waiting for a triage worker")
        once = threading.Lock()

        def release(_: object = None) -> None:
            if once.acquire(blocking=False):  # the job's slot, given back exactly once
                self._slots.release()

        future = self.pool.submit(job, *args)
        future.add_done_callback(release)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the budget is spent: a run cannot be told to stop
            if future.running():  # across processes, so its workers are replaced
                self.recycle()
                release()
            raise

    def recycle(self) -> None:
        """Stop the workers (a run past its budget holds one) and start fresh ones."""
        old, self.pool = self.pool, self._start()
        for process in list(getattr(old, "_processes", {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        log.warning("ai.workers_recycled: a run overstayed its budget")

    def close(self) -> None:
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)


def worker_pool(ctx: PluginContext, params: TriageParams) -> WorkerPool:
    """One pool per route's step (closed with the gateway's shared services)."""
    key = f"ai-workers:{id(params)}"
    found = ctx.services.get(key)
    if found is None:
        found = ctx.services[key] = WorkerPool(params)
    assert isinstance(found, WorkerPool)
    return found
