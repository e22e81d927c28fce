"""The bucket RPCs of the metadata service: check the request, act on the etcd records.

Buckets live in etcd only (`kvtier.buckets.BucketStore`), so any number of metadata replicas
serve them and a restarted one has them all. Deleting does not look for objects, and need not:
each incarnation of a bucket has its own storage id, its objects are stored under
`<name>@<storage_id>`, so a bucket deleted with objects in it leaves them unreachable (garbage on
the datanodes), never visible to the next bucket of that name. The gateway still deletes only an
empty bucket (S3's BucketNotEmpty), passing the generation it listed, so that a bucket deleted
and created again in between is not removed by mistake.

A bucket is created for the caller's tenant (`kvtier.principal.current().acting_tenant`): a
gateway or an admin names the tenant it acts for.

Never imports grpc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvtier import buckets as bucket_store
from kvtier import errors, principal
from kvtier.proto.metadata.v1 import metadata_pb2 as pb
from kvtier.transport import dataplane as transport_dataplane

log = logging.getLogger(__name__)


class BucketService:
    """CreateBucket, DeleteBucket, GetBucket and ListBuckets over a BucketStore.

    Raises errors.InvalidArgument (bad name or tenant), errors.AlreadyExists, errors.NotFound,
    errors.PreconditionFailed (a generation that is not the bucket's) and errors.Unavailable
    (etcd).
    """

    def __init__(
        self, store: bucket_store.BucketStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock

    async def create_bucket(self, request: pb.CreateBucketRequest) -> pb.CreateBucketResponse:
        """A new bucket for the tenant the caller acts for (the request's for services and
        admins, "default" when empty; a user's own)."""
        tenant = principal.current().acting_tenant(request.tenant)
        created_ms = int(self._clock() * 1000)
        bucket = await self._store.create(request.name, tenant, created_ms, request.kind)
        log.info("bucket %s created for tenant %s", bucket.name, bucket.tenant)
        return pb.CreateBucketResponse(bucket=bucket)

    async def delete_bucket(self, request: pb.DeleteBucketRequest) -> pb.DeleteBucketResponse:
        """Delete the bucket (only the expected generation, when one is given)."""
        await self._store.delete(request.name, request.expected_generation)
        log.info("bucket %s deleted", request.name)
        return pb.DeleteBucketResponse()

    async def set_bucket_config(
        self, request: pb.SetBucketConfigRequest
    ) -> pb.SetBucketConfigResponse:
        """Replace one part of the bucket's configuration (whoever may is the gateway's to
        check: the owner or an admin)."""
        part = request.WhichOneof("config")
        if part is None:
            raise errors.InvalidArgument("SetBucketConfig names no configuration to set")

        if part == "versioning" and not request.versioning.status:
            raise errors.InvalidArgument("versioning: Enabled or Suspended (never back to unset)")

        def change(record: pb.BucketInfo) -> None:
            if part == "versioning" and record.kind == pb.BUCKET_KIND_KV:
                raise errors.InvalidArgument("KV buckets are not versioned")
            getattr(record, part).CopyFrom(getattr(request, part))

        bucket = await self._store.update(request.name, change, request.expected_generation)
        log.info("bucket %s: %s configuration set", request.name, part)
        return pb.SetBucketConfigResponse(bucket=bucket)

    async def get_bucket(self, request: pb.GetBucketRequest) -> pb.GetBucketResponse:
        """One bucket, with its generation."""
        return pb.GetBucketResponse(bucket=await self._store.get(request.name))

    async def list_buckets(self, request: pb.ListBucketsRequest) -> pb.ListBucketsResponse:
        """Every bucket (of the request's tenant, when it names one), sorted by name."""
        tenant = transport_dataplane.check_tenant(request.tenant) if request.tenant else None
        return pb.ListBucketsResponse(buckets=await self._store.list_all(tenant))
