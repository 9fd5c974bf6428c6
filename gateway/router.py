"""Routing: which destinations an envelope goes to, from the configured routes.

Every matching route applies (fan-out); a destination named twice gets one
delivery. Pure and cheap: it runs on the accept path, before the commit, so an
envelope and its deliveries are journaled in one transaction.
"""

from __future__ import annotations

from gateway.config import Route
from gateway.envelope import Envelope


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes

    def destinations(self, env: Envelope) -> list[str]:
        out: list[str] = []
        for route in self.routes:
            if route.matches(env.kind, env.source, env.headers):
                out.extend(d for d in route.to if d not in out)
        return out
