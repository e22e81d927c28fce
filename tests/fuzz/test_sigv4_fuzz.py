"""Fuzzing SigV4 (Authorization header and presigned URLs) and V2 presigned URLs.

Properties: `sigv4.parse` and `sigv4.verify` raise nothing but `sigv4.S3AuthError`, and
`presign_v2` nothing but `s3errors.S3Error`, whatever the method, path, query and headers (text
as aiohttp decodes it); a request signed with the secret verifies, and keeps verifying through
no change to its signature; a signature in any script is a 403 SignatureDoesNotMatch; a V2 URL
is accepted only until its Expires and at most 7 days ahead; one check allocates at most 1 MiB.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import urllib.parse
from collections.abc import Sequence

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from services.gateway.s3 import presign_v2, s3errors, sigv4
from tests.fuzz import _support

ACCESS = "AKIAFUZZ"
SECRET = "fuzz/secret+KEY"
NOW = 1767323045.0  # 2026-01-02T03:04:05Z
AMZ_DATE = "20260102T030405Z"
CREDENTIAL = f"{ACCESS}/20260102/us-east-1/s3/aws4_request"
EMPTY = hashlib.sha256(b"").hexdigest()
LIMIT = 1 * _support.MIB

Headers = list[tuple[str, str]]

# --- strategies ---

_HEADER_NAMES = [
    "Authorization", "x-amz-date", "Date", "x-amz-content-sha256", "Host",
    "x-amz-decoded-content-length", "x-amz-trailer", "x-amz-security-token", "x-amz-meta-a",
    "Range", "Content-Type",
]  # fmt: skip
_QUERY_NAMES = [
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date",
    "X-Amz-SignedHeaders", "X-Amz-Expires", "X-Amz-Security-Token", "X-Amz-Content-Sha256",
    "prefix", "uploadId", "partNumber",
]  # fmt: skip
_PAYLOADS = [p.value for p in sigv4.PayloadMode if p is not sigv4.PayloadMode.SHA256]


def _near_valid(name: str) -> st.SearchStrategy[str]:
    """Values that pass some checks of a header or parameter called name."""
    fields = st.lists(
        st.tuples(
            st.sampled_from(["Credential", "SignedHeaders", "Signature", "Other", ""]),
            st.one_of(st.just(CREDENTIAL), st.just("host;x-amz-date"), _support.http_text(80)),
        ),
        max_size=5,
    ).map(lambda items: ",".join(f"{k}={v}" for k, v in items))
    known: dict[str, st.SearchStrategy[str]] = {
        "authorization": st.builds(
            lambda algorithm, rest: f"{algorithm} {rest}",
            st.sampled_from([sigv4.ALGORITHM, "AWS", "AWS4-HMAC-SHA1"]),
            fields,
        ),
        "x-amz-date": st.sampled_from([AMZ_DATE, "20260102T030405", "99991231T235959Z"]),
        "x-amz-algorithm": st.just(sigv4.ALGORITHM),
        "x-amz-credential": st.just(CREDENTIAL),
        "date": st.sampled_from(
            ["Fri, 02 Jan 2026 03:04:05 GMT", "Fri, 31 Dec 9999 23:59:59 -2359", "1 Jan 99999 x"]
        ),
        "x-amz-content-sha256": st.sampled_from([EMPTY, *_PAYLOADS]),
        "x-amz-decoded-content-length": _support.digits_like(),
        "x-amz-expires": _support.digits_like(),
        "x-amz-signedheaders": st.sampled_from(["host", "host;x-amz-date", ";;", ""]),
    }
    return st.one_of(known.get(name.lower(), _support.http_text()), _support.http_text())


@st.composite
def headers(draw: st.DrawFn) -> Headers:
    """A request's headers: known names with near-valid or arbitrary values, and others."""
    names = draw(
        st.lists(st.one_of(st.sampled_from(_HEADER_NAMES), _support.http_text(16)), max_size=8)
    )
    return [(name, draw(_near_valid(name))) for name in names]


@st.composite
def queries(draw: st.DrawFn) -> str:
    """A raw query string: presign parameters and others, encoded or not."""
    names = draw(
        st.lists(st.one_of(st.sampled_from(_QUERY_NAMES), _support.http_text(16)), max_size=8)
    )
    items = []
    for name in names:
        value = draw(_near_valid(name))
        if draw(st.booleans()):
            raw = value.encode("utf-8", "surrogateescape")
            value = urllib.parse.quote(raw, safe=draw(st.sampled_from(["", "/", "=&+%"])))
        items.append(f"{name}={value}" if draw(st.booleans()) else name)
    return "&".join(items)


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """text with one edit: a character replaced, inserted or deleted, or cut short."""
    if not text:
        return draw(_support.http_text(4))
    at = draw(st.integers(min_value=0, max_value=len(text) - 1))
    char = draw(st.one_of(_support.UNICODE, st.sampled_from(list("=&,;/ %+\r\n\udcff"))))
    op = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
    if op == "replace":
        return text[:at] + char + text[at + 1 :]
    if op == "insert":
        return text[:at] + char + text[at:]
    if op == "delete":
        return text[:at] + text[at + 1 :]
    return text[:at]


safe_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=24)

# --- signing with the module itself (real signers are checked in tests/unit/test_sigv4.py) ---


def _parse(method: str, raw_path: str, raw_query: str, heads: Headers) -> sigv4.AuthRequest:
    auth = sigv4.parse(method=method, raw_path=raw_path, raw_query=raw_query, headers=heads)
    assert auth is not None
    return auth


def _signature(auth: sigv4.AuthRequest) -> str:
    return sigv4.sign(sigv4.signing_key(SECRET, auth.day, auth.region), auth.string_to_sign)


def header_signed(method: str, raw_path: str, raw_query: str, extra: Headers) -> Headers:
    """Headers that sign the request with SECRET in an Authorization header."""
    heads = [("Host", "h:9"), ("x-amz-date", AMZ_DATE), ("x-amz-content-sha256", EMPTY), *extra]
    names = ";".join(sorted({name.lower() for name, _ in heads}))
    prefix = f"{sigv4.ALGORITHM} Credential={CREDENTIAL},SignedHeaders={names},Signature="
    placeholder = ("Authorization", prefix + "0" * 64)
    signature = _signature(_parse(method, raw_path, raw_query, [*heads, placeholder]))
    return [*heads, ("Authorization", prefix + signature)]


def presigned(method: str, raw_path: str, raw_query: str, expires_s: int = 600) -> str:
    """raw_query with the X-Amz-* parameters that presign the request with SECRET."""
    params = {
        "X-Amz-Algorithm": sigv4.ALGORITHM,
        "X-Amz-Credential": CREDENTIAL,
        "X-Amz-Date": AMZ_DATE,
        "X-Amz-Expires": str(expires_s),
        "X-Amz-SignedHeaders": "host",
        "X-Amz-Signature": "",
    }
    query = "&".join(filter(None, (raw_query, urllib.parse.urlencode(params))))
    signature = _signature(_parse(method, raw_path, query, [("Host", "h:9")]))
    return query + signature


def _check(method: str, raw_path: str, raw_query: str, heads: Sequence[tuple[str, str]]) -> bool:
    """parse + verify at NOW under the memory bound: whether the request verified (only
    S3AuthError may escape as a refusal)."""
    with _support.bounded_memory(LIMIT), contextlib.suppress(sigv4.S3AuthError):
        auth = sigv4.parse(
            method=method, raw_path=raw_path, raw_query=raw_query, headers=list(heads)
        )
        if auth is not None:
            sigv4.verify(auth, SECRET, now=NOW)
            return True
    return False


def _no_presign(query: str) -> str:
    """A query of the request itself: no X-Amz-* parameter of a presigned URL in it."""
    while "X-Amz-" in query:
        query = query.replace("X-Amz-", "")
    return query


methods = st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE"])
paths = st.one_of(_support.http_text(), safe_text.map(lambda t: "/b/" + t))

# --- SigV4 ---


@given(method=methods, raw_path=paths, raw_query=queries(), heads=headers())
@_support.budget(2)
def test_arbitrary_requests_are_refused_with_s3_errors(
    method: str, raw_path: str, raw_query: str, heads: Headers
) -> None:
    _check(method, raw_path, raw_query, heads)


@given(method=methods, key=safe_text, query=safe_text, meta=safe_text, data=st.data())
@_support.budget()
def test_header_signed_requests_verify_and_mutations_are_refused(
    method: str, key: str, query: str, meta: str, data: st.DataObject
) -> None:
    raw_path = "/b/" + urllib.parse.quote(key)
    raw_query = urllib.parse.quote(_no_presign(query), safe="=&")
    heads = header_signed(method, raw_path, raw_query, [("x-amz-meta-m", meta)])
    assert _check(method, raw_path, raw_query, heads)
    index = data.draw(st.integers(min_value=0, max_value=len(heads) - 1))
    name, value = heads[index]
    changed = data.draw(mutated(value))
    heads[index] = (name, changed)
    verified = _check(method, raw_path, raw_query, heads)
    signature = value.rpartition("Signature=")[2]
    if name == "Authorization" and signature not in changed:
        assert not verified, "a changed signature verified"
    _check(data.draw(mutated(method)), data.draw(mutated(raw_path)), raw_query, heads)
    _check(method, raw_path, data.draw(mutated(raw_query)), heads)


@given(method=methods, key=safe_text, query=safe_text, data=st.data())
@_support.budget()
def test_presigned_urls_verify_and_mutations_are_refused(
    method: str, key: str, query: str, data: st.DataObject
) -> None:
    raw_path = "/b/" + urllib.parse.quote(key)
    raw_query = presigned(method, raw_path, urllib.parse.quote(_no_presign(query), safe="="))
    assert _check(method, raw_path, raw_query, [("Host", "h:9")])
    changed = data.draw(mutated(raw_query))
    verified = _check(method, raw_path, changed, [("Host", "h:9")])
    signature = raw_query.rpartition("X-Amz-Signature=")[2]
    if not changed.endswith(signature) and "X-Amz-Signature=" + signature not in changed:
        assert not verified, "a changed signature verified"


@given(signature=st.one_of(st.text(_support.UNICODE, max_size=80), _support.http_text(80)))
@_support.budget()
def test_a_signature_in_any_script_is_a_403(signature: str) -> None:
    signature = signature.strip()
    assume("," not in signature)
    heads = header_signed("GET", "/b/k", "", [])
    name, value = heads[-1]
    heads[-1] = (name, value.rpartition("Signature=")[0] + "Signature=" + signature)
    query = presigned("GET", "/b/k", "").rpartition("X-Amz-Signature=")[0]
    quoted = urllib.parse.quote(signature.encode("utf-8", "surrogateescape"), safe="")
    for raw_query, sent in ((query + "X-Amz-Signature=" + quoted, [("Host", "h:9")]), ("", heads)):
        auth = _parse("GET", "/b/k", raw_query, sent)
        with pytest.raises(sigv4.S3AuthError) as refused:
            sigv4.verify(auth, SECRET, now=NOW)
        assert (refused.value.code, refused.value.status) == ("SignatureDoesNotMatch", 403)


# --- Signature Version 2 presigned URLs ---


def v2_signature(method: str, raw_path: str, expires: int, secret: str = SECRET) -> str:
    to_sign = f"{method}\n\n\n{expires}\n{raw_path}"
    digest = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _check_v2(
    query: dict[str, str], method: str, raw_path: str, heads: dict[str, str], now: float = NOW
) -> bool:
    """parse_v2 + verify_v2 under the memory bound: whether it verified."""
    with _support.bounded_memory(LIMIT), contextlib.suppress(s3errors.S3Error):
        signed = presign_v2.parse_v2(query)
        if signed is not None:
            presign_v2.verify_v2(
                signed, SECRET, method=method, raw_path=raw_path, query=query, headers=heads,
                now=now,
            )  # fmt: skip
            return True
    return False


v2_values = st.one_of(_support.digits_like(), _support.http_text())


@st.composite
def v2_queries(draw: st.DrawFn) -> dict[str, str]:
    """A V2 presigned query: its three parameters (now and then one missing), near-valid or
    not, among others."""
    expires = st.integers(int(NOW) - 3600, int(NOW) + 30 * 86400).map(str)
    query = draw(
        st.dictionaries(
            st.one_of(st.sampled_from(["uploadId", "acl"]), _support.http_text(12)), v2_values
        )
    )
    query["AWSAccessKeyId"] = draw(st.one_of(st.just(ACCESS), v2_values))
    query["Signature"] = draw(v2_values)
    query["Expires"] = draw(st.one_of(expires, v2_values))
    for name in draw(st.lists(st.sampled_from(["AWSAccessKeyId", "Signature", "Expires"]))):
        query.pop(name, None)
    return query


@given(
    query=v2_queries(),
    method=methods,
    raw_path=paths,
    heads=st.dictionaries(
        st.sampled_from(["Content-MD5", "Content-Type", "x-amz-meta-a", "X-Amz-Date"]),
        _support.http_text(),
    ),
)
@_support.budget()
def test_v2_arbitrary_queries_are_refused_with_s3_errors(
    query: dict[str, str], method: str, raw_path: str, heads: dict[str, str]
) -> None:
    _check_v2(query, method, raw_path, heads)


@given(
    method=methods,
    key=safe_text,
    offset_s=st.integers(min_value=-10 * 86400, max_value=30 * 86400),
    data=st.data(),
)
@_support.budget()
def test_v2_urls_verify_within_7_days_and_mutations_are_refused(
    method: str, key: str, offset_s: int, data: st.DataObject
) -> None:
    raw_path = "/b/" + urllib.parse.quote(key)
    expires = int(NOW) + offset_s
    signature = v2_signature(method, raw_path, expires)
    query = {"AWSAccessKeyId": ACCESS, "Expires": str(expires), "Signature": signature}
    in_time = 0 <= offset_s <= presign_v2.MAX_EXPIRES_S
    assert _check_v2(query, method, raw_path, {}) == in_time
    name = data.draw(st.sampled_from(sorted(query)))
    changed = dict(query, **{name: data.draw(mutated(query[name]))})
    verified = _check_v2(changed, method, raw_path, {})
    if changed["Signature"] != signature:
        assert not verified, "a changed V2 signature verified"


@given(signature=st.one_of(st.text(_support.UNICODE, max_size=40), _support.http_text(40)))
@_support.budget()
def test_a_v2_signature_in_any_script_is_a_403(signature: str) -> None:
    expires = int(NOW) + 60
    assume(signature != v2_signature("GET", "/b/k", expires))
    query = {"AWSAccessKeyId": ACCESS, "Expires": str(expires), "Signature": signature}
    signed = presign_v2.parse_v2(query)
    assert signed is not None
    with pytest.raises(s3errors.S3Error) as refused:
        presign_v2.verify_v2(
            signed, SECRET, method="GET", raw_path="/b/k", query=query, headers={}, now=NOW
        )
    assert (refused.value.code, refused.value.status) == ("SignatureDoesNotMatch", 403)


# --- Signature Version 2 Authorization headers ---

V2_DATE = "Fri, 02 Jan 2026 03:04:05 GMT"  # NOW


def _check_v2_header(method: str, raw_path: str, heads: Headers, now: float = NOW) -> bool:
    """parse_header + verify_header under the memory bound: whether it verified."""
    with _support.bounded_memory(LIMIT), contextlib.suppress(s3errors.S3Error):
        signed = presign_v2.parse_header(heads)
        presign_v2.verify_header(
            signed, SECRET, method=method, raw_path=raw_path, query={}, headers=heads, now=now
        )
        return True
    return False


def v2_header_signed(method: str, raw_path: str, extra: Headers) -> Headers:
    """Headers that sign the request with SECRET in a V2 Authorization header."""
    heads = [("Host", "h:9"), ("Date", V2_DATE), *extra]
    to_sign = presign_v2.string_to_sign(
        method=method, time_line=V2_DATE, raw_path=raw_path, query={}, headers=heads
    )
    signature = presign_v2.hmac_sha1(SECRET, to_sign).decode()
    return [*heads, ("Authorization", f"AWS {ACCESS}:{signature}")]


@given(method=methods, raw_path=paths, heads=headers(), auth=v2_values, data=st.data())
@_support.budget()
def test_v2_arbitrary_headers_are_refused_with_s3_errors(
    method: str, raw_path: str, heads: Headers, auth: str, data: st.DataObject
) -> None:
    authorization = data.draw(st.sampled_from([f"AWS {auth}", f"AWS {ACCESS}:{auth}", auth]))
    with_auth = [*heads, ("Authorization", authorization)]
    if presign_v2.is_header_v2(authorization):
        assert not _check_v2_header(method, raw_path, with_auth), "a foreign signature verified"


@given(
    method=methods,
    key=safe_text,
    meta=safe_text,
    skew_s=st.integers(min_value=-3600, max_value=3600),
    data=st.data(),
)
@_support.budget()
def test_v2_headers_verify_within_15_minutes_and_mutations_are_refused(
    method: str, key: str, meta: str, skew_s: int, data: st.DataObject
) -> None:
    raw_path = "/b/" + urllib.parse.quote(key)
    heads = v2_header_signed(method, raw_path, [("x-amz-meta-a", meta)])
    in_time = abs(skew_s) <= sigv4.MAX_SKEW_S
    assert _check_v2_header(method, raw_path, heads, now=NOW + skew_s) == in_time
    at = data.draw(st.integers(min_value=1, max_value=len(heads) - 1))  # V2 leaves Host out
    name, value = heads[at]
    changed = [*heads[:at], (name, data.draw(mutated(value))), *heads[at + 1 :]]
    # The access key is not signed (another key is another user's secret: `auth`), the rest is.
    before, after = (
        v.partition(":")[2] if name == "Authorization" else v for v in (value, changed[at][1])
    )
    if after.strip() != before.strip():
        assert not _check_v2_header(method, raw_path, changed), f"a changed {name} verified"
