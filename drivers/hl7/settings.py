"""Configuration models of the HL7/MLLP listener and destination."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import Field, field_validator

from gateway.config import DestinationBase, EndpointField, ListenerBase


def _known_codec(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return codecs.lookup(value).name
    except LookupError:
        raise ValueError(f"unknown character encoding {value!r}") from None


class MllpListenerSettings(ListenerBase):
    """``encoding``: force one (else MSH-18 decides, else ``fallback_encoding``)."""

    type: Literal["hl7-mllp"]
    listen: EndpointField
    encoding: str | None = None
    fallback_encoding: str = "utf-8"
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_connections: int = Field(default=64, ge=1)
    idle_timeout_s: float = Field(default=3600.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)

    _codec = field_validator("encoding", "fallback_encoding")(_known_codec)


class MllpDestinationSettings(DestinationBase):
    type: Literal["hl7-mllp"]
    connect: EndpointField
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    accept_codes: tuple[str, ...] = ("AA", "CA")
