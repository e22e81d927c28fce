"""S3 multipart uploads: Create, UploadPart, UploadPartCopy, Complete, Abort, ListParts and
ListMultipartUploads, one handler each for both bucket kinds, through the bucket's object layer
(`Door.layer`: uploads kept on the datanodes, or a KV bucket's staged as KV blocks)."""

from __future__ import annotations

from aiohttp import web

from kvtier import errors
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import multipart, objectlayer, versions
from services.gateway.s3 import (
    conditions,
    object_ops,
    ownership,
    params,
    policy_ops,
    s3errors,
    s3request,
    versioning_ops,
    xmlio,
)

MAX_PART_BYTES = 5 << 30
XML = "application/xml"
#: x-amz-checksum-* headers of a Complete that name no checksum value.
_NOT_VALUES = frozenset({"x-amz-checksum-type", "x-amz-checksum-algorithm"})


def _xml(data: bytes) -> web.Response:
    return web.Response(body=data, content_type=XML)


def _part_number(req: s3request.S3Request) -> int:
    number = params.uint(req.query.get("partNumber", ""))
    if number is None or not 1 <= number <= multipart.MAX_PART_NUMBER:
        raise s3errors.S3Error(
            "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
        )
    return number


def _no_such_upload(exc: errors.NotFound) -> Exception:
    if exc.reason == "NoSuchUpload":
        return s3errors.S3Error("NoSuchUpload", "The specified upload does not exist.")
    return exc


async def create(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """CreateMultipartUpload (either bucket kind: `Door.layer`)."""
    layer = await s3.layer(req)
    object_ops.check_key(req.key)
    algorithm = req.header("x-amz-checksum-algorithm").upper()
    if algorithm and algorithm not in object_ops.ALGORITHMS:
        raise s3errors.S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm}")
    try:
        kind = multipart.checksum_type(algorithm, req.header("x-amz-checksum-type"))
    except errors.InvalidArgument as exc:
        raise s3errors.S3Error("InvalidRequest", str(exc)) from None
    reply = await layer.create_multipart(
        pb.CreateMultipartUploadRequest(
            bucket=req.bucket, key=req.key, headers=object_ops.request_headers(req),
            checksum_algorithm=algorithm, checksum_type=kind,
        )
    )  # fmt: skip
    response = _xml(xmlio.initiate_multipart(req.bucket, req.key, reply.upload_id))
    if algorithm:
        response.headers["x-amz-checksum-algorithm"] = algorithm
        response.headers["x-amz-checksum-type"] = kind
    return response


async def upload_part(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """UploadPart (UploadPartCopy when x-amz-copy-source is set), on either bucket kind
    through its object layer (whose own limits apply: a KV bucket's size)."""
    layer = await s3.layer(req)
    if req.header("x-amz-copy-source"):
        return await upload_part_copy(s3, req, layer)
    number = _part_number(req)
    size = req.payload.size
    if size < 0 and "chunked" not in req.header("Transfer-Encoding").lower():
        raise s3errors.S3Error("MissingContentLength", "You must provide the Content-Length.")
    if size > MAX_PART_BYTES:
        raise s3errors.S3Error("EntityTooLarge", "A part may hold 5 GiB at most.")
    # A plain chunked body streams until it ends, the bound enforced as it comes (the layer's
    # own where smaller: a KV bucket's).
    bound = size if size >= 0 else MAX_PART_BYTES
    put = object_ops.begin_request(req, req.bucket, req.key, bound)
    request = pb.BeginUploadPartRequest(
        bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"], part_number=number,
        size=bound, expected_md5=put.expected_md5, expected_checksums=put.expected_checksums,
    )  # fmt: skip
    try:
        # Announced checksums too (a trailer's, e.g. boto3's default CRC32 over HTTPS).
        part = await layer.upload_part(
            request, req.payload, checksum_algorithms=put.checksum_algorithms
        )
    except errors.NotFound as exc:
        raise _no_such_upload(exc) from None
    except errors.InvalidArgument as exc:
        raise object_ops.translate_digest_error(req, exc) from None
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(part.etag)
    for name, value in part.checksums.items():
        response.headers[f"x-amz-checksum-{name.lower()}"] = value
    return response


async def upload_part_copy(
    s3: s3request.Door, req: s3request.S3Request, layer: objectlayer.ObjectLayer
) -> web.Response:
    """UploadPartCopy: the source (or x-amz-copy-source-range) becomes a part (the bucket's
    object layer: NotImplemented on KV buckets, before the source is looked at)."""
    if not layer.copies:
        raise s3errors.S3Error("NotImplemented", "UploadPartCopy is not implemented on this bucket")
    number = _part_number(req)
    src_bucket, src_key, meta = await object_ops.source_for_copy(s3, req)  # version's own
    request = pb.UploadPartCopyRequest(
        bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"], part_number=number,
        src_bucket=src_bucket, src_key=src_key, src_if_match=meta.etag,
        src_version_id=object_ops.copy_source(req)[2],
    )  # fmt: skip
    text = req.header("x-amz-copy-source-range")
    if text:
        first, last = object_ops.parse_copy_range(text, meta.size)
        request.has_range, request.range_start, request.range_end = True, first, last
    try:
        reply = await layer.copy_part(request)
    except errors.NotFound as exc:
        raise _no_such_upload(exc) from None
    part = reply.part
    response = _xml(xmlio.copy_result("CopyPartResult", part.etag, part.mtime_unix_ms, {}))
    if meta.keep_versions:  # the source version copied, as CopyObject answers
        response.headers["x-amz-copy-source-version-id"] = versions.info(meta).version_id
    return response


async def complete(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """CompleteMultipartUpload (either bucket kind; sent again for a completed upload: the
    object it made, as S3 answers), with If-None-Match: * or If-Match as PutObject
    (`conditions.check_write_conditions`)."""
    layer = await s3.layer(req)
    conditions.check_write_conditions(req)
    parts = xmlio.parse_complete(await req.payload.read_all(xmlio.MAX_BODY_BYTES))
    request = pb.CompleteMultipartUploadRequest(
        bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"],
        if_none_match=req.header("If-None-Match") == "*", if_match=req.header("If-Match"),
    )  # fmt: skip
    for number, etag, sums in parts:
        request.parts.add(
            part_number=number, etag=etag, checksums={k.upper(): v for k, v in sums.items()}
        )
    for name, value in req.http.headers.items():  # the object checksum the client claims
        lower = name.lower()
        if lower.startswith(object_ops.CHECKSUM_HEADER) and lower not in _NOT_VALUES:
            request.expected_checksums[lower[len(object_ops.CHECKSUM_HEADER) :].upper()] = value
    try:
        reply = await layer.complete_multipart(request)
    except errors.NotFound as exc:
        raise _no_such_upload(exc) from None
    info = reply.object
    url = f"{req.http.scheme}://{req.http.host}/{req.bucket}/{req.key}"
    response = _xml(
        xmlio.complete_multipart(url, req.bucket, req.key, info.etag, dict(info.checksums))
    )
    versioning_ops.stamp(response, info, False)
    return response


async def abort(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """AbortMultipartUpload (either bucket kind; who may: `_check_abort`)."""
    layer = await s3.layer(req)
    try:
        await _check_abort(s3, req, layer)
        await layer.abort_multipart(
            pb.AbortMultipartUploadRequest(
                bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"]
            )
        )
    except errors.NotFound as exc:
        raise _no_such_upload(exc) from None
    return web.Response(status=204)


async def _check_abort(
    s3: s3request.Door, req: s3request.S3Request, layer: objectlayer.ObjectLayer
) -> None:
    """AccessDenied unless the caller may abort the upload. S3 lets the bucket's owner and the
    upload's initiator abort it, anyone else only where the bucket's policy allows
    s3:AbortMultipartUpload: a bucket's WRITE grant (the gate's admission) does not reach
    another's upload (nor, through it, an anonymous caller any: an anonymous writer's upload
    records no initiator). By `policy_ops.decide_again`'s rules (cached, then fresh)."""
    who = req.principal
    if not req.bucket_owner or who.may_use(req.bucket_owner):
        return
    initiators: list[str] = []  # read once, where the policy does not decide

    async def admits(info: metadata_pb2.BucketInfo) -> bool:
        policy = policy_ops.policy_of(info)
        if policy is not None:
            decision = policy_ops.decide(
                policy, req.op, who, info.name, req.key, req.query, req.http.headers,
                req.http.remote or "",
            )  # fmt: skip
            if policy_ops.allow_admits(info, policy, decision):
                return True
        if who.anonymous:
            return False
        if not initiators:
            page = await layer.list_parts(
                pb.ListPartsRequest(
                    bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"], max_parts=1
                )
            )
            initiators.append(page.initiator)
        return initiators[0] == who.tenant

    await policy_ops.decide_again(
        lambda fresh: s3.front.bucket_info(req.bucket, fresh=fresh), who, admits
    )


def _int(req: s3request.S3Request, name: str, default: int) -> int:
    # The values go into uint32 fields: 9 digits always fit.
    value = params.uint(req.query.get(name, str(default)), max_digits=9)
    if value is None:
        raise s3errors.S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return value


async def list_parts(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListParts (either bucket kind)."""
    layer = await s3.layer(req)
    marker = _int(req, "part-number-marker", 0)
    most = min(_int(req, "max-parts", 1000), 1000) or 1000
    try:
        page = await layer.list_parts(
            pb.ListPartsRequest(
                bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"],
                part_number_marker=marker, max_parts=most,
            )
        )  # fmt: skip
    except errors.NotFound as exc:
        raise _no_such_upload(exc) from None
    # The upload's owner: its writer's tenant, or the bucket's (`ownership`); its initiator:
    # the tenant its record names (`ListPartsResponse.initiator`), else its ACL's owner (a
    # record of older code), else the bucket's.
    owner = initiator = req.principal.owner
    if req.bucket_owner:
        tenant = ownership.owner_for(req.object_ownership, page.headers.acl, req.bucket_owner)
        started = page.initiator or page.headers.acl.owner or req.bucket_owner
        owner, initiator = (tenant, tenant), (started, started)
    return _xml(
        xmlio.list_parts(
            bucket=req.bucket, key=req.key, upload_id=req.query["uploadId"], page=page,
            marker=marker, max_parts=most, owner=owner, initiator=initiator,
        )
    )  # fmt: skip


async def list_uploads(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListMultipartUploads (either bucket kind)."""
    layer = await s3.layer(req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    most = min(_int(req, "max-uploads", 1000), 1000) or 1000
    page = await layer.list_uploads(
        pb.ListMultipartUploadsRequest(
            bucket=req.bucket, prefix=req.query.get("prefix", ""),
            delimiter=req.query.get("delimiter", ""), key_marker=req.query.get("key-marker", ""),
            upload_id_marker=req.query.get("upload-id-marker", ""), max_uploads=most,
        )
    )  # fmt: skip
    # Each upload's Initiator: the tenant its record names as initiator (one of another tenant
    # than the bucket's; a record of older code: its ACL's owner), else the bucket's; its
    # Owner: its ACL's owner, or the bucket's tenant where the bucket's Object Ownership
    # gives it every object (`ownership.listed`). Both from the listing index, no read.
    bucket_owner = req.owner[0]
    return _xml(
        xmlio.list_uploads(
            bucket=req.bucket, page=page, params=req.query, enc=enc,
            initiator=ownership.listed_owners(ownership.OBJECT_WRITER, bucket_owner),
            owner=ownership.listed_owners(req.object_ownership, bucket_owner),
        )
    )  # fmt: skip
