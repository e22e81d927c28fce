"""Unit tests of kvtier.errors: codes of every domain error and the status round-trip."""

from __future__ import annotations

import grpc
import pytest

from kvtier import errors

ALL_ERRORS: list[type[errors.KVTierError]] = [
    errors.NotFound,
    errors.AlreadyExists,
    errors.PreconditionFailed,
    errors.InvalidArgument,
    errors.Overloaded,
    errors.QuotaExceeded,
    errors.Unavailable,
    errors.Corrupt,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.DeadlineExceeded,
    errors.Internal,
    errors.StaleEpoch,
]


def rpc_error(
    code: grpc.StatusCode, details: str | None, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    """A failed call as a grpc.aio client sees it."""
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailing),
        details=details,
    )


def as_seen_by_client(error: errors.KVTierError) -> grpc.aio.AioRpcError:
    """What the server interceptor sends for `error`: its code, message and trailing metadata."""
    return rpc_error(error.grpc_code, error.message, errors.trailing_metadata(error))


def test_every_domain_error_is_listed() -> None:
    assert set(errors.KVTierError.__subclasses__()) == set(ALL_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_error_has_codes(cls: type[errors.KVTierError]) -> None:
    assert isinstance(cls.grpc_code, grpc.StatusCode)
    assert cls.grpc_code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
    assert cls.s3_code
    assert cls.s3_code.isalnum()
    assert 400 <= cls.http_status <= 599
    assert isinstance(cls.retryable, bool)


@pytest.mark.parametrize(
    ("cls", "grpc_code", "s3_code", "http_status", "retryable"),
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, "NoSuchKey", 404, False),
        (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "SlowDown", 503, True),
        (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "QuotaExceeded", 403, False),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "ServiceUnavailable", 503, True),
        (errors.StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION, "ServiceUnavailable", 503, True),
        (errors.Corrupt, grpc.StatusCode.DATA_LOSS, "InternalError", 500, False),
        (errors.Internal, grpc.StatusCode.INTERNAL, "InternalError", 500, False),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "AccessDenied", 403, False),
    ],
)
def test_selected_codes(
    cls: type[errors.KVTierError],
    grpc_code: grpc.StatusCode,
    s3_code: str,
    http_status: int,
    retryable: bool,
) -> None:
    assert (cls.grpc_code, cls.s3_code, cls.http_status, cls.retryable) == (
        grpc_code,
        s3_code,
        http_status,
        retryable,
    )


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_default_message_is_the_class_name_or_more(cls: type[errors.KVTierError]) -> None:
    error = cls()
    assert error.message
    assert str(error) == error.message


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_round_trip_through_trailing_metadata(cls: type[errors.KVTierError]) -> None:
    sent = cls(f"{cls.__name__}: object b/k is busy")

    received = errors.from_rpc_error(as_seen_by_client(sent))

    assert type(received) is cls
    assert received.message == sent.message


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_the_reason_travels_with_the_error(cls: type[errors.KVTierError]) -> None:
    sent = cls("bucket b does not exist", reason="NoSuchBucket")

    received = errors.from_rpc_error(as_seen_by_client(sent))

    assert type(received) is cls
    assert received.reason == "NoSuchBucket"
    assert received.message == "bucket b does not exist"
    assert errors.from_rpc_error(as_seen_by_client(cls("x"))).reason == ""


def test_trailing_metadata_names_the_class() -> None:
    assert errors.trailing_metadata(errors.NotFound("x")) == (("x-kvtier-error", "NotFound"),)


def test_stale_epoch_carries_the_current_epoch() -> None:
    sent = errors.StaleEpoch(current_epoch=42)
    assert dict(errors.trailing_metadata(sent))[errors.EPOCH_KEY] == "42"
    assert "42" in sent.message

    received = errors.from_rpc_error(as_seen_by_client(sent))

    assert isinstance(received, errors.StaleEpoch)
    assert received.current_epoch == 42
    assert received.message == sent.message


def test_stale_epoch_without_epoch_key_defaults_to_zero() -> None:
    received = errors.from_rpc_error(
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "stale", (("x-kvtier-error", "StaleEpoch"),))
    )
    assert isinstance(received, errors.StaleEpoch)
    assert received.current_epoch == 0


def test_overloaded_and_quota_share_a_code_but_map_back_apart() -> None:
    for cls in (errors.Overloaded, errors.QuotaExceeded):
        assert type(errors.from_rpc_error(as_seen_by_client(cls("full")))) is cls


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.PreconditionFailed),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.OUT_OF_RANGE, errors.InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.CANCELLED, errors.Unavailable),
        (grpc.StatusCode.DATA_LOSS, errors.Corrupt),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_status_without_kind_maps_by_code(
    code: grpc.StatusCode, cls: type[errors.KVTierError]
) -> None:
    received = errors.from_rpc_error(rpc_error(code, "from grpc itself"))
    assert type(received) is cls
    assert received.message == "from grpc itself"


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ABORTED],
)
def test_unknown_code_maps_to_internal(code: grpc.StatusCode) -> None:
    assert type(errors.from_rpc_error(rpc_error(code, "odd"))) is errors.Internal


def test_unknown_kind_falls_back_to_the_code() -> None:
    received = errors.from_rpc_error(
        rpc_error(grpc.StatusCode.NOT_FOUND, "gone", (("x-kvtier-error", "NoSuchThing"),))
    )
    assert type(received) is errors.NotFound


def test_kind_wins_over_the_code() -> None:
    received = errors.from_rpc_error(
        rpc_error(grpc.StatusCode.UNAVAILABLE, "busy", (("x-kvtier-error", "Overloaded"),))
    )
    assert type(received) is errors.Overloaded


def test_missing_details_fall_back_to_the_code_name() -> None:
    received = errors.from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, None))
    assert received.message == "NOT_FOUND"


def test_binary_metadata_is_ignored() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(("x-trace-bin", b"\x00\x01")),
        details="gone",
    )
    assert type(errors.from_rpc_error(error)) is errors.NotFound


def test_malformed_epoch_still_maps_to_stale_epoch() -> None:
    received = errors.from_rpc_error(
        rpc_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "stale",
            (("x-kvtier-error", "StaleEpoch"), ("x-kvtier-epoch", "abc")),
        )
    )
    assert isinstance(received, errors.StaleEpoch)


def test_clock_skew_is_unavailable_and_maps_back_as_itself() -> None:
    """A datanode's refusal of a stamp beyond its skew bound reaches the gateway typed (it is
    an Unavailable: 503 to S3 clients, who may retry at another gateway)."""
    sent = errors.ClockSkew("mtime 1900 s ahead of this drive's clock")
    received = errors.from_rpc_error(as_seen_by_client(sent))
    assert type(received) is errors.ClockSkew
    assert isinstance(received, errors.Unavailable)
    assert (received.grpc_code, received.http_status) == (grpc.StatusCode.UNAVAILABLE, 503)


def test_storage_full_is_unavailable_and_maps_back_as_itself() -> None:
    """A full drive's refusal reaches the gateway typed (503, retryable), not as Internal."""
    sent = errors.StorageFull("drive full: No space left on device")
    received = errors.from_rpc_error(as_seen_by_client(sent))
    assert type(received) is errors.StorageFull
    assert isinstance(received, errors.Unavailable)
    assert (received.grpc_code, received.http_status) == (grpc.StatusCode.UNAVAILABLE, 503)
