"""The technician view's data: ``GET /api/status``, one JSON document of everything a
technician checks first (listeners, destinations, queue, AI models).

Built from what the service already keeps (pumps, listeners, the journal, the
metrics registry) at request time; nothing here runs in the background.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.service import Gateway

# a pending delivery older than this marks its destination as stale
STALE_PENDING_S = 300.0
RATE_WINDOWS = {"last_minute": 60.0, "last_hour": 3600.0}


def status_doc(gateway: Gateway) -> dict[str, Any]:
    """The ``/api/status`` document (fields described in docs/status.md)."""
    _, health = gateway.health()
    now = time.time()
    listeners = _listeners(gateway)
    destinations = _destinations(gateway, health["destinations"], now)
    state = health["status"]
    if not gateway.ready.is_set():
        state = "starting"
    elif state == "ok" and (
        any(not d["ok"] for d in destinations)
        or any(lst["state"] != "listening" for lst in listeners)
    ):
        state = "degraded"
    return {
        "site": gateway.cfg.site.id,
        "site_name": gateway.cfg.site.name,
        "state": state,
        "now": _iso(now),
        "started_at": _iso(gateway.started_at),
        "uptime_s": health["uptime_s"],
        "listeners": listeners,
        "destinations": destinations,
        "models": [
            {"id": model_id, "card": str(card), "card_present": card.is_file()}
            for model_id, card in gateway.cfg.model_cards().items()
        ],
    }


def _listeners(gateway: Gateway) -> list[dict[str, Any]]:
    received, rejected = _listener_counts(gateway)
    out = []
    for lcfg in gateway.cfg.listeners:
        running = gateway.listeners.get(lcfg.id)
        if running is not None:
            state = "listening"
        else:
            state = "stopped" if gateway.stopping or gateway.ready.is_set() else "starting"
        out.append(
            {
                "id": lcfg.id,
                "type": lcfg.type,
                "state": state,
                "last_message_at": _iso(gateway.last_message_at.get(lcfg.id, 0.0)),
                "received": received.get(lcfg.id, 0),
                "rejected": rejected.get(lcfg.id, 0),
                "connections": _connections(running),
            }
        )
    return out


def _listener_counts(gateway: Gateway) -> tuple[dict[str, int], dict[str, int]]:
    """Messages received and rejected per listener, from the metrics counters."""
    received: dict[str, int] = {}
    rejected: dict[str, int] = {}
    wanted = {"medgw_messages_received": received, "medgw_messages_rejected": rejected}
    for family in gateway.metrics.registry.collect():
        into = wanted.get(family.name)
        if into is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                lid = sample.labels["listener"]
                into[lid] = into.get(lid, 0) + int(sample.value)
    return received, rejected


def _connections(listener: object) -> int | None:
    """Open connections, for listeners that count them (``connections``: MLLP, ASTM)."""
    conns = getattr(listener, "connections", None)
    return conns if isinstance(conns, int) else None


def _destinations(
    gateway: Gateway, health: dict[str, dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    rates = _delivery_rates(gateway, now)
    types = {dcfg.id: dcfg.type for dcfg in gateway.cfg.destinations}
    out = []
    for dest_id, doc in health.items():
        pump = gateway.pumps[dest_id]
        st = pump.state
        failing = doc["breaker"] != "closed" or st.last_error_at > st.last_success_at
        oldest = doc["oldest_pending_s"]
        stale = oldest is not None and oldest > STALE_PENDING_S
        problems = [
            text
            for flag, text in (
                (failing, "failing"),
                (stale, "stale"),
                (doc["dead"] > 0, "dead letters"),
            )
            if flag
        ]
        out.append(
            {
                "id": dest_id,
                "type": types.get(dest_id, "steps"),
                "breaker": doc["breaker"],
                "ok": not problems,
                "problems": problems,
                "pending": doc["pending"],
                "dead": doc["dead"],
                "delivered": doc["delivered"],
                "oldest_pending_s": oldest,
                "rate": rates.get(dest_id, dict.fromkeys(RATE_WINDOWS, 0)),
                "last_error": doc["last_error"],
                "last_error_at": _iso(st.last_error_at),
                "last_success_at": doc["last_success_at"],
            }
        )
    return out


def _delivery_rates(gateway: Gateway, now: float) -> dict[str, dict[str, int]]:
    """Deliveries confirmed per destination in the last minute and hour (the journal
    stamps ``updated_at`` when a delivery turns done; purged ones are long past)."""
    minute, hour = (now - RATE_WINDOWS[k] for k in ("last_minute", "last_hour"))
    rows = gateway.journal.reader.execute(
        "SELECT destination, SUM(updated_at >= ?), COUNT(*) FROM deliveries "
        "WHERE state = 'done' AND updated_at >= ? GROUP BY 1",
        (minute, hour),
    )
    return {dest: {"last_minute": m, "last_hour": h} for dest, m, h in rows}


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
