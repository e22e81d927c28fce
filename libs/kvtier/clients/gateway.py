"""Client of kvtier.gateway.v1.GatewayService."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from kvtier import errors
from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    objects_pb2,
    objects_pb2_grpc,
)


class GatewayClient(base.BaseClient):
    """The front door."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def get_cluster_map(self, known_epoch: int = 0) -> common_pb2.ClusterMap | None:
        """The gateway's copy of the map, or None when its epoch equals known_epoch."""
        reply = await self._unary(
            self._stub.GetClusterMap, gateway_pb2.GetClusterMapRequest(known_epoch=known_epoch)
        )
        return None if reply.unchanged else reply.map


class ObjectServiceClient(base.BaseClient):
    """kvtier.gateway.v1.ObjectService of one gateway (the control side of object I/O)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = objects_pb2_grpc.ObjectServiceStub(self.channel)

    async def create_bucket(self, bucket: str) -> objects_pb2.BucketInfo:
        """Create a bucket (AlreadyExists)."""
        request = objects_pb2.CreateBucketRequest(bucket=bucket)
        reply: objects_pb2.CreateBucketResponse = await self._unary(
            self._stub.CreateBucket, request
        )
        return reply.bucket

    async def delete_bucket(self, bucket: str) -> None:
        """Delete an empty bucket (PreconditionFailed when not empty)."""
        await self._unary(self._stub.DeleteBucket, objects_pb2.DeleteBucketRequest(bucket=bucket))

    async def head_bucket(self, bucket: str) -> objects_pb2.BucketInfo:
        """The bucket (NotFound)."""
        request = objects_pb2.HeadBucketRequest(bucket=bucket)
        reply: objects_pb2.HeadBucketResponse = await self._unary(self._stub.HeadBucket, request)
        return reply.bucket

    async def list_buckets(self) -> list[objects_pb2.BucketInfo]:
        """Every bucket."""
        request = objects_pb2.ListBucketsRequest()
        reply: objects_pb2.ListBucketsResponse = await self._unary(self._stub.ListBuckets, request)
        return list(reply.buckets)

    async def begin_put(self, request: objects_pb2.BeginPutRequest) -> objects_pb2.BeginPutResponse:
        """Start a PUT."""
        return await self._unary(self._stub.BeginPut, request)

    async def commit_put(self, upload_id: str) -> objects_pb2.ObjectInfo:
        """Finish a PUT."""
        return (await self.commit_write(upload_id)).object

    async def commit_write(self, upload_id: str) -> objects_pb2.CommitPutResponse:
        """Finish a PUT or a part's upload (the reply has the object or the part)."""
        request = objects_pb2.CommitPutRequest(upload_id=upload_id)
        return await self._unary(
            self._stub.CommitPut, request, timeout_s=max(self._timeout_s, 60.0)
        )

    async def abort_put(self, upload_id: str) -> None:
        """Drop a PUT."""
        await self._unary(self._stub.AbortPut, objects_pb2.AbortPutRequest(upload_id=upload_id))

    async def head_object(self, bucket: str, key: str) -> objects_pb2.ObjectInfo:
        """The object's info (NotFound)."""
        request = objects_pb2.HeadObjectRequest(bucket=bucket, key=key)
        reply: objects_pb2.HeadObjectResponse = await self._unary(self._stub.HeadObject, request)
        return reply.object

    async def delete_object(self, bucket: str, key: str) -> None:
        """Delete an object (absent: no error)."""
        request = objects_pb2.DeleteObjectRequest(bucket=bucket, key=key)
        await self._unary(self._stub.DeleteObject, request)

    async def copy_object(self, request: objects_pb2.CopyObjectRequest) -> objects_pb2.ObjectInfo:
        """Server-side copy."""
        reply: objects_pb2.CopyObjectResponse = await self._unary(
            self._stub.CopyObject, request, timeout_s=max(self._timeout_s, 600.0)
        )
        return reply.object

    async def list_objects(
        self, request: objects_pb2.ListObjectsRequest
    ) -> objects_pb2.ListObjectsResponse:
        """A page of a bucket's objects."""
        return await self._unary(self._stub.ListObjects, request)

    async def create_multipart_upload(
        self, request: objects_pb2.CreateMultipartUploadRequest
    ) -> str:
        """Start a multipart upload; its id."""
        reply: objects_pb2.CreateMultipartUploadResponse = await self._unary(
            self._stub.CreateMultipartUpload, request
        )
        return reply.upload_id

    async def begin_upload_part(
        self, request: objects_pb2.BeginUploadPartRequest
    ) -> objects_pb2.BeginUploadPartResponse:
        """Plan a part's upload (then WRITE_STRIPES calls and commit_write)."""
        return await self._unary(self._stub.BeginUploadPart, request)

    async def upload_part_copy(
        self, request: objects_pb2.UploadPartCopyRequest
    ) -> objects_pb2.UploadPartCopyResponse:
        """A part copied server-side from another object."""
        return await self._unary(
            self._stub.UploadPartCopy, request, timeout_s=max(self._timeout_s, 600.0)
        )

    async def complete_multipart_upload(
        self, request: objects_pb2.CompleteMultipartUploadRequest
    ) -> objects_pb2.ObjectInfo:
        """Make the listed parts the object."""
        reply: objects_pb2.CompleteMultipartUploadResponse = await self._unary(
            self._stub.CompleteMultipartUpload, request, timeout_s=max(self._timeout_s, 120.0)
        )
        return reply.object

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Drop an upload and its parts (NotFound: no such upload)."""
        request = objects_pb2.AbortMultipartUploadRequest(
            bucket=bucket, key=key, upload_id=upload_id
        )
        await self._unary(self._stub.AbortMultipartUpload, request)

    async def list_parts(
        self, request: objects_pb2.ListPartsRequest
    ) -> objects_pb2.ListPartsResponse:
        """A page of an upload's parts."""
        return await self._unary(self._stub.ListParts, request)

    async def list_multipart_uploads(
        self, request: objects_pb2.ListMultipartUploadsRequest
    ) -> objects_pb2.ListMultipartUploadsResponse:
        """A page of a bucket's uploads in progress."""
        return await self._unary(self._stub.ListMultipartUploads, request)


class AdminServiceClient(base.BaseClient):
    """kvtier.gateway.v1.AdminService of one gateway."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def heal(
        self, bucket: str = "", prefix: str = "", *, dry_run: bool = False
    ) -> AsyncGenerator[admin_pb2.HealProgress, None]:
        """Heal every object of bucket (every bucket when empty) under prefix: progress as it
        goes, the last message with done set. Raises NotFound for a missing bucket; no deadline
        (a heal takes as long as the data it reads)."""
        call = self._stub.Heal(
            admin_pb2.HealRequest(bucket=bucket, prefix=prefix, dry_run=dry_run),
            metadata=await self.call_metadata(),
        )
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def drain_pool(self, index: int) -> AsyncGenerator[admin_pb2.DrainProgress, None]:
        """Move every object of pool index to the other active pools: progress as it goes,
        the last message with done set (drained: the pool is now DRAINED). Raises NotFound
        for no such pool, PreconditionFailed for pool 0, the last active pool or a retired
        one; no deadline (a drain takes as long as the data it moves)."""
        call = self._stub.DrainPool(
            admin_pb2.DrainPoolRequest(index=index), metadata=await self.call_metadata()
        )
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def remove_pool(self, index: int) -> int:
        """Retire a drained pool that holds nothing; the epoch of the map saying so. Raises
        NotFound for no such pool, PreconditionFailed when it is not drained or not empty."""
        reply: admin_pb2.RemovePoolResponse = await self._unary(
            self._stub.RemovePool, admin_pb2.RemovePoolRequest(index=index)
        )
        return reply.epoch

    async def list_heal_queue(self, limit: int = 0) -> admin_pb2.ListHealQueueResponse:
        """What this gateway's heal queue holds, oldest first (at most limit; 0: the
        gateway's default, 1000) and its totals. Raises PermissionDenied for a non-admin."""
        reply: admin_pb2.ListHealQueueResponse = await self._unary(
            self._stub.ListHealQueue, admin_pb2.ListHealQueueRequest(limit=limit)
        )
        return reply
