"""S3 Object Ownership operations on a bucket (`?ownershipControls`): PutBucketOwnershipControls,
GetBucketOwnershipControls and DeleteBucketOwnershipControls; what the setting does is
`ownership`'s. Only the bucket's tenant reaches them (the ACL gate admits no one else)."""

from __future__ import annotations

from aiohttp import web

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import object_ops, ownership, s3errors, s3request

#: The largest PutBucketOwnershipControls body read (the document is about 200 bytes).
MAX_BODY_BYTES = 16 << 10


async def put_ownership_controls(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutBucketOwnershipControls: replace the setting (nothing stored on any error)."""
    info = await s3.owned_bucket(req)
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    setting = ownership.parse(raw)
    ownership.check_kind(setting, info.kind == metadata_pb2.BUCKET_KIND_KV)
    # Checked on a fresh record: a grant set through another gateway must not slip past.
    fresh = await s3.front.bucket_for(req.bucket, fresh=True)
    ownership.check_bucket_acl(setting, fresh.acl, fresh.tenant)
    await s3.front.set_bucket_config(req.bucket, ownership.config(setting))
    return web.Response(status=200)


async def get_ownership_controls(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketOwnershipControls: the setting (a fresh record), or 404
    OwnershipControlsNotFoundError."""
    await s3.owned_bucket(req)
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    setting = ownership.mode(info)
    if setting == ownership.UNSPECIFIED:
        raise s3errors.S3Error(
            "OwnershipControlsNotFoundError",
            "The bucket ownership controls were not found",
            status=404,
        )
    return web.Response(body=ownership.render(setting), content_type="application/xml")


async def delete_ownership_controls(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteBucketOwnershipControls: 204, whether or not there was a setting."""
    await s3.owned_bucket(req)
    await s3.front.set_bucket_config(req.bucket, ownership.config(ownership.UNSPECIFIED))
    return web.Response(status=204)


ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    (
        "GET",
        "bucket",
        ("ownershipControls",),
        "GetBucketOwnershipControls",
        get_ownership_controls,
    ),
    (
        "PUT",
        "bucket",
        ("ownershipControls",),
        "PutBucketOwnershipControls",
        put_ownership_controls,
    ),
    (
        "DELETE",
        "bucket",
        ("ownershipControls",),
        "DeleteBucketOwnershipControls",
        delete_ownership_controls,
    ),
]
