"""Fuzzing the S3 front's range and condition headers (`object_ops`, `params`).

Properties: `parse_range` (Range), `parse_copy_range` (x-amz-copy-source-range),
`check_conditions` (If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since and their
x-amz-copy-source-if-* twins) and `copy_source` (x-amz-copy-source) raise nothing but
`s3errors.S3Error`; a range they accept lies inside the object; a condition either passes or is
a 304 or a 412; `params.uint` accepts ASCII digits only and `params.http_date` never raises.
"""

from __future__ import annotations

import contextlib
import email.utils
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from services.gateway.s3 import object_ops, params, s3errors
from tests.fuzz import _support

LIMIT = 256 * _support.KIB


@st.composite
def ranges(draw: st.DrawFn) -> str:
    """Range headers: `bytes=first-last` with numbers of any kind, or anything."""
    number = st.one_of(_support.digits_like(), st.just(""))
    spec = f"{draw(number)}{draw(st.sampled_from(['-', '--', '', ' - ']))}{draw(number)}"
    unit = draw(st.sampled_from(["bytes=", "bytes= ", "Bytes=", "items=", ""]))
    extra = draw(st.sampled_from(["", ",0-1", ", 5-", ";x"]))
    return draw(st.one_of(st.just(unit + spec + extra), _support.http_text()))


sizes = st.one_of(st.integers(min_value=0, max_value=1 << 40), st.sampled_from([0, 1, 100]))


@given(header=ranges(), size=sizes)
@_support.budget()
def test_ranges_are_inside_the_object_or_refused(header: str, size: int) -> None:
    with _support.bounded_memory(LIMIT):
        span, error = _support.attempt(
            lambda: object_ops.parse_range(header, size), s3errors.S3Error
        )
    if isinstance(error, s3errors.S3Error):
        assert (error.code, error.status) == ("InvalidRange", 416)
    elif span is not None:  # never a span of an empty object
        first, last = span
        assert 0 <= first <= last < size


@given(header=ranges(), size=sizes)
@_support.budget()
def test_copy_source_ranges_are_inside_the_source_or_refused(header: str, size: int) -> None:
    with _support.bounded_memory(LIMIT):
        span, error = _support.attempt(
            lambda: object_ops.parse_copy_range(header, size), s3errors.S3Error
        )
    if isinstance(error, s3errors.S3Error):
        assert error.code in ("InvalidArgument", "InvalidRange")
    else:
        assert span is not None
        assert 0 <= span[0] <= span[1] < size


def dates() -> st.SearchStrategy[str]:
    """HTTP dates, real (any year, any zone) and broken."""
    real = st.builds(
        lambda stamp, zone: email.utils.formatdate(stamp).replace("-0000", zone),
        st.floats(min_value=-1e10, max_value=2.5e11, allow_nan=False),
        st.sampled_from(["-0000", "GMT", "+2359", "-2359", "UT", "XYZ"]),
    )
    odd = st.sampled_from(
        ["Fri, 31 Dec 9999 23:59:59 -2359", "1 Jan 99999999999 00:00:00 GMT", "Mon, 1 Jan 1",
         "Tue, 30 Feb 2026 25:61:61 GMT", "0", ""]
    )  # fmt: skip
    return st.one_of(real, odd, _support.http_text())


etag_lists = st.one_of(
    st.lists(st.sampled_from(['"abc"', "abc", 'W/"abc"', "*", '"x"', ""]), max_size=4).map(
        ", ".join
    ),
    _support.http_text(),
)


@given(
    headers=st.fixed_dictionaries(
        {},
        optional={
            "If-Match": etag_lists,
            "If-None-Match": etag_lists,
            "If-Modified-Since": dates(),
            "If-Unmodified-Since": dates(),
        },
    ),
    mtime_ms=st.integers(min_value=0, max_value=1 << 45),
    for_read=st.booleans(),
)
@_support.budget()
def test_conditions_pass_or_are_304_or_412(
    headers: dict[str, str], mtime_ms: int, for_read: bool
) -> None:
    with _support.bounded_memory(LIMIT):
        _, error = _support.attempt(
            lambda: object_ops.check_conditions(
                lambda name: headers.get(name, ""), "abc", mtime_ms, for_read=for_read
            ),
            s3errors.S3Error,
        )
    if isinstance(error, s3errors.S3Error):
        assert error.status in ((304, 412) if for_read else (412,))


@given(text=st.one_of(dates(), _support.digits_like()))
@_support.budget()
def test_dates_and_numbers_parse_or_are_none(text: str) -> None:
    when = params.http_date(text)
    assert when is None or -62135596800 <= when < 253402300800
    number = params.uint(text)
    assert number is None or (text.isascii() and text.isdigit() and number == int(text))


@given(
    source=st.one_of(
        _support.http_text(), st.builds("/{}/{}?{}".format, *[_support.http_text(16)] * 3)
    )
)
@_support.budget()
def test_copy_sources_parse_or_are_refused(source: str) -> None:
    request = mock.Mock()
    request.header = lambda name, default="": source if name == "x-amz-copy-source" else default
    with _support.bounded_memory(LIMIT), contextlib.suppress(s3errors.S3Error):
        bucket, key, _version = object_ops.copy_source(request)
        assert bucket
        assert key
