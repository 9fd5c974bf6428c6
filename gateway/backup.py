"""Backup and restore of the state folder (``medgw backup`` / ``medgw restore``).

A backup is a folder: every SQLite file of the state folder copied with SQLite's
online backup API (a consistent snapshot even while the gateway writes), the blob
files that the journal snapshot references, and ``manifest.json``, written last, so
a folder without a manifest is an unfinished backup. docs/storage.md walks a
technician through both.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import load_config
from gateway.errors import ConfigError, JournalError, PermanentError
from gateway.journal import LOCK_NAME, fsync_dir, quick_check, write_durably
from gateway.registry import Registry

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
JOURNAL = "journal.sqlite"
BLOBS = "blobs"


class BackupError(PermanentError):
    """A backup or restore that cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    folder: Path
    databases: list[str]
    blobs: int
    blob_bytes: int
    missing_blobs: list[str]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _databases(state_dir: Path) -> list[Path]:
    """The journal first, then the plugins' own SQLite files (orders, worklist, ...)."""
    others = sorted(p for p in state_dir.glob("*.sqlite") if p.name != JOURNAL)
    return [state_dir / JOURNAL, *others]


def _snapshot(src: Path, dst: Path) -> None:
    """SQLite's online backup API: a consistent copy while writers keep going."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=10.0)
    target = sqlite3.connect(dst)
    try:
        source.backup(target, pages=4096)
        target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
    finally:
        target.close()
        source.close()


def backup(state_dir: Path, to: Path) -> BackupResult:
    """Copy the state folder into the new folder ``to`` (which must not hold anything)."""
    state_dir = Path(state_dir)
    if not (state_dir / JOURNAL).is_file():
        raise BackupError(f"no journal at {state_dir / JOURNAL}: check state_dir in the config")
    if to.exists() and any(to.iterdir()):
        raise BackupError(f"{to} is not empty: give a new folder for each backup")
    to.mkdir(parents=True, exist_ok=True)
    databases = []
    for db in _databases(state_dir):
        _snapshot(db, to / db.name)
        databases.append(db.name)
    conn = sqlite3.connect(f"file:{to / JOURNAL}?mode=ro", uri=True)
    try:
        referenced = [
            r[0] for r in conn.execute("SELECT blob FROM envelopes WHERE blob IS NOT NULL")
        ]
        pending = conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()
    finally:
        conn.close()
    blobs: dict[str, int] = {}
    missing = []
    for rel in referenced:
        src = state_dir / BLOBS / rel
        dst = to / BLOBS / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except FileNotFoundError:  # pruned after the snapshot, or lost before it
            missing.append(rel)
            continue
        blobs[rel] = dst.stat().st_size
    for folder in {(to / BLOBS / rel).parent for rel in blobs}:
        fsync_dir(folder)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "medgw": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "state_dir": str(state_dir),
        "databases": {name: _sha256(to / name) for name in databases},
        "pending_deliveries": pending[0],
        "blobs": blobs,
        "missing_blobs": missing,
    }
    write_durably(to / MANIFEST, json.dumps(manifest, indent=1).encode())
    log.info("backup.done to=%s blobs=%d missing=%d", to, len(blobs), len(missing))
    return BackupResult(to, databases, len(blobs), sum(blobs.values()), missing)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it names is there and intact."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BackupError(f"{folder} has no {MANIFEST}: not a backup, or an unfinished one")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: backup format {manifest.get('format')!r} is not {FORMAT}")
    for name, digest in manifest["databases"].items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise BackupError(f"{folder / name} is missing or changed since the backup")
    for rel, size in manifest["blobs"].items():
        blob = folder / BLOBS / rel
        if not blob.is_file() or blob.stat().st_size != size:
            raise BackupError(f"{blob} is missing or truncated")
    quick_check(folder / JOURNAL)
    return manifest


def restore(backup_dir: Path, state_dir: Path, *, force: bool = False) -> Path | None:
    """Replace the state folder's databases and blobs with the backup's.

    Refuses while a gateway (or anything else holding the journal open) uses the
    state folder, unless ``force``. What was there is moved aside into
    ``<state_dir>.pre-restore-<time>`` (returned), never deleted."""
    manifest = read_manifest(backup_dir)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            if not force:
                raise BackupError(
                    f"state folder {state_dir} is in use by a running gateway: stop it first "
                    "(sudo systemctl stop medgw), or add --force if you are sure it is not"
                ) from err
            log.warning("restore.forced state_dir=%s is locked", state_dir)
        return _replace(backup_dir, state_dir, manifest)
    finally:
        os.close(fd)


def _replace(backup_dir: Path, state_dir: Path, manifest: dict[str, Any]) -> Path | None:
    names = [*manifest["databases"], BLOBS]
    old = [
        p
        for name in names
        for p in (state_dir / name, state_dir / f"{name}-wal", state_dir / f"{name}-shm")
        if p.exists()
    ]
    aside = None
    if old:
        aside = state_dir.with_name(
            f"{state_dir.name}.pre-restore-{time.strftime('%Y%m%dT%H%M%S')}"
        )
        aside.mkdir()
        for p in old:
            p.rename(aside / p.name)
    for name in manifest["databases"]:
        tmp = state_dir / f".{name}.restore"
        shutil.copyfile(backup_dir / name, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.rename(state_dir / name)
    if (backup_dir / BLOBS).is_dir():
        shutil.copytree(backup_dir / BLOBS, state_dir / BLOBS)
    else:
        (state_dir / BLOBS).mkdir()
    fsync_dir(state_dir)
    log.info("restore.done from=%s state_dir=%s aside=%s", backup_dir, state_dir, aside)
    return aside


# -- command line -----------------------------------------------------------------------


def add_commands(sub: Any, default_config: str) -> None:
    """``medgw backup`` and ``medgw restore`` (registered by gateway.cli)."""
    b = sub.add_parser("backup", help="copy the state folder (safe while the gateway runs)")
    b.add_argument("--config", default=default_config)
    b.add_argument("--to", required=True, type=Path, help="a new, empty folder")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="put a backup back (stop the gateway first)")
    r.add_argument("--config", default=default_config)
    r.add_argument("--from", dest="source", required=True, type=Path, help="a backup folder")
    r.add_argument("--force", action="store_true", help="even if the state folder is locked")
    r.set_defaults(func=cmd_restore)


def _state_dir(config: str, registry: Registry) -> Path | None:
    try:
        return Path(load_config(config, registry).state_dir)
    except ConfigError as err:
        print(f"{config}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_backup(args: argparse.Namespace, registry: Registry) -> int:
    state_dir = _state_dir(args.config, registry)
    if state_dir is None:
        return 2
    try:
        result = backup(state_dir, args.to)
    except (BackupError, sqlite3.Error, OSError) as err:
        print(f"medgw backup: {err}", file=sys.stderr)
        return 1
    print(
        f"backup in {result.folder}: {', '.join(result.databases)}, "
        f"{result.blobs} blob files ({result.blob_bytes >> 20} MB)"
    )
    if result.missing_blobs:
        print(f"warning: {len(result.missing_blobs)} blob files were missing", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace, registry: Registry) -> int:
    state_dir = _state_dir(args.config, registry)
    if state_dir is None:
        return 2
    try:
        aside = restore(args.source, state_dir, force=args.force)
    except (BackupError, JournalError, sqlite3.Error, OSError) as err:
        print(f"medgw restore: {err}", file=sys.stderr)
        return 1
    print(f"restored {args.source} into {state_dir}")
    if aside is not None:
        print(f"the previous state was moved to {aside}")
    return 0
