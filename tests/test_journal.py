"""The journal: durable accept, group commit, blobs, idempotency, delivery state, resume."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.envelope import Envelope
from gateway.errors import DiskFullError, JournalError
from gateway.journal import QUARANTINE_KEEP, Journal

INLINE_MAX = 1024


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path / "state", inline_max_bytes=INLINE_MAX).open()
    yield j
    j.close()


def env(body: bytes = b"MSH|x", *, idem: str | None = None, **kw: object) -> Envelope:
    return Envelope(kind="hl7", source="his", body=body, idem_key=idem, **kw)  # type: ignore[arg-type]


def fresh_conn(j: Journal) -> sqlite3.Connection:
    """A connection that shares nothing with the journal's own."""
    return sqlite3.connect(f"file:{j.db_path}?mode=ro", uri=True)


def count(j: Journal, table: str) -> int:
    with fresh_conn(j) as c:
        return int(c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def block_writer(j: Journal) -> threading.Event:
    """Occupy the writer thread until the returned event is set, so that the
    next submitted operations are all committed in one batch."""
    release = threading.Event()
    started = threading.Event()

    def hold(_: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    j._submit(hold)
    j._flush(asyncio.get_running_loop())  # hand it over now, not at the next loop iteration
    assert started.wait(5)
    writer = j._writer
    assert writer is not None
    submitted = [0]
    original = writer.submit

    def counting(items: list, loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[type-arg]
        submitted[0] += len(items)
        original(items, loop)

    writer.submit = counting  # type: ignore[method-assign]
    j._test_submitted = submitted  # type: ignore[attr-defined]
    return release


async def queued(j: Journal, n: int, timeout: float = 5.0) -> None:
    """Wait until ``n`` operations were handed to the (blocked) writer thread."""
    deadline = time.monotonic() + timeout
    while j._test_submitted[0] < n:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "operations never reached the writer"
        await asyncio.sleep(0.001)


# -- accept ------------------------------------------------------------------------------


async def test_accept_returns_only_after_commit(journal: Journal) -> None:
    for i in range(20):
        e = env(f"MSH|{i}".encode())
        accepted = await journal.accept(e, ["outbox"])
        assert accepted.id == e.id
        assert accepted.duplicate_of is None
        # a brand-new connection sees the row and its delivery the moment accept returned
        with fresh_conn(journal) as c:
            row = c.execute("SELECT body FROM envelopes WHERE id = ?", (e.id,)).fetchone()
            assert row == (e.body,)
            state = c.execute(
                "SELECT d.state FROM deliveries d JOIN envelopes e ON e.seq = d.seq WHERE e.id = ?",
                (e.id,),
            ).fetchall()
            assert state == [("pending",)]


async def test_journal_is_wal_with_full_sync(journal: Journal) -> None:
    assert journal.reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal.reader.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_group_commit_shares_commits(journal: Journal) -> None:
    before = journal.commits
    envs = [env(f"MSH|{i}".encode()) for i in range(200)]
    results = await asyncio.gather(*(journal.accept(e, ["outbox"]) for e in envs))
    commits = journal.commits - before
    assert [r.id for r in results] == [e.id for e in envs]
    assert count(journal, "envelopes") == 200
    assert count(journal, "deliveries") == 200
    assert 1 <= commits <= 20, commits  # far fewer fsyncs than messages


async def test_accept_order_is_seq_order(journal: Journal) -> None:
    envs = [env(f"MSH|{i}".encode()) for i in range(50)]
    for e in envs:
        await journal.accept(e, ["outbox"])
    pending = journal.pending("outbox", limit=100)
    assert [p.envelope.id for p in pending] == [e.id for e in envs]
    seqs = [p.envelope.seq for p in pending]
    assert seqs == sorted(seqs)


async def test_envelope_fields_round_trip(journal: Journal) -> None:
    received = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    e = Envelope(
        kind="hl7",
        source="his",
        body=b"MSH|^~\\&|\xe9\x00\xff",
        headers={"message_type": "ORU^R01", "note": "caf\u00e9"},
        idem_key="hl7:his:LAB:1",
        parent_id="p" * 32,
        received_at=received,
    )
    await journal.accept(e, ["outbox"])
    (p,) = journal.pending("outbox", limit=10)
    s = p.envelope
    assert (s.id, s.kind, s.source, s.body) == (e.id, e.kind, e.source, e.body)
    assert s.headers == e.headers
    assert (s.idem_key, s.parent_id) == (e.idem_key, e.parent_id)
    assert s.received_at == received
    assert p.blob is None
    assert p.attempts == 0


# -- blobs -------------------------------------------------------------------------------


async def test_large_body_goes_to_a_blob_file(journal: Journal) -> None:
    body = bytes(range(256)) * 40  # 10 kB > inline max, every byte value
    e = env(body)
    await journal.accept(e, ["outbox"])
    (p,) = journal.pending("outbox", limit=10)
    assert p.blob is not None
    assert p.envelope.body == b""  # not loaded by pending()
    path = journal.blob_dir / p.blob
    assert path.is_file()
    assert path.read_bytes() == body
    assert journal.read_blob(p.blob) == body
    with fresh_conn(journal) as c:
        assert c.execute("SELECT body, size FROM envelopes").fetchone() == (None, len(body))
    assert list(journal.blob_dir.rglob("*.tmp")) == []


async def test_body_at_inline_max_stays_inline(journal: Journal) -> None:
    await journal.accept(env(b"x" * INLINE_MAX), ["outbox"])
    (p,) = journal.pending("outbox", limit=10)
    assert p.blob is None
    assert p.envelope.body == b"x" * INLINE_MAX
    assert [f for f in journal.blob_dir.rglob("*") if f.is_file()] == []


def test_open_removes_leftover_tmp_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sub = state / "blobs" / "0190"
    sub.mkdir(parents=True)
    (sub / "abc.tmp").write_bytes(b"half written")
    (sub / "keep").write_bytes(b"a committed blob")
    j = Journal(state).open()
    try:
        assert not (sub / "abc.tmp").exists()
        assert (sub / "keep").read_bytes() == b"a committed blob"
    finally:
        j.close()


# -- idempotency ---------------------------------------------------------------------------


async def test_same_key_same_bytes_is_a_duplicate(journal: Journal) -> None:
    first = env(b"MSH|same", idem="hl7:his:LAB:1")
    await journal.accept(first, ["outbox"])
    again = env(b"MSH|same", idem="hl7:his:LAB:1")
    accepted = await journal.accept(again, ["outbox"])
    assert accepted.id == again.id
    assert accepted.duplicate_of == first.id
    assert count(journal, "envelopes") == 1
    assert count(journal, "deliveries") == 1


async def test_same_key_different_bytes_is_new(journal: Journal) -> None:
    await journal.accept(env(b"MSH|v1", idem="hl7:his:LAB:1"), ["outbox"])
    second = env(b"MSH|v2 corrected", idem="hl7:his:LAB:1")
    accepted = await journal.accept(second, ["outbox"])
    assert accepted.duplicate_of is None
    assert count(journal, "envelopes") == 2
    assert count(journal, "deliveries") == 2


async def test_content_key_deduplicates_whatever_the_bytes(journal: Journal) -> None:
    """Lab results: the key holds sample, tests, values and times; a resend whose header
    time changed is still the same results."""
    first = await journal.accept(env(b"H|t1\rR|1\r", idem="lab:k", dedupe_on_key=True), ["lis"])
    again = await journal.accept(env(b"H|t2\rR|1\r", idem="lab:k", dedupe_on_key=True), ["lis"])
    assert again.duplicate_of == first.id
    other = await journal.accept(env(b"H|t2\rR|1\r", idem="lab:k2", dedupe_on_key=True), ["lis"])
    assert other.duplicate_of is None
    assert count(journal, "envelopes") == 2


async def test_no_key_never_deduplicates(journal: Journal) -> None:
    await journal.accept(env(b"MSH|same"), ["outbox"])
    accepted = await journal.accept(env(b"MSH|same"), ["outbox"])
    assert accepted.duplicate_of is None
    assert count(journal, "envelopes") == 2


async def test_concurrent_duplicates_in_one_batch(journal: Journal) -> None:
    release = block_writer(journal)
    a, b = env(b"MSH|x", idem="k"), env(b"MSH|x", idem="k")
    tasks = [asyncio.ensure_future(journal.accept(e, ["outbox"])) for e in (a, b)]
    await queued(journal, 2)
    release.set()
    ra, rb = await asyncio.gather(*tasks)
    assert ra.duplicate_of is None
    assert rb.duplicate_of == a.id
    assert count(journal, "envelopes") == 1


async def test_duplicate_blob_is_not_left_behind(journal: Journal) -> None:
    body = b"B" * (INLINE_MAX * 4)
    first = env(body, idem="big")
    await journal.accept(first, ["outbox"])
    accepted = await journal.accept(env(body, idem="big"), ["outbox"])
    assert accepted.duplicate_of == first.id
    files = [f for f in journal.blob_dir.rglob("*") if f.is_file()]
    assert [f.name for f in files] == [first.id]


# -- deliveries ----------------------------------------------------------------------------


async def test_one_delivery_per_destination(journal: Journal) -> None:
    e = env()
    await journal.accept(e, ["outbox", "lis", "archive"])
    for dest in ("outbox", "lis", "archive"):
        assert [p.envelope.id for p in journal.pending(dest, limit=10)] == [e.id]
        assert journal.pending(dest, limit=10)[0].destination == dest
    assert journal.pending("other", limit=10) == []
    assert journal.depth() == {d: {"pending": 1} for d in ("outbox", "lis", "archive")}


async def test_unrouted_envelope_has_no_delivery(journal: Journal) -> None:
    await journal.accept(env(), [])
    assert count(journal, "envelopes") == 1
    assert count(journal, "deliveries") == 0
    assert journal.depth() == {}


async def test_pending_limit_after_seq_and_due_before(journal: Journal) -> None:
    envs = [env(f"MSH|{i}".encode()) for i in range(10)]
    for e in envs:
        await journal.accept(e, ["outbox"])
    allp = journal.pending("outbox", limit=100)
    seqs = [p.envelope.seq for p in allp]
    assert [p.envelope.id for p in journal.pending("outbox", limit=3)] == [e.id for e in envs[:3]]
    after = journal.pending("outbox", limit=100, after_seq=seqs[6])
    assert [p.envelope.seq for p in after] == seqs[7:]
    # push two deliveries into the future: due_before leaves them out, plain pending() does not
    later = time.time() + 3600
    await journal.mark_failed("outbox", seqs[0], error="down", next_at=later, dead=False)
    await journal.mark_failed("outbox", seqs[5], error="down", next_at=later, dead=False)
    due = journal.pending("outbox", limit=100, due_before=time.time())
    assert [p.envelope.seq for p in due] == [s for s in seqs if s not in (seqs[0], seqs[5])]
    assert len(journal.pending("outbox", limit=100)) == 10
    assert journal.next_due("outbox") is not None
    assert journal.next_due("outbox") <= time.time()


async def test_mark_done_and_failed_transitions(journal: Journal) -> None:
    a, b, c = env(b"a"), env(b"b"), env(b"c")
    for e in (a, b, c):
        await journal.accept(e, ["outbox"])
    sa, sb, sc = (p.envelope.seq for p in journal.pending("outbox", limit=10))

    next_at = time.time() + 60
    await journal.mark_failed("outbox", sa, error="timeout", next_at=next_at, dead=False)
    await journal.mark_failed("outbox", sa, error="refused", next_at=next_at, dead=False)
    await journal.mark_done("outbox", sa, "AA")
    await journal.mark_failed(
        "outbox", sb, error="AR: rejected " + "x" * 2000, next_at=0, dead=True
    )

    with fresh_conn(journal) as conn:
        rows = {
            seq: (state, attempts, err, conf)
            for seq, state, attempts, err, conf in conn.execute(
                "SELECT seq, state, attempts, last_error, confirmation FROM deliveries"
            )
        }
    assert rows[sa] == ("done", 3, None, "AA")
    state, attempts, err, conf = rows[sb]
    assert (state, attempts, conf) == ("dead", 1, None)
    assert err.startswith("AR: rejected") and len(err) == 1000  # stored capped
    assert rows[sc] == ("pending", 0, None, None)
    assert [p.envelope.seq for p in journal.pending("outbox", limit=10)] == [sc]
    assert journal.depth() == {"outbox": {"done": 1, "dead": 1, "pending": 1}}


async def test_pending_attempts_and_next_at_after_failure(journal: Journal) -> None:
    await journal.accept(env(), ["outbox"])
    (p,) = journal.pending("outbox", limit=1)
    await journal.mark_failed("outbox", p.envelope.seq, error="x", next_at=12345.0, dead=False)
    (p2,) = journal.pending("outbox", limit=1)
    assert (p2.attempts, p2.next_at) == (1, 12345.0)
    assert journal.next_due("outbox") == 12345.0


async def test_oldest_pending(journal: Journal) -> None:
    old = datetime.now(UTC) - timedelta(hours=2)
    await journal.accept(env(b"old", received_at=old), ["outbox"])
    await journal.accept(env(b"new"), ["outbox", "lis"])
    oldest = journal.oldest_pending()
    assert oldest["outbox"] == pytest.approx(old.timestamp())
    assert oldest["lis"] > old.timestamp()


# -- resume --------------------------------------------------------------------------------


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    j = Journal(state, inline_max_bytes=INLINE_MAX).open()
    small, big, done = env(b"small", idem="k1"), env(b"Z" * 5000), env(b"done")
    for e in (small, big, done):
        await j.accept(e, ["outbox"])
    seq_done = j.pending("outbox", limit=10)[2].envelope.seq
    await j.mark_done("outbox", seq_done, "AA")
    await j.quarantine("his", b"junk", "junk: 4 bytes", "1.2.3.4:5")
    j.close()
    assert not j.writer_alive

    j2 = Journal(state, inline_max_bytes=INLINE_MAX).open()
    try:
        pending = j2.pending("outbox", limit=10)
        assert [p.envelope.id for p in pending] == [small.id, big.id]
        assert pending[0].envelope.body == b"small"
        assert pending[1].blob is not None
        assert j2.read_blob(pending[1].blob) == b"Z" * 5000
        assert j2.depth() == {"outbox": {"pending": 2, "done": 1}}
        dup = await j2.accept(env(b"small", idem="k1"), ["outbox"])
        assert dup.duplicate_of == small.id  # idempotency survives a restart
        assert count(j2, "quarantine") == 1
        # new envelopes continue the sequence after the old ones
        await j2.accept(env(b"after"), ["outbox"])
        seqs = [p.envelope.seq for p in j2.pending("outbox", limit=10)]
        assert seqs == sorted(seqs) and len(seqs) == 3
    finally:
        j2.close()


async def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    j = Journal(tmp_path / "s").open()
    j.close()
    with pytest.raises(JournalError, match="not open"):
        await j.accept(env(), ["outbox"])
    with pytest.raises(JournalError, match="not open"):
        j.pending("outbox", limit=1)


# -- failures ------------------------------------------------------------------------------


async def test_disk_full_refuses_accept(tmp_path: Path) -> None:
    j = Journal(tmp_path / "s", min_free_mb=1 << 40).open()  # a petabyte-sized watermark
    try:
        with pytest.raises(DiskFullError, match="free space"):
            await j.accept(env(b"Z" * 5000), ["outbox"])
        assert isinstance(DiskFullError("x"), JournalError)
        assert count(j, "envelopes") == 0
        assert [f for f in j.blob_dir.rglob("*") if f.is_file()] == []
    finally:
        j.close()


async def test_disk_full_from_disk_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"bytes": 10 << 30}

    class Usage:
        @property
        def free(self) -> int:
            return free["bytes"]

    monkeypatch.setattr("gateway.journal.shutil.disk_usage", lambda _: Usage())
    monkeypatch.setattr("gateway.journal.FREE_SPACE_TTL_S", 0.0)
    j = Journal(tmp_path / "s", min_free_mb=100).open()
    try:
        await j.accept(env(b"fits"), ["outbox"])
        free["bytes"] = 50 << 20
        with pytest.raises(DiskFullError):
            await j.accept(env(b"does not"), ["outbox"])
        free["bytes"] = 200 << 20
        await j.accept(env(b"fits again"), ["outbox"])
        assert count(j, "envelopes") == 2
    finally:
        j.close()


async def test_quarantine_keeps_a_capped_copy_and_the_real_size(journal: Journal) -> None:
    raw = b"\x00\xffjunk" * (QUARANTINE_KEEP // 3)  # a bit over the cap
    assert len(raw) > QUARANTINE_KEEP
    qid = await journal.quarantine("his", raw, "junk: too much", "10.0.0.1:999")
    small = await journal.quarantine("his", b"tiny", "junk: 4 bytes")
    assert small == qid + 1
    with fresh_conn(journal) as c:
        rows = c.execute(
            "SELECT id, source, peer, reason, size, length(raw), raw FROM quarantine ORDER BY id"
        ).fetchall()
    assert rows[0][:6] == (qid, "his", "10.0.0.1:999", "junk: too much", len(raw), QUARANTINE_KEEP)
    assert rows[0][6] == raw[:QUARANTINE_KEEP]
    assert rows[1][4:] == (4, 4, b"tiny")


async def test_failing_op_fails_only_its_caller(journal: Journal) -> None:
    """One bad write in a group commit is rolled back alone; the others commit."""
    good = [env(f"MSH|{i}".encode()) for i in range(5)]
    await journal.accept(good[0], ["outbox"])
    before = journal.commits
    release = block_writer(journal)
    # good[0] again: same envelope id violates UNIQUE inside the writer thread
    tasks = [asyncio.ensure_future(journal.accept(e, ["outbox"])) for e in good[1:3]]
    tasks.append(asyncio.ensure_future(journal.accept(good[0], ["outbox"])))
    tasks += [asyncio.ensure_future(journal.accept(e, ["outbox"])) for e in good[3:]]
    await queued(journal, 5)  # all five wait behind the blocked writer
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert journal.commits - before == 2  # the blocker's batch, then one batch for all five
    assert isinstance(results[2], JournalError)
    assert "UNIQUE" in str(results[2])
    assert [r.id for r in results if not isinstance(r, BaseException)] == [e.id for e in good[1:]]
    assert count(journal, "envelopes") == 5
    assert count(journal, "deliveries") == 5  # the failed op's deliveries rolled back too


async def test_raising_op_is_reported_as_journal_error(journal: Journal) -> None:
    def boom(_: sqlite3.Connection) -> None:
        raise ValueError("bug in op")

    with pytest.raises(JournalError, match="bug in op"):
        await journal._submit(boom)
    await journal.accept(env(), ["outbox"])  # the writer thread is still alive
    assert journal.writer_alive
