"""Signature Version 2: presigned URLs (what boto3's `generate_presigned_url` makes unless told
to use s3v4) and `Authorization: AWS <access key>:<signature>` headers (old clients; boto3 with
`signature_version="s3"`). Both are an HMAC-SHA1 over the method, Content-MD5, Content-Type, a
time (the URL's Expires; the header's Date, empty when x-amz-date is sent), the x-amz-* headers
and the resource with its sub-resources ("Signing and Authenticating REST Requests"). AWS has
deprecated V2; it is accepted for old clients, behind the same user lookup, principal and
authorization as V4. Signature Version 4 lives in `sigv4`.

Like V4's X-Amz-Expires, a V2 URL may not outlive the request by more than 7 days: `Expires`
(a unix time) further ahead than that is refused (AccessDenied), so that no URL grants access
for years. A header-signed request's time (x-amz-date, else Date; RFC 1123) must be within
V4's 15 minutes of now (RequestTimeTooSkewed); a missing or unparsable one, or one before
1970, is AccessDenied, as S3 answers. A signature in any script is only a mismatch
(SignatureDoesNotMatch). The resource is the path as sent (`/bucket` may be signed as
`/bucket/`, as botocore does), so V2 signatures verify for path-style requests only (a
virtual-host style request's signed resource names its bucket, which this module does not
see: SignatureDoesNotMatch, never access).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from services.gateway.s3 import canonical as canon
from services.gateway.s3 import params, s3errors, sigv4

#: A request's headers (`canon.Headers`).
Headers = canon.Headers

#: The longest a V2 presigned URL may still be valid at the time of a request (as V4's cap).
MAX_EXPIRES_S = sigv4.MAX_PRESIGN_EXPIRES_S

#: The sub-resources a V2 signature covers: AWS's list, and every other query key that routes
#: a request to its operation here (`server.S3Server.route`: publicAccessBlock... which AWS
#: serves to V4 alone), so that a URL presigned for one operation (ListObjects, DeleteBucket)
#: is never another (GetPublicAccessBlock, DeletePublicAccessBlock) by an added key.
V2_SUBRESOURCES = frozenset(
    {
        "acl", "cors", "delete", "lifecycle", "location", "logging", "notification", "partNumber",
        "policy", "requestPayment", "response-cache-control", "response-content-disposition",
        "response-content-encoding", "response-content-language", "response-content-type",
        "response-expires", "restore", "tagging", "torrent", "uploadId", "uploads",
        "versionId", "versioning", "versions", "website",
        "attributes", "ownershipControls", "policyStatus", "publicAccessBlock",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class PresignedV2:
    """A Signature Version 2 presigned URL's signature."""

    access_key: str
    expires: int
    signature: str


def parse_v2(query: Mapping[str, str]) -> PresignedV2 | None:
    """The V2 presigned signature of a request (None when it has none); AccessDenied when its
    Expires is not a unix time in ASCII digits."""
    if "AWSAccessKeyId" not in query or "Signature" not in query:
        return None
    expires = params.uint(query.get("Expires", ""))
    if expires is None:
        raise s3errors.S3Error("AccessDenied", "a presigned URL needs Expires")
    return PresignedV2(query["AWSAccessKeyId"], expires, query["Signature"])


def check_time(signed: PresignedV2, now: float) -> None:
    """AccessDenied when the URL has expired, or expires more than MAX_EXPIRES_S after now."""
    if now > signed.expires:
        raise s3errors.S3Error("AccessDenied", "Request has expired")
    if signed.expires > now + MAX_EXPIRES_S:
        raise s3errors.S3Error(
            "AccessDenied",
            f"Expires is too far in the future: a presigned URL may be valid for at most "
            f"{MAX_EXPIRES_S} seconds (7 days) from now",
        )


def hmac_sha1(secret: str, data: bytes) -> bytes:
    """The base64 HMAC-SHA1 of data under secret: a V2 signature (URLs and POST policies)."""
    return base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha1).digest())


def string_to_sign(
    *, method: str, time_line: str, raw_path: str, query: Mapping[str, str], headers: Headers
) -> bytes:
    """A V2 string to sign: method, Content-MD5, Content-Type, the time line, the x-amz-*
    headers (lowercase, sorted, a repeated one's values joined by ',') and the resource: the
    path as sent with the sub-resources of V2_SUBRESOURCES, sorted."""
    table = canon.header_table(headers)
    amz = sorted(
        (name, ",".join(v.strip() for v in values))
        for name, values in table.items()
        if name.startswith("x-amz-")
    )
    subresources = sorted((k, v) for k, v in query.items() if k in V2_SUBRESOURCES)
    resource = raw_path
    if subresources:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in subresources)
    content_md5, content_type = (
        ",".join(v.strip() for v in table.get(name, ())) for name in ("content-md5", "content-type")
    )
    lines = (method, content_md5, content_type, time_line, *(f"{k}:{v}" for k, v in amz))
    text = "\n".join(lines) + "\n" + resource
    return text.encode("utf-8", "surrogateescape")  # as the HTTP layer decoded it


#: Sub-resources of operations S3 serves to SigV4 alone (they came after SigV2 was frozen, and
#: V2 signers such as botocore's do not sign them): a V2-signed request for one is refused as
#: AWS refuses it, whatever its signature.
V4_ONLY = frozenset({"attributes", "ownershipControls", "policyStatus", "publicAccessBlock"})


def _bucket_level(raw_path: str) -> bool:
    """Whether a path-style path names a bucket alone (`/bucket`, no key)."""
    name = raw_path[1:]
    return raw_path.startswith("/") and bool(name) and "/" not in name


def _check_signature(
    secret: str,
    signature: str,
    *,
    method: str,
    time_line: str,
    raw_path: str,
    query: Mapping[str, str],
    headers: Headers,
) -> None:
    """InvalidRequest for an operation S3 serves to SigV4 alone (V4_ONLY); else
    SignatureDoesNotMatch unless signature is the HMAC-SHA1 of the request's string to sign
    (constant time). A request on a bucket alone (`/bucket`) may sign `/bucket/` instead: the
    resource AWS gives the same request in virtual-host style, and what botocore signs for
    path style too; either names this bucket and no key."""
    if V4_ONLY.intersection(query):
        raise s3errors.S3Error(
            "InvalidRequest",
            "The authorization mechanism you have provided is not supported. "
            "Please use AWS4-HMAC-SHA256.",
        )
    sent = sigv4.signature_bytes(signature)
    paths = (raw_path, raw_path + "/") if _bucket_level(raw_path) else (raw_path,)
    for path in paths:
        to_sign = string_to_sign(
            method=method, time_line=time_line, raw_path=path, query=query, headers=headers
        )
        if hmac.compare_digest(hmac_sha1(secret, to_sign), sent):
            return
    raise s3errors.S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided.",
    )


def verify_v2(
    signed: PresignedV2,
    secret: str,
    *,
    method: str,
    raw_path: str,
    query: Mapping[str, str],
    headers: Headers,
    now: float,
) -> None:
    """Check a V2 presigned URL: AccessDenied when expired or valid too long (`check_time`),
    SignatureDoesNotMatch unless its HMAC-SHA1 matches."""
    check_time(signed, now)
    _check_signature(
        secret, signed.signature, method=method, time_line=str(signed.expires),
        raw_path=raw_path, query=query, headers=headers,
    )  # fmt: skip


# --- Authorization: AWS <access key>:<signature> ---

#: The scheme of a V2 Authorization header (V4's is "AWS4-HMAC-SHA256 ").
HEADER_SCHEME = "AWS "


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderV2:
    """A V2 Authorization header's signature and the request time it signs."""

    access_key: str
    signature: str
    timestamp: float  #: x-amz-date, else Date, in seconds since the epoch
    time_line: str  #: the Date header as sent; empty when x-amz-date is sent (AWS's rule)


def is_header_v2(authorization: str) -> bool:
    """Whether an Authorization header is V2's (`AWS ...`), not V4's or another scheme."""
    return authorization.startswith(HEADER_SCHEME)


def _only(table: Mapping[str, list[str]], name: str) -> str | None:
    values = table.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise s3errors.S3Error("InvalidArgument", f"the {name} header must appear once")
    return values[0]


def parse_header(headers: Headers) -> HeaderV2:
    """The V2 signature of a request whose Authorization header `is_header_v2`: InvalidArgument
    (400) unless it reads `AWS <access key>:<signature>`; AccessDenied (403) unless the request
    carries a valid time (x-amz-date when present, even empty; else Date) at or after 1970."""
    table = canon.header_table(headers)
    authorization = _only(table, "authorization") or ""
    access_key, sep, signature = authorization[len(HEADER_SCHEME) :].partition(":")
    if not is_header_v2(authorization) or not sep or not access_key or not signature:
        raise s3errors.S3Error(
            "InvalidArgument",
            "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature",
        )
    amz_date, date = _only(table, "x-amz-date"), _only(table, "date")
    sent = amz_date if amz_date is not None else date
    when = params.http_date(sent) if sent else None
    if when is None or when < 0:
        raise s3errors.S3Error(
            "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
        )
    time_line = "" if amz_date is not None else date or ""
    return HeaderV2(access_key, signature, when, time_line)


def verify_header(
    signed: HeaderV2,
    secret: str,
    *,
    method: str,
    raw_path: str,
    query: Mapping[str, str],
    headers: Headers,
    now: float,
) -> None:
    """Check a V2 header signature: RequestTimeTooSkewed when its time is more than V4's
    sigv4.MAX_SKEW_S from now, SignatureDoesNotMatch unless its HMAC-SHA1 matches."""
    if abs(now - signed.timestamp) > sigv4.MAX_SKEW_S:
        raise s3errors.S3Error(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )
    _check_signature(
        secret, signed.signature, method=method, time_line=signed.time_line,
        raw_path=raw_path, query=query, headers=headers,
    )  # fmt: skip
