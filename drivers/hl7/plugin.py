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
        tls = (
            cfg.tls.server_context(ctx.config_dir, where=f"listener {cfg.id}: tls")
            if cfg.tls is not None
            else None
        )
        if cfg.profile is None:
            return MllpListener(cfg, intake, tls_context=tls)
        from drivers.lab.hl7_analyzer import Hl7AnalyzerHooks  # noqa: PLC0415
        from drivers.lab.order_store import order_store  # noqa: PLC0415

        store = order_store(ctx) if cfg.profile.orders != "none" else None
        hooks = Hl7AnalyzerHooks(cfg.id, cfg.profile, store, ctx.site_id)
        return MllpListener(cfg, intake, hooks, tls_context=tls)

    def destination(cfg: MllpDestinationSettings, ctx: PluginContext) -> MllpDestination:
        if cfg.tls is None:
            return MllpDestination(cfg)
        where = f"destination {cfg.id}: tls"
        return MllpDestination(cfg, cfg.tls.client_context(ctx.config_dir, where=where))

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
