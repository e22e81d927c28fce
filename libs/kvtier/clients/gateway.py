"""Client of kvtier.gateway.v1.GatewayService."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from kvtier import errors, rpc
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
        request = objects_pb2.CommitPutRequest(upload_id=upload_id)
        reply: objects_pb2.CommitPutResponse = await self._unary(
            self._stub.CommitPut, request, timeout_s=max(self._timeout_s, 60.0)
        )
        return reply.object

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
            metadata=rpc.call_metadata(),
        )
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            call.cancel()
