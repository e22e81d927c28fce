"""Fuzzing the S3 XML request bodies (`services.gateway.s3.xmlio`): CompleteMultipartUpload,
Delete (DeleteObjects), CreateBucketConfiguration and VersioningConfiguration.

Properties: the parsers raise nothing but `s3errors.S3Error` on random bytes, on generated
documents (any declared encoding, byte order marks, UTF-16, DTDs and entities, comments, CDATA,
character references, namespaces) and on mutations of valid bodies; what they return is within
S3's limits; valid bodies round-trip; deep nesting, huge counts and entity tricks are refused
quickly, and a body never costs much more memory than its own size.
"""

from __future__ import annotations

import time
import xml.sax.saxutils
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.s3 import s3errors, xmlio
from tests.fuzz import _support

NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
PARSERS: dict[str, Callable[[bytes], object]] = {
    "complete": xmlio.parse_complete,
    "delete": xmlio.parse_delete,
    "location": xmlio.parse_location,
    "versioning": xmlio.parse_versioning,
}


def parse_all(body: bytes) -> None:
    """Every parser on body, under the memory bound; each result checked against S3's limits."""
    for name, parse in PARSERS.items():
        with _support.bounded_memory(_support.MIB + 2 * len(body)):
            result, error = _support.attempt(lambda: parse(body), s3errors.S3Error)  # noqa: B023
        if isinstance(error, s3errors.S3Error):
            assert error.status == 400, error
        else:
            check_result(name, result)


def check_result(name: str, result: object) -> None:
    if name == "complete":
        assert isinstance(result, list)
        assert 1 <= len(result) <= xmlio.MAX_PART_NUMBER
        for number, etag, sums in result:
            assert 1 <= number <= xmlio.MAX_PART_NUMBER
            assert isinstance(etag, str)
            assert isinstance(sums, dict)
    elif name == "delete":
        assert isinstance(result, tuple)
        quiet, keys = result
        assert isinstance(quiet, bool)
        assert 1 <= len(keys) <= xmlio.MAX_DELETE_KEYS
    elif name == "versioning":
        assert isinstance(result, tuple)
        status, mfa_delete = result
        assert status in ("", "Enabled", "Suspended")
        assert mfa_delete in ("", "Enabled", "Disabled")
    else:
        assert isinstance(result, str)


# --- generated documents ---

_TAGS = [
    "CompleteMultipartUpload", "Part", "PartNumber", "ETag", "ChecksumCRC32", "Delete",
    "Object", "Key", "Quiet", "CreateBucketConfiguration", "LocationConstraint", "a",
    "s3:Key", "x:Part",
]  # fmt: skip
_TEXTS = [
    "1", "10000", "10001", "0", "-1", "²", "٣", " 7 ", "99999999999999999999", "true",
    '"etag"', "&amp;", "&lt;", "&#x41;", "&#0;", "&#x110000;", "&undefined;", "<![CDATA[x]]>",
    "<!-- c -->", "<?pi x?>", "\r\n", "",
]  # fmt: skip
_PROLOGS = [
    b"", b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-8"?>',
    b'<?xml version="1.0" encoding="utf-16"?>', b'<?xml version="1.0" encoding="rot13"?>',
    b'<?xml version="1.0" encoding="idna"?>', b'<?xml version="1.0" encoding="no-such"?>',
    b'<?xml version="1.0" encoding="utf-7"?>', b'<?xml version="1.1"?>', b"\xef\xbb\xbf",
    b'<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">]>', b'<!DOCTYPE d SYSTEM "file:///etc/passwd">',
    b"<!doctype d>",
]  # fmt: skip
_ENCODINGS = ["utf-8", "utf-8", "utf-8", "utf-16", "utf-16-le", "utf-32", "latin-1"]


def _element(tag: str, children: list[str] | str, attributes: str) -> str:
    inner = children if isinstance(children, str) else "".join(children)
    return f"<{tag}{attributes}>{inner}</{tag}>"


texts = st.one_of(
    st.sampled_from(_TEXTS),
    st.text(_support.UNICODE, max_size=16).map(xml.sax.saxutils.escape),
    _support.digits_like(),
)
attributes = st.sampled_from(["", NS, ' xmlns:s3="u"', ' a="1"', " a='&amp;'", ' a="<"'])
elements = st.recursive(
    texts,
    lambda inner: st.builds(
        _element, st.sampled_from(_TAGS), st.lists(inner, max_size=4), attributes
    ),
    max_leaves=24,
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A document: a prolog, a root of a known or random name, and its encoding."""
    root = _element(
        draw(st.sampled_from(_TAGS)), draw(st.lists(elements, max_size=6)), draw(attributes)
    )
    encoding = draw(st.sampled_from(_ENCODINGS))
    text = root.encode(encoding, "xmlcharrefreplace")
    return draw(st.sampled_from(_PROLOGS)) + text


@given(body=st.one_of(st.binary(max_size=4096), documents()))
@_support.budget()
def test_random_bodies_are_refused_with_s3_errors(body: bytes) -> None:
    parse_all(body)


# --- valid bodies and their mutations ---


def complete_body(parts: list[tuple[int, str]]) -> bytes:
    items = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{xml.sax.saxutils.escape(e)}</ETag></Part>"
        for n, e in parts
    )
    return f"<CompleteMultipartUpload{NS}>{items}</CompleteMultipartUpload>".encode()


def delete_body(quiet: bool, keys: list[str]) -> bytes:
    items = "".join(f"<Object><Key>{xml.sax.saxutils.escape(k)}</Key></Object>" for k in keys)
    return f"<Delete{NS}><Quiet>{str(quiet).lower()}</Quiet>{items}</Delete>".encode()


# What XML 1.0 carries as it is: no control characters, and no CR (it becomes LF).
xml_chars = st.characters(
    exclude_categories=["Cs", "Cc"], exclude_characters="\ufffe\uffff", include_characters="\t\n"
)
etags = st.text(xml_chars, max_size=40).filter(lambda e: e == e.strip().strip('"'))
part_lists = st.lists(
    st.tuples(st.integers(min_value=1, max_value=xmlio.MAX_PART_NUMBER), etags),
    min_size=1,
    max_size=20,
)
key_lists = st.lists(st.text(xml_chars, max_size=30), min_size=1, max_size=20)


@given(parts=part_lists, quiet=st.booleans(), keys=key_lists)
@_support.budget()
def test_valid_bodies_round_trip(
    parts: list[tuple[int, str]], quiet: bool, keys: list[str]
) -> None:
    assert xmlio.parse_complete(complete_body(parts)) == [(n, e, {}) for n, e in parts]
    assert xmlio.parse_delete(delete_body(quiet, keys)) == (quiet, keys)
    location = f"<CreateBucketConfiguration{NS}><LocationConstraint>eu-1</LocationConstraint>"
    assert xmlio.parse_location((location + "</CreateBucketConfiguration>").encode()) == "eu-1"
    versioning = f"<VersioningConfiguration{NS}><Status>Suspended</Status>"
    assert xmlio.parse_versioning((versioning + "</VersioningConfiguration>").encode()) == (
        "Suspended", "",
    )  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """body with a few edits: bytes flipped, inserted (markup among them) or deleted, a range
    repeated, or the end cut."""
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=max(0, len(body) - 1)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        if op == "flip" and body:
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
        elif op == "insert":
            token = draw(st.sampled_from([*_PROLOGS, b"<", b">", b"&", b"\x00", b"<Part>"]))
            body = body[:at] + token + body[at:]
        elif op == "delete":
            body = body[:at] + body[at + 1 :]
        elif op == "repeat":
            end = draw(st.integers(min_value=at, max_value=len(body)))
            body = body[:end] + body[at:end] * draw(st.integers(1, 50)) + body[end:]
        else:
            body = body[:at]
    return body


@given(parts=part_lists, quiet=st.booleans(), keys=key_lists, data=st.data())
@_support.budget()
def test_mutated_bodies_are_refused_with_s3_errors(
    parts: list[tuple[int, str]], quiet: bool, keys: list[str], data: st.DataObject
) -> None:
    parse_all(data.draw(mutated(complete_body(parts))))
    parse_all(data.draw(mutated(delete_body(quiet, keys))))


# --- the limits: nesting, counts, entities (not generated: these are large) ---

LIMIT_S = 5.0  # each of these takes 0.1-0.4 s on a 2-vCPU machine


def refused(body: bytes, parse: Callable[[bytes], object] = xmlio.parse_delete) -> str:
    """The MalformedXML message of body, refused fast (timed untraced: tracemalloc slows the
    parser down) and in little more than its size."""
    started = time.perf_counter()
    with pytest.raises(s3errors.S3Error) as caught:
        parse(body)
    assert time.perf_counter() - started < LIMIT_S
    assert caught.value.code == "MalformedXML"
    with _support.bounded_memory(4 * _support.MIB + len(body)), pytest.raises(s3errors.S3Error):
        parse(body)
    return caught.value.message


def test_deep_nesting_is_refused() -> None:
    depth = xmlio.MAX_BODY_BYTES // 8
    assert "deep" in refused(b"<a>" * depth + b"</a>" * depth)
    assert "deep" in refused(b"<Delete>" + b"<Object>" * 20 + b"</Object>" * 20 + b"</Delete>")


@pytest.mark.parametrize(
    ("body", "parse"),
    [
        (b"<Delete>" + b"<a/>" * (xmlio.MAX_BODY_BYTES // 4 - 10) + b"</Delete>", None),
        (b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>", None),
        (b"<Delete><Object>" + b"<Key/>" * 100_000 + b"</Object></Delete>", None),
        (
            b"<CompleteMultipartUpload>"
            + b"<Part><PartNumber>1</PartNumber><ETag>e</ETag></Part>" * 10_001
            + b"</CompleteMultipartUpload>",
            xmlio.parse_complete,
        ),
        (b"<Delete " + b" ".join(b'a%d="x"' % i for i in range(150_000)) + b"/>", None),
        (b"<Delete " + b" ".join(b'xmlns:a%d="u"' % i for i in range(80_000)) + b"/>", None),
        (b"<" * xmlio.MAX_BODY_BYTES, None),
        (b"<Delete>" + b"x" * (xmlio.MAX_BODY_BYTES - 20) + b"</Delete>", None),
    ],
    ids=["elements", "objects", "in-one-child", "parts", "attributes", "namespaces", "lt", "text"],
)
def test_huge_counts_are_refused(body: bytes, parse: Callable[[bytes], object] | None) -> None:
    refused(body, parse or xmlio.parse_delete)


def test_the_largest_valid_bodies_parse() -> None:
    parts = [(n, f"{n:032x}") for n in range(1, xmlio.MAX_PART_NUMBER + 1)]
    body = complete_body(parts)
    with _support.bounded_memory(8 * _support.MIB + len(body)):
        assert len(xmlio.parse_complete(body)) == xmlio.MAX_PART_NUMBER
    keys = ["k" * 1024] * xmlio.MAX_DELETE_KEYS
    assert xmlio.parse_delete(delete_body(True, keys)) == (True, keys)


BOMB = (
    '<?xml version="1.0" encoding="{}"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
    '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    "<Delete><Quiet>&c;</Quiet><Object><Key>&c;</Key></Object></Delete>"
)


@pytest.mark.parametrize(
    "body",
    [
        BOMB.format("UTF-8").encode(),
        BOMB.format("UTF-16").encode("utf-16"),  # with a byte order mark
        BOMB.format("UTF-16").encode("utf-16-le"),  # without
        BOMB.format("UTF-32").encode("utf-32"),
        b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><Delete><Quiet>&x;</Quiet>'
        b"<Object><Key>k</Key></Object></Delete>",
        b'<!DOCTYPE d [<!ENTITY % p "x">]><Delete><Object><Key>k</Key></Object></Delete>',
        b"<Delete><Object><Key>&x;</Key></Object></Delete>",
    ],
    ids=["utf-8", "utf-16-bom", "utf-16-no-bom", "utf-32", "external", "parameter", "undeclared"],
)
def test_dtds_and_entities_are_refused(body: bytes) -> None:
    refused(body)
