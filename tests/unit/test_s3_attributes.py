"""GetObjectAttributes (`s3.attributes_ops`): the x-amz-object-attributes header, the XML
document (checksums, the page of parts), the route (GET only) and its ACL gate entry."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from unittest import mock

import pytest

from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import objectlayer
from services.gateway.s3 import acl, acl_ops, attributes_ops, kv_ops, s3errors, server, xmlio

_NS = {"s3": xmlio.NS}


@dataclasses.dataclass
class _Reader:
    """An opened version: its info and its parts (None: not uploaded in parts)."""

    info: pb.ObjectInfo
    parts: Sequence[objectlayer.Part] | None = None

    def uploaded_parts(self) -> Sequence[objectlayer.Part] | None:
        return self.parts


def _doc(reader: _Reader, wanted: str, marker: int = 0, most: int = 1000) -> ET.Element:
    body = attributes_ops.document(attributes_ops.requested(wanted), reader, marker, most)  # type: ignore[arg-type]
    return ET.fromstring(body)


def _text(root: ET.Element, path: str) -> str | None:
    found = root.find(path, _NS)
    return None if found is None else found.text


@pytest.mark.parametrize("header", ["", " , ", "etag", "ETag,Owner", "ObjectSize,Checksums"])
def test_missing_empty_or_unknown_attributes_are_invalid(header: str) -> None:
    with pytest.raises(s3errors.S3Error) as refused:
        attributes_ops.requested(header)
    assert (refused.value.code, refused.value.status) == ("InvalidArgument", 400)


def test_attributes_are_read_with_spaces() -> None:
    assert attributes_ops.requested("ETag, ObjectSize,ETag") == {"ETag", "ObjectSize"}


def test_plain_object() -> None:
    info = pb.ObjectInfo(size=3, etag="acbd18db4cc2f85cedef654fccc4a4d8", parts=1)
    info.checksums["SHA256"] = "LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564="
    root = _doc(_Reader(info), ",".join(sorted(attributes_ops.ATTRIBUTES)))
    assert _text(root, "s3:ETag") == info.etag  # no quotes
    assert _text(root, "s3:ObjectSize") == "3"
    assert _text(root, "s3:StorageClass") == "STANDARD"
    assert _text(root, "s3:Checksum/s3:ChecksumSHA256") == info.checksums["SHA256"]
    assert _text(root, "s3:Checksum/s3:ChecksumType") == "FULL_OBJECT"
    assert root.find("s3:ObjectParts", _NS) is None
    # Only what was asked for; no Checksum element for an object without checksums.
    only = _doc(_Reader(pb.ObjectInfo(size=3, etag=info.etag)), "Checksum,ObjectSize")
    assert [child.tag.split("}")[1] for child in only] == ["ObjectSize"]


def test_parts_page() -> None:
    info = pb.ObjectInfo(size=13, etag="0" * 32 + "-3", parts=3)
    info.checksums["CRC32"] = "AAAAAA==-3"
    parts = [objectlayer.Part(5, {"CRC32": f"c{n}"}) for n in range(2)] + [objectlayer.Part(3, {})]
    root = _doc(_Reader(info, parts), "ObjectParts,Checksum", marker=1, most=1)
    assert _text(root, "s3:Checksum/s3:ChecksumType") == "COMPOSITE"
    page = root.find("s3:ObjectParts", _NS)
    assert page is not None
    fields = ("PartsCount", "PartNumberMarker", "NextPartNumberMarker", "MaxParts", "IsTruncated")
    assert [_text(page, f"s3:{f}") for f in fields] == ["3", "1", "2", "1", "true"]
    listed = [
        (_text(p, "s3:PartNumber"), _text(p, "s3:Size"), _text(p, "s3:ChecksumCRC32"))
        for p in page.findall("s3:Part", _NS)
    ]
    assert listed == [("2", "5", "c1")]
    last = _doc(_Reader(info, parts), "ObjectParts", marker=2)
    assert _text(last, "s3:ObjectParts/s3:IsTruncated") == "false"
    assert [_text(p, "s3:ChecksumCRC32") for p in last.findall("s3:ObjectParts/s3:Part", _NS)] == [
        None
    ]
    # Past the last part: an empty page.
    past = _doc(_Reader(info, parts), "ObjectParts", marker=7)
    assert past.findall("s3:ObjectParts/s3:Part", _NS) == []
    assert _text(past, "s3:ObjectParts/s3:IsTruncated") == "false"


def test_routed_on_get_only_and_gated_as_head_object() -> None:
    s3 = server.S3Server(mock.Mock(), mock.Mock())
    assert s3.route("GET", "b", "k", {"attributes": ""})[0] == "GetObjectAttributes"
    for method in ("PUT", "DELETE", "POST", "HEAD"):
        with pytest.raises(s3errors.S3Error) as other:
            s3.route(method, "b", "k", {"attributes": ""})
        assert other.value.code == "NotImplemented"
    with pytest.raises(s3errors.S3Error) as bucket:
        s3.route("GET", "b", "", {"attributes": ""})
    assert bucket.value.code == "NotImplemented"
    assert acl_ops.GRANTED["GetObjectAttributes"] == acl_ops.GRANTED["HeadObject"]
    assert acl_ops.GRANTED["GetObjectAttributes"] == ("object", acl.READ)
    assert "GetObjectAttributes" in kv_ops.LAYERED
