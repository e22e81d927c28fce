"""S3 object tags: the tag set's rules (as S3 checks them) and its encodings: the x-amz-tagging
header (URL query encoding), the Tagging XML document, and the x-amz-tagging-directive of a
CopyObject. Pure: no I/O (the operations: `tagging_ops`).

S3's rules, with its codes: at most 10 tags (BadRequest), a key of 1-128 and a value of at most
256 Unicode characters, of letters, digits, whitespace and `+ - = . _ : / @`, no key twice, no key
starting with `aws:` (InvalidTag); a Tagging document of another shape is MalformedXML.
"""

from __future__ import annotations

import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping

from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway.s3 import s3errors, xmlio

MAX_TAGS = 10
#: A bucket's (PutBucketTagging).
MAX_BUCKET_TAGS = 50
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256
#: Elements of a TagSet parsed before MalformedXML (10 tags take 31, a bucket's 50 take 151;
#: more get BadRequest / InvalidTag).
_MAX_TAGSET_ELEMENTS = 1 + 3 * 64
_ALLOWED = re.compile(r"[\w\s+\-=.:/@]*")


def _invalid(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidTag", message, status=400)


def check(tags: list[tuple[str, str]], *, bucket: bool = False) -> dict[str, str]:
    """The tag set of (key, value) pairs in the order given, checked as S3 does (module
    docstring; a bucket may have MAX_BUCKET_TAGS); raises its S3 error."""
    if bucket and len(tags) > MAX_BUCKET_TAGS:
        raise _invalid(f"Bucket tags cannot be greater than {MAX_BUCKET_TAGS}")
    if not bucket and len(tags) > MAX_TAGS:
        raise s3errors.S3Error(
            "BadRequest", f"Object tags cannot be greater than {MAX_TAGS}", status=400
        )
    out: dict[str, str] = {}
    for key, value in tags:
        if not 0 < len(key) <= MAX_KEY_CHARS or not _ALLOWED.fullmatch(key):
            raise _invalid("The TagKey you have provided is invalid")
        if len(value) > MAX_VALUE_CHARS or not _ALLOWED.fullmatch(value):
            raise _invalid("The TagValue you have provided is invalid")
        if key.lower().startswith("aws:"):
            raise _invalid("Your TagKey cannot be prefixed with aws:")
        if key in out:
            raise _invalid("Cannot provide multiple Tags with the same key")
        out[key] = value
    return out


def parse_header(value: str) -> dict[str, str]:
    """The tags of an x-amz-tagging value (URL query encoding: `k1=v1&k2=v2`). As in a query
    string, and as S3 reads it, a pair without `=` is a key with an empty value (`k1=v1&k2`)."""
    if not value:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(value, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise _invalid(
            "The header 'x-amz-tagging' shall be encoded as UTF-8 then URLEncoded URL query "
            "parameters without tag name duplicates."
        ) from None
    return check(pairs)


def parse_xml(body: bytes, *, bucket: bool = False) -> dict[str, str]:
    """The tags of a Tagging document (`<Tagging><TagSet><Tag><Key/><Value/></Tag>...`)."""
    pairs: list[tuple[str, str]] = []
    sets = 0

    def take(child: ET.Element) -> None:
        nonlocal sets
        sets += 1
        if child.tag != "TagSet" or sets > 1:
            raise s3errors.S3Error("MalformedXML", "The XML you provided was not well-formed")
        for tag in child:
            key, value = tag.find("Key"), tag.find("Value")
            if tag.tag != "Tag" or key is None or value is None or len(tag) != 2:
                raise s3errors.S3Error("MalformedXML", "The XML you provided was not well-formed")
            pairs.append((key.text or "", value.text or ""))

    root = xmlio.parse_children(body, take, max_children=1, max_child_elements=_MAX_TAGSET_ELEMENTS)
    if root != "Tagging" or sets != 1:
        raise s3errors.S3Error("MalformedXML", "The XML you provided was not well-formed")
    return check(pairs, bucket=bucket)


def render(tags: Mapping[str, str]) -> bytes:
    """A Tagging document of tags."""
    root = ET.Element("Tagging", xmlns=xmlio.NS)
    tag_set = ET.SubElement(root, "TagSet")
    for key, value in sorted(tags.items()):  # byte order: the stored map has none
        tag = ET.SubElement(tag_set, "Tag")
        ET.SubElement(tag, "Key").text = key
        ET.SubElement(tag, "Value").text = value
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def for_copy(
    header: Callable[[str], str], headers: pb.ObjectHeaders, source_tags: Mapping[str, str]
) -> pb.ObjectHeaders:
    """headers (of a CopyObject's new object) with the tags its x-amz-tagging-directive names:
    the source's (COPY, the default) or x-amz-tagging's (REPLACE). header: the request's."""
    directive = (header("x-amz-tagging-directive") or "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise s3errors.S3Error("InvalidArgument", "Unknown tagging directive.")
    headers.tags.clear()
    headers.tags.update(
        parse_header(header("x-amz-tagging")) if directive == "REPLACE" else source_tags
    )
    return headers
