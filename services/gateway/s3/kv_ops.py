"""S3 on KV buckets: objects served by the KV-cache tier (DRAM pools with eviction, TTL, pins
and quotas) instead of the erasure-coded tier. Put, Get (ranges), Head, Delete, DeleteObjects and
ListObjects(V2) behave as on any bucket; copies and multipart uploads are NotImplemented.

Each object is two KV blocks of the bucket's namespace (`s3:<storage name>`, i.e.
`s3:<bucket>@<storage_id>`, plain `s3:<bucket>` for buckets older than storage ids, so a bucket
deleted and created again never sees the earlier one's blocks; the bucket's tenant):
- the data block under the key's bytes: a 16-byte version id, then the object's bytes;
- the metadata block under NUL "m" NUL + key (keys never hold NUL, so never collide): a
  serialized ObjectInfo carrying the same version id as its `etag`-independent field.
A PUT writes the data block, then the metadata block (put-if-absent with If-None-Match: *
claims the metadata block first). A GET reads the metadata (size, version), then the data block,
and retries when the versions differ (a concurrent overwrite): it never returns one writer's
headers with another's bytes. Either block may be evicted: the object is then gone (NoSuchKey).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from typing import TYPE_CHECKING

from aiohttp import web

from kvtier import errors, kv, names
from kvtier import security as security_mod
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import listing
from services.gateway.s3 import object_ops, params, s3errors, xmlio

if TYPE_CHECKING:
    from services.gateway.s3 import server

VERSION_BYTES = 16
META_PREFIX = b"\x00m\x00"
META_MAX_BYTES = 16 << 10
MAX_KV_OBJECT_BYTES = 64 << 20
_GET_ATTEMPTS = 4


def namespace(info: metadata_pb2.BucketInfo) -> str:
    """The KV namespace of a KV bucket's incarnation."""
    return f"s3:{names.storage_name(info.name, info.storage_id)}"


class KVBuckets:
    """One KV client per KV bucket (its namespace and tenant), opened on first use."""

    def __init__(
        self, metadata_address: object, security: security_mod.ClientSecurity | None = None
    ) -> None:
        self._address = metadata_address
        #: Mutual TLS as this gateway, acting explicitly for each bucket's tenant.
        self._security = security
        self._clients: dict[str, kv.AsyncKVClient] = {}
        self._lock = asyncio.Lock()

    def _current(self, info: metadata_pb2.BucketInfo) -> kv.AsyncKVClient | None:
        found = self._clients.get(info.name)
        if found is None or found.tenant != info.tenant or found.namespace != namespace(info):
            return None
        return found

    async def client(self, info: metadata_pb2.BucketInfo) -> kv.AsyncKVClient:
        """The client of a KV bucket (a new one when the bucket was created again)."""
        found = self._current(info)
        if found is not None:
            return found
        async with self._lock:
            found = self._current(info)
            if found is None:
                address = self._address() if callable(self._address) else str(self._address)
                found = await kv.AsyncKVClient.connect(
                    namespace=namespace(info), tenant=info.tenant, metadata=address,
                    replicas=1, timeout_s=10.0, security=self._security,
                )  # fmt: skip
                stale = self._clients.get(info.name)
                self._clients[info.name] = found
                if stale is not None:
                    await stale.close()
        return found

    async def close(self) -> None:
        """Close every client."""
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def meta_key(key: str) -> bytes:
    """The metadata block's key of an object key."""
    return META_PREFIX + key.encode()


async def _client(s3: server.S3Server, req: server.S3Request) -> kv.AsyncKVClient:
    info = await s3.front.bucket_info(req.bucket)
    return await s3.kv_buckets.client(info)


async def _read_meta(client: kv.AsyncKVClient, key: str) -> pb.ObjectInfo | None:
    buffer = bytearray(META_MAX_BYTES)
    (size,) = await client.get_batch([meta_key(key)], [buffer])
    if size is None:
        return None
    return pb.ObjectInfo.FromString(bytes(buffer[:size]))


async def put_object(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """PutObject into DRAM blocks (the body is read whole: KV objects are blocks)."""
    if req.header("x-amz-copy-source"):
        raise s3errors.S3Error("NotImplemented", "CopyObject is not implemented on KV buckets")
    object_ops.check_key(req.key)
    size = req.payload.size
    if size < 0:
        raise s3errors.S3Error("MissingContentLength", "You must provide the Content-Length.")
    if size > MAX_KV_OBJECT_BYTES:
        raise s3errors.S3Error("EntityTooLarge", f"KV bucket objects hold {MAX_KV_OBJECT_BYTES}")
    client = await _client(s3, req)
    version = secrets.token_bytes(VERSION_BYTES)
    block = bytearray(VERSION_BYTES + size)
    block[:VERSION_BYTES] = version
    await req.payload.fill(memoryview(block)[VERSION_BYTES:])
    await req.payload.finish()
    data = memoryview(block)[VERSION_BYTES:]
    etag = hashlib.md5(data).hexdigest()
    _check_digests(req, data, etag)
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=size, etag=etag,
        mtime_unix_ms=int(time.time() * 1000), headers=object_ops.request_headers(req), parts=1,
    )  # fmt: skip
    info.checksums["VERSION"] = version.hex()
    meta = info.SerializeToString()
    if len(meta) > META_MAX_BYTES:
        raise s3errors.S3Error("MetadataTooLarge", "the object's headers are too large")
    if req.header("If-None-Match") == "*":
        (claimed,) = await client.put_batch([meta_key(req.key)], [meta])
        if claimed == kv.PutStatus.EXISTS:
            raise s3errors.S3Error(
                "PreconditionFailed", "At least one of the pre-conditions failed"
            )
        _stored(claimed)
        (status,) = await client.put_batch([req.key.encode()], [block], overwrite=True)
        _stored(status)
    else:
        (status,) = await client.put_batch([req.key.encode()], [block], overwrite=True)
        _stored(status)
        (status,) = await client.put_batch([meta_key(req.key)], [meta], overwrite=True)
        _stored(status)
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(etag)
    return response


def _stored(status: kv.PutStatus) -> None:
    if status == kv.PutStatus.QUOTA_EXCEEDED:
        raise s3errors.S3Error("QuotaExceeded", "the bucket's tenant is over its KV quota")
    if status not in (kv.PutStatus.STORED, kv.PutStatus.EXISTS):
        raise s3errors.S3Error("ServiceUnavailable", f"the KV tier refused the block: {status}")


def _check_digests(req: server.S3Request, data: memoryview, etag: str) -> None:
    md5 = object_ops.content_md5(req)
    if md5 and md5 != etag:
        raise s3errors.S3Error("BadDigest", "The Content-MD5 you specified did not match.")
    if req.payload.sha256_hex and hashlib.sha256(data).hexdigest() != req.payload.sha256_hex:
        raise s3errors.S3Error(
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )


async def _fetch(client: kv.AsyncKVClient, key: str) -> tuple[pb.ObjectInfo, bytearray]:
    """The object's info and block, consistent with each other (see the module docstring)."""
    for _ in range(_GET_ATTEMPTS):
        info = await _read_meta(client, key)
        if info is None:
            break
        block = bytearray(VERSION_BYTES + info.size)
        try:
            (size,) = await client.get_batch([key.encode()], [block])
        except errors.InvalidArgument:  # overwritten by a larger version meanwhile
            continue
        if size is None:
            break
        if size == len(block) and block[:VERSION_BYTES].hex() == info.checksums["VERSION"]:
            return info, block
        await asyncio.sleep(0.01)
    raise s3errors.S3Error("NoSuchKey", "The specified key does not exist.")


async def head_object(s3: server.S3Server, req: server.S3Request) -> web.StreamResponse:
    """The object's headers, from its metadata block."""
    object_ops.check_key(req.key)
    info = await _read_meta(await _client(s3, req), req.key)
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


async def get_object(s3: server.S3Server, req: server.S3Request) -> web.StreamResponse:
    """The object's bytes, whole or one range."""
    object_ops.check_key(req.key)
    info, block = await _fetch(await _client(s3, req), req.key)
    object_ops.check_conditions(req.header, info.etag, info.mtime_unix_ms, for_read=True)
    try:
        span = object_ops.parse_range(req.header("Range"), info.size)
    except s3errors.S3Error:
        if info.size:
            raise
        span = None
    first, last = span if span else (0, info.size - 1)
    response = web.StreamResponse(status=206 if span else 200)
    object_ops.info_headers(response, info, req)
    if span:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    response.content_length = last - first + 1
    await response.prepare(req.http)
    await response.write(memoryview(block)[VERSION_BYTES + first : VERSION_BYTES + last + 1])
    await response.write_eof()
    return response


async def delete_object(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """204 whether or not the key existed."""
    object_ops.check_key(req.key)
    client = await _client(s3, req)
    await client.delete([meta_key(req.key), req.key.encode()])
    return web.Response(status=204)


async def delete_objects(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """DeleteObjects on a KV bucket."""
    quiet, keys = xmlio.parse_delete(await req.payload.read_all(xmlio.MAX_BODY_BYTES))
    client = await _client(s3, req)
    blocks = [b for k in keys for b in (meta_key(k), k.encode())]
    await client.delete(blocks)
    body = xmlio.delete_result(keys, [], quiet=quiet)
    return web.Response(body=body, content_type="application/xml")


def _start_after(req: server.S3Request, v2: bool) -> bytes:
    """The key a listing starts after: a v2 continuation token (hex), else start-after/marker."""
    token = req.query.get("continuation-token", "")
    if not (v2 and token):
        return req.query.get("start-after" if v2 else "marker", "").encode()
    try:
        return bytes.fromhex(token)
    except ValueError:
        raise s3errors.S3Error(
            "InvalidArgument", "The continuation token provided is incorrect"
        ) from None


async def list_objects(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """ListObjects (v1 and v2) of the keys in DRAM, with each object's metadata."""
    client = await _client(s3, req)
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
            if key_bytes.startswith(META_PREFIX):
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
    buffers = [bytearray(META_MAX_BYTES) for _ in page.objects]
    sizes = await client.get_batch([meta_key(o.key) for o in page.objects], buffers)
    kept = []
    for obj, buffer, size in zip(page.objects, buffers, sizes, strict=True):
        if size is None:
            continue
        info = pb.ObjectInfo.FromString(bytes(buffer[:size]))
        obj.size, obj.etag, obj.mtime_unix_ms = info.size, info.etag, info.mtime_unix_ms
        kept.append(obj)
    del page.objects[:]
    page.objects.extend(kept)


async def is_empty(s3: server.S3Server, info: metadata_pb2.BucketInfo) -> bool:
    """Whether a KV bucket holds no block."""
    entries, _ = await (await s3.kv_buckets.client(info)).list_keys(limit=1)
    return not entries


#: Operation -> handler on a KV bucket (the others are NotImplemented there).
HANDLERS = {
    "PutObject": put_object,
    "GetObject": get_object,
    "HeadObject": head_object,
    "DeleteObject": delete_object,
    "DeleteObjects": delete_objects,
    "ListObjects": list_objects,
}
#: Operations that work the same on every bucket kind.
SHARED = frozenset(
    {"CreateBucket", "HeadBucket", "DeleteBucket", "GetBucketLocation", "GetBucketVersioning"}
)
