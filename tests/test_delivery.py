"""Delivery pumps against scripted fake destinations and a real journal."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import delivery, queue_admin
from gateway.config import Backoff, Breaker, DeliveryPolicy
from gateway.delivery import CircuitBreaker, DestinationPump, backoff_delay
from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import PermanentError, TransientError
from gateway.journal import Journal, connect
from gateway.metrics import Metrics

DEST = "lis"
Behaviour = Callable[[StoredEnvelope, int], Awaitable[str]]


@dataclass
class Call:
    seq: int
    attempt: int  # 1-based, per envelope
    started: float
    breaker: str


@dataclass
class FakeDestination:
    """Records every send; ``behaviour(envelope, attempt)`` returns or raises."""

    behaviour: Behaviour
    id: str = DEST
    calls: list[Call] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    senders: int = 0
    closed: int = 0
    pump: DestinationPump | None = None

    def sender(self) -> FakeSender:
        self.senders += 1
        return FakeSender(self)


class FakeSender:
    def __init__(self, dest: FakeDestination) -> None:
        self.dest = dest

    async def send(self, envelope: StoredEnvelope) -> str:
        d = self.dest
        attempt = 1 + sum(1 for c in d.calls if c.seq == envelope.seq)
        state = d.pump.breaker.state if d.pump else "?"
        d.calls.append(Call(envelope.seq, attempt, time.monotonic(), state))
        d.in_flight += 1
        d.max_in_flight = max(d.max_in_flight, d.in_flight)
        try:
            result = await d.behaviour(envelope, attempt)
        finally:
            d.in_flight -= 1
        d.delivered.append(envelope.seq)
        return result

    async def aclose(self) -> None:
        self.dest.closed += 1


async def ok(env: StoredEnvelope, attempt: int) -> str:
    return "AA"


def policy(**kw: object) -> DeliveryPolicy:
    kw.setdefault("backoff", Backoff(initial_s=0.001, max_s=0.004))
    kw.setdefault("breaker", Breaker(failures=1000, cooldown_s=0.05))
    return DeliveryPolicy(**kw)  # type: ignore[arg-type]


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    # closed on the test's loop: the writer settles its last futures while the loop lives
    j = Journal(tmp_path / "state").open()
    yield j
    j.close()


async def fill(j: Journal, n: int, dest: str = DEST) -> list[int]:
    """Accept ``n`` envelopes for ``dest``; return their seqs in accept order."""
    for i in range(n):
        await j.accept(Envelope(kind="hl7", source="his", body=f"MSH|{i}".encode()), [dest])
    return [p.envelope.seq for p in j.pending(dest, limit=n + 10)]


def rows(j: Journal, dest: str = DEST) -> dict[int, tuple[str, int, str | None, str | None]]:
    """seq -> (state, attempts, last_error, confirmation), read on a fresh connection."""
    conn = connect(j.db_path)
    try:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT seq, state, attempts, last_error, confirmation FROM deliveries "
                "WHERE destination = ?",
                (dest,),
            )
        }
    finally:
        conn.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def states(j: Journal, dest: str = DEST) -> dict[str, int]:
    return j.depth().get(dest, {})


@asynccontextmanager
async def running(
    dest: FakeDestination,
    pol: DeliveryPolicy,
    j: Journal,
    *,
    grace: float = 2.0,
    metrics: Metrics | None = None,
) -> AsyncIterator[DestinationPump]:
    pump = DestinationPump(dest, pol, j, metrics or Metrics(), rng=random.Random(7))
    dest.pump = pump
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        try:
            yield pump
        finally:
            await pump.stop(grace)


# -- order and exactly-once ------------------------------------------------------------------


async def test_ordered_delivery_keeps_order_with_failures(journal: Journal) -> None:
    seqs = await fill(journal, 30)
    rng = random.Random(42)
    fail_times = {s: rng.choice([0, 0, 1, 2, 3]) for s in seqs}

    async def flaky(env: StoredEnvelope, attempt: int) -> str:
        if attempt <= fail_times[env.seq]:
            raise TransientError(f"NAK {attempt}")
        return "AA"

    dest = FakeDestination(flaky)
    async with running(dest, policy(), journal):
        await until(lambda: states(journal) == {"done": 30}, what="all delivered")
    assert dest.delivered == seqs
    # nothing later was even tried before the one ahead of it was delivered
    tried = [c.seq for c in dest.calls]
    assert tried == sorted(tried)
    assert sum(fail_times.values()) > 10  # the script did inject failures
    for seq, (state, attempts, err, conf) in rows(journal).items():
        assert (state, attempts, err, conf) == ("done", fail_times[seq] + 1, None, "AA")


async def test_ordered_dead_letter_does_not_block_the_rest(journal: Journal) -> None:
    seqs = await fill(journal, 5)

    async def reject_third(env: StoredEnvelope, attempt: int) -> str:
        if env.seq == seqs[2]:
            raise PermanentError("AR: unknown patient")
        return "AA"

    dest = FakeDestination(reject_third)
    async with running(dest, policy(), journal):
        await until(lambda: states(journal) == {"done": 4, "dead": 1})
    assert dest.delivered == [s for s in seqs if s != seqs[2]]
    assert [c.seq for c in dest.calls] == seqs


async def test_unordered_delivers_everything_exactly_once(journal: Journal) -> None:
    seqs = await fill(journal, 200)
    rng = random.Random(3)

    async def jittery(env: StoredEnvelope, attempt: int) -> str:
        await asyncio.sleep(rng.random() / 1000)
        return "AA"

    dest = FakeDestination(jittery)
    async with running(dest, policy(ordered=False, workers=4), journal):
        await until(lambda: states(journal) == {"done": 200}, what="all delivered")
        await asyncio.sleep(0.05)  # a second pick-up of anything would show up here
    assert sorted(dest.delivered) == seqs
    assert len(dest.calls) == 200
    assert 1 < dest.max_in_flight <= 4
    assert dest.senders == 4  # one sender (connection) per worker
    assert dest.closed == 4  # each closed on stop


async def test_unordered_with_failures_delivers_each_once(journal: Journal) -> None:
    seqs = await fill(journal, 60)

    async def every_third_fails_once(env: StoredEnvelope, attempt: int) -> str:
        if env.seq % 3 == 0 and attempt == 1:
            raise TransientError("busy")
        return "AA"

    dest = FakeDestination(every_third_fails_once)
    async with running(dest, policy(ordered=False, workers=4), journal):
        await until(lambda: states(journal) == {"done": 60}, what="all delivered")
    assert sorted(dest.delivered) == seqs  # each exactly once
    assert len(dest.calls) == 60 + sum(1 for s in seqs if s % 3 == 0)
    for seq, (state, attempts, _, _) in rows(journal).items():
        assert (state, attempts) == ("done", 2 if seq % 3 == 0 else 1)


async def test_new_deliveries_are_picked_up_after_notify(journal: Journal) -> None:
    dest = FakeDestination(ok)
    async with running(dest, policy(), journal) as pump:
        await fill(journal, 1)
        pump.notify()
        await until(lambda: states(journal) == {"done": 1}, timeout=0.5, what="prompt pick-up")


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [True, False])
async def test_transient_failure_is_retried_with_backoff(journal: Journal, ordered: bool) -> None:
    (seq,) = await fill(journal, 1)

    async def twice_down(env: StoredEnvelope, attempt: int) -> str:
        if attempt <= 2:
            raise TransientError("connection refused")
        return "AA"

    dest = FakeDestination(twice_down)
    pol = policy(ordered=ordered, backoff=Backoff(initial_s=0.04, max_s=1.0))
    async with running(dest, pol, journal) as pump:
        await until(lambda: states(journal) == {"done": 1})
        assert pump.state.failures == 2
        assert pump.state.last_error == "connection refused"
        assert pump.state.delivered == 1
    t = [c.started for c in dest.calls]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.02 * 0.9  # attempt 1 waits within [0.02, 0.04]
    assert t[2] - t[1] >= 0.04 * 0.9  # attempt 2 within [0.04, 0.08]
    assert rows(journal)[seq] == ("done", 3, None, "AA")


async def test_permanent_error_is_dead_at_once(journal: Journal) -> None:
    (seq,) = await fill(journal, 1)

    async def reject(env: StoredEnvelope, attempt: int) -> str:
        raise PermanentError("AR: message structure")

    dest = FakeDestination(reject)
    metrics = Metrics()
    async with running(dest, policy(), journal, metrics=metrics):
        await until(lambda: states(journal) == {"dead": 1})
        await asyncio.sleep(0.02)  # and it is not tried again
    assert len(dest.calls) == 1
    assert rows(journal)[seq] == ("dead", 1, "AR: message structure", None)
    assert metrics.registry.get_sample_value("medgw_delivery_dead_total", {"destination": DEST})
    assert metrics.registry.get_sample_value("medgw_delivery_failures_total", {"destination": DEST})


@pytest.mark.parametrize("ordered", [True, False])
async def test_max_attempts_then_dead(journal: Journal, ordered: bool) -> None:
    first, second = await fill(journal, 2)

    async def first_always_fails(env: StoredEnvelope, attempt: int) -> str:
        if env.seq == first:
            raise TransientError("timeout")
        return "AA"

    dest = FakeDestination(first_always_fails)
    async with running(dest, policy(ordered=ordered, max_attempts=3), journal):
        await until(lambda: states(journal) == {"dead": 1, "done": 1})
    assert [c.attempt for c in dest.calls if c.seq == first] == [1, 2, 3]
    assert rows(journal)[first] == ("dead", 3, "timeout", None)
    assert rows(journal)[second][:2] == ("done", 1)


async def test_no_max_attempts_keeps_retrying(journal: Journal) -> None:
    (seq,) = await fill(journal, 1)

    async def down(env: StoredEnvelope, attempt: int) -> str:
        raise OSError("connection refused")

    dest = FakeDestination(down)
    async with running(dest, policy(max_attempts=None), journal) as pump:
        await until(lambda: rows(journal)[seq][1] >= 8, what="8 attempts")
        assert states(journal) == {"pending": 1}
        assert pump.state.failures >= 8
    state, attempts, err, _ = rows(journal)[seq]
    assert state == "pending"
    assert attempts >= 8
    assert err == "connection refused"


async def test_sender_bug_does_not_kill_the_worker(journal: Journal) -> None:
    seqs = await fill(journal, 3)

    async def buggy_once(env: StoredEnvelope, attempt: int) -> str:
        if env.seq == seqs[0] and attempt == 1:
            raise KeyError("oops")
        return "AA"

    dest = FakeDestination(buggy_once)
    async with running(dest, policy(), journal) as pump:
        await until(lambda: states(journal) == {"done": 3})
        assert "sender error" in pump.state.last_error
        assert all(not t.done() for t in pump._tasks)
    assert rows(journal)[seqs[0]][:2] == ("done", 2)
    assert dest.delivered == seqs


async def test_queue_retry_revives_a_dead_delivery(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "IDLE_POLL_S", 0.02)
    (seq,) = await fill(journal, 1)
    verdict = {"ok": False}

    async def until_fixed(env: StoredEnvelope, attempt: int) -> str:
        if not verdict["ok"]:
            raise PermanentError("AR")
        return "AA"

    dest = FakeDestination(until_fixed)
    async with running(dest, policy(), journal):
        await until(lambda: states(journal) == {"dead": 1})
        verdict["ok"] = True
        conn = connect(journal.db_path)
        try:
            assert queue_admin.retry(conn, destination=DEST, envelope=None) == 1
        finally:
            conn.close()
        await until(lambda: states(journal) == {"done": 1}, what="retried delivery")
    assert rows(journal)[seq][:2] == ("done", 2)


# -- circuit breaker ---------------------------------------------------------------------------


async def test_breaker_opens_probes_half_open_and_closes(journal: Journal) -> None:
    await fill(journal, 3)

    async def three_failures(env: StoredEnvelope, attempt: int) -> str:
        if len(dest.calls) <= 3:
            raise TransientError("down")
        return "AA"

    dest = FakeDestination(three_failures)
    cooldown = 0.2
    pol = policy(breaker=Breaker(failures=3, cooldown_s=cooldown))
    async with running(dest, pol, journal) as pump:
        await until(lambda: len(dest.calls) >= 3)
        await until(lambda: pump.breaker.state == "open", what="breaker open")
        open_until = pump.breaker.open_until
        await until(lambda: states(journal) == {"done": 3}, what="delivered after cooldown")
        assert pump.breaker.state == "closed"
    assert [c.breaker for c in dest.calls[:3]] == ["closed"] * 3
    probe = dest.calls[3]
    assert probe.breaker == "half-open"  # the first send after the cooldown is a probe
    assert probe.started >= open_until  # nothing was sent during the cooldown
    assert open_until - dest.calls[2].started >= cooldown * 0.9
    assert [c.breaker for c in dest.calls[4:]] == ["closed", "closed"]


async def test_stop_while_the_breaker_is_open_is_prompt(journal: Journal) -> None:
    await fill(journal, 3)

    async def down(env: StoredEnvelope, attempt: int) -> str:
        raise TransientError("down")

    dest = FakeDestination(down)
    pol = policy(breaker=Breaker(failures=1, cooldown_s=60))
    pump = DestinationPump(dest, pol, journal, Metrics())
    dest.pump = pump
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        await until(lambda: pump.breaker.state == "open")
        t0 = time.monotonic()
        await pump.stop(5.0)
        assert time.monotonic() - t0 < 0.5  # the workers wait on the breaker, not a send
    assert len(dest.calls) == 1
    await until(lambda: states(journal) == {"pending": 3})


async def test_stuck_delivery_is_surfaced_once(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    (seq,) = await fill(journal, 1)

    async def down(env: StoredEnvelope, attempt: int) -> str:
        raise TransientError("down")

    dest = FakeDestination(down)
    caplog.set_level("INFO", logger="gateway.delivery")
    async with running(dest, policy(surface_after=3), journal):
        await until(lambda: rows(journal)[seq][1] >= 5)
    stuck = [r for r in caplog.records if r.getMessage().startswith("delivery.stuck")]
    assert len(stuck) == 1
    assert stuck[0].levelname == "WARNING"
    assert "attempts=3" in stuck[0].getMessage()
    retries = [r for r in caplog.records if r.getMessage().startswith("delivery.retry")]
    assert retries and all(r.levelname == "INFO" for r in retries)


def test_breaker_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(delivery.time, "monotonic", lambda: now[0])
    b = CircuitBreaker(threshold=2, cooldown_s=10)
    assert b.state == "closed"
    assert b.failed() is False
    assert b.state == "closed"
    assert b.failed() is True  # this one opened it
    assert b.state == "open"
    now[0] += 9.9
    assert b.state == "open"
    now[0] += 0.2
    assert b.state == "half-open"
    assert b.failed() is False  # the probe failed: open again, not "opened" again
    assert b.state == "open"
    now[0] += 10.1
    assert b.succeeded() is True
    assert b.state == "closed"
    assert b.succeeded() is False


async def test_half_open_sends_a_single_probe(journal: Journal) -> None:
    await fill(journal, 20)

    async def slow_failure(env: StoredEnvelope, attempt: int) -> str:
        await asyncio.sleep(0.05)
        raise TransientError("down")

    dest = FakeDestination(slow_failure)
    pol = policy(ordered=False, workers=4, breaker=Breaker(failures=4, cooldown_s=0.2))
    async with running(dest, pol, journal, grace=0.5):
        await until(lambda: any(c.breaker == "half-open" for c in dest.calls), what="a probe")
        await asyncio.sleep(0.1)  # the probe is still failing: nobody else may send
    probes = [c for c in dest.calls if c.breaker == "half-open"]
    assert len(probes) == 1, f"{len(probes)} concurrent probes"


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_delay_bounds() -> None:
    rng = random.Random(1234)
    for initial, max_s in ((0.5, 300.0), (1.0, 60.0), (3.0, 3.0)):
        for attempts in range(0, 80):
            d = min(max_s, initial * 2 ** max(0, attempts - 1))
            delay = backoff_delay(attempts, initial, max_s, rng)
            assert d / 2 <= delay <= d, (initial, attempts, delay)
    assert backoff_delay(10**6, 1.0, 300.0, rng) <= 300.0  # no overflow for huge counts


def test_backoff_delay_is_jittered_and_reproducible() -> None:
    a = [backoff_delay(5, 1.0, 300.0, random.Random(9)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(9)
    many = {backoff_delay(5, 1.0, 300.0, rng) for _ in range(50)}
    assert len(many) == 50  # jitter spreads retries
    assert min(many) >= 8.0 and max(many) <= 16.0


def test_backoff_grows_then_caps() -> None:
    upper = [min(30.0, 1.0 * 2 ** (n - 1)) for n in range(1, 10)]
    assert upper == [1, 2, 4, 8, 16, 30, 30, 30, 30]
    rng = random.Random(0)
    for n, d in enumerate(upper, start=1):
        assert d / 2 <= backoff_delay(n, 1.0, 30.0, rng) <= d


# -- stop and resume -----------------------------------------------------------------------------


async def test_stop_cancels_a_hung_send_after_grace_and_resume_delivers(journal: Journal) -> None:
    (seq,) = await fill(journal, 1)
    cancelled = asyncio.Event()

    async def hang(env: StoredEnvelope, attempt: int) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    hung = FakeDestination(hang)
    grace = 0.3
    pump = DestinationPump(hung, policy(), journal, Metrics())
    hung.pump = pump
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        await until(lambda: hung.in_flight == 1, what="send in flight")
        t0 = time.monotonic()
        await pump.stop(grace)
        elapsed = time.monotonic() - t0
    assert grace * 0.9 <= elapsed < grace + 1.0
    assert cancelled.is_set()
    assert hung.closed == 1  # the sender's connection was closed
    assert rows(journal)[seq] == ("pending", 0, None, None)  # nothing recorded

    good = FakeDestination(ok)
    async with running(good, policy(), journal):
        await until(lambda: states(journal) == {"done": 1}, what="resumed delivery")
    assert good.delivered == [seq]


async def test_stop_lets_an_in_flight_send_finish(journal: Journal) -> None:
    seqs = await fill(journal, 2)
    release = asyncio.Event()

    async def slow(env: StoredEnvelope, attempt: int) -> str:
        await release.wait()
        return "AA"

    dest = FakeDestination(slow)
    pump = DestinationPump(dest, policy(), journal, Metrics())
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        await until(lambda: dest.in_flight == 1)
        stopping = asyncio.ensure_future(pump.stop(5.0))
        await asyncio.sleep(0.02)
        assert not stopping.done()  # waits for the send in flight
        release.set()
        t0 = time.monotonic()
        await stopping
        assert time.monotonic() - t0 < 1.0
    # the outcome of the last send is committed by the writer right after stop() returns
    await until(lambda: rows(journal)[seqs[0]][:2] == ("done", 1))
    assert rows(journal)[seqs[1]][:2] == ("pending", 0)  # not started after stop
    assert len(dest.calls) == 1


async def test_stop_with_a_backlog_returns_once_the_send_finishes(journal: Journal) -> None:
    seqs = await fill(journal, 20)  # more than the pump's queue holds (4 per worker)
    release = asyncio.Event()

    async def slow(env: StoredEnvelope, attempt: int) -> str:
        await release.wait()
        return "AA"

    dest = FakeDestination(slow)
    pump = DestinationPump(dest, policy(), journal, Metrics())
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        await until(lambda: dest.in_flight == 1)
        assert pump._queue.qsize() >= 3
        stopping = asyncio.ensure_future(pump.stop(5.0))
        await asyncio.sleep(0)
        release.set()
        t0 = time.monotonic()
        await stopping
        elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"stop took {elapsed:.2f}s with nothing left in flight"
    await until(lambda: states(journal) == {"done": 1, "pending": 19})
    assert dest.delivered == seqs[:1]
