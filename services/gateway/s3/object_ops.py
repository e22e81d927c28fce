"""S3 object operations: PutObject, CopyObject, GetObject, HeadObject, DeleteObject and
DeleteObjects, with S3's conditional requests, ranges, headers and checksums."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from kvtier import checksums, errors, names
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import multipart, objectlayer, versions
from services.gateway.s3 import (
    acl,
    conditions,
    ownership,
    params,
    response_body,
    s3errors,
    s3request,
    tags,
    versioning_ops,
    xmlio,
)

log = logging.getLogger(__name__)

# Conditions and ranges live in `conditions`; re-exported here for importers.
check_conditions = conditions.check_conditions
parse_range = conditions.parse_range
parse_copy_range = conditions.parse_copy_range
requested_part = conditions.requested_part

MAX_PUT_BYTES = 5 << 30
MAX_META_BYTES = 2048
CHECKSUM_HEADER = "x-amz-checksum-"
ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


def check_key(key: str) -> None:
    """KeyTooLongError / InvalidArgument per S3's rules (keys never become paths)."""
    try:
        names.check_key(key)
    except errors.InvalidArgument as exc:
        code = "KeyTooLongError" if exc.reason == "KeyTooLongError" and key else "InvalidArgument"
        raise s3errors.S3Error(code, exc.message) from None


def request_headers(req: s3request.S3Request) -> pb.ObjectHeaders:
    """The standard headers, x-amz-meta-* and ACL of a PUT (aws-chunked is transport, not
    stored)."""
    h = req.http.headers
    encoding = ", ".join(
        e.strip() for e in h.get("Content-Encoding", "").split(",") if e.strip() != "aws-chunked"
    )
    out = pb.ObjectHeaders(
        content_type=h.get("Content-Type", ""), content_encoding=encoding,
        content_disposition=h.get("Content-Disposition", ""),
        cache_control=h.get("Cache-Control", ""), content_language=h.get("Content-Language", ""),
        expires=h.get("Expires", ""),
    )  # fmt: skip
    size = 0
    for name, value in h.items():
        if name.lower().startswith("x-amz-meta-"):
            key = name.lower()[len("x-amz-meta-") :]
            out.user_metadata[key] = value
            size += len(key) + len(value.encode())
    if size > MAX_META_BYTES:
        raise s3errors.S3Error("MetadataTooLarge", f"user metadata is {size} bytes, 2 KB at most")
    out.tags.update(tags.parse_header(req.header("x-amz-tagging")))
    # x-amz-acl / x-amz-grant-*: the new object's ACL (none: private; never the source's),
    # relative to its owner: the writer's tenant when admitted to another's bucket, unless
    # the bucket's Object Ownership gives it the bucket's (`ownership.object_owner`).
    owner = ""
    if req.bucket_owner:
        writer = acl.writer(req.principal, req.bucket_owner)
        owner = ownership.object_owner(req.object_ownership, h, writer, req.bucket_owner)
    wanted = acl.object_acl(h, req.bucket_owner, owner)
    if wanted is not None:
        out.acl.CopyFrom(wanted)
    return out


def content_md5(req: s3request.S3Request) -> str:
    """The hex MD5 of a Content-MD5 header ('' when absent); InvalidDigest when malformed,
    empty included (as S3: an empty header is not an absent one)."""
    value = req.http.headers.get("Content-MD5")
    if value is None:
        return ""
    try:
        digest = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise s3errors.S3Error(
            "InvalidDigest", "The Content-MD5 you specified is not valid."
        ) from None
    if len(digest) != 16:
        raise s3errors.S3Error("InvalidDigest", "The Content-MD5 you specified is not valid.")
    return digest.hex()


#: x-amz-checksum-* headers that name no checksum value.
_NOT_CHECKSUM_VALUES = frozenset({"x-amz-checksum-type", "x-amz-checksum-algorithm"})


def check_body_digest(req: s3request.S3Request, raw: bytes) -> None:
    """S3's rule for configuration bodies (CORS, lifecycle, tagging): Content-MD5 or an
    x-amz-checksum-* value (a header, or a trailer of an aws-chunked body) is required
    (InvalidRequest) and must match (BadDigest; a malformed Content-MD5 is InvalidDigest)."""
    sums = {
        name.lower()[len(CHECKSUM_HEADER) :].upper(): value
        for name, value in [*req.http.headers.items(), *req.payload.trailers.items()]
        if name.lower().startswith(CHECKSUM_HEADER) and name.lower() not in _NOT_CHECKSUM_VALUES
    }
    md5 = content_md5(req)
    if not md5 and not sums:
        raise s3errors.S3Error(
            "InvalidRequest", "Missing required header for this request: Content-MD5"
        )
    if md5 and hashlib.md5(raw).hexdigest() != md5:
        raise s3errors.S3Error("BadDigest", "The Content-MD5 you specified did not match.")
    for algorithm, value in sums.items():
        if algorithm not in ALGORITHMS:
            raise s3errors.S3Error(
                "InvalidRequest", f"unknown checksum {CHECKSUM_HEADER}{algorithm.lower()}"
            )
        hasher = checksums.new(algorithm)
        hasher.update(raw)
        if checksums.b64(hasher.digest()) != value.strip():
            raise s3errors.S3Error(
                "BadDigest", f"The {algorithm} you specified did not match the calculated checksum."
            )


def checksum_request(req: s3request.S3Request) -> tuple[list[str], dict[str, str]]:
    """(algorithms to compute, expected values) from x-amz-checksum-*, the SDK's algorithm
    header and announced trailers."""
    wanted: list[str] = []
    expected: dict[str, str] = {}
    for name, value in req.http.headers.items():
        lower = name.lower()
        if lower.startswith(CHECKSUM_HEADER) and lower != "x-amz-checksum-type":
            algorithm = lower[len(CHECKSUM_HEADER) :].upper()
            if algorithm not in ALGORITHMS:
                raise s3errors.S3Error("InvalidRequest", f"unknown checksum {name}")
            expected[algorithm] = value
    announced = [req.header("x-amz-sdk-checksum-algorithm"), req.header("x-amz-checksum-algorithm")]
    for trailer in req.header("x-amz-trailer").split(","):
        trailer = trailer.strip().lower()
        if trailer.startswith(CHECKSUM_HEADER):
            announced.append(trailer[len(CHECKSUM_HEADER) :])
    for algorithm in (a.upper() for a in announced if a):
        if algorithm not in ALGORITHMS:
            raise s3errors.S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm}")
        if algorithm not in wanted:
            wanted.append(algorithm)
    return wanted, expected


async def receive(
    s3: s3request.Door, req: s3request.S3Request, write_id: str, size: int
) -> datanode_pb2.ShardMeta:
    """Stream the body into a begun write and commit it (`objectlayer.receive`)."""
    return await objectlayer.receive(s3.front.engine, req.payload, write_id, size)


def translate_digest_error(req: s3request.S3Request, exc: errors.KVTierError) -> Exception:
    """A BadDigest on SHA256 that the client did not send itself is the signed payload hash."""
    if (
        req.payload.sha256_hex
        and isinstance(exc, errors.DigestMismatch)
        and exc.algorithm == "SHA256"
        and not req.header("x-amz-checksum-sha256")
    ):
        return s3errors.S3Error(
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    return exc


def begin_request(req: s3request.S3Request, bucket: str, key: str, size: int) -> pb.BeginPutRequest:
    """The BeginPut of a PUT's body, with digests and checksums to check."""
    wanted, expected = checksum_request(req)
    if req.payload.sha256_hex:  # the signed payload hash: checked like a checksum
        raw = bytes.fromhex(req.payload.sha256_hex)
        expected.setdefault("SHA256", base64.b64encode(raw).decode())
    return pb.BeginPutRequest(
        bucket=bucket, key=key, size=size, headers=request_headers(req),
        checksum_algorithms=wanted, expected_checksums=expected,
        if_none_match=req.header("If-None-Match") == "*", expected_md5=content_md5(req),
        if_match=req.header("If-Match"),
    )  # fmt: skip


def trailer_checked(req: s3request.S3Request) -> bool:
    """Whether the body's integrity rests on a trailing x-amz-checksum-* (aws-chunked, as the
    AWS SDKs' flexible checksums send it) and nothing asks for an MD5 (no Content-MD5)."""
    mode = req.header("x-amz-content-sha256")  # the decoder then insists on the trailer
    trailer = req.header("x-amz-trailer").strip().lower()
    return (
        mode.startswith("STREAMING-")
        and mode.endswith("-TRAILER")
        and trailer.startswith(CHECKSUM_HEADER)
        and not req.header("Content-MD5")
    )


async def put_object(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutObject (CopyObject when x-amz-copy-source is set) on either bucket kind, through
    its object layer (whose own limits apply: a KV bucket's size, its Content-Length)."""
    layer = await s3.layer(req)
    if req.header("x-amz-copy-source"):
        return await copy_object(s3, req, layer)
    check_key(req.key)
    size = req.payload.size
    if size < 0 and "chunked" not in req.header("Transfer-Encoding").lower():
        raise s3errors.S3Error("MissingContentLength", "You must provide the Content-Length.")
    if size > MAX_PUT_BYTES:
        raise s3errors.S3Error("EntityTooLarge", "Your proposed upload exceeds 5 GiB.")
    bound = size if size >= 0 else MAX_PUT_BYTES  # a chunked body: until it ends
    conditions.check_write_conditions(req)
    md5 = not trailer_checked(req)  # else the trailing checksum vouches for the bytes
    try:
        info = await layer.put(begin_request(req, req.bucket, req.key, bound), req.payload, md5=md5)
    except errors.InvalidArgument as exc:
        raise translate_digest_error(req, exc) from None
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(info.etag)
    checksum_headers(response, info.checksums, req)
    versioning_ops.stamp(response, info, False)
    return response


def checksum_headers(
    response: web.StreamResponse, sums: Mapping[str, str], req: s3request.S3Request
) -> None:
    """x-amz-checksum-* of the checksums (sums) the request sent or asked for."""
    if not sums:  # the usual PUT (none asked for): no second pass over the headers
        return
    sent = {a.upper() for a in checksum_request(req)[0]} | {
        n.lower()[len(CHECKSUM_HEADER) :].upper()
        for n in req.http.headers
        if n.lower().startswith(CHECKSUM_HEADER)
    }
    for name, value in sums.items():
        if name in sent:
            response.headers[f"{CHECKSUM_HEADER}{name.lower()}"] = value


def info_headers(
    response: web.StreamResponse, info: pb.ObjectInfo, req: s3request.S3Request
) -> None:
    """ETag, Last-Modified, the stored standard headers, x-amz-meta-* and the `response-*`
    overrides of a request (any bucket kind)."""
    h = info.headers
    out = response.headers
    out["ETag"] = xmlio.quoted(info.etag)
    out["Last-Modified"] = xmlio.http_time(info.mtime_unix_ms)
    out["Accept-Ranges"] = "bytes"
    out["Content-Type"] = h.content_type or "binary/octet-stream"
    for name, value in (
        ("Content-Encoding", h.content_encoding), ("Content-Disposition", h.content_disposition),
        ("Cache-Control", h.cache_control), ("Content-Language", h.content_language),
        ("Expires", h.expires),
    ):  # fmt: skip
        if value:
            out[name] = value
    for key, value in h.user_metadata.items():
        out[f"x-amz-meta-{key}"] = value
    if h.tags:
        out["x-amz-tagging-count"] = str(len(h.tags))
    for param, header in _OVERRIDES.items():
        if param in req.query:
            out[header] = req.query[param]


def object_headers(
    response: web.StreamResponse, info: pb.ObjectInfo, req: s3request.S3Request
) -> None:
    """info_headers, the parts count, and (when asked with x-amz-checksum-mode: ENABLED) the
    whole object's checksums."""
    info_headers(response, info, req)
    out = response.headers
    one_part = "partNumber" in req.query and multipart.is_multipart_etag(info.etag)
    if info.parts > 1 or one_part:
        out["x-amz-mp-parts-count"] = str(info.parts)
    # A part of a multipart object does not have the whole object's checksum.
    whole = "Range" not in req.http.headers and not one_part
    if req.header("x-amz-checksum-mode").upper() == "ENABLED" and whole:
        for name, value in info.checksums.items():
            out[f"{CHECKSUM_HEADER}{name.lower()}"] = value
            out["x-amz-checksum-type"] = checksum_type(value)


def checksum_type(value: str) -> str:
    """S3's checksum type of a stored object checksum: a checksum of part checksums ends "-N"
    (no base64 digit is a '-'), the CRC of the whole body (a PUT's, a FULL_OBJECT upload's)
    does not."""
    return "COMPOSITE" if "-" in value else "FULL_OBJECT"


def part_checksum_headers(
    response: web.StreamResponse, reader: objectlayer.ObjectReader, req: s3request.S3Request
) -> None:
    """A partNumber GET/HEAD of a multipart object: the part's checksum (the upload's
    algorithm) and the object's checksum type, as S3 and RGW answer it."""
    number = params.uint(req.query.get("partNumber", ""))
    parts = reader.uploaded_parts() if number else None
    if not number or not parts or number > len(parts):
        return
    for name, value in parts[number - 1].checksums.items():
        whole = reader.info.checksums.get(name.upper(), "")
        if whole:
            response.headers[f"{CHECKSUM_HEADER}{name.lower()}"] = value
            response.headers["x-amz-checksum-type"] = checksum_type(whole)


async def _read(
    s3: s3request.Door, req: s3request.S3Request, *, data: bool
) -> tuple[objectlayer.ObjectReader, int, int, web.StreamResponse]:
    """What a GET or HEAD reads, on either bucket kind: the version (versionId) opened through
    the bucket's object layer, its conditions checked (304, 412), then the part (partNumber),
    the range (Range: 206, 416) or all of it: (reader, first byte, length, the response with
    its status and headers)."""
    layer = await s3.layer(req)
    check_key(req.key)
    version = versioning_ops.requested(req)
    try:
        reader = await layer.open_read(req.bucket, req.key, version, data=data)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    info = reader.info
    check_conditions(req.header, info.etag, info.mtime_unix_ms, for_read=True)
    span = requested_part(req, reader)
    span = span if span is not None else parse_range(req.header("Range"), info.size)
    first, last = span if span else (0, info.size - 1)
    partial = span is not None and last >= first  # an empty part: 200, no Content-Range
    response = web.StreamResponse(status=206 if partial else 200)
    object_headers(response, info, req)
    part_checksum_headers(response, reader, req)
    await versioning_ops.stamp_info(s3, req.bucket, response, info)
    if partial:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    response.content_length = last - first + 1
    return reader, first, last - first + 1, response


async def head_object(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """The object's headers (conditions apply), its metadata only read."""
    return (await _read(s3, req, data=False))[3]


async def get_object(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """The object's bytes, whole, one part or one range (206), streamed a piece at a time
    (each written while the layer gathers the next: send_body)."""
    reader, first, length, response = await _read(s3, req, data=True)
    return await send_body(s3, req, response, reader, first, length)


async def send_body(
    s3: s3request.Door,
    req: s3request.S3Request,
    response: web.StreamResponse,
    reader: objectlayer.ObjectReader,
    first: int,
    length: int,
) -> web.StreamResponse:
    """Stream length bytes of reader from first as response's body (any bucket kind), each
    piece written while the next is gathered (response_body); the status line goes out with
    the first piece."""
    writer = response_body.BodyWriter(response, s3.send_timeout_s)

    async def sink(view: memoryview) -> None:
        # The status line goes out with the first piece: a GET whose first piece cannot be
        # gathered (too few shards readable right now) answers a typed 503 that SDKs retry,
        # instead of a 200 whose body stops at byte 0.
        if not response.prepared:
            await response.prepare(req.http)
        await writer.sink(view)

    try:
        await reader.stream(first, length, sink, writer.ready, writer.buffer)
        if not response.prepared:  # an empty body
            await response.prepare(req.http)
        await writer.finish()
    except (errors.KVTierError, OSError) as exc:
        if not response.prepared:
            raise  # nothing sent yet: the error's own S3 reply (finally closes the writer)
        # The status line is gone: all that is left is to cut the body short, which the
        # client sees as fewer bytes than Content-Length.
        log.warning("GET %s/%s failed mid-body: %s", req.bucket, req.key, exc)
        if req.http.transport is not None:
            if isinstance(exc, TimeoutError):
                # A client that reads nothing would keep a closing connection (and what it
                # left unread) open forever.
                req.http.transport.abort()
            else:
                req.http.transport.close()
        return response
    finally:
        writer.close()
    await response.write_eof()
    return response


async def delete_object(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """204 whether or not the key existed; in a versioned bucket a delete marker is written
    (without versionId) or the version removed (x-amz-version-id, x-amz-delete-marker)."""
    layer = await s3.layer(req)
    check_key(req.key)
    version = versioning_ops.requested(req)
    info = await layer.delete(req.bucket, req.key, version)
    response = web.Response(status=204)
    if info.version_id:
        versioning_ops.stamp(response, info, True)
    return response


async def delete_objects(
    s3: s3request.Door,
    req: s3request.S3Request,
    *,
    allowed: Callable[[str, str], Awaitable[bool]] | None = None,
) -> web.Response:
    """Delete up to 1000 keys; per-key errors in the result, not the status. allowed(key,
    version): whether the caller may delete that entry (AccessDenied for it otherwise: the
    bucket policy's per-entry decision, `policy_ops.delete_objects`; None: every entry)."""
    layer = await s3.layer(req)
    raw = await req.payload.read_all(xmlio.MAX_BODY_BYTES)
    md5 = content_md5(req)
    if md5 and hashlib.md5(raw).hexdigest() != md5:
        raise s3errors.S3Error("BadDigest", "The Content-MD5 you specified did not match.")
    quiet, targets = versioning_ops.parse_delete(raw)
    gate = asyncio.Semaphore(16)

    async def one(key: str, version: str) -> pb.ObjectInfo | s3errors.S3Error:
        async with gate:
            try:
                check_key(key)
                if allowed is not None and not await allowed(key, version):
                    return s3errors.S3Error("AccessDenied", "Access Denied")
                return await layer.delete(req.bucket, key, version)
            except s3errors.S3Error as exc:
                return exc
            except errors.KVTierError as exc:
                return s3errors.from_domain(exc)

    results = await asyncio.gather(*(one(k, v) for k, v in targets))
    body = versioning_ops.delete_result(targets, results, quiet=quiet)
    return web.Response(body=body, content_type="application/xml")


def copy_source(req: s3request.S3Request) -> tuple[str, str, str]:
    """(bucket, key, version id or '') of x-amz-copy-source ('bucket/key' or '/bucket/key',
    URL-encoded, optionally '?versionId=...')."""
    raw = req.header("x-amz-copy-source")
    path, _, query = raw.partition("?")
    found = urllib.parse.parse_qs(query, keep_blank_values=True).get("versionId")
    version = versioning_ops.check(found[0]) if found else ""
    bucket, _, key = urllib.parse.unquote(path).lstrip("/").partition("/")
    if not bucket or not key:
        raise s3errors.S3Error("InvalidArgument", "Copy Source must mention the bucket and key")
    return bucket, key, version


async def source_for_copy(
    s3: s3request.Door, req: s3request.S3Request
) -> tuple[str, str, datanode_pb2.ShardMeta]:
    """The copy source, its x-amz-copy-source-if-* checked; a source version (versionId) is
    that version's. Read as the principal's GetObject would be: its own bucket's, or one the
    ACL gate admitted it to as a copy's source (the version's ACL or the bucket's policy:
    `acl_ops`); NoSuchBucket, AccessDenied (NoSuchKey where it may list the bucket)."""
    bucket, key, version = copy_source(req)
    try:
        meta = (await s3.front.resolve(bucket, key, version, source=True)).meta
    except errors.NotFound as exc:
        if exc.reason == "NoSuchBucket":
            raise
        mapped = versioning_ops.not_found(exc, version)
        if mapped.code == "MethodNotAllowed":  # S3: copying a delete marker is a 400
            mapped = s3errors.S3Error("InvalidRequest", "The source of a copy is a delete marker")
        raise mapped from None

    def get(name: str) -> str:
        return req.header(f"x-amz-copy-source-{name.lower()}")

    check_conditions(get, meta.etag, meta.mtime_unix_ns // 1_000_000, for_read=False)
    return bucket, key, meta


async def copy_object(
    s3: s3request.Door, req: s3request.S3Request, layer: objectlayer.ObjectLayer
) -> web.Response:
    """CopyObject into the request's bucket (its object layer: NotImplemented on KV buckets):
    metadata directive COPY (default) or REPLACE; conditions on the source."""
    if not layer.copies:
        raise s3errors.S3Error("NotImplemented", "CopyObject is not implemented on this bucket")
    check_key(req.key)
    src_bucket, src_key, src = await source_for_copy(s3, req)
    directive = req.header("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise s3errors.S3Error("InvalidArgument", "Unknown metadata directive.")
    if (src_bucket, src_key) == (req.bucket, req.key) and directive == "COPY":
        raise s3errors.S3Error(
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself "
            "without changing the object's metadata.",
        )
    headers = request_headers(req)
    if directive == "COPY":  # the source's headers; the ACL stays the request's
        copied = versions.info(src).headers
        copied.acl.CopyFrom(headers.acl)
        headers = copied
    info = await layer.copy(
        pb.CopyObjectRequest(
            src_bucket=src_bucket, src_key=src_key, dst_bucket=req.bucket, dst_key=req.key,
            replace_headers=True, headers=tags.for_copy(req.header, headers, src.tags),
            src_version_id=copy_source(req)[2],
        )
    )  # fmt: skip
    response = web.Response(
        body=xmlio.copy_result("CopyObjectResult", info.etag, info.mtime_unix_ms, {}),
        content_type="application/xml",
    )
    versioning_ops.stamp(response, info, False)
    if src.keep_versions:
        response.headers["x-amz-copy-source-version-id"] = versions.info(src).version_id
    return response
