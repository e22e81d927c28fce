"""The gateway's object front: buckets through the metadata service, calls to the engine.

Buckets live in etcd, kept by the metadata service; the gateway asks a metadata node of the
map and caches a bucket's existence for a moment (`bucket_cache_s`) so that each object request
does not cost a metadata round trip. Deleting a bucket first lists it: only an empty bucket is
deleted, and only the incarnation that was listed (its generation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Sequence

from kvtier import clustermap, errors, names
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from kvtier.transport import base, calls
from services.gateway import listing, multipart, objects, versions

log = logging.getLogger(__name__)


def _bucket(info: metadata_pb2.BucketInfo) -> pb.BucketInfo:
    return pb.BucketInfo(name=info.name, created_at_unix_ms=info.created_at_unix_ms)


class ObjectFront:
    """What the object servicer and the gateway's data-plane calls use."""

    def __init__(
        self,
        view: clustermap.MapView,
        engine: objects.ObjectEngine,
        lister: listing.Lister,
        *,
        bucket_cache_s: float = 2.0,
    ) -> None:
        self._view = view
        self.engine = engine
        self.lister = lister
        self._bucket_cache_s = bucket_cache_s
        self._known: dict[str, float] = {}
        self._infos: dict[str, tuple[float, metadata_pb2.BucketInfo]] = {}
        self._metadata: metadata_client.MetadataClient | None = None
        self.multipart = multipart.Multipart(engine, lister)

    def _meta(self) -> metadata_client.MetadataClient:
        nodes = [n for n in self._view.current.nodes if n.role == common_pb2.NODE_ROLE_METADATA]
        if not nodes:
            raise errors.Unavailable("no metadata service in the cluster map")
        if self._metadata is not None and self._metadata.address in {n.grpc_address for n in nodes}:
            return self._metadata
        self._metadata = metadata_client.MetadataClient(nodes[0].grpc_address)
        return self._metadata

    def metadata_address(self) -> str:
        """The gRPC address of a metadata node of the map."""
        return self._meta().address

    async def close(self) -> None:
        """Close the metadata channel."""
        if self._metadata is not None:
            await self._metadata.close()

    # Buckets.

    async def check_bucket(self, name: str) -> None:
        """NotFound (NoSuchBucket) unless the bucket exists."""
        names.check_bucket(name)
        if time.monotonic() - self._known.get(name, -1e9) < self._bucket_cache_s:
            return
        try:
            await self._meta().get_bucket(name)
        except errors.NotFound:
            self._known.pop(name, None)
            raise errors.NotFound(f"NoSuchBucket: {name}") from None
        self._known[name] = time.monotonic()

    async def create_bucket(
        self,
        name: str,
        tenant: str = "",
        kind: metadata_pb2.BucketKind.ValueType = metadata_pb2.BUCKET_KIND_OBJECTS,
    ) -> pb.BucketInfo:
        """Create a bucket for tenant ("default" when empty; AlreadyExists when taken)."""
        info = await self._meta().create_bucket(name, tenant, kind)
        self._known[name] = time.monotonic()
        self._infos[name] = (time.monotonic(), info)
        return _bucket(info)

    async def bucket_info(self, name: str) -> metadata_pb2.BucketInfo:
        """The bucket's record (tenant, generation...), cached for bucket_cache_s;
        NotFound (NoSuchBucket)."""
        names.check_bucket(name)
        cached = self._infos.get(name)
        if cached is not None and time.monotonic() - cached[0] < self._bucket_cache_s:
            return cached[1]
        try:
            info = await self._meta().get_bucket(name)
        except errors.NotFound:
            self._infos.pop(name, None)
            raise errors.NotFound(f"NoSuchBucket: {name}") from None
        self._infos[name] = (time.monotonic(), info)
        return info

    async def tenant_buckets(self, tenant: str) -> list[metadata_pb2.BucketInfo]:
        """The buckets of a tenant (every bucket when tenant is empty), sorted by name."""
        return await self._meta().list_buckets(tenant)

    async def head_bucket(self, name: str) -> pb.BucketInfo:
        """The bucket (NotFound)."""
        names.check_bucket(name)
        return _bucket(await self._meta().get_bucket(name))

    async def list_buckets(self) -> list[pb.BucketInfo]:
        """Every bucket, sorted by name."""
        return [_bucket(b) for b in await self._meta().list_buckets()]

    async def delete_bucket(self, name: str) -> None:
        """Delete an empty bucket (PreconditionFailed: BucketNotEmpty)."""
        names.check_bucket(name)
        info = await self._meta().get_bucket(name)
        page = await self.lister.list_objects(pb.ListObjectsRequest(bucket=name, max_keys=1))
        if page.objects or page.common_prefixes:
            raise errors.PreconditionFailed(f"BucketNotEmpty: {name}")
        await self._meta().delete_bucket(name, expected_generation=info.generation)
        self._known.pop(name, None)
        self._infos.pop(name, None)

    # Objects.

    async def begin_put(self, req: pb.BeginPutRequest) -> pb.BeginPutResponse:
        """Plan a PUT into an existing bucket."""
        await self.check_bucket(req.bucket)
        return self.engine.begin_put(req)

    async def commit_put(self, req: pb.CommitPutRequest) -> pb.CommitPutResponse:
        """Finish a PUT or a part's upload."""
        meta = await self.engine.commit_meta(req.upload_id)
        if meta.bucket == names.MULTIPART_BUCKET:
            return pb.CommitPutResponse(part=multipart.part_info(meta))
        return pb.CommitPutResponse(object=versions.info(meta))

    # Multipart uploads.

    async def create_multipart(
        self, req: pb.CreateMultipartUploadRequest
    ) -> pb.CreateMultipartUploadResponse:
        """Start a multipart upload into an existing bucket."""
        await self.check_bucket(req.bucket)
        return pb.CreateMultipartUploadResponse(upload_id=await self.multipart.create(req))

    async def begin_part(self, req: pb.BeginUploadPartRequest) -> pb.BeginUploadPartResponse:
        """Plan one part's upload."""
        await self.check_bucket(req.bucket)
        return await self.multipart.begin_part(req)

    async def copy_part(self, req: pb.UploadPartCopyRequest) -> pb.UploadPartCopyResponse:
        """A part copied from another object."""
        await self.check_bucket(req.bucket)
        await self.check_bucket(req.src_bucket)
        return await self.multipart.copy_part(req)

    async def complete_multipart(
        self, req: pb.CompleteMultipartUploadRequest
    ) -> pb.CompleteMultipartUploadResponse:
        """Make the listed parts the object."""
        await self.check_bucket(req.bucket)
        return pb.CompleteMultipartUploadResponse(object=await self.multipart.complete(req))

    async def abort_multipart(self, req: pb.AbortMultipartUploadRequest) -> None:
        """Drop an upload and its parts."""
        await self.check_bucket(req.bucket)
        await self.multipart.abort(req)

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """A page of an upload's parts."""
        await self.check_bucket(req.bucket)
        return await self.multipart.list_parts(req)

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """A page of a bucket's uploads in progress."""
        await self.check_bucket(req.bucket)
        return await self.multipart.list_uploads(req)

    def handle_call(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> Awaitable[base.CallPlan]:
        """The gateway's `kvtier.transport.base.CallHandler`."""
        if method == pb.OBJECT_CALL_METHOD_WRITE_STRIPES:
            write = calls.parse_request(pb.WriteStripesRequest, request)
            return self.engine.write_plan(write, segments)
        if method == pb.OBJECT_CALL_METHOD_READ_RANGE:
            read = calls.parse_request(pb.ReadRangeRequest, request)
            if segments:
                raise errors.InvalidArgument("READ_RANGE carries no segments")
            return self._read(read, capacities)
        raise errors.InvalidArgument(f"unknown gateway call method {method}")

    async def _read(self, req: pb.ReadRangeRequest, capacities: Sequence[int]) -> base.CallPlan:
        await self.check_bucket(req.bucket)
        return await self.engine.read_plan(req, capacities)
