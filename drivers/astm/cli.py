"""Technicians' tools: ``medgw astm replay``, ``medgw drivers list`` and ``medgw drivers sniff``.

``replay`` plays the messages of a capture file to a host (the gateway, or an
LIS) as an instrument would: ENQ, frames, EOT, retrying NAKed frames; it
prints what happened to each message and any answer the host sends back (a
host query's answer carries the LIS's patient: masked unless --show-patient).
``sniff`` is a receiver that ACKs everything and journals nothing: it prints
each message's records as they arrive, with patient fields masked, so a
technician can see what an analyzer sends before configuring it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from drivers.astm.codec import AssembledMessage, AstmError, MessageAssembler, Record
from drivers.astm.frames import STX, FrameError, iter_frames, parse_frame
from drivers.astm.link import (
    AstmLink,
    FrameRejected,
    LinkSettings,
    MessageSent,
    SendFailed,
    TextReceived,
    TransferEnded,
)
from drivers.lab.profiles import ProfileError, catalog, profile_dirs
from drivers.transports import Line, TransportSettings, open_line

# patient-identifying fields of E1394 records, masked unless --show-patient
MASKED = {"P": (3, 4, 5, 6, 7, 8, 11, 13, 14), "O": (), "R": ()}


def messages_in_capture(data: bytes) -> list[bytes]:
    """The H..L messages in a capture: frames (any line ending) or plain record text."""
    texts = []
    if data.find(bytes([STX])) >= 0:
        for raw in iter_frames(data):
            # captures store frames with CR LF, a bare LF, or nothing at the end of the file
            fixed = raw if raw.endswith(b"\n") else raw.rstrip(b"\r") + b"\r\n"
            try:
                texts.append(parse_frame(fixed, allow_bare_lf=True).text)
            except FrameError as err:
                raise ValueError(f"frame {len(texts) + 1}: {err}") from err
    else:
        texts.append(data.replace(b"\r\n", b"\r").replace(b"\n", b"\r"))
    assembler = MessageAssembler()
    out = []
    for text in texts:
        for item in assembler.feed(text):
            if isinstance(item, AssembledMessage):
                out.append(item.raw)
            else:
                raise ValueError(item.reason)  # noqa: TRY004 - bad capture content
    return out


def mask(record: Record) -> str:
    d = record.delimiters
    fields = list(record.fields)
    for n in MASKED.get(record.type, ()):
        if n - 1 < len(fields) and fields[n - 1]:
            fields[n - 1] = "***"
    return d.field.join(fields)


def print_message(raw: bytes, encoding: str, show_patient: bool, out: TextIO) -> None:
    try:
        records = MessageAssembler(encoding=encoding).feed(raw)
    except AstmError as err:
        print(f"  undecodable: {err}", file=out)
        return
    for item in records:
        if isinstance(item, AssembledMessage):
            for rec in item.records:
                text = d_join(rec) if show_patient else mask(rec)
                print(f"  {text}", file=out)
        else:
            print(f"  bad records: {item.reason}", file=out)


def d_join(record: Record) -> str:
    return record.delimiters.field.join(record.fields)


class LinkPump:
    """Runs an AstmLink over a Line until ``done()`` says so or ``timeout_s`` passes.

    A read still pending when one :meth:`run` ends carries over to the next, so
    bytes that arrive in between (the host's ENQ right after our EOT) are not lost;
    :meth:`close` cancels it."""

    def __init__(self, line: Line, link: AstmLink) -> None:
        self.line = line
        self.link = link
        self._read: asyncio.Future[bytes] | None = None

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
            self._read = None

    async def run(self, on_event: Any, done: Any, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        read = self._read or asyncio.ensure_future(self.line.read())
        try:
            data_out = self.link.data_to_send()
            if data_out:
                await self.line.write(data_out)
            while not done() and time.monotonic() < end:
                deadline = min(d for d in (self.link.next_deadline(), end) if d is not None)
                wait = max(0.0, deadline - time.monotonic())
                finished, _ = await asyncio.wait({read}, timeout=wait)
                now = time.monotonic()
                if finished:
                    data = read.result()
                    if not data:
                        raise ConnectionError("the line closed")
                    events = self.link.receive(data, now)
                    read = self._read = asyncio.ensure_future(self.line.read())
                else:
                    events = self.link.tick(now)
                for event in events:
                    events.extend(on_event(event) or [])
                data_out = self.link.data_to_send()
                if data_out:
                    await self.line.write(data_out)
        finally:
            self._read = read


async def replay(
    messages: Sequence[bytes],
    settings: TransportSettings,
    *,
    frame_size: int,
    answer_wait_s: float,
    out: TextIO,
    show_patient: bool = False,
) -> int:
    """Send ``messages``; returns how many failed."""
    line = await open_line(settings)
    link = AstmLink(LinkSettings(frame_size=frame_size))
    pending = set(range(len(messages)))
    failed = 0
    answers: list[bytes] = []

    def on_event(event: object) -> list[Any]:
        nonlocal failed
        if isinstance(event, MessageSent):
            assert isinstance(event.ref, int)
            pending.discard(event.ref)
            print(f"message {event.ref + 1}: sent ({len(messages[event.ref])} bytes)", file=out)
        elif isinstance(event, SendFailed):
            assert isinstance(event.ref, int)
            pending.discard(event.ref)
            failed += 1
            print(f"message {event.ref + 1}: FAILED {event.reason}", file=out)
        elif isinstance(event, TextReceived):
            answers.append(event.text)
            return list(link.acknowledge(True, time.monotonic()))
        elif isinstance(event, TransferEnded) and answers:
            print("answer from the host:", file=out)
            print_message(b"".join(answers), "latin-1", show_patient, out)
            answers.clear()
        elif isinstance(event, FrameRejected):
            print(f"host frame rejected: {event.reason}", file=out)
        return []

    pump = LinkPump(line, link)
    try:
        for i, message in enumerate(messages):
            for event in link.send(message, i, time.monotonic()):
                on_event(event)
        await pump.run(on_event, lambda: not pending, timeout_s=120.0)
        if answer_wait_s > 0:
            await pump.run(on_event, lambda: False, timeout_s=answer_wait_s)
    finally:
        pump.close()
        await line.aclose()
    return failed + len(pending)


async def sniff(
    settings: TransportSettings, *, encoding: str, show_patient: bool, seconds: float, out: TextIO
) -> None:
    line = await open_line(settings)
    link = AstmLink(LinkSettings(frame_size=64_000, allow_bare_lf=True))
    assembler = MessageAssembler(encoding=encoding)

    def on_event(event: object) -> list[Any]:
        if isinstance(event, TextReceived):
            for item in assembler.feed(event.text):
                if isinstance(item, AssembledMessage):
                    print(f"message ({len(item.raw)} bytes):", file=out)
                    print_message(item.raw, encoding, show_patient, out)
                else:
                    print(f"bad records: {item.reason}", file=out)
            out.flush()
            return list(link.acknowledge(True, time.monotonic()))
        if isinstance(event, FrameRejected):
            print(f"frame rejected (NAK): {event.reason}", file=out)
        elif isinstance(event, TransferEnded):
            assembler.reset()
            print(
                f"end of transfer{' (aborted: ' + event.reason + ')' if event.aborted else ''}",
                file=out,
            )
        return []

    pump = LinkPump(line, link)
    try:
        await pump.run(on_event, lambda: False, timeout_s=seconds)
    finally:
        pump.close()
        await line.aclose()


def _transport(args: argparse.Namespace, target: str) -> TransportSettings:
    if ":" in target and not target.startswith("/"):
        kind = "tcp_listen" if getattr(args, "listen", False) else "tcp_connect"
        return TransportSettings.model_validate({kind: target})
    return TransportSettings.model_validate(
        {"serial": target, "baudrate": args.baudrate, "parity": args.parity}
    )


def _cmd_replay(args: argparse.Namespace, registry: Any) -> int:
    try:
        messages = messages_in_capture(Path(args.file).read_bytes())
        settings = _transport(args, args.to)
    except (OSError, ValueError) as err:
        print(f"medgw astm replay: {err}", file=sys.stderr)
        return 2
    if not messages:
        print(f"medgw astm replay: no H..L message in {args.file}", file=sys.stderr)
        return 2
    try:
        bad = asyncio.run(
            replay(
                messages,
                settings,
                frame_size=args.frame_size,
                answer_wait_s=args.answer_wait,
                out=sys.stdout,
                show_patient=args.show_patient,
            )
        )
    except (OSError, ConnectionError) as err:
        print(f"medgw astm replay: {err}", file=sys.stderr)
        return 1
    return 1 if bad else 0


def _cmd_list(args: argparse.Namespace, registry: Any) -> int:
    try:
        profiles = catalog(profile_dirs(args.config_dir))
    except ProfileError as err:
        print(f"medgw drivers list: {err}", file=sys.stderr)
        return 2
    for name, p in sorted(profiles.items()):
        models = ", ".join(p.models)
        print(f"{name:22} {p.protocol:5} {p.title}" + (f" ({models})" if models else ""))
    return 0


def _cmd_sniff(args: argparse.Namespace, registry: Any) -> int:
    if args.file:
        return _sniff_file(Path(args.file), args)
    if not args.line:
        print("medgw drivers sniff: give a LINE (device, HOST:PORT) or --file", file=sys.stderr)
        return 2
    try:
        settings = _transport(args, args.line)
        asyncio.run(
            sniff(
                settings,
                encoding=args.encoding,
                show_patient=args.show_patient,
                seconds=args.seconds,
                out=sys.stdout,
            )
        )
    except (OSError, ValueError, ConnectionError) as err:
        print(f"medgw drivers sniff: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _sniff_file(path: Path, args: argparse.Namespace) -> int:
    try:
        messages = messages_in_capture(path.read_bytes())
    except (OSError, ValueError) as err:
        print(f"medgw drivers sniff: {err}", file=sys.stderr)
        return 1
    for n, raw in enumerate(messages, 1):
        print(f"message {n} ({len(raw)} bytes):")
        print_message(raw, args.encoding, args.show_patient, sys.stdout)
    return 0


def _line_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baudrate", type=int, default=9600)
    p.add_argument("--parity", default="N", choices=["N", "E", "O", "M", "S"])


def setup_astm(subparsers: Any) -> None:
    p = subparsers.add_parser("astm", help="ASTM tools for technicians")
    sub = p.add_subparsers(dest="astm_command", required=True)
    r = sub.add_parser("replay", help="send the messages of a capture file as an instrument")
    r.add_argument("file", metavar="FILE", help="capture: frames (ENQ/STX..EOT) or record text")
    r.add_argument("--to", required=True, metavar="HOST:PORT|/dev/tty…")
    r.add_argument("--frame-size", type=int, default=247, choices=[247, 64000])
    r.add_argument(
        "--answer-wait", type=float, default=3.0, help="seconds to wait for the host's answer"
    )
    r.add_argument(
        "--show-patient", action="store_true", help="do not mask the patient in the answer"
    )
    _line_options(r)
    r.set_defaults(func=_cmd_replay)


def setup_drivers(subparsers: Any) -> None:
    p = subparsers.add_parser("drivers", help="analyzer profiles and line diagnostics")
    sub = p.add_subparsers(dest="drivers_command", required=True)
    ls = sub.add_parser("list", help="the analyzer profiles available")
    ls.add_argument(
        "--config-dir", default="/etc/medgw", help="site profiles are in CONFIG_DIR/drivers"
    )
    ls.set_defaults(func=_cmd_list)
    s = sub.add_parser("sniff", help="receive from an analyzer (ACK all, store nothing), show it")
    s.add_argument("line", nargs="?", metavar="LINE", help="/dev/tty… or HOST:PORT")
    s.add_argument("--listen", action="store_true", help="HOST:PORT is where to listen")
    s.add_argument("--file", help="decode a capture file instead of a live line")
    s.add_argument("--encoding", default="latin-1")
    s.add_argument("--seconds", type=float, default=3600.0)
    s.add_argument(
        "--show-patient", action="store_true", help="do not mask names, ids, birth dates"
    )
    _line_options(s)
    s.set_defaults(func=_cmd_sniff)
