"""DICOM SCP listener ``dicom-scp``: C-ECHO, C-STORE into the journal, worklist C-FIND.

Upper layer and DIMSE (PS3.8, PS3.7 section 9) are pynetdicom's: its server
thread accepts connections, one thread per association runs the state machine
and calls the handlers below. A C-STORE handler takes the data set as it came
off the wire (what ``event.encoded_dataset()`` gives: preamble, a file meta
header built from the request, then the data set bytes untouched; see
:func:`dicom.net.received_file`), reads the routing attributes from those bytes
(:mod:`dicom.headers`), and hands the envelope to
the journal on the event loop through :func:`dicom.net.run_in_loop`, waiting
at most ``accept_timeout_s``. Status 0x0000 goes back only after the commit;
a journal failure, a full disk or the timeout answer 0xA700 (out of
resources: the modality keeps the image and retries); a data set whose header
cannot be read answers 0xC000 (cannot understand) and is quarantined.

Associations: calling AE titles outside ``allowed_calling_aes`` are rejected
at A-ASSOCIATE (rejected-permanent, calling AE not recognised); peers outside
``allowed_ips`` are disconnected before the association starts; with ``tls``
the port speaks TLS only (PS3.15 B.1): the handshake follows the address check,
and a peer that fails it (plain TCP, missing or untrusted client certificate)
is disconnected, logged once and recorded; over
``maximum_associations`` pynetdicom rejects the A-ASSOCIATE-RQ
(rejected-transient, local limit exceeded). Each association (and each
refused connection) is recorded as a session in the journal.

After the ACK, off the receive path, a housekeeping task notes each new
instance for study grouping (:mod:`dicom.studies`) and tells the worklist, if
there is one, that the accession has images.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydicom import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from dicom import cli, spool
from dicom.headers import HeaderError, routing_headers
from dicom.net import (
    DEFAULT_MAX_PDU,
    MODALITY_WORKLIST_FIND,
    UNCOMPRESSED,
    AssociationServer,
    check_ae_title,
    received_file,
    run_in_loop,
    storage_contexts,
    verification_context,
)
from dicom.studies import Instance, StudyTracker
from gateway.allowlist import parse_networks
from gateway.config import EndpointField, ListenerBase
from gateway.envelope import Envelope
from gateway.errors import DiskFullError, JournalError
from gateway.interfaces import Intake
from gateway.registry import PluginContext, Registry
from gateway.tls import TlsSettings

log = logging.getLogger(__name__)

AeTitle = Annotated[str, AfterValidator(check_ae_title)]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 table B.2-1: refused, out of resources
CANNOT_UNDERSTAND = 0xC000  # PS3.4 table B.2-1: error, cannot understand
PENDING = 0xFF00  # PS3.4 table K.4-1 (C-FIND): matches are continuing
CANCELLED = 0xFE00
FIND_UNABLE = 0xC001  # PS3.4 table K.4-1: unable to process (0xCxxx)
WORKLIST_SERVICE = "dicom.worklist"
NOTES_MAX = 100_000  # instances noted but not yet written to the study store
MARKED_MEMORY = 4096  # accessions recently told to the worklist
MARK_AGAIN_S = 600.0


class ScpSettings(ListenerBase):
    """``allowed_calling_aes`` / ``allowed_ips`` empty = anyone; ``max_pdu`` 0 = no limit;
    ``study_quiet_s`` null = no study grouping."""

    type: Literal["dicom-scp"]
    ae_title: AeTitle
    listen: EndpointField
    allowed_calling_aes: tuple[AeTitle, ...] = ()
    allowed_ips: tuple[str, ...] = ()
    require_called_ae: bool = False
    maximum_associations: int = Field(default=25, ge=1, le=1000)
    max_pdu: int = Field(default=DEFAULT_MAX_PDU, ge=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    accept_timeout_s: float = Field(default=30.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    study_quiet_s: float | None = Field(default=60.0, gt=0)
    spool_from_kb: int = Field(default=spool.THRESHOLD // 1024, ge=0)  # 0 = off (dicom.spool)
    worklist: bool = False
    tls: TlsSettings | None = None  # set: TLS only on this port (docs/security.md)

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _pdu(self) -> ScpSettings:
        if 0 < self.max_pdu < 4096:
            raise ValueError("max_pdu must be 0 (no limit) or at least 4096")
        return self


class WorklistStore(Protocol):
    """What the SCP needs of the worklist (provided by :mod:`dicom.worklist`).

    ``find`` is called from pynetdicom's association threads, possibly several at
    once; it must not touch the event loop. ``mark_received`` is called on the
    event loop (a coroutine function is awaited; a plain function runs in a thread).
    """

    def find(self, identifier: Dataset) -> Iterator[Dataset]: ...


@dataclass
class _Session:
    peer: str
    started_at: float
    calling_ae: str = ""
    called_ae: str = ""
    files: int = 0
    bytes: int = 0
    errors: int = 0
    accepted: bool = False
    aborted: bool = False
    released: bool = False
    rejected: str = ""
    statuses: dict[str, int] = field(default_factory=dict)

    def details(self, ended_at: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protocol": "dicom",
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "files": self.files,
            "bytes": self.bytes,
            "duration_s": round(ended_at - self.started_at, 3),
            "errors": self.errors,
            "aborted": self.aborted,
            "released": self.released,
        }
        if self.rejected:
            out["rejected"] = self.rejected
        if self.statuses:
            out["failures"] = self.statuses
        return out


class DicomScp:
    """The ``dicom-scp`` listener (an async context manager, see gateway.interfaces)."""

    def __init__(self, cfg: ScpSettings, intake: Intake, ctx: PluginContext) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.intake = intake
        self.ctx = ctx
        self.port = 0
        self._networks = parse_networks(cfg.allowed_ips)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: AssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sessions: dict[Association, _Session] = {}
        self._finished: weakref.WeakSet[Association] = weakref.WeakSet()
        self._inflight = 0
        self._bookkeeping: set[concurrent.futures.Future[Any]] = set()
        self._notes: list[Instance] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._studies: StudyTracker | None = None
        self._worklist: WorklistStore | None = None
        self._marked: OrderedDict[str, float] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> DicomScp:
        tls = self.cfg.tls
        tls_context = (
            tls.server_context(self.ctx.config_dir, where=f"listener {self.id}: tls")
            if tls is not None
            else None
        )
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._worklist = self._find_worklist()
        if self.cfg.study_quiet_s is not None:
            self._studies = await StudyTracker(
                self.id, self.ctx.state_dir, self.cfg.study_quiet_s, self.intake
            ).open()
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.maximum_associations
        ae.maximum_pdu_size = self.cfg.max_pdu
        ae.network_timeout = self.cfg.network_timeout_s
        ae.acse_timeout = self.cfg.acse_timeout_s
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        ae.require_calling_aet = list(self.cfg.allowed_calling_aes)
        ae.require_called_aet = self.cfg.require_called_ae
        if self.cfg.spool_from_kb:
            spool.enable(ae, self.intake.spool_dir(), self.cfg.spool_from_kb * 1024)
        contexts = [verification_context(), *storage_contexts()]
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.cfg.worklist:
            contexts.append(build_context(MODALITY_WORKLIST_FIND, list(UNCOMPRESSED)))
            handlers.append((evt.EVT_C_FIND, self._on_find))
        try:
            server = ae.make_server(
                (self.cfg.listen.host, self.cfg.listen.port),
                ae_title=self.cfg.ae_title,
                contexts=contexts,
                evt_handlers=handlers,
                server_class=AssociationServer,
                allowed_networks=self._networks,
                on_refused=self._on_refused_ip,
                tls_context=tls_context,
                handshake_timeout_s=self.cfg.acse_timeout_s,
                on_tls_failed=self._on_tls_failed,
            )
            assert isinstance(server, AssociationServer)
        except BaseException:
            if self._studies is not None:
                await self._studies.close()
            raise
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"dicom-scp:{self.id}",
            daemon=True,
        )
        self._thread.start()
        self._task = asyncio.create_task(self._housekeeping(), name=f"dicom-scp:{self.id}:after")
        log.info(
            "dicom.listening listener=%s ae=%s address=%s:%d max_associations=%d max_pdu=%d%s",
            self.id,
            self.cfg.ae_title,
            self.cfg.listen.host,
            self.port,
            self.cfg.maximum_associations,
            self.cfg.max_pdu,
            " tls" if tls_context is not None else "",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop accepting connections; let running associations finish for up to
        ``drain_timeout_s`` (stores in flight always finish), abort the rest; write
        what housekeeping still holds; close."""
        server = self._server
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            await _poll(lambda: not self._active(server), self.cfg.drain_timeout_s)
            for assoc in self._active(server):
                log.warning("dicom.drain_abort listener=%s peer=%s", self.id, self._peer(assoc))
                await asyncio.to_thread(assoc.abort)
            await _poll(lambda: not self._inflight, self.cfg.accept_timeout_s + 5)
            self._finish_sessions(force=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self._bookkeeping:
            await asyncio.wait(
                [asyncio.wrap_future(f) for f in list(self._bookkeeping)], timeout=5.0
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._flush_notes()
        if self._studies is not None:
            await self._studies.close()
        log.info("dicom.closed listener=%s", self.id)

    @staticmethod
    def _active(server: AssociationServer) -> list[Association]:
        return [a for a in server.active_associations if a.is_alive()]

    def _find_worklist(self) -> WorklistStore | None:
        store = self.ctx.services.get(WORKLIST_SERVICE)
        if store is None and self.cfg.worklist:
            try:
                from dicom.worklist import worklist_store  # noqa: PLC0415
            except ImportError as err:
                raise RuntimeError(
                    f"listener {self.id}: worklist: true needs the dicom worklist ({err})"
                ) from err
            store = worklist_store(self.ctx)
        return store

    # -- association bookkeeping (pynetdicom threads) ---------------------------------------

    def _session(self, assoc: Association) -> _Session:
        """The association's session, opened on first use; events that come after it
        was recorded (pynetdicom may signal an abort after the connection closed) get
        a detached one, so one association is recorded once."""
        with self._lock:
            session = self._sessions.get(assoc)
            if session is None:
                session = _Session(self._peer(assoc), time.time())
                if assoc not in self._finished:
                    self._sessions[assoc] = session
            return session

    @staticmethod
    def _peer(assoc: Association) -> str:
        info = assoc.requestor.address_info
        return f"{info.address}:{info.port}" if info is not None else "?"

    def _on_conn_open(self, event: Event) -> None:
        self._session(event.assoc)

    def _on_requested(self, event: Event) -> None:
        session = self._session(event.assoc)
        primitive = event.assoc.requestor.primitive
        if primitive is not None:
            session.calling_ae = str(primitive.calling_ae_title).strip()
            session.called_ae = str(primitive.called_ae_title).strip()

    def _on_accepted(self, event: Event) -> None:
        session = self._session(event.assoc)
        session.accepted = True
        log.info(
            "dicom.association listener=%s peer=%s calling_ae=%s called_ae=%s",
            self.id,
            session.peer,
            session.calling_ae,
            session.called_ae,
        )

    def _on_rejected(self, event: Event) -> None:
        session = self._session(event.assoc)
        allowed = self.cfg.allowed_calling_aes
        if allowed and session.calling_ae not in allowed:
            session.rejected, reason = "calling AE not allowed", "association-calling-ae"
        elif self.cfg.require_called_ae and session.called_ae != self.cfg.ae_title:
            session.rejected, reason = "called AE is not ours", "association-called-ae"
        else:
            session.rejected, reason = "too many associations", "association-limit"
        self.ctx.metrics.rejected(self.id, reason)
        log.warning(
            "dicom.rejected listener=%s peer=%s calling_ae=%s reason=%s",
            self.id,
            session.peer,
            session.calling_ae,
            session.rejected,
        )

    def _on_released(self, event: Event) -> None:
        self._session(event.assoc).released = True

    def _on_aborted(self, event: Event) -> None:
        self._session(event.assoc).aborted = True

    def _on_conn_close(self, event: Event) -> None:
        spool.abandon(event.assoc)  # a data set cut off mid-way: its spool file goes now
        self._finish(event.assoc)

    def _finish(self, assoc: Association) -> None:
        with self._lock:
            session = self._sessions.pop(assoc, None)
            self._finished.add(assoc)
        if session is None:
            return
        if session.accepted and not session.released:
            session.aborted = True
        ended = time.time()
        log.info(
            "dicom.association_end listener=%s peer=%s calling_ae=%s files=%d bytes=%d errors=%d%s",
            self.id,
            session.peer,
            session.calling_ae,
            session.files,
            session.bytes,
            session.errors,
            " aborted" if session.aborted else "",
        )
        self._record(session.peer, session.started_at, ended, session.details(ended))

    def _finish_sessions(self, *, force: bool = False) -> None:
        """Record associations whose thread ended without a connection-closed event."""
        with self._lock:
            done = [
                a for a in self._sessions if force or (a.ident is not None and not a.is_alive())
            ]
        for assoc in done:
            self._finish(assoc)

    def _record(self, peer: str, started: float, ended: float, details: dict[str, Any]) -> None:
        """Journal a session record without waiting (from any thread, the loop's included)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self.intake.record_session(self.id, peer, started, ended, details), self._loop
        )
        with self._lock:
            self._bookkeeping.add(future)
        future.add_done_callback(self._recorded)

    def _recorded(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._bookkeeping.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error(
                "dicom.session_not_recorded listener=%s error=%r", self.id, future.exception()
            )

    def _on_refused_ip(self, host: str) -> None:
        self.ctx.metrics.rejected(self.id, "association-ip")
        log.warning("dicom.refused listener=%s peer=%s reason=address not allowed", self.id, host)
        now = time.time()
        self._record(host, now, now, {"protocol": "dicom", "rejected": "address not allowed"})

    def _on_tls_failed(self, host: str, reason: str) -> None:
        self.ctx.metrics.rejected(self.id, "association-tls")
        log.warning("dicom.refused listener=%s peer=%s reason=%s", self.id, host, reason)
        now = time.time()
        self._record(host, now, now, {"protocol": "dicom", "rejected": reason})

    # -- DIMSE handlers (pynetdicom threads) --------------------------------------------

    def _on_echo(self, event: Event) -> int:
        return SUCCESS

    def _on_store(self, event: Event) -> int:
        with self._lock:
            self._inflight += 1
        try:
            return self._store(event)
        except Exception:
            log.exception("dicom.store_failed listener=%s", self.id)
            return OUT_OF_RESOURCES
        finally:
            spool.discard(event)  # a spool not committed into the journal: not kept
            with self._lock:
                self._inflight -= 1

    def _store(self, event: Event) -> int:
        assert self._loop is not None
        session = self._session(event.assoc)
        data = received_file(event)
        written = spool.spooled(event, data)  # already on disk, or None
        timeout = self.cfg.accept_timeout_s
        try:
            headers = routing_headers(data)
        except HeaderError as err:
            session.errors += 1
            return self._refuse(session, data, f"unreadable DICOM header: {err}", timeout)
        sop_uid = headers.get("SOPInstanceUID", "")
        if not sop_uid:
            session.errors += 1
            return self._refuse(session, data, "no SOP Instance UID in the data set", timeout)
        headers["calling_ae"] = session.calling_ae
        headers["called_ae"] = session.called_ae
        headers["peer"] = session.peer.rsplit(":", 1)[0]
        envelope = Envelope(
            kind="dicom",
            source=self.id,
            body=data,
            headers=headers,
            idem_key=f"dicom:{sop_uid}",
            as_file=True,
        )
        try:
            # the file is written in this thread (or was, by the DUL thread, as it arrived)
            envelope = self.intake.stage(envelope, written.commit if written else None)
            accepted = run_in_loop(self.intake.accept(envelope), self._loop, timeout)
        except (JournalError, TimeoutError) as err:
            session.errors += 1
            session.statuses["0xA700"] = session.statuses.get("0xA700", 0) + 1
            self.ctx.metrics.rejected(self.id, "not-stored")
            log.error(
                "dicom.not_stored listener=%s calling_ae=%s sop=%s status=0xA700 error=%s%s",
                self.id,
                session.calling_ae,
                sop_uid,
                err or type(err).__name__,
                " (disk full)" if isinstance(err, DiskFullError) else "",
            )
            return OUT_OF_RESOURCES
        session.files += 1
        session.bytes += len(data)
        log.debug(
            "dicom.stored listener=%s sop=%s envelope=%s%s",
            self.id,
            sop_uid,
            accepted.id,
            " duplicate" if accepted.duplicate_of else "",
        )
        study_uid = headers.get("StudyInstanceUID", "")
        if study_uid and not accepted.duplicate_of:
            note = Instance(
                source=self.id,
                study_uid=study_uid,
                sop_uid=sop_uid,
                accession=headers.get("AccessionNumber", ""),
                modality=headers.get("Modality", ""),
                calling_ae=session.calling_ae,
                at=time.time(),
            )
            try:
                self._loop.call_soon_threadsafe(self._note, note)
            except RuntimeError:  # the loop is closing: the instance is journaled anyway
                log.warning("dicom.note_lost listener=%s sop=%s", self.id, sop_uid)
        return SUCCESS

    def _refuse(self, session: _Session, data: bytes, reason: str, timeout: float) -> int:
        """Quarantine what could not be understood and answer 0xC000 (0xA700 when even
        the quarantine cannot be written: then nothing of it was kept)."""
        assert self._loop is not None
        log.warning(
            "dicom.unreadable listener=%s peer=%s calling_ae=%s size=%d reason=%s",
            self.id,
            session.peer,
            session.calling_ae,
            len(data),
            reason,
        )
        try:
            run_in_loop(
                self.intake.quarantine(self.id, data, reason, session.peer, len(data)),
                self._loop,
                timeout,
            )
        except (JournalError, TimeoutError) as err:
            log.error("dicom.quarantine_failed listener=%s error=%s", self.id, err)
            return OUT_OF_RESOURCES
        session.statuses["0xC000"] = session.statuses.get("0xC000", 0) + 1
        return CANNOT_UNDERSTAND

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        """Modality worklist C-FIND (PS3.4 K.6.1): one pending response per item,
        C-CANCEL checked between them."""
        store = self._worklist
        session = self._session(event.assoc)
        if store is None:
            yield FIND_UNABLE, None
            return
        try:
            identifier = event.identifier
        except Exception as err:  # noqa: BLE001 - an undecodable identifier is the peer's fault
            session.errors += 1
            log.warning("dicom.find_bad_identifier listener=%s error=%s", self.id, err)
            yield CANNOT_UNDERSTAND, None
            return
        matches = 0
        try:
            for item in store.find(identifier):
                if event.is_cancelled:
                    log.info("dicom.find_cancelled listener=%s after=%d", self.id, matches)
                    yield CANCELLED, None
                    return
                matches += 1
                yield PENDING, item
        except Exception:
            session.errors += 1
            log.exception("dicom.find_failed listener=%s", self.id)
            yield FIND_UNABLE, None
            return
        log.info(
            "dicom.find listener=%s calling_ae=%s matches=%d", self.id, session.calling_ae, matches
        )
        yield SUCCESS, None

    # -- after the ACK (event loop) --------------------------------------------------------

    def _note(self, note: Instance) -> None:
        if len(self._notes) >= NOTES_MAX:
            dropped = self._notes.pop(0)
            log.error("dicom.note_dropped listener=%s study=%s", self.id, dropped.study_uid)
        self._notes.append(note)
        if self._wake is not None:
            self._wake.set()

    def _interval(self) -> float:
        quiet = self.cfg.study_quiet_s
        return 1.0 if quiet is None else min(1.0, max(0.05, quiet / 4))

    async def _housekeeping(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval())
            self._wake.clear()
            try:
                await self._flush_notes()
                if self._studies is not None:
                    await self._studies.complete_due()
            except Exception:
                log.exception("dicom.housekeeping_failed listener=%s", self.id)
            self._finish_sessions()

    async def _flush_notes(self) -> None:
        notes, self._notes = self._notes, []
        if not notes:
            return
        if self._studies is not None:
            try:
                await self._studies.record(notes)
            except Exception:
                self._notes[:0] = notes  # try again next round
                raise
        if self._worklist is not None:
            for accession in dict.fromkeys(n.accession for n in notes if n.accession):
                await self._mark_received(accession)

    async def _mark_received(self, accession: str) -> None:
        """Tell the worklist, once per accession per ``MARK_AGAIN_S`` (one call per study,
        not per instance, yet an order that arrives after its images is still marked)."""
        told = self._marked.get(accession)
        if told is not None and time.monotonic() - told < MARK_AGAIN_S:
            return
        mark = getattr(self._worklist, "mark_received", None)
        if mark is None:
            return
        try:
            if inspect.iscoroutinefunction(mark):
                result = await mark(accession)
            else:
                result = await asyncio.to_thread(mark, accession)
                if inspect.isawaitable(result):
                    result = await result
        except Exception:
            log.exception("dicom.worklist_mark_failed listener=%s", self.id)
            return
        log.debug("dicom.worklist_marked listener=%s steps=%s", self.id, result)
        self._marked[accession] = time.monotonic()
        self._marked.move_to_end(accession)
        while len(self._marked) > MARKED_MEMORY:
            self._marked.popitem(last=False)


async def _poll(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    """Wait until ``done()`` (state changed by pynetdicom threads) or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if done() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval_s)


def register(registry: Registry) -> None:
    def factory(cfg: ScpSettings, intake: Intake, ctx: PluginContext) -> DicomScp:
        return DicomScp(cfg, intake, ctx)

    registry.listener(
        "dicom-scp",
        ScpSettings,
        factory,
        "receives DICOM (C-ECHO, C-STORE, worklist C-FIND), answers after the journal commit",
    )
    registry.command("dicom", cli.setup)
