"""``medgw digitize film|ecg FILE…`` and ``medgw digitize pending``, for technicians.

``film``/``ecg`` either hand the files to a running gateway's drop folder (``--to
LISTENER``: copied with a ``.ready`` sidecar naming the accession or patient id,
so the gateway matches, converts and routes them), or convert them here and
write the DICOM objects to ``--output DIR`` (no gateway needed). ``pending``
lists the scans waiting in ``unmatched/`` (and those in ``failed/``) with why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from dicom.film import FilmError
from drivers.scans import (
    EcgFolderSettings,
    FilmFolderSettings,
    ScanSettings,
    convert,
    waiting_files,
)
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.orders import Order

DEFAULT_CONFIG = "/etc/medgw/gateway.yaml"


def _config(path: str, registry: Any) -> GatewayConfig | None:
    try:
        return load_config(path, registry)
    except ConfigError as err:
        print(f"{path}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _scan_listeners(cfg: GatewayConfig) -> dict[str, ScanSettings]:
    return {
        lcfg.id: lcfg
        for lcfg in cfg.listeners
        if isinstance(lcfg, FilmFolderSettings | EcgFolderSettings)
    }


def _progress(n: int, total: int, name: str, outcome: str) -> None:
    width = 20
    done = int(width * n / total)
    bar = "#" * done + "." * (width - done)
    print(f"[{bar}] {n}/{total} {name}: {outcome}", flush=True)


def cmd_digitize(args: argparse.Namespace, registry: Any) -> int:
    files = [Path(f) for f in args.files]
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"medgw digitize: no such file: {missing[0]}", file=sys.stderr)
        return 2
    if not args.accession and not args.patient_id:
        print("medgw digitize: give --accession or --patient-id (never guessed)", file=sys.stderr)
        return 2
    if args.output:
        return _to_folder(args, files)
    if not args.to:
        print("medgw digitize: give --to LISTENER (with --config) or --output DIR", file=sys.stderr)
        return 2
    cfg = _config(args.config, registry)
    if cfg is None:
        return 2
    listener = _scan_listeners(cfg).get(args.to)
    if listener is None or listener.type != f"{args.kind}-folder":
        known = ", ".join(
            i for i, s in _scan_listeners(cfg).items() if s.type == f"{args.kind}-folder"
        )
        kind = f"{args.kind}-folder"
        print(
            f"medgw digitize: no {kind} listener {args.to!r} (known: {known or 'none'})",
            file=sys.stderr,
        )
        return 2
    meta = {k: v for k, v in (("accession", args.accession), ("patient_id", args.patient_id)) if v}
    waiting = [listener.path / f.name for f in files if (listener.path / f.name).exists()]
    if waiting:  # never replace a scan the gateway has not taken yet
        print(f"medgw digitize: {waiting[0]} is already waiting; rename the file", file=sys.stderr)
        return 2
    listener.path.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(files, 1):
        target = listener.path / path.name
        tmp = listener.path / f".{path.name}.part"
        shutil.copyfile(path, tmp)
        # the sidecar before the scan: the file appears complete and identified at once
        target.with_name(target.name + ".ready").write_text(json.dumps(meta), encoding="utf-8")
        tmp.replace(target)
        _progress(n, len(files), path.name, f"handed to {args.to}")
    return 0


def _to_folder(args: argparse.Namespace, files: list[Path]) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    order = Order(control="new", accession=args.accession or "", patient_id=args.patient_id or "")
    settings: ScanSettings
    common = {"id": "cli", "path": out, "dpi": args.dpi}
    if args.kind == "film":
        settings = FilmFolderSettings(type="film-folder", body_part=args.body_part or "", **common)
    else:
        settings = EcgFolderSettings(type="ecg-folder", **common)
    bad = 0
    for n, path in enumerate(files, 1):
        try:
            envelopes = convert(settings, path.read_bytes(), order)
        except (FilmError, OSError, ValueError) as err:
            bad += 1
            _progress(n, len(files), path.name, f"FAILED {err}")
            continue
        names: list[str] = []
        for env in envelopes:
            ext = "dcm" if env.kind == "dicom" else "hl7"
            name = f"{path.stem}_{env.headers.get('Modality', env.kind)}_{len(names) + 1}.{ext}"
            (out / name).write_bytes(env.body)
            names.append(name)
        note = envelopes[0].headers.get("ecg_not_digitized")
        _progress(
            n, len(files), path.name, ", ".join(names) + (f" (no waveform: {note})" if note else "")
        )
    return 1 if bad else 0


def cmd_pending(args: argparse.Namespace, registry: Any) -> int:
    cfg = _config(args.config, registry)
    if cfg is None:
        return 2
    count = 0
    for lid, settings in _scan_listeners(cfg).items():
        for sub in ("unmatched", "failed"):
            for path in waiting_files(settings.path / sub):
                reason_file = path.with_name(path.name + ".reason.txt")
                reason = (
                    reason_file.read_text(encoding="utf-8").strip() if reason_file.exists() else ""
                )
                print(f"{lid} {sub:9} {path.name}: {reason}")
                count += 1
    if not count:
        print("nothing waiting")
    return 0


def setup(subparsers: Any) -> None:
    p = subparsers.add_parser("digitize", help="scanned film / paper ECG into DICOM")
    sub = p.add_subparsers(dest="digitize_command", required=True)
    for kind in ("film", "ecg"):
        s = sub.add_parser(kind, help=f"digitize {kind} scans (JPEG/PNG/TIFF)")
        s.add_argument("files", nargs="+", metavar="FILE")
        s.add_argument("--accession", help="the order's accession number")
        s.add_argument("--patient-id", help="the patient id (when there is no accession)")
        s.add_argument("--to", metavar="LISTENER", help="hand to this drop folder of --config")
        s.add_argument("--config", default=DEFAULT_CONFIG)
        s.add_argument("--output", metavar="DIR", help="write DICOM files here instead")
        s.add_argument("--dpi", type=float, default=150.0 if kind == "film" else 200.0)
        if kind == "film":
            s.add_argument("--body-part", help="e.g. CHEST")
        s.set_defaults(func=cmd_digitize, kind=kind)
    pending = sub.add_parser("pending", help="scans waiting in unmatched/ or failed/, and why")
    pending.add_argument("--config", default=DEFAULT_CONFIG)
    pending.set_defaults(func=cmd_pending)
