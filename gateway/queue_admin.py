"""``medgw queue``: look at and act on the journal, with the gateway running or stopped.

Works through its own SQLite connection; WAL mode lets it read beside a running
gateway, and the gateway's delivery loops notice changes within a second.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path


def _fmt_ts(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def stats(
    conn: sqlite3.Connection, *, destination: str | None = None
) -> list[tuple[str, int, int, int, str]]:
    """(destination, pending, done, dead, oldest pending receive time) per destination
    (only ``destination`` when given)."""
    where, args = ("WHERE d.destination = ? ", [destination]) if destination else ("", [])
    rows = conn.execute(
        "SELECT d.destination, "
        "SUM(d.state = 'pending'), SUM(d.state = 'done'), SUM(d.state = 'dead'), "
        "MIN(CASE WHEN d.state = 'pending' THEN e.received_at END) "
        f"FROM deliveries d JOIN envelopes e ON e.seq = d.seq {where}GROUP BY 1 ORDER BY 1",
        args,
    ).fetchall()
    return [(r[0], r[1], r[2], r[3], _fmt_ts(r[4])) for r in rows]


def totals(conn: sqlite3.Connection) -> dict[str, int]:
    q = conn.execute
    return {
        "envelopes": q("SELECT COUNT(*) FROM envelopes").fetchone()[0],
        "unrouted": q(
            "SELECT COUNT(*) FROM envelopes e WHERE NOT EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.seq = e.seq)"
        ).fetchone()[0],
        "quarantined": q("SELECT COUNT(*) FROM quarantine").fetchone()[0],
    }


def list_deliveries(
    conn: sqlite3.Connection, *, destination: str | None, state: str | None, limit: int
) -> Iterator[dict[str, object]]:
    sql = (
        "SELECT e.id, e.received_at, e.source, e.kind, e.headers, e.size, d.destination, "
        "d.state, d.attempts, d.next_at, d.last_error, d.confirmation "
        "FROM deliveries d JOIN envelopes e ON e.seq = d.seq WHERE 1=1"
    )
    args: list[object] = []
    if destination:
        sql += " AND d.destination = ?"
        args.append(destination)
    if state:
        sql += " AND d.state = ?"
        args.append(state)
    sql += " ORDER BY d.seq DESC LIMIT ?"
    args.append(limit)
    for r in conn.execute(sql, args):
        headers = json.loads(r[4])
        yield {
            "envelope": r[0],
            "received": _fmt_ts(r[1]),
            "source": r[2],
            "kind": r[3],
            "type": headers.get("message_type", ""),
            "control_id": headers.get("control_id", ""),
            "size": r[5],
            "destination": r[6],
            "state": r[7],
            "attempts": r[8],
            "next": _fmt_ts(r[9]) if r[7] == "pending" else "-",
            "last_error": r[10] or "",
            "confirmation": r[11] or "",
        }


def list_quarantine(conn: sqlite3.Connection, *, limit: int) -> Iterator[dict[str, object]]:
    for r in conn.execute(
        "SELECT id, received_at, source, peer, size, reason, raw "
        "FROM quarantine ORDER BY id DESC LIMIT ?",
        (limit,),
    ):
        yield {
            "id": r[0],
            "received": _fmt_ts(r[1]),
            "source": r[2],
            "peer": r[3],
            "size": r[4],
            "reason": r[5],
            "head": bytes(r[6][:60]),
        }


def quarantined_raw(conn: sqlite3.Connection, qid: int) -> bytes | None:
    row = conn.execute("SELECT raw FROM quarantine WHERE id = ?", (qid,)).fetchone()
    return bytes(row[0]) if row else None


def retry(conn: sqlite3.Connection, *, destination: str | None, envelope: str | None) -> int:
    """Dead deliveries back to pending, and waiting ones due now; returns the count."""
    sql = (
        "UPDATE deliveries SET state = 'pending', next_at = ?, updated_at = ? "
        "WHERE state IN ('pending', 'dead')"
    )
    now = time.time()
    args: list[object] = [now, now]
    if destination:
        sql += " AND destination = ?"
        args.append(destination)
    if envelope:
        sql += " AND seq = (SELECT seq FROM envelopes WHERE id = ?)"
        args.append(envelope)
    return conn.execute(sql, args).rowcount


def purge_delivered(
    conn: sqlite3.Connection,
    state_dir: Path,
    *,
    older_than_s: float,
    destination: str | None = None,
) -> int:
    """Delete envelopes received before the cutoff whose every delivery is done (and
    unrouted ones), with their blob files. Pending or dead ones are never touched.
    With ``destination``, only envelopes that were delivered to it."""
    cutoff = time.time() - older_than_s
    sql = (
        "SELECT seq, blob FROM envelopes e WHERE received_at < ? AND NOT EXISTS "
        "(SELECT 1 FROM deliveries d WHERE d.seq = e.seq AND d.state != 'done')"
    )
    args: list[object] = [cutoff]
    if destination:
        sql += " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = e.seq AND d.destination = ?)"
        args.append(destination)
    rows = conn.execute(sql, args).fetchall()
    conn.execute("BEGIN IMMEDIATE")
    for seq, _ in rows:
        conn.execute("DELETE FROM deliveries WHERE seq = ?", (seq,))
        conn.execute("DELETE FROM envelopes WHERE seq = ?", (seq,))
    conn.execute("COMMIT")
    for _, blob in rows:
        if blob:
            (Path(state_dir) / "blobs" / blob).unlink(missing_ok=True)
    return len(rows)


def purge_dead(conn: sqlite3.Connection, *, destination: str) -> int:
    """Give up on a destination's dead deliveries for good (the envelopes stay)."""
    return conn.execute(
        "DELETE FROM deliveries WHERE state = 'dead' AND destination = ?", (destination,)
    ).rowcount


def purge_quarantine(conn: sqlite3.Connection, *, older_than_s: float) -> int:
    return conn.execute(
        "DELETE FROM quarantine WHERE received_at < ?", (time.time() - older_than_s,)
    ).rowcount
