"""The durable journal: SQLite (WAL, synchronous=FULL) plus a blob folder.

``accept()`` returns only when the envelope and its deliveries are on disk
(ARCHITECTURE.md, "Accept before acknowledge"). All writes go through one writer
thread that commits whatever has queued up in one transaction, so many
concurrent accepts share one fsync (group commit). Reads for delivery use a
second connection on the event loop thread; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.envelope import Envelope, StagedBlob, StoredEnvelope
from gateway.errors import DiskFullError, JournalError
from gateway.interfaces import Accepted

if TYPE_CHECKING:
    from gateway.config import JournalRetention

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- accept order
    id          TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    source      TEXT NOT NULL,
    received_at REAL NOT NULL,                      -- unix seconds, UTC
    idem_key    TEXT,
    digest      TEXT NOT NULL,                      -- sha256 of the body
    parent_id   TEXT,
    headers     TEXT NOT NULL,                      -- JSON object of strings
    size        INTEGER NOT NULL,
    body        BLOB,                               -- inline body, or NULL when in a blob file
    blob        TEXT                                -- blob path relative to the blob folder
);
CREATE INDEX IF NOT EXISTS envelopes_idem ON envelopes (idem_key) WHERE idem_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS deliveries (
    seq          INTEGER NOT NULL,                  -- envelopes.seq
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL,                     -- pending | done | dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    updated_at   REAL NOT NULL,
    last_error   TEXT,
    confirmation TEXT,
    PRIMARY KEY (destination, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (destination, state, seq);
CREATE TABLE IF NOT EXISTS sessions (                -- connections and associations
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    peer        TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    details     TEXT NOT NULL                       -- JSON: AE titles, counts, bytes, errors
);
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    peer        TEXT NOT NULL,
    received_at REAL NOT NULL,
    reason      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    raw         BLOB NOT NULL                      -- at most QUARANTINE_KEEP bytes
);
"""

QUARANTINE_KEEP = 1024 * 1024
BATCH_MAX = 512
FREE_SPACE_TTL_S = 1.0
PRUNE_BATCH = 500  # rows per writer op: the writer is never held for long
LOCK_NAME = "journal.lock"  # shared by every open journal, exclusive for a restore
DOCS_HINT = "see docs/storage.md, 'Integrity check' and 'Restore'"


@dataclass(frozen=True, slots=True)
class Pending:
    """A delivery waiting to go out, with its envelope."""

    destination: str
    attempts: int
    next_at: float
    envelope: StoredEnvelope
    blob: str | None


def connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{db_path}?mode=ro" if readonly else f"file:{db_path}"
    conn = sqlite3.connect(
        uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0
    )
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, rename into place, fsync the folder.

    The temp file is hidden (``.NAME.tmp``) so that whoever watches the folder
    (an outbox consumer) does not pick up a half-written file."""
    replace_synced(path, data)
    fsync_dir(path.parent)


def replace_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to the hidden ``.NAME.tmp`` beside ``path``, fsync it, rename it
    to ``path``; the folder's fsync (which makes the rename durable) is the caller's."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_Op = Callable[[sqlite3.Connection], Any]


def insert_envelope(
    conn: sqlite3.Connection,
    env: Envelope,
    destinations: list[str],
    *,
    digest: str,
    blob: str | None,
) -> Accepted:
    """Insert ``env`` and its pending deliveries (inside the caller's transaction).

    The same idempotency key with the same digest is a retransmission: nothing is
    written and the first envelope's id comes back as ``duplicate_of``. With
    ``env.dedupe_on_key`` the key alone decides (its producer put the content in it).
    """
    if env.idem_key is not None:
        if env.dedupe_on_key:
            dup = conn.execute(
                "SELECT id FROM envelopes WHERE idem_key = ? LIMIT 1", (env.idem_key,)
            ).fetchone()
        else:
            dup = conn.execute(
                "SELECT id FROM envelopes WHERE idem_key = ? AND digest = ? LIMIT 1",
                (env.idem_key, digest),
            ).fetchone()
        if dup:
            return Accepted(env.id, duplicate_of=dup[0])
    headers = json.dumps(env.headers, separators=(",", ":"), ensure_ascii=False)
    cur = conn.execute(
        "INSERT INTO envelopes (id, kind, source, received_at, idem_key, digest, "
        "parent_id, headers, size, body, blob) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            env.id,
            env.kind,
            env.source,
            env.received_at.timestamp(),
            env.idem_key,
            digest,
            env.parent_id,
            headers,
            len(env.body),
            None if blob else env.body,
            blob,
        ),
    )
    now = time.time()
    conn.executemany(
        "INSERT INTO deliveries (seq, destination, state, next_at, updated_at) "
        "VALUES (?, ?, 'pending', ?, ?)",
        [(cur.lastrowid, d, now, now) for d in destinations],
    )
    return Accepted(env.id)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) on an autocommit
    connection; shared by the journal's CLI helpers and the plugins' own SQLite files."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def insert_sync(conn: sqlite3.Connection, env: Envelope, destinations: list[str]) -> Accepted:
    """Journal a small envelope from outside the service (CLI commands such as
    ``medgw dicom complete``), in its own transaction; a running gateway's delivery
    loops pick it up within a second. Bodies are kept inline: no blob files here."""
    if env.as_file:
        raise ValueError("insert_sync keeps bodies inline; as_file envelopes need the service")
    digest = hashlib.sha256(env.body).hexdigest()
    with transaction(conn):
        return insert_envelope(conn, env, destinations, digest=digest, blob=None)


def prune_delivered_batch(
    conn: sqlite3.Connection, cutoff: float, *, after_seq: int = 0, limit: int = PRUNE_BATCH
) -> list[tuple[int, str | None]]:
    """Delete up to ``limit`` envelopes received before ``cutoff`` whose every
    delivery is done (and unrouted ones), in seq order after ``after_seq``, inside the
    caller's transaction. Pending or dead ones are never touched. Returns (seq, blob)
    of what went: the caller unlinks the blob files once the delete is committed."""
    rows: list[tuple[int, str | None]] = conn.execute(
        "SELECT seq, blob FROM envelopes e WHERE seq > ? AND received_at < ? AND NOT EXISTS "
        "(SELECT 1 FROM deliveries d WHERE d.seq = e.seq AND d.state != 'done') "
        "ORDER BY seq LIMIT ?",
        (after_seq, cutoff, limit),
    ).fetchall()
    seqs = [(seq,) for seq, _ in rows]
    conn.executemany("DELETE FROM deliveries WHERE seq = ?", seqs)
    conn.executemany("DELETE FROM envelopes WHERE seq = ?", seqs)
    return rows


def prune_rows_batch(
    conn: sqlite3.Connection, table: str, cutoff: float, *, limit: int = PRUNE_BATCH
) -> int:
    """Delete up to ``limit`` quarantine or session rows older than ``cutoff``."""
    column = {"quarantine": "received_at", "sessions": "ended_at"}[table]
    return conn.execute(
        f"DELETE FROM {table} WHERE id IN "  # table and column: from the map above
        f"(SELECT id FROM {table} WHERE {column} < ? ORDER BY id LIMIT ?)",
        (cutoff, limit),
    ).rowcount


def quick_check(db_path: Path) -> None:
    """``PRAGMA quick_check`` (SQLite's structural check without index cross-checks);
    raises JournalError naming the file and what to do when it is damaged."""
    problem = ""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check(20)")]
        finally:
            conn.close()
        if rows != ["ok"]:
            problem = "; ".join(str(r) for r in rows).replace("\n", "; ")
    except sqlite3.DatabaseError as err:
        problem = str(err)
    if problem:
        raise JournalError(
            f"journal {db_path} failed its integrity check (PRAGMA quick_check: {problem[:500]}). "
            "The gateway does not start on a damaged journal. Stop the service, keep the damaged "
            "file for analysis, and restore the state folder from the last backup with "
            f"'medgw restore --from BACKUP_DIR --config CONFIG' ({DOCS_HINT})."
        )


_Item = tuple[_Op, asyncio.Future[Any]]


class _Writer(threading.Thread):
    """Runs write operations in shared transactions (group commit).

    Operations arrive in batches, one per event-loop iteration (see
    ``Journal._submit``); batches that queue up while a commit is being synced
    join the next transaction, so a slower disk means bigger commits, not
    slower acknowledgements for everyone.
    """

    def __init__(self, db_path: Path, pre_commit: Callable[[], None]) -> None:
        super().__init__(name="journal-writer", daemon=True)
        self._conn = connect(db_path)
        self._pre_commit = pre_commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self.commits = 0

    def submit(self, items: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # one journal serves one event loop at a time
        self._queue.put(items)

    def stop(self) -> None:
        self._queue.put(None)
        self.join()
        self._conn.close()

    def run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = list(first)
            while len(batch) < BATCH_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            self._commit(batch)

    def _commit(self, batch: list[_Item]) -> None:
        conn = self._conn
        results: list[tuple[bool, Any]] = []
        try:
            self._pre_commit()
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as err:  # noqa: BLE001 - reported to that op's caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, err))
            conn.execute("COMMIT")
            self.commits += 1
        except (sqlite3.Error, OSError) as err:
            log.exception("journal.commit_failed ops=%d", len(batch))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = JournalError(f"journal commit failed: {err}")
            results = [(False, failure)] * len(batch)
        settled = [(fut, ok, value) for (_, fut), (ok, value) in zip(batch, results, strict=True)]
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_settle_all, settled)  # one wake-up per commit
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("journal.settle_after_loop_closed ops=%d", len(settled))


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in settled:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, JournalError):
            fut.set_exception(value)
        else:
            fut.set_exception(JournalError(f"journal write failed: {value!r}"))


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


class Journal:
    """Envelopes, their per-destination deliveries, and quarantined input."""

    def __init__(
        self,
        state_dir: Path,
        *,
        inline_max_bytes: int = 256 * 1024,
        min_free_mb: int = 0,
        integrity_check: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.db_path = self.state_dir / "journal.sqlite"
        self.blob_dir = self.state_dir / "blobs"
        self.inline_max = inline_max_bytes
        self.min_free = min_free_mb * 1024 * 1024
        self._writer: _Writer | None = None
        self._outbox: list[_Item] = []
        self._unsynced_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._read: sqlite3.Connection | None = None
        self._free_checked = (0.0, True)
        self.integrity_check = integrity_check
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> Journal:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(exist_ok=True)
        for tmp in self.blob_dir.rglob("*.tmp"):  # a crash mid-write leaves these; never acked
            tmp.unlink()
        self._lock_shared()
        try:
            if self.integrity_check and self.db_path.exists():
                started = time.monotonic()
                quick_check(self.db_path)
                log.info("journal.integrity_ok seconds=%.2f", time.monotonic() - started)
            conn = connect(self.db_path)
            try:
                conn.executescript(SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                if self.integrity_check:
                    self._dead_missing_blobs(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as err:
            self._unlock()
            raise JournalError(f"cannot open journal {self.db_path}: {err} ({DOCS_HINT})") from err
        except BaseException:
            self._unlock()
            raise
        self._writer = _Writer(self.db_path, self._sync_blob_dirs)
        self._writer.start()
        self._read = connect(self.db_path)
        return self

    def close(self) -> None:
        if self._outbox:  # submitted in this loop iteration: still committed
            with contextlib.suppress(RuntimeError):
                self._flush(asyncio.get_running_loop())
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._read is not None:
            self._read.close()
            self._read = None
        self._unlock()

    def _lock_shared(self) -> None:
        """Hold a shared lock on the state folder while open: ``medgw restore`` takes it
        exclusively, so it cannot replace the journal under a running gateway."""
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise JournalError(
                f"state folder {self.state_dir} is locked by a restore in progress"
            ) from err
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _dead_missing_blobs(self, conn: sqlite3.Connection) -> None:
        """A pending delivery whose blob file is gone can never be sent: mark it dead with
        the reason (an operator sees it in ``medgw queue list --state dead``) instead of
        letting the delivery loop fail on it for ever."""
        rows = conn.execute(
            "SELECT DISTINCT e.seq, e.id, e.blob FROM deliveries d JOIN envelopes e "
            "ON e.seq = d.seq WHERE d.state = 'pending' AND e.blob IS NOT NULL"
        ).fetchall()
        missing = [(seq, eid, rel) for seq, eid, rel in rows if not (self.blob_dir / rel).is_file()]
        if not missing:
            return
        now = time.time()
        with transaction(conn):
            for seq, eid, rel in missing:
                log.error(
                    "journal.blob_missing envelope=%s file=%s: its pending deliveries are dead",
                    eid,
                    self.blob_dir / rel,
                )
                conn.execute(
                    "UPDATE deliveries SET state = 'dead', updated_at = ?, last_error = ? "
                    "WHERE seq = ? AND state = 'pending'",
                    (now, f"blob file missing at start: blobs/{rel}", seq),
                )

    async def __aenter__(self) -> Journal:
        return self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def writer_alive(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    @property
    def commits(self) -> int:
        return self._writer.commits if self._writer else 0

    @property
    def reader(self) -> sqlite3.Connection:
        if self._read is None:
            raise JournalError("journal is not open")
        return self._read

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        """Queue a write; it goes to the writer with everything else submitted in the
        same event-loop iteration (many connections' accepts -> one commit)."""
        if self._writer is None:
            raise JournalError("journal is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._outbox.append((op, fut))
        if len(self._outbox) == 1:
            loop.call_soon(self._flush, loop)
        return fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        items, self._outbox = self._outbox, []
        if items and self._writer is not None:
            self._writer.submit(items, loop)

    def _check_free_space(self) -> None:
        if not self.min_free:
            return
        now = time.monotonic()
        checked_at, ok = self._free_checked
        if now - checked_at > FREE_SPACE_TTL_S:
            ok = shutil.disk_usage(self.state_dir).free >= self.min_free
            self._free_checked = (now, ok)
        if not ok:
            raise DiskFullError(f"free space in {self.state_dir} is below {self.min_free >> 20} MB")

    # -- accept -------------------------------------------------------------------------

    async def accept(self, env: Envelope, destinations: list[str]) -> Accepted:
        """Make ``env`` durable with one pending delivery per destination.

        If an envelope with the same idempotency key and identical bytes is already
        journaled, nothing is written and its id is returned as ``duplicate_of``.
        """
        self._check_free_space()
        blob = None
        if env.staged is not None:
            blob, digest = env.staged
        elif env.as_file or len(env.body) > self.inline_max:
            blob = f"{env.id[:4]}/{env.id}"
            try:  # large bodies: hashing and writing both off the event loop
                digest = await asyncio.to_thread(self._write_blob, blob, env.body)
            except OSError as err:
                raise JournalError(f"cannot write blob: {err}") from err
        else:
            digest = hashlib.sha256(env.body).hexdigest()
        try:
            accepted: Accepted = await self._submit(
                lambda conn: insert_envelope(conn, env, destinations, digest=digest, blob=blob)
            )
        except BaseException:  # not journaled (nor acknowledged): no orphan file either
            if blob:
                with contextlib.suppress(OSError):
                    (self.blob_dir / blob).unlink()
            raise
        if accepted.duplicate_of and blob:
            with contextlib.suppress(OSError):
                (self.blob_dir / blob).unlink()
        return accepted

    @property
    def spool_dir(self) -> Path:
        """Where listeners may write a body while it arrives (hidden ``.*.tmp`` files,
        removed at start), to hand it to :meth:`stage` as ``written``: on the blob
        store's filesystem, so that staging it is a rename."""
        return self.blob_dir / "spool"

    def stage(self, env: Envelope, written: Callable[[Path], str] | None = None) -> Envelope:
        """Write ``env``'s body as a blob file now, from the calling thread, so that
        :meth:`accept` only has to commit. For listeners that already run in a
        thread of their own (DICOM associations): one thread hop less per message.

        ``written``: the body is already in a file of :attr:`spool_dir`; called with
        the blob's path, it must make the file durable there and return its sha256
        (dicom.spool.Spool.commit). Thread-safe; raises JournalError (DiskFullError
        below the watermark)."""
        self._check_free_space()
        rel = f"{env.id[:4]}/{env.id}"
        try:
            digest = self._write_blob(rel, env.body, written)
        except OSError as err:
            raise JournalError(f"cannot write blob: {err}") from err
        return replace(env, staged=StagedBlob(rel, digest))

    def _write_blob(
        self, rel: str, data: bytes, written: Callable[[Path], str] | None = None
    ) -> str:
        """Write a blob file (fsynced, renamed into place) and return its sha256.

        The folder's own fsync, which makes the rename durable, is left to the
        writer thread just before the commit that references the blob: one per
        folder and commit instead of one per blob."""
        path = self.blob_dir / rel
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.blob_dir)
        if written is not None:
            digest = written(path)
        else:
            digest = hashlib.sha256(data).hexdigest()
            replace_synced(path, data)
        with self._dirs_lock:
            self._unsynced_dirs.add(path.parent)
        return digest

    def _sync_blob_dirs(self) -> None:
        """Writer thread, before each commit: make the renames of new blobs durable."""
        with self._dirs_lock:
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        for folder in dirs:
            fsync_dir(folder)

    async def add_deliveries(self, seq: int, destinations: list[str]) -> None:
        """More pending deliveries for an envelope already journaled (a route's steps
        passing the original on); a destination it already has is left as it is."""
        now = time.time()
        await self._submit(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO deliveries (seq, destination, state, next_at, updated_at) "
                "VALUES (?, ?, 'pending', ?, ?)",
                [(seq, d, now, now) for d in destinations],
            )
        )

    async def record_session(
        self, source: str, peer: str, started_at: float, ended_at: float, details: dict[str, Any]
    ) -> None:
        text = json.dumps(details, separators=(",", ":"), ensure_ascii=False, default=str)
        await self._submit(
            lambda c: c.execute(
                "INSERT INTO sessions (source, peer, started_at, ended_at, details) "
                "VALUES (?,?,?,?,?)",
                (source, peer, started_at, ended_at, text),
            )
        )

    async def quarantine(
        self, source: str, raw: bytes, reason: str, peer: str = "", size: int | None = None
    ) -> int:
        kept = raw[:QUARANTINE_KEEP]
        now = time.time()

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO quarantine (source, peer, received_at, reason, size, raw) "
                "VALUES (?,?,?,?,?,?)",
                (source, peer, now, reason, len(raw) if size is None else size, kept),
            )
            return int(cur.lastrowid or 0)

        result: int = await self._submit(op)
        return result

    # -- delivery side ------------------------------------------------------------------

    def pending(
        self, destination: str, *, limit: int, after_seq: int = 0, due_before: float | None = None
    ) -> list[Pending]:
        """Pending deliveries in accept order (bodies of blob envelopes not loaded)."""
        sql = (
            "SELECT d.destination, d.attempts, d.next_at, e.seq, e.id, e.kind, e.source, "
            "e.received_at, e.idem_key, e.parent_id, e.headers, e.body, e.blob "
            "FROM deliveries d JOIN envelopes e ON e.seq = d.seq "
            "WHERE d.destination = ? AND d.state = 'pending' AND d.seq > ?"
        )
        args: list[Any] = [destination, after_seq]
        if due_before is not None:
            sql += " AND d.next_at <= ?"
            args.append(due_before)
        sql += " ORDER BY d.seq LIMIT ?"
        args.append(limit)
        out = []
        for r in self.reader.execute(sql, args):
            env = StoredEnvelope(
                id=r[4],
                seq=r[3],
                kind=r[5],
                source=r[6],
                received_at=_ts(r[7]),
                idem_key=r[8],
                parent_id=r[9],
                headers=json.loads(r[10]),
                body=r[11] or b"",
                blob_path=self.blob_dir / r[12] if r[12] else None,
            )
            out.append(Pending(r[0], r[1], r[2], env, r[12]))
        return out

    def next_due(self, destination: str) -> float | None:
        row = self.reader.execute(
            "SELECT MIN(next_at) FROM deliveries WHERE destination = ? AND state = 'pending'",
            (destination,),
        ).fetchone()
        return row[0] if row else None

    def read_blob(self, rel: str) -> bytes:
        return (self.blob_dir / rel).read_bytes()

    def mark_done(self, destination: str, seq: int, confirmation: str) -> asyncio.Future[Any]:
        now = time.time()
        return self._submit(
            lambda c: c.execute(
                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, updated_at = ?, "
                "confirmation = ?, last_error = NULL WHERE destination = ? AND seq = ?",
                (now, confirmation, destination, seq),
            )
        )

    def mark_failed(
        self, destination: str, seq: int, *, error: str, next_at: float, dead: bool
    ) -> asyncio.Future[Any]:
        now = time.time()
        state = "dead" if dead else "pending"
        return self._submit(
            lambda c: c.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_at = ?, "
                "updated_at = ?, last_error = ? WHERE destination = ? AND seq = ?",
                (state, next_at, now, error[:1000], destination, seq),
            )
        )

    # -- retention ----------------------------------------------------------------------

    async def prune(
        self, retention: JournalRetention, *, now: float | None = None
    ) -> dict[str, int]:
        """Delete what the retention policy no longer keeps, a batch per writer op, and
        the blob files of the envelopes deleted. Returns counts per kind."""
        now = time.time() if now is None else now
        counts = {"envelopes": 0, "blobs": 0, "quarantine": 0, "sessions": 0}
        if retention.delivered_days is not None:
            cutoff = now - retention.delivered_days * 86400
            after = 0
            while True:
                fut = self._submit(partial(prune_delivered_batch, cutoff=cutoff, after_seq=after))
                try:
                    rows: list[tuple[int, str | None]] = await asyncio.shield(fut)
                except asyncio.CancelledError:  # committed anyway: still remove its files
                    fut.add_done_callback(self._unlink_blobs_when_done)
                    raise
                if not rows:
                    break
                after = rows[-1][0]
                counts["envelopes"] += len(rows)
                counts["blobs"] += await asyncio.to_thread(self._unlink_blobs, rows)
        for table, days in (
            ("quarantine", retention.quarantine_days),
            ("sessions", retention.sessions_days),
        ):
            if days is None:
                continue
            cutoff = now - days * 86400
            while n := await self._submit(partial(prune_rows_batch, table=table, cutoff=cutoff)):
                counts[table] += n
        return counts

    def _unlink_blobs(self, rows: list[tuple[int, str | None]]) -> int:
        n = 0
        for _, rel in rows:
            if rel:
                with contextlib.suppress(FileNotFoundError):
                    (self.blob_dir / rel).unlink()
                    n += 1
        return n

    def _unlink_blobs_when_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._unlink_blobs(fut.result())

    async def retain(self, retention: JournalRetention) -> None:
        """The service's retention task: prune at start, then every ``interval_s``."""
        while True:
            try:
                counts = await self.prune(retention)
                log.info(
                    "journal.pruned envelopes=%d blobs=%d quarantine=%d sessions=%d",
                    *counts.values(),
                )
            except JournalError as err:
                log.warning("journal.prune_failed error=%s", err)
            await asyncio.sleep(retention.interval_s)

    # -- reporting ----------------------------------------------------------------------

    def depth(self) -> dict[str, dict[str, int]]:
        """Deliveries per destination and state."""
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in self.reader.execute(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY 1, 2"
        ):
            out.setdefault(dest, {})[state] = n
        return out

    def oldest_pending(self) -> dict[str, float]:
        """Receive time of the oldest pending delivery per destination."""
        return dict(
            self.reader.execute(
                "SELECT d.destination, MIN(e.received_at) FROM deliveries d "
                "JOIN envelopes e ON e.seq = d.seq WHERE d.state = 'pending' GROUP BY 1"
            )
        )


@contextlib.contextmanager
def admin_connection(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """A connection for the CLI (``medgw queue``), safe beside a running gateway."""
    db = Path(state_dir) / "journal.sqlite"
    if not db.exists():
        raise JournalError(f"no journal at {db}")
    conn = connect(db)
    try:
        yield conn
    finally:
        conn.close()
