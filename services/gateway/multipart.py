"""Multipart uploads, kept on the datanodes so that any gateway can serve any step.

- The upload's record is an empty object of the internal bucket `.multipart` under
  `u/<bucket>/<upload_id>/<key>`, placed (like the object's pool record) in pool 0 where
  bucket/key would live: it holds the headers, the checksum algorithm and the pool the upload's
  parts and the object go to.
- Each part is an erasure-coded object of `.multipart` under `p/<upload_id>/<part:05d>`,
  written like any PUT but placed on the drives (and in the shard order) of the final object;
  uploading a part again replaces it.
- Complete checks the listed parts (order, ETags, sizes) and commits the object on every drive
  from the parts' shards there: each drive hard-links the part files into the new version, so
  no part byte moves or is re-encoded. Then the upload's parts and record are deleted. The
  object's version id (`data_id`) is `<upload_id>-<uuid hex>`: it names the upload the object
  came from, on the datanodes with the object, so that Complete sent again (a client retrying
  after a lost reply, to any gateway, after any restart) answers that object while it is still
  the current version (`completed`). Its metadata lists every part's number, size and ETag.
- Uploads older than `expiry_s` are aborted by the gateway's sweep (S3 lifecycle's
  AbortIncompleteMultipartUpload, always on).

Buckets here are storage names (`kvtier.names.storage_name`): an upload belongs to one
incarnation of its bucket, so the bucket's next owner never sees it. Who may use the bucket is
the front's check; part writes are begun for an owner like any PUT (`ObjectEngine.begin_write`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from awscrt import checksums as crt_checksums

from kvtier import errors, names
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import listing, objects, placement, versions

log = logging.getLogger(__name__)

MAX_PART_NUMBER = 10_000
MAX_PARTS_PAGE = 1000
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
#: The data_id of a completed upload's object: the upload id, then a fresh id (two Completes
#: of one upload racing each other must not commit different versions under one data_id).
_COMPLETED_ID = re.compile(r"([0-9a-f]{32})-[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-[0-9]+")


def record_key(bucket: str, upload_id: str, key: str) -> str:
    """Where an upload's record lives in the internal bucket."""
    return f"u/{bucket}/{upload_id}/{key}"


def part_key(upload_id: str, number: int) -> str:
    """Where a part lives in the internal bucket."""
    return f"p/{upload_id}/{number:05d}"


def _number(entry_key: str) -> int:
    return int(entry_key.rsplit("/", 1)[1])


def multipart_etag(md5s: list[str]) -> str:
    """S3's ETag of a multipart object: MD5 of the parts' binary MD5s, then -N."""
    joined = b"".join(bytes.fromhex(m) for m in md5s)
    return f"{hashlib.md5(joined).hexdigest()}-{len(md5s)}"


def completed_upload(meta: datanode_pb2.ShardMeta) -> str:
    """The id of the upload a stored version was completed from ('' for any other version)."""
    found = _COMPLETED_ID.fullmatch(meta.data_id)
    return found[1] if found else ""


def is_multipart(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a stored version is a completed multipart upload (its ETag ends in -N)."""
    return is_multipart_etag(meta.etag)


def is_multipart_etag(etag: str) -> bool:
    """Whether an ETag is a multipart upload's (the MD5 of the part MD5s, then -N)."""
    return bool(_MULTIPART_ETAG.fullmatch(etag))


def part_span(meta: datanode_pb2.ShardMeta, number: int) -> tuple[int, int] | None:
    """(offset, size) of a stored version's part `number`, counted 1.. in part order (the parts
    a Complete listed as 1, 3, 7 are 1, 2, 3 here, as GetObject's partNumber counts them up to
    x-amz-mp-parts-count); None past the last part. A plain object has one part: all of it."""
    if not 1 <= number <= len(meta.parts):
        return None
    offset = sum(p.size for p in meta.parts[: number - 1])
    return offset, meta.parts[number - 1].size


def composite_checksum(algorithm: str, values: list[str]) -> str:
    """S3's checksum of a multipart object: the checksum of the part checksums, then -N."""
    hasher = versions.new_hasher(algorithm)
    for value in values:
        hasher.update(base64.b64decode(value))
    return f"{base64.b64encode(hasher.digest()).decode()}-{len(values)}"


#: The CRCs a multipart object may keep as FULL_OBJECT checksums: the CRC of the whole body,
#: combined from the part CRCs and sizes (awscrt's combine, so no part is read again).
_COMBINE: dict[str, tuple[Callable[[int, int, int], int], int]] = {
    "CRC32": (crt_checksums.combine_crc32, 4),
    "CRC32C": (crt_checksums.combine_crc32c, 4),
    "CRC64NVME": (crt_checksums.combine_crc64nvme, 8),
}


def checksum_type(algorithm: str, requested: str) -> str:
    """An upload's checksum type (S3's x-amz-checksum-type at create): COMPOSITE or FULL_OBJECT;
    empty when there is no algorithm. Unset: FULL_OBJECT for CRC64NVME (its only type), else
    COMPOSITE, as S3 defaults. InvalidArgument for a type the algorithm does not have."""
    kind = requested.upper()
    if not algorithm:
        if kind:
            raise errors.InvalidArgument("x-amz-checksum-type needs x-amz-checksum-algorithm")
        return ""
    if not kind:
        return "FULL_OBJECT" if algorithm == "CRC64NVME" else "COMPOSITE"
    if kind not in ("COMPOSITE", "FULL_OBJECT"):
        raise errors.InvalidArgument(f"unknown checksum type {requested}")
    if kind == "FULL_OBJECT" and algorithm not in _COMBINE:
        raise errors.InvalidArgument(f"{algorithm} has no FULL_OBJECT checksum type")
    if kind == "COMPOSITE" and algorithm == "CRC64NVME":
        raise errors.InvalidArgument("CRC64NVME has no COMPOSITE checksum type")
    return kind


def full_object_checksum(algorithm: str, values: list[str], sizes: list[int]) -> str:
    """The CRC (base64) of the parts' bytes in order, from each part's CRC and size."""
    combine, width = _COMBINE[algorithm]
    crc = 0  # the CRC of no bytes
    for value, size in zip(values, sizes, strict=True):
        crc = combine(crc, int.from_bytes(base64.b64decode(value), "big"), size)
    return base64.b64encode(crc.to_bytes(width, "big")).decode()


def object_checksum(algorithm: str, kind: str, values: list[str], sizes: list[int]) -> str:
    """A completed upload's checksum: full_object_checksum or composite_checksum by kind."""
    if kind == "FULL_OBJECT":
        return full_object_checksum(algorithm, values, sizes)
    return composite_checksum(algorithm, values)


def check_expected(expected: Mapping[str, str], sums: Mapping[str, str]) -> None:
    """DigestMismatch (S3: BadDigest) unless each checksum a Complete claims is the object's."""
    for name, value in expected.items():
        if sums.get(name.upper()) != value.strip():
            raise errors.DigestMismatch(
                f"The {name.upper()} you specified did not match the calculated checksum.",
                algorithm=name.upper(),
            )


class Multipart:
    """Multipart uploads over an ObjectEngine (see the module docstring)."""

    def __init__(
        self,
        engine: objects.ObjectEngine,
        lister: listing.Lister,
        *,
        min_part_bytes: int = 5 << 20,
        expiry_s: float = 7 * 86400.0,
    ) -> None:
        self._engine = engine
        self._lister = lister
        self._min_part_bytes = min_part_bytes
        self._expiry_s = expiry_s

    @property
    def _cmap(self) -> common_pb2.ClusterMap:
        return self._engine.view.current

    async def create(self, req: pb.CreateMultipartUploadRequest, *, initiator: str = "") -> str:
        """Start an upload; its id. initiator: the tenant starting it when another than the
        bucket's (`access.writer_of`), kept on the record for listings (S3's Initiator)."""
        names.check_stored(req.bucket, req.key)
        algorithm = req.checksum_algorithm.upper()
        if algorithm:
            versions.new_hasher(algorithm)  # InvalidArgument for an unknown one
        cmap = self._cmap
        upload_id = uuid.uuid4().hex
        where = placement.locate(cmap, req.bucket, req.key, placement.FIRST_POOL)
        meta = versions.new_meta(
            names.MULTIPART_BUCKET, record_key(req.bucket, upload_id, req.key), where,
            req.headers, data_id=uuid.uuid4().hex,
        )  # fmt: skip
        versioned = req.headers.keep_versions  # every version in pool 0
        meta.upload_pool = placement.FIRST_POOL if versioned else self._engine.choose_pool(cmap)
        meta.upload_checksum_algorithm = algorithm
        meta.upload_checksum_type = checksum_type(algorithm, req.checksum_type)
        meta.upload_initiator = initiator
        meta.parts.add(number=1, size=0, shard_bytes=0)
        failed: set[int] = set()
        await self._engine.stage_empty(where, meta.bucket, meta.key, meta.data_id, failed)
        await self._engine.commit_shards(where, meta, meta.data_id, failed)
        return upload_id

    async def _record(self, bucket: str, key: str, upload_id: str) -> datanode_pb2.ShardMeta:
        names.check_stored(bucket, key)
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise errors.NotFound(f"no upload {upload_id!r}", reason="NoSuchUpload")
        where = placement.locate(self._cmap, bucket, key, placement.FIRST_POOL)
        try:
            found = await self._engine.resolve_in(
                where, names.MULTIPART_BUCKET, record_key(bucket, upload_id, key), queue_heal=False
            )
        except errors.NotFound:
            raise errors.NotFound(
                f"no upload {upload_id} of {bucket}/{key}", reason="NoSuchUpload"
            ) from None
        return found.meta

    def _where(self, bucket: str, key: str, record: datanode_pb2.ShardMeta) -> placement.Placement:
        return placement.locate(self._cmap, bucket, key, record.upload_pool)

    async def begin_part(
        self,
        req: pb.BeginUploadPartRequest,
        *,
        owner: str = "",
        checksum_algorithms: Sequence[str] = (),
    ) -> pb.BeginUploadPartResponse:
        """Plan the write of one part for owner (then WRITE_STRIPES calls and CommitPut). The
        part is hashed with the upload's checksum algorithm and checksum_algorithms (those an
        S3 request announces for a trailer: its value arrives after the body)."""
        if not 1 <= req.part_number <= MAX_PART_NUMBER:
            raise errors.InvalidArgument(f"part number {req.part_number}: 1-{MAX_PART_NUMBER}")
        record = await self._record(req.bucket, req.key, req.upload_id)
        announced = [record.upload_checksum_algorithm, *checksum_algorithms]
        algorithms = [a for a in dict.fromkeys(announced) if a]
        begun = self._engine.begin_write(
            pb.BeginPutRequest(
                bucket=names.MULTIPART_BUCKET, key=part_key(req.upload_id, req.part_number),
                size=req.size, expected_md5=req.expected_md5,
                expected_checksums=req.expected_checksums, checksum_algorithms=algorithms,
            ),
            self._where(req.bucket, req.key, record),
            owner=owner,
        )  # fmt: skip
        return pb.BeginUploadPartResponse(
            write_id=begun.upload_id,
            stripe_bytes=begun.stripe_bytes,
            max_call_bytes=begun.max_call_bytes,
        )

    async def copy_part(
        self,
        req: pb.UploadPartCopyRequest,
        *,
        owner: str = "",
        check: Callable[[datanode_pb2.ShardMeta], None] | None = None,
    ) -> pb.UploadPartCopyResponse:
        """A part made of (a range of) another object (src_version_id: that S3 version of
        it), copied through the gateway (a write of owner's); check: as `ObjectEngine.copy`'s."""
        found = await self._engine.resolve(
            req.src_bucket, req.src_key, version_id=req.src_version_id
        )
        src = found.meta
        if check is not None:
            check(src)
        if req.src_if_match and req.src_if_match.strip('"') != src.etag:
            raise errors.PreconditionFailed(f"{req.src_bucket}/{req.src_key}: ETag is {src.etag}")
        start, end = (req.range_start, req.range_end) if req.has_range else (0, src.size - 1)
        if req.has_range and (start > end or end >= src.size):
            raise errors.InvalidArgument(
                f"bytes {start}-{end} of {src.size}", reason="InvalidRange"
            )
        size = max(0, end - start + 1)
        begun = await self.begin_part(
            pb.BeginUploadPartRequest(
                bucket=req.bucket, key=req.key, upload_id=req.upload_id,
                part_number=req.part_number, size=size,
            ),
            owner=owner,
        )  # fmt: skip
        meta = await self._engine.copy_into(begun.write_id, found, start, size)
        return pb.UploadPartCopyResponse(part=part_info(meta), source=versions.info(src))

    async def complete(
        self, req: pb.CompleteMultipartUploadRequest, *, versioning: int = 0
    ) -> pb.ObjectInfo:
        """Make the listed parts the object; its info.

        An upload that already completed (Complete sent again: a client retrying after a lost
        reply, to any gateway) answers the object it made while that object is the key's
        current version, whatever parts the request lists (as S3 does); once the object was
        overwritten or deleted, NotFound (NoSuchUpload) as for any unknown upload. Else
        InvalidArgument (MalformedXML, InvalidPartOrder, InvalidPart, EntityTooSmall),
        PreconditionFailed (if_none_match and the key exists). versioning: the bucket's
        versioning status now (the object's version is made by this Complete, as in S3).
        """
        try:
            record = await self._record(req.bucket, req.key, req.upload_id)
            return await self._complete(req, record, versioning)
        except (errors.NotFound, errors.InvalidArgument) as exc:
            # No record: completed (or aborted). InvalidPart: a part vanished under us, which
            # is what a Complete racing another one of the same upload sees.
            if isinstance(exc, errors.InvalidArgument) and exc.reason != "InvalidPart":
                raise
            done = await self.completed(req.bucket, req.key, req.upload_id)
            if done is None:
                raise
            return done

    async def completed(self, bucket: str, key: str, upload_id: str) -> pb.ObjectInfo | None:
        """The info of bucket/key when its current version is the object upload_id completed
        into; None when it is not (never completed, or overwritten or deleted since)."""
        if not _UPLOAD_ID.fullmatch(upload_id):
            return None
        try:
            found = await self._engine.resolve(bucket, key, queue_heal=False)
        except errors.NotFound:
            return None
        if completed_upload(found.meta) != upload_id:
            return None
        return versions.info(found.meta)

    async def _complete(
        self,
        req: pb.CompleteMultipartUploadRequest,
        record: datanode_pb2.ShardMeta,
        versioning: int = 0,
    ) -> pb.ObjectInfo:
        numbers = [p.part_number for p in req.parts]
        if not numbers:
            raise errors.InvalidArgument(
                "a multipart upload needs at least a part", reason="MalformedXML"
            )
        if any(b <= a for a, b in itertools.pairwise(numbers)):
            raise errors.InvalidArgument(
                "part numbers must be ascending", reason="InvalidPartOrder"
            )
        where = self._where(req.bucket, req.key, record)
        found = await asyncio.gather(*(self._part(where, req.upload_id, p) for p in req.parts))
        for part, (meta, _) in zip(req.parts[:-1], found[:-1], strict=True):
            if meta.size < self._min_part_bytes:
                raise errors.InvalidArgument(
                    f"part {part.part_number} has {meta.size} bytes, "
                    f"at least {self._min_part_bytes} needed for all but the last part",
                    reason="EntityTooSmall",
                )
        meta = self._object_meta(req, record, where, [m for m, _ in found])
        meta.keep_versions, meta.null_version = versions.versioning(versioning)
        await self._engine.condition(where, meta, absent=req.if_none_match, if_match=req.if_match)
        holders = set(range(len(where.slots)))
        for _, held in found:
            holders &= held
        failed = set(range(len(where.slots))) - holders
        sources = [
            [
                shards_pb2.PartSource(bucket=names.MULTIPART_BUCKET, key=m.key, data_id=m.data_id)
                for m, _ in found
            ]
            for _ in where.slots
        ]
        await self._engine.publish(where, meta, meta.data_id, failed, sources)
        await self._discard(req.bucket, req.key, req.upload_id, record)
        return versions.info(meta)

    async def _part(
        self, where: placement.Placement, upload_id: str, part: pb.CompletedPart
    ) -> tuple[datanode_pb2.ShardMeta, frozenset[int]]:
        try:
            found = await self._engine.resolve_in(
                where, names.MULTIPART_BUCKET, part_key(upload_id, part.part_number),
                queue_heal=False,
            )  # fmt: skip
        except errors.NotFound:
            raise errors.InvalidArgument(
                f"part {part.part_number} was not uploaded", reason="InvalidPart"
            ) from None
        meta = found.meta
        if part.etag.strip('"') != meta.etag:
            raise errors.InvalidArgument(
                f"part {part.part_number} has ETag {meta.etag}, not {part.etag}",
                reason="InvalidPart",
            )
        for name, value in part.checksums.items():
            if meta.checksums.get(name.upper()) != value:
                raise errors.InvalidArgument(
                    f"part {part.part_number}: {name.upper()} does not match",
                    reason="InvalidPart",
                )
        if meta.data_shards != where.data_shards or list(meta.distribution) != list(
            where.positions
        ):
            raise errors.Unavailable(
                f"part {part.part_number} was written to another layout; upload it again"
            )
        return meta, found.holders

    @staticmethod
    def _object_meta(
        req: pb.CompleteMultipartUploadRequest,
        record: datanode_pb2.ShardMeta,
        where: placement.Placement,
        parts: list[datanode_pb2.ShardMeta],
    ) -> datanode_pb2.ShardMeta:
        meta = versions.new_meta(
            req.bucket, req.key, where, versions.info(record).headers,
            data_id=f"{req.upload_id}-{uuid.uuid4().hex}",
        )  # fmt: skip
        meta.size = sum(p.size for p in parts)
        meta.etag = multipart_etag([p.etag for p in parts])
        algorithm = record.upload_checksum_algorithm
        if algorithm and all(algorithm in p.checksums for p in parts):
            kind = record.upload_checksum_type or checksum_type(algorithm, "")
            meta.checksums[algorithm] = object_checksum(
                algorithm, kind, [p.checksums[algorithm] for p in parts], [p.size for p in parts]
            )
        check_expected(req.expected_checksums, meta.checksums)
        for number, p in zip((q.part_number for q in req.parts), parts, strict=True):
            kept = meta.parts.add(
                number=number, size=p.size, etag=p.etag, shard_bytes=p.parts[0].shard_bytes
            )
            if algorithm in p.checksums:  # GetObjectAttributes lists them
                kept.checksums[algorithm] = p.checksums[algorithm]
        return meta

    async def abort(self, req: pb.AbortMultipartUploadRequest) -> None:
        """Drop the upload and its parts (NotFound: NoSuchUpload)."""
        record = await self._record(req.bucket, req.key, req.upload_id)
        await self._discard(req.bucket, req.key, req.upload_id, record)

    async def _discard(
        self, bucket: str, key: str, upload_id: str, record: datanode_pb2.ShardMeta
    ) -> None:
        """Delete the upload's parts, then its record (a failure leaves them to the sweep)."""
        try:
            async for entry in self._lister.scan(
                names.MULTIPART_BUCKET, f"p/{upload_id}/", pool_index=record.upload_pool
            ):
                await self._engine.delete_in(
                    names.MULTIPART_BUCKET, entry.key, record.upload_pool, at=(bucket, key)
                )
            await self._engine.delete_in(
                names.MULTIPART_BUCKET, record.key, placement.FIRST_POOL, at=(bucket, key)
            )
        except errors.KVTierError as exc:
            log.warning("discarding upload %s of %s/%s: %s", upload_id, bucket, key, exc)

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """A page of an upload's parts, by number."""
        record = await self._record(req.bucket, req.key, req.upload_id)
        most = req.max_parts or MAX_PARTS_PAGE
        if not 1 <= most <= MAX_PARTS_PAGE:
            raise errors.InvalidArgument(f"max_parts must be 1..{MAX_PARTS_PAGE}")
        reply = pb.ListPartsResponse(
            checksum_algorithm=record.upload_checksum_algorithm,
            headers=versions.info(record).headers, initiator=record.upload_initiator,
        )  # fmt: skip
        after = part_key(req.upload_id, req.part_number_marker) if req.part_number_marker else ""
        async for entry in self._lister.scan(
            names.MULTIPART_BUCKET, f"p/{req.upload_id}/",
            pool_index=record.upload_pool, after=after,
        ):  # fmt: skip
            if len(reply.parts) == most:
                reply.is_truncated = True
                reply.next_part_number_marker = reply.parts[-1].part_number
                break
            reply.parts.add(
                part_number=_number(entry.key), size=entry.size, etag=entry.etag,
                mtime_unix_ms=entry.mtime_unix_ns // 1_000_000,
            )  # fmt: skip
        if record.upload_checksum_algorithm:
            await self._fill_checksums(req, record, reply)
        return reply

    async def _fill_checksums(
        self,
        req: pb.ListPartsRequest,
        record: datanode_pb2.ShardMeta,
        reply: pb.ListPartsResponse,
    ) -> None:
        where = self._where(req.bucket, req.key, record)

        async def fill(part: pb.PartInfo) -> None:
            key = part_key(req.upload_id, part.part_number)
            try:
                found = await self._engine.resolve_in(
                    where, names.MULTIPART_BUCKET, key, queue_heal=False
                )
            except errors.NotFound:
                return
            part.checksums.update(found.meta.checksums)

        await asyncio.gather(*(fill(p) for p in reply.parts))

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """A page of a bucket's uploads in progress, by key then initiation."""
        names.check_storage_bucket(req.bucket)
        most = req.max_uploads or MAX_PARTS_PAGE
        if not 1 <= most <= MAX_PARTS_PAGE:
            raise errors.InvalidArgument(f"max_uploads must be 1..{MAX_PARTS_PAGE}")
        uploads = [u async for u in self._uploads_of(req.bucket) if u.key.startswith(req.prefix)]
        uploads.sort(key=lambda u: (u.key.encode(), u.initiated_unix_ms, u.upload_id))
        reply = pb.ListMultipartUploadsResponse()
        last = ("", "")  # the (key or common prefix, upload id) listed last: the next marker
        for upload in _after_marker(uploads, req):
            folded = listing.fold(upload.key, req.prefix, req.delimiter)
            if folded is not None and reply.common_prefixes and reply.common_prefixes[-1] == folded:
                continue
            if len(reply.uploads) + len(reply.common_prefixes) == most:
                reply.is_truncated = True
                reply.next_key_marker, reply.next_upload_id_marker = last
                break
            if folded is not None:
                reply.common_prefixes.append(folded)
                last = (folded, "")
            else:
                reply.uploads.append(upload)
                last = (upload.key, upload.upload_id)
        return reply

    async def _uploads_of(self, bucket: str) -> AsyncIterator[pb.MultipartUploadInfo]:
        prefix = f"u/{bucket}/"
        async for entry in self._lister.scan(names.MULTIPART_BUCKET, prefix):
            upload_id, _, key = entry.key[len(prefix) :].partition("/")
            yield pb.MultipartUploadInfo(
                key=key, upload_id=upload_id, initiated_unix_ms=entry.mtime_unix_ns // 1_000_000,
                owner=entry.owner,  # the record's ACL's: what the upload's object will have
                initiator=entry.initiator,
            )  # fmt: skip

    async def sweep(self) -> int:
        """Abort uploads older than expiry_s; how many."""
        cutoff_ns = time.time_ns() - int(self._expiry_s * 1e9)
        stale = []
        async for entry in self._lister.scan(names.MULTIPART_BUCKET, "u/"):
            if entry.mtime_unix_ns < cutoff_ns:
                stale.append(entry.key)
        for key in stale:
            bucket, _, rest = key[2:].partition("/")
            upload_id, _, object_key = rest.partition("/")
            try:
                record = await self._record(bucket, object_key, upload_id)
            except errors.KVTierError:
                continue
            log.info("aborting multipart upload %s of %s/%s: expired", upload_id, bucket, key)
            await self._discard(bucket, object_key, upload_id, record)
        return len(stale)


def _after_marker(
    uploads: list[pb.MultipartUploadInfo], req: pb.ListMultipartUploadsRequest
) -> list[pb.MultipartUploadInfo]:
    """The uploads after (key_marker, upload_id_marker) in listing order (S3's rules): without
    upload_id_marker, the keys after key_marker; with it, also key_marker's own uploads after
    that one (when it is gone: those whose id sorts after it). A key_marker that is a common
    prefix of the listing (a page's NextKeyMarker) skips every key under it."""
    if not req.key_marker:
        return uploads
    marker = req.key_marker.encode()
    rolled_up = listing.fold(req.key_marker, req.prefix, req.delimiter) == req.key_marker
    same = [u for u in uploads if u.key.encode() == marker]
    ids = [u.upload_id for u in same]
    if rolled_up or not req.upload_id_marker:
        same = []
    elif req.upload_id_marker in ids:
        same = same[ids.index(req.upload_id_marker) + 1 :]
    else:
        same = [u for u in same if u.upload_id > req.upload_id_marker]
    later = [
        u for u in uploads
        if u.key.encode() > marker and not (rolled_up and u.key.startswith(req.key_marker))
    ]  # fmt: skip
    return same + later


def part_info(meta: datanode_pb2.ShardMeta) -> pb.PartInfo:
    """A stored part's info."""
    return pb.PartInfo(
        part_number=_number(meta.key), size=meta.size, etag=meta.etag,
        mtime_unix_ms=meta.mtime_unix_ns // 1_000_000, checksums=dict(meta.checksums),
    )  # fmt: skip
