"""S3 bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation,
GetBucketVersioning, ListObjects (v1 and v2) and ListObjectVersions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from kvtier import errors, names
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import kv_ops, params, s3errors, xmlio

if TYPE_CHECKING:
    from services.gateway.s3 import server

XML = "application/xml"
#: CreateBucket header choosing the tier that serves the bucket: "objects" (default) or "kv".
BUCKET_KIND_HEADER = "x-kvtier-bucket-kind"


def _kind(text: str) -> metadata_pb2.BucketKind.ValueType:
    kinds = {"objects": metadata_pb2.BUCKET_KIND_OBJECTS, "kv": metadata_pb2.BUCKET_KIND_KV}
    if text.lower() not in kinds:
        raise s3errors.S3Error("InvalidArgument", f"{BUCKET_KIND_HEADER}: objects or kv")
    return kinds[text.lower()]


def _xml(data: bytes, status: int = 200) -> web.Response:
    return web.Response(body=data, status=status, content_type=XML)


async def list_buckets(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """The principal's tenant's buckets (an admin's: every bucket)."""
    infos = await s3.front.list_buckets()
    owner = req.principal.owner
    return _xml(xmlio.list_buckets(((b.name, b.created_at_unix_ms) for b in infos), *owner))


async def create_bucket(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """Create a bucket owned by the principal's tenant; again by its owner: 200 (us-east-1)."""
    try:
        names.check_bucket(req.bucket)
    except errors.InvalidArgument as exc:
        raise s3errors.S3Error("InvalidBucketName", exc.message) from None
    constraint = xmlio.parse_location(await req.payload.read_all(64 << 10))
    if constraint and constraint != s3.region:
        raise s3errors.S3Error(
            "InvalidLocationConstraint", f"this endpoint serves region {s3.region}"
        )
    kind = _kind(req.header(BUCKET_KIND_HEADER) or "objects")
    try:
        await s3.front.create_bucket(req.bucket, req.principal.tenant, kind)
    except errors.AlreadyExists:
        info = await s3.front.bucket_info(req.bucket)
        if info.tenant != req.principal.tenant or info.kind != kind:
            raise s3errors.S3Error(
                "BucketAlreadyExists", "The requested bucket name is not available."
            ) from None
        if s3.region != "us-east-1":
            raise s3errors.S3Error(
                "BucketAlreadyOwnedByYou", "Your previous request to create it succeeded."
            ) from None
    response = web.Response(status=200)
    response.headers["Location"] = f"/{req.bucket}"
    return response


async def head_bucket(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """200, 404 or 403."""
    await s3.owned_bucket(req)
    response = web.Response(status=200)
    response.headers["x-amz-bucket-region"] = s3.region
    return response


async def delete_bucket(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """Delete an empty bucket (BucketNotEmpty: uploads in progress count too)."""
    info = await s3.owned_bucket(req)
    if info.kind == metadata_pb2.BUCKET_KIND_KV and not await kv_ops.is_empty(s3, info):
        raise s3errors.S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty.")
    await s3.front.delete_bucket(req.bucket)  # objects or uploads in progress: BucketNotEmpty
    return web.Response(status=204)


async def get_location(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """The region (empty for us-east-1)."""
    await s3.owned_bucket(req)
    return _xml(xmlio.location(s3.region))


async def get_versioning(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """Never enabled."""
    await s3.owned_bucket(req)
    return _xml(xmlio.versioning())


def _max_keys(req: server.S3Request, name: str = "max-keys") -> int:
    value = params.uint(req.query.get(name, "1000"))
    if value is None:
        raise s3errors.S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return min(value, 1000)


async def _page(
    s3: server.S3Server, req: server.S3Request, *, after: str, token: str, max_keys: int
) -> pb.ListObjectsResponse:
    if max_keys == 0:
        return pb.ListObjectsResponse()
    return await s3.front.list_objects(
        pb.ListObjectsRequest(
            bucket=req.bucket, prefix=req.query.get("prefix", ""),
            delimiter=req.query.get("delimiter", ""), start_after=after,
            continuation_token=token, max_keys=max_keys,
        )
    )  # fmt: skip


async def list_objects(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """ListObjectsV2 (list-type=2) or ListObjects (v1)."""
    await s3.owned_bucket(req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    max_keys = _max_keys(req)
    if req.query.get("list-type") == "2":
        token = req.query.get("continuation-token", "")
        page = await _page(
            s3, req, after=req.query.get("start-after", ""), token=token, max_keys=max_keys
        )
        owner = req.principal.owner if req.query.get("fetch-owner") == "true" else None
        return _xml(
            xmlio.list_objects(
                version=2, bucket=req.bucket, page=page, params=req.query, enc=enc, owner=owner
            )
        )
    page = await _page(s3, req, after=req.query.get("marker", ""), token="", max_keys=max_keys)
    next_marker = ""
    if page.is_truncated and req.query.get("delimiter"):
        last = [o.key for o in page.objects] + list(page.common_prefixes)
        next_marker = max(last, key=str.encode) if last else ""
    return _xml(
        xmlio.list_objects(
            version=1, bucket=req.bucket, page=page, params=req.query, enc=enc,
            owner=req.principal.owner, next_marker=next_marker,
        )
    )  # fmt: skip


async def list_versions(s3: server.S3Server, req: server.S3Request) -> web.Response:
    """ListObjectVersions of an unversioned bucket: every object once, version "null"."""
    await s3.owned_bucket(req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    page = await _page(
        s3, req, after=req.query.get("key-marker", ""), token="", max_keys=_max_keys(req)
    )
    return _xml(
        xmlio.list_versions(
            bucket=req.bucket, page=page, params=req.query, enc=enc, owner=req.principal.owner
        )
    )
