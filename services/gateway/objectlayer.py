"""The object layer: the one seam between the gateway's fronts (the S3 handlers, the gRPC
`ObjectService`) and what stores a bucket's objects, in domain terms (as MinIO's ObjectLayer).

Every method names a bucket by its user-facing name and checks, inside and once, that the
caller (`kvtier.principal.current()`, and the S3 request's ACL admission: `access`) may use
it for that operation; replies are domain messages (`ObjectInfo`, listing pages) and failures
domain errors (`kvtier.errors`) whose `reason` is S3's code where one applies, so a front only
translates. Two implementations:

- `ErasureLayer` (here): erasure-coded buckets, a thin adapter over `front.ObjectFront` (the
  bucket's record, its tenant, the ACL admission, storage names) and the engine under it;
- `s3.kv_layer.KVLayer`: KV buckets, whose objects are blocks of the bucket's namespace on
  the kvcache nodes (`s3.kv_layout`). What a KV bucket cannot do (copies, ACLs but private,
  versions, tags changed after the PUT) is InvalidArgument with reason NotImplemented.

The S3 front picks one by the bucket's kind (`S3Server.layer`); the gRPC servicer serves
erasure-coded buckets through `ErasureLayer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from kvtier import errors
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import access, multipart, objects, versionlisting, versions
from services.gateway import front as front_mod

#: Where a read's bytes go, a piece at a time (a piece's view is valid only during the call).
Sink = Callable[[memoryview], Awaitable[None]]
#: Awaited before each piece is gathered (the S3 writer: until its client took the last one).
Ready = Callable[[], Awaitable[None]]
#: Memory of at least nbytes that the next piece may be gathered into, kept by the consumer
#: until it is sent (the S3 writer's own buffers: no copy out of a staging slot).
Buffer = Callable[[int], memoryview]
#: The x-amz-checksum-* trailers of a body, by this prefix.
CHECKSUM_TRAILER = "x-amz-checksum-"


class Stalled(Exception):
    """The body paused while filling a staging slot; its bytes so far are out of the slot
    (`Payload.spill` receives the rest of the call, then `Payload.stage` starts with them)."""


class PutBody(Protocol):
    """A PUT's bytes as they arrive (the S3 front's `body.Payload`)."""

    #: The length the client declared (-1: unknown, until the body ends).
    size: int

    @property
    def spilled(self) -> int:
        """Bytes `spill` holds for the next `stage`."""
        ...

    async def stage(
        self, view: memoryview, *, to_end: bool = False, until: float | None = None
    ) -> int:
        """Fill view (to_end: up to the body's end); raises Stalled when the body pauses (or,
        with until, is not in by that loop time)."""
        ...

    async def spill(self, length: int) -> None:
        """Take the rest of a stalled call's length bytes without a slot."""
        ...

    async def at_end(self) -> bool:
        """Whether no byte of the body is left."""
        ...

    async def fill(self, view: memoryview) -> None:
        """Fill view exactly (IncompleteBody when the body ends first)."""
        ...

    async def fill_to_end(self, view: memoryview) -> int:
        """Fill view as far as the body goes: len(view) bytes, or fewer at its end."""
        ...

    async def finish(self) -> dict[str, str]:
        """The body's trailers, once every byte was read."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """One part of a multipart upload's object: its size and the checksums kept of it
    (algorithm -> base64; empty where the layer keeps none)."""

    size: int
    checksums: Mapping[str, str]


class ObjectReader(Protocol):
    """One version of an object, opened for reading: its info, then any range of its bytes."""

    @property
    def info(self) -> pb.ObjectInfo:
        """The version's info (size, ETag, time, headers, checksums, version id)."""
        ...

    def part_span(self, number: int) -> tuple[int, int] | None:
        """(offset, size) of part number (1-based; part 1 of a plain object: all of it);
        None past the last part."""
        ...

    def uploaded_parts(self) -> Sequence[Part] | None:
        """The parts of a multipart upload's object, in order (GetObjectAttributes'
        ObjectParts); None for an object not uploaded in parts."""
        ...

    async def stream(
        self, first: int, length: int, sink: Sink, ready: Ready | None, buffer: Buffer | None = None
    ) -> None:
        """length bytes from first to sink, a piece at a time (each gathered into buffer's
        memory where the layer gathers pieces and buffer is given)."""
        ...


class ObjectLayer(Protocol):
    """What the fronts do with a bucket's objects (see the module docstring). Raises
    NotFound (reason NoSuchBucket, NoSuchKey, NoSuchVersion, NoSuchUpload),
    PermissionDenied (AccessDenied), InvalidArgument, PreconditionFailed, Unavailable."""

    #: Whether the layer's buckets take server-side copies (`copy`); without, a front refuses
    #: one (NotImplemented) before it looks at the copy's source.
    copies: bool

    async def head(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """A version's info (the current one without version_id)."""
        ...

    async def open_read(
        self, bucket: str, key: str, version_id: str = "", *, data: bool = True
    ) -> ObjectReader:
        """A version, to read (the current one without version_id); data False: for its info
        and part spans only (a HEAD: the reader's stream is never called)."""
        ...

    async def put(
        self, req: pb.BeginPutRequest, body: PutBody, *, md5: bool = True
    ) -> pb.ObjectInfo:
        """Store body (at most req.size bytes; body.size -1: until it ends) as req.key, its
        digests checked (errors.DigestMismatch) once every byte is in; nothing is visible
        before. The layer's own limits are InvalidArgument (EntityTooLarge,
        MissingContentLength). md5 False: the body's trailing checksum vouches for its bytes,
        and the ETag need not be their MD5 (a layer may skip computing it)."""
        ...

    async def delete(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """Delete an object or one version (absent: fine); the info of a delete marker
        written or a version removed, else an empty one."""
        ...

    async def copy(self, req: pb.CopyObjectRequest) -> pb.ObjectInfo:
        """A server-side copy (the source's bucket the caller's own)."""
        ...

    async def list(self, req: pb.ListObjectsRequest) -> pb.ListObjectsResponse:
        """A page of a bucket's objects (start_after / continuation_token: where to go on)."""
        ...

    async def delete_bucket(self, bucket: str) -> None:
        """Delete a bucket that holds no object (PreconditionFailed, reason BucketNotEmpty),
        its multipart uploads in progress with it."""
        ...

    async def set_versioning(
        self, bucket: str, status: metadata_pb2.VersioningStatus.ValueType
    ) -> None:
        """Set the bucket's versioning status (InvalidArgument, reason NotImplemented, where
        the layer's objects have one version each)."""
        ...

    async def create_multipart(
        self, req: pb.CreateMultipartUploadRequest
    ) -> pb.CreateMultipartUploadResponse:
        """Start a multipart upload."""
        ...

    async def upload_part(
        self,
        req: pb.BeginUploadPartRequest,
        body: PutBody,
        *,
        checksum_algorithms: Sequence[str] = (),
    ) -> pb.PartInfo:
        """Store body (req.size bytes; body.size -1: until it ends, req.size its bound) as a
        part of an upload (NoSuchUpload), hashed also with checksum_algorithms (trailers to
        come) and its digests checked (errors.DigestMismatch) as `put` checks them; the part's
        info (its ETag the MD5). The layer's own limits are InvalidArgument (EntityTooLarge)."""
        ...

    async def copy_part(self, req: pb.UploadPartCopyRequest) -> pb.UploadPartCopyResponse:
        """A part copied from (a range of) an object of the caller's own (where `copies`)."""
        ...

    async def complete_multipart(
        self, req: pb.CompleteMultipartUploadRequest
    ) -> pb.CompleteMultipartUploadResponse:
        """Make the listed parts the object (InvalidArgument: MalformedXML, InvalidPartOrder,
        InvalidPart, EntityTooSmall, the layer's EntityTooLarge; PreconditionFailed with
        if_none_match when the key exists). Sent again for an upload that completed, while its
        object is the key's current version: that object, whatever parts are listed (as S3);
        else NoSuchUpload."""
        ...

    async def abort_multipart(self, req: pb.AbortMultipartUploadRequest) -> None:
        """Drop an upload and its parts (NoSuchUpload)."""
        ...

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """A page of an upload's parts, by number (NoSuchUpload)."""
        ...

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """A bucket's uploads in progress (prefix; the front pages them)."""
        ...

    async def set_acl(
        self, bucket: str, key: str, acl: acl_pb2.Acl, version_id: str = ""
    ) -> pb.ObjectInfo:
        """Replace the ACL of an object's current version (version_id: that version's, current
        or not) in place; the version's info. `head` reads it (headers.acl)."""
        ...

    async def list_versions(
        self, bucket: str, *, prefix: str = "", key_marker: str = "", max_keys: int = 1000
    ) -> versionlisting.VersionPage:
        """A page of a bucket's S3 versions."""
        ...

    async def set_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str = ""
    ) -> pb.ObjectInfo:
        """Replace the tags of an object's current version (version_id: that version's, current
        or not) in place (empty: remove them); the version's info. `head` reads them
        (headers.tags)."""
        ...


async def receive(
    engine: objects.ObjectEngine, body: PutBody, write_id: str, size: int
) -> datanode_pb2.ShardMeta:
    """Stream the body into a begun write and commit it (aborted on any failure). A body of
    unknown length (plain HTTP chunked) goes in until it ends, size being its bound
    (EntityTooLarge past it). A call takes its staging slot only once its bytes come, and
    gives it up while they pause (`body.Payload.stage`)."""
    open_ended = body.size < 0

    async def fill(view: memoryview) -> int:
        return await body.stage(view, to_end=open_ended)

    try:
        stripe, most = engine.upload_limits(write_id)
        chunk = most - most % stripe
        written = 0
        while written < size:
            n = min(chunk, size - written)
            if not body.spilled:
                await body.at_end()  # a byte is here (or the end): now a slot is worth taking
            try:
                got = await engine.write_call(write_id, n, fill)
            except Stalled:
                await body.spill(n)  # the call's bytes, no slot held; then stage again
                continue
            written += got
            if got < n:  # the end of an open-ended body
                break
        if open_ended and written == size and not await body.at_end():
            raise errors.InvalidArgument(
                f"Your proposed upload exceeds {size} bytes.", reason="EntityTooLarge"
            )
        trailers = await body.finish()
        for name, value in trailers.items():
            if name.lower().startswith(CHECKSUM_TRAILER):
                engine.expect_checksum(write_id, name[len(CHECKSUM_TRAILER) :], value)
        return await engine.commit_meta(write_id)
    except BaseException:
        await engine.abort_put(pb.AbortPutRequest(upload_id=write_id))
        raise


@dataclasses.dataclass(frozen=True, slots=True)
class ErasureReader:
    """An erasure-coded version opened for reading (`ObjectReader`)."""

    engine: objects.ObjectEngine
    found: versions.Resolved

    @property
    def meta(self) -> datanode_pb2.ShardMeta:
        """The version's stored metadata (parts, checksums, versioning flags)."""
        return self.found.meta

    @property
    def info(self) -> pb.ObjectInfo:
        """The version's info."""
        return versions.info(self.found.meta)

    def part_span(self, number: int) -> tuple[int, int] | None:
        """(offset, size) of part number (`multipart.part_span`)."""
        return multipart.part_span(self.found.meta, number)

    def uploaded_parts(self) -> Sequence[Part] | None:
        """The parts a completed upload kept (sizes, its checksum algorithm's part checksums);
        None for a PUT's object (its ETag an MD5, not one of part MD5s)."""
        meta = self.found.meta
        if not multipart.is_multipart_etag(meta.etag):
            return None
        return [Part(p.size, dict(p.checksums)) for p in meta.parts]

    async def stream(
        self, first: int, length: int, sink: Sink, ready: Ready | None, buffer: Buffer | None = None
    ) -> None:
        """length bytes from first, a staging slot (or buffer's memory) at a time
        (`ObjectEngine.stream`)."""
        await self.engine.stream(self.found, first, length, sink, ready, buffer)


class ErasureLayer:
    """Erasure-coded buckets (`ObjectLayer`) over the object front: each call checks the
    bucket and its tenant there (`ObjectFront.bucket_for`, or the request's ACL admission)."""

    copies = True

    def __init__(self, front: front_mod.ObjectFront) -> None:
        self.front = front

    async def head(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """`ObjectFront.head_object`."""
        return await self.front.head_object(bucket, key, version_id)

    async def open_read(
        self, bucket: str, key: str, version_id: str = "", *, data: bool = True
    ) -> ErasureReader:
        """The version `ObjectFront.resolve` finds (versions.DeleteMarker: a NotFound); its
        metadata only either way (the stream reads the bytes)."""
        found = await self.front.resolve(bucket, key, version_id, data=data)
        return ErasureReader(self.front.engine, found)

    async def put(
        self, req: pb.BeginPutRequest, body: PutBody, *, md5: bool = True
    ) -> pb.ObjectInfo:
        """BeginPut, the body through the engine's staging slots (`receive`), commit (the
        ETag is always the MD5, computed as the body streams)."""
        begun = await self.front.begin_put(req)
        return versions.info(await receive(self.front.engine, body, begun.upload_id, req.size))

    async def delete(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """`ObjectFront.delete_object`."""
        return await self.front.delete_object(bucket, key, version_id)

    async def copy(self, req: pb.CopyObjectRequest) -> pb.ObjectInfo:
        """`ObjectFront.copy_object`."""
        return await self.front.copy_object(req)

    async def list(self, req: pb.ListObjectsRequest) -> pb.ListObjectsResponse:
        """`ObjectFront.list_objects`."""
        return await self.front.list_objects(req)

    async def delete_bucket(self, bucket: str) -> None:
        """`ObjectFront.delete_bucket`."""
        await self.front.delete_bucket(bucket)

    async def set_versioning(
        self, bucket: str, status: metadata_pb2.VersioningStatus.ValueType
    ) -> None:
        """The bucket's record (`ObjectFront.set_bucket_config`)."""
        versioning = metadata_pb2.BucketVersioning(status=status)
        await self.front.set_bucket_config(
            bucket, metadata_pb2.SetBucketConfigRequest(versioning=versioning)
        )

    async def create_multipart(
        self, req: pb.CreateMultipartUploadRequest
    ) -> pb.CreateMultipartUploadResponse:
        """`ObjectFront.create_multipart`."""
        return await self.front.create_multipart(req)

    async def upload_part(
        self,
        req: pb.BeginUploadPartRequest,
        body: PutBody,
        *,
        checksum_algorithms: Sequence[str] = (),
    ) -> pb.PartInfo:
        """`ObjectFront.begin_part`, then the body through the engine's staging slots
        (`receive`)."""
        begun = await self.front.begin_part(req, checksum_algorithms=checksum_algorithms)
        meta = await receive(self.front.engine, body, begun.write_id, req.size)
        return multipart.part_info(meta)

    async def copy_part(self, req: pb.UploadPartCopyRequest) -> pb.UploadPartCopyResponse:
        """`ObjectFront.copy_part`."""
        return await self.front.copy_part(req)

    async def complete_multipart(
        self, req: pb.CompleteMultipartUploadRequest
    ) -> pb.CompleteMultipartUploadResponse:
        """`ObjectFront.complete_multipart`."""
        return await self.front.complete_multipart(req)

    async def abort_multipart(self, req: pb.AbortMultipartUploadRequest) -> None:
        """`ObjectFront.abort_multipart`."""
        await self.front.abort_multipart(req)

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """`ObjectFront.list_parts`."""
        return await self.front.list_parts(req)

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """`ObjectFront.list_uploads`."""
        return await self.front.list_uploads(req)

    async def set_acl(
        self, bucket: str, key: str, acl: acl_pb2.Acl, version_id: str = ""
    ) -> pb.ObjectInfo:
        """`ObjectFront.set_object_acl`."""
        return await self.front.set_object_acl(bucket, key, acl, version_id)

    async def list_versions(
        self, bucket: str, *, prefix: str = "", key_marker: str = "", max_keys: int = 1000
    ) -> versionlisting.VersionPage:
        """`ObjectFront.list_versions`."""
        return await self.front.list_versions(
            bucket, prefix=prefix, key_marker=key_marker, max_keys=max_keys
        )

    async def set_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str = ""
    ) -> pb.ObjectInfo:
        """Replace a version's tags in place, on each drive of its set (`MetaUpdater.update`:
        NoSuchKey, NoSuchVersion, versions.DeleteMarker); the caller's own bucket, or an object
        the request was admitted to (a bucket policy's Allow, `s3.acl_ops.POLICY_ONLY`: the
        front's resolve checks that admission, as set_acl's does)."""
        admission = access.current()
        if admission is not None and admission.bucket == bucket and admission.scope == "object":
            await self.front.resolve(bucket, key, version_id)  # AccessDenied, NotFound
            stored = front_mod.storage(await self.front.request_bucket(bucket))
        else:
            stored = await self.front.storage_of(bucket)
        update = self.front.engine.meta_updater.update
        return versions.info(await update(stored, key, tags=dict(tags), version_id=version_id))


def _erasure_is_a_layer(front: front_mod.ObjectFront) -> ObjectLayer:
    """mypy checks here that ErasureLayer is an ObjectLayer."""
    return ErasureLayer(front)
