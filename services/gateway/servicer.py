"""gRPC surface of the gateway (thin)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvtier import clustermap, rpc
from kvtier.proto.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    objects_pb2,
    objects_pb2_grpc,
)
from services.gateway import front as front_mod
from services.gateway import healing, objectlayer, pooldrain


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves the gateway's watched copy of the cluster map."""

    def __init__(self, view: clustermap.MapView) -> None:
        self._view = view

    async def GetClusterMap(
        self, request: gateway_pb2.GetClusterMapRequest, context: rpc.ServicerContext
    ) -> gateway_pb2.GetClusterMapResponse:
        current = self._view.newer_than(request.known_epoch)
        if current is None:
            return gateway_pb2.GetClusterMapResponse(unchanged=True)
        return gateway_pb2.GetClusterMapResponse(map=current)


class ObjectServicer(objects_pb2_grpc.ObjectServiceServicer):
    """kvtier.gateway.v1.ObjectService: buckets (kept by the metadata service), objects; every
    call acts for the caller (`front.ObjectFront` checks who may use what). Objects go through
    the object layer of erasure-coded buckets (`objectlayer.ErasureLayer`, the S3 handlers'
    seam too); bucket records and the data-plane writes (BeginPut, BeginUploadPart) through the
    front."""

    def __init__(self, front: front_mod.ObjectFront) -> None:
        self._front = front
        self._objects: objectlayer.ObjectLayer = objectlayer.ErasureLayer(front)

    async def CreateBucket(
        self, request: objects_pb2.CreateBucketRequest, context: rpc.ServicerContext
    ) -> objects_pb2.CreateBucketResponse:
        return objects_pb2.CreateBucketResponse(
            bucket=await self._front.create_bucket(request.bucket)
        )

    async def DeleteBucket(
        self, request: objects_pb2.DeleteBucketRequest, context: rpc.ServicerContext
    ) -> objects_pb2.DeleteBucketResponse:
        await self._front.delete_bucket(request.bucket)
        return objects_pb2.DeleteBucketResponse()

    async def HeadBucket(
        self, request: objects_pb2.HeadBucketRequest, context: rpc.ServicerContext
    ) -> objects_pb2.HeadBucketResponse:
        return objects_pb2.HeadBucketResponse(bucket=await self._front.head_bucket(request.bucket))

    async def ListBuckets(
        self, request: objects_pb2.ListBucketsRequest, context: rpc.ServicerContext
    ) -> objects_pb2.ListBucketsResponse:
        return objects_pb2.ListBucketsResponse(buckets=await self._front.list_buckets())

    async def BeginPut(
        self, request: objects_pb2.BeginPutRequest, context: rpc.ServicerContext
    ) -> objects_pb2.BeginPutResponse:
        return await self._front.begin_put(request)

    async def CommitPut(
        self, request: objects_pb2.CommitPutRequest, context: rpc.ServicerContext
    ) -> objects_pb2.CommitPutResponse:
        return await self._front.commit_put(request)

    async def AbortPut(
        self, request: objects_pb2.AbortPutRequest, context: rpc.ServicerContext
    ) -> objects_pb2.AbortPutResponse:
        await self._front.abort_put(request)
        return objects_pb2.AbortPutResponse()

    async def HeadObject(
        self, request: objects_pb2.HeadObjectRequest, context: rpc.ServicerContext
    ) -> objects_pb2.HeadObjectResponse:
        info = await self._objects.head(request.bucket, request.key)
        return objects_pb2.HeadObjectResponse(object=info)

    async def DeleteObject(
        self, request: objects_pb2.DeleteObjectRequest, context: rpc.ServicerContext
    ) -> objects_pb2.DeleteObjectResponse:
        await self._objects.delete(request.bucket, request.key)
        return objects_pb2.DeleteObjectResponse()

    async def CopyObject(
        self, request: objects_pb2.CopyObjectRequest, context: rpc.ServicerContext
    ) -> objects_pb2.CopyObjectResponse:
        return objects_pb2.CopyObjectResponse(object=await self._objects.copy(request))

    async def ListObjects(
        self, request: objects_pb2.ListObjectsRequest, context: rpc.ServicerContext
    ) -> objects_pb2.ListObjectsResponse:
        return await self._objects.list(request)

    async def CreateMultipartUpload(
        self, request: objects_pb2.CreateMultipartUploadRequest, context: rpc.ServicerContext
    ) -> objects_pb2.CreateMultipartUploadResponse:
        return await self._objects.create_multipart(request)

    async def BeginUploadPart(
        self, request: objects_pb2.BeginUploadPartRequest, context: rpc.ServicerContext
    ) -> objects_pb2.BeginUploadPartResponse:
        return await self._front.begin_part(request)

    async def UploadPartCopy(
        self, request: objects_pb2.UploadPartCopyRequest, context: rpc.ServicerContext
    ) -> objects_pb2.UploadPartCopyResponse:
        return await self._objects.copy_part(request)

    async def CompleteMultipartUpload(
        self, request: objects_pb2.CompleteMultipartUploadRequest, context: rpc.ServicerContext
    ) -> objects_pb2.CompleteMultipartUploadResponse:
        return await self._objects.complete_multipart(request)

    async def AbortMultipartUpload(
        self, request: objects_pb2.AbortMultipartUploadRequest, context: rpc.ServicerContext
    ) -> objects_pb2.AbortMultipartUploadResponse:
        await self._objects.abort_multipart(request)
        return objects_pb2.AbortMultipartUploadResponse()

    async def ListParts(
        self, request: objects_pb2.ListPartsRequest, context: rpc.ServicerContext
    ) -> objects_pb2.ListPartsResponse:
        return await self._objects.list_parts(request)

    async def ListMultipartUploads(
        self, request: objects_pb2.ListMultipartUploadsRequest, context: rpc.ServicerContext
    ) -> objects_pb2.ListMultipartUploadsResponse:
        return await self._objects.list_uploads(request)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """kvtier.gateway.v1.AdminService: healing on demand, draining and removing pools."""

    def __init__(self, healer: healing.Healer, drainer: pooldrain.Drainer) -> None:
        self._healer = healer
        self._drainer = drainer

    async def DrainPool(
        self, request: admin_pb2.DrainPoolRequest, context: rpc.ServicerContext
    ) -> AsyncIterator[admin_pb2.DrainProgress]:
        async for message in self._drainer.drain(request.index):
            yield message

    async def RemovePool(
        self, request: admin_pb2.RemovePoolRequest, context: rpc.ServicerContext
    ) -> admin_pb2.RemovePoolResponse:
        return admin_pb2.RemovePoolResponse(epoch=await self._drainer.remove(request.index))

    async def Heal(
        self, request: admin_pb2.HealRequest, context: rpc.ServicerContext
    ) -> AsyncIterator[admin_pb2.HealProgress]:
        # Admins only (the authorization table): every bucket, by its storage name.
        progress = self._healer.heal_tree(request.bucket, request.prefix, dry_run=request.dry_run)
        async for message in progress:
            yield message

    async def ListHealQueue(
        self, request: admin_pb2.ListHealQueueRequest, context: rpc.ServicerContext
    ) -> admin_pb2.ListHealQueueResponse:
        # Admins only (the authorization table): every tenant's objects.
        return self._healer.list_queue(request.limit)
