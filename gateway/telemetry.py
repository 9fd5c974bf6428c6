"""Fleet telemetry: site status, listener/destination state and events over MQTT.

Topics under ``mqtt.topic_prefix`` (docs/telemetry.md has the payload schemas):

``<prefix>/status``                      retained ``online`` / ``offline`` (Last Will)
``<prefix>/info``                        retained JSON: site, version, started_at
``<prefix>/listeners/<id>/state``        retained JSON, refreshed when it changes
``<prefix>/destinations/<id>/state``     retained JSON, refreshed when it changes
``<prefix>/events/<event>``              JSON, QoS 1, one per event (not retained)

Clinical traffic never waits for the broker. Events go from the bus into an
in-memory list, then in batches into ``<state_dir>/telemetry.sqlite`` (the outbox);
the publisher sends them from there in order with QoS 1 and deletes each only after
the broker's PUBACK, so a broker that is away for hours, or a gateway restart, loses
nothing but what exceeds ``buffer_max`` (the oldest are dropped and counted). State
topics are latest-value and retained: they are simply republished on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from gateway import __version__
from gateway.config import Mqtt
from gateway.events import Event, PatientIds
from gateway.secrets import read_secret
from gateway.tasks import cancel_all
from gateway.tls import TlsSettings

log = logging.getLogger(__name__)

FLUSH_S = 0.2  # events reach the outbox file within this
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 60.0
PUBLISH_BATCH = 200

StateFn = Callable[[], dict[str, Any]]  # the /api/status document (gateway/status.py)


class Outbox:
    """The events not yet confirmed by the broker, in a small SQLite file of their own
    (the clinical journal's writer never waits on telemetry)."""

    def __init__(self, path: Path, buffer_max: int) -> None:
        self.path = path
        self.buffer_max = buffer_max
        self.dropped = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL)"
        )

    def add(self, rows: list[tuple[str, bytes]]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT INTO outbox (topic, payload) VALUES (?, ?)", rows)
            over = self.count() - self.buffer_max
            if over > 0:
                self.conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (over,),
                )
                self.dropped += over
                log.warning("telemetry.buffer_full dropped=%d total_dropped=%d", over, self.dropped)

    def head(self, limit: int) -> list[tuple[int, str, bytes]]:
        return self.conn.execute(
            "SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()

    def remove(self, seq: int) -> None:
        self.conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class Telemetry:
    """Subscribes to the event bus; runs the MQTT connection in its own task."""

    def __init__(
        self,
        cfg: Mqtt,
        site_id: str,
        state_dir: Path,
        state: StateFn,
        *,
        config_dir: str = "",
    ) -> None:
        self.cfg = cfg
        self.site_id = site_id
        self.prefix = cfg.topic_prefix.rstrip("/")
        self.state = state
        self.config_dir = config_dir
        self.patient_ids: PatientIds = cfg.patient_ids  # type: ignore[assignment]
        self.salt = (
            read_secret(cfg.hash_salt_file, config_dir, what="mqtt hash salt")
            if cfg.hash_salt_file
            else site_id
        )
        self.username, self.password = self._credentials()
        self.tls_context = (
            TlsSettings(
                ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file
            ).client_context(config_dir, where="mqtt")
            if cfg.tls
            else None
        )
        self.outbox = Outbox(state_dir / "telemetry.sqlite", cfg.buffer_max)
        self.wanted = set(cfg.events) if cfg.events is not None else None
        self.started_at = time.time()
        self.connected = False
        self.published = 0
        self.last_error = ""  # why the broker connection last failed (status, tests)
        self._pending: list[Event] = []  # from the bus, not yet in the outbox
        self._wake = asyncio.Event()
        self._last_state: dict[str, bytes] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- setup ----------------------------------------------------------------------------

    def _credentials(self) -> tuple[str | None, str | None]:
        user = self.cfg.username
        if self.cfg.username_file:
            user = read_secret(self.cfg.username_file, self.config_dir, what="mqtt username")
        password = None
        if self.cfg.password_file:
            password = read_secret(self.cfg.password_file, self.config_dir, what="mqtt password")
        return user, password

    # -- the bus side (never blocks) -------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Only queues: formatting and the file write happen in the flush, off the
        listeners' path (an event is emitted before the listener acknowledges)."""
        if self.wanted is not None and event.event not in self.wanted:
            return
        if len(self._pending) >= self.cfg.buffer_max:  # the outbox file is stalled
            self.outbox.dropped += 1
            return
        self._pending.append(event)

    def _message(self, event: Event) -> tuple[str, bytes]:
        doc = event.as_dict(self.patient_ids, self.salt)
        doc["site"] = self.site_id
        payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        return f"{self.prefix}/events/{event.event}", payload

    def _store(self, events: list[Event]) -> None:  # in a worker thread
        messages = []
        for event in events:
            try:
                messages.append(self._message(event))
            except Exception:  # one odd event must not stop telemetry
                log.exception("telemetry.event_failed event=%s", event.event)
        self.outbox.add(messages)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Telemetry:
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="telemetry-flush"),
            asyncio.create_task(self._connection_loop(), name="telemetry-mqtt"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._flush()  # what the bus gave us is kept for the next start
        await cancel_all(self._tasks)
        self.outbox.close()

    async def _flush(self) -> None:
        if not self._pending:
            return
        events, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._store, events)
        except sqlite3.Error:
            log.exception("telemetry.outbox_failed events=%d", len(events))
            return
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()

    def _client(self) -> aiomqtt.Client:
        host, port = self.cfg.endpoint
        return aiomqtt.Client(
            host,
            port,
            username=self.username,
            password=self.password,
            identifier=self.cfg.client_id or f"medgw-{self.site_id}",
            keepalive=self.cfg.keepalive_s,
            will=aiomqtt.Will(f"{self.prefix}/status", b"offline", qos=1, retain=True),
            tls_context=self.tls_context,
            timeout=10,
        )

    async def _connection_loop(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            client = self._client()
            try:
                async with client:
                    self.connected = True
                    delay = RECONNECT_MIN_S
                    log.info("telemetry.connected broker=%s", self.cfg.url)
                    try:
                        await self._serve(client)
                    finally:
                        self.connected = False
                        with contextlib.suppress(Exception):  # a clean goodbye, no Last Will
                            await asyncio.wait_for(
                                client.publish(
                                    f"{self.prefix}/status", b"offline", qos=1, retain=True
                                ),
                                2,
                            )
            except aiomqtt.MqttError as err:
                self.last_error = str(err)
                log.info("telemetry.disconnected broker=%s error=%s", self.cfg.url, err)
            except asyncio.CancelledError:
                raise
            except Exception:  # telemetry must never take the service down
                log.exception("telemetry.failed broker=%s", self.cfg.url)
            self._last_state.clear()  # republish everything on the next connection
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _serve(self, client: aiomqtt.Client) -> None:
        await client.publish(f"{self.prefix}/status", b"online", qos=1, retain=True)
        info = {
            "site": self.site_id,
            "version": __version__,
            "started_at": _iso(self.started_at),
            "patient_ids": self.patient_ids,
        }
        await client.publish(f"{self.prefix}/info", json.dumps(info).encode(), qos=1, retain=True)
        next_state = 0.0
        while True:
            if time.monotonic() >= next_state:
                await self._publish_state(client)
                next_state = time.monotonic() + self.cfg.state_interval_s
            await self._publish_events(client)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, next_state - time.monotonic()))

    async def _publish_events(self, client: aiomqtt.Client) -> None:
        while True:
            rows = await asyncio.to_thread(self.outbox.head, PUBLISH_BATCH)
            if not rows:
                return
            for seq, topic, payload in rows:
                await client.publish(topic, payload, qos=1)  # returns after the PUBACK
                await asyncio.to_thread(self.outbox.remove, seq)
                self.published += 1

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        status = self.state()
        snapshot: dict[str, dict[str, Any]] = {
            group: {item["id"]: item for item in status[group]}
            for group in ("listeners", "destinations")
        }
        snapshot["telemetry"] = {
            "mqtt": {
                "buffered": self.outbox.count() + len(self._pending),
                "dropped": self.outbox.dropped,
                "published": self.published,
                "last_error": self.last_error or None,
            }
        }
        for group, items in snapshot.items():
            for item_id, doc in items.items():
                topic = f"{self.prefix}/{group}/{item_id}/state"
                payload = json.dumps(doc, sort_keys=True, default=str).encode()
                if self._last_state.get(topic) != payload:
                    await client.publish(topic, payload, qos=1, retain=True)
                    self._last_state[topic] = payload


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
