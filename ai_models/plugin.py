"""Registers the ``ai-triage`` step and the ``models`` / ``ai`` commands."""

from __future__ import annotations

from ai_models import cli
from ai_models.triage import TriageParams, TriageStep
from gateway.registry import PluginContext, Registry


def register(registry: Registry) -> None:
    def factory(params: TriageParams, ctx: PluginContext) -> TriageStep:
        return TriageStep(params, ctx)

    registry.step(
        "ai-triage",
        TriageParams,
        factory,
        "ONNX triage of eligible images: SR/SC to the study, priority to the RIS; "
        "the original always goes on unchanged",
    )
    registry.command("models", cli.setup_models)
    registry.command("ai", cli.setup_ai)
