"""Registers the film and ECG drop folders and ``medgw digitize``."""

from __future__ import annotations

from drivers import digitize_cli
from drivers.scans import EcgFolderSettings, FilmFolderSettings, ScanFolderListener, ScanSettings
from gateway.interfaces import Intake
from gateway.registry import PluginContext, Registry


def register(registry: Registry) -> None:
    def factory(cfg: ScanSettings, intake: Intake, ctx: PluginContext) -> ScanFolderListener:
        return ScanFolderListener(cfg, intake, ctx)

    registry.listener(
        "film-folder",
        FilmFolderSettings,
        factory,
        "scanned X-ray films from a drop folder -> DICOM Secondary Capture (digitized film)",
    )
    registry.listener(
        "ecg-folder",
        EcgFolderSettings,
        factory,
        "scanned paper ECGs from a drop folder -> DICOM 12-lead waveform + the page as SC",
    )
    registry.command("digitize", digitize_cli.setup)
