"""Who an S3 request acts for: AWS Signature V4 checked against the users in etcd.

`Authenticator.authenticate` parses the request's signature (header or presigned query,
`services.gateway.s3.sigv4`), looks the access key up (`kvtier.users.UserCache`, kept current by
an etcd watch), verifies the signature with the user's secret and builds the request's
`body.Payload`: the signed SHA-256 of the body, or an aws-chunked decoder that checks every
chunk's signature and the trailer (`services.gateway.s3.chunked`). Anonymous requests are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvtier import masterkey, membership, users
from services.gateway.s3 import awschunked, body, s3errors, signing


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """The user a request acts for."""

    access_key: str
    tenant: str
    display_name: str
    is_admin: bool = False

    def may_use(self, tenant: str) -> bool:
        """Whether this user may use a bucket of tenant (its own tenant's; admins: any)."""
        return self.is_admin or tenant == self.tenant

    @property
    def owner(self) -> tuple[str, str]:
        """(canonical id, display name) as S3 lists owners: the id names the tenant."""
        return hashlib.sha256(self.tenant.encode()).hexdigest(), self.display_name or self.tenant


SecretLookup = Callable[[str], Awaitable[tuple[Principal, str] | None]]


def _content_length(http: web.Request) -> int:
    return http.content_length if http.content_length is not None else -1


class Authenticator:
    """SigV4 over the users of the cluster (see the module docstring)."""

    def __init__(
        self,
        lookup: SecretLookup,
        *,
        region: str = "us-east-1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self._region = region
        self._clock = clock

    async def authenticate(self, http: web.Request) -> tuple[Principal, body.Payload]:
        """The principal and the body of a request; S3Error (AccessDenied,
        InvalidAccessKeyId, SignatureDoesNotMatch, RequestTimeTooSkewed...) when it fails."""
        headers = http.headers
        raw_path, _, raw_query = http.raw_path.partition("?")
        signed = signing.parse(http.query, headers)
        if signed is None:
            return await self._presigned_v2(http, raw_path)
        found = await self._lookup(signed.access_key)
        if found is None:
            raise s3errors.S3Error(
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            )
        principal, secret = found
        signing.check_time(signed, self._clock(), self._region)
        key = signing.verify(
            signed, secret, method=http.method, raw_path=raw_path, raw_query=raw_query,
            headers=headers, getall=headers.getall,
        )  # fmt: skip
        return principal, self._payload(http, signed, key)

    async def _presigned_v2(
        self, http: web.Request, raw_path: str
    ) -> tuple[Principal, body.Payload]:
        signed = signing.parse_v2(http.query)
        if signed is None:
            raise s3errors.S3Error("AccessDenied", "Anonymous access is not allowed")
        found = await self._lookup(signed.access_key)
        if found is None:
            raise s3errors.S3Error(
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            )
        principal, secret = found
        signing.verify_v2(
            signed, secret, method=http.method, raw_path=raw_path, query=http.query,
            headers=http.headers, now=self._clock(),
        )  # fmt: skip
        return principal, body.Payload(http.content, size=_content_length(http))

    @staticmethod
    def _payload(http: web.Request, signed: signing.SignedRequest, key: bytes) -> body.Payload:
        mode = signed.payload_hash
        length = _content_length(http)
        if mode in (
            signing.STREAMING_SIGNED,
            signing.STREAMING_SIGNED_TRAILER,
            signing.STREAMING_UNSIGNED_TRAILER,
        ):
            decoded = http.headers.get("x-amz-decoded-content-length", "")
            if not decoded.isdigit():
                raise s3errors.S3Error(
                    "MissingContentLength", "aws-chunked bodies need x-amz-decoded-content-length"
                )
            decoder = awschunked.ChunkDecoder(
                signed=mode != signing.STREAMING_UNSIGNED_TRAILER,
                trailer=mode != signing.STREAMING_SIGNED,
                key=key, seed=signed.signature, amz_date=signed.amz_date, scope=signed.scope,
            )  # fmt: skip
            return body.Payload(http.content, size=int(decoded), decoder=decoder)
        if mode == signing.UNSIGNED:
            return body.Payload(http.content, size=length)
        if not signing.is_hex_sha256(mode):
            raise s3errors.S3Error("InvalidArgument", f"x-amz-content-sha256 {mode[:80]!r}")
        if length == 0 and mode.lower() != signing.EMPTY_SHA256:
            raise s3errors.S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        return body.Payload(http.content, size=length, sha256_hex=mode.lower())


def user_lookup(cache: users.UserCache) -> SecretLookup:
    """The secret lookup of a gateway over its user cache (without a master key every signed
    request gets InvalidAccessKeyId)."""

    async def lookup(access_key: str) -> tuple[Principal, str] | None:
        user = await cache.get(access_key)
        if user is None:
            return None
        principal = Principal(user.access_key, user.tenant, user.display_name, user.is_admin)
        return principal, user.secret.reveal()

    return lookup


def user_cache(store: membership.EtcdMembership, master_key_file: str) -> users.UserCache:
    """The cluster's users as a gateway sees them (run its `run()` loop to keep it current)."""
    return users.UserCache(store, masterkey.load(master_key_file))
