"""Who an S3 request acts for: AWS Signature V4 (or V2) checked against the users in etcd.

`Authenticator.authenticate` parses the request's signature (header or presigned query,
`sigv4`; V2 presigned URLs and V2 Authorization headers, `presign_v2`), looks the access
key up (`kvtier.users.UserCache`, kept current by an etcd watch), verifies the signature with
the user's secret and builds the request's `body.Payload`: the signed SHA-256 of the body, or
an aws-chunked decoder that checks every chunk's signature and the trailer (`chunked`). A
request without any credential (no Authorization header, no presigned query) is `ANONYMOUS`:
what it may do, the ACL gate decides (`acl_ops`); it may send a plain body only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvtier import masterkey, membership, users
from services.gateway.s3 import body, chunked, params, presign_v2, s3errors, sigv4


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """The user a request acts for."""

    access_key: str
    tenant: str
    display_name: str
    is_admin: bool = False
    #: An unsigned request: no tenant, no rights but what ACLs grant to everyone.
    anonymous: bool = False

    def may_use(self, tenant: str) -> bool:
        """Whether this user may use a bucket of tenant (its own tenant's; admins: any;
        anonymous: none)."""
        return not self.anonymous and (self.is_admin or tenant == self.tenant)

    @property
    def owner(self) -> tuple[str, str]:
        """(canonical id, display name) as S3 lists owners: the tenant's name both (the id
        ACL grants name: `s3.acl`)."""
        return self.tenant, self.tenant


#: The principal of a request without credentials.
ANONYMOUS = Principal(access_key="", tenant="", display_name="", anonymous=True)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

SecretLookup = Callable[[str], Awaitable[tuple[Principal, str] | None]]


#: Query parameters that carry a signature (V4's and V2's presigned URLs).
_QUERY_AUTH = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "AWSAccessKeyId",
    "Signature",
)


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
        tenants: Callable[[str], Awaitable[bool | None]] | None = None,
    ) -> None:
        self._lookup = lookup
        self._region = region
        self._clock = clock
        self._tenants = tenants

    async def user(self, access_key: str) -> tuple[Principal, str]:
        """The principal and secret of an access key (InvalidAccessKeyId when there is none):
        for signatures checked elsewhere (a POST form's policy, `post_object`)."""
        found = await self._lookup(access_key)
        if found is None:
            raise translate(sigv4.invalid_access_key())
        return found

    def now(self) -> float:
        """The time signatures and policies are checked against."""
        return self._clock()

    async def known_tenant(self, tenant: str) -> bool:
        """Whether tenant has a user (an ACL grant may name it): True too where this gateway
        cannot tell (no user cache, not synced yet, etcd down: `users.UserCache.has_tenant`)."""
        known = await self._tenants(tenant) if self._tenants is not None else None
        return known is not False

    async def authenticate(self, http: web.Request) -> tuple[Principal, body.Payload]:
        """The principal and the body of a request; S3Error (AccessDenied,
        InvalidAccessKeyId, SignatureDoesNotMatch, RequestTimeTooSkewed...) when it fails."""
        raw_path, _, raw_query = http.raw_path.partition("?")
        if presign_v2.is_header_v2(http.headers.get("Authorization", "")):
            return await self._header_v2(http, raw_path)
        try:
            auth = sigv4.parse(
                method=http.method, raw_path=raw_path, raw_query=raw_query,
                headers=http.headers, region=self._region,
            )  # fmt: skip
            if auth is None:
                return await self._presigned_v2(http, raw_path)
            found = await self._lookup(auth.access_key)
            if found is None:
                raise sigv4.invalid_access_key()
            principal, secret = found
            verified = sigv4.verify(auth, secret, now=self._clock())
        except sigv4.S3AuthError as exc:
            raise translate(exc) from None
        return principal, self._payload(http, verified)

    async def _presigned_v2(
        self, http: web.Request, raw_path: str
    ) -> tuple[Principal, body.Payload]:
        signed = presign_v2.parse_v2(http.query)
        if signed is None:
            if any(name in http.query for name in ("AWSAccessKeyId", "Signature", "Expires")):
                raise s3errors.S3Error(
                    "AccessDenied",
                    "Query-string authentication requires the Signature, Expires and "
                    "AWSAccessKeyId parameters",
                )
            return ANONYMOUS, _unsigned_payload(http)
        found = await self._lookup(signed.access_key)
        if found is None:
            raise translate(sigv4.invalid_access_key())
        principal, secret = found
        presign_v2.verify_v2(
            signed, secret, method=http.method, raw_path=raw_path, query=http.query,
            headers=http.headers, now=self._clock(),
        )  # fmt: skip
        return principal, body.Payload(http.content, size=_content_length(http))

    async def _header_v2(self, http: web.Request, raw_path: str) -> tuple[Principal, body.Payload]:
        """A request signed with a V2 Authorization header (`presign_v2`): the same user
        lookup and so the same principal as V4; its body as an unsigned one's (V2 signs no
        digest of it; Content-MD5, when sent, is signed and checked by the handlers)."""
        if any(name in http.query for name in _QUERY_AUTH):
            raise s3errors.S3Error(
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        signed = presign_v2.parse_header(http.headers)
        found = await self._lookup(signed.access_key)
        if found is None:
            raise translate(sigv4.invalid_access_key())
        principal, secret = found
        presign_v2.verify_header(
            signed, secret, method=http.method, raw_path=raw_path, query=http.query,
            headers=http.headers, now=self._clock(),
        )  # fmt: skip
        return principal, _unsigned_payload(http)

    @staticmethod
    def _payload(http: web.Request, verified: sigv4.Verified) -> body.Payload:
        request = verified.request
        mode = request.payload_mode
        if mode.chunked:
            if request.decoded_content_length is None:
                raise s3errors.S3Error(
                    "MissingContentLength", "aws-chunked bodies need x-amz-decoded-content-length"
                )
            return body.Payload(
                http.content,
                size=request.decoded_content_length,
                decoder=chunked.ChunkDecoder.for_request(verified),
            )
        length = _content_length(http)
        expected = request.expected_sha256
        if expected is None:  # UNSIGNED-PAYLOAD
            return body.Payload(http.content, size=length)
        if length == 0 and expected != EMPTY_SHA256:
            raise s3errors.S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        return body.Payload(http.content, size=length, sha256_hex=expected)


def _unsigned_payload(http: web.Request) -> body.Payload:
    """The body of a request whose signature covers no digest of it (anonymous, V2 header):
    plain bytes, checked against x-amz-content-sha256 when
    that is a digest, or aws-chunked with unsigned chunks (what SDKs send unsigned over HTTPS:
    the trailing checksum checked); signed chunks need a signed request (InvalidRequest)."""
    declared = http.headers.get("x-amz-content-sha256", "")
    encoding = http.headers.get("Content-Encoding", "").lower()
    if declared.startswith("STREAMING-") or "aws-chunked" in encoding:
        unsigned = sigv4.PayloadMode.STREAMING_UNSIGNED_TRAILER
        if declared not in ("", unsigned.value):
            raise s3errors.S3Error("InvalidRequest", "signed aws-chunked bodies need a signature")
        size = params.uint(http.headers.get("x-amz-decoded-content-length", ""))
        if size is None:
            raise s3errors.S3Error(
                "MissingContentLength", "aws-chunked bodies need x-amz-decoded-content-length"
            )
        trailers = http.headers.get("x-amz-trailer", "").split(",")
        decoder = chunked.ChunkDecoder(
            mode=unsigned, decoded_content_length=size,
            trailer_names=[n.strip().lower() for n in trailers if n.strip()],
        )  # fmt: skip
        return body.Payload(http.content, size=size, decoder=decoder)
    digest = declared.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", declared) else ""
    return body.Payload(http.content, size=_content_length(http), sha256_hex=digest)


def translate(exc: sigv4.S3AuthError) -> s3errors.S3Error:
    """The S3 error of an authentication failure."""
    return s3errors.S3Error(exc.code, exc.message, status=exc.status)


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
