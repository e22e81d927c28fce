"""S3 users, for the metadata service's RPCs (records and sealing: `kvtier.credentials`)."""

from __future__ import annotations

import logging

from kvtier import credentials
from kvtier.proto.metadata.v1 import metadata_pb2 as pb

log = logging.getLogger(__name__)


class UserService:
    """CreateUser, ListUsers and DeleteUser over a UserStore."""

    def __init__(self, store: credentials.UserStore) -> None:
        self._store = store

    async def create_user(self, request: pb.CreateUserRequest) -> pb.CreateUserResponse:
        """A new user; the secret is in this reply only."""
        info, secret = await self._store.create(
            tenant=request.tenant, display_name=request.display_name, is_admin=request.is_admin,
            access_key=request.access_key, secret_key=request.secret_key,
        )  # fmt: skip
        log.info("user %s created for tenant %s", info.access_key, info.tenant)
        return pb.CreateUserResponse(user=info, secret_key=secret)

    async def list_users(self, request: pb.ListUsersRequest) -> pb.ListUsersResponse:
        """Users without secrets."""
        return pb.ListUsersResponse(users=await self._store.list(request.tenant))

    async def delete_user(self, request: pb.DeleteUserRequest) -> pb.DeleteUserResponse:
        """Remove a user."""
        await self._store.delete(request.access_key)
        log.info("user %s deleted", request.access_key)
        return pb.DeleteUserResponse()
