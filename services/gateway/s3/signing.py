"""AWS Signature Version 4 as S3 checks it: the Authorization header and presigned URLs.

Written here rather than taken from a library: botocore and minio only sign (clients), and the
server-side packages on PyPI are unmaintained or framework-bound. The algorithm follows AWS's
"Signature Version 4 signing process" for S3: the canonical URI is the path exactly as sent
(S3 does not normalize or double-encode it), the canonical query re-encodes every name and
value per RFC 3986 and sorts them, signed headers are trimmed with inner spaces collapsed.
Comparisons are constant-time; secrets never reach messages or logs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Mapping, Sequence

from services.gateway.s3 import s3errors

ALGORITHM = "AWS4-HMAC-SHA256"
SKEW_S = 15 * 60
MAX_PRESIGN_S = 7 * 24 * 3600
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SPACES = re.compile(r"\s+")
_AUTH_PARAM = re.compile(r"(Credential|SignedHeaders|Signature)=([^,\s]*)")


@dataclasses.dataclass(frozen=True, slots=True)
class SignedRequest:
    """The signature a request carries."""

    access_key: str
    day: str  # YYYYMMDD of the credential scope
    region: str
    amz_date: str  # YYYYMMDDTHHMMSSZ
    signed_headers: tuple[str, ...]
    signature: str
    payload_hash: str  # x-amz-content-sha256 (or UNSIGNED-PAYLOAD for presigned URLs)
    presigned: bool = False
    expires_s: int = 0

    @property
    def scope(self) -> str:
        """The credential scope: day/region/s3/aws4_request."""
        return f"{self.day}/{self.region}/s3/aws4_request"


def _fail(code: str, message: str) -> s3errors.S3Error:
    return s3errors.S3Error(code, message)


def _credential(text: str, code: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) != 5 or parts[3] != "s3" or parts[4] != "aws4_request" or not parts[0]:
        raise _fail(
            code, "the credential is malformed: expected AK/YYYYMMDD/region/s3/aws4_request"
        )
    if not re.fullmatch(r"\d{8}", parts[1]):
        raise _fail(code, "the credential's date is malformed")
    return parts[0], parts[1], parts[2]


def parse(query: Mapping[str, str], headers: Mapping[str, str]) -> SignedRequest | None:
    """The request's signature (None: an anonymous request). S3Error when it is malformed or
    uses another scheme."""
    if "X-Amz-Algorithm" in query or "X-Amz-Signature" in query:
        return _parse_presigned(query)
    header = headers.get("Authorization", "")
    if not header:
        return None
    if not header.startswith(ALGORITHM + " "):
        raise _fail("AccessDenied", "only AWS Signature Version 4 (AWS4-HMAC-SHA256) is supported")
    params = dict(_AUTH_PARAM.findall(header[len(ALGORITHM) :]))
    if set(params) != {"Credential", "SignedHeaders", "Signature"}:
        raise _fail("AuthorizationHeaderMalformed", "the Authorization header is malformed")
    access_key, day, region = _credential(params["Credential"], "AuthorizationHeaderMalformed")
    amz_date = headers.get("x-amz-date", "")
    if not amz_date:
        date = headers.get("Date", "")
        try:
            parsed = datetime.datetime.strptime(date, "%a, %d %b %Y %H:%M:%S GMT")
        except ValueError:
            raise _fail(
                "AccessDenied", "AWS authentication requires a valid Date or x-amz-date"
            ) from None
        amz_date = parsed.strftime("%Y%m%dT%H%M%SZ")
    payload = headers.get("x-amz-content-sha256", "")
    if not payload:
        raise _fail(
            "InvalidRequest", "Missing required header for this request: x-amz-content-sha256"
        )
    return SignedRequest(
        access_key=access_key, day=day, region=region, amz_date=amz_date,
        signed_headers=tuple(params["SignedHeaders"].split(";")),
        signature=params["Signature"], payload_hash=payload,
    )  # fmt: skip


def _parse_presigned(query: Mapping[str, str]) -> SignedRequest:
    code = "AuthorizationQueryParametersError"
    needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
              "X-Amz-SignedHeaders", "X-Amz-Signature")  # fmt: skip
    if any(n not in query for n in needed):
        raise _fail(code, f"a presigned URL needs {', '.join(needed)}")
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise _fail(code, "X-Amz-Algorithm only supports AWS4-HMAC-SHA256")
    expires = query["X-Amz-Expires"]
    if not expires.isdigit() or not 1 <= int(expires) <= MAX_PRESIGN_S:
        raise _fail(code, f"X-Amz-Expires must be 1..{MAX_PRESIGN_S} seconds")
    access_key, day, region = _credential(query["X-Amz-Credential"], code)
    return SignedRequest(
        access_key=access_key, day=day, region=region, amz_date=query["X-Amz-Date"],
        signed_headers=tuple(query["X-Amz-SignedHeaders"].split(";")),
        signature=query["X-Amz-Signature"],
        payload_hash=query.get("X-Amz-Content-Sha256", UNSIGNED), presigned=True,
        expires_s=int(expires),
    )  # fmt: skip


def _when(amz_date: str) -> float:
    try:
        stamp = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise _fail("AccessDenied", f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def check_time(signed: SignedRequest, now: float, region: str) -> None:
    """The scope names our region and the request's day; the clock is within 15 minutes (or
    the presigned URL is valid now)."""
    code = (
        "AuthorizationQueryParametersError" if signed.presigned else "AuthorizationHeaderMalformed"
    )
    if signed.region != region:
        raise _fail(code, f"the authorization is scoped to region {signed.region!r}; "
                          f"this endpoint is {region!r}")  # fmt: skip
    when = _when(signed.amz_date)
    if signed.amz_date[:8] != signed.day:
        raise _fail(code, "the credential's date does not match X-Amz-Date")
    if signed.presigned:
        if now > when + signed.expires_s:
            raise _fail("AccessDenied", "Request has expired")
        if when > now + SKEW_S:
            raise _fail("AccessDenied", "Request is not valid yet")
    elif abs(now - when) > SKEW_S:
        raise _fail(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )


def _encode(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def canonical_query(raw_query: str, *, presigned: bool) -> str:
    """Every name=value of the raw query, decoded and re-encoded per RFC 3986, sorted
    (X-Amz-Signature left out of presigned URLs)."""
    pairs = []
    for item in raw_query.split("&") if raw_query else []:
        if not item:
            continue
        name, _, value = item.partition("=")
        name = urllib.parse.unquote(name.replace("+", " "))
        value = urllib.parse.unquote(value.replace("+", " "))
        if presigned and name == "X-Amz-Signature":
            continue
        pairs.append((_encode(name), _encode(value)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_headers(headers: Mapping[str, str], getall: object, names: Sequence[str]) -> str:
    """name:value lines of the signed headers (values trimmed, inner spaces collapsed)."""
    lines = []
    for name in names:
        values = getall(name, []) if callable(getall) else [headers.get(name, "")]
        if not values and name != "host":
            raise _fail("AccessDenied", f"signed header {name!r} is missing")
        joined = ",".join(_SPACES.sub(" ", str(v).strip()) for v in values)
        lines.append(f"{name}:{joined}\n")
    return "".join(lines)


@functools.lru_cache(maxsize=1024)
def signing_key(secret: str, day: str, region: str) -> bytes:
    """HMAC chain AWS4<secret> → day → region → s3 → aws4_request (cached per day)."""
    key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256."""
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def verify(
    signed: SignedRequest,
    secret: str,
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    getall: object,
) -> bytes:
    """Check the signature with the user's secret; returns the signing key (for chunk
    signatures). SignatureDoesNotMatch when it differs."""
    names = [n.lower() for n in signed.signed_headers]
    if "host" not in names or names != sorted(names):
        raise _fail("AccessDenied", "SignedHeaders must be sorted and include host")
    canonical = "\n".join(
        (
            method,
            raw_path or "/",
            canonical_query(raw_query, presigned=signed.presigned),
            canonical_headers(headers, getall, names),
            ";".join(names),
            signed.payload_hash,
        )
    )
    to_sign = "\n".join(
        (ALGORITHM, signed.amz_date, signed.scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    key = signing_key(secret, signed.day, signed.region)
    if not hmac.compare_digest(sign(key, to_sign), signed.signature.lower()):
        raise _fail(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
        )
    return key


# Signature Version 2, presigned URLs only (what boto3's generate_presigned_url makes unless
# told to use s3v4): HMAC-SHA1 over method, Content-MD5, Content-Type, Expires, x-amz-*
# headers and the resource with its sub-resources.

V2_SUBRESOURCES = frozenset(
    {
        "acl", "delete", "lifecycle", "location", "logging", "notification", "partNumber",
        "policy", "requestPayment", "response-cache-control", "response-content-disposition",
        "response-content-encoding", "response-content-language", "response-content-type",
        "response-expires", "restore", "tagging", "torrent", "uploadId", "uploads",
        "versionId", "versioning", "versions", "website",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class PresignedV2:
    """A Signature Version 2 presigned URL's signature."""

    access_key: str
    expires: int
    signature: str


def parse_v2(query: Mapping[str, str]) -> PresignedV2 | None:
    """The V2 presigned signature of a request (None when it has none)."""
    if "AWSAccessKeyId" not in query or "Signature" not in query:
        return None
    expires = query.get("Expires", "")
    if not expires.isdigit():
        raise _fail("AccessDenied", "a presigned URL needs Expires")
    return PresignedV2(query["AWSAccessKeyId"], int(expires), query["Signature"])


def verify_v2(
    signed: PresignedV2,
    secret: str,
    *,
    method: str,
    raw_path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    now: float,
) -> None:
    """Check a V2 presigned URL: not expired, and its HMAC-SHA1 matches."""
    if now > signed.expires:
        raise _fail("AccessDenied", "Request has expired")
    amz = sorted(
        (k.lower(), v.strip()) for k, v in headers.items() if k.lower().startswith("x-amz-")
    )
    subresources = sorted((k, v) for k, v in query.items() if k in V2_SUBRESOURCES)
    resource = raw_path
    if subresources:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in subresources)
    to_sign = "\n".join(
        (
            method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""),
            str(signed.expires), *(f"{k}:{v}" for k, v in amz),
        )
    ) + "\n" + resource  # fmt: skip
    digest = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()
    expected = base64.b64encode(digest).decode()
    if not hmac.compare_digest(expected, signed.signature):
        raise _fail(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )


def is_hex_sha256(value: str) -> bool:
    """Whether x-amz-content-sha256 is a hash of the body (not a streaming or unsigned mode)."""
    return bool(_HEX64.fullmatch(value.lower()))
