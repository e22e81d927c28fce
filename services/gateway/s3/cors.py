"""S3 CORS: PutBucketCors, GetBucketCors and DeleteBucketCors (`?cors` on a bucket), the
preflight (`OPTIONS` on a bucket or an object) and the CORS headers of actual requests.

The configuration is bucket configuration (`BucketInfo.cors`, set through the object front:
its owner's tenant and admins only), the same on both kinds of bucket. Parsing follows S3: a
CORSConfiguration of 1 to MAX_RULES rules, each with at least one AllowedOrigin and one
AllowedMethod (GET, PUT, HEAD, POST, DELETE: others are InvalidRequest), at most one `*` in an
origin or an allowed header, none in an exposed header, an ID of at most 255 characters and at
most one non-negative MaxAgeSeconds; anything else malformed is MalformedXML. The body must
carry Content-MD5 or an x-amz-checksum-* value (as S3 requires; botocore sends a CRC32), and
it must match.

Evaluation, as S3: the first rule whose origin pattern (`*` matches any run of characters, the
empty one included; anchored; case-sensitive), method and, for a preflight, every requested
header (case-insensitive patterns) match answers. A preflight is never signed (browsers do
not sign it): it reads the bucket's record without any access check and reveals only what
the rules say about that origin — 400 without Origin or Access-Control-Request-Method, 403
AccessForbidden when the bucket does not exist, has no configuration or no rule matches, 200
with the Access-Control-* headers when one does. An actual request with an Origin a rule
allows (the method being Access-Control-Request-Method when sent, else the request's) gets the
same headers, on its errors too (`add_headers`, run as each response is prepared).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence

from aiohttp import web

from kvtier import errors, names
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import auth, object_ops, s3errors, s3request, xmlio

log = logging.getLogger(__name__)

#: The route name of the preflight (S3's "OPTIONS object").
PREFLIGHT = "OptionsPreflight"
#: S3's bounds: rules per configuration, bytes of the document, characters of a rule's ID.
MAX_RULES = 100
MAX_BODY_BYTES = 64 << 10
MAX_ID_CHARS = 255
#: The most distinct header names a preflight may ask for (browsers ask for a few): more are
#: refused unmatched, so that an unsigned request costs little against any configuration.
MAX_REQUESTED_HEADERS = 128
#: The methods a rule may allow.
METHODS = ("GET", "PUT", "HEAD", "POST", "DELETE")
#: Who a preflight acts for: nobody (it reads only the bucket's CORS rules, unchecked).
NOBODY = auth.ANONYMOUS
VARY = "Origin, Access-Control-Request-Headers, Access-Control-Request-Method"
_NOT_ALLOWED = (
    "CORSResponse: This CORS request is not allowed. This is usually because the evalution of "
    "Origin, request method / Access-Control-Request-Method or Access-Control-Request-Headers "
    "are not whitelisted by the resource's CORS spec."
)
_SCHEMA = (
    "The XML you provided was not well-formed or did not validate against our published schema"
)
_RULE_TAGS = frozenset(
    {"ID", "AllowedOrigin", "AllowedMethod", "AllowedHeader", "ExposeHeader", "MaxAgeSeconds"}
)
_MAX_AGE_LIMIT = (1 << 31) - 1  # the record's int32
#: x-amz-checksum-* headers that carry no checksum (a type, an announced algorithm).


def _malformed(message: str = _SCHEMA) -> s3errors.S3Error:
    return s3errors.S3Error("MalformedXML", message)


def _invalid(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidRequest", message)


# The document.


def parse(body: bytes) -> metadata_pb2.CorsConfiguration:
    """The CORSConfiguration of a PutBucketCors body, validated as S3 does (module docstring):
    MalformedXML, InvalidRequest or InvalidArgument."""
    if len(body) > MAX_BODY_BYTES:
        raise _malformed(f"the CORS configuration exceeds {MAX_BODY_BYTES} bytes")
    xmlio._check_bytes(body)  # UTF-8, no NUL, no DTD: as every request body
    try:
        root = ET.fromstring(body, parser=ET.XMLParser(encoding="utf-8"))
    except ET.ParseError:
        raise _malformed() from None
    if _local(root.tag) != "CORSConfiguration":
        raise _malformed()
    children = list(root)
    if any(_local(c.tag) != "CORSRule" for c in children):
        raise _malformed()
    if not children:
        raise _malformed()
    if len(children) > MAX_RULES:
        raise _malformed(f"a CORS configuration holds at most {MAX_RULES} rules")
    return metadata_pb2.CorsConfiguration(rules=[_rule(c) for c in children])


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _values(element: ET.Element) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {tag: [] for tag in _RULE_TAGS}
    for child in element:
        tag = _local(child.tag)
        if tag not in _RULE_TAGS or len(child):
            raise _malformed()
        found[tag].append((child.text or "").strip())
    return found


def _rule(element: ET.Element) -> metadata_pb2.CorsRule:
    found = _values(element)
    if not found["AllowedOrigin"] or not found["AllowedMethod"]:
        raise _malformed()
    if len(found["ID"]) > 1 or len(found["MaxAgeSeconds"]) > 1:
        raise _malformed()
    for method in found["AllowedMethod"]:
        if method not in METHODS:
            raise _invalid(
                f"Found unsupported HTTP method in CORS config. Unsupported method is {method}"
            )
    for kind in ("AllowedOrigin", "AllowedHeader"):
        for value in found[kind]:
            if value.count("*") > 1:
                raise _invalid(f'{kind} "{value}" can not have more than one wildcard.')
    for value in found["ExposeHeader"]:
        if "*" in value:
            raise _invalid(
                f'ExposeHeader "{value}" contains wildcard. We currently do not support '
                "wildcard for ExposeHeader."
            )
    rule = metadata_pb2.CorsRule(
        allowed_origins=found["AllowedOrigin"], allowed_methods=found["AllowedMethod"],
        allowed_headers=found["AllowedHeader"], expose_headers=found["ExposeHeader"],
    )  # fmt: skip
    if found["ID"]:
        if len(found["ID"][0]) > MAX_ID_CHARS:
            raise s3errors.S3Error(
                "InvalidArgument", f"ID length should not exceed allowed limit of {MAX_ID_CHARS}"
            )
        rule.id = found["ID"][0]
    if found["MaxAgeSeconds"]:
        rule.max_age_seconds = _max_age(found["MaxAgeSeconds"][0])
    return rule


def _max_age(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise _malformed() from None
    if value < 0:
        raise _invalid("MaxAgeSeconds must be non-negative.")
    if value > _MAX_AGE_LIMIT:
        raise _malformed()
    return value


def render(config: metadata_pb2.CorsConfiguration) -> bytes:
    """GetBucketCors' document: each rule's members in S3's model order."""
    root = ET.Element("CORSConfiguration", xmlns=xmlio.NS)
    for rule in config.rules:
        item = ET.SubElement(root, "CORSRule")
        if rule.id:
            ET.SubElement(item, "ID").text = rule.id
        for tag, values in (
            ("AllowedHeader", rule.allowed_headers),
            ("AllowedMethod", rule.allowed_methods),
            ("AllowedOrigin", rule.allowed_origins),
            ("ExposeHeader", rule.expose_headers),
        ):
            for value in values:
                ET.SubElement(item, tag).text = value
        if rule.HasField("max_age_seconds"):
            ET.SubElement(item, "MaxAgeSeconds").text = str(rule.max_age_seconds)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


# Matching.


def wildcard_match(pattern: str, value: str, *, fold_case: bool = False) -> bool:
    """Whether value matches pattern, anchored, its one `*` standing for any run of characters
    (the empty one included); case-insensitive when fold_case."""
    if fold_case:
        pattern, value = pattern.lower(), value.lower()
    head, star, tail = pattern.partition("*")
    if not star:
        return pattern == value
    return len(value) >= len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def request_headers(value: str) -> list[str]:
    """The names of an Access-Control-Request-Headers value: lowercase, in order, no empties."""
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def match(
    rules: Iterable[metadata_pb2.CorsRule], origin: str, method: str, headers: Sequence[str] = ()
) -> metadata_pb2.CorsRule | None:
    """The first rule allowing origin, method and every one of headers; None when none does."""
    for rule in rules:
        if method not in rule.allowed_methods:
            continue
        if not any(wildcard_match(p, origin) for p in rule.allowed_origins):
            continue
        if all(
            any(wildcard_match(p, h, fold_case=True) for p in rule.allowed_headers) for h in headers
        ):
            return rule
    return None


def response_headers(
    rule: metadata_pb2.CorsRule, origin: str, requested: Sequence[str] | None = None
) -> dict[str, str]:
    """The Access-Control-* headers (and Vary) S3 answers for rule: the origin itself, or `*`
    (without credentials) when the rule allows every origin; requested: a preflight's
    requested headers, echoed."""
    out: dict[str, str] = {}
    if "*" in rule.allowed_origins:
        out["Access-Control-Allow-Origin"] = "*"
    else:
        out["Access-Control-Allow-Origin"] = origin
        out["Access-Control-Allow-Credentials"] = "true"
    out["Access-Control-Allow-Methods"] = ", ".join(rule.allowed_methods)
    if requested:
        out["Access-Control-Allow-Headers"] = ", ".join(requested)
    if rule.expose_headers:
        out["Access-Control-Expose-Headers"] = ", ".join(rule.expose_headers)
    if rule.HasField("max_age_seconds"):
        out["Access-Control-Max-Age"] = str(rule.max_age_seconds)
    out["Vary"] = VARY
    return out


# The operations.


async def put_bucket_cors(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutBucketCors: replace the bucket's CORS configuration (nothing stored on any error)."""
    await s3.owned_bucket(req)
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    config = parse(raw)
    await s3.front.set_bucket_config(req.bucket, metadata_pb2.SetBucketConfigRequest(cors=config))
    return web.Response(status=200)


async def get_bucket_cors(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketCors: the configuration, or 404 NoSuchCORSConfiguration (a fresh record: what
    any gateway stored last)."""
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    if not info.cors.rules:
        raise s3errors.S3Error(
            "NoSuchCORSConfiguration", "The CORS configuration does not exist", status=404
        )
    return web.Response(body=render(info.cors), content_type="application/xml")


async def delete_bucket_cors(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteBucketCors: 204, whether or not there was a configuration."""
    await s3.owned_bucket(req)
    await s3.front.set_bucket_config(
        req.bucket, metadata_pb2.SetBucketConfigRequest(cors=metadata_pb2.CorsConfiguration())
    )
    return web.Response(status=204)


async def preflight(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """OPTIONS on a bucket or object: unsigned, answered from the bucket's rules only (module
    docstring); reads no object and no body."""
    origin = req.header("Origin")
    requested_method = req.header("Access-Control-Request-Method")
    shown_method = requested_method or "OPTIONS"
    if not origin:
        return _refusal(
            req, "BadRequest", "Insufficient information. Origin request header needed."
        )
    rules = await _rules(s3, req.bucket)
    if rules is None:
        return _refusal(req, "AccessForbidden", "CORSResponse: Bucket not found", shown_method)
    if not rules:
        return _refusal(
            req,
            "AccessForbidden",
            "CORSResponse: CORS is not enabled for this bucket.",
            shown_method,
        )
    if not requested_method:
        return _refusal(
            req,
            "BadRequest",
            "Insufficient information. Access-Control-Request-Method request header needed.",
        )
    requested = request_headers(req.header("Access-Control-Request-Headers"))
    rule = None
    if len(set(requested)) <= MAX_REQUESTED_HEADERS:
        rule = match(rules, origin, requested_method, requested)
    if rule is None:
        kind = "OBJECT" if req.key else "BUCKET"
        return _refusal(req, "AccessForbidden", _NOT_ALLOWED, requested_method, kind)
    response = web.Response(status=200)
    response.headers.update(response_headers(rule, origin, requested))
    return response


async def _rules(s3: s3request.Door, bucket: str) -> Sequence[metadata_pb2.CorsRule] | None:
    """A bucket's CORS rules as this gateway sees it (cached; no access check: the rules are
    what a preflight publishes); None when there is no such bucket."""
    if bucket == names.KV_DURABLE_BUCKET:  # internal: never recorded, never configured
        return None
    try:
        info = await s3.front.bucket_info(bucket)
    except (errors.NotFound, errors.InvalidArgument):
        return None
    return info.cors.rules


def _refusal(
    req: s3request.S3Request,
    code: str,
    message: str,
    method: str = "",
    resource_type: str = "BUCKET",
) -> web.Response:
    """A refused preflight: S3's error document with its Method and ResourceType."""
    root = ET.Element("Error")
    fields = [("Code", code), ("Message", message)]
    if method:
        fields += [("Method", method), ("ResourceType", resource_type)]
    fields += [("RequestId", req.request_id), ("HostId", req.request_id)]
    for tag, text in fields:
        ET.SubElement(root, tag).text = text
    body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")
    status = 400 if code == "BadRequest" else 403
    return web.Response(status=status, body=body, content_type="application/xml")


async def add_headers(s3: s3request.Door, http: web.Request, response: web.StreamResponse) -> None:
    """The CORS headers of an actual request (any but OPTIONS) with an Origin a rule of its
    bucket allows, on any answer, errors included (aiohttp's on_response_prepare: before the
    headers go out, streamed bodies too). The bucket's record is the cached one its handler
    used; a bucket that cannot be read adds nothing."""
    origin = http.headers.get("Origin", "")
    if not origin or http.method == "OPTIONS":
        return
    try:
        bucket, _ = s3.target(http)
    except s3errors.S3Error:
        return
    if not bucket:
        return
    try:
        rules = await _rules(s3, bucket)
    except errors.KVTierError as exc:  # e.g. the metadata service unavailable
        log.debug("no CORS headers for bucket %s: %s", bucket, exc)
        return
    method = http.headers.get("Access-Control-Request-Method") or http.method
    rule = match(rules or (), origin, method)
    if rule is not None:
        response.headers.update(response_headers(rule, origin))
