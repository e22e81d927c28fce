"""S3 errors: the code, HTTP status and message of every error the S3 front returns, and the
translation of kvtier's domain errors into them.

Domain errors name a precise S3 code in their `reason` (`errors.KVTierError.reason`: set where
they are raised, carried over gRPC); otherwise the error class's own S3 code applies.
"""

from __future__ import annotations

from kvtier import errors

#: S3 error code -> HTTP status.
STATUS: dict[str, int] = {
    "AccessControlListNotSupported": 400,
    "AccessDenied": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BadDigest": 400,
    "BucketAlreadyExists": 409,
    "BucketAlreadyOwnedByYou": 409,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketAclWithObjectOwnership": 400,
    "InvalidBucketName": 400,
    "InvalidChunkSizeError": 400,
    "InvalidLocationConstraint": 400,
    "InvalidURI": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidPolicyDocument": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedACLError": 400,
    "MalformedPOSTRequest": 400,
    "MalformedXML": 400,
    "MalformedTrailerError": 400,
    "MaxPostPreDataLengthExceeded": 400,
    "MetadataTooLarge": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "MissingSecurityHeader": 400,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchTagSet": 404,
    "NoSuchUpload": 404,
    "NoSuchVersion": 404,
    "NotModified": 304,
    "OwnershipControlsNotFoundError": 404,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "ConditionalRequestConflict": 409,
    "QuotaExceeded": 403,
    "RequestTimeTooSkewed": 403,
    "RequestTimeout": 400,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "UnexpectedContent": 400,
    "UnresolvableGrantByEmailAddress": 400,
    "XAmzContentSHA256Mismatch": 400,
}


class S3Error(Exception):
    """An error as S3 reports it. `resource` is the path it concerns (Resource element);
    `headers` go out with it (a 304's ETag and Last-Modified)."""

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        status: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or code)
        self.code = code
        self.status = status or STATUS.get(code, 500)
        self.message = message or code
        self.headers = dict(headers or {})


def from_domain(exc: errors.KVTierError, *, default_not_found: str = "NoSuchKey") -> S3Error:
    """The S3 error of a domain error: its reason when that is an S3 code, else by class."""
    text = exc.message
    if exc.reason in STATUS:
        return S3Error(exc.reason, text)
    if isinstance(exc, errors.NotFound):
        return S3Error(default_not_found, text)
    if isinstance(exc, errors.AlreadyExists):
        return S3Error("BucketAlreadyExists", text)
    if isinstance(exc, errors.DeadlineExceeded):
        # A call inside the cluster (the metadata service, a datanode) ran out of time: the
        # service's fault, a 503 to retry, not S3's RequestTimeout (400: the client's socket
        # went quiet, which the body reader reports itself).
        return S3Error("ServiceUnavailable", text)
    return S3Error(exc.s3_code, text, status=exc.http_status)
