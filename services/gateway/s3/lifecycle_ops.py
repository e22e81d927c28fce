"""S3 bucket lifecycle: PutBucketLifecycleConfiguration, GetBucketLifecycleConfiguration and
DeleteBucketLifecycle (`?lifecycle` on a bucket, of either kind), the XML and its validation.
What the rules do: `services.gateway.lifecycle` (a KV bucket's objects: their TTL,
`kv_layer.KVLayer`).

The configuration (S3's LifecycleConfiguration): 1 to 1000 Rules, each with an optional ID
(at most 255 characters, unique; a random one when absent), a Status (Enabled or Disabled),
exactly one of a Filter (empty, or one of Prefix, Tag, ObjectSizeGreaterThan,
ObjectSizeLessThan, And{any of them}) or the legacy top-level Prefix, and actions:
Expiration{Days | Date} and AbortIncompleteMultipartUpload{DaysAfterInitiation}. Refusals, as
S3 gives them: MalformedXML for another document or a shape S3's schema refuses (an unknown
element, a second Filter, Days and Date together, no Rule, a Status other than Enabled or
Disabled, a number that is not one); InvalidArgument for Days or DaysAfterInitiation <= 0, a
Date that is not midnight UTC (or not an ISO 8601 date), a duplicate ID, an ID over 255
characters, more than 1000 rules, ObjectSizeGreaterThan >= ObjectSizeLessThan; InvalidRequest
for a rule without an action, AbortIncompleteMultipartUpload with a tag filter, duplicate tag
keys, and a PUT with neither Content-MD5 nor an x-amz-checksum-* (S3 requires one; BadDigest
when it does not match). Transition, NoncurrentVersionTransition, NoncurrentVersionExpiration
and ExpiredObjectDeleteMarker=true are NotImplemented (501): S3 accepts them, kvtier cannot
honour them (no storage classes, no noncurrent versions to expire), and storing a rule that
silently never acts would mislead; InvalidArgument would wrongly call valid S3 input invalid.
Nothing is stored unless the whole configuration is valid.
"""

from __future__ import annotations

import datetime
import re
import secrets
import urllib.parse
import xml.etree.ElementTree as ET

from aiohttp import web

from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import object_ops, s3errors, s3request, xmlio

MAX_RULES = 1000
MAX_ID_CHARS = 255
MAX_PREFIX_BYTES = 1024
#: Elements in one Rule (a Rule filtering on 10 tags holds 43).
_MAX_RULE_ELEMENTS = 64
_NOT_IMPLEMENTED = frozenset(
    {"Transition", "NoncurrentVersionTransition", "NoncurrentVersionExpiration"}
)
_RULE_CHILDREN = frozenset(
    {"ID", "Status", "Filter", "Prefix", "Expiration", "AbortIncompleteMultipartUpload"}
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?")


def _malformed(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("MalformedXML", message)


def _invalid(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidArgument", message)


# Parsing.


def _single(element: ET.Element, allowed: frozenset[str]) -> dict[str, ET.Element]:
    """The children of element by tag: each at most once, each allowed (else MalformedXML)."""
    found: dict[str, ET.Element] = {}
    for child in element:
        if child.tag not in allowed:
            raise _malformed(f"{element.tag} does not take {child.tag}")
        if child.tag in found:
            raise _malformed(f"{element.tag} takes one {child.tag}")
        found[child.tag] = child
    return found


def _text(element: ET.Element) -> str:
    return (element.text or "").strip()


def _uint(element: ET.Element) -> int:
    text = _text(element)
    if not re.fullmatch(r"-?\d{1,19}", text):
        raise _malformed(f"{element.tag} must be an integer")
    return int(text)


def _days(element: ET.Element, what: str) -> int:
    value = _uint(element)
    if value <= 0:
        raise _invalid(f"'{element.tag}' for {what} must be a positive integer")
    if value > 0xFFFFFFFF:
        raise _invalid(f"'{element.tag}' for {what} is too large")
    return value


def parse_date(text: str) -> int:
    """An Expiration Date (ISO 8601, midnight UTC) as unix seconds; InvalidArgument otherwise."""
    if not _DATE.fullmatch(text):
        raise _invalid("'Date' must be an ISO 8601 date at midnight UTC")
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise _invalid("'Date' must be an ISO 8601 date at midnight UTC") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    when = when.astimezone(datetime.UTC)
    if (when.hour, when.minute, when.second, when.microsecond) != (0, 0, 0, 0):
        raise _invalid("'Date' must be at midnight GMT")
    return int(when.timestamp())


def _tag(element: ET.Element, into: metadata_pb2.LifecycleRule) -> None:
    parts = _single(element, frozenset({"Key", "Value"}))
    if "Key" not in parts:
        raise _malformed("a Tag needs a Key")
    key = parts["Key"].text or ""
    value = (parts["Value"].text or "") if "Value" in parts else ""
    if key in into.tags:
        raise s3errors.S3Error("InvalidRequest", "Duplicate Tag Keys are not allowed.")
    into.tags[key] = value


def _condition(element: ET.Element, into: metadata_pb2.LifecycleRule) -> None:
    """One filter condition into the rule."""
    if element.tag == "Prefix":
        into.prefix = element.text or ""
    elif element.tag == "Tag":
        _tag(element, into)
    elif element.tag == "ObjectSizeGreaterThan":
        into.object_size_greater_than = _size(element)
    elif element.tag == "ObjectSizeLessThan":
        into.object_size_less_than = _size(element)
        if into.object_size_less_than == 0:
            raise _invalid("ObjectSizeLessThan must be a positive value")
    else:
        raise _malformed(f"a Filter does not take {element.tag}")


def _size(element: ET.Element) -> int:
    value = _uint(element)
    if value < 0:
        raise _invalid(f"{element.tag} must not be negative")
    return value


def _filter(element: ET.Element, into: metadata_pb2.LifecycleRule) -> None:
    children = list(element)
    if len(children) > 1:
        raise _malformed("a Filter takes one of Prefix, Tag, ObjectSize*, And")
    if not children:
        return
    (child,) = children
    if child.tag != "And":
        _condition(child, into)
        return
    seen: set[str] = set()
    for condition in child:
        if condition.tag != "Tag" and condition.tag in seen:
            raise _malformed(f"And takes one {condition.tag}")
        seen.add(condition.tag)
        _condition(condition, into)


def _expiration(element: ET.Element, into: metadata_pb2.LifecycleRule) -> None:
    parts = _single(element, frozenset({"Days", "Date", "ExpiredObjectDeleteMarker"}))
    marker = (
        _text(parts["ExpiredObjectDeleteMarker"]) if "ExpiredObjectDeleteMarker" in parts else ""
    )
    if marker not in ("", "true", "false"):
        raise _malformed("ExpiredObjectDeleteMarker is true or false")
    if marker == "true":
        raise s3errors.S3Error(
            "NotImplemented", "ExpiredObjectDeleteMarker is not implemented (no delete markers)"
        )
    if "Days" in parts and "Date" in parts:
        raise _malformed("Expiration takes Days or Date, not both")
    if "Days" in parts:
        into.expiration_days = _days(parts["Days"], "Expiration action")
    elif "Date" in parts:
        into.expiration_date_unix_s = parse_date(_text(parts["Date"]))
    elif not marker:
        raise _malformed("Expiration needs Days or Date")


def _rule(element: ET.Element) -> metadata_pb2.LifecycleRule:
    for child in element:
        if child.tag in _NOT_IMPLEMENTED:
            raise s3errors.S3Error(
                "NotImplemented", f"{child.tag} is not implemented: rules only expire objects"
            )
    parts = _single(element, _RULE_CHILDREN)
    rule = metadata_pb2.LifecycleRule()
    rule.id = (parts["ID"].text or "") if "ID" in parts else secrets.token_hex(8)
    if len(rule.id) > MAX_ID_CHARS:
        raise _invalid(f"ID length should not exceed allowed limit of {MAX_ID_CHARS}")
    status = _text(parts["Status"]) if "Status" in parts else ""
    if status not in ("Enabled", "Disabled"):
        raise _malformed("Status is Enabled or Disabled")
    rule.enabled = status == "Enabled"
    if ("Filter" in parts) == ("Prefix" in parts):
        raise _malformed("a Rule takes a Filter or a Prefix (one of them)")
    if "Filter" in parts:
        _filter(parts["Filter"], rule)
    else:
        rule.prefix = parts["Prefix"].text or ""
    _check_filter(rule)
    if "Expiration" in parts:
        _expiration(parts["Expiration"], rule)
    if "AbortIncompleteMultipartUpload" in parts:
        abort = _single(parts["AbortIncompleteMultipartUpload"], frozenset({"DaysAfterInitiation"}))
        if "DaysAfterInitiation" not in abort:
            raise _malformed("AbortIncompleteMultipartUpload needs DaysAfterInitiation")
        rule.abort_incomplete_multipart_days = _days(
            abort["DaysAfterInitiation"], "AbortIncompleteMultipartUpload"
        )
        if rule.tags:
            raise s3errors.S3Error(
                "InvalidRequest", "AbortIncompleteMultipartUpload cannot be specified with Tags."
            )
    if not (
        rule.expiration_days or rule.expiration_date_unix_s or rule.abort_incomplete_multipart_days
    ):
        raise s3errors.S3Error(
            "InvalidRequest", "At least one action needs to be specified in a rule."
        )
    return rule


def _check_filter(rule: metadata_pb2.LifecycleRule) -> None:
    if len(rule.prefix.encode()) > MAX_PREFIX_BYTES:
        raise _invalid(f"The prefix is longer than {MAX_PREFIX_BYTES} bytes")
    low, high = rule.object_size_greater_than, rule.object_size_less_than
    if low and high and low >= high:
        raise _invalid("ObjectSizeGreaterThan must be less than ObjectSizeLessThan")


def parse(body: bytes) -> metadata_pb2.LifecycleConfiguration:
    """A LifecycleConfiguration document; the S3 errors of the module docstring."""
    config = metadata_pb2.LifecycleConfiguration()

    def take(child: ET.Element) -> None:
        if child.tag != "Rule":
            raise _malformed(f"LifecycleConfiguration does not take {child.tag}")
        if len(config.rules) >= MAX_RULES:
            raise _invalid(f"A lifecycle configuration holds at most {MAX_RULES} rules")
        config.rules.append(_rule(child))

    root = xmlio.parse_children(
        body, take, max_children=MAX_RULES + 1, max_child_elements=_MAX_RULE_ELEMENTS
    )
    if root != "LifecycleConfiguration":
        raise _malformed("expected LifecycleConfiguration")
    if not config.rules:
        raise _malformed("a LifecycleConfiguration needs a Rule")
    ids = [rule.id for rule in config.rules]
    if len(set(ids)) != len(ids):
        raise _invalid("Rule ID must be unique. Found same ID for more than one rule")
    return config


# Rendering.


def _add(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = str(text)
    return child


def _render_filter(parent: ET.Element, rule: metadata_pb2.LifecycleRule) -> None:
    conditions: list[tuple[str, object]] = []
    if rule.prefix:
        conditions.append(("Prefix", rule.prefix))
    conditions += [("Tag", (k, v)) for k, v in sorted(rule.tags.items())]
    if rule.object_size_greater_than:
        conditions.append(("ObjectSizeGreaterThan", rule.object_size_greater_than))
    if rule.object_size_less_than:
        conditions.append(("ObjectSizeLessThan", rule.object_size_less_than))
    where = _add(parent, "Filter")
    if not conditions:
        _add(where, "Prefix", "")
        return
    if len(conditions) > 1:
        where = _add(where, "And")
    for tag, value in conditions:
        if tag == "Tag":
            assert isinstance(value, tuple)
            element = _add(where, "Tag")
            _add(element, "Key", value[0])
            _add(element, "Value", value[1])
        else:
            _add(where, tag, value)


def render(config: metadata_pb2.LifecycleConfiguration) -> bytes:
    """The LifecycleConfiguration document of a stored configuration."""
    root = ET.Element("LifecycleConfiguration", xmlns=xmlio.NS)
    for rule in config.rules:
        element = _add(root, "Rule")
        _add(element, "ID", rule.id)
        _render_filter(element, rule)
        _add(element, "Status", "Enabled" if rule.enabled else "Disabled")
        if rule.expiration_days or rule.expiration_date_unix_s:
            expiration = _add(element, "Expiration")
            if rule.expiration_days:
                _add(expiration, "Days", rule.expiration_days)
            else:
                _add(expiration, "Date", xmlio.iso_time(rule.expiration_date_unix_s * 1000))
        if rule.abort_incomplete_multipart_days:
            abort = _add(element, "AbortIncompleteMultipartUpload")
            _add(abort, "DaysAfterInitiation", rule.abort_incomplete_multipart_days)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


# Handlers.


async def put_lifecycle(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutBucketLifecycleConfiguration: replace the bucket's rules (owner or admin)."""
    await s3.owned_bucket(req)
    body = await req.payload.read_all(xmlio.MAX_BODY_BYTES)
    object_ops.check_body_digest(req, body)
    config = parse(body)
    await s3.front.set_bucket_config(
        req.bucket, metadata_pb2.SetBucketConfigRequest(lifecycle=config)
    )
    return web.Response(status=200)


async def get_lifecycle(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketLifecycleConfiguration: the rules; 404 NoSuchLifecycleConfiguration without."""
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    if not info.lifecycle.rules:
        raise s3errors.S3Error(
            "NoSuchLifecycleConfiguration",
            "The lifecycle configuration does not exist",
            status=404,
        )
    return web.Response(body=render(info.lifecycle), content_type="application/xml")


async def delete_lifecycle(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteBucketLifecycle: remove every rule (204, with rules or without)."""
    await s3.owned_bucket(req)
    await s3.front.set_bucket_config(
        req.bucket,
        metadata_pb2.SetBucketConfigRequest(lifecycle=metadata_pb2.LifecycleConfiguration()),
    )
    return web.Response(status=204)


# KV buckets.


def tags_of(req: s3request.S3Request, headers: pb.ObjectHeaders) -> dict[str, str]:
    """An object's tags at its PUT: the stored headers' when set, else x-amz-tagging."""
    if headers.tags:
        return dict(headers.tags)
    return dict(urllib.parse.parse_qsl(req.header("x-amz-tagging"), keep_blank_values=True))


#: server._routes entries: (method, level, query keys, op, handler).
ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    ("GET", "bucket", ("lifecycle",), "GetBucketLifecycleConfiguration", get_lifecycle),
    ("PUT", "bucket", ("lifecycle",), "PutBucketLifecycleConfiguration", put_lifecycle),
    ("DELETE", "bucket", ("lifecycle",), "DeleteBucketLifecycle", delete_lifecycle),
]
#: The operations, the same on both bucket kinds (kv_ops.SHARED).
OPS = frozenset(op for _, _, _, op, _ in ROUTES)
