"""aws-chunked bodies: AWS's published examples, bodies built by botocore (unsigned, with
checksum trailers) and signed bodies whose seed awscrt signs, decoded in arbitrary pieces."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import io
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import boto3
import botocore.awsrequest
import botocore.config
import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from botocore import httpchecksum

from kvtier import checksums
from services.gateway.s3 import chunked, sigv4

ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EXAMPLE_TIME = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
Mode = sigv4.PayloadMode

# AWS's examples ("Signature Calculations for the Authorization Header: Transferring Payload in
# Multiple Chunks" and "...: Including Trailing Headers"): 66560 bytes of 'a' in chunks of
# 65536, 1024 and 0 bytes; seed, chunk and trailer signatures as published.
EXAMPLE_DATA = b"a" * 66560
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
SIGNATURES = (
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
)
TRAILER_SEED = "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
TRAILER_SIGNATURES = (
    "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
    "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
    "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
)
TRAILER = b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
TRAILER_SIGNATURE = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"


def example_body(signatures: Iterable[str], tail: bytes = b"\r\n") -> bytes:
    first, second, final = signatures
    return b"".join(
        (
            f"10000;chunk-signature={first}\r\n".encode() + b"a" * 65536 + b"\r\n",
            f"400;chunk-signature={second}\r\n".encode() + b"a" * 1024 + b"\r\n",
            f"0;chunk-signature={final}\r\n".encode() + tail,
        )
    )


EXAMPLE_BODY = example_body(SIGNATURES)
EXAMPLE_TRAILER_BODY = example_body(
    TRAILER_SIGNATURES, TRAILER + f"x-amz-trailer-signature:{TRAILER_SIGNATURE}\r\n\r\n".encode()
)


def crt_signed(
    mode: Mode, decoded_length: int, trailers: str = "", when: datetime.datetime = EXAMPLE_TIME
) -> sigv4.Verified:
    """A request signed by awscrt (AWS's own signer), parsed and verified. Without trailers it
    has the Content-Length of AWS's example, which signs it."""
    headers = [
        ("Host", "s3.amazonaws.com"),
        ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ("Content-Encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", str(decoded_length)),
    ]
    if trailers:
        headers.append(("x-amz-trailer", trailers))
    else:
        headers.append(("Content-Length", "66824"))
    request = crt_http.HttpRequest(
        "PUT", "/examplebucket/chunkObject.txt", headers=crt_http.HttpHeaders(headers)
    )
    config = crt_auth.AwsSigningConfig(
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(ACCESS, SECRET),
        region="us-east-1",
        service="s3",
        date=when,
        use_double_uri_encode=False,
        should_normalize_uri_path=False,
        signed_body_value=mode.value,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
    )
    crt_auth.aws_sign_request(request, config).result()
    parsed = sigv4.parse(
        method="PUT", raw_path=request.path, raw_query="", headers=list(request.headers)
    )
    assert parsed is not None
    return sigv4.verify(parsed, SECRET, now=when.timestamp())


class Encoder:
    """A reference aws-chunked encoder, written from AWS's documentation alone (it reproduces
    the published signatures, see below): the signed bodies the SDKs send."""

    def __init__(self, verified: sigv4.Verified | None) -> None:
        self._previous = verified.request.signature if verified else ""
        if verified is None:
            self._sign: Callable[[str, str], str] | None = None
            return
        request = verified.request
        key = f"AWS4{SECRET}".encode()
        for part in (request.day, request.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()

        def sign(algorithm: str, rest: str) -> str:
            text = f"{algorithm}\n{request.amz_date}\n{request.scope}\n{self._previous}\n{rest}"
            self._previous = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
            return self._previous

        self._sign = sign

    def chunk(self, data: bytes) -> bytes:
        if self._sign is None:
            return f"{len(data):x}\r\n".encode() + data + (b"\r\n" if data else b"")
        digest = hashlib.sha256(data).hexdigest()
        signature = self._sign("AWS4-HMAC-SHA256-PAYLOAD", f"{sigv4.EMPTY_SHA256}\n{digest}")
        header = f"{len(data):x};chunk-signature={signature}\r\n".encode()
        return header + data + (b"\r\n" if data else b"")

    def body(self, data: bytes, sizes: Iterable[int], trailers: dict[str, str] | None) -> bytes:
        parts, at = [], 0
        for size in sizes:
            parts.append(self.chunk(data[at : at + size]))
            at += size
        assert at == len(data)
        parts.append(self.chunk(b""))
        if trailers is None:
            return b"".join(parts) + b"\r\n"
        parts.extend(f"{name}:{value}\r\n".encode() for name, value in trailers.items())
        if self._sign is not None:
            canonical = "".join(f"{n}:{v}\n" for n, v in sorted(trailers.items()))
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            signature = self._sign("AWS4-HMAC-SHA256-TRAILER", digest)
            parts.append(f"x-amz-trailer-signature:{signature}\r\n".encode())
        return b"".join(parts) + b"\r\n"


def decode(decoder: chunked.ChunkDecoder, body: bytes, pieces: Iterable[int]) -> bytes:
    out = bytearray()
    at = 0
    for size in pieces:
        out += b"".join(decoder.feed(body[at : at + size]))
        at += size
    out += b"".join(decoder.feed(body[at:]))
    return bytes(out)


def random_pieces(seed: int, total: int, largest: int = 9000) -> list[int]:
    rng = random.Random(seed)
    pieces = []
    while total > 0:
        pieces.append(min(total, rng.randint(1, largest)))
        total -= pieces[-1]
    return pieces


SPLITS: dict[str, Callable[[int], list[int]]] = {
    "whole": lambda n: [n],
    "bytes": lambda n: [1] * n,
    "random": lambda n: random_pieces(n, n),
    "64KiB": lambda n: [65536] * (n // 65536 + 1),
}


# --- AWS's examples ---


def test_reference_encoder_reproduces_aws_signatures() -> None:
    verified = crt_signed(Mode.STREAMING_SIGNED, 66560)
    assert verified.request.signature == SEED  # awscrt agrees with the documentation
    assert Encoder(verified).body(EXAMPLE_DATA, [65536, 1024], None) == EXAMPLE_BODY
    verified = crt_signed(Mode.STREAMING_SIGNED_TRAILER, 66560, "x-amz-checksum-crc32c")
    assert verified.request.signature == TRAILER_SEED
    trailers = {"x-amz-checksum-crc32c": "sOO8/Q=="}
    body = Encoder(verified).body(EXAMPLE_DATA, [65536, 1024], trailers)
    assert body == EXAMPLE_TRAILER_BODY


@pytest.mark.parametrize("split", SPLITS)
def test_aws_signed_example(split: str) -> None:
    decoder = chunked.ChunkDecoder.for_request(crt_signed(Mode.STREAMING_SIGNED, 66560))
    assert decode(decoder, EXAMPLE_BODY, SPLITS[split](len(EXAMPLE_BODY))) == EXAMPLE_DATA
    assert decoder.finish() == {}
    assert decoder.decoded_bytes == 66560


@pytest.mark.parametrize("split", SPLITS)
def test_aws_signed_trailer_example(split: str) -> None:
    verified = crt_signed(Mode.STREAMING_SIGNED_TRAILER, 66560, "x-amz-checksum-crc32c")
    decoder = chunked.ChunkDecoder.for_request(verified)
    body = EXAMPLE_TRAILER_BODY
    assert decode(decoder, body, SPLITS[split](len(body))) == EXAMPLE_DATA
    trailers = decoder.finish()
    assert trailers == {"x-amz-checksum-crc32c": "sOO8/Q=="}
    crc = checksums.new("CRC32C")
    crc.update(EXAMPLE_DATA)
    assert checksums.b64(crc.digest()) == trailers["x-amz-checksum-crc32c"]


def test_aws_trailer_example_as_the_documentation_lays_it_out() -> None:
    # The page shows a blank line between the final chunk and the trailers.
    verified = crt_signed(Mode.STREAMING_SIGNED_TRAILER, 66560, "x-amz-checksum-crc32c")
    body = EXAMPLE_TRAILER_BODY.replace(b"\r\nx-amz-checksum", b"\r\n\r\nx-amz-checksum")
    decoder = chunked.ChunkDecoder.for_request(verified)
    assert decode(decoder, body, []) == EXAMPLE_DATA
    assert decoder.finish() == {"x-amz-checksum-crc32c": "sOO8/Q=="}


def test_crt_trailing_headers_vector() -> None:
    # aws-crt's own test: trailers first/second/third after the example's final chunk.
    verified = crt_signed(Mode.STREAMING_SIGNED, 66560)
    tail = b"third:3rd\r\nfirst:1st\r\nsecond:2nd\r\n"  # sent unsorted, signed sorted
    signature = b"df5735bd9f3295cd9386572292562fefc93ba94e80a0a1ddcbd652c4e0a75e6c"
    body = example_body(SIGNATURES, tail + b"x-amz-trailer-signature:" + signature + b"\r\n\r\n")
    decoder = chunked.ChunkDecoder(
        mode=Mode.STREAMING_SIGNED_TRAILER,
        signing=verified,
        decoded_content_length=66560,
        trailer_names=("first", "second", "third"),
    )
    assert decode(decoder, body, []) == EXAMPLE_DATA
    assert decoder.finish() == {"first": "1st", "second": "2nd", "third": "3rd"}


# --- what botocore sends: STREAMING-UNSIGNED-PAYLOAD-TRAILER with a checksum trailer ---


class _Raw:
    def stream(self, *_: object, **__: object) -> Iterable[bytes]:
        yield b""


def boto3_put(body: bytes, algorithm: str) -> tuple[list[tuple[str, str]], str, bytes]:
    """The headers, path and raw body of a boto3 put_object over HTTPS."""
    client = boto3.session.Session(
        aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, region_name="us-east-1"
    ).client(
        "s3",
        endpoint_url="https://localhost:9000",
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    sent: list[Any] = []

    def before_send(request: Any, **_: object) -> botocore.awsrequest.AWSResponse:
        sent.append((request.headers.items(), request.url, request.body.read()))
        return botocore.awsrequest.AWSResponse(request.url, 200, {}, _Raw())

    client.meta.events.register("before-send", before_send)
    client.put_object(Bucket="b", Key="k", Body=io.BytesIO(body), ChecksumAlgorithm=algorithm)
    items, url, raw = sent[-1]
    headers = [(n, v.decode() if isinstance(v, bytes) else v) for n, v in items]
    return headers, url.split("localhost:9000", 1)[1], raw


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
@pytest.mark.parametrize("size", [0, 1, 8191, (1 << 20) + 3])
def test_boto3_uploads_decode(algorithm: str, size: int) -> None:
    data = random.Random(size).randbytes(size)
    headers, path, raw = boto3_put(data, algorithm)
    parsed = sigv4.parse(method="PUT", raw_path=path, raw_query="", headers=headers)
    assert parsed is not None
    assert parsed.payload_mode is Mode.STREAMING_UNSIGNED_TRAILER
    decoder = chunked.ChunkDecoder.for_request(sigv4.verify(parsed, SECRET, now=time.time()))
    assert decode(decoder, raw, random_pieces(size, len(raw), 70_000)) == data
    expected = checksums.new(algorithm)
    expected.update(data)
    assert decoder.finish() == {checksums.header_name(algorithm): checksums.b64(expected.digest())}


@pytest.mark.parametrize("chunk_size", [8192, 65536, 1 << 20])
def test_botocore_chunked_wrapper(chunk_size: int) -> None:
    data = random.Random(chunk_size).randbytes(300_001)
    wrapper = httpchecksum.AwsChunkedWrapper(
        io.BytesIO(data),
        checksum_cls=httpchecksum.CrtCrc32cChecksum,
        checksum_name="x-amz-checksum-crc32c",
        chunk_size=chunk_size,
    )
    raw = wrapper.read()
    decoder = chunked.ChunkDecoder(
        mode=Mode.STREAMING_UNSIGNED_TRAILER,
        decoded_content_length=len(data),
        trailer_names=["X-Amz-Checksum-CRC32C"],
    )
    assert decode(decoder, raw, random_pieces(chunk_size, len(raw))) == data
    trailer = decoder.finish()["x-amz-checksum-crc32c"]
    assert trailer == httpchecksum.CrtCrc32cChecksum().handle(data)


def test_minio_go_trailer_layout() -> None:
    # minio-go ends trailer lines with LF, then a CRLF.
    crc = "sOO8/Q=="
    unsigned = b"10400\r\n" + EXAMPLE_DATA + b"\r\n0\r\nx-amz-checksum-crc32c:" + crc.encode()
    decoder = chunked.ChunkDecoder(
        mode=Mode.STREAMING_UNSIGNED_TRAILER, trailer_names=["x-amz-checksum-crc32c"]
    )
    assert decode(decoder, unsigned + b"\n\r\n\r\n", [5000]) == EXAMPLE_DATA
    assert decoder.finish() == {"x-amz-checksum-crc32c": crc}
    verified = crt_signed(Mode.STREAMING_SIGNED_TRAILER, 66560, "x-amz-checksum-crc32c")
    body = EXAMPLE_TRAILER_BODY.replace(TRAILER, TRAILER[:-2] + b"\n\r\n")
    decoder = chunked.ChunkDecoder.for_request(verified)
    assert decode(decoder, body, []) == EXAMPLE_DATA
    assert decoder.finish() == {"x-amz-checksum-crc32c": crc}


# --- large signed bodies: bounded memory, no copies, fast ---


def signed_request(size: int, trailer: str = "") -> tuple[sigv4.Verified, Encoder]:
    mode = Mode.STREAMING_SIGNED_TRAILER if trailer else Mode.STREAMING_SIGNED
    verified = crt_signed(mode, size, trailer, when=datetime.datetime.now(datetime.UTC))
    return verified, Encoder(verified)


def test_large_signed_body_is_streamed_without_copies() -> None:
    size = (16 << 20) + 5
    data = random.Random(1).randbytes(size)
    sizes = [1 << 20] * 16 + [5]
    trailers = {"x-amz-checksum-sha256": "c2hh", "x-amz-checksum-crc32": "Y3Jj"}
    verified, encoder = signed_request(size, ",".join(trailers))
    body = encoder.body(data, sizes, trailers)
    decoder = chunked.ChunkDecoder.for_request(verified)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for at in range(0, len(body), 65536):
        piece = body[at : at + 65536]
        for out in decoder.feed(piece):
            assert out.obj is piece  # a view of what was fed, not a copy
            digest.update(out)
    assert decoder.finish() == trailers
    elapsed = time.perf_counter() - started
    assert digest.digest() == hashlib.sha256(data).digest()
    assert decoder.decoded_bytes == size
    assert elapsed < 2.0, f"{elapsed:.2f} s for 16 MiB"


@pytest.mark.parametrize("seed", range(5))
def test_random_chunk_sizes_and_splits(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(0, 400_000)
    data = rng.randbytes(size)
    sizes, left = [], size
    while left > 0:  # every chunk but the last at least 8 KiB
        sizes.append(min(left, rng.randint(8192, 100_000)))
        left -= sizes[-1]
    verified, encoder = signed_request(size)
    body = encoder.body(data, sizes, None)
    decoder = chunked.ChunkDecoder.for_request(verified)
    assert decode(decoder, body, random_pieces(seed + 100, len(body), 20_000)) == data
    assert decoder.finish() == {}


# --- what is refused ---


def refused(code: str, body: bytes, decoder: chunked.ChunkDecoder) -> sigv4.S3AuthError:
    """The error of decoding body to its end."""

    def run() -> None:
        decoder.feed(body)
        decoder.finish()

    with pytest.raises(sigv4.S3AuthError) as caught:
        run()
    assert caught.value.code == code, caught.value
    return caught.value


def signed_decoder(trailer: bool = False) -> chunked.ChunkDecoder:
    if trailer:
        verified = crt_signed(Mode.STREAMING_SIGNED_TRAILER, 66560, "x-amz-checksum-crc32c")
    else:
        verified = crt_signed(Mode.STREAMING_SIGNED, 66560)
    return chunked.ChunkDecoder.for_request(verified)


def unsigned_decoder(
    length: int | None = None, names: Iterable[str] = (), min_chunk_bytes: int = 8192
) -> chunked.ChunkDecoder:
    return chunked.ChunkDecoder(
        mode=Mode.STREAMING_UNSIGNED_TRAILER,
        decoded_content_length=length,
        trailer_names=tuple(names),
        min_chunk_bytes=min_chunk_bytes,
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda b: b.replace(b"a" * 100, b"a" * 99 + b"b", 1), "SignatureDoesNotMatch"),
        (lambda b: b[:-500] + b"b" + b[-499:], "SignatureDoesNotMatch"),  # in the 2nd chunk
        (
            lambda b: b.replace(SIGNATURES[0].encode(), SIGNATURES[1].encode()),
            "SignatureDoesNotMatch",
        ),
        (
            lambda b: b.replace(SIGNATURES[2].encode(), SIGNATURES[2].upper().encode()),
            "SignatureDoesNotMatch",
        ),
        (
            lambda b: b.replace(b";chunk-signature=" + SIGNATURES[1].encode(), b""),
            "SignatureDoesNotMatch",
        ),
        (lambda b: b.replace(b"400;", b"3ff;"), "SignatureDoesNotMatch"),
        (lambda b: b.replace(b"400;", b"401;"), "InvalidChunkSizeError"),  # beyond the length
        (lambda b: b.replace(b"10000;", b"zz;"), "InvalidChunkSizeError"),
        (lambda b: b.replace(b"10000;", b"10000 ;"), "InvalidChunkSizeError"),
        (lambda b: b.replace(b"\r\n400;", b"\n400;"), "IncompleteBody"),
        (lambda b: b.replace(b"a\r\n400;", b"aa\r\n400;"), "IncompleteBody"),  # longer than 0x10000
        (lambda b: b + b"\r\n", "IncompleteBody"),
        (lambda b: b[:-2], "IncompleteBody"),
        (lambda b: b[:-1], "IncompleteBody"),
        (lambda b: b[:60_000], "IncompleteBody"),
        (lambda b: b"", "IncompleteBody"),
    ],
)
def test_bad_signed_bodies(change: Callable[[bytes], bytes], code: str) -> None:
    refused(code, change(EXAMPLE_BODY), signed_decoder())


def test_every_truncation_is_refused() -> None:
    body = EXAMPLE_TRAILER_BODY
    cuts = {*range(0, 200), *range(65_500, 65_800), *range(len(body) - 200, len(body))}
    for cut in sorted(cuts | set(random_pieces(3, 66_000, 5000))):
        refused("IncompleteBody", body[:cut], signed_decoder(trailer=True))


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        (TRAILER + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n", "SignatureDoesNotMatch"),
        (
            TRAILER.replace(b"sOO8", b"sOO9") + b"x-amz-trailer-signature:%s\r\n\r\n",
            "SignatureDoesNotMatch",
        ),
        (TRAILER + b"\r\n", "SignatureDoesNotMatch"),  # no trailer signature
        (b"x-amz-trailer-signature:%s\r\n\r\n", "MalformedTrailerError"),  # declared, missing
        (TRAILER + TRAILER + b"x-amz-trailer-signature:%s\r\n\r\n", "MalformedTrailerError"),
        (b"x-amz-meta-a:b\r\n" + TRAILER, "MalformedTrailerError"),  # undeclared
        (TRAILER + b"x-amz-trailer-signature:%s\r\nx-more:1\r\n\r\n", "MalformedTrailerError"),
        (b"no colon\r\n", "MalformedTrailerError"),
        (b"x" * 20_000, "MalformedTrailerError"),
        (TRAILER + b"x-amz-trailer-signature:%s\r\n", "IncompleteBody"),  # no final CRLF
    ],
)
def test_bad_signed_trailers(tail: bytes, code: str) -> None:
    body = example_body(TRAILER_SIGNATURES, tail.replace(b"%s", TRAILER_SIGNATURE.encode()))
    refused(code, body, signed_decoder(trailer=True))


def test_bad_unsigned_bodies() -> None:
    names = ["x-amz-checksum-crc32"]
    good = b"2000\r\n" + b"x" * 8192 + b"\r\n3\r\nabc\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    decoder = unsigned_decoder(8195, names)
    assert decode(decoder, good, []) == b"x" * 8192 + b"abc"
    assert decoder.finish() == {"x-amz-checksum-crc32": "AAAAAA=="}
    short = b"3\r\nabc\r\n2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n"
    error = refused("InvalidChunkSizeError", short, unsigned_decoder(None, names))
    assert "less than 8192" in error.message
    decoder = unsigned_decoder(None, min_chunk_bytes=1)
    assert decode(decoder, short, [1, 2, 3]) == b"abc" + b"x" * 8192
    assert decoder.finish() == {}
    refused("InvalidChunkSizeError", good, unsigned_decoder(8194, names))  # too long
    refused("IncompleteBody", good, unsigned_decoder(8196, names))  # too short
    refused(
        "InvalidChunkSizeError", good.replace(b"3\r\n", b"3;x=y\r\n"), unsigned_decoder(None, names)
    )
    refused("InvalidChunkSizeError", b"1" * 2000, unsigned_decoder())  # header line too long
    refused("MalformedTrailerError", good, unsigned_decoder(8195))  # undeclared trailer
    refused(
        "MalformedTrailerError",
        good + b"x-amz-checksum-crc32:AAAAAA==\r\n",
        unsigned_decoder(8195, names),
    )
    refused(
        "MalformedTrailerError",
        good.replace(b"\r\n\r\n", b"\r\nx-amz-trailer-signature:00\r\n\r\n"),
        unsigned_decoder(None, names),
    )
    refused("IncompleteBody", good[:-2], unsigned_decoder(None, names))


def test_failures_are_final() -> None:
    decoder = signed_decoder()
    tampered = EXAMPLE_BODY.replace(b"a" * 100, b"b" * 100, 1)
    first = refused("SignatureDoesNotMatch", tampered, decoder)
    with pytest.raises(sigv4.S3AuthError) as again:
        decoder.feed(b"")
    assert again.value is first
    with pytest.raises(sigv4.S3AuthError) as again:
        decoder.finish()
    assert again.value is first


def test_bytes_after_the_end() -> None:
    decoder = signed_decoder()
    decoder.feed(EXAMPLE_BODY)
    refused("IncompleteBody", b"x", decoder)


def test_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an aws-chunked"):
        chunked.ChunkDecoder(mode=Mode.UNSIGNED)
    with pytest.raises(ValueError, match="Verified"):
        chunked.ChunkDecoder(mode=Mode.STREAMING_SIGNED)


@pytest.mark.parametrize(
    "signature", ["é" * 32, "\u2603" * 21 + "a", "\udcff" * 64, "\uff41" * 21 + "a"]
)
def test_a_non_ascii_chunk_or_trailer_signature_is_a_403(signature: str) -> None:
    forged = signature.encode("utf-8", "surrogateescape")
    body = EXAMPLE_BODY.replace(SIGNATURES[1].encode(), forged)
    assert refused("SignatureDoesNotMatch", body, signed_decoder()).status == 403
    body = EXAMPLE_TRAILER_BODY.replace(TRAILER_SIGNATURE.encode(), forged)
    assert refused("SignatureDoesNotMatch", body, signed_decoder(trailer=True)).status == 403
