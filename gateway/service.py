"""The service: composes journal, destinations, listeners and endpoints; drains on stop.

Start order: journal, HTTP endpoints, delivery pumps, listeners, then READY=1.
Stop order (aiohttp's web_runner is the model): STOPPING=1, close listeners
(stop accepting, finish messages in flight), stop delivery within the grace
period, close endpoints, close the journal. A failure to start any part stops
the whole start: the service never half-starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog
from gateway.config import GatewayConfig, route_key
from gateway.delivery import DestinationPump
from gateway.envelope import Envelope
from gateway.events import EventBus, ids_from_headers
from gateway.health import HttpEndpoints, http_token
from gateway.interfaces import Accepted
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.registry import PluginContext, Registry
from gateway.router import Router
from gateway.sdnotify import Notifier
from gateway.status import status_doc
from gateway.steps import StepChain
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 20.0


class Gateway:
    """One running gateway. Implements :class:`gateway.interfaces.Intake` for listeners."""

    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        *,
        notifier: Notifier | None = None,
        drain_grace_s: float = DRAIN_GRACE_S,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.notifier = notifier or Notifier()
        self.drain_grace_s = drain_grace_s
        self.metrics = Metrics()
        self.events = EventBus()
        self.telemetry: Telemetry | None = None  # MQTT, when configured
        self.journal = Journal(
            cfg.state_dir,
            inline_max_bytes=cfg.journal.inline_max_bytes,
            min_free_mb=cfg.journal.min_free_mb,
            integrity_check=cfg.journal.integrity_check,
        )
        self.router = Router(cfg.routes)
        self.pumps: dict[str, DestinationPump] = {}
        self.listeners: dict[str, Any] = {}
        self.http: HttpEndpoints | None = None
        self.ready = asyncio.Event()
        self.stopping = False
        self.started_at = time.time()
        self.last_message_at: dict[str, float] = {}  # listener id -> time (status page)

    # -- Intake -------------------------------------------------------------------------

    async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> Accepted:
        """Journal ``envelope`` for the routed destinations (or the ones given, for
        what a route's steps produce; ``[]`` keeps it for the record only, e.g. an
        analyzer's host query) and wake their delivery pumps."""
        routed = destinations is None
        if destinations is None:
            destinations = self.router.destinations(envelope)
        accepted = await self.journal.accept(envelope, destinations)
        if accepted.duplicate_of:
            self.metrics.duplicate(envelope.source)
            self._emit_intake("message.duplicate", envelope, outcome="duplicate")
            log.info(
                "message.duplicate source=%s envelope=%s key=%s",
                envelope.source,
                accepted.duplicate_of,
                envelope.idem_key,
            )
            return accepted
        if routed:  # what steps derive is not counted again as received
            self.metrics.received(envelope.source)
            self.last_message_at[envelope.source] = time.time()
            self._emit_intake("message.received", envelope, detail={"to": destinations})
        if not destinations and routed:
            log.warning(
                "message.unrouted source=%s kind=%s envelope=%s",
                envelope.source,
                envelope.kind,
                envelope.id,
            )
        for dest in destinations:
            self.pumps[dest].notify()
        return accepted

    def _emit_intake(self, event: str, envelope: Envelope, **fields: Any) -> None:
        headers = envelope.headers
        self.events.emit(
            event,
            source=envelope.source,
            envelope=envelope.id,
            kind=envelope.kind,
            peer=headers.get("calling_ae") or headers.get("peer", ""),
            ids=ids_from_headers(headers),
            **fields,
        )

    def stage(self, envelope: Envelope, written: Callable[[Path], str] | None = None) -> Envelope:
        return self.journal.stage(envelope, written)

    def spool_dir(self) -> Path:
        return self.journal.spool_dir

    async def forward(self, seq: int, destinations: list[str]) -> None:
        """Deliver an envelope already journaled to more destinations (steps pass-through)."""
        await self.journal.add_deliveries(seq, destinations)
        for dest in destinations:
            self.pumps[dest].notify()

    async def record_session(
        self, source: str, peer: str, started_at: float, ended_at: float, details: dict[str, Any]
    ) -> None:
        await self.journal.record_session(source, peer, started_at, ended_at, details)
        self.events.emit(
            "session.ended",
            at=ended_at,
            source=source,
            peer=peer,
            outcome="failed" if details.get("errors") else "ok",
            detail={"started_at": started_at, **details},
        )

    async def quarantine(
        self, source: str, raw: bytes, reason: str, peer: str = "", size: int | None = None
    ) -> int:
        self.metrics.rejected(source, reason.split(":", 1)[0][:40])
        qid = await self.journal.quarantine(source, raw, reason, peer, size)
        self.events.emit(
            "message.quarantined",
            source=source,
            peer=peer,
            outcome="refused",
            detail={"quarantine_id": qid, "reason": reason[:200]},
        )
        log.warning(
            "message.quarantined source=%s peer=%s id=%d size=%d reason=%r",
            source,
            peer,
            qid,
            len(raw) if size is None else size,
            reason,
        )
        return qid

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain and return."""
        ctx = PluginContext(
            self.cfg.site.id,
            str(self.cfg.state_dir),
            self.metrics,
            config_dir=config_dir(self.cfg.source_file),
            events=self.events,
        )
        async with AsyncExitStack() as base:
            await base.enter_async_context(self.journal)
            if self.cfg.audit.enabled:  # closed after the pumps drain, before the journal
                audit = AuditLog(
                    self.cfg.audit, self.cfg.site.id, self.cfg.state_dir, config_dir=ctx.config_dir
                )
                self.events.subscribe(audit.on_event)
                await base.enter_async_context(audit)
            if self.cfg.mqtt is not None:
                self.telemetry = telemetry = Telemetry(
                    self.cfg.mqtt,
                    self.cfg.site.id,
                    self.cfg.state_dir,
                    lambda: status_doc(self),
                    config_dir=ctx.config_dir,
                )
                self.events.subscribe(telemetry.on_event)
                await base.enter_async_context(telemetry)
            self.metrics.watch_queue(self.journal.depth, self.journal.oldest_pending, time.time)
            if self.cfg.http.listen is not None:
                self.http = HttpEndpoints(
                    self.cfg.http.listen,
                    self.health,
                    self.metrics.exposition,
                    lambda: status_doc(self),
                    token=http_token(self.cfg.http, ctx.config_dir),
                )
                await base.enter_async_context(self.http)
            for dcfg in self.cfg.destinations:
                destination = self.registry.destinations[dcfg.type].factory(dcfg, ctx)
                self.pumps[dcfg.id] = DestinationPump(
                    destination, dcfg.delivery, self.journal, self.metrics, events=self.events
                )
            for i, route in enumerate(self.cfg.routes):
                if route.steps:
                    key = route_key(route, i)
                    step_ctx = replace(ctx, route=key)
                    chain = StepChain(
                        key,
                        [
                            self.registry.steps[s.name].factory(s.params, step_ctx)
                            for s in route.steps
                        ],
                        list(route.to),
                        self,
                        notify=list(route.notify),
                    )
                    self.pumps[chain.id] = DestinationPump(
                        chain, route.delivery, self.journal, self.metrics
                    )
            async with asyncio.TaskGroup() as tg:
                for pump in self.pumps.values():
                    pump.start(tg)
                async with AsyncExitStack() as inputs:
                    for lcfg in self.cfg.listeners:
                        listener = self.registry.listeners[lcfg.type].factory(lcfg, self, ctx)
                        self.listeners[lcfg.id] = await inputs.enter_async_context(listener)
                    self.ready.set()
                    self.notifier.notify("READY=1", "STATUS=serving")
                    log.info(
                        "gateway.ready site=%s listeners=%d destinations=%d",
                        self.cfg.site.id,
                        len(self.listeners),
                        len(self.pumps),
                    )
                    watchdog = tg.create_task(self._watchdog(), name="watchdog")
                    retention = tg.create_task(
                        self.journal.retain(self.cfg.journal.retention), name="retention"
                    )
                    await stop.wait()
                    self.stopping = True
                    self.notifier.notify("STOPPING=1", "STATUS=draining")
                    log.info("gateway.stopping")
                # listeners are closed here: nothing new comes in
                await asyncio.gather(*(p.stop(self.drain_grace_s) for p in self.pumps.values()))
                watchdog.cancel()
                retention.cancel()
            close_services(ctx.services)
        log.info("gateway.stopped")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        while True:
            if self.journal.writer_alive:
                self.notifier.notify("WATCHDOG=1")
            else:
                log.error("gateway.watchdog journal writer thread is gone: not petting")
            await asyncio.sleep(interval)

    # -- health -------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        depth = self.journal.depth()
        oldest = self.journal.oldest_pending()
        now = time.time()
        destinations = {}
        degraded = False
        for dest_id, pump in self.pumps.items():
            counts = depth.get(dest_id, {})
            breaker = pump.breaker.state
            degraded |= breaker != "closed" or counts.get("dead", 0) > 0
            destinations[dest_id] = {
                "breaker": breaker,
                "pending": counts.get("pending", 0),
                "dead": counts.get("dead", 0),
                "delivered": counts.get("done", 0),
                "oldest_pending_s": round(now - oldest[dest_id], 1) if dest_id in oldest else None,
                "last_error": pump.state.last_error or None,
                "last_success_at": _iso(pump.state.last_success_at),
            }
        status = "stopping" if self.stopping else "degraded" if degraded else "ok"
        doc = {
            "status": status,
            "site": self.cfg.site.id,
            "uptime_s": round(now - self.started_at, 1),
            "listeners": {k: type(v).__name__ for k, v in self.listeners.items()},
            "destinations": destinations,
        }
        code = 200 if self.ready.is_set() and not self.stopping else 503
        return code, doc


def close_services(services: dict[str, Any]) -> None:
    """Close what plugins shared (stores, model sessions) once nothing uses them."""
    for name, service in services.items():
        close = getattr(service, "close", None)
        if callable(close) and not asyncio.iscoroutinefunction(close):
            try:
                close()
            except Exception:
                log.exception("gateway.close_failed service=%s", name)


def config_dir(source_file: str) -> str:
    """The folder of the config file ("" when it came from a string)."""
    return str(Path(source_file).parent) if source_file and source_file != "<string>" else ""


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def serve(cfg: GatewayConfig, registry: Registry) -> None:
    """Run until SIGTERM or SIGINT (the CLI's ``medgw run``)."""
    import signal  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await Gateway(cfg, registry).run(stop)
