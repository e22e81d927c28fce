"""S3's additional checksums (x-amz-checksum-*): CRC32, CRC32C, CRC64NVME, SHA1 and SHA256.

`new(algorithm)` gives a streaming hasher with the hashlib interface (`update`, `digest`,
`digest_size`). CRC digests are big-endian, as S3 encodes them; S3 headers carry the digest in
base64 (`b64`). CRC32 comes from zlib, CRC32C and CRC64NVME from awscrt (AWS's own,
hardware-accelerated implementations, the ones botocore uses), the SHAs from hashlib.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from awscrt import checksums as crt_checksums

from kvtier import errors

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

#: The algorithms S3 supports, as x-amz-checksum-algorithm names them.
ALGORITHMS: tuple[str, ...] = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")


class Checksum(Protocol):
    """A running checksum (hashlib's interface)."""

    @property
    def digest_size(self) -> int:
        """Bytes of the digest."""
        ...

    def update(self, data: ReadableBuffer, /) -> None:
        """Add the next bytes."""
        ...

    def digest(self) -> bytes:
        """The checksum of the bytes so far (big-endian for CRCs)."""
        ...


class _Crc:
    """A CRC behind hashlib's interface."""

    def __init__(self, fn: Callable[[ReadableBuffer, int], int], digest_size: int) -> None:
        self._fn = fn
        self._value = 0
        self.digest_size = digest_size

    def update(self, data: ReadableBuffer, /) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self.digest_size, "big")


def _crc32(data: ReadableBuffer, value: int) -> int:
    return zlib.crc32(data, value)


def _crc32c(data: ReadableBuffer, value: int) -> int:
    return int(crt_checksums.crc32c(data, value))


def _crc64nvme(data: ReadableBuffer, value: int) -> int:
    return int(crt_checksums.crc64nvme(data, value))


def new(algorithm: str) -> Checksum:
    """A fresh checksum of an S3 algorithm (any case: "crc32c" is CRC32C).

    Raises errors.InvalidArgument for an algorithm S3 does not support.
    """
    name = algorithm.upper()
    if name == "CRC32":
        return _Crc(_crc32, 4)
    if name == "CRC32C":
        return _Crc(_crc32c, 4)
    if name == "CRC64NVME":
        return _Crc(_crc64nvme, 8)
    if name in ("SHA1", "SHA256"):
        return hashlib.new(name.lower())
    raise errors.InvalidArgument(
        f"checksum algorithm {algorithm[:40]!r} is not supported (use {', '.join(ALGORITHMS)})"
    )


def b64(digest: bytes) -> str:
    """A digest as S3 writes it in x-amz-checksum-* headers and trailers: base64."""
    return base64.b64encode(digest).decode("ascii")


def header_name(algorithm: str) -> str:
    """The header (and trailer) that carries an algorithm's checksum: x-amz-checksum-crc32c.

    Raises errors.InvalidArgument for an algorithm S3 does not support.
    """
    name = algorithm.upper()
    if name not in ALGORITHMS:
        raise errors.InvalidArgument(
            f"checksum algorithm {algorithm[:40]!r} is not supported (use {', '.join(ALGORITHMS)})"
        )
    return f"x-amz-checksum-{name.lower()}"
