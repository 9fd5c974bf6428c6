"""Routing: which destinations an envelope goes to, from the configured routes.

Every matching route applies (fan-out); a destination named twice gets one
delivery. A route with steps yields its step chain's journal name
(``steps:<route id>``) instead of its destinations: the chain forwards what the
steps pass on. Pure and cheap: it runs on the accept path, before the commit,
so an envelope and its deliveries are journaled in one transaction.
"""

from __future__ import annotations

from gateway.config import Route, route_key
from gateway.envelope import Envelope


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._targets = [
            [route_key(route, i)] if route.steps else list(route.to)
            for i, route in enumerate(routes)
        ]

    def destinations(self, env: Envelope) -> list[str]:
        out: list[str] = []
        for route, targets in zip(self.routes, self._targets, strict=True):
            if route.matches(env.kind, env.source, env.headers):
                out.extend(d for d in targets if d not in out)
        return out
