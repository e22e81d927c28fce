"""gRPC surface of the metadata service (thin: decode, call core, encode)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvtier import clustermap, membership, rpc
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc
from services.metadata import buckets, reconciler, users

_WATCH_POLL_S = 30.0


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    """Serves the cluster map from this process's watched copy, and the buckets."""

    def __init__(
        self,
        view: clustermap.MapView,
        bucket_service: buckets.BucketService,
        user_service: users.UserService,
        store: membership.Membership,
    ) -> None:
        self._view = view
        self._buckets = bucket_service
        self._users = user_service
        self._store = store

    async def GetClusterMap(
        self, request: metadata_pb2.GetClusterMapRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.GetClusterMapResponse:
        current = self._view.newer_than(request.known_epoch)
        if current is None:
            return metadata_pb2.GetClusterMapResponse(unchanged=True)
        return metadata_pb2.GetClusterMapResponse(map=current)

    async def WatchClusterMap(
        self, request: metadata_pb2.WatchClusterMapRequest, context: rpc.ServicerContext
    ) -> AsyncIterator[metadata_pb2.WatchClusterMapResponse]:
        sent = request.after_epoch

        def newer(cmap: common_pb2.ClusterMap) -> bool:
            return cmap.epoch > sent

        while True:
            try:
                current = await self._view.wait_for(newer, _WATCH_POLL_S)
            except TimeoutError:
                continue
            sent = current.epoch
            yield metadata_pb2.WatchClusterMapResponse(map=current)

    async def SetPoolState(
        self, request: metadata_pb2.SetPoolStateRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.SetPoolStateResponse:
        cmap = await reconciler.set_pool_state(self._store, request.index, request.state)
        return metadata_pb2.SetPoolStateResponse(map=cmap)

    async def CreateBucket(
        self, request: metadata_pb2.CreateBucketRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.CreateBucketResponse:
        return await self._buckets.create_bucket(request)

    async def DeleteBucket(
        self, request: metadata_pb2.DeleteBucketRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.DeleteBucketResponse:
        return await self._buckets.delete_bucket(request)

    async def GetBucket(
        self, request: metadata_pb2.GetBucketRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.GetBucketResponse:
        return await self._buckets.get_bucket(request)

    async def SetBucketConfig(
        self, request: metadata_pb2.SetBucketConfigRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.SetBucketConfigResponse:
        return await self._buckets.set_bucket_config(request)

    async def ListBuckets(
        self, request: metadata_pb2.ListBucketsRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.ListBucketsResponse:
        return await self._buckets.list_buckets(request)

    async def CreateUser(
        self, request: metadata_pb2.CreateUserRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.CreateUserResponse:
        return await self._users.create_user(request)

    async def ListUsers(
        self, request: metadata_pb2.ListUsersRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.ListUsersResponse:
        return await self._users.list_users(request)

    async def DeleteUser(
        self, request: metadata_pb2.DeleteUserRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.DeleteUserResponse:
        return await self._users.delete_user(request)
