"""A deadline inside the cluster is the service's fault: S3 503 ServiceUnavailable, not 400
RequestTimeout (which tells the client its own socket went quiet). Found by the fault suite:
a gateway partitioned from the metadata service answered CreateBucket with 400 RequestTimeout
(tests/fault/test_partitions.py)."""

from __future__ import annotations

from kvtier import errors
from services.gateway.s3 import s3errors


def test_a_backend_deadline_is_service_unavailable() -> None:
    mapped = s3errors.from_domain(errors.DeadlineExceeded("metadata-1: deadline exceeded"))
    assert (mapped.code, mapped.status) == ("ServiceUnavailable", 503)
    assert mapped.message == "metadata-1: deadline exceeded"


def test_other_retryable_errors_keep_their_codes() -> None:
    assert s3errors.from_domain(errors.Unavailable("x")).status == 503
    assert s3errors.from_domain(errors.Overloaded("x")).code == "SlowDown"
