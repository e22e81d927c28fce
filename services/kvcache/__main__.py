"""python -m services.kvcache: a DRAM block-pool node of the KV-cache tier."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from kvtier import identity, service
from kvtier.proto.common.v1 import common_pb2
from services.kvcache import config


def _add_servicers(server: grpc.aio.Server, ctx: service.Context) -> Sequence[str]:
    # The block API (kvtier.kvcache.v1) is registered here once it exists; until then the node
    # serves NodeService, health and reflection, and takes its place in the cluster map.
    return []


def build(cfg: config.KVCacheConfig) -> service.ServiceSpec:
    """Lock the state dir, load the identity, and plug into the runtime."""
    data_dir = Path(cfg.data_dir)
    lock = identity.lock_state_dir(data_dir)
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_KVCACHE,
        label="kvcache",
        node_id=identity.load_or_create(data_dir, cfg.node_id, "kvcache"),
        on_close=lock.close,
        dataplane=True,
        add_servicers=_add_servicers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a kvcache node; returns the process exit code."""
    return service.main(
        config.KVCacheConfig,
        "kvcache",
        build,
        description="kvtier kvcache node: shared DRAM pools for KV-cache blocks.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
