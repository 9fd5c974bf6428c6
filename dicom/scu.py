"""Placeholder: being written (imaging issue)."""

from gateway.registry import Registry


def register(registry: Registry) -> None:
    return None
