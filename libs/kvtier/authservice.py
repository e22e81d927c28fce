"""kvtier.auth.v1.AuthService: session tokens for users, served by metadata nodes and gateways.

Thin: look the user up (the node's own way: the metadata service reads etcd, a gateway its
watched user cache), check the signed request (`tokens.RequestChecker`), mint a token with this
node's certificate key (`tokens.TokenIssuer`, rebuilt when the certificate is rotated).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from kvtier import errors, rpc, security, tokens, users
from kvtier.proto.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger(__name__)

#: access key -> the user with its secret, or None when there is none.
UserLookup = Callable[[str], Awaitable[users.User | None]]


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Exchanges a signed request for a session token."""

    def __init__(self, lookup: UserLookup, tls: security.ServerTLS | None) -> None:
        self._lookup = lookup
        self._tls = tls
        self._checker = tokens.RequestChecker()
        self._issuer: tokens.TokenIssuer | None = None
        self._generation = 0

    def _current_issuer(self) -> tokens.TokenIssuer:
        if self._tls is None:
            raise errors.PreconditionFailed("an insecure cluster issues no session tokens")
        files = self._tls.files
        files.refresh()
        if self._issuer is None or files.generation != self._generation:
            self._issuer = tokens.TokenIssuer(files.material)
            self._generation = files.generation
        return self._issuer

    async def GetSessionToken(
        self, request: auth_pb2.GetSessionTokenRequest, context: rpc.ServicerContext
    ) -> auth_pb2.GetSessionTokenResponse:
        issuer = self._current_issuer()
        try:
            user = await self._lookup(users.check_access_key(request.access_key))
        except (errors.InvalidArgument, errors.NotFound, errors.Corrupt):
            user = None
        if user is None:
            raise errors.Unauthenticated("unknown access key or wrong signature")
        duration = self._checker.check(request, user.secret.reveal())
        token, expires = issuer.mint(
            access_key=user.access_key,
            tenant=user.tenant,
            is_admin=user.is_admin,
            shm_trusted=user.shm_trusted,
            duration_s=duration,
        )
        log.info("session token for %s (tenant %s), %ds", user.access_key, user.tenant, duration)
        return auth_pb2.GetSessionTokenResponse(
            token=token, expires_at_unix_ms=expires, tenant=user.tenant, is_admin=user.is_admin
        )
