"""Prometheus metrics for one gateway (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class _QueueCollector(Collector):
    """Queue depth read from the journal at scrape time (no counter to drift)."""

    def __init__(
        self,
        depth: Callable[[], dict[str, dict[str, int]]],
        oldest: Callable[[], dict[str, float]],
        now: Callable[[], float],
    ) -> None:
        self._depth, self._oldest, self._now = depth, oldest, now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "medgw_queue_depth",
            "Deliveries by destination and state",
            labels=["destination", "state"],
        )
        for dest, states in self._depth().items():
            for state, n in states.items():
                g.add_metric([dest, state], n)
        yield g
        age = GaugeMetricFamily(
            "medgw_queue_oldest_pending_seconds",
            "Age of the oldest undelivered message",
            labels=["destination"],
        )
        now = self._now()
        for dest, received in self._oldest().items():
            age.add_metric([dest], max(0.0, now - received))
        yield age


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._received = Counter(
            "medgw_messages_received", "Messages journaled", ["listener"], registry=r
        )
        self._duplicates = Counter(
            "medgw_messages_duplicate",
            "Retransmissions already journaled",
            ["listener"],
            registry=r,
        )
        self._rejected = Counter(
            "medgw_messages_rejected",
            "Input refused or quarantined",
            ["listener", "reason"],
            registry=r,
        )
        self._delivered = Counter(
            "medgw_messages_delivered", "Deliveries confirmed", ["destination"], registry=r
        )
        self._failed = Counter(
            "medgw_delivery_failures", "Failed delivery attempts", ["destination"], registry=r
        )
        self._dead = Counter(
            "medgw_delivery_dead", "Deliveries given up (dead letter)", ["destination"], registry=r
        )
        self._latency = Histogram(
            "medgw_delivery_latency_seconds",
            "From receipt to destination confirmation",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch_queue(
        self,
        depth: Callable[[], dict[str, dict[str, int]]],
        oldest: Callable[[], dict[str, float]],
        now: Callable[[], float],
    ) -> None:
        self.registry.register(_QueueCollector(depth, oldest, now))

    def received(self, listener: str) -> None:
        self._received.labels(listener).inc()

    def duplicate(self, listener: str) -> None:
        self._duplicates.labels(listener).inc()

    def rejected(self, listener: str, reason: str) -> None:
        self._rejected.labels(listener, reason).inc()

    def delivered(self, destination: str, latency_s: float) -> None:
        self._delivered.labels(destination).inc()
        self._latency.labels(destination).observe(latency_s)

    def failed(self, destination: str) -> None:
        self._failed.labels(destination).inc()

    def dead(self, destination: str) -> None:
        self._dead.labels(destination).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
