"""The domain errors of kvtier, shared by services, clients and the S3 layer.

Every error carries its gRPC status code, its S3 error code and HTTP status, and whether a client
may retry it. Servers raise these; one interceptor (`kvtier.rpc`) turns them into gRPC statuses and
one function (`from_rpc_error`) turns statuses back into these exceptions on the client side.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

#: Trailing-metadata key that names the error class, so clients map back exactly.
ERROR_KIND_KEY = "x-kvtier-error"
#: Trailing-metadata key carrying the server's current cluster-map epoch with StaleEpoch.
EPOCH_KEY = "x-kvtier-epoch"
#: Trailing-metadata key carrying an error's reason (`KVTierError.reason`).
REASON_KEY = "x-kvtier-reason"


class KVTierError(Exception):
    """Base of every kvtier domain error."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    s3_code: ClassVar[str] = "InternalError"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, reason: str = "") -> None:
        super().__init__(message or type(self).__name__)
        #: The precise cause, in S3's error vocabulary where one applies ("NoSuchBucket",
        #: "BadDigest", "InvalidPart"...): the S3 front answers with it instead of the class's
        #: s3_code, and gRPC carries it in trailing metadata, so clients see it too. "": none.
        self.reason = reason

    @property
    def message(self) -> str:
        """The human-readable text of the error."""
        return str(self.args[0])


class NotFound(KVTierError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    s3_code = "NoSuchKey"
    http_status = 404


class AlreadyExists(KVTierError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    s3_code = "AlreadyExists"
    http_status = 409


class PreconditionFailed(KVTierError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    s3_code = "PreconditionFailed"
    http_status = 412


class InvalidArgument(KVTierError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    s3_code = "InvalidArgument"
    http_status = 400


class Overloaded(KVTierError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    s3_code = "SlowDown"
    http_status = 503
    retryable = True


class QuotaExceeded(KVTierError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    s3_code = "QuotaExceeded"
    http_status = 403


class Unavailable(KVTierError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    s3_code = "ServiceUnavailable"
    http_status = 503
    retryable = True


class Corrupt(KVTierError):
    grpc_code = grpc.StatusCode.DATA_LOSS
    s3_code = "InternalError"
    http_status = 500


class Unauthenticated(KVTierError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    s3_code = "InvalidAccessKeyId"
    http_status = 403


class PermissionDenied(KVTierError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    s3_code = "AccessDenied"
    http_status = 403


class DeadlineExceeded(KVTierError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    s3_code = "RequestTimeout"
    http_status = 400
    retryable = True


class Internal(KVTierError):
    grpc_code = grpc.StatusCode.INTERNAL


class StaleEpoch(KVTierError):
    """The caller's cluster-map epoch is older than the server's: refresh the map and retry."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    s3_code = "ServiceUnavailable"
    http_status = 503
    retryable = True

    def __init__(self, message: str = "", *, current_epoch: int = 0, reason: str = "") -> None:
        super().__init__(
            message or f"stale cluster-map epoch; current is {current_epoch}", reason=reason
        )
        self.current_epoch = current_epoch


class DigestMismatch(InvalidArgument):
    """A body's bytes do not match the MD5 or checksum its writer sent (S3: BadDigest).
    `algorithm` names which ("MD5", "SHA256", "CRC32"...), so a front can tell a signed
    payload hash apart without reading the message; over gRPC it arrives as InvalidArgument
    with the reason."""

    def __init__(
        self, message: str = "", *, algorithm: str = "", reason: str = "BadDigest"
    ) -> None:
        super().__init__(message, reason=reason)
        self.algorithm = algorithm


class ClockSkew(Unavailable):
    """A version stamp beyond the datanodes' bound on clock skew (the writing gateway's clock,
    or its hybrid logical clock, runs too far ahead of the drive's): the write is refused, so
    no version can win every later write. Fix the clocks; another gateway may take the write."""


class StorageFull(Unavailable):
    """A drive has no space left (ENOSPC, EDQUOT): the write is refused on that drive, the
    others go on; a write that then misses its quorum is refused whole (503, retryable: space
    may be freed or a pool added). `kvtier status` and the drive metrics show free space."""


_BY_NAME: dict[str, type[KVTierError]] = {
    cls.__name__: cls
    for cls in (
        NotFound,
        AlreadyExists,
        PreconditionFailed,
        InvalidArgument,
        Overloaded,
        QuotaExceeded,
        Unavailable,
        Corrupt,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Internal,
        StaleEpoch,
        StorageFull,
        ClockSkew,
    )
}

# Used when a status carries no kind (it came from grpc itself or a foreign server).
_BY_CODE: dict[grpc.StatusCode, type[KVTierError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: Corrupt,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Unavailable,
}


def trailing_metadata(error: KVTierError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a server sends with `error`."""
    meta: tuple[tuple[str, str], ...] = ((ERROR_KIND_KEY, type(error).__name__),)
    if isinstance(error, StaleEpoch):
        meta += ((EPOCH_KEY, str(error.current_epoch)),)
    if error.reason:
        meta += ((REASON_KEY, error.reason),)
    return meta


def from_rpc_error(error: grpc.aio.AioRpcError) -> KVTierError:
    """Translate a failed call back into the domain error the server raised."""
    meta = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
    details = error.details() or error.code().name
    cls = _BY_NAME.get(meta.get(ERROR_KIND_KEY, ""))
    reason = meta.get(REASON_KEY, "")
    if cls is StaleEpoch:
        raw = meta.get(EPOCH_KEY, "0")
        return StaleEpoch(details, current_epoch=int(raw) if raw.isdigit() else 0, reason=reason)
    if cls is None:
        cls = _BY_CODE.get(error.code(), Internal)
    return cls(details, reason=reason)
