"""``medgw dicom echo|send|complete``: link tests for technicians, and forcing a study complete.

``echo AE@host:port`` sends a C-ECHO (PS3.7 section 9.1.5) and prints the status
and round trip. ``send FILE|DIR... AE@host:port`` C-STOREs each file on one
association (a new one only when the peer drops it or more than 128
SOP class / transfer syntax pairs are needed), reading file meta only: the
data set goes out in the file's own transfer syntax without being decoded.
``complete STUDY_UID --config FILE`` writes the study's ``study.complete``
event into the journal beside a running (or stopped) gateway and closes the
study in the tracker.

Exit codes: 0 all succeeded, 1 a peer refused or failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MAX_CONTEXTS = 128  # PS3.8 section 9.3.2.2: presentation context ids are odd 1..255


def _quiet_library(verbose: bool) -> None:
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _status_text(status: int) -> str:
    from pynetdicom.status import (  # noqa: PLC0415 - keeps `medgw --help` light
        STORAGE_SERVICE_CLASS_STATUS,
        VERIFICATION_SERVICE_CLASS_STATUS,
    )

    known = {**VERIFICATION_SERVICE_CLASS_STATUS, **STORAGE_SERVICE_CLASS_STATUS}
    category, text = known.get(status, ("Unknown", ""))
    return f"0x{status:04X} {category}{': ' + text if text else ''}"


def _refusal(assoc: Any) -> str:
    """Why ``ae.associate()`` gave no established association, in a technician's words."""
    rsp = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected:
        if rsp is not None:
            return f"association rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
        return "association rejected"
    if rsp is None:
        return "cannot connect (refused, unreachable, or no answer in time)"
    if not assoc.accepted_contexts:
        return "the peer accepted none of the proposed presentation contexts"
    return "association aborted"


# -- echo -----------------------------------------------------------------------------------


def _cmd_echo(args: argparse.Namespace, registry: Any) -> int:
    from pynetdicom import AE  # noqa: PLC0415

    from dicom.net import NODELAY_HANDLER, parse_ae_address, verification_context  # noqa: PLC0415

    _quiet_library(args.verbose)
    try:
        target = parse_ae_address(args.target)
        calling = _ae(args.calling_ae)
    except ValueError as err:
        print(f"medgw dicom echo: {err}", file=sys.stderr)
        return 2
    ae = AE(ae_title=calling)
    ae.requested_contexts = [verification_context()]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    started = time.perf_counter()
    assoc = ae.associate(
        target.endpoint.host,
        target.endpoint.port,
        ae_title=target.ae_title,
        evt_handlers=[NODELAY_HANDLER],
    )
    associated = time.perf_counter()
    if not assoc.is_established:
        print(f"{target}: FAILED {_refusal(assoc)}")
        return 1
    try:
        rsp = assoc.send_c_echo()
        echoed = time.perf_counter()
    finally:
        assoc.release()
    status = getattr(rsp, "Status", None)
    if status is None:
        print(f"{target}: FAILED no C-ECHO response (timeout or association lost)")
        return 1
    print(
        f"{target}: C-ECHO {_status_text(int(status))} in {(echoed - associated) * 1000:.1f} ms "
        f"(association {(associated - started) * 1000:.1f} ms)"
    )
    return 0 if status == 0x0000 else 1


def _ae(value: str) -> str:
    from dicom.net import check_ae_title  # noqa: PLC0415

    return check_ae_title(value)


# -- send -----------------------------------------------------------------------------------


def _files(paths: Iterable[str]) -> Iterator[Path]:
    for item in paths:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _batches(
    items: list[tuple[Path, str, str]],
) -> Iterator[tuple[list[tuple[str, str]], list[tuple[Path, str, str]]]]:
    """Group files so that each association needs at most MAX_CONTEXTS contexts."""
    pairs: list[tuple[str, str]] = []
    batch: list[tuple[Path, str, str]] = []
    for item in items:
        pair = (item[1], item[2])
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            yield pairs, batch
            pairs, batch = [], []
        if pair not in pairs:
            pairs.append(pair)
        batch.append(item)
    if batch:
        yield pairs, batch


def _cmd_send(args: argparse.Namespace, registry: Any) -> int:
    from pynetdicom import AE, _config, build_context  # noqa: PLC0415
    from pynetdicom.dsutils import split_dataset  # noqa: PLC0415

    from dicom.net import NODELAY_HANDLER, parse_ae_address  # noqa: PLC0415

    _quiet_library(args.verbose)
    # send each file's data set bytes as stored, never decoded (pynetdicom >= 2.0)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        target = parse_ae_address(args.target)
        calling = _ae(args.calling_ae)
    except ValueError as err:
        print(f"medgw dicom send: {err}", file=sys.stderr)
        return 2
    failed = 0
    items: list[tuple[Path, str, str]] = []
    for path in _files(args.files):
        try:
            meta, _ = split_dataset(path)
            items.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as err:  # noqa: BLE001 - whatever pydicom says, the file is unusable
            print(f"{path}: SKIPPED not a DICOM file with file meta ({type(err).__name__})")
            failed += 1
    if not items:
        print("medgw dicom send: no DICOM files to send", file=sys.stderr)
        return 1
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    sent = total_bytes = 0
    started = time.perf_counter()
    pending = len(items)
    for pairs, batch in _batches(items):
        contexts = [build_context(sop, [syntax]) for sop, syntax in pairs]
        assoc = None
        for path, _, _ in batch:
            if assoc is None or not assoc.is_established:  # first, or the peer dropped it
                assoc = ae.associate(
                    target.endpoint.host,
                    target.endpoint.port,
                    contexts=contexts,
                    ae_title=target.ae_title,
                    max_pdu=args.max_pdu,
                    evt_handlers=[NODELAY_HANDLER],
                )
                if not assoc.is_established:
                    print(f"{path}: FAILED {_refusal(assoc)}")
                    if pending > 1:
                        print(f"{pending - 1} more file(s) not sent")
                    failed += pending
                    pending = 0
                    break
            pending -= 1
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, AttributeError, OSError, RuntimeError) as err:
                print(f"{path}: FAILED {err}")
                failed += 1
                continue
            status = getattr(rsp, "Status", None)
            if status is None:
                print(f"{path}: FAILED no C-STORE response (timeout or association lost)")
                failed += 1
                continue
            ok = status == 0x0000 or (status & 0xF000) == 0xB000  # warnings are stored
            print(f"{path}: {'' if ok else 'FAILED '}{_status_text(int(status))}")
            if ok:
                sent += 1
                total_bytes += path.stat().st_size
            else:
                failed += 1
        if assoc is not None and assoc.is_established:
            assoc.release()
        if not pending:
            break
    elapsed = time.perf_counter() - started
    print(
        f"{sent} sent, {failed} failed, {total_bytes / 1e6:.1f} MB in {elapsed:.2f} s to {target}"
    )
    return 1 if failed else 0


# -- complete -------------------------------------------------------------------------------


def _cmd_complete(args: argparse.Namespace, registry: Any) -> int:
    from dicom.studies import StudyStore, store_path  # noqa: PLC0415
    from gateway.config import load_config  # noqa: PLC0415
    from gateway.errors import ConfigError, JournalError  # noqa: PLC0415
    from gateway.journal import admin_connection, insert_sync  # noqa: PLC0415
    from gateway.router import Router  # noqa: PLC0415

    try:
        cfg = load_config(args.config, registry)
    except ConfigError as err:
        print(f"{args.config}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    path = store_path(cfg.state_dir)
    if not path.exists():
        print(f"medgw dicom complete: no study tracker at {path}", file=sys.stderr)
        return 1
    router = Router(cfg.routes)
    with StudyStore(path) as store:
        studies = store.find(args.study_uid)
        if not studies:
            print(f"{args.study_uid}: unknown study (no instance of it was received)")
            return 1
        for study in studies:
            if not study.is_open:
                print(
                    f"{study.study_uid}: already complete ({study.completed_instances} "
                    f"instances, listener {study.source})"
                )
                continue
            envelope = study.event()
            destinations = router.destinations(envelope)
            try:
                with admin_connection(cfg.state_dir) as conn:
                    accepted = insert_sync(conn, envelope, destinations)
            except JournalError as err:
                print(f"medgw dicom complete: {err}", file=sys.stderr)
                return 1
            store.mark_complete(study)
            print(
                f"{study.study_uid}: study.complete with {study.instances} instances "
                f"(listener {study.source}) journaled as "
                f"{accepted.duplicate_of or accepted.id} for "
                f"{', '.join(destinations) or 'no route'}"
            )
    return 0


# -- parser ---------------------------------------------------------------------------------


def setup(subparsers: Any) -> None:
    p = subparsers.add_parser("dicom", help="DICOM tools for technicians")
    sub = p.add_subparsers(dest="dicom_command", required=True)

    e = sub.add_parser("echo", help="C-ECHO a DICOM peer, print status and round trip")
    e.add_argument("target", metavar="AE@HOST:PORT")
    e.set_defaults(func=_cmd_echo)

    s = sub.add_parser("send", help="C-STORE files (folders: every file inside) to a peer")
    s.add_argument("files", nargs="+", metavar="FILE|DIR")
    s.add_argument("target", metavar="AE@HOST:PORT")
    s.add_argument(
        "--max-pdu", type=int, default=1024 * 1024, help="maximum PDU we receive (bytes)"
    )
    s.set_defaults(func=_cmd_send)

    for cmd in (e, s):
        cmd.add_argument("--calling-ae", default="MEDGW", help="our AE title (default MEDGW)")
        cmd.add_argument("--timeout", type=float, default=30.0, help="seconds per step")
        cmd.add_argument("--verbose", action="store_true", help="log pynetdicom's exchanges")

    c = sub.add_parser("complete", help="force the study.complete event of a study now")
    c.add_argument("study_uid", metavar="STUDY_UID")
    c.add_argument("--config", required=True, help="the gateway's configuration file")
    c.set_defaults(func=_cmd_complete)
