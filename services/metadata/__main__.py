"""python -m services.metadata: the control plane (cluster map, buckets, S3 users)."""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from collections.abc import Sequence

import grpc

from kvtier import authservice, errors, masterkey, service
from kvtier import buckets as bucket_store
from kvtier import config as kvtier_config
from kvtier import users as user_store
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc
from services.metadata import buckets, config, reconciler, servicer, users

log = logging.getLogger(__name__)


def _add_servicers(
    server: grpc.aio.Server, ctx: service.Context, *, master_key: masterkey.MasterKey | None
) -> Sequence[str]:
    bucket_service = buckets.BucketService(bucket_store.BucketStore(ctx.store))
    if master_key is None:
        log.warning(
            "no master key (master_key_file, %s): S3 users are disabled", masterkey.ENV_MASTER_KEY
        )
    else:
        log.info("S3 users enabled with master key %s", master_key.key_id)
    user_service = users.UserService(user_store.UserStore(ctx.store, master_key))
    metadata_pb2_grpc.add_MetadataServiceServicer_to_server(
        servicer.MetadataServicer(ctx.map_view, bucket_service, user_service, ctx.store),
        server,
    )
    return [metadata_pb2.DESCRIPTOR.services_by_name["MetadataService"].full_name]


def build(cfg: config.MetadataConfig) -> service.ServiceSpec:
    """The metadata service's plug-in to the shared runtime.

    Raises ConfigError when the configured master key cannot be used (unreadable, not private,
    not 32 bytes); no key at all is fine: S3 users are then disabled.
    """
    try:
        master_key = masterkey.load(cfg.master_key_file)
    except errors.InvalidArgument as exc:
        raise kvtier_config.ConfigError(exc.message) from None
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_METADATA,
        label="metadata",
        node_id=cfg.node_id or f"metadata-{uuid.uuid4().hex[:8]}",
        add_servicers=functools.partial(_add_servicers, master_key=master_key),
        loops=[functools.partial(reconciler.run, policy=cfg.policy())],
        user_lookup=functools.partial(_user_lookup, master_key=master_key),
    )


def _user_lookup(
    ctx: service.Context, *, master_key: masterkey.MasterKey | None
) -> authservice.UserLookup:
    """Users with their secrets, read from etcd for each session-token request."""
    store = user_store.UserStore(ctx.store, master_key)

    async def lookup(access_key: str) -> user_store.User | None:
        if not store.enabled:
            raise errors.PreconditionFailed("no master key: users are disabled on this node")
        try:
            return await store.get(access_key)
        except errors.NotFound:
            return None

    return lookup


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
