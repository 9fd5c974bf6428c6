"""Ingest first: triage waits while other clinical traffic is coming in.

On a 2-core edge server a burst of chest X-rays being triaged slows the
receiving of everything else (a CT series, lab results) by 10-15 % even with
the worker processes at a lower CPU priority (bench/README.md, ``ai.py``):
the gateway's own share of triage (the SR, its journaling and forwarding) and
the workers' memory traffic compete with ingest. With ``yield_to_ingest_s`` a
triage run first waits until no message for *another* route has been received
for :data:`QUIET_S`, for at most that many seconds, then runs anyway.

Nothing clinical waits: the original image has already been forwarded (the
ai-triage step passes it on first); only its triage result comes later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.events import Event

QUIET_S = 1.0  # no other message for this long: ingest is idle
POLL_S = 0.1  # a wait shorter than this is not worth a log line


class IngestWatch:
    """Remembers when a message that does not go to ``own_route`` was last received.

    Fed by the gateway's event bus (``message.received``, whose ``detail.to`` lists
    the destinations a message was journaled for); kind ``event`` (a study's
    "complete" notice) is bookkeeping, not traffic.
    """

    def __init__(self, own_route: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.own_route = own_route
        self.clock = clock
        self.last_other = float("-inf")

    def on_event(self, event: Event) -> None:
        if event.event != "message.received" or event.kind == "event":
            return
        if self.own_route not in ((event.detail or {}).get("to") or ()):
            self.last_other = self.clock()

    def busy(self) -> bool:
        return self.clock() - self.last_other < QUIET_S

    async def wait_quiet(self, max_s: float) -> float:
        """Wait while ingest is busy, at most ``max_s``; the seconds waited."""
        started = self.clock()
        # a condition on time, not an event: sleep until the quiet period would be over
        while self.busy() and (left := max_s - (self.clock() - started)) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(self.last_other + QUIET_S - self.clock(), left) + 0.001)
        return self.clock() - started
