"""medgw core: configuration, journal, routing, delivery, service lifecycle, CLI.

The core knows no wire protocol; listeners and destinations plug in through
:mod:`gateway.registry` (ARCHITECTURE.md, "The four packages").
"""

__version__ = "0.1.0"
