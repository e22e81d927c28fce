"""Signature Version 2 presigned URLs (what boto3's `generate_presigned_url` makes unless told
to use s3v4): HMAC-SHA1 over the method, Content-MD5, Content-Type, Expires, x-amz-* headers and
the resource with its sub-resources. Only presigned URLs: V2 Authorization headers are refused
(no current SDK sends them). Signature V4 lives in `sigv4`.

Like V4's X-Amz-Expires, a V2 URL may not outlive the request by more than 7 days: `Expires`
(a unix time) further ahead than that is refused (AccessDenied), so that no URL grants access
for years. A signature in any script is only a mismatch (SignatureDoesNotMatch).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from services.gateway.s3 import params, s3errors, sigv4

#: The longest a V2 presigned URL may still be valid at the time of a request (as V4's cap).
MAX_EXPIRES_S = sigv4.MAX_PRESIGN_EXPIRES_S

V2_SUBRESOURCES = frozenset(
    {
        "acl", "cors", "delete", "lifecycle", "location", "logging", "notification", "partNumber",
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
    """Check a V2 presigned URL: AccessDenied when expired or valid too long (`check_time`),
    SignatureDoesNotMatch unless its HMAC-SHA1 matches."""
    check_time(signed, now)
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
    raw = to_sign.encode("utf-8", "surrogateescape")  # as the HTTP layer decoded it
    expected = hmac_sha1(secret, raw)
    if not hmac.compare_digest(expected, sigv4.signature_bytes(signed.signature)):
        raise s3errors.S3Error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
