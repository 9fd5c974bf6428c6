"""Route steps: small processing between the journal and the destinations.

A step is an object with ``async run(envelope) -> list[envelope]`` (ARCHITECTURE.md,
"Router and steps"): it may pass the envelope on (return it), produce new
envelopes (derived objects that point to their parent), or consume it (return
nothing, e.g. a worklist that stores an order). A route's steps run as one
chain, fed by the delivery machinery like a destination, so they are durable,
retried, ordered and resumed after a restart exactly like deliveries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from gateway.envelope import Envelope, StoredEnvelope

AnyEnvelope = Envelope | StoredEnvelope


class Step(Protocol):
    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]: ...


class Forwarder(Protocol):
    """What a chain needs from the service (implemented by gateway.service.Gateway)."""

    async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> Any: ...

    async def forward(self, seq: int, destinations: list[str]) -> None: ...


class StepChain:
    """A route's steps, seen by the delivery pumps as one destination (``steps:<key>``)."""

    wants_body = True

    def __init__(
        self,
        key: str,
        steps: list[Step],
        to: list[str],
        gateway: Forwarder,
        notify: list[str] | None = None,
    ) -> None:
        self.id = key
        self.steps = steps
        self.to = to
        self.notify = notify or []
        self.gateway = gateway

    def sender(self) -> StepChain:
        return self

    @property
    def forwards_first(self) -> bool:
        """Every step passes its input on unchanged (``passes_first = True``, e.g.
        ai-triage): the original goes to ``to`` before the steps run, so their work
        (a model's inference) never delays it."""
        return bool(self.steps) and all(getattr(s, "passes_first", False) for s in self.steps)

    async def send(self, envelope: StoredEnvelope) -> str:
        if self.forwards_first and self.to:
            await self.gateway.forward(envelope.seq, self.to)  # idempotent on a re-run
        items: list[AnyEnvelope] = [envelope]
        for step in self.steps:
            produced: list[AnyEnvelope] = []
            for item in items:
                produced.extend(await step.run(item))
            items = produced
        passed = any(item.id == envelope.id for item in items)
        new = [item for item in items if item.id != envelope.id]
        if passed and self.to and not self.forwards_first:
            await self.gateway.forward(envelope.seq, self.to)
        for n, item in enumerate(new):
            if isinstance(item, StoredEnvelope):
                raise TypeError(f"step returned a stored envelope that is not its input: {item.id}")
            derived = replace(
                item,
                parent_id=item.parent_id or envelope.id,
                # a re-run after a crash that produces the same bytes is not journaled twice
                idem_key=item.idem_key or f"{envelope.id}:{self.id}:{n}",
            )
            await self.gateway.accept(derived, self._destinations(item))
        return f"passed={int(passed)} new={len(new)}"

    def _destinations(self, item: AnyEnvelope) -> list[str] | None:
        """Where a derived envelope goes: ``to``; the route's ``notify`` when a step
        marks it ``notify: "true"``; the routing table (None) for ``route: "true"``
        (events any route may pick up, e.g. ``ai.flagged``)."""
        if item.headers.get("route") == "true":
            return None
        return self.notify if item.headers.get("notify") == "true" else self.to

    async def aclose(self) -> None:
        return None
