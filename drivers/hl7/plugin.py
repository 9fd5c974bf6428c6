"""Registers the HL7/MLLP listener and destination with the gateway."""

from __future__ import annotations

from drivers.hl7 import cli
from drivers.hl7.listener import MllpListener
from drivers.hl7.sender import MllpDestination
from drivers.hl7.settings import MllpDestinationSettings, MllpListenerSettings
from gateway.interfaces import Intake
from gateway.registry import PluginContext, Registry


def register(registry: Registry) -> None:
    def listener(cfg: MllpListenerSettings, intake: Intake, ctx: PluginContext) -> MllpListener:
        return MllpListener(cfg, intake)

    def destination(cfg: MllpDestinationSettings, ctx: PluginContext) -> MllpDestination:
        return MllpDestination(cfg)

    registry.listener(
        "hl7-mllp",
        MllpListenerSettings,
        listener,
        "receives HL7 v2 over MLLP, ACKs after the journal commit",
    )
    registry.destination(
        "hl7-mllp",
        MllpDestinationSettings,
        destination,
        "sends HL7 v2 over MLLP, one message at a time, checks the ACK",
    )
    registry.command("hl7", cli.setup)
