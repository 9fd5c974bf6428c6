"""IP allow-lists for listeners: ``10.0.0.5``, ``10.1.0.0/16``, ``fd00::/8``.

Shared by every listener that accepts connections (DICOM, HL7/MLLP, ASTM over
TCP); an empty list allows anyone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.5``, ``10.1.0.0/16``, ``fd00::/8`` -> networks (ValueError names the bad one)."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR network: {item!r}") from None
    return tuple(out)


def address_allowed(host: str, networks: Sequence[Network]) -> bool:
    """True when ``networks`` is empty or one of them holds ``host`` (IPv4-mapped IPv6
    addresses count as their IPv4 address)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)
