"""S3's additional checksums agree with the published check values and with botocore's own."""

from __future__ import annotations

import random

import pytest
from botocore import httpchecksum

from kvtier import checksums, errors

CHECK_INPUT = b"123456789"  # the input of every CRC catalogue's check value
CHECK_VALUES = {
    "CRC32": "cbf43926",
    "CRC32C": "e3069283",
    "CRC64NVME": "ae8b14860a799888",
    "SHA1": "f7c3bc1d808e04732adf679965ccc34ca7ae3441",
    "SHA256": "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
}
BOTOCORE = {
    "CRC32": httpchecksum.Crc32Checksum,
    "CRC32C": httpchecksum.CrtCrc32cChecksum,
    "CRC64NVME": httpchecksum.CrtCrc64NvmeChecksum,
    "SHA1": httpchecksum.Sha1Checksum,
    "SHA256": httpchecksum.Sha256Checksum,
}


def test_algorithms_are_the_ones_s3_supports() -> None:
    assert set(checksums.ALGORITHMS) == set(CHECK_VALUES) == set(BOTOCORE)


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_check_values(algorithm: str) -> None:
    checksum = checksums.new(algorithm)
    checksum.update(CHECK_INPUT)
    assert checksum.digest().hex() == CHECK_VALUES[algorithm]
    assert checksum.digest_size == len(bytes.fromhex(CHECK_VALUES[algorithm]))


def test_known_s3_vectors() -> None:
    # AWS's trailing-checksum example: 66560 bytes of 'a' have the CRC32C "sOO8/Q==".
    crc32c = checksums.new("CRC32C")
    crc32c.update(b"a" * 66560)
    assert checksums.b64(crc32c.digest()) == "sOO8/Q=="
    # The CRC64/NVME check value of 32 zero bytes (NVMe specification, NVM command set).
    crc64 = checksums.new("CRC64NVME")
    crc64.update(bytes(32))
    assert crc64.digest().hex() == "cf3473434d4ecf3b"
    # Empty inputs: CRCs are 0, big-endian and full width.
    assert checksums.new("CRC64NVME").digest() == bytes(8)
    assert checksums.b64(checksums.new("CRC32").digest()) == "AAAAAA=="


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20, (3 << 20) + 7])
def test_streamed_checksums_match_botocore(algorithm: str, size: int) -> None:
    data = random.Random(size).randbytes(size)
    ours = checksums.new(algorithm)
    view = memoryview(data)
    step = 65_537  # uneven pieces: the running state carries over
    for at in range(0, size, step):
        ours.update(view[at : at + step])
    theirs = BOTOCORE[algorithm]()
    theirs.update(data)
    assert checksums.b64(ours.digest()) == theirs.b64digest()


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_any_buffer_type_is_hashed_alike(algorithm: str) -> None:
    data = random.Random(7).randbytes(10_000)
    digests = set()
    for buffer in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        checksum = checksums.new(algorithm)
        checksum.update(buffer)
        digests.add(checksum.digest())
    assert len(digests) == 1


def test_names_are_case_insensitive_and_have_headers() -> None:
    lower = checksums.new("crc32c")
    lower.update(CHECK_INPUT)
    assert lower.digest().hex() == CHECK_VALUES["CRC32C"]
    assert checksums.header_name("CRC64NVME") == "x-amz-checksum-crc64nvme"
    assert checksums.header_name("sha256") == "x-amz-checksum-sha256"


@pytest.mark.parametrize("algorithm", ["MD5", "", "CRC16", "SHA512"])
def test_unknown_algorithms_are_invalid_arguments(algorithm: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="not supported"):
        checksums.new(algorithm)
    with pytest.raises(errors.InvalidArgument):
        checksums.header_name(algorithm)
