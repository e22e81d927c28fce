"""Signature Version 2 presigned URLs (what boto3's `generate_presigned_url` makes unless told
to use s3v4): HMAC-SHA1 over the method, Content-MD5, Content-Type, Expires, x-amz-* headers and
the resource with its sub-resources. Only presigned URLs: V2 Authorization headers are refused
(no current SDK sends them). Signature V4 lives in `sigv4`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from services.gateway.s3 import s3errors

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
        raise s3errors.S3Error("AccessDenied", "a presigned URL needs Expires")
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
        raise s3errors.S3Error("AccessDenied", "Request has expired")
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
        raise s3errors.S3Error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
