"""Configuration of the ``astm`` listener: an analyzer on a serial line or a TCP socket.

```yaml
- {id: xn550, type: astm, profile: sysmex-xn,
   transport: {serial: /dev/serial/by-id/usb-FTDI-if00, baudrate: 9600}}
```
The profile supplies the line defaults (baud rate, parity, ...), frame size,
character encoding and relaxations; settings given here win over it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from drivers.lab.profiles import Profile, ProfileError, Relaxations, find_profile
from drivers.transports import TransportSettings
from gateway.config import ListenerBase

SERIAL_KEYS = frozenset({"baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff"})


def resolve_profile(value: object, info: ValidationInfo) -> Profile:
    """Accept a profile name (looked up beside the config file and in the shipped set)."""
    if isinstance(value, Profile):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a profile name (see `medgw drivers list`)")  # noqa: TRY004
    config_dir = (info.context or {}).get("config_dir")
    try:
        return find_profile(value, config_dir)
    except ProfileError as err:
        raise ValueError(str(err)) from None


class AstmListenerSettings(ListenerBase):
    type: Literal["astm"]
    profile: Profile
    transport: TransportSettings
    encoding: str | None = None  # default: the profile's
    frame_size: int | None = Field(default=None, ge=64, le=64_000)
    relaxations: Relaxations | None = None
    orders: Literal["none", "host-query", "download"] | None = None
    download_poll_s: float = Field(default=5.0, gt=0)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    # after an ENQ collision the instrument goes first and the gateway waits this long
    # after its transfer before its own ENQ (E1381 6.2.7: 20 s); a host query answer waits
    # too, so a site whose analyzers give up on a query sooner may shorten it
    contention_wait_s: float = Field(default=20.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        """Line settings of the profile under the ones given (serial keys only for serial)."""
        if not isinstance(data, dict) or not isinstance(data.get("profile"), str):
            return data
        transport = data.get("transport")
        if not isinstance(transport, dict):
            return data
        try:
            profile = resolve_profile(data["profile"], info)
        except ValueError:
            return data  # reported by the field validator, with its path
        # line settings apply to a serial device, not to a serial-over-IP box (socket://),
        # whose own settings face the analyzer
        device = str(transport.get("serial") or "")
        on_device = bool(device) and not device.startswith("socket://")
        defaults = {
            k: v for k, v in profile.transport.items() if on_device or k not in SERIAL_KEYS
        }
        return {**data, "profile": profile, "transport": {**defaults, **transport}}

    @field_validator("profile", mode="before")
    @classmethod
    def _profile(cls, value: object, info: ValidationInfo) -> Profile:
        profile = resolve_profile(value, info)
        if profile.protocol != "astm":
            raise ValueError(
                f"profile {profile.name!r} is for {profile.protocol.upper()} analyzers "
                f"(use type: hl7-mllp with it)"
            )
        return profile

    @property
    def effective_encoding(self) -> str:
        return self.encoding or self.profile.encoding

    @property
    def effective_frame_size(self) -> int:
        return self.frame_size or self.profile.frame_size

    @property
    def effective_relaxations(self) -> Relaxations:
        return self.relaxations or self.profile.relaxations

    @property
    def effective_orders(self) -> str:
        return self.orders or self.profile.orders
