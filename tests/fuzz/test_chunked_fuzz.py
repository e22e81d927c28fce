"""Fuzzing the aws-chunked decoder (`services.gateway.s3.chunked`).

Properties, for every payload mode, in any split of the raw bytes: nothing but
`sigv4.S3AuthError` escapes `feed` and `finish`; the decoder never hands out more than
x-amz-decoded-content-length bytes; a valid body decodes to its data and trailers; a signed body
that still decodes after a random mutation decodes to the original data and trailers (the
signatures cover them); a chunk or trailer signature in any script is SignatureDoesNotMatch;
decoding allocates at most 256 KiB beyond the body (payload pieces are views, not copies).
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from services.gateway.s3 import chunked, sigv4
from tests.fuzz import _support

Mode = sigv4.PayloadMode
CHUNKED_MODES = [mode for mode in Mode if mode.chunked]
SECRET = "fuzz/secret+KEY"
DAY, AMZ_DATE = "20260102", "20260102T030405Z"
MIN_CHUNK = 16  # small, so that small bodies have many chunks
OVERHEAD = 256 * _support.KIB


def verified(mode: Mode, length: int | None, trailer_names: tuple[str, ...]) -> sigv4.Verified:
    """A request with a streaming payload, as `sigv4.verify` would have accepted it."""
    request = sigv4.AuthRequest(
        access_key="AKIAFUZZ", day=DAY, region="us-east-1", amz_date=AMZ_DATE,
        timestamp=1767323045.0, signed_headers=("host",), signature="5eed" * 16,
        presigned=False, expires_s=0, payload_mode=mode, content_sha256=mode.value,
        decoded_content_length=length, trailer_names=trailer_names, canonical_request="",
        string_to_sign="",
    )  # fmt: skip
    return sigv4.Verified(request=request, signing_key=sigv4.signing_key(SECRET, DAY, "us-east-1"))


def decoder_for(
    mode: Mode, length: int | None, trailer_names: tuple[str, ...] = ()
) -> chunked.ChunkDecoder:
    return chunked.ChunkDecoder(
        mode=mode,
        signing=verified(mode, length, trailer_names) if mode.signed_chunks else None,
        decoded_content_length=length,
        trailer_names=trailer_names,
        min_chunk_bytes=MIN_CHUNK,
    )


def encode(
    mode: Mode, data: bytes, sizes: list[int], trailers: dict[str, str], names: tuple[str, ...]
) -> bytes:
    """The aws-chunked body of data in chunks of sizes, with trailers in trailer modes."""
    signing = verified(mode, len(data), names) if mode.signed_chunks else None
    previous = signing.request.signature if signing is not None else ""
    parts, at = [], 0
    for size in [*sizes, 0]:
        chunk = data[at : at + size]
        at += size
        header = f"{size:x}"
        if signing is not None:
            digest = hashlib.sha256(chunk).hexdigest()
            previous = chunked.chunk_signature(signing, previous, digest)
            header += f";chunk-signature={previous}"
        parts.append(header.encode() + b"\r\n" + chunk + (b"\r\n" if chunk else b""))
    if mode.trailer:
        parts.extend(f"{name}:{value}\r\n".encode() for name, value in trailers.items())
        if signing is not None:
            canonical = "".join(f"{n}:{v}\n" for n, v in sorted(trailers.items()))
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            signature = chunked.trailer_signature(signing, previous, digest)
            parts.append(f"x-amz-trailer-signature:{signature}\r\n".encode())
    return b"".join(parts) + b"\r\n"


def run(
    decoder: chunked.ChunkDecoder, body: bytes, cuts: list[int]
) -> tuple[bytes, dict[str, str]] | None:
    """Feed body cut at cuts, then finish, under the memory bound: (SHA-256 of the payload,
    trailers), or None when the decoder refused it (only S3AuthError may escape)."""
    digest = hashlib.sha256()
    bounds = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    with _support.bounded_memory(OVERHEAD + len(body)):
        try:
            for start, end in itertools.pairwise(bounds):
                for piece in decoder.feed(body[start:end]):
                    digest.update(piece)
            trailers = decoder.finish()
        except sigv4.S3AuthError:
            return None
    return digest.digest(), trailers


_TOKENS = [
    b"\r\n", b"\n", b"\r", b"0", b"10", b"ffffffffffffffff", b"1;", b";chunk-signature=",
    b"5eed" * 16, b"x-amz-trailer-signature:", b"x-amz-checksum-crc32:", b":", b" ", b"\x00",
]  # fmt: skip
raw_bodies = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=24)), max_size=40).map(
        b"".join
    ),
)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)
trailer_sets = st.dictionaries(
    st.sampled_from(["x-amz-checksum-crc32", "x-amz-checksum-sha256", "x-amz-meta-t"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
    max_size=3,
)


@st.composite
def valid_bodies(draw: st.DrawFn) -> tuple[Mode, bytes, dict[str, str], tuple[str, ...], bytes]:
    """(mode, data, trailers, declared trailer names, body) of a valid body."""
    mode = draw(st.sampled_from(CHUNKED_MODES))
    data = draw(st.binary(max_size=600))
    sizes, left = [], len(data)
    while left:
        size = min(left, draw(st.integers(min_value=MIN_CHUNK, max_value=200)))
        sizes.append(size)
        left -= size
    trailers = draw(trailer_sets) if mode.trailer else {}
    names = tuple(trailers)
    return mode, data, trailers, names, encode(mode, data, sizes, trailers, names)


@given(
    mode=st.sampled_from(CHUNKED_MODES),
    body=raw_bodies,
    cut=cuts,
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=4096)),
    names=st.lists(st.sampled_from(["x-amz-checksum-crc32", "x"]), max_size=2, unique=True),
)
@_support.budget(2)
def test_arbitrary_bytes_are_refused_with_s3_errors(
    mode: Mode, body: bytes, cut: list[int], length: int | None, names: list[str]
) -> None:
    decoder = decoder_for(mode, length, tuple(names))
    run(decoder, body, cut)
    if length is not None:
        assert decoder.decoded_bytes <= length


@given(valid=valid_bodies(), cut=cuts)
@_support.budget()
def test_valid_bodies_decode_in_any_pieces(
    valid: tuple[Mode, bytes, dict[str, str], tuple[str, ...], bytes], cut: list[int]
) -> None:
    mode, data, trailers, names, body = valid
    decoded = run(decoder_for(mode, len(data), names), body, cut)
    assert decoded == (hashlib.sha256(data).digest(), trailers)


@st.composite
def mutations(draw: st.DrawFn, body: bytes) -> bytes:
    """body with one edit: a byte flipped, inserted or deleted, a range repeated or cut."""
    at = draw(st.integers(min_value=0, max_value=len(body) - 1))
    op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
    if op == "flip":
        bit = 1 << draw(st.integers(min_value=0, max_value=7))
        return body[:at] + bytes([body[at] ^ bit]) + body[at + 1 :]
    if op == "insert":
        return body[:at] + draw(st.sampled_from(_TOKENS)) + body[at:]
    if op == "delete":
        return body[:at] + body[at + 1 :]
    if op == "repeat":
        end = draw(st.integers(min_value=at, max_value=len(body)))
        return body[:end] + body[at:end] + body[end:]
    return body[:at]


@given(valid=valid_bodies(), cut=cuts, data=st.data())
@_support.budget(2)
def test_mutated_bodies_are_refused_or_decode_to_what_was_signed(
    valid: tuple[Mode, bytes, dict[str, str], tuple[str, ...], bytes],
    cut: list[int],
    data: st.DataObject,
) -> None:
    mode, payload, trailers, names, body = valid
    changed = data.draw(mutations(body))
    decoded = run(decoder_for(mode, len(payload), names), changed, cut)
    if decoded is not None and mode.signed_chunks:
        assert decoded[0] == hashlib.sha256(payload).digest(), "a changed payload was accepted"
        if mode.trailer:
            assert decoded[1] == trailers, "changed trailers were accepted"


@given(
    signature=st.text(_support.UNICODE, max_size=64).map(lambda s: s.encode()),
    trailer=st.booleans(),
)
@_support.budget()
def test_a_signature_in_any_script_is_a_403(signature: bytes, trailer: bool) -> None:
    assume(b"\n" not in signature and b"\r" not in signature)
    mode = Mode.STREAMING_SIGNED_TRAILER if trailer else Mode.STREAMING_SIGNED
    names = ("x-amz-checksum-crc32",) if trailer else ()
    trailers = {"x-amz-checksum-crc32": "AAAAAA=="} if trailer else {}
    body = encode(mode, b"x" * 40, [20, 20], trailers, names)
    if trailer:
        head, _, _ = body.rpartition(b"x-amz-trailer-signature:")
        forged = head + b"x-amz-trailer-signature:" + signature + b"\r\n\r\n"
    else:
        first = body.index(b";chunk-signature=") + len(b";chunk-signature=")
        forged = body[:first] + signature + body[first + 64 :]
    assume(forged != body)
    decoder = decoder_for(mode, 40, names)

    def decode() -> None:
        decoder.feed(forged)
        decoder.finish()

    with pytest.raises(sigv4.S3AuthError) as refused:
        decode()
    assert (refused.value.code, refused.value.status) == ("SignatureDoesNotMatch", 403)
