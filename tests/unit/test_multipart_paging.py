"""The pure parts of multipart.py: a completed object's upload id and parts, and the markers of
ListMultipartUploads, and the checksum (type) of a completed upload."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import checksums, errors
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import multipart

UID_A, UID_B = "a" * 32, "b" * 32


def _meta(sizes: list[int], etag: str = "0" * 32, data_id: str = "") -> datanode_pb2.ShardMeta:
    meta = datanode_pb2.ShardMeta(etag=etag, data_id=data_id, size=sum(sizes))
    for number, size in zip([1, 3, 7, 9], sizes, strict=False):
        meta.parts.add(number=number, size=size)
    return meta


def test_part_span_counts_parts_in_order_whatever_their_numbers() -> None:
    meta = _meta([5, 6, 0], etag="f" * 32 + "-3")
    assert [multipart.part_span(meta, n) for n in (1, 2, 3)] == [(0, 5), (5, 6), (11, 0)]
    assert multipart.part_span(meta, 4) is None
    assert multipart.part_span(meta, 0) is None
    assert multipart.is_multipart(meta)
    plain = _meta([10])
    assert (multipart.part_span(plain, 1), multipart.part_span(plain, 2)) == ((0, 10), None)
    assert not multipart.is_multipart(plain)


def test_completed_upload_is_read_from_the_version_id() -> None:
    assert multipart.completed_upload(_meta([1], data_id=f"{UID_A}-{'c' * 32}")) == UID_A
    for other in ("c" * 32, f"{UID_A}-short", f"{UID_A}{'c' * 32}", ""):
        assert multipart.completed_upload(_meta([1], data_id=other)) == ""


def _uploads(*pairs: tuple[str, str]) -> list[pb.MultipartUploadInfo]:
    return [pb.MultipartUploadInfo(key=k, upload_id=u) for k, u in pairs]


def _keys(found: list[pb.MultipartUploadInfo]) -> list[tuple[str, str]]:
    return [(u.key, u.upload_id) for u in found]


def test_markers_follow_s3() -> None:
    listed = [("a", UID_B), ("a", UID_A), ("b/1", UID_A), ("b/2", UID_A), ("c", UID_A)]
    uploads = _uploads(*listed)

    def after(key_marker: str = "", upload_id_marker: str = "", delimiter: str = "") -> list[Any]:
        request = pb.ListMultipartUploadsRequest(
            bucket="b", key_marker=key_marker, upload_id_marker=upload_id_marker,
            delimiter=delimiter,
        )  # fmt: skip
        return _keys(multipart._after_marker(uploads, request))

    assert after() == listed
    assert after(key_marker="a") == listed[2:]
    assert after(key_marker="a", upload_id_marker=UID_B) == listed[1:]  # by position
    assert after(key_marker="a", upload_id_marker=UID_A) == listed[2:]
    # A marker upload that is gone: that key's uploads whose id sorts after it.
    assert after(key_marker="a", upload_id_marker="9" * 32) == listed
    assert after(upload_id_marker=UID_A) == listed  # without key_marker: ignored
    # A common prefix as the marker skips every key under it (with the delimiter only).
    assert after(key_marker="b/", delimiter="/") == listed[4:]
    assert after(key_marker="b/") == listed[2:]


def test_full_object_checksum_is_the_crc_of_the_whole_body() -> None:
    """FULL_OBJECT: the part CRCs combined equal a direct CRC of the parts' bytes."""
    bodies = [b"A" * 5000, b"", b"B" * 7, bytes(range(256)) * 400]
    for algorithm in ("CRC32", "CRC32C", "CRC64NVME"):
        part_sums = []
        for body in bodies:
            hasher = checksums.new(algorithm)
            hasher.update(body)
            part_sums.append(checksums.b64(hasher.digest()))
        whole = checksums.new(algorithm)
        whole.update(b"".join(bodies))
        sizes = [len(b) for b in bodies]
        combined = multipart.object_checksum(algorithm, "FULL_OBJECT", part_sums, sizes)
        assert combined == checksums.b64(whole.digest()), algorithm
        composite = multipart.object_checksum(algorithm, "COMPOSITE", part_sums, sizes)
        assert composite.endswith("-4")


def test_checksum_type_defaults_and_refusals() -> None:
    assert multipart.checksum_type("CRC32", "") == "COMPOSITE"
    assert multipart.checksum_type("CRC64NVME", "") == "FULL_OBJECT"
    assert multipart.checksum_type("CRC32C", "full_object") == "FULL_OBJECT"
    assert multipart.checksum_type("", "") == ""
    refused = [("SHA256", "FULL_OBJECT"), ("CRC64NVME", "COMPOSITE"), ("", "COMPOSITE")]
    for algorithm, kind in [*refused, ("CRC32", "OTHER")]:
        with pytest.raises(errors.InvalidArgument):
            multipart.checksum_type(algorithm, kind)


def test_check_expected_wants_each_claimed_checksum() -> None:
    multipart.check_expected({"crc32": "AAAAAA=="}, {"CRC32": "AAAAAA=="})
    for claimed in ({"CRC32": "AAAAAB=="}, {"SHA256": "x"}):
        with pytest.raises(errors.DigestMismatch):
            multipart.check_expected(claimed, {"CRC32": "AAAAAA=="})
