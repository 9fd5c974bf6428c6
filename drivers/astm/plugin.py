"""Registers the ASTM analyzer listener and the lab tools with the gateway."""

from __future__ import annotations

from drivers.astm import cli
from drivers.astm.listener import AstmListener
from drivers.astm.settings import AstmListenerSettings
from gateway.interfaces import Intake
from gateway.registry import PluginContext, Registry


def register(registry: Registry) -> None:
    def listener(cfg: AstmListenerSettings, intake: Intake, ctx: PluginContext) -> AstmListener:
        return AstmListener(cfg, intake, ctx)

    registry.listener(
        "astm",
        AstmListenerSettings,
        listener,
        "lab analyzer over serial or TCP (ASTM E1381/E1394): results in, host queries answered",
    )
    registry.command("astm", cli.setup_astm)
    registry.command("drivers", cli.setup_drivers)
