"""The S3 user RPCs of the metadata service: check the request, act on the etcd records.

Users live in etcd only (`kvtier.users.UserStore`), their secrets sealed under the master key,
so any number of metadata replicas serve them (all holding the same key). A secret leaves this
service once, in the CreateUser reply; it is never logged.

Never imports grpc.
"""

from __future__ import annotations

import logging

from kvtier import users
from kvtier.proto.metadata.v1 import metadata_pb2 as pb

log = logging.getLogger(__name__)


class UserService:
    """CreateUser, ListUsers and DeleteUser over a UserStore.

    Raises errors.PreconditionFailed for CreateUser when this node has no master key,
    errors.InvalidArgument (bad tenant, access key or secret), errors.AlreadyExists,
    errors.NotFound and errors.Unavailable (etcd).
    """

    def __init__(self, store: users.UserStore) -> None:
        self._store = store

    async def create_user(self, request: pb.CreateUserRequest) -> pb.CreateUserResponse:
        """A new user; its secret is in this reply only."""
        user = await self._store.create(
            tenant=request.tenant,
            display_name=request.display_name,
            is_admin=request.is_admin,
            access_key=request.access_key,
            secret=users.Secret(request.secret_key) if request.secret_key else None,
            shm_trusted=request.shm_trusted,
        )
        log.info(
            "user %s created for tenant %s%s%s",
            user.access_key,
            user.tenant,
            " (admin)" if user.is_admin else "",
            " (trusted for shared memory)" if user.shm_trusted else "",
        )
        return pb.CreateUserResponse(user=user.info, secret_key=user.secret.reveal())

    async def list_users(self, request: pb.ListUsersRequest) -> pb.ListUsersResponse:
        """Every user (of the request's tenant, when it names one), by access key; no secrets."""
        return pb.ListUsersResponse(users=await self._store.list_all(request.tenant))

    async def delete_user(self, request: pb.DeleteUserRequest) -> pb.DeleteUserResponse:
        """Remove a user; NotFound when there is none."""
        await self._store.delete(request.access_key)
        log.info("user %s deleted", request.access_key)
        return pb.DeleteUserResponse()
