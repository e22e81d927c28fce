"""Client of kvtier.metadata.v1.MetadataService."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from kvtier import errors, users
from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc


class MetadataClient(base.BaseClient):
    """The control plane: the cluster map, buckets and S3 users."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = metadata_pb2_grpc.MetadataServiceStub(self.channel)

    async def get_cluster_map(self, known_epoch: int = 0) -> common_pb2.ClusterMap | None:
        """The current map, or None when its epoch equals known_epoch."""
        reply = await self._unary(
            self._stub.GetClusterMap, metadata_pb2.GetClusterMapRequest(known_epoch=known_epoch)
        )
        return None if reply.unchanged else reply.map

    async def watch_cluster_map(
        self, after_epoch: int = 0
    ) -> AsyncGenerator[common_pb2.ClusterMap, None]:
        """Every map newer than after_epoch, as it is committed (runs until cancelled)."""
        call = self._stub.WatchClusterMap(
            metadata_pb2.WatchClusterMapRequest(after_epoch=after_epoch),
            metadata=await self.call_metadata(),
        )
        try:
            async for reply in call:
                yield reply.map
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def create_bucket(
        self,
        name: str,
        tenant: str = "",
        kind: metadata_pb2.BucketKind.ValueType = metadata_pb2.BUCKET_KIND_OBJECTS,
    ) -> metadata_pb2.BucketInfo:
        """Create a bucket for tenant ("default" when empty); returns it with its generation.

        Raises errors.AlreadyExists when the name is taken and errors.InvalidArgument for a bad
        name or tenant.
        """
        reply: metadata_pb2.CreateBucketResponse = await self._unary(
            self._stub.CreateBucket,
            metadata_pb2.CreateBucketRequest(name=name, tenant=tenant, kind=kind),
        )
        return reply.bucket

    async def delete_bucket(self, name: str, expected_generation: int = 0) -> None:
        """Delete a bucket, without looking for objects in it (the caller checks emptiness).

        With expected_generation only that incarnation is deleted (errors.PreconditionFailed
        otherwise). Raises errors.NotFound when there is no such bucket.
        """
        await self._unary(
            self._stub.DeleteBucket,
            metadata_pb2.DeleteBucketRequest(name=name, expected_generation=expected_generation),
        )

    async def get_bucket(self, name: str) -> metadata_pb2.BucketInfo:
        """One bucket; raises errors.NotFound when there is none."""
        reply: metadata_pb2.GetBucketResponse = await self._unary(
            self._stub.GetBucket, metadata_pb2.GetBucketRequest(name=name)
        )
        return reply.bucket

    async def set_bucket_config(
        self, request: metadata_pb2.SetBucketConfigRequest
    ) -> metadata_pb2.BucketInfo:
        """Replace one part of a bucket's configuration (request.acl, .cors or .lifecycle); returns
        the bucket as stored. Raises errors.NotFound, errors.PreconditionFailed (another
        incarnation than request.expected_generation) and errors.InvalidArgument."""
        reply: metadata_pb2.SetBucketConfigResponse = await self._unary(
            self._stub.SetBucketConfig, request
        )
        return reply.bucket

    async def list_buckets(self, tenant: str = "") -> list[metadata_pb2.BucketInfo]:
        """Every bucket (of tenant, when given), sorted by name."""
        reply = await self._unary(
            self._stub.ListBuckets, metadata_pb2.ListBucketsRequest(tenant=tenant)
        )
        return list(reply.buckets)

    async def set_pool_state(
        self, index: int, state: common_pb2.PoolState.ValueType
    ) -> common_pb2.ClusterMap:
        """Move pool index to state (gateways only: AdminService drains and removes pools);
        the map with the pool in that state. Raises errors.NotFound for no such pool and
        errors.PreconditionFailed for a move the pool's state does not allow."""
        reply: metadata_pb2.SetPoolStateResponse = await self._unary(
            self._stub.SetPoolState, metadata_pb2.SetPoolStateRequest(index=index, state=state)
        )
        return reply.map

    async def create_user(
        self,
        *,
        tenant: str = "",
        display_name: str = "",
        is_admin: bool = False,
        access_key: str = "",
        secret: users.Secret | None = None,
        shm_trusted: bool = False,
    ) -> users.User:
        """Create an S3 user of tenant ("default" when empty); returns it with its secret, which
        no later call returns again. shm_trusted: its credential may map a node's whole arena
        over same-host shared memory.

        Without access_key and secret both are generated. Raises errors.AlreadyExists when the
        access key is taken, errors.InvalidArgument for a bad tenant, access key or secret (or
        only one of the two), and errors.PreconditionFailed when the metadata service has no
        master key (S3 users disabled).
        """
        reply: metadata_pb2.CreateUserResponse = await self._unary(
            self._stub.CreateUser,
            metadata_pb2.CreateUserRequest(
                tenant=tenant,
                display_name=display_name,
                is_admin=is_admin,
                access_key=access_key,
                secret_key=secret.reveal() if secret is not None else "",
                shm_trusted=shm_trusted,
            ),
        )
        info = reply.user
        return users.User(
            access_key=info.access_key,
            tenant=info.tenant,
            display_name=info.display_name,
            is_admin=info.is_admin,
            created_at_unix_ms=info.created_at_unix_ms,
            secret=users.Secret(reply.secret_key),
            shm_trusted=info.shm_trusted,
        )

    async def list_users(self, tenant: str = "") -> list[metadata_pb2.UserInfo]:
        """Every S3 user (of tenant, when given), sorted by access key, without secrets."""
        reply: metadata_pb2.ListUsersResponse = await self._unary(
            self._stub.ListUsers, metadata_pb2.ListUsersRequest(tenant=tenant)
        )
        return list(reply.users)

    async def delete_user(self, access_key: str) -> None:
        """Remove an S3 user; errors.NotFound when there is none. Gateways running a watch
        refuse it within moments, others within their cache's ttl_s."""
        await self._unary(
            self._stub.DeleteUser, metadata_pb2.DeleteUserRequest(access_key=access_key)
        )
