"""The asyncio session of one analyzer line: link layer, records, journal, host queries.

It is the only code that writes to the line. Bytes from the line go through
:class:`AstmLink` (E1381) and :class:`MessageAssembler` (E1394); a complete message
(H..L) is journaled, and only then is its last frame ACKed (a journal failure is
a NAK: the instrument sends again). A host query is answered from the lab orders
table as soon as the instrument hands the line back (its EOT); order downloads
go out when the line is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from drivers.astm import answers
from drivers.astm.codec import (
    MAX_RECORD_BYTES,
    AssembledMessage,
    AssemblyError,
    MessageAssembler,
    Record,
)
from drivers.astm.link import (
    AstmLink,
    ContentionLost,
    FrameRejected,
    Junk,
    LinkSettings,
    LinkState,
    MessageSent,
    SendFailed,
    TextReceived,
    TransferEnded,
    TransferStarted,
)
from drivers.astm.settings import AstmListenerSettings
from drivers.lab.astm_results import first, reports_from_records
from drivers.lab.order_store import LabOrderStore
from drivers.transports import Line
from gateway.envelope import Envelope
from gateway.errors import JournalError
from gateway.interfaces import Intake
from gateway.lab import LAB_RESULT_KIND, message_fingerprint

log = logging.getLogger(__name__)

READ_QUEUE = 64  # chunks buffered from the line before reading pauses
JUNK_KEEP = 64 * 1024  # of one run of line noise, kept in the quarantine
# stray link controls and line ends alone are not worth a quarantine row
_QUIET_JUNK = bytes([0x04, 0x05, 0x06, 0x15, 0x0D, 0x0A])
# a text completes a message only if it holds the start of an L record (instruments end
# ETX texts at record boundaries): before other texts the open message need not be kept
_L_RECORD = re.compile(rb"(?:^|[\r\n])L")


def link_settings(cfg: AstmListenerSettings) -> LinkSettings:
    relax = cfg.effective_relaxations
    return LinkSettings(
        frame_size=cfg.effective_frame_size,
        allow_bare_lf=relax.bare_lf,
        allow_missing_number=relax.missing_frame_number,
        contention_wait_s=cfg.contention_wait_s,
        # the link's bound only protects memory; the record layer gives the clear reason
        max_text_bytes=cfg.max_message_bytes + 65_536,
    )


@dataclass
class SessionStats:
    messages: int = 0
    results: int = 0
    queries: int = 0
    answers: int = 0
    downloads: int = 0
    rejected_frames: int = 0
    quarantined: int = 0
    errors: list[str] = field(default_factory=list)


class AstmSession:
    def __init__(
        self,
        line: Line,
        cfg: AstmListenerSettings,
        intake: Intake,
        store: LabOrderStore | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.line = line
        self.cfg = cfg
        self.intake = intake
        self.store = store
        self.clock = clock
        self.link = AstmLink(link_settings(cfg))
        # records are decoded in the line's encoding, the one the envelope's charset names,
        # and messages bounded as configured: what breaks either is refused here (NAK,
        # quarantine), never ACKed and then found unreadable by the route steps
        self.assembler = MessageAssembler(
            encoding=cfg.effective_encoding,
            max_record_bytes=min(MAX_RECORD_BYTES, cfg.max_message_bytes),
            max_message_bytes=cfg.max_message_bytes,
        )
        self.stats = SessionStats()
        self._answers: list[tuple[bytes, object]] = []  # to send once the line is ours
        self._download_busy = False
        self._next_poll = 0.0
        self._quarantined: set[str] = set()
        self._junk = bytearray()  # bytes the link ignored since the last other event
        self._junk_size = 0
        self._started = time.time()

    async def run(self) -> None:
        """Serve the line until it is gone (or the task is cancelled)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(READ_QUEUE)
        reader = asyncio.create_task(self._read(queue), name=f"astm-read-{self.cfg.id}")
        try:
            while True:
                data = await self._next(queue)
                now = self.clock()
                if data is None:
                    events = self.link.tick(now)
                elif data == b"":
                    break
                else:
                    events = self.link.receive(data, now)
                await self._handle(events)
                await self._maybe_send()
                await self._flush()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            with contextlib.suppress(Exception):  # the journal may be closing
                await self._flush_junk()
            await self._record()

    async def _read(self, queue: asyncio.Queue[bytes]) -> None:
        while True:
            data = await self.line.read()
            await queue.put(data)
            if not data:
                return

    async def _next(self, queue: asyncio.Queue[bytes]) -> bytes | None:
        """Next chunk from the line, or None when a timer or an order poll is due."""
        deadlines = [d for d in (self.link.next_deadline(), self._poll_deadline()) if d]
        if not deadlines:
            return await queue.get()
        wait = max(0.0, min(deadlines) - self.clock())
        try:
            async with asyncio.timeout(wait):
                return await queue.get()
        except TimeoutError:
            return None

    def _poll_deadline(self) -> float | None:
        """When to look for orders to download: only while the line is idle (a transfer
        in progress wakes the loop by itself)."""
        if self.cfg.effective_orders != "download" or self.store is None:
            return None
        if self._download_busy or self.link.state is not LinkState.IDLE or self.link.queued:
            return None
        return self._next_poll or self.clock()

    async def _flush(self) -> None:
        data = self.link.data_to_send()
        if data:
            await self.line.write(data)

    # -- link events --------------------------------------------------------------------

    async def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Junk):
                self._note_junk(event.data)
                continue
            await self._flush_junk()
            if isinstance(event, TextReceived):
                ok = await self._text(event.text)
                await self._flush_then(self.link.acknowledge(ok, self.clock()))
            elif isinstance(event, TransferEnded):
                await self._transfer_ended(event)
            elif isinstance(event, MessageSent):
                self._sent(event.ref)
            elif isinstance(event, SendFailed):
                self._send_failed(event.ref, event.reason)
            elif isinstance(event, FrameRejected):
                self.stats.rejected_frames += 1
                log.warning(
                    "astm.frame_rejected listener=%s peer=%s reason=%s",
                    self.cfg.id,
                    self.line.peer,
                    event.reason,
                )
            elif isinstance(event, ContentionLost):
                log.info("astm.contention listener=%s: the instrument goes first", self.cfg.id)
            elif isinstance(event, TransferStarted):
                log.debug("astm.transfer_started listener=%s", self.cfg.id)

    def _note_junk(self, data: bytes) -> None:
        self._junk += data[: max(0, JUNK_KEEP - len(self._junk))]
        self._junk_size += len(data)

    async def _flush_junk(self) -> None:
        """Bytes outside any frame are ignored (E1381 6.5.1.2) but not thrown away: a run
        of them, up to the next link event, is quarantined (stray controls alone are not)."""
        if not self._junk_size:
            return
        junk, size = bytes(self._junk), self._junk_size
        self._junk.clear()
        self._junk_size = 0
        if not junk.translate(None, _QUIET_JUNK):
            return
        log.warning(
            "astm.junk listener=%s peer=%s bytes=%d: outside any frame, ignored",
            self.cfg.id,
            self.line.peer,
            size,
        )
        await self._quarantine(junk, f"junk: {size} bytes outside any frame", size)

    async def _flush_then(self, events: list[Any]) -> None:
        await self._flush()
        await self._handle(events)

    async def _text(self, text: bytes) -> bool:
        """Feed one ETX-terminated text; True when it may be ACKed.

        A NAK makes the instrument send the same frame again (E1381 6.3.4.3). When the
        journal could not store a message this text completed, the message's earlier
        records are put back into the assembler, so that the repeated text (with one
        record per frame, only the L record) completes the message again."""
        before = self.assembler.pending if _L_RECORD.search(text) else b""
        ok = stored = True
        for item in self.assembler.feed(text):
            if isinstance(item, AssembledMessage):
                stored &= await self._message(item)
            else:
                ok = False
                await self._bad_input(item)
        if not stored:
            self.assembler.reset()
            self.assembler.feed(before)  # complete records of an open message: no events
            return False
        return ok

    async def _transfer_ended(self, event: TransferEnded) -> None:
        partial = self.assembler.reset() + event.discarded
        if partial.strip():
            await self._quarantine(
                partial, f"incomplete: transfer ended before the L record ({event.reason})"
            )
        if event.aborted:
            log.warning(
                "astm.transfer_aborted listener=%s peer=%s reason=%s",
                self.cfg.id,
                self.line.peer,
                event.reason,
            )
        for text, ref in self._answers:
            await self._handle(self.link.send(text, ref, self.clock()))
        self._answers.clear()

    # -- messages -----------------------------------------------------------------------

    async def _message(self, msg: AssembledMessage) -> bool:
        records = msg.records
        types = {r.type for r in records}
        self.stats.messages += 1
        if "Q" in types:
            envelopes = [self._envelope("astm", msg.raw, {"record": "Q"})]
        elif "R" in types:
            envelopes = self._result_envelopes(msg.raw, records)
        else:
            envelopes = [self._envelope("astm", msg.raw, {"record": "".join(sorted(types))})]
        for env in envelopes:
            try:  # a host query is kept for the record; it is answered here, not delivered
                accepted = await self.intake.accept(env, [] if "Q" in types else None)
            except JournalError as err:
                log.error("astm.not_stored listener=%s error=%s: NAK", self.cfg.id, err)
                self.stats.errors.append(f"journal: {err}")
                return False
            log.debug(
                "astm.accepted listener=%s kind=%s envelope=%s%s",
                self.cfg.id,
                env.kind,
                accepted.id,
                " duplicate" if accepted.duplicate_of else "",
            )
        if "Q" in types:  # answered once it is stored: a NAKed query comes again
            self._queue_answer(records)
        return True

    def _envelope(self, kind: str, raw: bytes, headers: dict[str, str]) -> Envelope:
        return Envelope(
            kind=kind,
            source=self.cfg.id,
            body=raw,
            headers={
                "protocol": "astm",
                "profile": self.cfg.profile.name,
                "charset": self.cfg.effective_encoding,
                **headers,
            },
        )

    def _result_envelopes(self, raw: bytes, records: list[Record]) -> list[Envelope]:
        """The message as received, keyed by its results. A message holding QC and
        patient specimens is journaled twice, byte-exact both times, with ``qc: "true"``
        and ``qc: "false"``: routes separate them and map-codes keeps, of each copy,
        the reports its header names, so no patient result lands among QC."""
        reports = reports_from_records(records, self.cfg.profile, self.cfg.id)
        self.stats.results += sum(len(r.results) for r in reports)
        kinds = sorted({r.qc for r in reports}) or [False]
        if len(kinds) > 1:
            log.info(
                "astm.mixed_qc listener=%s: QC and patient results in one message", self.cfg.id
            )
        out = []
        for qc in kinds:
            mine = [r for r in reports if r.qc == qc]
            key = f"lab:{self.cfg.id}:{message_fingerprint(mine)}" if mine else None
            env = self._envelope(
                LAB_RESULT_KIND, raw, {"qc": "true" if qc else "false", "instrument": self.cfg.id}
            )
            out.append(replace(env, idem_key=key, dedupe_on_key=key is not None))
        return out

    async def _bad_input(self, err: AssemblyError) -> None:
        self.stats.errors.append(err.reason)
        await self._quarantine(err.raw, f"bad records: {err.reason}")

    async def _quarantine(self, raw: bytes, reason: str, size: int | None = None) -> None:
        """Once per distinct input per session (the instrument resends what we NAK)."""
        digest = hashlib.sha256(raw).hexdigest()
        if digest in self._quarantined:
            return
        self._quarantined.add(digest)
        self.stats.quarantined += 1
        await self.intake.quarantine(self.cfg.id, raw, reason, self.line.peer, size)

    # -- host queries and downloads -----------------------------------------------------

    def _queue_answer(self, records: list[Record]) -> None:
        """E1394 section 12 / LIS02-A2 section 13: answer each Q with the orders held for
        its specimens (report type Q), or "no information" (termination code I)."""
        self.stats.queries += 1
        specimens: list[str] = []
        for rec in records:
            if rec.type != "Q":
                continue
            if rec.get("13.1").strip().upper() == "A":  # cancel last request
                continue
            sid = first({"Q": rec}, self.cfg.profile.astm.query_specimen)
            if sid and sid.upper() != "ALL":
                specimens.append(sid)
        orders = [o for s in specimens if self.store and (o := self.store.find(s))]
        text = answers.query_answer(
            specimens, orders, self.cfg.profile, encoding=self.cfg.effective_encoding
        )
        log.info(
            "astm.query listener=%s specimens=%d found=%d", self.cfg.id, len(specimens), len(orders)
        )
        self._answers.append((text, ("answer", tuple(specimens))))

    async def _maybe_send(self) -> None:
        if self._poll_deadline() is None or self._download_busy:
            return
        now = self.clock()
        if now < self._next_poll or self.link.state is not LinkState.IDLE or self.link.queued:
            return
        self._next_poll = now + self.cfg.download_poll_s
        assert self.store is not None
        orders = await asyncio.to_thread(self.store.not_downloaded, self.cfg.id)
        if not orders:
            return
        text = answers.download_message(
            orders, self.cfg.profile, encoding=self.cfg.effective_encoding
        )
        self._download_busy = True
        await self._handle(
            self.link.send(text, ("download", tuple(o.specimen_id for o in orders)), now)
        )

    def _sent(self, ref: object) -> None:
        if not isinstance(ref, tuple):
            return
        what, specimens = ref
        if what == "download":
            self._download_busy = False
            self.stats.downloads += len(specimens)
            if self.store is not None:
                self.store.mark_downloaded(self.cfg.id, specimens)
            log.info("astm.downloaded listener=%s orders=%d", self.cfg.id, len(specimens))
        else:
            self.stats.answers += 1

    def _send_failed(self, ref: object, reason: str) -> None:
        if isinstance(ref, tuple) and ref[0] == "download":
            self._download_busy = False  # retried at the next poll
        log.warning(
            "astm.send_failed listener=%s peer=%s what=%s reason=%s",
            self.cfg.id,
            self.line.peer,
            ref[0] if isinstance(ref, tuple) else ref,
            reason,
        )

    async def _record(self) -> None:
        s = self.stats
        details = {
            "messages": s.messages,
            "results": s.results,
            "queries": s.queries,
            "answers": s.answers,
            "downloads": s.downloads,
            "rejected_frames": s.rejected_frames,
            "quarantined": s.quarantined,
            "errors": s.errors[-10:],
        }
        with contextlib.suppress(Exception):
            await self.intake.record_session(
                self.cfg.id, self.line.peer, self._started, time.time(), details
            )
