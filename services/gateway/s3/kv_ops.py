"""S3 on KV buckets: objects served by the KV-cache tier (DRAM pools with eviction, TTL, pins
and quotas) instead of the erasure-coded tier. Put, Get (ranges), Head, Delete, DeleteObjects,
ListObjects(V2) and multipart uploads (`kv_multipart`) behave as on any bucket; copies are
NotImplemented. Objects hold at most MAX_KV_OBJECT_BYTES (64 MiB), exactly: one byte more is
EntityTooLarge.

Blocks live in the bucket's namespace (`s3:<storage name>`, i.e. `s3:<bucket>@<storage_id>`,
plain `s3:<bucket>` for buckets older than storage ids, so a bucket deleted and created again
never sees the earlier one's blocks; the bucket's tenant). An object is a data block (a 16-byte
version id, then the bytes), a tail block with the same id when 64 MiB do not fit one block
with the id, and a metadata block carrying the id (layout: `kv_layout`). A PUT writes the data
blocks, then the metadata block (put-if-absent with If-None-Match: * claims the metadata block
first). A GET reads the metadata (size, version), then the data blocks, and retries when the
versions differ (a concurrent overwrite): it never returns one writer's headers with another's
bytes. Any block may be evicted: the object is then gone (NoSuchKey).
"""

from __future__ import annotations

from aiohttp import web

from kvtier import errors
from services.gateway.s3 import (
    bucket_ops,
    kv_layer,
    kv_layout,
    kv_multipart,
    lifecycle_ops,
    multipart_ops,
    object_ops,
    s3errors,
    s3request,
    tagging_ops,
    xmlio,
)

MAX_KV_OBJECT_BYTES = kv_layout.MAX_KV_OBJECT_BYTES


async def put_object(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutObject into DRAM blocks (the body is read whole: KV objects are blocks)."""
    if req.header("x-amz-copy-source"):
        raise s3errors.S3Error("NotImplemented", "CopyObject is not implemented on KV buckets")
    object_ops.check_key(req.key)
    size = req.payload.size
    if size < 0:
        raise s3errors.S3Error("MissingContentLength", "You must provide the Content-Length.")
    if size > MAX_KV_OBJECT_BYTES:
        raise s3errors.S3Error(
            "EntityTooLarge", f"KV bucket objects hold {MAX_KV_OBJECT_BYTES} bytes at most"
        )
    layer = kv_layer.KVLayer(s3.front, s3.kv_buckets, lifecycle_day_s=s3.lifecycle_day_s)
    md5 = not kv_layout.trailer_checked(req)  # else the trailing checksum vouches for the bytes
    try:
        info = await layer.put(
            object_ops.begin_request(req, req.bucket, req.key, size), req.payload, md5=md5
        )
    except errors.InvalidArgument as exc:
        raise object_ops.translate_digest_error(req, exc) from None
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(info.etag)
    object_ops.checksum_headers(response, info.checksums, req)
    return response


async def head_object(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """The object's headers, from its metadata block."""
    object_ops.check_key(req.key)
    info = await (await s3.layer(req)).head(req.bucket, req.key)
    object_ops.check_conditions(req.header, info.etag, info.mtime_unix_ms, for_read=True)
    span = object_ops.parse_range(req.header("Range"), info.size)
    response = web.StreamResponse(status=206 if span else 200)
    object_ops.info_headers(response, info, req)
    if span:
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{info.size}"
    response.content_length = span[1] - span[0] + 1 if span else info.size
    return response


async def get_object(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """The object's bytes, whole or one range."""
    object_ops.check_key(req.key)
    reader = await (await s3.layer(req)).open_read(req.bucket, req.key)
    info = reader.info
    object_ops.check_conditions(req.header, info.etag, info.mtime_unix_ms, for_read=True)
    span = object_ops.parse_range(req.header("Range"), info.size)  # empty: InvalidRange too
    first, last = span if span else (0, info.size - 1)
    response = web.StreamResponse(status=206 if span else 200)
    object_ops.info_headers(response, info, req)
    if span:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    response.content_length = last - first + 1
    return await object_ops.send_body(s3, req, response, reader, first, last - first + 1)


#: Operation -> handler on a KV bucket (the others are NotImplemented there).
HANDLERS = {
    "PutObject": put_object,
    "GetObject": get_object,
    "HeadObject": head_object,
    # The same handlers as on erasure-coded buckets, through the bucket's object layer.
    "ListObjects": bucket_ops.list_objects,
    "DeleteObject": object_ops.delete_object,
    "DeleteObjects": object_ops.delete_objects,
    "CreateMultipartUpload": multipart_ops.create,
    "AbortMultipartUpload": multipart_ops.abort,
    "ListMultipartUploads": multipart_ops.list_uploads,
    **kv_multipart.HANDLERS,
}
#: Operations that work the same on every bucket kind.
SHARED = frozenset(
    {
        "CreateBucket", "HeadBucket", "DeleteBucket", "GetBucketLocation", "GetBucketVersioning",
        "PutBucketVersioning", "GetBucketCors", "PutBucketCors", "DeleteBucketCors",
        "OptionsPreflight",
    }
    | lifecycle_ops.OPS
    | tagging_ops.BUCKET_OPS
)  # fmt: skip
