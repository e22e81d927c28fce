"""Multipart uploads on KV buckets: CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
AbortMultipartUpload, ListParts and ListMultipartUploads with S3's semantics and errors
(UploadPartCopy is NotImplemented, as CopyObject is on KV buckets).

Design: parts are staged as KV blocks of the bucket's namespace under upload-scoped keys
(`kv_layout`: a record block per upload, a data, tail and metadata block per part), and
Complete assembles the listed parts into one object of at most MAX_KV_OBJECT_BYTES (64 MiB;
EntityTooLarge beyond, nothing stored), written like a PutObject: a GET, ranges included, reads
it as any object. Then every block of the upload is deleted, the unused parts too; Abort deletes
them as well. Complete holds the object and one part in the gateway's memory (at most 128 MiB).

Staged blocks live UPLOAD_TTL_S after their put (the record restarts its TTL at every
UploadPart), so an abandoned upload's parts free their DRAM and their tenant's quota: an upload
has that long between parts and until Complete. They are ordinary blocks: under memory pressure
they may be evicted sooner, and a part that is gone makes Complete fail with InvalidPart (upload
it again). Who may use an upload is who may use its bucket: the server checks the bucket's
tenant before any of these run, and upload ids name blocks in that tenant's namespace only.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time

from aiohttp import web

from kvtier import errors, kv
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import listing, multipart
from services.gateway.s3 import (
    kv_layout,
    lifecycle_ops,
    params,
    s3errors,
    s3request,
    xmlio,
)

#: How long staged blocks of an upload live without activity.
UPLOAD_TTL_S = 3600.0
#: S3's smallest part but the last.
MIN_PART_BYTES = 5 << 20
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PAGE = 1000
XML = "application/xml"


def _xml(data: bytes) -> web.Response:
    return web.Response(body=data, content_type=XML)


def _no_such_upload() -> s3errors.S3Error:
    return s3errors.S3Error("NoSuchUpload", "The specified upload does not exist.")


def _new_upload_id() -> str:
    """32 hex digits: the initiation time (ns), then 64 random bits."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


def _initiated_ms(upload_id: str) -> int:
    return int(upload_id[:16], 16) // 1_000_000


async def _record(
    client: kv.AsyncKVClient, req: s3request.S3Request
) -> pb.CreateMultipartUploadRequest:
    """The request's upload (NoSuchUpload unless it exists, for this key)."""
    try:
        return await upload_record(client, req.query.get("uploadId", ""), req.key)
    except errors.NotFound:
        raise _no_such_upload() from None


async def upload_record(
    client: kv.AsyncKVClient, upload_id: str, key: str
) -> pb.CreateMultipartUploadRequest:
    """An upload's record (NotFound, reason NoSuchUpload, unless it exists, for key)."""
    gone = errors.NotFound("The specified upload does not exist.", reason="NoSuchUpload")
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise gone
    buffer = bytearray(kv_layout.META_MAX_BYTES)
    (size,) = await client.get_batch([kv_layout.record_key(upload_id)], [buffer])
    if size is None:
        raise gone
    record = pb.CreateMultipartUploadRequest.FromString(bytes(buffer[:size]))
    if record.key != key:
        raise gone
    return record


async def create_upload(client: kv.AsyncKVClient, record: pb.CreateMultipartUploadRequest) -> str:
    """Start an upload: its record block (key, headers, checksum algorithm); its id."""
    upload_id = _new_upload_id()
    (status,) = await client.put_batch(
        [kv_layout.record_key(upload_id)], [record.SerializeToString()], ttl_s=UPLOAD_TTL_S
    )
    kv_layout.stored(status)
    return upload_id


async def abort_upload(client: kv.AsyncKVClient, upload_id: str, key: str) -> None:
    """Delete an upload's blocks (NotFound, reason NoSuchUpload, when unknown)."""
    await upload_record(client, upload_id, key)
    await _discard(client, upload_id)


def _part_number(req: s3request.S3Request) -> int:
    number = params.uint(req.query.get("partNumber", ""))
    if number is None or not 1 <= number <= multipart.MAX_PART_NUMBER:
        raise s3errors.S3Error(
            "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
        )
    return number


async def upload_part(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """UploadPart: the part's blocks (at most MAX_KV_OBJECT_BYTES: no object could hold more)."""
    if req.header("x-amz-copy-source"):
        raise s3errors.S3Error("NotImplemented", "UploadPartCopy is not implemented on KV buckets")
    number = _part_number(req)
    size = req.payload.size
    if size < 0:
        raise s3errors.S3Error("MissingContentLength", "You must provide the Content-Length.")
    if size > kv_layout.MAX_KV_OBJECT_BYTES:
        raise s3errors.S3Error(
            "EntityTooLarge",
            f"a KV bucket's part holds {kv_layout.MAX_KV_OBJECT_BYTES} bytes at most",
        )
    client = await kv_layout.client_of(s3, req)
    record = await _record(client, req)
    blob = kv_layout.Blob(size)
    etag, sums = await kv_layout.receive(req, blob, [record.checksum_algorithm])
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=size, etag=etag,
        mtime_unix_ms=int(time.time() * 1000), checksums=sums,
    )  # fmt: skip
    upload_id = req.query["uploadId"]
    data, tail, meta = kv_layout.part_keys(upload_id, number)
    encoded = kv_layout.encode_info(info, blob)
    await kv_layout.write_blob(client, (data, tail), blob, ttl_s=UPLOAD_TTL_S)
    (status,) = await client.put_batch([meta], [encoded], overwrite=True, ttl_s=UPLOAD_TTL_S)
    kv_layout.stored(status)
    await client.touch([kv_layout.record_key(upload_id)])  # the upload is alive: restart its TTL
    response = web.Response(status=200)
    response.headers["ETag"] = xmlio.quoted(etag)
    response.headers.update(kv_layout.checksum_headers(sums))
    return response


async def _checked_parts(
    client: kv.AsyncKVClient, upload_id: str, parts: list[tuple[int, str, dict[str, str]]]
) -> list[pb.ObjectInfo]:
    """The metadata of the parts a Complete lists, checked as S3 checks them."""
    numbers = [number for number, _, _ in parts]
    if any(b <= a for a, b in itertools.pairwise(numbers)):
        raise s3errors.S3Error("InvalidPartOrder", "The list of parts was not in ascending order.")
    infos = await kv_layout.read_infos(
        client, [kv_layout.part_keys(upload_id, n)[2] for n in numbers]
    )
    found: list[pb.ObjectInfo] = []
    for (number, etag, sums), info in zip(parts, infos, strict=True):
        if info is None:
            raise s3errors.S3Error("InvalidPart", f"Part {number} was not uploaded (or is gone).")
        if etag.strip('"') != info.etag:
            raise s3errors.S3Error("InvalidPart", f"Part {number}'s ETag does not match.")
        for name, value in sums.items():
            if info.checksums.get(name.upper()) != value:
                raise s3errors.S3Error("InvalidPart", f"Part {number}'s {name} does not match.")
        found.append(info)
    for number, info in zip(numbers[:-1], found[:-1], strict=True):
        if info.size < MIN_PART_BYTES:
            raise s3errors.S3Error(
                "EntityTooSmall",
                f"Part {number} has {info.size} bytes; all but the last need {MIN_PART_BYTES}.",
            )
    total = sum(info.size for info in found)
    if total > kv_layout.MAX_KV_OBJECT_BYTES:
        raise s3errors.S3Error(
            "EntityTooLarge",
            f"the parts hold {total} bytes; KV bucket objects hold "
            f"{kv_layout.MAX_KV_OBJECT_BYTES} at most",
        )
    return found


async def _assemble(
    client: kv.AsyncKVClient, upload_id: str, numbers: list[int], infos: list[pb.ObjectInfo]
) -> kv_layout.Blob:
    """The parts' bytes, one after the other, in one blob (InvalidPart when one is gone)."""
    blob = kv_layout.Blob(sum(info.size for info in infos))
    offset = 0
    for number, info in zip(numbers, infos, strict=True):
        data, tail, _ = kv_layout.part_keys(upload_id, number)
        part = await kv_layout.read_blob(client, (data, tail), info)
        if part is None:
            raise s3errors.S3Error("InvalidPart", f"Part {number} is gone; upload it again.")
        position = offset
        for piece in part.pieces():
            for target in blob.pieces(position, position + len(piece) - 1):
                n = len(target)
                target[:] = piece[:n]
                piece = piece[n:]
                position += n
        offset += info.size
    return blob


async def complete(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """CompleteMultipartUpload: the listed parts become the object; the upload is deleted."""
    listed = xmlio.parse_complete(await req.payload.read_all(xmlio.MAX_BODY_BYTES))
    client = await kv_layout.client_of(s3, req)
    record = await _record(client, req)
    upload_id = req.query["uploadId"]
    infos = await _checked_parts(client, upload_id, listed)
    numbers = [number for number, _, _ in listed]
    blob = await _assemble(client, upload_id, numbers, infos)
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=blob.size,
        etag=multipart.multipart_etag([i.etag for i in infos]),
        mtime_unix_ms=int(time.time() * 1000), headers=record.headers, parts=len(infos),
    )  # fmt: skip
    kv_layout.keep_part_sizes(info, [i.size for i in infos])  # GetObject's partNumber
    algorithm = record.checksum_algorithm
    if algorithm and all(algorithm in i.checksums for i in infos):
        info.checksums[algorithm] = multipart.composite_checksum(
            algorithm, [i.checksums[algorithm] for i in infos]
        )
    if_none_match = req.header("If-None-Match") == "*"
    ttl_s = await lifecycle_ops.kv_ttl_s(s3, req, blob.size, dict(record.headers.tags))
    await kv_layout.store_object(
        client, req.key, blob, info, if_none_match=if_none_match, ttl_s=ttl_s
    )
    await _discard(client, upload_id)
    url = f"{req.http.scheme}://{req.http.host}/{req.bucket}/{req.key}"
    sums = kv_layout.public_checksums(info)
    return _xml(xmlio.complete_multipart(url, req.bucket, req.key, info.etag, sums))


async def _discard(client: kv.AsyncKVClient, upload_id: str) -> None:
    """Delete an upload's part blocks, then its record (what a failure leaves, TTLs end)."""
    prefix = kv_layout.parts_prefix(upload_id)
    while True:
        entries, more = await client.list_keys(prefix=prefix, limit=_PAGE)
        if entries:
            await client.delete([key for key, _ in entries])
        if not more or not entries:
            break
    await client.delete([kv_layout.record_key(upload_id)])


def _int(req: s3request.S3Request, name: str, default: int) -> int:
    value = params.uint(req.query.get(name, str(default)), max_digits=9)
    if value is None:
        raise s3errors.S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return value


async def list_parts(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListParts, by part number (part-number-marker, max-parts)."""
    client = await kv_layout.client_of(s3, req)
    record = await _record(client, req)
    upload_id = req.query["uploadId"]
    marker = _int(req, "part-number-marker", 0)
    most = min(_int(req, "max-parts", _PAGE), _PAGE) or _PAGE
    prefix = kv_layout.parts_prefix(upload_id, b"m")
    after = prefix + f"{marker:05d}".encode() if marker else b""
    entries, more = await client.list_keys(prefix=prefix, start_after=after, limit=most)
    infos = await kv_layout.read_infos(client, [key for key, _ in entries])
    page = pb.ListPartsResponse(
        checksum_algorithm=record.checksum_algorithm, headers=record.headers
    )
    for (key, _), info in zip(entries, infos, strict=True):
        if info is not None:
            page.parts.add(
                part_number=int(key[len(prefix) :]), size=info.size, etag=info.etag,
                mtime_unix_ms=info.mtime_unix_ms, checksums=kv_layout.public_checksums(info),
            )  # fmt: skip
    if more and entries:
        page.is_truncated = True
        page.next_part_number_marker = int(entries[-1][0][len(prefix) :])
    return _xml(
        xmlio.list_parts(
            bucket=req.bucket, key=req.key, upload_id=upload_id, page=page, marker=marker,
            max_parts=most, owner=req.principal.owner,
        )
    )  # fmt: skip


async def _uploads(client: kv.AsyncKVClient, prefix: str) -> list[pb.MultipartUploadInfo]:
    """The bucket's uploads under prefix, by key then initiation."""
    ids: list[str] = []
    after = b""
    while True:
        entries, more = await client.list_keys(
            prefix=kv_layout.UPLOAD_PREFIX, start_after=after, limit=_PAGE
        )
        ids.extend(key[len(kv_layout.UPLOAD_PREFIX) :].decode() for key, _ in entries)
        if not more or not entries:
            break
        after = entries[-1][0]
    uploads = []
    for start in range(0, len(ids), _PAGE):
        chunk = ids[start : start + _PAGE]
        records = await _records(client, chunk)
        for upload_id, record in zip(chunk, records, strict=True):
            if record is not None and record.key.startswith(prefix):
                uploads.append(
                    pb.MultipartUploadInfo(
                        key=record.key, upload_id=upload_id,
                        initiated_unix_ms=_initiated_ms(upload_id),
                        checksum_algorithm=record.checksum_algorithm,
                    )
                )  # fmt: skip
    uploads.sort(key=lambda u: (u.key.encode(), u.upload_id))
    return uploads


async def _records(
    client: kv.AsyncKVClient, upload_ids: list[str]
) -> list[pb.CreateMultipartUploadRequest | None]:
    buffers = [bytearray(kv_layout.META_MAX_BYTES) for _ in upload_ids]
    sizes = await client.get_batch([kv_layout.record_key(u) for u in upload_ids], buffers)
    return [
        None if size is None else pb.CreateMultipartUploadRequest.FromString(bytes(b[:size]))
        for b, size in zip(buffers, sizes, strict=True)
    ]


def _after_marker(
    uploads: list[pb.MultipartUploadInfo], key_marker: str, upload_id_marker: str
) -> list[pb.MultipartUploadInfo]:
    """The uploads after (key-marker, upload-id-marker) in listing order."""
    if not key_marker:
        return uploads
    marker = key_marker.encode()
    if upload_id_marker:
        return [u for u in uploads if (u.key.encode(), u.upload_id) > (marker, upload_id_marker)]
    return [u for u in uploads if u.key.encode() > marker]


async def uploads_page(
    client: kv.AsyncKVClient, req: pb.ListMultipartUploadsRequest
) -> pb.ListMultipartUploadsResponse:
    """A page of a bucket's uploads (prefix, delimiter, key marker, upload id marker, at most
    max_uploads: 1000 when 0)."""
    most = min(req.max_uploads, _PAGE) or _PAGE
    uploads = _after_marker(
        await _uploads(client, req.prefix), req.key_marker, req.upload_id_marker
    )
    page = pb.ListMultipartUploadsResponse()
    for upload in uploads:
        folded = listing.fold(upload.key, req.prefix, req.delimiter)
        if folded is not None and page.common_prefixes and page.common_prefixes[-1] == folded:
            continue
        if len(page.uploads) + len(page.common_prefixes) == most:
            page.is_truncated = True
            last = page.uploads[-1] if page.uploads else None
            page.next_key_marker = last.key if last else page.common_prefixes[-1]
            page.next_upload_id_marker = last.upload_id if last else ""
            break
        if folded is not None:
            page.common_prefixes.append(folded)
        else:
            page.uploads.append(upload)
    return page


#: Operation -> handler on a KV bucket.
HANDLERS = {
    "UploadPart": upload_part,
    "CompleteMultipartUpload": complete,
    "ListParts": list_parts,
}
