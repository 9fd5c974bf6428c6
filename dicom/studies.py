"""Study grouping: a "study complete" event once a study has been quiet for a while.

DICOM has no end-of-study message, so the gateway infers one (the usual PACS
practice): the SCP notes every instance it journaled; when no new instance of
a study has arrived for ``study_quiet_s``, one event envelope goes through the
journal and the routes (``{kind: event, event: study.complete}``).

The open studies live in their own SQLite file beside the journal
(``<state_dir>/dicom-studies.sqlite``), so a restart forgets nothing and the
journal's tables stay the core's. The event's body is a function of the
stored rows only, so a repeat after a crash (or a race with
``medgw dicom complete``) has the same idempotency key and bytes, and the
journal keeps one. Instances arriving after the event reopen the study; its
next event carries the new count (a new key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.envelope import Envelope
from gateway.errors import JournalError
from gateway.interfaces import Intake
from gateway.journal import transaction

log = logging.getLogger(__name__)

DB_NAME = "dicom-studies.sqlite"
EVENT = "study.complete"
KEEP_COMPLETED_S = 30 * 86400  # completed studies are forgotten after this

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    source        TEXT NOT NULL,             -- the listener that received it
    study_uid     TEXT NOT NULL,
    accession     TEXT NOT NULL DEFAULT '',
    calling_ae    TEXT NOT NULL DEFAULT '',
    first_at      REAL NOT NULL,             -- unix seconds
    last_at       REAL NOT NULL,
    completed_at  REAL,                      -- NULL while open
    completed_instances INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, study_uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS studies_open ON studies (source, last_at) WHERE completed_at IS NULL;
CREATE TABLE IF NOT EXISTS instances (
    source        TEXT NOT NULL,
    study_uid     TEXT NOT NULL,
    sop_uid       TEXT NOT NULL,
    modality      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (source, study_uid, sop_uid)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance the SCP journaled (what grouping needs; no patient data)."""

    source: str
    study_uid: str
    sop_uid: str
    accession: str = ""
    modality: str = ""
    calling_ae: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Study:
    source: str
    study_uid: str
    accession: str
    calling_ae: str
    first_at: float
    last_at: float
    instances: int
    modalities: dict[str, int]
    completed_at: float | None = None
    completed_instances: int = 0

    @property
    def is_open(self) -> bool:
        return self.completed_at is None

    @property
    def modality(self) -> str:
        """The study's main modality: the one with most instances (ties: by name)."""
        if not self.modalities:
            return ""
        return min(self.modalities.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def event(self) -> Envelope:
        """The ``study.complete`` event envelope (kind ``event``, source: the listener)."""
        doc = {
            "event": EVENT,
            "source": self.source,
            "study_uid": self.study_uid,
            "accession": self.accession,
            "modality": self.modality,
            "modalities": self.modalities,
            "instances": self.instances,
            "calling_ae": self.calling_ae,
            "first_received_at": _iso(self.first_at),
            "last_received_at": _iso(self.last_at),
        }
        optional = {
            "accession": self.accession,
            "modality": self.modality,
            "calling_ae": self.calling_ae,
        }
        headers = {
            "event": EVENT,
            "study_uid": self.study_uid,
            "instances": str(self.instances),
            **{key: value for key, value in optional.items() if value},
        }
        return Envelope(
            kind="event",
            source=self.source,
            body=json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
            headers=headers,
            idem_key=f"study-complete:{self.study_uid}:{self.instances}",
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class StudyStore:
    """The tracker's SQLite file. Synchronous: call it from a worker thread (or the CLI).

    One connection, used by one thread at a time; WAL lets the CLI write beside a
    running gateway. ``synchronous=NORMAL``: a power cut may forget the last
    instances noted (the instances themselves are safe in the journal), never
    corrupt the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def open(self) -> StudyStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)
        self._conn = conn
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> StudyStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("study store is not open")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with transaction(self.conn) as conn:
            yield conn

    def record(self, instances: Iterable[Instance]) -> int:
        """Note instances (a resent one counts once); returns how many were new."""
        new = 0
        with self._transaction() as conn:
            for i in instances:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO instances (source, study_uid, sop_uid, modality) "
                    "VALUES (?,?,?,?)",
                    (i.source, i.study_uid, i.sop_uid, i.modality),
                )
                if not cur.rowcount:
                    continue
                new += 1
                conn.execute(
                    "INSERT INTO studies (source, study_uid, accession, calling_ae, first_at, "
                    "last_at) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT (source, study_uid) DO UPDATE SET "
                    "last_at = max(last_at, excluded.last_at), completed_at = NULL, "
                    "calling_ae = excluded.calling_ae, "
                    "accession = CASE WHEN accession = '' THEN excluded.accession "
                    "ELSE accession END",
                    (i.source, i.study_uid, i.accession, i.calling_ae, i.at, i.at),
                )
        return new

    def due(self, source: str, quiet_before: float) -> list[Study]:
        """Open studies of ``source`` whose last instance came before ``quiet_before``."""
        rows = self.conn.execute(
            "SELECT study_uid FROM studies WHERE source = ? AND completed_at IS NULL "
            "AND last_at <= ? ORDER BY last_at",
            (source, quiet_before),
        ).fetchall()
        return [s for (uid,) in rows if (s := self.get(source, uid)) is not None]

    def get(self, source: str, study_uid: str) -> Study | None:
        row = self.conn.execute(
            "SELECT accession, calling_ae, first_at, last_at, completed_at, "
            "completed_instances FROM studies WHERE source = ? AND study_uid = ?",
            (source, study_uid),
        ).fetchone()
        if row is None:
            return None
        modalities: dict[str, int] = dict(
            self.conn.execute(
                "SELECT modality, COUNT(*) FROM instances WHERE source = ? AND study_uid = ? "
                "GROUP BY modality",
                (source, study_uid),
            )
        )
        return Study(
            source=source,
            study_uid=study_uid,
            accession=row[0],
            calling_ae=row[1],
            first_at=row[2],
            last_at=row[3],
            instances=sum(modalities.values()),
            modalities={m: n for m, n in modalities.items() if m},
            completed_at=row[4],
            completed_instances=row[5],
        )

    def find(self, study_uid: str) -> list[Study]:
        """The study as every listener saw it (usually one)."""
        sources = [
            s
            for (s,) in self.conn.execute(
                "SELECT source FROM studies WHERE study_uid = ? ORDER BY source", (study_uid,)
            )
        ]
        return [s for src in sources if (s := self.get(src, study_uid)) is not None]

    def mark_complete(self, study: Study, at: float | None = None) -> bool:
        """Close ``study`` if no instance arrived since it was read; False if one did
        (it stays open and completes later with the new count)."""
        with self._transaction() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM instances WHERE source = ? AND study_uid = ?",
                (study.source, study.study_uid),
            ).fetchone()
            if count != study.instances:
                return False
            conn.execute(
                "UPDATE studies SET completed_at = ?, completed_instances = ? "
                "WHERE source = ? AND study_uid = ?",
                (at or time.time(), count, study.source, study.study_uid),
            )
        return True

    def prune(self, completed_before: float) -> int:
        """Forget studies completed before ``completed_before``; returns how many."""
        with self._transaction() as conn:
            old = conn.execute(
                "SELECT source, study_uid FROM studies WHERE completed_at < ?",
                (completed_before,),
            ).fetchall()
            conn.executemany("DELETE FROM instances WHERE source = ? AND study_uid = ?", old)
            conn.executemany("DELETE FROM studies WHERE source = ? AND study_uid = ?", old)
        return len(old)


def store_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / DB_NAME


class StudyTracker:
    """One listener's study grouping, driven from its housekeeping task on the event loop.

    :meth:`record` writes the instances the listener journaled (after their ACK);
    :meth:`complete_due` journals one ``study.complete`` event per study quiet for
    ``quiet_s`` and closes it. The SQLite work runs in worker threads, one call at a
    time (the housekeeping task awaits each).
    """

    def __init__(self, source: str, state_dir: str | Path, quiet_s: float, intake: Intake) -> None:
        self.source = source
        self.quiet_s = quiet_s
        self.intake = intake
        self.store = StudyStore(store_path(state_dir))
        self._pruned_at = 0.0

    async def open(self) -> StudyTracker:
        await asyncio.to_thread(self.store.open)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    async def record(self, instances: list[Instance]) -> None:
        await asyncio.to_thread(self.store.record, instances)

    async def complete_due(self) -> None:
        """Emit the events that are due; a journal failure leaves the rest for next time."""
        now = time.time()
        for study in await asyncio.to_thread(self.store.due, self.source, now - self.quiet_s):
            try:
                accepted = await self.intake.accept(study.event())
            except JournalError as err:
                log.warning("dicom.study_event_deferred listener=%s error=%s", self.source, err)
                return
            closed = await asyncio.to_thread(self.store.mark_complete, study)
            log.info(
                "dicom.study_complete listener=%s study=%s instances=%d envelope=%s%s",
                self.source,
                study.study_uid,
                study.instances,
                accepted.duplicate_of or accepted.id,
                "" if closed else " (more arrived: stays open)",
            )
        if now - self._pruned_at > 3600:
            self._pruned_at = now
            await asyncio.to_thread(self.store.prune, now - KEEP_COMPLETED_S)
