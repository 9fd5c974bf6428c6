"""The ``astm`` listener: one analyzer on a serial line or TCP, a session per open line."""

from __future__ import annotations

import logging
from types import TracebackType

from drivers.astm.session import AstmSession
from drivers.astm.settings import AstmListenerSettings
from drivers.lab.order_store import LabOrderStore, order_store
from drivers.transports import Line, Transport
from gateway.interfaces import Intake
from gateway.registry import PluginContext

log = logging.getLogger(__name__)


class AstmListener:
    def __init__(self, cfg: AstmListenerSettings, intake: Intake, ctx: PluginContext) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.intake = intake
        self.store: LabOrderStore | None = (
            order_store(ctx) if cfg.effective_orders != "none" else None
        )
        self.transport = Transport(cfg.transport, cfg.id, self._serve)
        self.sessions: set[AstmSession] = set()

    @property
    def port(self) -> int:
        """The bound port of a ``tcp_listen`` transport (0 otherwise)."""
        return int(getattr(self.transport, "port", 0) or 0)

    @property
    def connections(self) -> int:
        """Analyzer lines open now (for the status page)."""
        return len(self.transport.status().peers)

    async def __aenter__(self) -> AstmListener:
        await self.transport.__aenter__()
        log.info(
            "astm.started listener=%s profile=%s orders=%s",
            self.id,
            self.cfg.profile.name,
            self.cfg.effective_orders,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.transport.__aexit__(exc_type, exc, tb)

    async def _serve(self, line: Line) -> None:
        session = AstmSession(line, self.cfg, self.intake, self.store)
        self.sessions.add(session)
        log.info("astm.session_start listener=%s peer=%s", self.id, line.peer)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            s = session.stats
            log.info(
                "astm.session_end listener=%s peer=%s messages=%d results=%d queries=%d "
                "rejected_frames=%d quarantined=%d",
                self.id,
                line.peer,
                s.messages,
                s.results,
                s.queries,
                s.rejected_frames,
                s.quarantined,
            )
