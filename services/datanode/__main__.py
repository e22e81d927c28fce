"""python -m services.datanode: shard storage on local drives."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from kvtier import identity, service
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc
from services.datanode import config, drives, servicer


def _add_servicers(
    local: Sequence[drives.LocalDrive], server: grpc.aio.Server, ctx: service.Context
) -> Sequence[str]:
    datanode_pb2_grpc.add_DatanodeServiceServicer_to_server(
        servicer.DatanodeServicer(ctx.node_id, local), server
    )
    return [datanode_pb2.DESCRIPTOR.services_by_name["DatanodeService"].full_name]


def build(cfg: config.DatanodeConfig) -> service.ServiceSpec:
    """Lock the state dir, load the identity, open the drives, and plug into the runtime."""
    data_dir = Path(cfg.data_dir)
    lock = identity.lock_state_dir(data_dir)
    node_id = identity.load_or_create(data_dir, cfg.node_id, "datanode")
    local = drives.open_drives(cfg.drive_paths(), node_id)
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_DATANODE,
        label="datanode",
        node_id=node_id,
        on_close=lock.close,
        dataplane=True,
        add_servicers=functools.partial(_add_servicers, local),
        drives=functools.partial(servicer.describe, local),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a datanode; returns the process exit code."""
    return service.main(
        config.DatanodeConfig,
        "datanode",
        build,
        description="kvtier datanode: stores erasure-coded shards on local drives.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
