"""The AI audit trail: every triage decision, run or not, in its own SQLite file.

One row per (image, model): when, which study and instance, which model (id,
version, sha256), what went in (the image's geometry and the recipe), what came
out (probabilities, priority), how long it took, why it did not run when it did
not, and what was sent (SR/SC instance UIDs, HL7 control id, event). It also
holds each study's best result so far, so a study gets one result (re-issued only
when a later image makes it more suspicious). ``medgw ai history`` lists it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from gateway.journal import transaction

FILE_NAME = "ai_history.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS inferences (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    envelope    TEXT NOT NULL,
    study_uid   TEXT NOT NULL,
    sop_uid     TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    status      TEXT NOT NULL,          -- done | skipped | failed | timeout
    reason      TEXT NOT NULL DEFAULT '',
    priority    TEXT NOT NULL DEFAULT '',
    duration_ms REAL,
    inputs      TEXT NOT NULL DEFAULT '{}',
    outputs     TEXT NOT NULL DEFAULT '{}',
    sent        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS inferences_study ON inferences (study_uid);
CREATE TABLE IF NOT EXISTS study_results (
    study_uid   TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    score       REAL NOT NULL,          -- rank of the priority, then the top probability
    result      TEXT NOT NULL,          -- gateway.triage.TriageResult as JSON
    envelope    TEXT NOT NULL DEFAULT '', -- the image's envelope (a re-run re-issues)
    PRIMARY KEY (study_uid, model_id)
);
"""


def _beats(row: tuple[float, str] | None, score: float, envelope: str) -> bool:
    return row is None or row[0] < score or bool(envelope and row[1] == envelope)


class History:
    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(study_results)")}
        if "envelope" not in columns:  # a file from before re-runs were told apart
            self._conn.execute(
                "ALTER TABLE study_results ADD COLUMN envelope TEXT NOT NULL DEFAULT ''"
            )
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def record(
        self,
        *,
        envelope: str,
        study_uid: str,
        sop_uid: str,
        model: tuple[str, str, str],
        status: str,
        reason: str = "",
        priority: str = "",
        duration_ms: float | None = None,
        inputs: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        sent: dict[str, Any] | None = None,
    ) -> None:
        model_id, version, sha = model
        with self._lock, transaction(self._conn) as conn:
            conn.execute(
                "INSERT INTO inferences (at, envelope, study_uid, sop_uid, model_id, "
                "model_version, model_sha256, status, reason, priority, duration_ms, inputs, "
                "outputs, sent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    time.time(),
                    envelope,
                    study_uid,
                    sop_uid,
                    model_id,
                    version,
                    sha,
                    status,
                    reason,
                    priority,
                    duration_ms,
                    json.dumps(inputs or {}),
                    json.dumps(outputs or {}),
                    json.dumps(sent or {}),
                ),
            )

    def best(self, study_uid: str, model_id: str) -> tuple[float, bytes] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT score, result FROM study_results WHERE study_uid = ? AND model_id = ?",
                (study_uid, model_id),
            ).fetchone()
        return (float(row[0]), row[1].encode()) if row else None

    def beats(self, study_uid: str, model_id: str, score: float, envelope: str = "") -> bool:
        """Whether :meth:`keep_best` would store this result now (nothing is written)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT score, envelope FROM study_results WHERE study_uid = ? AND model_id = ?",
                (study_uid, model_id),
            ).fetchone()
        return _beats(row, score, envelope)

    def keep_best(
        self, study_uid: str, model_id: str, score: float, result: bytes, envelope: str = ""
    ) -> bool:
        """Store ``result`` as the study's if it beats the stored one; True when it did.

        True also when the stored best came from the same ``envelope``: the step is
        run again for that image (a retry, a restart before its outputs were
        journaled) and must issue them again (the journal drops exact duplicates).
        """
        with self._lock, transaction(self._conn) as conn:
            row = conn.execute(
                "SELECT score, envelope FROM study_results WHERE study_uid = ? AND model_id = ?",
                (study_uid, model_id),
            ).fetchone()
            if not _beats(row, score, envelope):
                return False
            conn.execute(
                "INSERT OR REPLACE INTO study_results (study_uid, model_id, score, result, "
                "envelope) VALUES (?, ?, ?, ?, ?)",
                (study_uid, model_id, score, result.decode(), envelope),
            )
            return True

    def rows(self, study_uid: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = (
            "SELECT at, study_uid, sop_uid, model_id, model_version, status, reason, priority, "
            "duration_ms, inputs, outputs, sent FROM inferences"
        )
        args: tuple[Any, ...] = ()
        if study_uid:
            sql += " WHERE study_uid = ?"
            args = (study_uid,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            found = self._conn.execute(sql, (*args, limit)).fetchall()
        keys = (
            "at",
            "study_uid",
            "sop_uid",
            "model_id",
            "model_version",
            "status",
            "reason",
            "priority",
            "duration_ms",
            "inputs",
            "outputs",
            "sent",
        )
        out = []
        for row in found:
            item = dict(zip(keys, row, strict=True))
            item["inputs"] = json.loads(item["inputs"])
            item["outputs"] = json.loads(item["outputs"])
            item["sent"] = json.loads(item["sent"])
            out.append(item)
        return out
