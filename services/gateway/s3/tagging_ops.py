"""S3 object tagging: PutObjectTagging, GetObjectTagging and DeleteObjectTagging (`?tagging` on
an object). The tag set's rules and encodings: `tags`; x-amz-tagging on PutObject,
CreateMultipartUpload and CopyObject (x-amz-tagging-directive) and the `tagging` field of POST
Object are read where those build the object's headers.

Tags change in place (`objectmeta.MetaUpdater`): no new version, the same ETag and
Last-Modified. A new PUT of the key replaces them with its own (none without x-amz-tagging), as
in S3. A PutObjectTagging without Content-MD5 or x-amz-checksum-* is InvalidRequest (S3 requires
one); nothing changes unless the whole tag set is valid. The bucket policy's conditions on the
tags the request sets (s3:RequestObjectTag/<key>, s3:RequestObjectTagKeys) are decided here,
once the body is parsed, before anything changes (`_check_policy`: the gate could not see them).

Bucket tagging (Put/Get/DeleteBucketTagging) keeps up to 50 tags in the bucket's record
(`SetBucketConfig`), on both kinds of bucket, owner or admin only.

Object tagging goes through the bucket's object layer (`objectlayer.ObjectLayer.set_tags`; reads:
`head`): with versionId, of that version, current or not (the reply's x-amz-version-id names the
version in a versioned bucket); a missing version is NoSuchVersion, a delete marker's version id
405 MethodNotAllowed (the current version a marker: 404 NoSuchKey), as S3 answers. KV buckets:
GetObjectTagging shows the tags of the object's PUT; changing them is NotImplemented (501: their
blocks are never changed in place).
"""

from __future__ import annotations

from aiohttp import web

from kvtier import errors
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import objectlayer
from services.gateway.s3 import (
    acl_ops,
    bucket_policy,
    object_ops,
    policy_ops,
    s3errors,
    s3request,
    tags,
    versioning_ops,
)

#: The largest Tagging document read (S3's largest valid one is about 4 KiB of tags).
MAX_BODY_BYTES = 64 << 10


async def _target(
    s3: s3request.Door, req: s3request.S3Request
) -> tuple[objectlayer.ObjectLayer, str]:
    """The object layer of the request's bucket (NoSuchBucket, AccessDenied) and the versionId
    asked for ('' for the current version), the key checked."""
    object_ops.check_key(req.key)
    version = versioning_ops.requested(req)
    return await s3.layer(req), version


async def _tagged(
    s3: s3request.Door, req: s3request.S3Request, status: int, info: pb.ObjectInfo
) -> web.Response:
    """An answer about a version's tags, with its x-amz-version-id in a versioned bucket."""
    response = web.Response(status=status)
    await versioning_ops.stamp_info(s3, req.bucket, response, info)
    return response


async def _set(
    s3: s3request.Door, req: s3request.S3Request, target: tuple[objectlayer.ObjectLayer, str],
    tag_set: dict[str, str], status: int,
) -> web.Response:  # fmt: skip
    """Replace the tags of the version target names (NoSuchKey, NoSuchVersion...)."""
    layer, version = target
    try:
        info = await layer.set_tags(req.bucket, req.key, tag_set, version)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    return await _tagged(s3, req, status, info)


async def put_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutObjectTagging: replace the tag set of the current version, or of versionId's
    (nothing changes on any error)."""
    target = await _target(s3, req)  # refused before the body is read
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    tag_set = tags.parse_xml(raw)
    await _check_policy(s3, req, tag_set)
    return await _set(s3, req, target, tag_set, 200)


async def _check_policy(
    s3: s3request.Door, req: s3request.S3Request, tag_set: dict[str, str]
) -> None:
    """The bucket policy's decision on a PutObjectTagging with the tags it sets (the gate's
    left the statements on them out: `policy_ops.BODY_TAGGED`), by the gate's rules: a Deny
    refuses anyone; another tenant's user or an anonymous request needs an Allow (no ACL
    grant reaches tagging), and a public one where the bucket restricts public policies.
    For the bucket's tenant nothing is looked at where no Deny on the request's tags may match
    (the gate's decision stands); anyone else is decided again whatever the policy (the gate
    may have admitted it on an Allow the tags must satisfy, or on an older record). A signed
    caller denied on the cached record is decided again on a fresh one, as the gate does."""
    who, key, query = req.principal, req.key, req.query

    async def admits(info: metadata_pb2.BucketInfo) -> bool:
        policy = policy_ops.policy_of(info)
        owned = who.may_use(info.tenant)
        if owned and (
            policy is None
            or not policy_ops.wants_request_tags(
                policy, req.op, who, info.name, key, query, deny_only=True
            )
        ):
            return True
        decision = bucket_policy.Decision.NONE
        if policy is not None:
            existing = None
            if policy_ops.wants_tags(policy, req.op, who, info.name, key, query, deny_only=owned):
                existing = await acl_ops.tags_of(s3.front, info, key, query.get("versionId", ""))
            decision = policy_ops.decide(
                policy, req.op, who, info.name, key, query, req.http.headers,
                req.http.remote or "", tags=existing, body_tags=tag_set,
            )  # fmt: skip
        return decision is not bucket_policy.Decision.DENY and (
            owned or policy_ops.allow_admits(info, policy, decision)
        )

    await policy_ops.decide_again(
        lambda fresh: s3.front.bucket_info(req.bucket, fresh=fresh), who, admits
    )


async def get_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetObjectTagging: the tag set of the current version, or of versionId's (an empty
    TagSet when it has none)."""
    layer, version = await _target(s3, req)
    try:
        info = await layer.head(req.bucket, req.key, version)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    response = await _tagged(s3, req, 200, info)
    response.body = tags.render(info.headers.tags)
    response.content_type = "application/xml"
    return response


async def delete_object_tagging(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteObjectTagging: remove the tags of the current version, or of versionId's (204)."""
    return await _set(s3, req, await _target(s3, req), {}, 204)


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
