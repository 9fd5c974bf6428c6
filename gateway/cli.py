"""``medgw``: run the gateway, check a config, look after the queue.

Exit codes: 0 success, 1 failure at run time, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

from gateway import __version__, audit_cli, backup, logs, queue_admin, status_cli
from gateway.config import GatewayConfig, load_config, summary
from gateway.errors import ConfigError, JournalError
from gateway.journal import admin_connection
from gateway.registry import Registry, default_registry

DEFAULT_CONFIG = os.environ.get("MEDGW_CONFIG", "/etc/medgw/gateway.yaml")
log = logging.getLogger("medgw")


def _load(path: str, registry: Registry) -> GatewayConfig | None:
    try:
        return load_config(path, registry)
    except ConfigError as err:
        print(f"{path}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace, registry: Registry) -> int:
    cfg = _load(args.file, registry)
    if cfg is None:
        return 2
    print(summary(cfg))
    return 0


def cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    cfg = _load(args.config, registry)
    if cfg is None:
        return 2
    logs.setup(args.log_level or cfg.logging.level, cfg.logging.format)
    from gateway.service import serve  # noqa: PLC0415 - keeps check-config light

    log.info("gateway.starting version=%s config=%s", __version__, args.config)
    try:
        asyncio.run(serve(cfg, registry))
    except ConfigError as err:  # what is read only at start (the HTTP token file)
        for problem in err.problems:
            log.error("gateway.failed config: %s", problem)
        return 2
    except (OSError, JournalError) as err:  # a port in use, a damaged journal: refuse
        log.error("gateway.failed error=%s", err)
        return 1
    except BaseExceptionGroup as group:
        for failure in group.exceptions:
            log.error("gateway.failed error=%r", failure)
        return 1
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 12h, 7d: {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _table(rows: list[dict[str, object]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: min(48, max(len(c), *(len(str(r[c])) for r in rows))) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c])[: widths[c]].ljust(widths[c]) for c in columns))


def cmd_queue(args: argparse.Namespace, registry: Registry) -> int:
    cfg = _load(args.config, registry)
    if cfg is None:
        return 2
    try:
        with admin_connection(cfg.state_dir) as conn:
            return _queue_action(args, cfg, conn)
    except JournalError as err:
        print(f"medgw queue: {err}", file=sys.stderr)
        return 1


def _queue_action(args: argparse.Namespace, cfg: GatewayConfig, conn: object) -> int:
    import sqlite3  # noqa: PLC0415

    assert isinstance(conn, sqlite3.Connection)
    if args.action == "stats":
        rows = [
            dict(zip(("destination", "pending", "done", "dead", "oldest_pending"), r, strict=True))
            for r in queue_admin.stats(conn, destination=args.destination)
        ]
        _table(rows, ["destination", "pending", "done", "dead", "oldest_pending"])
        print(" ".join(f"{k}={v}" for k, v in queue_admin.totals(conn).items()))
    elif args.action == "list" and args.quarantine:
        rows = list(queue_admin.list_quarantine(conn, limit=args.limit))
        _table(rows, ["id", "received", "source", "peer", "size", "reason", "head"])
    elif args.action == "list":
        rows = list(
            queue_admin.list_deliveries(
                conn, destination=args.destination, state=args.state, limit=args.limit
            )
        )
        _table(
            rows,
            [
                "received",
                "envelope",
                "source",
                "type",
                "control_id",
                "destination",
                "state",
                "attempts",
                "next",
                "last_error",
            ],
        )
    elif args.action == "retry":
        n = queue_admin.retry(conn, destination=args.destination, envelope=args.envelope)
        print(f"{n} deliveries due now")
    elif args.action == "purge":
        return _purge(args, cfg, conn)
    return 0


def _purge(args: argparse.Namespace, cfg: GatewayConfig, conn: object) -> int:
    import sqlite3  # noqa: PLC0415

    assert isinstance(conn, sqlite3.Connection)
    if args.what == "delivered":
        n = queue_admin.purge_delivered(
            conn, cfg.state_dir, older_than_s=args.older_than, destination=args.destination
        )
        print(f"{n} delivered envelopes removed")
    elif args.what == "quarantine" and args.destination:
        print("quarantined input has no destination: drop --destination", file=sys.stderr)
        return 2
    elif args.what == "quarantine":
        n = queue_admin.purge_quarantine(conn, older_than_s=args.older_than)
        print(f"{n} quarantined items removed")
    else:
        if not args.destination or not args.yes:
            print(
                "purge dead gives up clinical data for good: name --destination and add --yes",
                file=sys.stderr,
            )
            return 2
        n = queue_admin.purge_dead(conn, destination=args.destination)
        print(f"{n} dead deliveries to {args.destination} abandoned")
    return 0


def cmd_drivers_types(args: argparse.Namespace, registry: Registry) -> int:
    for title, kinds in (
        ("listeners", registry.listeners),
        ("destinations", registry.destinations),
        ("steps", registry.steps),
    ):
        print(f"{title}:")
        for name, kind in sorted(kinds.items()):
            print(f"  {name:<16} {kind.summary}")
    return 0


def build_parser(registry: Registry) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medgw", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"medgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the gateway")
    r.add_argument("--config", default=DEFAULT_CONFIG)
    r.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    t = sub.add_parser("types", help="list the listener and destination types installed")
    t.set_defaults(func=cmd_drivers_types)

    q = sub.add_parser("queue", help="deliveries and quarantine in the journal")
    qs = q.add_subparsers(dest="action", required=True)
    for name, text in (
        ("stats", "counts per destination"),
        ("list", "recent deliveries"),
        ("retry", "retry dead or waiting deliveries now"),
        ("purge", "remove delivered data, quarantine, or dead deliveries"),
    ):
        a = qs.add_parser(name, help=text)
        a.add_argument("--config", default=DEFAULT_CONFIG)
        a.set_defaults(func=cmd_queue)
        a.add_argument("--destination", help="only this destination")
    ql = qs.choices["list"]
    ql.add_argument("--state", choices=["pending", "done", "dead"])
    ql.add_argument("--quarantine", action="store_true", help="list quarantined input instead")
    ql.add_argument("--limit", type=int, default=50)
    qs.choices["retry"].add_argument("--envelope", help="one envelope id")
    qp = qs.choices["purge"]
    qp.add_argument("what", choices=["delivered", "quarantine", "dead"])
    qp.add_argument(
        "--older-than",
        type=parse_duration,
        default=parse_duration("7d"),
        help="age, e.g. 12h or 30d (default 7d)",
    )
    qp.add_argument("--yes", action="store_true")

    status_cli.add_parser(sub, DEFAULT_CONFIG)
    audit_cli.add_parser(sub, DEFAULT_CONFIG)
    backup.add_commands(sub, DEFAULT_CONFIG)
    for setup in registry.commands.values():
        setup(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    registry = default_registry()
    args = build_parser(registry).parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    code: int = args.func(args, registry)
    return code


if __name__ == "__main__":
    sys.exit(main())
