"""``medgw hl7 send FILE... HOST:PORT``: send messages from files and show each ACK."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from drivers.hl7.ack import parse_ack
from drivers.hl7.client import MllpClient
from drivers.hl7.files import read_messages
from drivers.hl7.message import Hl7Error, parse_msh
from gateway.config import parse_endpoint


async def send_files(files: list[Path], host: str, port: int, timeout_s: float) -> int:
    """Send every message in ``files`` in order; returns how many were not ACKed AA/CA."""
    client = MllpClient(host, port)
    bad = 0
    try:
        for path in files:
            for n, message in enumerate(read_messages(path.read_bytes()), 1):
                try:
                    control_id = parse_msh(message).control_id
                except Hl7Error:
                    control_id = "?"
                try:
                    ack = parse_ack(await client.request(message, timeout_s))
                except (OSError, EOFError, TimeoutError, Hl7Error) as err:
                    print(f"{path.name}#{n} {control_id}: FAILED {type(err).__name__}: {err}")
                    await client.close()
                    bad += 1
                    continue
                ok = ack.code in ("AA", "CA")
                bad += not ok
                detail = f" {ack.text}" if ack.text else ""
                detail += f" [{ack.error}]" if ack.error else ""
                print(f"{path.name}#{n} {control_id}: {ack.code}{detail}")
    finally:
        await client.close()
    return bad


def _cmd_send(args: argparse.Namespace, registry: Any) -> int:
    try:
        endpoint = parse_endpoint(args.target)
        bad = asyncio.run(
            send_files([Path(f) for f in args.files], endpoint.host, endpoint.port, args.timeout)
        )
    except (ValueError, OSError) as err:
        print(f"medgw hl7 send: {err}", file=sys.stderr)
        return 2
    return 1 if bad else 0


def setup(subparsers: Any) -> None:
    p = subparsers.add_parser("hl7", help="HL7 v2 tools for technicians")
    sub = p.add_subparsers(dest="hl7_command", required=True)
    s = sub.add_parser("send", help="send HL7 messages from files over MLLP, print each ACK")
    s.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="text files (LF or CR segments, several messages each) or MLLP captures",
    )
    s.add_argument("target", metavar="HOST:PORT")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    s.set_defaults(func=_cmd_send)
