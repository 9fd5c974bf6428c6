"""The audit trail: who sent what to whom, append-only in SQLite, exported as RFC 5424 syslog.

The gateway's :class:`~gateway.events.EventBus` hands every event to
:meth:`AuditLog.on_event`, which only appends to a bounded in-memory list. A
writer task moves that list in batches into ``<state_dir>/audit.sqlite`` (WAL);
triggers there refuse UPDATE, and DELETE of any row younger than the retention
limit, so the only deletion that succeeds is the retention pruning.

When ``audit.syslog`` is set, a sender task reads the records from the file in
``seq`` order and sends each as an RFC 5424 message (IHE ATNA transport, DICOM
PS3.15 A.5) over UDP (RFC 5426), TCP (RFC 6587 octet counting) or TLS (RFC 5425).
The last ``seq`` sent is kept in the file (``syslog_sent_seq``), so after a
collector outage, or a restart, the sender resumes from there: nothing recorded
is lost while the collector is away. docs/audit.md has the record and wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from gateway.config import Audit, Syslog
from gateway.events import Event, PatientIds
from gateway.secrets import read_secret
from gateway.tasks import cancel_all
from gateway.tls import TlsSettings

log = logging.getLogger(__name__)

FILE_NAME = "audit.sqlite"
FLUSH_S = 0.2  # events reach the audit file within this
PRUNE_EVERY_S = 86_400.0
SEND_BATCH = 200
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 30.0
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4

# Who sent what to whom. destination.down/up are left out: they concern a link, not
# a message or a patient, and are in the logs, metrics and MQTT telemetry already.
AUDITED = frozenset(
    {
        "message.received",
        "message.duplicate",
        "message.quarantined",
        "message.delivered",
        "message.dead",
        "session.ended",
        "ai.flagged",
        "ai.failed",
    }
)

COLUMNS = (
    "seq",
    "at",
    "event",
    "source",
    "destination",
    "envelope",
    "kind",
    "peer",
    "outcome",
    "ids",
    "detail",
)


def schema(retention_days: int) -> str:
    """Tables and the append-only triggers. The DELETE trigger names the retention
    limit, so it is recreated at each open (a changed ``retention_days`` applies)."""
    return f"""
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    envelope TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    ids TEXT NOT NULL DEFAULT '{{}}',
    detail TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TABLE IF NOT EXISTS audit_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
DROP TRIGGER IF EXISTS audit_retention_only;
CREATE TRIGGER audit_retention_only BEFORE DELETE ON audit
WHEN OLD.at > CAST(strftime('%s', 'now') AS REAL) - {int(retention_days) * 86400}
BEGIN SELECT RAISE(ABORT, 'audit records are kept for {int(retention_days)} days'); END;
"""


class Record(NamedTuple):
    seq: int
    at: float
    event: str
    source: str
    destination: str
    envelope: str
    kind: str
    peer: str
    outcome: str
    ids: dict[str, str]
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"seq": self.seq, "event": self.event, "at": iso_time(self.at)}
        for name in ("source", "destination", "envelope", "kind", "peer", "outcome"):
            value = getattr(self, name)
            if value:
                doc[name] = value
        if self.ids:
            doc["ids"] = self.ids
        if self.detail:
            doc["detail"] = self.detail
        return doc


Row = tuple[float, str, str, str, str, str, str, str, str, str]  # a Record without seq


def row_for(event: Event, patient_ids: PatientIds, salt: str) -> Row:
    """The stored shape of ``event``, the patient id already under the site's policy."""
    doc = event.as_dict(patient_ids, salt)
    return (
        event.at,
        event.event,
        event.source,
        event.destination,
        event.envelope,
        event.kind,
        event.peer,
        event.outcome,
        _json(doc.get("ids", {})),
        _json(doc.get("detail", {})),
    )


class AuditStore:
    """``audit.sqlite``: one connection, used from worker threads under a lock."""

    def __init__(self, path: Path, retention_days: int, *, readonly: bool = False) -> None:
        self.path = path
        self.retention_days = retention_days
        self._lock = threading.Lock()
        if readonly:
            uri = f"file:{path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(schema(retention_days))

    def append(self, rows: Sequence[Row]) -> int:
        """Store ``rows`` in one transaction; the last seq."""
        with self._lock, self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                f"INSERT INTO audit ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * 10)})",
                rows,
            )
            return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0])

    def prune(self, now: float | None = None) -> int:
        """Delete what is older than the retention limit (the one DELETE the trigger allows)."""
        cutoff = (now or time.time()) - self.retention_days * 86400
        with self._lock, self.conn:
            return self.conn.execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount

    def records(
        self,
        *,
        after_seq: int = 0,
        since: float | None = None,
        event: str | None = None,
        limit: int = SEND_BATCH,
        newest_first: bool = False,
    ) -> list[Record]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq > ?"
        args: list[object] = [after_seq]
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        if event:
            sql += " AND event = ?"
            args.append(event)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self.conn.execute(sql, args).fetchall()
        return [
            Record(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                json.loads(r[9]),
                json.loads(r[10]),
            )
            for r in rows
        ]

    def iter_records(
        self, *, since: float | None = None, event: str | None = None
    ) -> Iterator[Record]:
        after = 0
        while batch := self.records(after_seq=after, since=since, event=event, limit=1000):
            yield from batch
            after = batch[-1].seq

    def last_seq(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0])

    def sent_seq(self) -> int:
        """``syslog_sent_seq``: the last record handed to the collector."""
        with self._lock:
            row = self.conn.execute(
                "SELECT value FROM audit_state WHERE name = 'syslog_sent_seq'"
            ).fetchone()
        return int(row[0]) if row else 0

    def set_sent_seq(self, seq: int) -> None:
        with self._lock, self.conn:
            self.conn.execute(
                "INSERT INTO audit_state (name, value) VALUES ('syslog_sent_seq', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (seq,),
            )

    def close(self) -> None:
        with self._lock:
            self.conn.close()


# -- RFC 5424 ---------------------------------------------------------------------------


class SyslogFormat:
    """RFC 5424 section 6: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG``."""

    def __init__(self, cfg: Syslog, site_id: str) -> None:
        self.facility = cfg.facility
        self.hostname = _header_field(cfg.hostname or socket.gethostname(), 255)
        self.app_name = _header_field(cfg.app_name, 48)
        self.procid = str(os.getpid())
        self.sd_id = cfg.sd_id
        self.ids_sd_id = "ids@" + cfg.sd_id.rpartition("@")[2]  # the same enterprise number
        self.site_id = site_id

    def format(self, record: Record) -> bytes:
        severity = (
            SEVERITY_NOTICE if record.outcome in ("ok", "duplicate", "") else SEVERITY_WARNING
        )
        params = {
            "seq": str(record.seq),
            "site": self.site_id,
            "source": record.source,
            "destination": record.destination,
            "envelope": record.envelope,
            "kind": record.kind,
            "peer": record.peer,
            "outcome": record.outcome,
        }
        sd = _sd_element(self.sd_id, params)
        if record.ids:
            sd += _sd_element(self.ids_sd_id, record.ids)
        body = {**record.as_dict(), "site": self.site_id}
        header = (
            f"<{self.facility * 8 + severity}>1 {iso_time(record.at)} {self.hostname} "
            f"{self.app_name} {self.procid} {_header_field(record.event, 32)} {sd} "
        )
        # RFC 5424 6.4: a UTF-8 MSG starts with the BOM
        return header.encode("ascii") + b"\xef\xbb\xbf" + _json(body).encode("utf-8")


def _header_field(value: str, limit: int) -> str:
    text = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return text or "-"


def _sd_name(name: str) -> str:
    return "".join(c for c in name if "!" <= c <= "~" and c not in '= ]"')[:32] or "_"


def _sd_element(sd_id: str, params: Mapping[str, str]) -> str:
    """RFC 5424 6.3: ``[id name="value" ...]``; ``"``, ``\\`` and ``]`` escaped."""
    parts = [sd_id]
    for name, value in params.items():
        if value:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
            parts.append(f'{_sd_name(name)}="{escaped}"')
    return "[" + " ".join(parts) + "]"


def iso_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds (RFC 5424 6.2.3)."""
    ms = round(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


class SyslogLink:
    """One connection to the collector; raises OSError when it is gone."""

    def __init__(self, cfg: Syslog, config_dir: str) -> None:
        self.scheme = cfg.url.split("://", 1)[0]
        self.host, self.port = cfg.endpoint
        self.tls = (
            TlsSettings(
                ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file
            ).client_context(config_dir, where="audit.syslog")
            if self.scheme == "tls"
            else None
        )
        self._udp: socket.socket | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.scheme == "udp":
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.connect(addr)  # a connected socket reports ICMP port unreachable
            self._udp = sock
            return
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
            ),
            10,
        )

    async def send(self, messages: Sequence[bytes]) -> None:
        if self._udp is not None:
            for msg in messages:  # RFC 5426: one message per datagram
                self._udp.send(msg)
            return
        if self._writer is None or self._reader is None or self._reader.at_eof():
            raise ConnectionResetError("syslog collector closed the connection")
        # RFC 6587 3.4.1 / RFC 5425 4.3: MSG-LEN SP SYSLOG-MSG
        self._writer.write(b"".join(b"%d %s" % (len(msg), msg) for msg in messages))
        await self._writer.drain()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 2)
            self._writer = self._reader = None


# -- the component ----------------------------------------------------------------------


class AuditLog:
    """Subscribes to the event bus; writes the audit file and feeds the syslog collector."""

    def __init__(self, cfg: Audit, site_id: str, state_dir: Path, *, config_dir: str = "") -> None:
        self.cfg = cfg
        self.patient_ids: PatientIds = cfg.patient_ids  # type: ignore[assignment]
        self.salt = (
            read_secret(cfg.hash_salt_file, config_dir, what="audit hash salt")
            if cfg.hash_salt_file
            else site_id
        )
        self.store = AuditStore(state_dir / FILE_NAME, cfg.retention_days)
        self.format = SyslogFormat(cfg.syslog, site_id) if cfg.syslog else None
        self.link = SyslogLink(cfg.syslog, config_dir) if cfg.syslog else None
        self.connected = False
        self.dropped = 0
        self.written_seq = 0
        self._pending: list[Event] = []  # from the bus, not yet in the file
        self.sent_seq = 0  # syslog_sent_seq as last stored
        self._wake = asyncio.Event()  # new records in the file
        self._progress = asyncio.Event()  # syslog_sent_seq moved
        self._tasks: list[asyncio.Task[None]] = []

    # -- the bus side (never blocks, never raises) ----------------------------------------

    def on_event(self, event: Event) -> None:
        if event.event not in AUDITED:
            return
        try:
            if len(self._pending) >= self.cfg.queue_max:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("audit.queue_full dropped=%d", self.dropped)
                return
            self._pending.append(event)  # formatted in the flush, off the listeners' path
        except Exception:
            log.exception("audit.record_failed event=%s", event.event)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> AuditLog:
        pruned = await asyncio.to_thread(self.store.prune)
        self.written_seq = await asyncio.to_thread(self.store.last_seq)
        log.info(
            "audit.open file=%s records=%d pruned=%d", self.store.path, self.written_seq, pruned
        )
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="audit-flush"),
            asyncio.create_task(self._prune_loop(), name="audit-prune"),
        ]
        if self.link is not None:
            self._tasks.append(asyncio.create_task(self._send_loop(), name="audit-syslog"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._flush()
        if self.connected:  # give a connected collector a moment to take the last records
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while self.connected and self.sent_seq < self.written_seq:
                        self._progress.clear()
                        await self._progress.wait()
        await cancel_all(self._tasks)
        if self.link is not None:
            await self.link.close()
        self.store.close()

    def _store(self, events: list[Event]) -> int:  # in a worker thread
        rows = []
        for event in events:
            try:
                rows.append(row_for(event, self.patient_ids, self.salt))
            except Exception:  # one odd event must not stop the trail
                log.exception("audit.record_failed event=%s", event.event)
        return self.store.append(rows)

    async def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            self.written_seq = await asyncio.to_thread(self._store, rows)
        except sqlite3.Error:
            self._pending[:0] = rows  # kept for the next try, still bounded by queue_max
            log.exception("audit.write_failed records=%d", len(rows))
            return
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            try:
                n = await asyncio.to_thread(self.store.prune)
                log.info("audit.pruned records=%d", n)
            except sqlite3.Error:
                log.exception("audit.prune_failed")

    async def _send_loop(self) -> None:
        assert self.link is not None
        delay = RECONNECT_MIN_S
        down_logged = False
        while True:
            try:
                await self.link.open()
                self.connected = True
                delay = RECONNECT_MIN_S
                if down_logged:
                    log.warning("audit.syslog_up url=%s", self.cfg.syslog and self.cfg.syslog.url)
                    down_logged = False
                await self._send_all()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError) as err:
                if not down_logged:  # log once when it goes away, once when it is back
                    log.warning(
                        "audit.syslog_down url=%s error=%s",
                        self.cfg.syslog and self.cfg.syslog.url,
                        err,
                    )
                    down_logged = True
            except Exception:  # the audit export must never take the service down
                log.exception("audit.syslog_failed")
            self.connected = False
            self._progress.set()
            await self.link.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _send_all(self) -> None:
        assert self.link is not None and self.format is not None
        sent = self.sent_seq = await asyncio.to_thread(self.store.sent_seq)
        while True:
            records = await asyncio.to_thread(self.store.records, after_seq=sent)
            if records:
                await self.link.send([self.format.format(r) for r in records])
                sent = records[-1].seq
                await asyncio.to_thread(self.store.set_sent_seq, sent)
                self.sent_seq = sent
                self._progress.set()
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            await self.link.send([])  # notices a collector that closed the connection
