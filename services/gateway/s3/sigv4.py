"""AWS Signature Version 4 as S3 verifies it: the Authorization header and presigned URLs.

Pure logic, no HTTP framework. `parse` reads a request's signature and builds its string to
sign (no secret needed); the caller looks the access key up; `verify` checks the clock and the
signature with its secret. The `Verified` result seeds the chunk signatures of aws-chunked
bodies (`services.gateway.s3.chunked`); `AuthRequest.payload_digest()` checks a signed SHA-256.

What S3 does, and so does this module:

- canonical URI: the path as sent, percent-decoded once and re-encoded per RFC 3986 ('/'
  kept), so never double-encoded, and not normalized: '.', '..' and '//' stay (AWS's own
  example signs the path `/test$file.text` as `/test%24file.text`).
- canonical query: every name and value percent-decoded ('+' is a space) and re-encoded per
  RFC 3986, sorted by name then value; X-Amz-Signature is left out of presigned URLs.
- signed headers: lowercase names; values trimmed with inner whitespace runs collapsed,
  repeated headers joined with ','. `host` must be signed, and so must every x-amz-* header
  present except x-amz-content-sha256 ("There were headers present in the request which were
  not signed").
- clock: a header-signed request is within 15 minutes of now (RequestTimeTooSkewed); a
  presigned URL is valid from X-Amz-Date (15 minutes of skew allowed) for X-Amz-Expires s.
- the credential scope names our region (else AuthorizationHeaderMalformed with the region
  to use, as S3 answers so SDKs can redirect), the service `s3` and X-Amz-Date's day.

Header values, the raw path and the raw query are `str` decoded as aiohttp does (UTF-8,
surrogateescape) and encoded back so. Comparisons are constant-time and of bytes, so a signature
in any script is only a mismatch (SignatureDoesNotMatch); numbers are ASCII digits
(`params.uint`); secrets and signing keys never reach messages or reprs.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.gateway.s3 import canonical as canon
from services.gateway.s3 import params

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

ALGORITHM = "AWS4-HMAC-SHA256"
DEFAULT_REGION = "us-east-1"
SERVICE = "s3"
TERMINAL = "aws4_request"
MAX_SKEW_S = 15 * 60
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
#: AMZ_DATE_FORMAT as a pattern (ASCII digits; T and Z in either case, as strptime takes them)
_AMZ_DATE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})[Tt]([0-9]{2})([0-9]{2})([0-9]{2})[Zz]")

#: A request's headers (`canon.Headers`).
Headers = canon.Headers
#: The canonical forms (re-exported: importers name them here).
canonical_uri = canon.canonical_uri
canonical_query = canon.canonical_query
canonical_headers = canon.canonical_headers

_STATUS = {
    "AccessDenied": 403,
    "InvalidAccessKeyId": 403,
    "RequestTimeTooSkewed": 403,
    "SignatureDoesNotMatch": 403,
    "MissingContentLength": 411,
}
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_DAY = re.compile(r"[0-9]{8}")
_PRESIGN_MARKERS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature")
_PRESIGN_PARAMS = (*_PRESIGN_MARKERS, "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Expires")
_HEADER_MALFORMED = "The authorization header is malformed; "
_QUERY_MALFORMED = "Error parsing the X-Amz-Credential parameter; "


class S3AuthError(Exception):
    """A request S3 refuses: `code` (the S3 error code), `status` (HTTP), `message`, and
    `details`, extra elements of the error document (e.g. HeadersNotSigned, Region)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status if status is not None else _STATUS.get(code, 400)
        self.message = message
        self.details = dict(details or {})


def invalid_access_key() -> S3AuthError:
    """The error of a signature by an access key that does not exist."""
    return S3AuthError(
        "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
    )


class PayloadMode(enum.Enum):
    """What x-amz-content-sha256 says about the body."""

    SHA256 = "sha256"  # a hex SHA-256 of the body, which must be checked
    UNSIGNED = "UNSIGNED-PAYLOAD"
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

    @property
    def chunked(self) -> bool:
        """Whether the body is aws-chunked."""
        return self.name.startswith("STREAMING")

    @property
    def signed_chunks(self) -> bool:
        """Whether every chunk carries a signature."""
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def trailer(self) -> bool:
        """Whether trailing headers follow the last chunk."""
        return self.name.endswith("TRAILER")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuthRequest:
    """A request's SigV4 signature, parsed and checked for form, before the secret is known."""

    access_key: str
    day: str  #: YYYYMMDD of the credential scope
    region: str
    amz_date: str  #: YYYYMMDDTHHMMSSZ, as signed
    timestamp: float  #: amz_date in seconds since the epoch
    signed_headers: tuple[str, ...]
    signature: str
    presigned: bool
    expires_s: int  #: X-Amz-Expires of a presigned URL (0 otherwise)
    payload_mode: PayloadMode
    content_sha256: str  #: the payload line of the canonical request
    decoded_content_length: int | None  #: x-amz-decoded-content-length of aws-chunked bodies
    trailer_names: tuple[str, ...]  #: x-amz-trailer, lowercase
    session_token: str | None = dataclasses.field(default=None, repr=False)
    canonical_request: str = dataclasses.field(repr=False)
    string_to_sign: str = dataclasses.field(repr=False)

    @property
    def scope(self) -> str:
        """The credential scope: day/region/s3/aws4_request."""
        return f"{self.day}/{self.region}/{SERVICE}/{TERMINAL}"

    @property
    def expected_sha256(self) -> str | None:
        """The signed hex SHA-256 of the body (lowercase), when the client signed one."""
        return self.content_sha256.lower() if self.payload_mode is PayloadMode.SHA256 else None

    def payload_digest(self) -> PayloadDigest | None:
        """A checker for the body's signed SHA-256 (None when the body's hash is not signed)."""
        expected = self.expected_sha256
        return PayloadDigest(expected) if expected is not None else None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Verified:
    """A request whose signature matched; aws-chunked bodies chain their chunk signatures from
    its signature with its signing key (derived from the secret: kept out of the repr)."""

    request: AuthRequest
    signing_key: bytes = dataclasses.field(repr=False)


class PayloadDigest:
    """Hashes a body as it streams and checks it against the signed x-amz-content-sha256."""

    def __init__(self, expected_hex: str) -> None:
        self._expected = expected_hex.lower().encode()
        self._hasher = hashlib.sha256()

    def update(self, data: ReadableBuffer) -> None:
        """Hash the next bytes of the body."""
        self._hasher.update(data)

    def verify(self) -> None:
        """After the last byte: XAmzContentSHA256Mismatch unless the hashes agree."""
        if not hmac.compare_digest(self._hasher.hexdigest().encode(), self._expected):
            raise S3AuthError(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )


@functools.lru_cache(maxsize=256)
def signing_key(secret: str, day: str, region: str) -> bytes:
    """HMAC chain "AWS4"+secret → day → region → s3 → aws4_request (cached per key and day)."""
    key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, SERVICE, TERMINAL):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 of a string to sign."""
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def signature_bytes(text: str) -> bytes:
    """A client's signature as bytes for `hmac.compare_digest` (which refuses non-ASCII `str`):
    'surrogatepass' encodes any `str`, so a non-ASCII signature only fails to match."""
    return text.encode("utf-8", "surrogatepass")


def _one(table: Mapping[str, list[str]], name: str) -> str | None:
    values = table.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise S3AuthError("InvalidArgument", f"the {name} header must appear once")
    return values[0]


def _malformed(presigned: bool, message: str, **details: str) -> S3AuthError:
    if presigned:
        return S3AuthError(
            "AuthorizationQueryParametersError", _QUERY_MALFORMED + message, details=details
        )
    return S3AuthError("AuthorizationHeaderMalformed", _HEADER_MALFORMED + message, details=details)


def _credential(text: str, amz_date: str, *, presigned: bool, region: str) -> tuple[str, str]:
    """(access key, day) of a credential AK/YYYYMMDD/region/s3/aws4_request, dated amz_date."""
    parts = text.rsplit("/", 4)
    if len(parts) != 5 or not parts[0] or not _DAY.fullmatch(parts[1]):
        raise _malformed(
            presigned,
            'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/'
            'aws4_request".',
        )
    access_key, day, scope_region, service, terminal = parts
    if scope_region != region:
        raise _malformed(
            presigned, f"the region '{scope_region}' is wrong; expecting '{region}'", Region=region
        )
    if service != SERVICE:
        raise _malformed(
            presigned, f'incorrect service "{service}". This endpoint belongs to "s3".'
        )
    if terminal != TERMINAL:
        raise _malformed(
            presigned, f'incorrect terminal "{terminal}". This endpoint uses "aws4_request".'
        )
    if day != amz_date[:8]:
        raise _malformed(
            presigned,
            f'Invalid credential date "{day}". This date is not the same as X-Amz-Date: '
            f'"{amz_date[:8]}".',
        )
    return access_key, day


def _parse_amz_date(text: str) -> float | None:
    """AMZ_DATE_FORMAT's time (UTC), or None; without strptime (~6 µs of CPU a request, ~2 here)."""
    match = _AMZ_DATE.fullmatch(text)
    if match is None:
        return None
    try:
        year, month, day, hour, minute, second = map(int, match.groups())
        stamp = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:  # out of range: month 13, second 60 ...
        return None
    return stamp.timestamp()


def _format_amz_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime(AMZ_DATE_FORMAT)


def _header_date(table: Mapping[str, list[str]]) -> tuple[str, float]:
    """The signed time of a header-signed request: x-amz-date, else Date (RFC 1123)."""
    amz_date, date = _one(table, "x-amz-date"), _one(table, "date")
    when: float | None = None
    if amz_date is not None:
        when = _parse_amz_date(amz_date)
    elif date:
        when = params.http_date(date)
    if when is None:
        raise S3AuthError(
            "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
        )
    return amz_date or _format_amz_date(when), when


def _payload_mode(value: str, *, presigned: bool) -> PayloadMode:
    if _HEX_SHA256.fullmatch(value):
        return PayloadMode.SHA256
    try:
        mode = PayloadMode(value)
    except ValueError:
        mode = None
    if mode is None or mode is PayloadMode.SHA256 or (presigned and mode.chunked):
        raise S3AuthError(
            "InvalidArgument",
            "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or "
            "a valid sha256 value.",
        )
    return mode


def _streaming(
    table: Mapping[str, list[str]], mode: PayloadMode
) -> tuple[int | None, tuple[str, ...]]:
    """x-amz-decoded-content-length and x-amz-trailer of an aws-chunked body."""
    if not mode.chunked:
        return None, ()
    decoded = _one(table, "x-amz-decoded-content-length")
    if decoded is None:
        raise S3AuthError(
            "MissingContentLength", "You must provide the Content-Length HTTP header."
        )
    length = params.uint(decoded)
    if length is None:
        raise S3AuthError("InvalidArgument", "x-amz-decoded-content-length must be a number")
    names = ",".join(table.get("x-amz-trailer", ())).split(",") if mode.trailer else []
    return length, tuple(n.strip().lower() for n in names if n.strip())


def _signed_header_names(text: str, table: Mapping[str, list[str]]) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(";"))
    unsigned = sorted(
        name
        for name in table
        if name.startswith("x-amz-") and name != "x-amz-content-sha256" and name not in names
    )
    if "host" not in names:
        unsigned.insert(0, "host")
    if unsigned:
        raise S3AuthError(
            "AccessDenied",
            "There were headers present in the request which were not signed",
            details={"HeadersNotSigned": ", ".join(unsigned)},
        )
    return names


def _authorization_fields(value: str) -> dict[str, str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3AuthError(
            "InvalidRequest",
            "The authorization mechanism you have provided is not supported. "
            "Please use AWS4-HMAC-SHA256.",
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field = part.strip().partition("=")
        if not sep or name in fields:
            fields.clear()
            break
        fields[name] = field.strip()
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise S3AuthError(
            "AuthorizationHeaderMalformed",
            _HEADER_MALFORMED + "it must hold Credential=, SignedHeaders= and Signature=.",
        )
    return fields


@dataclasses.dataclass(frozen=True, slots=True)
class _Signature:
    """What a header or a presigned query says, before the canonical request is built."""

    access_key: str
    day: str
    amz_date: str
    timestamp: float
    signed_headers: tuple[str, ...]
    signature: str
    content_sha256: str
    expires_s: int = 0
    session_token: str | None = None


def _from_header(value: str, table: Mapping[str, list[str]], region: str) -> _Signature:
    fields = _authorization_fields(value)
    amz_date, timestamp = _header_date(table)
    access_key, day = _credential(fields["Credential"], amz_date, presigned=False, region=region)
    content_sha256 = _one(table, "x-amz-content-sha256")
    if content_sha256 is None:
        raise S3AuthError(
            "InvalidRequest", "Missing required header for this request: x-amz-content-sha256"
        )
    return _Signature(
        access_key=access_key,
        day=day,
        amz_date=amz_date,
        timestamp=timestamp,
        signed_headers=_signed_header_names(fields["SignedHeaders"], table),
        signature=fields["Signature"],
        content_sha256=content_sha256,
        session_token=_one(table, "x-amz-security-token"),
    )


def _presign_params(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith("X-Amz-"):
            params.setdefault(key, []).append(value.decode("utf-8", "surrogateescape"))
    if any(len(params.get(name, ())) != 1 for name in _PRESIGN_PARAMS):
        raise S3AuthError(
            "AuthorizationQueryParametersError",
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
            "X-Amz-Expires parameters.",
        )
    return {name: values[0] for name, values in params.items()}


def _expires(text: str) -> int:
    """X-Amz-Expires as S3 takes it: 0 to a week (0 is well-formed and simply expired: 403
    "Request has expired" from `check_time`); a negative or larger value is a 400
    AuthorizationQueryParametersError, the answer and message of S3 itself."""
    code = "AuthorizationQueryParametersError"
    expires = params.uint(text)
    if expires is None:
        if text.startswith("-") and params.uint(text[1:]) is not None:
            raise S3AuthError(code, "X-Amz-Expires must be non-negative")
        raise S3AuthError(code, "X-Amz-Expires should be a number")
    if expires > MAX_PRESIGN_EXPIRES_S:
        raise S3AuthError(
            code,
            "X-Amz-Expires must be less than a week (in seconds); that is, the given "
            f"X-Amz-Expires must be less than {MAX_PRESIGN_EXPIRES_S} seconds",
        )
    return expires


def _from_query(
    pairs: list[tuple[bytes, bytes]], table: Mapping[str, list[str]], region: str
) -> _Signature:
    params = _presign_params(pairs)
    code = "AuthorizationQueryParametersError"
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise S3AuthError(code, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    amz_date = params["X-Amz-Date"]
    timestamp = _parse_amz_date(amz_date)
    if timestamp is None:
        raise S3AuthError(
            code, "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
        )
    expires_s = _expires(params["X-Amz-Expires"])
    access_key, day = _credential(
        params["X-Amz-Credential"], amz_date, presigned=True, region=region
    )
    return _Signature(
        access_key=access_key,
        day=day,
        amz_date=amz_date,
        timestamp=timestamp,
        signed_headers=_signed_header_names(params["X-Amz-SignedHeaders"], table),
        signature=params["X-Amz-Signature"],
        content_sha256=params.get("X-Amz-Content-Sha256", PayloadMode.UNSIGNED.value),
        expires_s=expires_s,
        session_token=params.get("X-Amz-Security-Token"),
    )


def parse(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Headers,
    region: str = DEFAULT_REGION,
) -> AuthRequest | None:
    """The SigV4 signature of a request, or None when it carries none (anonymous, or signed
    with a Signature Version 2 presigned URL, which this module leaves to its caller).

    `raw_path` is the path exactly as received (percent-encoded, without the query) and
    `raw_query` the query string after '?'. Raises S3AuthError when the signature is malformed,
    unsupported, scoped to another region, service or day, leaves x-amz-* headers or host
    unsigned, or lacks x-amz-content-sha256 (header signatures).
    """
    table = canon.header_table(headers)
    pairs = canon.query_pairs(raw_query)
    authorization = _one(table, "authorization")
    presigned = any(name.decode("latin-1") in _PRESIGN_MARKERS for name, _ in pairs)
    if presigned and authorization is not None:
        raise S3AuthError(
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
            "Signature query string parameter or the Authorization header should be specified",
        )
    if presigned:
        found = _from_query(pairs, table, region)
    elif authorization is not None:
        found = _from_header(authorization, table, region)
    else:
        return None
    mode = _payload_mode(found.content_sha256, presigned=presigned)
    decoded_length, trailer_names = _streaming(table, mode)
    canonical = "\n".join(
        (
            method,
            canonical_uri(raw_path),
            canon.canonical_pairs(pairs, presigned=presigned),
            canonical_headers(table, found.signed_headers),
            ";".join(found.signed_headers),
            found.content_sha256,
        )
    )
    scope = f"{found.day}/{region}/{SERVICE}/{TERMINAL}"
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return AuthRequest(
        **{field.name: getattr(found, field.name) for field in dataclasses.fields(found)},
        region=region,
        presigned=presigned,
        payload_mode=mode,
        decoded_content_length=decoded_length,
        trailer_names=trailer_names,
        canonical_request=canonical,
        string_to_sign="\n".join((ALGORITHM, found.amz_date, scope, digest)),
    )


def check_time(auth: AuthRequest, now: float) -> None:
    """A header signature within 15 minutes of now (RequestTimeTooSkewed); a presigned URL
    not expired and not dated more than 15 minutes ahead (AccessDenied)."""
    if auth.presigned:
        if now > auth.timestamp + auth.expires_s:
            raise S3AuthError("AccessDenied", "Request has expired")
        if auth.timestamp > now + MAX_SKEW_S:
            raise S3AuthError("AccessDenied", "Request is not valid yet")
    elif abs(now - auth.timestamp) > MAX_SKEW_S:
        raise S3AuthError(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
            details={
                "RequestTime": auth.amz_date,
                "ServerTime": _format_amz_date(now),
                "MaxAllowedSkewMilliseconds": str(MAX_SKEW_S * 1000),
            },
        )


def verify(auth: AuthRequest, secret: str, *, now: float) -> Verified:
    """Check the clock (`check_time`) and the signature with the access key's secret.

    Raises S3AuthError: RequestTimeTooSkewed, AccessDenied (expired or future presigned URL),
    SignatureDoesNotMatch.
    """
    check_time(auth, now)
    key = signing_key(secret, auth.day, auth.region)
    expected = sign(key, auth.string_to_sign).encode()
    if not hmac.compare_digest(expected, signature_bytes(auth.signature)):
        raise S3AuthError(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
            details={"AWSAccessKeyId": auth.access_key, "StringToSign": auth.string_to_sign},
        )
    return Verified(request=auth, signing_key=key)
