"""python -m services.metadata: the control plane (cluster map, buckets, S3 users)."""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import Sequence

import grpc

from kvtier import buckets as bucket_store
from kvtier import credentials, service
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc
from services.metadata import buckets, config, reconciler, servicer, users


def _add_servicers(
    server: grpc.aio.Server, ctx: service.Context, *, master_key: bytes | None
) -> Sequence[str]:
    bucket_service = buckets.BucketService(bucket_store.BucketStore(ctx.store))
    user_service = users.UserService(credentials.UserStore(ctx.store, master_key))
    metadata_pb2_grpc.add_MetadataServiceServicer_to_server(
        servicer.MetadataServicer(ctx.map_view, bucket_service, user_service), server
    )
    return [metadata_pb2.DESCRIPTOR.services_by_name["MetadataService"].full_name]


def build(cfg: config.MetadataConfig) -> service.ServiceSpec:
    """The metadata service's plug-in to the shared runtime."""
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_METADATA,
        label="metadata",
        node_id=cfg.node_id or f"metadata-{uuid.uuid4().hex[:8]}",
        add_servicers=functools.partial(
            _add_servicers, master_key=credentials.load_master_key(cfg.master_key_file)
        ),
        loops=[functools.partial(reconciler.run, policy=cfg.policy())],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the metadata service; returns the process exit code."""
    return service.main(
        config.MetadataConfig,
        "metadata",
        build,
        description="kvtier metadata service: owns the cluster map and the buckets in etcd.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
