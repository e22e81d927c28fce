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

import time

from aiohttp import web

from kvtier import kv
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import listing
from services.gateway.s3 import (
    kv_layout,
    kv_multipart,
    lifecycle_ops,
    object_ops,
    params,
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
    client = await kv_layout.client_of(s3, req)
    blob = kv_layout.Blob(size)
    md5 = not kv_layout.trailer_checked(req)  # else the trailing checksum vouches for the bytes
    etag, sums = await kv_layout.receive(req, blob, md5=md5)
    etag = etag if md5 else kv_layout.version_etag(blob)
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=size, etag=etag,
        mtime_unix_ms=int(time.time() * 1000), headers=object_ops.request_headers(req), parts=1,
    )  # fmt: skip
    if_none_match = req.header("If-None-Match") == "*"
    ttl_s = await lifecycle_ops.kv_ttl_s(  # the bucket's lifecycle rules, as the blocks' TTL
        s3, req, size, lifecycle_ops.tags_of(req, info.headers)
    )
    await kv_layout.store_object(
        client, req.key, blob, info, if_none_match=if_none_match, ttl_s=ttl_s
    )
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(etag)
    response.headers.update(kv_layout.checksum_headers(sums))
    return response


async def head_object(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """The object's headers, from its metadata block."""
    object_ops.check_key(req.key)
    client = await kv_layout.client_of(s3, req)
    info = await kv_layout.read_info(client, kv_layout.meta_key(req.key))
    if info is None:
        raise s3errors.S3Error("NoSuchKey", "The specified key does not exist.")
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
    info, blob = await kv_layout.fetch_object(await kv_layout.client_of(s3, req), req.key)
    object_ops.check_conditions(req.header, info.etag, info.mtime_unix_ms, for_read=True)
    span = object_ops.parse_range(req.header("Range"), info.size)  # empty: InvalidRange too
    first, last = span if span else (0, info.size - 1)
    response = web.StreamResponse(status=206 if span else 200)
    object_ops.info_headers(response, info, req)
    if span:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    response.content_length = last - first + 1
    await response.prepare(req.http)
    for piece in blob.pieces(first, last):
        await response.write(piece)
    await response.write_eof()
    return response


async def delete_object(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """204 whether or not the key existed."""
    object_ops.check_key(req.key)
    client = await kv_layout.client_of(s3, req)
    await client.delete(kv_layout.object_block_keys(req.key))
    return web.Response(status=204)


async def delete_objects(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteObjects on a KV bucket."""
    quiet, keys = xmlio.parse_delete(await req.payload.read_all(xmlio.MAX_BODY_BYTES))
    client = await kv_layout.client_of(s3, req)
    blocks = [b for k in keys for b in kv_layout.object_block_keys(k)]
    await client.delete(blocks)
    body = xmlio.delete_result(keys, [], quiet=quiet)
    return web.Response(body=body, content_type="application/xml")


def _start_after(req: s3request.S3Request, v2: bool) -> bytes:
    """The key a listing starts after: a v2 continuation token (hex), else start-after/marker."""
    token = req.query.get("continuation-token", "")
    if v2 and "continuation-token" in req.query and not token:
        raise s3errors.S3Error("InvalidArgument", "The continuation token provided is incorrect")
    if not (v2 and token):
        return req.query.get("start-after" if v2 else "marker", "").encode()
    try:
        return bytes.fromhex(token)
    except ValueError:
        raise s3errors.S3Error(
            "InvalidArgument", "The continuation token provided is incorrect"
        ) from None


async def list_objects(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListObjects (v1 and v2) of the keys in DRAM, with each object's metadata."""
    client = await kv_layout.client_of(s3, req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    prefix, delimiter = req.query.get("prefix", ""), req.query.get("delimiter", "")
    v2 = req.query.get("list-type") == "2"
    after = _start_after(req, v2)
    max_keys = params.uint(req.query.get("max-keys", "") or "1000")
    if max_keys is None:
        raise s3errors.S3Error("InvalidArgument", "max-keys must be a non-negative integer")
    max_keys = min(max_keys, 1000)
    page = pb.ListObjectsResponse()
    last = after
    while len(page.objects) + len(page.common_prefixes) < max_keys:
        entries, more = await client.list_keys(prefix=prefix.encode(), start_after=last, limit=1000)
        for key_bytes, _size in entries:
            last = key_bytes
            if key_bytes.startswith(b"\x00"):  # metadata, tails, uploads: never keys
                continue
            key = key_bytes.decode()
            folded = listing.fold(key, prefix, delimiter)
            if folded is not None:
                if not page.common_prefixes or page.common_prefixes[-1] != folded:
                    page.common_prefixes.append(folded)
            else:
                page.objects.add(key=key)
            if len(page.objects) + len(page.common_prefixes) == max_keys:
                page.is_truncated = more or key_bytes != entries[-1][0]
                break
        if not more:
            break
    if page.is_truncated:
        page.next_continuation_token = last.hex()
    await _fill_infos(client, page)
    return web.Response(
        body=xmlio.list_objects(
            version=2 if v2 else 1, bucket=req.bucket, page=page, params=req.query, enc=enc,
            owner=req.principal.owner if not v2 or req.query.get("fetch-owner") == "true" else None,
            next_marker=last.decode(errors="replace") if page.is_truncated and not v2 else "",
        ),
        content_type="application/xml",
    )  # fmt: skip


async def _fill_infos(client: kv.AsyncKVClient, page: pb.ListObjectsResponse) -> None:
    """Each listed object's size, ETag and time; objects whose metadata is gone are dropped."""
    infos = await kv_layout.read_infos(client, [kv_layout.meta_key(o.key) for o in page.objects])
    kept = []
    for obj, info in zip(page.objects, infos, strict=True):
        if info is None:
            continue
        obj.size, obj.etag, obj.mtime_unix_ms = info.size, info.etag, info.mtime_unix_ms
        kept.append(obj)
    del page.objects[:]
    page.objects.extend(kept)


#: Operation -> handler on a KV bucket (the others are NotImplemented there).
HANDLERS = {
    "PutObject": put_object,
    "GetObject": get_object,
    "HeadObject": head_object,
    "DeleteObject": delete_object,
    "DeleteObjects": delete_objects,
    "ListObjects": list_objects,
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
