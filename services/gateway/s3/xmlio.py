"""The XML bodies of the S3 API: responses built with ElementTree, request bodies parsed with
limits (size checked by the caller too).

Request bodies are UTF-8 (a declared encoding is ignored; UTF-16 and UTF-32, with or without a
byte order mark, are refused) and hold no NUL and no DTD, so no entity is ever declared. They
are parsed as a stream, one child of the root at a time, never as a whole tree (which takes
20-40 times the body's size): nesting, elements per child, children and runs of text are
bounded (`MAX_DEPTH` ...), so a body of n bytes costs about n bytes. Every refusal is
MalformedXML, but part numbers: ASCII digits (else MalformedXML) from 1 to 10000 (else
InvalidArgument).
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from services.gateway.s3 import params, s3errors

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_BODY_BYTES = 2 << 20
#: Part numbers of a multipart upload, as S3 allows them.
MAX_PART_NUMBER = 10000
_HEADER = b'<?xml version="1.0" encoding="UTF-8"?>\n'
#: A listing's (canonical id, display name) of an entry's owner from the tenant its ACL
#: records ("" when none: `ownership.listed_owners`).
Owners = Callable[[str], tuple[str, str]]


def iso_time(unix_ms: int) -> str:
    """S3's timestamp in XML: 2026-11-26T20:30:00.000Z."""
    t = datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{unix_ms % 1000:03d}Z"


def http_time(unix_ms: int) -> str:
    """An HTTP date (Last-Modified): Thu, 26 Nov 2026 20:30:00 GMT."""
    t = datetime.datetime.fromtimestamp(unix_ms // 1000, datetime.UTC)
    return t.strftime("%a, %d %b %Y %H:%M:%S GMT")


def quoted(etag: str) -> str:
    """An ETag as S3 sends it."""
    return f'"{etag}"'


def _add(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = str(text).lower() if isinstance(text, bool) else str(text)
    return child


def _doc(root: ET.Element) -> bytes:
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return _HEADER + body


def _root(tag: str) -> ET.Element:
    return ET.Element(tag, xmlns=NS)


def error(code: str, message: str, resource: str, request_id: str) -> bytes:
    """An error body."""
    root = ET.Element("Error")
    for tag, text in (
        ("Code", code),
        ("Message", message),
        ("Resource", resource),
        ("RequestId", request_id),
    ):
        _add(root, tag, text)
    return _doc(root)


def _owner(parent: ET.Element, owner_id: str, display_name: str, tag: str = "Owner") -> None:
    owner = _add(parent, tag)
    _add(owner, "ID", owner_id)
    _add(owner, "DisplayName", display_name)


def list_buckets(
    buckets: Iterable[tuple[str, int]],
    owner_id: str,
    display_name: str,
    *,
    region: str = "",
    prefix: str | None = None,
    continuation_token: str = "",
) -> bytes:
    """ListAllMyBucketsResult: (name, created unix ms) pairs; with region each bucket's
    BucketRegion (S3 sends it when the request had a parameter), prefix as asked, and the
    token of the next page."""
    root = _root("ListAllMyBucketsResult")
    _owner(root, owner_id, display_name)
    holder = _add(root, "Buckets")
    for name, created in buckets:
        bucket = _add(holder, "Bucket")
        _add(bucket, "Name", name)
        _add(bucket, "CreationDate", iso_time(created))
        if region:
            _add(bucket, "BucketRegion", region)
    if continuation_token:
        _add(root, "ContinuationToken", continuation_token)
    if prefix is not None:
        _add(root, "Prefix", prefix)
    return _doc(root)


def location(region: str) -> bytes:
    """GetBucketLocation: us-east-1 is an empty constraint, as in S3."""
    root = _root("LocationConstraint")
    if region != "us-east-1":
        root.text = region
    return _doc(root)


def versioning() -> bytes:
    """GetBucketVersioning of an unversioned bucket."""
    return _doc(_root("VersioningConfiguration"))


class Encoder:
    """Keys and prefixes as written in listings (encoding-type=url: percent-encoded)."""

    def __init__(self, encoding_type: str) -> None:
        if encoding_type not in ("", "url"):
            raise s3errors.S3Error("InvalidArgument", "Invalid Encoding Method specified")
        self.url = encoding_type == "url"

    def __call__(self, text: str) -> str:
        return urllib.parse.quote(text, safe="/") if self.url else text


def _contents(
    parent: ET.Element, tag: str, obj: Any, enc: Encoder, owner: Owners | None
) -> ET.Element:
    item = _add(parent, tag)
    _add(item, "Key", enc(obj.key))
    if tag == "Version":
        _add(item, "VersionId", "null")
        _add(item, "IsLatest", True)
    _add(item, "LastModified", iso_time(obj.mtime_unix_ms))
    _add(item, "ETag", quoted(obj.etag))
    _add(item, "Size", obj.size)
    if owner is not None:
        _owner(item, *owner(obj.owner))
    _add(item, "StorageClass", "STANDARD")
    return item


def list_objects(
    *,
    version: int,
    bucket: str,
    page: Any,
    params: dict[str, str],
    enc: Encoder,
    owner: Owners | None,
    next_marker: str = "",
) -> bytes:
    """ListBucketResult for ListObjects (version 1) and ListObjectsV2 (version 2); owner: each
    object's Owner from its recorded one (None: no Owner, V2 without fetch-owner)."""
    root = _root("ListBucketResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", enc(params.get("prefix", "")))
    if version == 1:
        _add(root, "Marker", enc(params.get("marker", "")))
        if next_marker:
            _add(root, "NextMarker", enc(next_marker))
    else:
        if params.get("continuation-token"):
            _add(root, "ContinuationToken", params["continuation-token"])
        if params.get("start-after"):
            _add(root, "StartAfter", enc(params["start-after"]))
        _add(root, "KeyCount", len(page.objects) + len(page.common_prefixes))
        if page.is_truncated:
            _add(root, "NextContinuationToken", page.next_continuation_token)
    _add(root, "MaxKeys", params.get("max-keys", "1000"))
    if params.get("delimiter"):
        _add(root, "Delimiter", enc(params["delimiter"]))
    if enc.url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", page.is_truncated)
    for obj in page.objects:
        _contents(root, "Contents", obj, enc, owner)
    for prefix in page.common_prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", enc(prefix))
    return _doc(root)


def list_versions(
    *, bucket: str, page: Any, params: dict[str, str], enc: Encoder, owner: Owners
) -> bytes:
    """ListVersionsResult of an unversioned bucket: each object once, version "null"."""
    root = _root("ListVersionsResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", enc(params.get("prefix", "")))
    _add(root, "KeyMarker", enc(params.get("key-marker", "")))
    _add(root, "VersionIdMarker", params.get("version-id-marker", ""))
    if page.is_truncated and page.objects:
        _add(root, "NextKeyMarker", enc(page.objects[-1].key))
        _add(root, "NextVersionIdMarker", "null")
    elif page.is_truncated and page.common_prefixes:
        _add(root, "NextKeyMarker", enc(page.common_prefixes[-1]))
    _add(root, "MaxKeys", params.get("max-keys", "1000"))
    if params.get("delimiter"):
        _add(root, "Delimiter", enc(params["delimiter"]))
    if enc.url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", page.is_truncated)
    for obj in page.objects:
        _contents(root, "Version", obj, enc, owner)
    for prefix in page.common_prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", enc(prefix))
    return _doc(root)


def copy_result(tag: str, etag: str, mtime_unix_ms: int, checksums: dict[str, str]) -> bytes:
    """CopyObjectResult / CopyPartResult."""
    root = _root(tag)
    _add(root, "LastModified", iso_time(mtime_unix_ms))
    _add(root, "ETag", quoted(etag))
    for name, value in sorted(checksums.items()):
        _add(root, f"Checksum{name}", value)
    return _doc(root)


def initiate_multipart(bucket: str, key: str, upload_id: str) -> bytes:
    """InitiateMultipartUploadResult."""
    root = _root("InitiateMultipartUploadResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    return _doc(root)


def complete_multipart(
    location_url: str, bucket: str, key: str, etag: str, checksums: dict[str, str]
) -> bytes:
    """CompleteMultipartUploadResult."""
    root = _root("CompleteMultipartUploadResult")
    _add(root, "Location", location_url)
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "ETag", quoted(etag))
    for name, value in sorted(checksums.items()):
        _add(root, f"Checksum{name}", value)
    if checksums:  # a checksum of part checksums ends "-N" (no base64 digit is a '-')
        composite = any("-" in value for value in checksums.values())
        _add(root, "ChecksumType", "COMPOSITE" if composite else "FULL_OBJECT")
    return _doc(root)


def list_parts(
    *,
    bucket: str,
    key: str,
    upload_id: str,
    page: Any,
    marker: int,
    max_parts: int,
    owner: tuple[str, str],
    initiator: tuple[str, str],
) -> bytes:
    """ListPartsResult."""
    root = _root("ListPartsResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    _owner(root, *initiator, tag="Initiator")
    _owner(root, *owner)
    _add(root, "StorageClass", "STANDARD")
    _add(root, "PartNumberMarker", marker)
    if page.is_truncated:
        _add(root, "NextPartNumberMarker", page.next_part_number_marker)
    _add(root, "MaxParts", max_parts)
    _add(root, "IsTruncated", page.is_truncated)
    if page.checksum_algorithm:
        _add(root, "ChecksumAlgorithm", page.checksum_algorithm)
    for part in page.parts:
        item = _add(root, "Part")
        _add(item, "PartNumber", part.part_number)
        _add(item, "LastModified", iso_time(part.mtime_unix_ms))
        _add(item, "ETag", quoted(part.etag))
        _add(item, "Size", part.size)
        for name, value in sorted(part.checksums.items()):
            _add(item, f"Checksum{name}", value)
    return _doc(root)


def list_uploads(
    *,
    bucket: str,
    page: Any,
    params: dict[str, str],
    enc: Encoder,
    initiator: Owners,
    owner: Owners,
) -> bytes:
    """ListMultipartUploadsResult; each upload's Initiator from its recorded initiator, else
    its recorded owner (`MultipartUploadInfo.initiator`, `.owner`), and Owner from the latter."""
    root = _root("ListMultipartUploadsResult")
    _add(root, "Bucket", bucket)
    _add(root, "KeyMarker", enc(params.get("key-marker", "")))
    _add(root, "UploadIdMarker", params.get("upload-id-marker", ""))
    if page.is_truncated:
        _add(root, "NextKeyMarker", enc(page.next_key_marker))
        _add(root, "NextUploadIdMarker", page.next_upload_id_marker)
    _add(root, "Prefix", enc(params.get("prefix", "")))
    if params.get("delimiter"):
        _add(root, "Delimiter", enc(params["delimiter"]))
    _add(root, "MaxUploads", params.get("max-uploads", "1000"))
    if enc.url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", page.is_truncated)
    for upload in page.uploads:
        item = _add(root, "Upload")
        _add(item, "Key", enc(upload.key))
        _add(item, "UploadId", upload.upload_id)
        _owner(item, *initiator(upload.initiator or upload.owner), tag="Initiator")
        _owner(item, *owner(upload.owner))
        _add(item, "StorageClass", "STANDARD")
        _add(item, "Initiated", iso_time(upload.initiated_unix_ms))
    for prefix in page.common_prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", enc(prefix))
    return _doc(root)


def delete_result(
    deleted: Sequence[str], failed: Sequence[tuple[str, str, str]], *, quiet: bool
) -> bytes:
    """DeleteResult: deleted keys (omitted when quiet) and (key, code, message) errors."""
    root = _root("DeleteResult")
    if not quiet:
        for key in deleted:
            _add(_add(root, "Deleted"), "Key", key)
    for key, code, message in failed:
        item = _add(root, "Error")
        _add(item, "Key", key)
        _add(item, "Code", code)
        _add(item, "Message", message)
    return _doc(root)


# Request bodies.

#: Limits of a request body's shape (S3's bodies nest 3 deep, a Part holds 8 elements at most).
MAX_DEPTH = 8
MAX_CHILD_ELEMENTS = 32  # in one child of the root, itself included
MAX_DELETE_KEYS = 1000
#: The longest run of bytes without '<': no S3 body has one (a key is 1024 bytes, at most ~6 KiB
#: escaped), and it bounds a start tag, whose attributes expat would expand twentyfold.
MAX_RUN_BYTES = 16 << 10
_LONG_RUN = re.compile(rb"(?<![^<])[^<]{%d}" % (MAX_RUN_BYTES + 1))  # from a run's start only
_FEED_BYTES = 64 << 10  # expat's buffers grow with what one feed hands it


def _malformed(message: str = "The XML you provided was not well-formed") -> s3errors.S3Error:
    return s3errors.S3Error("MalformedXML", message)


def _local(tag: str) -> str:
    """A tag without its namespace: clients differ in sending one."""
    return tag.rpartition("}")[2]


class _Children:
    """An XMLParser target that builds each child of the root as a small tree of its own and
    hands it to `take` once complete, so that a document is never held whole (memory stays
    near the body's size, not the 20-40 times of a full tree). Refuses (MalformedXML) a
    document nested deeper than MAX_DEPTH, with more than max_children children or a child of
    more than MAX_CHILD_ELEMENTS elements. Attributes and the root's own text are dropped."""

    def __init__(
        self,
        take: Callable[[ET.Element], None],
        max_children: int,
        max_elements: int = MAX_CHILD_ELEMENTS,
    ) -> None:
        self.root_tag = ""
        self._take = take
        self._max_children = max_children
        self._max_elements = max_elements
        self._children = 0
        self._depth = 0
        self._elements = 0  # in the current child
        self._builder: ET.TreeBuilder | None = None

    def start(self, tag: str, _attrib: dict[str, str]) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _malformed("the XML is nested too deep")
        if self._depth == 1:
            self.root_tag = _local(tag)
            return
        if self._depth == 2:
            self._children += 1
            if self._children > self._max_children:
                raise _malformed("the XML has too many elements")
            self._builder, self._elements = ET.TreeBuilder(), 0
        self._elements += 1
        if self._elements > self._max_elements:
            raise _malformed("the XML has too many elements")
        assert self._builder is not None
        self._builder.start(_local(tag), {})

    def end(self, tag: str) -> None:
        self._depth -= 1
        if self._builder is None:
            return
        element = self._builder.end(_local(tag))
        if self._depth == 1:
            self._builder = None
            self._take(element)

    def data(self, text: str) -> None:
        if self._builder is not None:
            self._builder.data(text)

    def close(self) -> str:
        return self.root_tag


def _check_bytes(body: bytes) -> None:
    if len(body) > MAX_BODY_BYTES:
        raise _malformed("the XML body is too large")
    try:
        body.decode("utf-8")  # no byte order mark but UTF-8's, no other encoding
    except UnicodeDecodeError:
        raise _malformed() from None
    if b"\0" in body:  # UTF-16 or UTF-32 without a byte order mark (and never valid XML)
        raise _malformed()
    # As the parser reads UTF-8 whatever the document declares, a DTD can only be spelled so.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:  # no S3 body has a DTD: no entity games
        raise _malformed("DTDs are not allowed")
    if _LONG_RUN.search(body):
        raise _malformed("the XML has a text or tag too long")


def _parse(
    body: bytes,
    take: Callable[[ET.Element], None],
    *,
    max_children: int,
    max_child_elements: int = MAX_CHILD_ELEMENTS,
) -> str:
    """Parse body, handing each child of its root to `take` (see `_Children`); the root's tag.
    MalformedXML for anything but a well-formed UTF-8 document within the limits."""
    _check_bytes(body)
    target = _Children(take, max_children, max_child_elements)
    # encoding: a declared encoding is ignored (never looked up among Python's codecs).
    parser = ET.XMLParser(target=target, encoding="utf-8")
    view = memoryview(body)
    try:
        for start in range(0, len(body), _FEED_BYTES):
            parser.feed(bytes(view[start : start + _FEED_BYTES]))
        parser.close()
    except ET.ParseError:
        raise _malformed() from None
    return target.root_tag


def parse_children(
    body: bytes, take: Callable[[ET.Element], None], *, max_children: int, max_child_elements: int
) -> str:
    """Parse a request body of another module's schema within the limits of the module
    docstring (max_child_elements in one child of the root): each child of the root goes to
    `take` as a small tree (tags without namespace, attributes dropped); the root's tag.
    MalformedXML when malformed or past a limit."""
    return _parse(body, take, max_children=max_children, max_child_elements=max_child_elements)


def _text(element: ET.Element, tag: str) -> str | None:
    child = element.find(tag)
    return None if child is None else (child.text or "")


def parse_complete(body: bytes) -> list[tuple[int, str, dict[str, str]]]:
    """CompleteMultipartUpload: (part number, ETag, checksums) in document order, at most
    MAX_PART_NUMBER parts."""
    parts = []

    def take(child: ET.Element) -> None:
        if child.tag == "Part":
            parts.append(_part(child))

    if _parse(body, take, max_children=MAX_PART_NUMBER) != "CompleteMultipartUpload":
        raise _malformed("expected CompleteMultipartUpload")
    if not parts:
        raise _malformed("CompleteMultipartUpload lists no Part")
    return parts


def _part(part: ET.Element) -> tuple[int, str, dict[str, str]]:
    number, etag = _text(part, "PartNumber"), _text(part, "ETag")
    if number is None or etag is None:
        raise _malformed("each Part needs PartNumber and ETag")
    sums = {
        child.tag[len("Checksum") :]: child.text or ""
        for child in part
        if child.tag.startswith("Checksum")
    }
    return _part_number(number), etag.strip().strip('"'), sums


def _part_number(text: str) -> int:
    number = params.uint(text.strip())
    if number is None:
        raise _malformed("a PartNumber is not a number")
    if not 1 <= number <= MAX_PART_NUMBER:
        raise s3errors.S3Error(
            "InvalidArgument",
            f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive",
        )
    return number


def parse_delete(body: bytes) -> tuple[bool, list[str]]:
    """Delete (DeleteObjects): (quiet, keys), at most MAX_DELETE_KEYS keys."""
    quiet: list[str] = []
    keys: list[str] = []

    def take(child: ET.Element) -> None:
        if child.tag == "Quiet":
            quiet.append(child.text or "")
        elif child.tag == "Object":
            key = _text(child, "Key")
            if key is None:
                raise _malformed("each Object needs a Key")
            keys.append(key)

    # A Quiet, the keys, and a little room for elements S3 ignores (e.g. a second Quiet).
    if _parse(body, take, max_children=MAX_DELETE_KEYS + 8) != "Delete":
        raise _malformed("expected Delete")
    if not 1 <= len(keys) <= MAX_DELETE_KEYS:
        raise _malformed(f"Delete takes 1 to {MAX_DELETE_KEYS} objects")
    return bool(quiet) and quiet[0].strip().lower() == "true", keys


def parse_location(body: bytes) -> str:
    """CreateBucketConfiguration: its LocationConstraint ('' when absent or no body)."""
    if not body.strip():
        return ""
    found: list[str] = []

    def take(child: ET.Element) -> None:
        if child.tag == "LocationConstraint":
            found.append(child.text or "")

    _parse(body, take, max_children=16)
    return found[0].strip() if found else ""


def parse_versioning(body: bytes) -> tuple[str, str]:
    """VersioningConfiguration (PutBucketVersioning): (Status, MfaDelete), each '' when absent;
    MalformedXML for another document or a value S3 does not define."""
    found: dict[str, str] = {}

    def take(child: ET.Element) -> None:
        if child.tag in ("Status", "MfaDelete"):
            found.setdefault(child.tag, (child.text or "").strip())

    if _parse(body, take, max_children=16) != "VersioningConfiguration":
        raise _malformed("expected VersioningConfiguration")
    status, mfa_delete = found.get("Status", ""), found.get("MfaDelete", "")
    if status not in ("", "Enabled", "Suspended") or mfa_delete not in ("", "Enabled", "Disabled"):
        raise _malformed("Status is Enabled or Suspended, MfaDelete Enabled or Disabled")
    return status, mfa_delete
