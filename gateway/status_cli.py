"""``medgw status``: one screen of the running service's ``/api/status``.

Exit codes: 0 ok, 1 degraded (or starting/stopping), 2 unreachable or unusable
configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.config import Endpoint, load_config
from gateway.errors import ConfigError
from gateway.health import http_token
from gateway.registry import Registry

WIDTH = 100
TIMEOUT_S = 5.0


def add_parser(sub: Any, default_config: str) -> None:
    s = sub.add_parser("status", help="one screen of the running gateway's status")
    s.add_argument(
        "--config",
        help=f"the gateway's config, for its address and token (default {default_config})",
    )
    s.add_argument("--url", help="the gateway's HTTP address (default: from the config)")
    s.add_argument("--json", action="store_true", help="print /api/status as it came")
    s.set_defaults(func=cmd_status, default_config=default_config)


def cmd_status(args: argparse.Namespace, registry: Registry) -> int:
    try:
        url, token = _target(args, registry)
    except ConfigError as err:
        print(f"medgw status: {args.config or args.default_config}:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        doc = fetch(url, token)
    except OSError as err:  # URLError, HTTPError and timeouts are OSErrors
        print(f"medgw status: cannot reach the gateway at {url}: {_reason(err)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render(doc))
    return 0 if doc.get("state") == "ok" else 1


def _target(args: argparse.Namespace, registry: Registry) -> tuple[str, str | None]:
    if args.url and args.config is None:
        return args.url.rstrip("/"), None
    path = args.config or args.default_config
    cfg = load_config(path, registry)
    token = http_token(cfg.http, str(Path(path).parent))
    if args.url:
        return args.url.rstrip("/"), token
    if cfg.http.listen is None:
        raise ConfigError(["http.listen: the HTTP API is off in this config (use --url)"])
    return base_url(cfg.http.listen), token


def base_url(listen: Endpoint) -> str:
    """The address to reach a gateway listening on ``listen`` from this machine."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - a client
    host = wildcard.get(listen.host, listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def fetch(base: str, token: str | None) -> dict[str, Any]:
    if not base.startswith(("http://", "https://")):
        raise urllib.error.URLError(f"not an http(s) address: {base}")
    request = urllib.request.Request(base + "/api/status")  # noqa: S310 - scheme checked
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def _reason(err: OSError) -> str:
    if isinstance(err, urllib.error.HTTPError):
        if err.code == 401:
            return "401 unauthorized (token missing or wrong: see http.token_file)"
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


def render(doc: dict[str, Any]) -> str:
    """The plain-text screen: a header line, then a table per section (<= 100 columns)."""
    lines = [
        f"site {doc['site']}  state {doc['state'].upper()}  "
        f"up {_age(doc.get('uptime_s'))}  at {doc.get('now') or '-'}",
        "",
        "LISTENERS",
    ]
    lines += _table(
        [
            ("id", 16),
            ("type", 12),
            ("state", 10),
            ("last message", 20),
            ("recv", 8),
            ("rej", 6),
            ("conn", 5),
        ],
        [
            [
                lst["id"],
                lst["type"],
                lst["state"],
                lst["last_message_at"],
                lst["received"],
                lst["rejected"],
                lst["connections"],
            ]
            for lst in doc["listeners"]
        ],
    )
    lines += ["", "DESTINATIONS"]
    lines += _table(
        [
            ("id", 16),
            ("breaker", 9),
            ("pend", 6),
            ("dead", 5),
            ("oldest", 7),
            ("/min", 5),
            ("/hour", 6),
            ("problems", 13),
            ("last error", 25),
        ],
        [
            [
                d["id"],
                d["breaker"],
                d["pending"],
                d["dead"],
                _age(d["oldest_pending_s"]),
                d["rate"]["last_minute"],
                d["rate"]["last_hour"],
                ",".join(d["problems"]) or "ok",
                d["last_error"],
            ]
            for d in doc["destinations"]
        ],
    )
    if doc.get("models"):
        lines += ["", "AI MODELS"]
        lines += _table(
            [("id", 24), ("card present", 12), ("card", 58)],
            [[m["id"], "yes" if m["card_present"] else "NO", m["card"]] for m in doc["models"]],
        )
    return "\n".join(line.rstrip()[:WIDTH] for line in lines)


def _table(columns: list[tuple[str, int]], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["(none)"]

    def cell(value: Any, width: int) -> str:
        text = "-" if value is None or value == "" else str(value)
        text = " ".join(text.split())  # no newlines from error texts
        return text if len(text) <= width else text[: width - 1] + "…"

    out = [" ".join(name.upper().ljust(width) for name, width in columns)]
    out += [
        " ".join(cell(v, w).ljust(w) for v, (_, w) in zip(row, columns, strict=True))
        for row in rows
    ]
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    for limit, unit, div in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if s < limit:
            return f"{s // div}{unit}"
    return f"{s // 86400}d"
