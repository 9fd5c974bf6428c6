"""Folder outbox destination: each envelope written as one file, durably.

The file name is the envelope's receive time and id, so a redelivery after a
crash overwrites the same file instead of adding a copy, and a folder listing
is in arrival order. The body is written byte-exact.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from gateway.config import DestinationBase
from gateway.envelope import StoredEnvelope
from gateway.errors import TransientError
from gateway.journal import fsync_dir, write_durably
from gateway.registry import PluginContext, Registry

EXTENSIONS = {"hl7": "hl7", "dicom": "dcm", "astm": "astm", "event": "json", "ai-result": "json"}
# lab results: as the analyzer sent them, or normalized by map-codes
LAB_EXTENSIONS = {"astm": "astm", "hl7": "hl7", "medgw-lab-report+json": "json"}


def extension(envelope: StoredEnvelope) -> str:
    if envelope.kind == "lab-result":
        fmt = envelope.headers.get("format") or envelope.headers.get("protocol", "")
        return LAB_EXTENSIONS.get(fmt, "bin")
    return EXTENSIONS.get(envelope.kind, "bin")


class FolderConfig(DestinationBase):
    type: Literal["folder"]
    path: Path


class FolderSender:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, envelope: StoredEnvelope) -> str:
        name = (
            f"{envelope.received_at:%Y%m%dT%H%M%S}_{envelope.id}.{extension(envelope)}"
        )
        try:
            await asyncio.to_thread(self._write, self.path / name, envelope.body)
        except OSError as err:
            raise TransientError(f"cannot write {self.path / name}: {err}") from err
        return name

    def _write(self, target: Path, body: bytes) -> None:
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.path.parent)
        write_durably(target, body)

    async def aclose(self) -> None:
        return None


class FolderDestination:
    def __init__(self, cfg: FolderConfig) -> None:
        self.id = cfg.id
        self.path = cfg.path
        if self.path.is_dir():  # a crash mid-write leaves a hidden temp file; never delivered
            for stale in self.path.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def sender(self) -> FolderSender:
        return FolderSender(self.path)


def register(registry: Registry) -> None:
    def make(cfg: FolderConfig, ctx: PluginContext) -> FolderDestination:
        return FolderDestination(cfg)

    registry.destination(
        "folder", FolderConfig, make, "writes each message as a file into a local folder (outbox)"
    )
