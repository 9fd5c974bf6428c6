"""Delivery: one worker pool per destination, fed from the journal until confirmed.

Each destination has a dispatcher that reads pending deliveries from the journal
in accept order and hands them to its workers through a bounded queue. A worker
owns one :class:`~gateway.interfaces.Sender` (one connection). Ordered
destinations have one worker that retries the head of the queue in place, so
nothing overtakes it. Unordered ones put a failed delivery back with its next
attempt time. Either way the delivery's state lives in the journal, so a
restart resumes where it stopped (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import DeliveryPolicy
from gateway.envelope import StoredEnvelope
from gateway.errors import PermanentError, TransientError
from gateway.events import EventBus, ids_from_headers
from gateway.interfaces import Destination, Sender
from gateway.journal import Journal, Pending
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

QUEUE_PER_WORKER = 32  # rows read ahead from the journal: fewer queries on the event loop
IDLE_POLL_S = 1.0  # picks up `medgw queue retry` and due retries without a wake-up
PROBE_POLL_S = 0.5  # workers waiting on a half-open probe re-check stop this often


def backoff_delay(attempts: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: within [d/2, d], d = initial * 2^(n-1)."""
    d: float = min(max_s, initial_s * 2.0 ** max(0, min(attempts - 1, 62)))
    return d * (0.5 + rng.random() / 2)


@dataclass
class CircuitBreaker:
    """Stops hammering a destination that keeps failing (closed -> open -> half-open).

    After ``threshold`` consecutive failures it opens for ``cooldown_s``; then one
    worker probes while the others wait; a success closes it, a failure reopens it.
    """

    threshold: int
    cooldown_s: float
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half-open"

    async def wait(self, stop: asyncio.Event) -> None:
        """Wait until a send may be tried (returns at once when closed)."""
        while self.failures >= self.threshold:
            delay = self.open_until - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                continue
            if not self.probing:
                self.probing = True  # this worker is the probe; its result settles it
                self._settled.clear()
                return
            with contextlib.suppress(TimeoutError):  # others wait for the probe's result
                await asyncio.wait_for(self._settled.wait(), PROBE_POLL_S)
            if stop.is_set():
                return

    def succeeded(self) -> bool:
        """Record a success; True if this closed an open breaker."""
        was_open = self.failures >= self.threshold
        self.failures = 0
        self._settle()
        return was_open

    def failed(self) -> bool:
        """Record a failure; True if this opened the breaker."""
        self.failures += 1
        self._settle()
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s
            return self.failures == self.threshold
        return False

    def _settle(self) -> None:
        self.probing = False
        self._settled.set()


@dataclass
class DestinationState:
    """What health and status pages show for a destination."""

    last_error: str = ""
    last_error_at: float = 0.0
    last_success_at: float = 0.0
    delivered: int = 0
    failures: int = 0


class DestinationPump:
    """Dispatcher plus workers for one destination."""

    def __init__(
        self,
        destination: Destination,
        policy: DeliveryPolicy,
        journal: Journal,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.destination = destination
        self.events = events  # None for a route's step chain: only real deliveries report
        self.id = destination.id
        self.policy = policy
        self.journal = journal
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.breaker = CircuitBreaker(policy.breaker.failures, policy.breaker.cooldown_s)
        self.state = DestinationState()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(
            maxsize=QUEUE_PER_WORKER * policy.workers
        )
        self._handed: set[int] = set()  # seqs queued, in flight, or awaiting their commit
        self._cursor = 0  # ordered: highest seq finished (done or dead)
        self._tasks: list[asyncio.Task[None]] = []

    def notify(self) -> None:
        """New deliveries were committed for this destination."""
        self._wake.set()

    def start(self, group: asyncio.TaskGroup) -> None:
        self._tasks.append(group.create_task(self._dispatch(), name=f"dispatch:{self.id}"))
        for n in range(self.policy.workers):
            self._tasks.append(group.create_task(self._work(n), name=f"deliver:{self.id}:{n}"))

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; let sends in flight finish within ``grace_s``; cancel the rest."""
        self._stop.set()
        self._wake.set()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)

    # -- dispatcher ---------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            batch = self._next_batch()
            for item in batch:
                self._handed.add(item.envelope.seq)
                self._cursor = max(self._cursor, item.envelope.seq)
                await self._queue.put(item)  # bounded: waits while workers are busy
            if not batch:
                await self._sleep_until_work()

    def _next_batch(self) -> list[Pending]:
        room = self._queue.maxsize - self._queue.qsize()
        if room <= 0:
            return []
        if self.policy.ordered:
            if not self._handed:
                self._cursor = 0  # idle: also sees deliveries put back by `queue retry`
            return self.journal.pending(self.id, limit=room, after_seq=self._cursor)
        rows = self.journal.pending(self.id, limit=room + len(self._handed), due_before=time.time())
        return [r for r in rows if r.envelope.seq not in self._handed][:room]

    async def _sleep_until_work(self) -> None:
        timeout = IDLE_POLL_S
        if not self.policy.ordered:
            # deliveries already past due are handed to workers (their end wakes us);
            # only a retry due in the future shortens the sleep
            due = self.journal.next_due(self.id)
            now = time.time()
            if due is not None and due > now:
                timeout = min(timeout, due - now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    # -- workers ------------------------------------------------------------------------

    async def _work(self, n: int) -> None:
        sender = self.destination.sender()
        try:
            while not self._stop.is_set():
                if not self._queue.empty():  # the busy path: no helper tasks per message
                    await self._deliver(sender, self._queue.get_nowait())
                    continue
                get = asyncio.ensure_future(self._queue.get())
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not get.done():
                    get.cancel()
                    return
                await self._deliver(sender, get.result())
        finally:
            await sender.aclose()

    async def _deliver(self, sender: Sender, item: Pending) -> None:
        """Send until done or dead (ordered), or once (unordered: a failure goes back)."""
        env = item.envelope
        if item.blob is not None and getattr(sender, "wants_body", True):
            env = replace(env, body=await asyncio.to_thread(self.journal.read_blob, item.blob))
        attempts = item.attempts
        while True:
            await self.breaker.wait(self._stop)
            if self._stop.is_set():
                return  # stays pending in the journal; the next start resumes it
            attempts += 1
            next_at, write = await self._attempt(sender, env, attempts)
            if next_at is None or not self.policy.ordered:
                self._finish(env.seq, write)
                return
            write.add_done_callback(_log_write_error)
            with contextlib.suppress(TimeoutError):  # ordered: retry the head in place
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.time()))

    async def _attempt(
        self, sender: Sender, env: StoredEnvelope, attempts: int
    ) -> tuple[float | None, asyncio.Future[object]]:
        """One send. Returns the next attempt time (None when done or dead) and the
        journal write recording the outcome."""
        try:
            confirmation = await sender.send(env)
        except (TransientError, PermanentError, OSError, TimeoutError) as err:
            return self._failed(env, attempts, err)
        except Exception as err:  # a sender bug must not kill the worker
            log.exception("delivery.sender_bug destination=%s envelope=%s", self.id, env.id)
            return self._failed(env, attempts, TransientError(f"sender error: {err!r}"))
        if self.breaker.succeeded():
            log.warning("destination.up destination=%s", self.id)
            self._emit("destination.up")
        now = time.time()
        self.state.last_success_at = now
        self.state.delivered += 1
        self.metrics.delivered(self.id, now - env.received_at.timestamp())
        log.debug("delivery.done destination=%s envelope=%s ack=%s", self.id, env.id, confirmation)
        self._emit("message.delivered", env, detail={"confirmation": confirmation})
        return None, self.journal.mark_done(self.id, env.seq, confirmation)

    def _emit(self, event: str, env: StoredEnvelope | None = None, **fields: Any) -> None:
        if self.events is None:
            return
        if env is not None:
            fields.update(
                source=env.source, envelope=env.id, kind=env.kind, ids=ids_from_headers(env.headers)
            )
        self.events.emit(event, destination=self.id, **fields)

    def _failed(
        self, env: StoredEnvelope, attempts: int, err: BaseException
    ) -> tuple[float | None, asyncio.Future[object]]:
        text = str(err) or type(err).__name__
        now = time.time()
        self.state.last_error, self.state.last_error_at = text, now
        self.state.failures += 1
        self.metrics.failed(self.id)
        if self.breaker.failed():
            log.warning("destination.down destination=%s error=%r", self.id, text)
            self._emit("destination.down", outcome="failed", detail={"error": text})
        limit = self.policy.max_attempts
        if isinstance(err, PermanentError) or (limit is not None and attempts >= limit):
            log.error(
                "delivery.dead destination=%s envelope=%s attempts=%d error=%r",
                self.id,
                env.id,
                attempts,
                text,
            )
            self.metrics.dead(self.id)
            self._emit("message.dead", env, outcome="failed", detail={"error": text})
            return None, self.journal.mark_failed(
                self.id, env.seq, error=text, next_at=now, dead=True
            )
        delay = backoff_delay(
            attempts, self.policy.backoff.initial_s, self.policy.backoff.max_s, self.rng
        )
        level = logging.WARNING if attempts == self.policy.surface_after else logging.INFO
        event = "delivery.stuck" if level == logging.WARNING else "delivery.retry"
        log.log(
            level,
            "%s destination=%s envelope=%s attempts=%d retry_in=%.1fs error=%r",
            event,
            self.id,
            env.id,
            attempts,
            delay,
            text,
        )
        next_at = now + delay
        return next_at, self.journal.mark_failed(
            self.id, env.seq, error=text, next_at=next_at, dead=False
        )

    def _finish(self, seq: int, write: asyncio.Future[object]) -> None:
        """Forget ``seq`` once its new state is committed, so it is not picked twice."""

        def done(f: asyncio.Future[object]) -> None:
            _log_write_error(f)
            self._handed.discard(seq)
            self._wake.set()

        write.add_done_callback(done)


def _log_write_error(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("delivery.state_write_failed error=%r", fut.exception())
