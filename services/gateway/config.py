"""Settings of a gateway."""

from __future__ import annotations

import dataclasses

from kvtier import config


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig(config.ServiceConfig):
    """The stateless front door (object API and S3 arrive with later issues)."""
