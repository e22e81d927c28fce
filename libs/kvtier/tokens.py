"""Session tokens: how SDK clients, the CLI and engine plugins prove who they are.

1. The client signs a `GetSessionTokenRequest` with its secret: HMAC-SHA256 over
   `signing_string(access key, timestamp, nonce, duration)`. The secret never leaves the client.
2. A node that can open users' secrets (metadata, gateway) checks the signature, the clock skew
   (±5 min) and that the nonce was not seen before (`RequestChecker`), and mints a token
   (`TokenIssuer`): `TokenClaims` (user, tenant, admin and shm-trust flags, expiry, cluster)
   signed with the node's certificate key (ECDSA P-256), plus that certificate.
3. Every later call carries `authorization: Bearer <token>`. Any node verifies it with the
   cluster CA alone (`TokenVerifier`: the issuer's certificate must chain to the CA, name this
   cluster and a role that may issue, and the claims must be signed by it and unexpired), so
   kvcache nodes never hold secrets or the master key. A verified token is cached: later calls
   cost a dictionary look-up.

Why not a signature per call: see docs/security.md ("Client identity"). Never imports grpc.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import message

from kvtier import errors, pki, principal
from kvtier.proto.auth.v1 import auth_pb2

TOKEN_PREFIX = "kvt1."
#: Metadata key of the token (the value is "Bearer <token>").
AUTHORIZATION_KEY = "authorization"
MAX_SKEW_S = 300.0
DEFAULT_DURATION_S = 900
MIN_DURATION_S = 60
MAX_DURATION_S = 43_200
#: Roles whose certificates may sign tokens (they can open users' secrets).
ISSUER_ROLES = ("metadata", "gateway")
_MAX_TOKEN_CHARS = 8192
_CACHE_ENTRIES = 4096
_NONCE_CHARS = (16, 64)


def now_ms() -> int:
    """Wall-clock milliseconds."""
    return time.time_ns() // 1_000_000


def signing_string(access_key: str, timestamp_ms: int, nonce: str, duration_s: int) -> bytes:
    """What the client's HMAC covers."""
    return f"kvtier-session-v1\n{access_key}\n{timestamp_ms}\n{nonce}\n{duration_s}".encode()


def sign_request(
    access_key: str, secret: str, *, duration_s: int = 0, now: int | None = None
) -> auth_pb2.GetSessionTokenRequest:
    """A signed GetSessionTokenRequest (the client side of the exchange)."""
    timestamp = now_ms() if now is None else now
    nonce = secrets.token_urlsafe(24)
    text = signing_string(access_key, timestamp, nonce, duration_s)
    return auth_pb2.GetSessionTokenRequest(
        access_key=access_key,
        timestamp_unix_ms=timestamp,
        nonce=nonce,
        duration_s=duration_s,
        signature=hmac.digest(secret.encode(), text, hashlib.sha256),
    )


class RequestChecker:
    """Checks signed GetSessionTokenRequests (the server side): signature, skew, replays.

    The replay cache holds the nonces of the skew window (bounded: beyond `max_nonces`
    outstanding nonces, new requests are refused as Overloaded rather than remembered badly).
    """

    def __init__(
        self,
        *,
        max_skew_s: float = MAX_SKEW_S,
        max_nonces: int = 1_000_000,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._skew_ms = int(max_skew_s * 1000)
        self._max_nonces = max_nonces
        self._clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()

    def check(self, request: auth_pb2.GetSessionTokenRequest, secret: str) -> int:
        """The token duration the request asks for (validated); Unauthenticated when the
        signature, the clock or the nonce is wrong."""
        now = self._clock()
        if abs(now - request.timestamp_unix_ms) > self._skew_ms:
            raise errors.Unauthenticated("request time too far from the server's clock")
        low, high = _NONCE_CHARS
        if not low <= len(request.nonce) <= high or not request.nonce.isascii():
            raise errors.Unauthenticated("nonce must be 16-64 ASCII characters")
        duration = request.duration_s or DEFAULT_DURATION_S
        if not MIN_DURATION_S <= duration <= MAX_DURATION_S:
            raise errors.InvalidArgument(
                f"duration_s {duration}: {MIN_DURATION_S}..{MAX_DURATION_S} (0: default)"
            )
        text = signing_string(
            request.access_key, request.timestamp_unix_ms, request.nonce, request.duration_s
        )
        expected = hmac.digest(secret.encode(), text, hashlib.sha256)
        if not hmac.compare_digest(expected, bytes(request.signature)):
            raise errors.Unauthenticated("signature does not match")
        self._remember(request.nonce, now)
        return duration

    def _remember(self, nonce: str, now: int) -> None:
        seen = self._seen
        while seen and next(iter(seen.values())) < now - 2 * self._skew_ms:
            seen.popitem(last=False)
        if nonce in seen:
            raise errors.Unauthenticated("replayed request")
        if len(seen) >= self._max_nonces:
            raise errors.Overloaded("too many session requests in flight; retry later")
        seen[nonce] = now


def encode(token: auth_pb2.SignedToken) -> str:
    """The text form of a token."""
    raw = base64.urlsafe_b64encode(token.SerializeToString()).rstrip(b"=")
    return TOKEN_PREFIX + raw.decode()


def decode(text: str) -> auth_pb2.SignedToken:
    """Parse a token's text form; Unauthenticated when malformed."""
    if not text.startswith(TOKEN_PREFIX) or len(text) > _MAX_TOKEN_CHARS:
        raise errors.Unauthenticated("malformed session token")
    body = text[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        token = auth_pb2.SignedToken.FromString(raw)
    except (binascii.Error, ValueError, message.DecodeError):
        raise errors.Unauthenticated("malformed session token") from None
    return token


class TokenIssuer:
    """Mints tokens with a node's certificate key (metadata and gateway nodes)."""

    def __init__(self, material: pki.Material) -> None:
        ident = material.identity
        if ident is None or ident.role not in ISSUER_ROLES:
            raise errors.InvalidArgument("only metadata and gateway certificates issue tokens")
        key = serialization.load_pem_private_key(material.key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise errors.InvalidArgument("the node's key is not an EC key")
        self._key = key
        self._cert_der = x509.load_pem_x509_certificate(material.cert_pem).public_bytes(
            serialization.Encoding.DER
        )
        self._ident = ident

    def mint(
        self,
        *,
        access_key: str,
        tenant: str,
        is_admin: bool,
        shm_trusted: bool,
        duration_s: int,
        now: int | None = None,
    ) -> tuple[str, int]:
        """A token for a user and its expiry (Unix ms)."""
        issued = now_ms() if now is None else now
        claims = auth_pb2.TokenClaims(
            version=1,
            access_key=access_key,
            tenant=tenant,
            is_admin=is_admin,
            shm_trusted=shm_trusted,
            issued_at_unix_ms=issued,
            expires_at_unix_ms=issued + duration_s * 1000,
            issuer=self._ident.name,
            token_id=secrets.token_bytes(12),
            cluster=self._ident.cluster,
        ).SerializeToString()
        signature = self._key.sign(claims, ec.ECDSA(hashes.SHA256()))
        token = auth_pb2.SignedToken(
            claims=claims, signature=signature, issuer_certificate=self._cert_der
        )
        return encode(token), issued + duration_s * 1000


@dataclasses.dataclass(frozen=True, slots=True)
class _Verified:
    who: principal.Principal
    expires_ms: int


class TokenVerifier:
    """Verifies tokens against the cluster CA (see the module docstring); caches results.

    `ca_pem` returns the current CA bundle (it may change when the CA is rotated: a bundle of
    the old and the new CA during the overlap).
    """

    def __init__(self, ca_pem: Callable[[], bytes], *, clock: Callable[[], int] = now_ms) -> None:
        self._ca_pem = ca_pem
        self._clock = clock
        self._cas: tuple[bytes, list[x509.Certificate], set[str]] = (b"", [], set())
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._issuers: dict[bytes, ec.EllipticCurvePublicKey] = {}

    def verify(self, text: str) -> principal.Principal:
        """The user a token names; Unauthenticated when it is malformed, forged, expired or
        from another cluster."""
        now = self._clock()
        hit = self._cache.get(text)
        if hit is not None:
            if hit.expires_ms <= now:
                del self._cache[text]
                raise errors.Unauthenticated("session token expired")
            return hit.who
        token = decode(text)
        key, clusters = self._issuer_key(bytes(token.issuer_certificate))
        try:
            key.verify(bytes(token.signature), bytes(token.claims), ec.ECDSA(hashes.SHA256()))
            claims = auth_pb2.TokenClaims.FromString(bytes(token.claims))
        except (InvalidSignature, message.DecodeError):
            raise errors.Unauthenticated("session token signature does not verify") from None
        if claims.cluster not in clusters:
            raise errors.Unauthenticated("session token of another cluster")
        if claims.expires_at_unix_ms <= now:
            raise errors.Unauthenticated("session token expired")
        who = principal.user(
            claims.access_key,
            principal.check_tenant(claims.tenant),
            is_admin=claims.is_admin,
            shm_trusted=claims.shm_trusted,
        )
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        self._cache[text] = _Verified(who, claims.expires_at_unix_ms)
        return who

    def _anchors(self) -> tuple[list[x509.Certificate], set[str]]:
        pem = self._ca_pem()
        if pem != self._cas[0]:
            try:
                certs = x509.load_pem_x509_certificates(pem)
            except ValueError:
                raise errors.Unavailable("the cluster CA bundle is unreadable") from None
            self._cas = (pem, certs, {pki.cluster_of_ca(c) for c in certs})
            self._issuers.clear()
            self._cache.clear()
        return self._cas[1], self._cas[2]

    def _issuer_key(self, der: bytes) -> tuple[ec.EllipticCurvePublicKey, set[str]]:
        cas, clusters = self._anchors()
        key = self._issuers.get(der)
        if key is not None:
            return key, clusters
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise errors.Unauthenticated("session token issuer certificate unparsable") from None
        if not any(_issued_by(cert, ca) for ca in cas):
            raise errors.Unauthenticated("session token issuer not certified by this cluster")
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise errors.Unauthenticated("session token issuer certificate expired")
        ident = pki.identity_of(cert)
        if ident is None or ident.role not in ISSUER_ROLES or ident.cluster not in clusters:
            raise errors.Unauthenticated("session token issuer may not issue tokens")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise errors.Unauthenticated("session token issuer key is not EC")
        if len(self._issuers) >= 256:
            self._issuers.clear()
        self._issuers[der] = public
        return public, clusters


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
