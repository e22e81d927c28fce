"""Multipart uploads on KV buckets: CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
AbortMultipartUpload, ListParts and ListMultipartUploads with S3's semantics and errors, in
domain terms (requests and replies of `objects_pb2`, `kvtier.errors` whose reason is the S3
code) for `kv_layer.KVLayer`: the S3 handlers (`multipart_ops`) are those of every bucket.
UploadPartCopy is NotImplemented, as CopyObject is on KV buckets (`KVLayer.copy_part`).

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
it again). A Complete sent again answers the object it made while that is the key's current
object: the object's metadata block records the upload's id (`kv_layout.keep_upload_id`).
Who may use an upload is who may use its bucket: the layer checks the bucket's tenant before
any of these run, and upload ids name blocks in that tenant's namespace only.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from kvtier import errors, kv
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import listing, multipart, objectlayer
from services.gateway.s3 import kv_layout

#: How long staged blocks of an upload live without activity.
UPLOAD_TTL_S = 3600.0
#: How long an upload's record is pinned against capacity eviction after its last activity
#: (renewed by every part; a node whose max_pin_s is lower leaves it unpinned).
UPLOAD_PIN_S = 600.0
#: S3's smallest part but the last.
MIN_PART_BYTES = 5 << 20
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PAGE = 1000


def _new_upload_id() -> str:
    """32 hex digits: the initiation time (ns), then 64 random bits."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


def _initiated_ms(upload_id: str) -> int:
    return int(upload_id[:16], 16) // 1_000_000


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
    await _pin_record(client, upload_id)
    return upload_id


async def _pin_record(client: kv.AsyncKVClient, upload_id: str) -> None:
    """Keep an upload's record (a few hundred bytes) from capacity eviction while the upload
    is in progress: the arena is a cache, and an upload whose record was evicted between its
    parts and its Complete failed with NoSuchUpload though nothing was wrong with it (seen in
    CI under arena pressure). Its parts stay evictable like any block of a KV bucket (pinning
    them let abandoned uploads fill the arena: puts then failed with no_space); a part evicted
    before Complete is InvalidPart, to upload again. Best effort: a node whose `max_pin_s` is
    below UPLOAD_PIN_S refuses the pin (unpinned, as before). The pin ends with the record
    (Complete or Abort deletes it) or UPLOAD_PIN_S after the last part."""
    with contextlib.suppress(errors.InvalidArgument):
        await client.pin([kv_layout.record_key(upload_id)], UPLOAD_PIN_S)


async def abort_upload(client: kv.AsyncKVClient, upload_id: str, key: str) -> None:
    """Delete an upload's blocks (NotFound, reason NoSuchUpload, when unknown)."""
    await upload_record(client, upload_id, key)
    await _discard(client, upload_id)


def _invalid_part(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, reason="InvalidPart")


async def upload_part(
    client: kv.AsyncKVClient,
    req: pb.BeginUploadPartRequest,
    body: objectlayer.PutBody,
    algorithms: Sequence[str] = (),
) -> pb.PartInfo:
    """UploadPart: the part's blocks (at most MAX_KV_OBJECT_BYTES, EntityTooLarge before the
    upload is looked at: no object could hold more; a plain chunked body's once it passes
    them, nothing stored), hashed with the upload's checksum algorithm and algorithms, its
    digests checked (`kv_layout.receive`); the part's info."""
    if body.size > kv_layout.MAX_KV_OBJECT_BYTES:
        raise kv_layout.too_large(kv_layout.MAX_KV_OBJECT_BYTES)
    if not 1 <= req.part_number <= multipart.MAX_PART_NUMBER:
        raise errors.InvalidArgument(
            "Part number must be an integer between 1 and 10000, inclusive",
            reason="InvalidArgument",
        )
    record = await upload_record(client, req.upload_id, req.key)
    blob, etag, sums = await kv_layout.receive(
        body, most=kv_layout.MAX_KV_OBJECT_BYTES,
        algorithms=[record.checksum_algorithm, *algorithms],
        expected=req.expected_checksums, expected_md5=req.expected_md5,
    )  # fmt: skip
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=blob.size, etag=etag,
        mtime_unix_ms=int(time.time() * 1000), checksums=sums,
    )  # fmt: skip
    data, tail, meta = kv_layout.part_keys(req.upload_id, req.part_number)
    encoded = kv_layout.encode_info(info, blob.version)
    await kv_layout.write_blob(client, (data, tail), blob, ttl_s=UPLOAD_TTL_S)
    (status,) = await client.put_batch([meta], [encoded], overwrite=True, ttl_s=UPLOAD_TTL_S)
    kv_layout.stored(status)
    # Alive: the record's TTL restarts; and the part's blocks count a second access, so the
    # arena's eviction (S3-FIFO drops blocks put once and not read since first) takes other
    # blocks before the upload's parts under pressure.
    await client.touch([kv_layout.record_key(req.upload_id), data, tail, meta])
    await _pin_record(client, req.upload_id)
    return pb.PartInfo(
        part_number=req.part_number, size=blob.size, etag=etag,
        mtime_unix_ms=info.mtime_unix_ms, checksums=sums,
    )  # fmt: skip


async def _checked_parts(
    client: kv.AsyncKVClient, upload_id: str, parts: Sequence[pb.CompletedPart]
) -> list[pb.ObjectInfo]:
    """The metadata of the parts a Complete lists, checked as S3 checks them."""
    numbers = [part.part_number for part in parts]
    if not numbers:
        raise errors.InvalidArgument(
            "a multipart upload needs at least a part", reason="MalformedXML"
        )
    if any(b <= a for a, b in itertools.pairwise(numbers)):
        raise errors.InvalidArgument(
            "The list of parts was not in ascending order.", reason="InvalidPartOrder"
        )
    infos = await kv_layout.read_infos(
        client, [kv_layout.part_keys(upload_id, n)[2] for n in numbers]
    )
    found: list[pb.ObjectInfo] = []
    for part, info in zip(parts, infos, strict=True):
        number = part.part_number
        if info is None:
            raise _invalid_part(f"Part {number} was not uploaded (or is gone).")
        if part.etag.strip('"') != info.etag:
            raise _invalid_part(f"Part {number}'s ETag does not match.")
        for name, value in part.checksums.items():
            if info.checksums.get(name.upper()) != value:
                raise _invalid_part(f"Part {number}'s {name} does not match.")
        found.append(info)
    for number, info in zip(numbers[:-1], found[:-1], strict=True):
        if info.size < MIN_PART_BYTES:
            raise errors.InvalidArgument(
                f"Part {number} has {info.size} bytes; all but the last need {MIN_PART_BYTES}.",
                reason="EntityTooSmall",
            )
    total = sum(info.size for info in found)
    if total > kv_layout.MAX_KV_OBJECT_BYTES:
        raise kv_layout.too_large(kv_layout.MAX_KV_OBJECT_BYTES)
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
            raise _invalid_part(f"Part {number} is gone; upload it again.")
        position = offset
        for piece in part.pieces():
            for target in blob.pieces(position, position + len(piece) - 1):
                n = len(target)
                target[:] = piece[:n]
                piece = piece[n:]
                position += n
        offset += info.size
    return blob


#: The TTL of an object written now, of (size, tags) (None: none; the bucket's lifecycle).
TTL = Callable[[int, Mapping[str, str]], float | None]


async def complete(
    client: kv.AsyncKVClient, req: pb.CompleteMultipartUploadRequest, ttl_s: TTL
) -> pb.ObjectInfo:
    """CompleteMultipartUpload: the listed parts become the object (its info, S3 checksums
    only), then the upload is deleted. An upload completed already answers the object it made
    while that is the key's current object, whatever parts are listed (as S3: a client retrying
    after a lost reply); else NoSuchUpload."""
    try:
        record = await upload_record(client, req.upload_id, req.key)
        return await _complete(client, req, record, ttl_s)
    except (errors.NotFound, errors.InvalidArgument) as exc:
        # No record: completed (or aborted, or never there). InvalidPart: a part vanished
        # under us, which is what a Complete racing another one of the same upload sees.
        if isinstance(exc, errors.InvalidArgument) and exc.reason != "InvalidPart":
            raise
        done = await completed(client, req.key, req.upload_id)
        if done is None:
            raise
        return done


async def _complete(
    client: kv.AsyncKVClient,
    req: pb.CompleteMultipartUploadRequest,
    record: pb.CreateMultipartUploadRequest,
    ttl_s: TTL,
) -> pb.ObjectInfo:
    infos = await _checked_parts(client, req.upload_id, req.parts)
    numbers = [part.part_number for part in req.parts]
    blob = await _assemble(client, req.upload_id, numbers, infos)
    info = pb.ObjectInfo(
        bucket=req.bucket, key=req.key, size=blob.size,
        etag=multipart.multipart_etag([i.etag for i in infos]),
        mtime_unix_ms=int(time.time() * 1000), headers=record.headers, parts=len(infos),
    )  # fmt: skip
    algorithm = record.checksum_algorithm
    part_sums = [i.checksums.get(algorithm, "") for i in infos] if algorithm else []
    if part_sums and all(part_sums):
        kind = multipart.checksum_type(algorithm, record.checksum_type)
        info.checksums[algorithm] = multipart.object_checksum(
            algorithm, kind, part_sums, [i.size for i in infos]
        )
    multipart.check_expected(req.expected_checksums, info.checksums)
    public = dict(info.checksums)
    if algorithm in public:  # GetObjectAttributes lists them
        kv_layout.keep_part_checksums(info, algorithm, part_sums)
    kv_layout.keep_part_sizes(info, [i.size for i in infos])  # GetObject's partNumber
    kv_layout.keep_upload_id(info, req.upload_id)  # Complete sent again answers it
    matched = await kv_layout.check_if_match(client, req.key, req.if_match)
    await kv_layout.store_object(
        client, req.key, blob, info, if_none_match=req.if_none_match, matched=matched,
        ttl_s=ttl_s(blob.size, record.headers.tags),
    )  # fmt: skip
    await _discard(client, req.upload_id)
    info.checksums.clear()
    info.checksums.update(public)
    return info


async def completed(client: kv.AsyncKVClient, key: str, upload_id: str) -> pb.ObjectInfo | None:
    """The info of key (S3 checksums only) when its current object is the one upload_id
    completed into; None when it is not (never completed, or overwritten or deleted since)."""
    if not _UPLOAD_ID.fullmatch(upload_id):
        return None
    info = await kv_layout.read_info(client, kv_layout.meta_key(key))
    if info is None or kv_layout.completed_upload(info) != upload_id:
        return None
    public = kv_layout.public_checksums(info)
    info.checksums.clear()
    info.checksums.update(public)
    return info


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


async def list_parts(client: kv.AsyncKVClient, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
    """ListParts, by part number (part_number_marker, at most max_parts: 1000 when 0)."""
    record = await upload_record(client, req.upload_id, req.key)
    most = min(req.max_parts, _PAGE) or _PAGE
    prefix = kv_layout.parts_prefix(req.upload_id, b"m")
    marker = req.part_number_marker
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
    return page


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
