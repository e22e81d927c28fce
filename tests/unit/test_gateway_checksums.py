"""The gateway's S3 checksums agree with botocore's own (what clients send and check)."""

from __future__ import annotations

import base64
import random

import pytest
from botocore import httpchecksum

from kvtier import errors
from services.gateway import versions

BOTOCORE = {
    "CRC32": httpchecksum.Crc32Checksum,
    "CRC32C": httpchecksum.CrtCrc32cChecksum,
    "CRC64NVME": httpchecksum.CrtCrc64NvmeChecksum,
    "SHA1": httpchecksum.Sha1Checksum,
    "SHA256": httpchecksum.Sha256Checksum,
}


@pytest.mark.parametrize("algorithm", versions.CHECKSUMS)
@pytest.mark.parametrize("size", [0, 1, 1000, 3 << 20])
def test_streamed_checksums_match_botocore(algorithm: str, size: int) -> None:
    data = random.Random(size).randbytes(size)
    ours = versions.new_hasher(algorithm)
    for at in range(0, size, 65_537):  # uneven pieces: the state carries over
        ours.update(memoryview(data)[at : at + 65_537])
    theirs = BOTOCORE[algorithm]()
    theirs.update(data)
    assert base64.b64encode(ours.digest()).decode() == theirs.b64digest()


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="MD5"):
        versions.new_hasher("MD5")
