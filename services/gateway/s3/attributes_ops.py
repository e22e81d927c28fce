"""S3 GetObjectAttributes (`GET /bucket/key?attributes`): what a HeadObject tells, and the parts
of a multipart object, as an XML document.

`x-amz-object-attributes` names the attributes wanted (comma-separated, any of `ATTRIBUTES`);
missing, empty or naming another one is InvalidArgument, as S3 answers. With versionId, of that
version. The answer (GetObjectAttributesOutput) carries:

- ETag (without quotes), StorageClass (STANDARD), ObjectSize;
- Checksum: the whole object's stored checksums (ChecksumSHA256...) and ChecksumType
  (COMPOSITE for a multipart upload's checksum of part checksums, "-N", else FULL_OBJECT);
  absent when the object has none;
- ObjectParts, for a multipart upload's object only: PartsCount (the element botocore
  and the AWS SDKs read as TotalPartsCount), a page of its parts after
  `x-amz-part-number-marker` (default 0), at most `x-amz-max-parts` (default and most 1000), with
  PartNumber, Size and the part's checksums of the upload's checksum algorithm (kept at
  Complete since 2026-12; none for an object completed before). Parts are counted 1.. in
  order, as x-amz-mp-parts-count and GetObject's partNumber count them.

Headers: Last-Modified, x-amz-version-id (in a versioned bucket); a delete marker is 404
NoSuchKey (current) or 405 MethodNotAllowed (by versionId), with x-amz-delete-marker, as HEAD.
It reads the version's metadata only (`ObjectLayer.open_read` with data=False), on either bucket
kind, and is authorized as HeadObject (the ACL gate: READ on the object; `acl_ops.GRANTED`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from aiohttp import web

from kvtier import errors
from services.gateway import objectlayer
from services.gateway.s3 import object_ops, params, s3errors, s3request, versioning_ops, xmlio

#: The attributes x-amz-object-attributes may name.
ATTRIBUTES = frozenset({"ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"})
#: Checksum algorithms S3 reports (the element is Checksum + the name), in S3's order.
CHECKSUMS = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
#: The most parts one answer lists (S3's default and largest x-amz-max-parts).
MAX_PARTS = 1000


def requested(header: str) -> frozenset[str]:
    """The attributes x-amz-object-attributes names; InvalidArgument when it names none or an
    unknown one (names are case-sensitive, as S3's)."""
    names = {name.strip() for name in header.split(",")} - {""}
    if not names:
        raise s3errors.S3Error(
            "InvalidArgument", "The x-amz-object-attributes header specifying the attributes to "
            "be retrieved is either missing or empty",
        )  # fmt: skip
    unknown = names - ATTRIBUTES
    if unknown:
        raise s3errors.S3Error("InvalidArgument", f"Invalid attribute name: {min(unknown)}")
    return frozenset(names)


def _number(req: s3request.S3Request, header: str, default: int) -> int:
    """A non-negative integer header (default when absent); InvalidArgument otherwise."""
    text = req.header(header)
    if not text:
        return default
    value = params.uint(text)
    if value is None:
        raise s3errors.S3Error("InvalidArgument", f"{header} must be a non-negative integer")
    return value


def _add(parent: ET.Element, tag: str, text: object) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = str(text).lower() if isinstance(text, bool) else str(text)
    return child


def _checksums(parent: ET.Element, sums: Mapping[str, str]) -> None:
    for name in CHECKSUMS:
        if name in sums:
            _add(parent, f"Checksum{name}", sums[name])


def document(
    wanted: frozenset[str], reader: objectlayer.ObjectReader, marker: int, max_parts: int
) -> bytes:
    """The GetObjectAttributesOutput of a version (reader: opened for its info)."""
    info = reader.info
    root = ET.Element("GetObjectAttributesOutput", xmlns=xmlio.NS)
    if "ETag" in wanted:
        _add(root, "ETag", info.etag)
    sums = {name.upper(): value for name, value in info.checksums.items()}
    if "Checksum" in wanted and any(name in sums for name in CHECKSUMS):
        checksum = ET.SubElement(root, "Checksum")
        _checksums(checksum, sums)
        # A checksum of part checksums ends "-N" (no base64 digit is a '-').
        composite = any("-" in sums[n] for n in CHECKSUMS if n in sums)
        _add(checksum, "ChecksumType", "COMPOSITE" if composite else "FULL_OBJECT")
    parts = reader.uploaded_parts() if "ObjectParts" in wanted else None
    if parts is not None:
        _parts(ET.SubElement(root, "ObjectParts"), parts, marker, max_parts)
    if "StorageClass" in wanted:
        _add(root, "StorageClass", "STANDARD")
    if "ObjectSize" in wanted:
        _add(root, "ObjectSize", info.size)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def _parts(
    parent: ET.Element, parts: Sequence[objectlayer.Part], marker: int, max_parts: int
) -> None:
    """ObjectParts: the count, then the parts after marker, at most max_parts of them."""
    total = len(parts)
    _add(parent, "PartsCount", total)
    _add(parent, "PartNumberMarker", marker)
    last = min(total, marker + max_parts)
    if last > marker:
        _add(parent, "NextPartNumberMarker", last)
    _add(parent, "MaxParts", max_parts)
    _add(parent, "IsTruncated", last < total)
    for number in range(marker + 1, last + 1):
        part = ET.SubElement(parent, "Part")
        _add(part, "PartNumber", number)
        _add(part, "Size", parts[number - 1].size)
        _checksums(part, {k.upper(): v for k, v in parts[number - 1].checksums.items()})


async def get_object_attributes(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetObjectAttributes (see the module docstring). The headers are checked once the
    caller is admitted to the object (the read authorizes it): an unauthorized caller learns
    nothing from the request's errors, and is refused as HeadObject refuses it."""
    layer = await s3.layer(req)
    object_ops.check_key(req.key)
    version = versioning_ops.requested(req)
    try:
        reader = await layer.open_read(req.bucket, req.key, version, data=False)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    wanted = requested(req.header("x-amz-object-attributes"))
    max_parts = min(_number(req, "x-amz-max-parts", MAX_PARTS), MAX_PARTS)
    marker = _number(req, "x-amz-part-number-marker", 0)
    response = web.Response(
        body=document(wanted, reader, marker, max_parts), content_type="application/xml"
    )
    response.headers["Last-Modified"] = xmlio.http_time(reader.info.mtime_unix_ms)
    await versioning_ops.stamp_info(s3, req.bucket, response, reader.info)
    return response


#: The router's entry (`server`): GET ?attributes on an object; other methods stay 501.
ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    ("GET", "object", ("attributes",), "GetObjectAttributes", get_object_attributes),
]
