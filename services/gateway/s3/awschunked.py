"""Incremental decoding of `Content-Encoding: aws-chunked` bodies, as the AWS SDKs send them:

    signed:   <hex>;chunk-signature=<sig>\\r\\n<data>\\r\\n ... 0;chunk-signature=<sig>\\r\\n
              [<name>:<value>\\r\\n ... x-amz-trailer-signature:<sig>\\r\\n]\\r\\n
    unsigned: <hex>\\r\\n<data>\\r\\n ... 0\\r\\n[<name>:<value>\\r\\n ...]\\r\\n

Every chunk signature chains from the request's seed signature; the trailer (trailing
checksums) has its own signature in the signed variant. Data pieces are handed out as views of
the received bytes (no copy); only chunk headers and trailers are buffered (bounded).
"""

from __future__ import annotations

import hashlib
import hmac

from services.gateway.s3 import s3errors, signing

MAX_CHUNK_BYTES = 64 << 20
MAX_LINE_BYTES = 8 << 10


def _error(code: str, message: str) -> s3errors.S3Error:
    return s3errors.S3Error(code, message)


class ChunkDecoder:
    """Decodes one aws-chunked body (see the module docstring). `key` and `seed` (the signing
    key and the request's signature) are given for signed bodies."""

    def __init__(
        self,
        *,
        signed: bool,
        trailer: bool,
        key: bytes = b"",
        seed: str = "",
        amz_date: str = "",
        scope: str = "",
    ) -> None:
        self._signed = signed
        self._trailer = trailer
        self._key = key
        self._previous = seed
        self._amz_date = amz_date
        self._scope = scope
        self._state = "header"
        self._line = bytearray()
        self._remaining = 0
        self._chunk_signature = ""
        self._hasher = hashlib.sha256()
        self.trailers: dict[str, str] = {}
        self._trailer_lines: list[str] = []
        self._trailer_signature = ""
        self.decoded = 0

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        """Payload pieces in the next raw bytes; S3Error on malformed framing or a bad chunk
        signature."""
        view = memoryview(data)
        out: list[bytes | memoryview] = []
        pos = 0
        while pos < len(view):
            if self._state == "data":
                n = min(self._remaining, len(view) - pos)
                piece = view[pos : pos + n]
                out.append(piece)
                if self._signed:
                    self._hasher.update(piece)
                self._remaining -= n
                self.decoded += n
                pos += n
                if self._remaining == 0:
                    self._end_chunk()
                continue
            if self._state == "done":
                raise _error("IncompleteBody", "bytes after the end of the aws-chunked body")
            end = data.find(b"\n", pos)
            if end < 0:
                self._line += view[pos:]
                if len(self._line) > MAX_LINE_BYTES:
                    raise _error("InvalidChunkSizeError", "an aws-chunked header line is too long")
                break
            self._line += view[pos:end]
            pos = end + 1
            line = bytes(self._line)
            self._line.clear()
            if not line.endswith(b"\r"):
                raise _error("IncompleteBody", "aws-chunked lines end with CRLF")
            self._on_line(line[:-1].decode("latin-1"))
        return out

    def _on_line(self, line: str) -> None:
        if self._state == "header":
            self._on_header(line)
        elif self._state == "crlf":
            if line:
                raise _error("IncompleteBody", "a chunk is longer than its announced size")
            self._state = "header"
        elif self._state == "trailer":
            self._on_trailer(line)

    def _on_header(self, line: str) -> None:
        size_text, _, ext = line.partition(";")
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _error("InvalidChunkSizeError", f"bad chunk size {size_text[:20]!r}") from None
        if size < 0 or size > MAX_CHUNK_BYTES:
            raise _error("InvalidChunkSizeError", f"chunk of {size} bytes")
        if self._signed:
            name, _, signature = ext.partition("=")
            if name != "chunk-signature" or not signature:
                raise _error("IncompleteBody", "a signed chunk needs chunk-signature")
            self._chunk_signature = signature
            self._hasher = hashlib.sha256()
        self._remaining = size
        if size == 0:
            self._end_chunk()
        else:
            self._state = "data"

    def _end_chunk(self) -> None:
        if self._signed:
            to_sign = "\n".join(
                (
                    "AWS4-HMAC-SHA256-PAYLOAD", self._amz_date, self._scope, self._previous,
                    signing.EMPTY_SHA256, self._hasher.hexdigest(),
                )
            )  # fmt: skip
            expected = signing.sign(self._key, to_sign)
            if not hmac.compare_digest(expected, self._chunk_signature.lower()):
                raise _error("SignatureDoesNotMatch", "a chunk's signature does not match")
            self._previous = self._chunk_signature
        last = self._remaining == 0 and self._state != "data"
        self._state = "trailer" if last else "crlf"

    def _on_trailer(self, line: str) -> None:
        if not line:
            self._finish_trailers()
            self._state = "done"
            return
        if not self._trailer:
            raise _error("MalformedTrailerError", "a trailer that was not announced")
        name, sep, value = line.partition(":")
        if not sep:
            raise _error("MalformedTrailerError", f"bad trailer line {line[:40]!r}")
        name = name.strip().lower()
        if name == "x-amz-trailer-signature":
            self._trailer_signature = value.strip()
            return
        self.trailers[name] = value.strip()
        self._trailer_lines.append(f"{name}:{value.strip()}\n")

    def _finish_trailers(self) -> None:
        if not (self._signed and self._trailer):
            return
        if not self._trailer_signature:
            raise _error("MalformedTrailerError", "the trailer signature is missing")
        digest = hashlib.sha256("".join(self._trailer_lines).encode()).hexdigest()
        to_sign = "\n".join(
            ("AWS4-HMAC-SHA256-TRAILER", self._amz_date, self._scope, self._previous, digest)
        )
        if not hmac.compare_digest(signing.sign(self._key, to_sign), self._trailer_signature):
            raise _error("SignatureDoesNotMatch", "the trailer's signature does not match")

    def finish(self) -> dict[str, str]:
        """The trailers; IncompleteBody when the body ended before its last chunk."""
        if self._state != "done":
            raise _error("IncompleteBody", "the aws-chunked body ended early")
        return self.trailers
