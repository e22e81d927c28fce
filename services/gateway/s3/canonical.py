"""SigV4's canonical forms of a request's parts (`sigv4`'s string to sign): the URI, the query
and the signed headers, from the raw path, the raw query and the header values as sent.

Text is `str` decoded as aiohttp does (UTF-8, surrogateescape) and encoded back so; every name
and value is percent-decoded once and re-encoded per RFC 3986, so never double-encoded.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping

#: A request's headers: a (multi-)mapping such as aiohttp's CIMultiDictProxy (whose items()
#: yields every value) or (name, value) pairs; names in any case.
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

_SAFE = "-_.~"  # RFC 3986 unreserved, besides letters and digits


def unquote(text: str) -> bytes:
    """text as the HTTP layer received it (UTF-8, surrogateescape), percent-decoded."""
    return urllib.parse.unquote_to_bytes(text.encode("utf-8", "surrogateescape"))


def _encode(raw: bytes) -> str:
    return urllib.parse.quote(raw, safe=_SAFE)


def canonical_uri(raw_path: str) -> str:
    """The canonical URI of a path as sent: decoded once, re-encoded per RFC 3986 ('/' kept)."""
    decoded = unquote(raw_path or "/")
    return urllib.parse.quote(decoded, safe="/" + _SAFE)


def query_pairs(raw_query: str) -> list[tuple[bytes, bytes]]:
    """Decoded (name, value) of every item of a raw query, in order ('+' is a space)."""
    split = (item.replace("+", " ").partition("=") for item in raw_query.split("&") if item)
    return [(unquote(name), unquote(value)) for name, _, value in split]


def canonical_query(raw_query: str, *, presigned: bool = False) -> str:
    """The canonical query string of a raw query (X-Amz-Signature left out when presigned)."""
    return canonical_pairs(query_pairs(raw_query), presigned=presigned)


def canonical_pairs(pairs: list[tuple[bytes, bytes]], *, presigned: bool) -> str:
    """The canonical query string of decoded (name, value) pairs (`query_pairs`)."""
    encoded = sorted(
        (_encode(name), _encode(value))
        for name, value in pairs
        if not (presigned and name == b"X-Amz-Signature")
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def header_table(headers: Headers) -> dict[str, list[str]]:
    """Every value of each header, by lowercase name."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    table: dict[str, list[str]] = {}
    for name, value in pairs:
        table.setdefault(name.lower(), []).append(value)
    return table


def canonical_headers(table: Mapping[str, list[str]], names: Iterable[str]) -> str:
    """`name:value\\n` lines of the signed headers (an absent one has an empty value)."""
    lines = []
    for name in names:
        value = ",".join(" ".join(v.split()) for v in table.get(name, ()))
        lines.append(f"{name}:{value}\n")
    return "".join(lines)
