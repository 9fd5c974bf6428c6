"""Maps a config ``type:`` to its config model and factory.

Plugins are modules named under the ``medgw.plugins`` entry point group; each
exposes ``register(registry)``. The core imports no protocol module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from gateway.interfaces import Destination, Intake, Listener

CommandSetup = Callable[[Any], None]  # receives argparse's subparsers object

ListenerFactory = Callable[[Any, "Intake", "PluginContext"], "Listener"]
DestinationFactory = Callable[[Any, "PluginContext"], "Destination"]
StepFactory = Callable[[Any, "PluginContext"], Any]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin may need besides its own config section."""

    site_id: str
    state_dir: str
    metrics: Any  # gateway.metrics.Metrics
    # objects plugins share (a worklist store used by a step and a listener, ...)
    services: dict[str, Any] = field(default_factory=dict)
    config_dir: str = ""  # folder of the config file (site analyzer profiles live beside it)
    events: Any = None  # gateway.events.EventBus: operational events (ai.flagged, ...)
    route: str = ""  # for a route's steps: the route's destination name (``steps:<key>``)


@dataclass(frozen=True, slots=True)
class Kind:
    model: type[BaseModel]
    factory: Callable[..., Any]
    summary: str


@dataclass
class Registry:
    listeners: dict[str, Kind] = field(default_factory=dict)
    destinations: dict[str, Kind] = field(default_factory=dict)
    steps: dict[str, Kind] = field(default_factory=dict)
    commands: dict[str, CommandSetup] = field(default_factory=dict)

    def listener(
        self, type_: str, model: type[BaseModel], factory: ListenerFactory, summary: str
    ) -> None:
        self.listeners[type_] = Kind(model, factory, summary)

    def destination(
        self, type_: str, model: type[BaseModel], factory: DestinationFactory, summary: str
    ) -> None:
        self.destinations[type_] = Kind(model, factory, summary)

    def step(self, name: str, model: type[BaseModel], factory: StepFactory, summary: str) -> None:
        """A route step; ``factory(params, ctx)`` returns an object with
        ``async run(envelope) -> list[envelope]`` (see gateway.steps)."""
        self.steps[name] = Kind(model, factory, summary)

    def command(self, name: str, setup: CommandSetup) -> None:
        """A ``medgw NAME ...`` subcommand; ``setup(subparsers)`` adds its parser and
        sets ``func`` (argparse.Namespace -> exit code) as a default."""
        self.commands[name] = setup


_default: Registry | None = None


def default_registry() -> Registry:
    """The registry filled from every installed ``medgw.plugins`` entry point."""
    global _default  # noqa: PLW0603 - one process-wide registry, built once
    if _default is None:
        reg = Registry()
        for ep in sorted(entry_points(group="medgw.plugins"), key=lambda e: e.name):
            ep.load().register(reg)
        _default = reg
    return _default
