"""Numbers and dates in S3 request parameters, headers and XML bodies, read strictly.

Client text never reaches `int()` or `datetime` unchecked: `int()` takes '²', '٣', '1_000' and
' 7', and raises ValueError past 4300 digits; `email.utils` dates overflow `datetime` or land
outside the years it can print. Each function answers None for what it does not accept, and the
caller chooses the S3 error (or ignores the value, as S3 does with a bad If-Modified-Since).
"""

from __future__ import annotations

import datetime
import email.utils

#: Digits of the largest number read: 19 keep every value below 2**63.
MAX_DIGITS = 19
#: Seconds since the epoch of 0001-01-01 and of 10000-01-01: the dates `datetime` can print.
_MIN_TIME = -62135596800.0
_MAX_TIME = 253402300800.0


def uint(text: str, *, max_digits: int = MAX_DIGITS) -> int | None:
    """The value of text when it is 1 to max_digits ASCII digits (leading zeros allowed),
    else None (no sign, space, underscore or other script's digits)."""
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def http_date(text: str) -> float | None:
    """An RFC 1123 / RFC 2822 date (If-Modified-Since, Date) in seconds since the epoch, or
    None when it does not parse or falls outside the years 1 to 9999. A date without a zone
    (or with -0000) is UTC."""
    try:
        stamp = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    when = stamp.timestamp()
    return when if _MIN_TIME <= when < _MAX_TIME else None
