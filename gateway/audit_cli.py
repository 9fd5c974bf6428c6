"""``medgw audit``: read the audit trail (``list``) and export it (``export``).

Reads ``<state_dir>/audit.sqlite`` through a read-only connection, beside a running
gateway or not; nothing here can change a record.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from gateway.audit import FILE_NAME, AuditStore, Record, SyslogFormat, iso_time
from gateway.config import GatewayConfig, Syslog, load_config
from gateway.errors import ConfigError
from gateway.registry import Registry

COLUMNS = ["seq", "at", "event", "source", "destination", "peer", "outcome", "ids"]


def add_parser(sub: Any, default_config: str) -> None:
    """Add ``audit list`` and ``audit export`` to the ``medgw`` parser."""
    from gateway.cli import parse_duration  # noqa: PLC0415 - gateway.cli imports this module

    a = sub.add_parser("audit", help="the append-only audit trail")
    actions = a.add_subparsers(dest="action", required=True)
    lst = actions.add_parser("list", help="recent audit records, newest first")
    exp = actions.add_parser("export", help="audit records, oldest first, as JSON lines or syslog")
    for p in (lst, exp):
        p.add_argument("--config", default=default_config)
        p.add_argument("--since", type=parse_duration, help="age, e.g. 1d or 12h")
        p.add_argument("--event", help="only this event, e.g. message.delivered")
        p.set_defaults(func=cmd_audit)
    lst.add_argument("--limit", type=int, default=50)
    exp.add_argument("--format", choices=["jsonl", "syslog"], default="jsonl")


def cmd_audit(args: argparse.Namespace, registry: Registry) -> int:
    try:
        cfg = load_config(args.config, registry)
    except ConfigError as err:
        print(f"{args.config}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    path = cfg.state_dir / FILE_NAME
    if not path.exists():
        print(f"medgw audit: no audit file at {path}", file=sys.stderr)
        return 1
    since = time.time() - args.since if args.since is not None else None
    try:
        store = AuditStore(path, cfg.audit.retention_days, readonly=True)
        try:
            if args.action == "list":
                _list(
                    store.records(
                        since=since, event=args.event, limit=args.limit, newest_first=True
                    )
                )
            else:
                _export(store, cfg, since, args.event, args.format)
        finally:
            store.close()
    except sqlite3.Error as err:
        print(f"medgw audit: {path}: {err}", file=sys.stderr)
        return 1
    return 0


def _list(records: list[Record]) -> None:
    from gateway.cli import _table  # noqa: PLC0415 - gateway.cli imports this module

    rows: list[dict[str, object]] = [
        {
            "seq": r.seq,
            "at": iso_time(r.at),
            "event": r.event,
            "source": r.source or "-",
            "destination": r.destination or "-",
            "peer": r.peer or "-",
            "outcome": r.outcome or "-",
            "ids": " ".join(f"{k}={v}" for k, v in sorted(r.ids.items())) or "-",
        }
        for r in records
    ]
    _table(rows, COLUMNS)


def _export(
    store: AuditStore, cfg: GatewayConfig, since: float | None, event: str | None, fmt: str
) -> None:
    out = sys.stdout
    syslog = SyslogFormat(cfg.audit.syslog or Syslog(url="udp://localhost:514"), cfg.site.id)
    for record in store.iter_records(since=since, event=event):
        if fmt == "jsonl":
            out.write(json.dumps(record.as_dict(), ensure_ascii=False, sort_keys=True) + "\n")
        else:  # one RFC 5424 message a line (no octet counting), the BOM left out
            out.write(syslog.format(record).decode("utf-8").replace("\ufeff", "", 1) + "\n")
