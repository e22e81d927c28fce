"""S3 object tagging: PutObjectTagging, GetObjectTagging and DeleteObjectTagging (`?tagging` on
an object). The tag set's rules and encodings: `tags`; x-amz-tagging on PutObject,
CreateMultipartUpload and CopyObject (x-amz-tagging-directive) and the `tagging` field of POST
Object are read where those build the object's headers.

Tags change in place (`objectmeta.MetaUpdater`): no new version, the same ETag and
Last-Modified. A new PUT of the key replaces them with its own (none without x-amz-tagging), as
in S3. A PutObjectTagging without Content-MD5 or x-amz-checksum-* is InvalidRequest (S3 requires
one); nothing changes unless the whole tag set is valid.

Bucket tagging (Put/Get/DeleteBucketTagging) keeps up to 50 tags in the bucket's record
(`SetBucketConfig`), on both kinds of bucket, owner or admin only.

Not implemented (501): object tagging on KV buckets (their objects have no metadata to change
in place: `S3Server` answers NotImplemented for any operation kv_ops does not serve).
"""

from __future__ import annotations

from aiohttp import web

from kvtier import errors
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import object_ops, s3errors, s3request, tags, versioning_ops

#: The largest Tagging document read (S3's largest valid one is about 4 KiB of tags).
MAX_BODY_BYTES = 64 << 10


async def _storage(s3: s3request.Door, req: s3request.S3Request) -> str:
    """The storage name of the request's bucket (NoSuchBucket, AccessDenied), its key checked;
    a versionId must name the current version (versioning_ops.only_current)."""
    object_ops.check_key(req.key)
    stored = await s3.front.storage_of(req.bucket)
    version = versioning_ops.requested(req)
    if version:
        try:
            await s3.front.engine.resolve(stored, req.key, version_id=version)
        except errors.NotFound as exc:
            raise versioning_ops.not_found(exc, version) from None
        versioning_ops.only_current(await s3.front.engine.resolve(stored, req.key), version)
    return stored


async def _update(
    s3: s3request.Door, req: s3request.S3Request, stored: str, tag_set: dict[str, str]
) -> None:
    try:
        await s3.front.engine.meta_updater.update(stored, req.key, tags=tag_set)
    except errors.NotFound:
        raise s3errors.S3Error("NoSuchKey", "The specified key does not exist.") from None


async def put_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutObjectTagging: replace the object's tag set (nothing changes on any error)."""
    stored = await _storage(s3, req)
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    await _update(s3, req, stored, tags.parse_xml(raw))
    return web.Response(status=200)


async def get_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetObjectTagging: the object's tag set (an empty TagSet when it has none); of one
    version with versionId."""
    object_ops.check_key(req.key)
    stored = await s3.front.storage_of(req.bucket)
    version = versioning_ops.requested(req)
    try:
        found = await s3.front.engine.resolve(stored, req.key, version_id=version)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    response = web.Response(body=tags.render(found.meta.tags), content_type="application/xml")
    await versioning_ops.stamp_read(s3, req.bucket, response, found.meta)
    return response


async def delete_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteObjectTagging: remove the object's tags (204)."""
    await _update(s3, req, await _storage(s3, req), {})
    return web.Response(status=204)


async def put_bucket_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutBucketTagging: replace the bucket's tags (owner or admin; at most 50; nothing changes
    on any error). Tags are the bucket's configuration, on both kinds of bucket."""
    await s3.owned_bucket(req)
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    tag_set = metadata_pb2.BucketTags(tags=tags.parse_xml(raw, bucket=True))
    await s3.front.set_bucket_config(req.bucket, metadata_pb2.SetBucketConfigRequest(tags=tag_set))
    return web.Response(status=204)


async def get_bucket_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketTagging: the bucket's tags, or 404 NoSuchTagSet (a fresh record)."""
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    if not info.tags.tags:
        raise s3errors.S3Error("NoSuchTagSet", "The TagSet does not exist", status=404)
    return web.Response(body=tags.render(info.tags.tags), content_type="application/xml")


async def delete_bucket_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteBucketTagging: 204, with tags or without."""
    await s3.owned_bucket(req)
    empty = metadata_pb2.SetBucketConfigRequest(tags=metadata_pb2.BucketTags())
    await s3.front.set_bucket_config(req.bucket, empty)
    return web.Response(status=204)


#: Bucket-level tagging operations (served on KV buckets too: `kv_ops.SHARED`).
BUCKET_OPS = frozenset({"GetBucketTagging", "PutBucketTagging", "DeleteBucketTagging"})


#: (method, level, query keys it needs, op, handler): ahead of the plain object routes.
ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    ("GET", "object", ("tagging",), "GetObjectTagging", get_object_tagging),
    ("PUT", "object", ("tagging",), "PutObjectTagging", put_object_tagging),
    ("DELETE", "object", ("tagging",), "DeleteObjectTagging", delete_object_tagging),
    ("GET", "bucket", ("tagging",), "GetBucketTagging", get_bucket_tagging),
    ("PUT", "bucket", ("tagging",), "PutBucketTagging", put_bucket_tagging),
    ("DELETE", "bucket", ("tagging",), "DeleteBucketTagging", delete_bucket_tagging),
]
