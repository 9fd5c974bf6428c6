"""Configuration models of the HL7/MLLP listener and destination."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from drivers.lab.profiles import Profile, ProfileError, find_profile
from gateway.allowlist import parse_networks
from gateway.config import DestinationBase, EndpointField, ListenerBase
from gateway.tls import TlsSettings


def _known_codec(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return codecs.lookup(value).name
    except LookupError:
        raise ValueError(f"unknown character encoding {value!r}") from None


class MllpListenerSettings(ListenerBase):
    """``encoding``: force one (else MSH-18 decides, else ``fallback_encoding``).
    ``profile``: an HL7 analyzer's profile (``medgw drivers list``): results become
    ``lab-result`` envelopes and its host queries are answered from the lab orders.
    ``allowed_ips``: addresses or CIDR networks that may connect (empty: anyone)."""

    type: Literal["hl7-mllp"]
    listen: EndpointField
    encoding: str | None = None
    fallback_encoding: str = "utf-8"
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_connections: int = Field(default=64, ge=1)
    idle_timeout_s: float = Field(default=3600.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    handshake_timeout_s: float = Field(default=10.0, gt=0)  # TLS only
    profile: Profile | None = None
    tls: TlsSettings | None = None  # set: TLS only on this port (docs/security.md)
    allowed_ips: tuple[str, ...] = ()

    _codec = field_validator("encoding", "fallback_encoding")(_known_codec)

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)
        return value

    @property
    def forced_encoding(self) -> str | None:
        """``encoding``, else the profile's when it says to ignore MSH-18."""
        if self.encoding or self.profile is None:
            return self.encoding
        return self.profile.encoding if self.profile.hl7_behaviour.force_encoding else None

    @field_validator("profile", mode="before")
    @classmethod
    def _profile(cls, value: object, info: ValidationInfo) -> Profile | None:
        if value is None or isinstance(value, Profile):
            return value
        if not isinstance(value, str):
            raise ValueError("expected a profile name (see `medgw drivers list`)")  # noqa: TRY004
        try:
            profile = find_profile(value, (info.context or {}).get("config_dir"))
        except ProfileError as err:
            raise ValueError(str(err)) from None
        if profile.protocol != "hl7":
            raise ValueError(
                f"profile {profile.name!r} is for ASTM analyzers (use type: astm with it)"
            )
        return profile


class MllpDestinationSettings(DestinationBase):
    type: Literal["hl7-mllp"]
    connect: EndpointField
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    accept_codes: tuple[str, ...] = ("AA", "CA")
    tls: TlsSettings | None = None  # set: connect over TLS (docs/security.md)
