"""Streaming decoder of `Content-Encoding: aws-chunked` request bodies, as the AWS SDKs send them.

    signed:   <hex-size>;chunk-signature=<sig>\\r\\n<data>\\r\\n ... 0;chunk-signature=<sig>\\r\\n
              \\r\\n                                            (STREAMING-AWS4-HMAC-SHA256-PAYLOAD)
              <name>:<value>\\r\\n ... x-amz-trailer-signature:<sig>\\r\\n\\r\\n      (...-TRAILER)
    unsigned: <hex-size>\\r\\n<data>\\r\\n ... 0\\r\\n<name>:<value>\\r\\n ... \\r\\n
              (STREAMING-UNSIGNED-PAYLOAD-TRAILER)

Each chunk signature chains from the previous one, the first from the request's own signature
(the seed): HMAC over "AWS4-HMAC-SHA256-PAYLOAD", X-Amz-Date, the scope, the previous
signature, SHA-256("") and SHA-256(chunk). The trailer signature chains from the final chunk's
over "AWS4-HMAC-SHA256-TRAILER" and the SHA-256 of the canonical trailers ("name:value\\n",
sorted by name), both with the request's signing key (`sigv4.Verified`).

Memory is bounded whatever the body: payload bytes are handed out as views of the pieces fed
(no copy), hashed in place; only a chunk header line (1 KiB) and the trailers (16 KiB) are
buffered. Payload bytes are handed out before their chunk's signature can be checked (it
covers the whole chunk): nothing may be committed before `finish()` returns.

Errors are `sigv4.S3AuthError`, with S3's codes:
- InvalidChunkSizeError: a malformed chunk header line, a chunk other than the last shorter
  than 8 KiB, chunks adding up to more than x-amz-decoded-content-length;
- IncompleteBody: the body ends early or short of x-amz-decoded-content-length, a chunk's data
  is longer than announced (no CRLF where it should end), bytes follow the end;
- SignatureDoesNotMatch: a chunk or trailer signature is missing from a signed body or wrong;
- MalformedTrailerError: a trailer is malformed, repeated, undeclared (x-amz-trailer) or
  missing, or the trailers are too long.
After an error the decoder stays failed: every later call raises the same error.
Trailer lines may end with LF alone and blank lines among them are skipped (minio-go writes
"name:value\\n\\r\\n"); chunk header lines must end with CRLF.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Collection
from typing import TYPE_CHECKING

from services.gateway.s3 import sigv4

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MIN_CHUNK_BYTES = 8192
MAX_LINE_BYTES = 1024
MAX_TRAILER_BYTES = 16 << 10
MAX_TRAILERS = 16
TRAILER_SIGNATURE = b"x-amz-trailer-signature"
PAYLOAD_ALGORITHM = "AWS4-HMAC-SHA256-PAYLOAD"
TRAILER_ALGORITHM = "AWS4-HMAC-SHA256-TRAILER"
_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_SIGNATURE_PREFIX = b"chunk-signature="


class _State(enum.Enum):
    HEADER = enum.auto()  # reading a chunk header line
    DATA = enum.auto()  # inside a chunk's data
    DATA_CRLF = enum.auto()  # the CRLF that ends a chunk's data
    END_CRLF = enum.auto()  # the CRLF after the final chunk (no trailers)
    TRAILERS = enum.auto()  # trailer lines until finish()
    DONE = enum.auto()


def _error(code: str, message: str) -> sigv4.S3AuthError:
    return sigv4.S3AuthError(code, message)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # as the HTTP layer decoded it


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def chunk_signature(verified: sigv4.Verified, previous: str, chunk_sha256_hex: str) -> str:
    """The signature of one chunk, given the previous signature and the chunk's SHA-256."""
    return _sign(verified, PAYLOAD_ALGORITHM, previous, sigv4.EMPTY_SHA256, chunk_sha256_hex)


def trailer_signature(verified: sigv4.Verified, previous: str, trailer_sha256_hex: str) -> str:
    """The signature of the trailers, given the final chunk's signature and their SHA-256."""
    return _sign(verified, TRAILER_ALGORITHM, previous, trailer_sha256_hex)


def _sign(verified: sigv4.Verified, algorithm: str, *lines: str) -> str:
    request = verified.request
    to_sign = "\n".join((algorithm, request.amz_date, request.scope, *lines))
    return sigv4.sign(verified.signing_key, to_sign)


class ChunkDecoder:
    """Decodes one aws-chunked body (see the module docstring): `feed` the raw bytes in any
    pieces, take the payload pieces it returns, then `finish` for the verdict and trailers."""

    def __init__(
        self,
        *,
        mode: sigv4.PayloadMode,
        signing: sigv4.Verified | None = None,
        decoded_content_length: int | None = None,
        trailer_names: Collection[str] = (),
        min_chunk_bytes: int = MIN_CHUNK_BYTES,
    ) -> None:
        """`signing` is required for signed modes; `trailer_names` are the trailers the request
        declared (x-amz-trailer): exactly those must arrive. ValueError on a misuse."""
        if not mode.chunked:
            raise ValueError(f"{mode.value} is not an aws-chunked payload")
        if mode.signed_chunks and signing is None:
            raise ValueError("a signed aws-chunked body needs the request's Verified signature")
        self._mode = mode
        self._signing = signing if mode.signed_chunks else None
        self._previous = signing.request.signature if signing is not None else ""
        self._declared = decoded_content_length
        self._trailer_names = frozenset(_bytes(n.lower()) for n in trailer_names)
        self._min_chunk = min_chunk_bytes
        self._state = _State.HEADER
        self._line = bytearray()
        self._crlf = 0  # bytes of an expected CRLF already seen
        self._remaining = 0
        self._short_chunk = False
        self._chunk_signature = b""
        self._hasher = hashlib.sha256()
        self._decoded = 0
        self._trailer_bytes = 0
        self._trailers: dict[bytes, bytes] = {}
        self._trailer_signature: bytes | None = None
        self._trailers_closed = False  # a blank line came after the last trailer line
        self._failed: sigv4.S3AuthError | None = None

    @classmethod
    def for_request(cls, verified: sigv4.Verified) -> ChunkDecoder:
        """The decoder of a verified request's aws-chunked body (ValueError if it has none)."""
        request = verified.request
        return cls(
            mode=request.payload_mode,
            signing=verified,
            decoded_content_length=request.decoded_content_length,
            trailer_names=request.trailer_names,
        )

    @property
    def decoded_bytes(self) -> int:
        """Payload bytes decoded so far (the object's size once `finish` returned)."""
        return self._decoded

    def feed(self, data: ReadableBuffer) -> list[memoryview]:
        """The payload pieces in the next raw bytes: views of `data`, valid while it is.
        Raises S3AuthError (see the module docstring) as soon as the framing is wrong or a
        chunk's signature does not match."""
        if self._failed is not None:
            raise self._failed
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        out: list[memoryview] = []
        try:
            pos = 0
            while pos < len(view):
                pos = self._step(view, pos, out)
        except sigv4.S3AuthError as exc:
            self._failed = exc
            raise
        return out

    def finish(self) -> dict[str, str]:
        """After the last raw byte: check the body ended where it should, its length and its
        trailer signature; the trailers (lowercase names). S3AuthError otherwise."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._state is _State.TRAILERS:
                self._end_trailers()
            if self._state is not _State.DONE:
                raise _error("IncompleteBody", "The request body terminated unexpectedly")
        except sigv4.S3AuthError as exc:
            self._failed = exc
            raise
        return {_text(k): _text(v) for k, v in self._trailers.items()}

    def _step(self, view: memoryview, pos: int, out: list[memoryview]) -> int:
        state = self._state
        if state is _State.DATA:
            n = min(self._remaining, len(view) - pos)
            piece = view[pos : pos + n]
            out.append(piece)
            if self._signing is not None:
                self._hasher.update(piece)
            self._remaining -= n
            self._decoded += n
            if self._remaining == 0:
                self._end_chunk_data()
            return pos + n
        if state is _State.DATA_CRLF or state is _State.END_CRLF:
            return self._expect_crlf(view, pos)
        if state is _State.DONE:
            raise _error("IncompleteBody", "bytes follow the end of the aws-chunked body")
        return self._read_line(view, pos)

    def _expect_crlf(self, view: memoryview, pos: int) -> int:
        while self._crlf < 2 and pos < len(view):
            if view[pos] != b"\r\n"[self._crlf]:
                if self._state is _State.DATA_CRLF:
                    raise _error("IncompleteBody", "a chunk is longer than its announced size")
                raise _error("IncompleteBody", "bytes follow the final aws-chunked chunk")
            self._crlf += 1
            pos += 1
        if self._crlf == 2:
            self._crlf = 0
            self._state = _State.HEADER if self._state is _State.DATA_CRLF else _State.DONE
        return pos

    def _read_line(self, view: memoryview, pos: int) -> int:
        trailers = self._state is _State.TRAILERS
        if trailers:
            room = MAX_TRAILER_BYTES - self._trailer_bytes
        else:
            room = MAX_LINE_BYTES - len(self._line)
        window = bytes(view[pos : pos + room + 1])  # a bounded copy, to search it
        end = window.find(b"\n")
        taken = len(window) if end < 0 else end + 1
        if taken > room:
            if trailers:
                raise _error("MalformedTrailerError", "the trailers are too long")
            raise _error("InvalidChunkSizeError", "an aws-chunked header line is too long")
        if trailers:
            self._trailer_bytes += taken
        if end < 0:
            self._line += window
            return pos + taken
        line = bytes(self._line) + window[:end]
        self._line.clear()
        if trailers:
            self._on_trailer_line(line.removesuffix(b"\r"))
        else:
            self._on_header_line(line)
        return pos + taken

    def _on_header_line(self, line: bytes) -> None:
        if not line.endswith(b"\r"):
            raise _error("InvalidChunkSizeError", "aws-chunked header lines end with CRLF")
        size_text, sep, extension = line[:-1].partition(b";")
        if not _SIZE.fullmatch(size_text):
            raise _error("InvalidChunkSizeError", f"bad chunk size {size_text[:20]!r}")
        if self._signing is not None:
            if not extension.startswith(_SIGNATURE_PREFIX):
                raise _error("SignatureDoesNotMatch", "a signed chunk has no chunk-signature")
            self._chunk_signature = extension[len(_SIGNATURE_PREFIX) :]
        elif sep:
            raise _error("InvalidChunkSizeError", "an unsigned chunk has an extension")
        self._start_chunk(int(size_text, 16))

    def _start_chunk(self, size: int) -> None:
        if self._declared is not None and size > self._declared - self._decoded:
            raise _error("InvalidChunkSizeError", "the chunks exceed x-amz-decoded-content-length")
        if size and self._short_chunk:
            raise _error(
                "InvalidChunkSizeError",
                f"Only the last chunk is allowed to have a size less than {self._min_chunk} bytes",
            )
        self._short_chunk = 0 < size < self._min_chunk
        self._remaining = size
        self._hasher = hashlib.sha256()
        if size:
            self._state = _State.DATA
        else:
            self._end_final_chunk()

    def _check_chunk_signature(self) -> None:
        if self._signing is None:
            return
        expected = chunk_signature(self._signing, self._previous, self._hasher.hexdigest())
        if not hmac.compare_digest(expected.encode(), self._chunk_signature):
            raise _error("SignatureDoesNotMatch", "a chunk's signature does not match")
        self._previous = expected

    def _end_chunk_data(self) -> None:
        self._check_chunk_signature()
        self._state = _State.DATA_CRLF

    def _end_final_chunk(self) -> None:
        self._check_chunk_signature()
        if self._declared is not None and self._decoded != self._declared:
            raise _error(
                "IncompleteBody",
                f"You did not provide the number of bytes specified by "
                f"x-amz-decoded-content-length ({self._declared}); got {self._decoded}",
            )
        self._state = _State.TRAILERS if self._mode.trailer else _State.END_CRLF

    def _on_trailer_line(self, line: bytes) -> None:
        if not line:
            self._trailers_closed = True
            return
        self._trailers_closed = False
        if self._trailer_signature is not None:
            raise _error("MalformedTrailerError", "a trailer follows x-amz-trailer-signature")
        name, sep, value = line.partition(b":")
        name, value = name.strip().lower(), b" ".join(value.split())
        if not sep or not name:
            raise _error("MalformedTrailerError", f"bad trailer line {line[:40]!r}")
        if name == TRAILER_SIGNATURE and self._mode.signed_chunks:
            self._trailer_signature = value
        elif name in self._trailers or len(self._trailers) >= MAX_TRAILERS:
            raise _error("MalformedTrailerError", f"trailer {name[:40]!r} is repeated")
        elif name not in self._trailer_names:
            raise _error("MalformedTrailerError", f"trailer {name[:40]!r} was not declared")
        else:
            self._trailers[name] = value

    def _end_trailers(self) -> None:
        if self._line or not self._trailers_closed:
            raise _error("IncompleteBody", "the aws-chunked body ended inside its trailers")
        missing = self._trailer_names - self._trailers.keys()
        if missing:
            names = _text(b", ".join(sorted(missing)))
            raise _error("MalformedTrailerError", f"declared trailers are missing: {names}")
        if self._signing is not None:
            self._check_trailer_signature(self._signing)
        self._state = _State.DONE

    def _check_trailer_signature(self, signing: sigv4.Verified) -> None:
        if self._trailer_signature is None:
            raise _error("SignatureDoesNotMatch", "the trailer signature is missing")
        canonical = b"".join(
            name + b":" + value + b"\n" for name, value in sorted(self._trailers.items())
        )
        expected = trailer_signature(signing, self._previous, hashlib.sha256(canonical).hexdigest())
        if not hmac.compare_digest(expected.encode(), self._trailer_signature):
            raise _error("SignatureDoesNotMatch", "the trailer signature does not match")
