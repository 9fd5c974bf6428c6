"""The lab orders table: what the LIS ordered per specimen, for analyzers' host queries
and order downloads.

Filled by the ``lab-orders`` route step (OML^O21 / ORM^O01 from the LIS); read by
the analyzer sessions, which answer every host query from it within the
analyzer's timeout, whether or not the LIS is reachable at that moment. Its own
SQLite file in the state folder (WAL, synchronous=FULL): the journal's tables
are the core's alone. Orders are keyed by specimen id and the LIS order number;
a query for a specimen gets all its active orders' tests, merged.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.journal import transaction
from gateway.orders import Order
from gateway.registry import PluginContext

SERVICE_KEY = "lab-orders"

SCHEMA = """
CREATE TABLE IF NOT EXISTS lab_orders (
    specimen_id TEXT NOT NULL,
    accession   TEXT NOT NULL,
    body        TEXT NOT NULL,          -- gateway.orders.Order as JSON
    updated_at  REAL NOT NULL,
    PRIMARY KEY (specimen_id, accession)
);
CREATE TABLE IF NOT EXISTS lab_downloads (   -- orders sent to an analyzer (download mode)
    instrument  TEXT NOT NULL,
    specimen_id TEXT NOT NULL,
    version     REAL NOT NULL,               -- lab_orders.updated_at that was sent
    sent_at     REAL NOT NULL,
    PRIMARY KEY (instrument, specimen_id)
);
"""


class LabOrderStore:
    """Thread-safe (one connection behind a lock); every call is one short transaction."""

    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir) / "lab_orders.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        # (instrument, specimen) -> the version not_downloaded handed out: an order that
        # changes while its download is on the wire is sent again
        self._offered: dict[tuple[str, str], float] = {}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def apply(self, order: Order) -> None:
        """New and updated orders replace the stored one for (specimen, accession); a
        cancel removes it (or only the tests it names, when it names some)."""
        specimen = order.specimen_id or order.accession
        with self._lock, transaction(self._conn) as conn:
            if order.control != "cancel":
                conn.execute(
                    "INSERT OR REPLACE INTO lab_orders VALUES (?, ?, ?, ?)",
                    (specimen, order.accession, order.to_json().decode(), time.time()),
                )
                return
            row = conn.execute(
                "SELECT body FROM lab_orders WHERE specimen_id = ? AND accession = ?",
                (specimen, order.accession),
            ).fetchone()
            left: tuple[str, ...] = ()
            if row and order.tests:
                stored = Order.from_json(row[0].encode())
                left = tuple(t for t in stored.tests if t not in order.tests)
            if left:
                kept = stored.model_copy(update={"tests": left})
                conn.execute(
                    "UPDATE lab_orders SET body = ?, updated_at = ? "
                    "WHERE specimen_id = ? AND accession = ?",
                    (kept.to_json().decode(), time.time(), specimen, order.accession),
                )
            else:
                conn.execute(
                    "DELETE FROM lab_orders WHERE specimen_id = ? AND accession = ?",
                    (specimen, order.accession),
                )

    def find(self, specimen_id: str) -> Order | None:
        """The specimen's orders merged into one (tests in order, no repeats)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT body FROM lab_orders WHERE specimen_id = ? ORDER BY updated_at",
                (specimen_id.strip(),),
            ).fetchall()
        orders = [Order.from_json(r[0].encode()) for r in rows]
        return merge(orders)

    def not_downloaded(self, instrument: str, limit: int = 50) -> list[Order]:
        """Specimens whose current orders were not yet sent to ``instrument``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT o.specimen_id, MAX(o.updated_at) FROM lab_orders o "
                "LEFT JOIN lab_downloads d "
                "ON d.instrument = ? AND d.specimen_id = o.specimen_id "
                "GROUP BY o.specimen_id HAVING MAX(o.updated_at) > COALESCE(MAX(d.version), 0) "
                "ORDER BY MIN(o.updated_at) LIMIT ?",
                (instrument, limit),
            ).fetchall()
            for specimen, version in rows:
                self._offered[(instrument, specimen)] = version
        found = (self.find(r[0]) for r in rows)
        return [o for o in found if o is not None]

    def mark_downloaded(self, instrument: str, specimen_ids: Iterable[str]) -> None:
        """Record that ``instrument`` got these specimens' orders in the version
        :meth:`not_downloaded` gave out (the current one when it gave none)."""
        now = time.time()
        with self._lock, transaction(self._conn) as conn:
            for specimen in specimen_ids:
                version = self._offered.pop((instrument, specimen), None)
                if version is None:
                    version = conn.execute(
                        "SELECT MAX(updated_at) FROM lab_orders WHERE specimen_id = ?",
                        (specimen,),
                    ).fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO lab_downloads VALUES (?, ?, ?, ?)",
                    (instrument, specimen, version or now, now),
                )

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM lab_orders").fetchone()[0])


def merge(orders: list[Order]) -> Order | None:
    if not orders:
        return None
    tests: list[str] = []
    for o in orders:
        tests.extend(t for t in o.tests if t not in tests)
    latest = orders[-1]
    priority = "S" if any(o.priority == "S" for o in orders) else latest.priority
    return latest.model_copy(update={"tests": tuple(tests), "priority": priority})


def order_store(ctx: PluginContext) -> LabOrderStore:
    """The gateway's one store (``<state_dir>/lab_orders.sqlite``), shared through
    ``ctx.services`` by the ``lab-orders`` step and the analyzer listeners."""
    store = ctx.services.get(SERVICE_KEY)
    if store is None:
        store = ctx.services[SERVICE_KEY] = LabOrderStore(ctx.state_dir)
    if not isinstance(store, LabOrderStore):
        raise TypeError(f"ctx.services[{SERVICE_KEY!r}] is a {type(store).__name__}")
    return store
