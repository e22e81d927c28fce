"""Settings of a kvcache node."""

from __future__ import annotations

import dataclasses

from kvtier import config


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KVCacheConfig(config.DataPlaneServiceConfig):
    """A kvcache node: DRAM block pools (block API arrives with the KV-cache tier)."""

    data_dir: str = config.setting("./kvtier-data/kvcache", "node state (identity, lock)")

    def __post_init__(self) -> None:
        config.DataPlaneServiceConfig.__post_init__(self)
        if not self.data_dir:
            raise config.ConfigError("data_dir: must not be empty")
