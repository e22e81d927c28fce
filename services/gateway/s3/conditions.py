"""S3's conditional requests and ranges: If-Match, If-None-Match, If-(Un)Modified-Since (on an
object and on a copy's source), Range, x-amz-copy-source-range and partNumber."""

from __future__ import annotations

from collections.abc import Callable

from services.gateway import conditional, multipart, objectlayer
from services.gateway.s3 import params, s3errors, s3request, xmlio

#: Whether an If-Match / If-None-Match header names etag (or is *).
etag_matches = conditional.etag_named


def check_write_conditions(req: s3request.S3Request) -> None:
    """A write's (PutObject, CompleteMultipartUpload) If-None-Match and If-Match as AWS S3
    takes them: If-None-Match only as `*`, and not both at once; anything else is 501
    NotImplemented, as S3 answers, rather than ignored (docs/s3.md, "Conditional writes")."""
    if req.header("If-None-Match") not in ("", "*"):
        raise s3errors.S3Error("NotImplemented", "If-None-Match on a write supports only *")
    if req.header("If-None-Match") and req.header("If-Match"):
        raise s3errors.S3Error("NotImplemented", "If-Match and If-None-Match cannot be combined")


def _since(header: str) -> int | None:
    """An HTTP date in unix seconds (None when absent or unparsable: S3 ignores it)."""
    when = params.http_date(header) if header else None
    return None if when is None else int(when)


def _not_modified(etag: str, mtime_unix_ms: int) -> s3errors.S3Error:
    return s3errors.S3Error(
        "NotModified", "Not Modified", status=304,
        headers={"ETag": xmlio.quoted(etag), "Last-Modified": xmlio.http_time(mtime_unix_ms)},
    )  # fmt: skip


def check_conditions(
    get: Callable[[str], str], etag: str, mtime_unix_ms: int, *, for_read: bool
) -> None:
    """S3's conditional request rules (412 PreconditionFailed, 304 NotModified: with the
    object's ETag and Last-Modified, as S3 sends them)."""
    mtime = mtime_unix_ms // 1000
    if_match, if_none = get("If-Match"), get("If-None-Match")
    unmodified, modified = _since(get("If-Unmodified-Since")), _since(get("If-Modified-Since"))
    if if_match and not etag_matches(if_match, etag):
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")
    if not if_match and unmodified is not None and mtime > unmodified:
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")
    if if_none and etag_matches(if_none, etag):
        if for_read:
            raise _not_modified(etag, mtime_unix_ms)
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")
    if not if_none and modified is not None and mtime <= modified:
        if for_read:
            raise _not_modified(etag, mtime_unix_ms)
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of a single `bytes=` range; None for no or an ignorable range (several
    ranges, another unit, anything but ASCII digits) and for a suffix range of an empty object
    (all of it); InvalidRange when it cannot be satisfied (any other range of an empty object,
    as in S3)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_text, _, last_text = header[len("bytes=") :].strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if first_text == "":
        suffix = params.uint(last_text)
        if suffix is None:
            return None
        if suffix == 0:
            raise s3errors.S3Error("InvalidRange", "The requested range is not satisfiable")
        return (max(0, size - suffix), size - 1) if size else None
    first = params.uint(first_text)
    last = params.uint(last_text) if last_text else size - 1
    if first is None or last is None:
        return None
    if first >= size:
        raise s3errors.S3Error("InvalidRange", "The requested range is not satisfiable")
    if first > last:
        return None
    return first, min(last, size - 1)


def parse_copy_range(header: str, size: int) -> tuple[int, int]:
    """(first, last) of x-amz-copy-source-range `bytes=first-last` over a source of size
    bytes: InvalidArgument unless both are ASCII digits and first <= last, InvalidRange when
    last is past the source's end."""
    unit, _, span = header.partition("=")
    first_text, _, last_text = span.partition("-")
    first, last = params.uint(first_text), params.uint(last_text)
    if unit != "bytes" or first is None or last is None or first > last:
        raise s3errors.S3Error("InvalidArgument", "The x-amz-copy-source-range is invalid")
    if last >= size:
        raise s3errors.S3Error("InvalidRange", "The requested range is not satisfiable")
    return first, last


def requested_part(
    req: s3request.S3Request, reader: objectlayer.ObjectReader
) -> tuple[int, int] | None:
    """(first, last) byte of the part GetObject/HeadObject's `partNumber` names (last is
    first - 1 for an empty part); None without partNumber. InvalidArgument outside 1..10000,
    InvalidRequest with a Range header too, 416 InvalidPartNumber past the last part (part 1
    of a plain object is all of it; the reader's part_span counts the parts)."""
    if "partNumber" not in req.query:
        return None
    number = params.uint(req.query["partNumber"])
    if number is None or not 1 <= number <= multipart.MAX_PART_NUMBER:
        raise s3errors.S3Error(
            "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
        )
    if "Range" in req.http.headers:
        raise s3errors.S3Error(
            "InvalidRequest", "Cannot specify both Range header and partNumber query parameter"
        )
    span = reader.part_span(number)
    if span is None:
        raise s3errors.S3Error(
            "InvalidPartNumber", "The requested partnumber is not satisfiable", status=416
        )
    return span[0], span[0] + span[1] - 1
