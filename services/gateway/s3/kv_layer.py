"""KV buckets as an `objectlayer.ObjectLayer`: objects are blocks of the bucket's namespace on
the kvcache nodes (layout: `kv_layout`; multipart uploads: `kv_multipart`), one version each
("null"), at most `kv_layout.MAX_KV_OBJECT_BYTES`, gone when evicted.

Each call checks the bucket once (`ObjectFront.request_bucket`: its tenant's users,
privileged callers, or the request's ACL admission) and that it is a KV bucket, then acts
through the bucket's client (`kv_clients.KVBuckets`, acting for the bucket's tenant). What a KV
bucket cannot do (copies, ACLs but private, versions, changing tags after the PUT) is
InvalidArgument with reason NotImplemented.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

from kvtier import errors, kv
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway import lifecycle, listing, objectlayer, versionlisting
from services.gateway.s3 import acl as s3acl
from services.gateway.s3 import kv_clients, kv_inplace, kv_layout, kv_multipart

log = logging.getLogger(__name__)

#: Key prefixes of a KV bucket's blocks that belong to multipart uploads, not to objects
#: (parts first: a record outlives its parts).
_UPLOAD_PREFIXES = (kv_layout.PART_PREFIX, kv_layout.UPLOAD_PREFIX)
_PAGE = 1000


def _not_implemented(what: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"{what} is not implemented on KV buckets", reason="NotImplemented"
    )


def _check_version(version_id: str) -> None:
    """A KV object has one version, "null" (NoSuchVersion for any other)."""
    if version_id not in ("", "null"):
        raise errors.NotFound("The specified version does not exist.", reason="NoSuchVersion")


def _no_such_key() -> errors.NotFound:
    return errors.NotFound("The specified key does not exist.", reason="NoSuchKey")


@dataclasses.dataclass(frozen=True, slots=True)
class KVReader:
    """A KV object read whole (`objectlayer.ObjectReader`): its blocks are in memory (blob
    None: opened for its info only)."""

    stored: pb.ObjectInfo
    blob: kv_layout.Blob | None

    @property
    def info(self) -> pb.ObjectInfo:
        """The object's info (its S3 checksums only)."""
        info = pb.ObjectInfo()
        info.CopyFrom(self.stored)
        info.checksums.clear()
        info.checksums.update(kv_layout.public_checksums(self.stored))
        return info

    def part_span(self, number: int) -> tuple[int, int] | None:
        """(offset, size) of part number, from the part sizes its metadata block keeps."""
        return kv_layout.part_span(self.stored, number)

    def uploaded_parts(self) -> Sequence[objectlayer.Part] | None:
        """The part sizes and checksums a completed upload's metadata block keeps; None for a
        PUT's object (whose ETag may have a "-" too: `kv_layout.version_etag`)."""
        if not kv_layout.completed_upload(self.stored):
            return None
        return kv_layout.uploaded_parts(self.stored)

    async def stream(
        self,
        first: int,
        length: int,
        sink: objectlayer.Sink,
        ready: objectlayer.Ready | None,
        buffer: objectlayer.Buffer | None = None,
    ) -> None:
        """length bytes from first, a block's view at a time (the blocks are in memory already:
        buffer is not used)."""
        if self.blob is None:
            raise RuntimeError("a KV object opened without its data was read")
        if length <= 0:
            return
        for piece in self.blob.pieces(first, first + length - 1):
            if ready is not None:
                await ready()
            await sink(piece)


class KVLayer:
    """KV buckets (see the module docstring)."""

    copies = False

    def __init__(
        self,
        front: front_mod.ObjectFront,
        clients: kv_clients.KVBuckets,
        *,
        lifecycle_day_s: float = lifecycle.DAY_S,
    ) -> None:
        self.front = front
        self.clients = clients
        #: Seconds in a lifecycle rule's day (the blocks' TTL).
        self.lifecycle_day_s = lifecycle_day_s

    async def bucket(self, name: str) -> tuple[metadata_pb2.BucketInfo, kv.AsyncKVClient]:
        """The record and client of a KV bucket the request may use (the one check)."""
        info = await self.front.request_bucket(name)
        if info.kind != metadata_pb2.BUCKET_KIND_KV:
            raise errors.InvalidArgument(f"bucket {name} is not a KV bucket")
        return info, await self.clients.client(info)

    def _ttl_s(
        self, info: metadata_pb2.BucketInfo, key: str, size: int, tags: Mapping[str, str]
    ) -> float | None:
        """The TTL the bucket's lifecycle rules give an object written now (None: none)."""
        if not info.lifecycle.rules:
            return None
        return lifecycle.kv_ttl_s(
            info.lifecycle, key, size, dict(tags), now_s=time.time(), day_s=self.lifecycle_day_s
        )

    async def head(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """The object's info, from its metadata block (its S3 checksums only)."""
        return KVReader(await self._stored(bucket, key, version_id), None).info

    async def _stored(self, bucket: str, key: str, version_id: str) -> pb.ObjectInfo:
        """The object's metadata block as stored (NoSuchKey, NoSuchVersion)."""
        _check_version(version_id)
        _, client = await self.bucket(bucket)
        info = await kv_layout.read_info(client, kv_layout.meta_key(key))
        if info is None:
            raise _no_such_key()
        return info

    async def open_read(
        self, bucket: str, key: str, version_id: str = "", *, data: bool = True
    ) -> KVReader:
        """The object's info and bytes, consistent with each other (data False: its metadata
        block only)."""
        if not data:
            return KVReader(await self._stored(bucket, key, version_id), None)
        _check_version(version_id)
        _, client = await self.bucket(bucket)
        info, blob = await kv_layout.fetch_object(client, key)
        return KVReader(info, blob)

    async def put(
        self, req: pb.BeginPutRequest, body: objectlayer.PutBody, *, md5: bool = True
    ) -> pb.ObjectInfo:
        """Read the body into the object's blocks: straight into the node's memory where it
        can (`kv_inplace`: a known size up to `kv_inplace.IN_PLACE_MAX_BYTES` over shm), else
        into a blob (`kv_layout.receive`: body.size bytes, or for a plain HTTP chunked body as
        many as come; EntityTooLarge past `kv_layout.MAX_KV_OBJECT_BYTES`, before any byte for
        a known size, once it is passed for a chunked one), check its digests
        (DigestMismatch), then store it: the data blocks, then the metadata block (claimed
        first with if_none_match: PreconditionFailed when taken; with if_match swapped first
        for the one that matched, `kv_layout.check_if_match`: PreconditionFailed when another
        write got there first); the blocks live as long as
        the bucket's lifecycle rules say. The ETag is the MD5 unless not md5 (the body's
        trailing checksum vouched for it: `kv_layout.version_etag`)."""
        most = kv_layout.MAX_KV_OBJECT_BYTES
        if body.size > most:
            raise kv_layout.too_large(most)
        info, client = await self.bucket(req.bucket)
        matched = await kv_layout.check_if_match(client, req.key, req.if_match)
        done: dict[str, str] | kv_layout.Blob | None = None
        if body.size >= 0:  # a small body of known size goes straight into the node's memory
            stored = pb.ObjectInfo(
                bucket=req.bucket, key=req.key, headers=req.headers, parts=1
            )  # size, ETag, time and checksums once the body is in (`kv_inplace`)
            done = await kv_inplace.put_in_place(
                client, req.key, body, stored, algorithms=req.checksum_algorithms,
                expected=req.expected_checksums, expected_md5=req.expected_md5, md5=md5,
                if_none_match=req.if_none_match, matched=matched,
                ttl_s=self._ttl_s(info, req.key, body.size, req.headers.tags),
            )  # fmt: skip
            if isinstance(done, dict):
                stored.checksums.clear()  # the version id the metadata block carries is not one
                stored.checksums.update(done)
                return stored
        read = done if isinstance(done, kv_layout.Blob) else None  # the body's bytes: in it
        blob, etag, sums = await kv_layout.receive(
            body, most=most, algorithms=req.checksum_algorithms,
            expected=req.expected_checksums, expected_md5=req.expected_md5, md5=md5, read=read,
        )  # fmt: skip
        stored = pb.ObjectInfo(
            bucket=req.bucket, key=req.key, size=blob.size,
            etag=etag if md5 else kv_layout.version_etag(blob.version),
            mtime_unix_ms=int(time.time() * 1000), headers=req.headers, parts=1,
            checksums=sums,  # kept for GET / HEAD with x-amz-checksum-mode: ENABLED
        )  # fmt: skip
        ttl_s = self._ttl_s(info, req.key, blob.size, req.headers.tags)
        await kv_layout.store_object(
            client, req.key, blob, stored, if_none_match=req.if_none_match, matched=matched,
            ttl_s=ttl_s,
        )  # fmt: skip
        stored.checksums.clear()  # the version id the metadata block carries is not one
        stored.checksums.update(sums)
        return stored

    async def delete(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """Delete the object's blocks, metadata first (absent: fine)."""
        _check_version(version_id)
        _, client = await self.bucket(bucket)
        await client.delete(kv_layout.object_block_keys(key))
        return pb.ObjectInfo()

    async def copy(self, req: pb.CopyObjectRequest) -> pb.ObjectInfo:
        """NotImplemented."""
        raise _not_implemented("CopyObject")

    async def list(self, req: pb.ListObjectsRequest) -> pb.ListObjectsResponse:
        """A page of the keys in DRAM, each with its metadata (objects whose metadata is gone
        are left out); next_continuation_token is the last key seen, in hex."""
        after = start_after(req)
        _, client = await self.bucket(req.bucket)
        max_keys = min(req.max_keys or 1000, 1000)
        page = pb.ListObjectsResponse()
        last = after
        while len(page.objects) + len(page.common_prefixes) < max_keys:
            entries, more = await client.list_keys(
                prefix=req.prefix.encode(), start_after=last, limit=1000
            )
            for key_bytes, _size in entries:
                last = key_bytes
                if key_bytes.startswith(b"\x00"):  # metadata, tails, uploads: never keys
                    continue
                key = key_bytes.decode()
                folded = listing.fold(key, req.prefix, req.delimiter)
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
        return page

    async def delete_bucket(self, bucket: str) -> None:
        """BucketNotEmpty while a block of an object is left (blocks of uploads do not count);
        else the record (`ObjectFront.delete_bucket`), then the blocks of its uploads in
        progress: nothing reaches them by then, and their TTL ends them anyway (a failure is
        logged)."""
        _, client = await self.bucket(bucket)
        if await _holds_objects(client):
            raise errors.PreconditionFailed(
                "The bucket you tried to delete is not empty.", reason="BucketNotEmpty"
            )
        await self.front.delete_bucket(bucket)
        try:
            await _discard_uploads(client)
        except errors.KVTierError as exc:
            log.warning("deleting the upload blocks of KV bucket %s: %s", bucket, exc)

    async def set_versioning(
        self, bucket: str, status: metadata_pb2.VersioningStatus.ValueType
    ) -> None:
        """NotImplemented: a KV object is DRAM blocks, one version each."""
        raise errors.InvalidArgument("KV buckets cannot be versioned", reason="NotImplemented")

    async def create_multipart(
        self, req: pb.CreateMultipartUploadRequest
    ) -> pb.CreateMultipartUploadResponse:
        """The upload's record block (`kv_multipart.create_upload`)."""
        _, client = await self.bucket(req.bucket)
        return pb.CreateMultipartUploadResponse(
            upload_id=await kv_multipart.create_upload(client, req)
        )

    async def upload_part(
        self,
        req: pb.BeginUploadPartRequest,
        body: objectlayer.PutBody,
        *,
        checksum_algorithms: Sequence[str] = (),
    ) -> pb.PartInfo:
        """The part's blocks (`kv_multipart.upload_part`: NoSuchUpload, EntityTooLarge past
        `kv_layout.MAX_KV_OBJECT_BYTES`, DigestMismatch)."""
        _, client = await self.bucket(req.bucket)
        return await kv_multipart.upload_part(client, req, body, checksum_algorithms)

    async def copy_part(self, req: pb.UploadPartCopyRequest) -> pb.UploadPartCopyResponse:
        """NotImplemented (as CopyObject)."""
        raise _not_implemented("UploadPartCopy")

    async def complete_multipart(
        self, req: pb.CompleteMultipartUploadRequest
    ) -> pb.CompleteMultipartUploadResponse:
        """The listed parts assembled into one object (`kv_multipart.complete`), which lives
        as long as the bucket's lifecycle rules say."""
        info, client = await self.bucket(req.bucket)

        def ttl_s(size: int, tags: Mapping[str, str]) -> float | None:
            return self._ttl_s(info, req.key, size, tags)

        done = await kv_multipart.complete(client, req, ttl_s)
        return pb.CompleteMultipartUploadResponse(object=done)

    async def abort_multipart(self, req: pb.AbortMultipartUploadRequest) -> None:
        """Delete the upload's blocks (NoSuchUpload when unknown, or of another key)."""
        _, client = await self.bucket(req.bucket)
        await kv_multipart.abort_upload(client, req.upload_id, req.key)

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """A page of the upload's parts (`kv_multipart.list_parts`)."""
        _, client = await self.bucket(req.bucket)
        return await kv_multipart.list_parts(client, req)

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """A page of the bucket's uploads (`kv_multipart.uploads_page`)."""
        _, client = await self.bucket(req.bucket)
        return await kv_multipart.uploads_page(client, req)

    async def set_acl(
        self, bucket: str, key: str, acl: acl_pb2.Acl, version_id: str = ""
    ) -> pb.ObjectInfo:
        """A KV object's ACL is private (its tenant's full control, what `head` shows): a
        private ACL changes nothing (the object's info; NoSuchKey), another is NotImplemented."""
        _check_version(version_id)
        record, client = await self.bucket(bucket)
        if not s3acl.is_private(acl, record.tenant):
            raise _not_implemented("An ACL other than private")
        info = await kv_layout.read_info(client, kv_layout.meta_key(key))
        if info is None:
            raise _no_such_key()
        return info

    async def list_versions(
        self, bucket: str, *, prefix: str = "", key_marker: str = "", max_keys: int = 1000
    ) -> versionlisting.VersionPage:
        """NotImplemented (a KV bucket is never versioned)."""
        raise _not_implemented("ListObjectVersions")

    async def set_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str = ""
    ) -> pb.ObjectInfo:
        """NotImplemented: a KV object's tags are those of its PUT (x-amz-tagging, what `head`
        shows), its blocks are never changed in place (NoSuchVersion first: one version each)."""
        _check_version(version_id)
        raise _not_implemented("Changing an object's tags")


def start_after(req: pb.ListObjectsRequest) -> bytes:
    """The key a KV listing starts after: its continuation token (the hex of the last key a
    page saw), else start_after; InvalidArgument for a token that is not hex."""
    if not req.continuation_token:
        return req.start_after.encode()
    try:
        return bytes.fromhex(req.continuation_token)
    except ValueError:
        raise errors.InvalidArgument(
            "The continuation token provided is incorrect", reason="InvalidArgument"
        ) from None


async def _holds_objects(client: kv.AsyncKVClient) -> bool:
    """Whether a KV bucket holds a block of an object (blocks of uploads do not count)."""
    after = b""
    while True:
        entries, more = await client.list_keys(start_after=after, limit=_PAGE)
        if any(not key.startswith(_UPLOAD_PREFIXES) for key, _ in entries):
            return True
        if not more or not entries:
            return False
        after = entries[-1][0]


async def _discard_uploads(client: kv.AsyncKVClient) -> None:
    """Delete every block of a KV bucket's multipart uploads: parts, then records."""
    for prefix in _UPLOAD_PREFIXES:
        while True:
            entries, more = await client.list_keys(prefix=prefix, limit=_PAGE)
            deleted = await client.delete([key for key, _ in entries]) if entries else 0
            if not more or not deleted:  # none left, or none deletable: their TTL ends them
                break


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


def _kv_is_a_layer(layer: KVLayer) -> objectlayer.ObjectLayer:
    """mypy checks here that KVLayer is an ObjectLayer."""
    return layer
