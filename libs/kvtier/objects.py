"""The object SDK: `kvtier.ObjectClient` (sync) and `AsyncObjectClient`, over one gateway.

Control over gRPC (`kvtier.gateway.v1.ObjectService`), bytes over the data plane: a PUT sends
the object in calls of whole stripes straight from the caller's buffer (or from a file, through
one reusable buffer), a GET receives ranges straight into the caller's buffer (or a file). Memory
stays bounded by one call's bytes whatever the object's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvtier import errors
from kvtier import security as security_mod
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import gateway as gateway_client
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base, registry

T = TypeVar("T")

#: Largest range asked for in one READ_RANGE call.
READ_CALL_BYTES = 32 * 1024 * 1024

ObjectInfo = pb.ObjectInfo


class AsyncObjectClient:
    """Buckets and objects through one gateway (asyncio). Build with `await connect(...)`."""

    def __init__(
        self,
        gateway: str,
        *,
        transports: Sequence[str] = (),
        timeout_s: float = 60.0,
        client_id: str = "",
        security: security_mod.ClientSecurity | None = None,
        tokens: security_mod.TokenSource | None = None,
    ) -> None:
        self.gateway = gateway
        self._allowed = list(transports)
        self._timeout_s = timeout_s
        self._client_id = client_id or f"{socket.gethostname()}:{os.getpid()}"
        sec = security or security_mod.default()
        # Users get session tokens from the gateway itself (it issues them), unless the
        # caller brings its own (the console: a login's token).
        if tokens is None and sec.has_user:
            tokens = security_mod.token_source(sec, gateway)
        self._rpc = gateway_client.ObjectServiceClient(
            gateway, timeout_s=timeout_s, security=sec, tokens=tokens
        )
        self._negotiator = dataplane_client.DataPlaneClient(
            gateway, timeout_s=timeout_s, security=sec, tokens=tokens
        )
        self._session: dataplane_client.DataPlaneSession | None = None

    @classmethod
    async def connect(cls, gateway: str, **kwargs: Any) -> AsyncObjectClient:
        """A client with its data-plane session to the gateway open."""
        client = cls(gateway, **kwargs)
        try:
            await client._open()
        except BaseException:
            await client.close()
            raise
        return client

    async def _open(self) -> dataplane_client.DataPlaneSession:
        if self._session is None:
            settings = registry.ClientSettings(timeout_s=self._timeout_s)
            self._session = await self._negotiator.open(self._client_id, self._allowed, settings)
        return self._session

    async def close(self) -> None:
        """Close the connections; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        await self._rpc.close()
        await self._negotiator.close()

    async def __aenter__(self) -> AsyncObjectClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, method: int, request: Any, segments: Sequence[Any] = (), intos: Sequence[Any] = ()
    ) -> base.CallResult:
        session = await self._open()
        try:
            return await session.transport.call(
                method, request.SerializeToString(), segments, intos
            )
        except base.PeerLost:
            self._session = None
            await session.close()
            raise

    # Buckets.

    async def create_bucket(self, bucket: str) -> pb.BucketInfo:
        """Create a bucket (AlreadyExists, InvalidArgument)."""
        return await self._rpc.create_bucket(bucket)

    async def delete_bucket(self, bucket: str) -> None:
        """Delete an empty bucket (PreconditionFailed when it holds objects, NotFound)."""
        await self._rpc.delete_bucket(bucket)

    async def head_bucket(self, bucket: str) -> pb.BucketInfo:
        """The bucket (NotFound)."""
        return await self._rpc.head_bucket(bucket)

    async def list_buckets(self) -> list[pb.BucketInfo]:
        """Every bucket, sorted by name."""
        return await self._rpc.list_buckets()

    # PUT.

    async def put_object(
        self,
        bucket: str,
        key: str,
        data: Any,
        *,
        content_type: str = "",
        metadata: Mapping[str, str] | None = None,
        checksums: Sequence[str] = (),
        if_none_match: bool = False,
        if_match: str = "",
        headers: pb.ObjectHeaders | None = None,
    ) -> pb.ObjectInfo:
        """Store data (a buffer, a file path or a binary file object) as bucket/key.

        `checksums`: algorithms (CRC32, SHA1, SHA256) the gateway computes and stores;
        `if_none_match`: only if absent (PreconditionFailed otherwise); `if_match`: only if the
        current version's ETag is this one (NotFound without one, PreconditionFailed when it
        differs). On erasure-coded buckets both hold against concurrent writers: of racing
        conditional writers at most one succeeds (PreconditionFailed with reason
        ConditionalRequestConflict when none did: try again). The object is visible once the
        write quorum of drives has committed it.
        """
        when = (if_none_match, if_match)
        h = pb.ObjectHeaders()
        if headers is not None:
            h.CopyFrom(headers)
        if content_type:
            h.content_type = content_type
        h.user_metadata.update(metadata or {})
        if isinstance(data, (str, Path)):
            handle = await asyncio.to_thread(open, data, "rb")
            try:
                return await self._put_file(bucket, key, handle, h, checksums, when)
            finally:
                await asyncio.to_thread(handle.close)
        if hasattr(data, "readinto"):
            return await self._put_file(bucket, key, data, h, checksums, when)
        view = base.as_buffer(data, writable=False)
        begun = await self._begin(bucket, key, view.nbytes, h, checksums, when)
        reply = await self._send(begun, view.nbytes, lambda at, n: view[at : at + n])
        return reply.object

    async def _begin(
        self,
        bucket: str,
        key: str,
        size: int,
        headers: pb.ObjectHeaders,
        checksums: Sequence[str],
        when: tuple[bool, str],
    ) -> pb.BeginPutResponse:
        request = pb.BeginPutRequest(
            bucket=bucket, key=key, size=size, headers=headers,
            checksum_algorithms=list(checksums), if_none_match=when[0], if_match=when[1],
        )  # fmt: skip
        return await self._rpc.begin_put(request)

    async def _send(
        self, begun: pb.BeginPutResponse, size: int, chunk: Any
    ) -> pb.CommitPutResponse:
        try:
            at = 0
            while at < size:
                n = min(begun.max_call_bytes, size - at)
                piece = await chunk(at, n) if asyncio.iscoroutinefunction(chunk) else chunk(at, n)
                request = pb.WriteStripesRequest(upload_id=begun.upload_id, offset=at)
                await self._call(pb.OBJECT_CALL_METHOD_WRITE_STRIPES, request, segments=[piece])
                at += n
            return await self._rpc.commit_write(begun.upload_id)
        except BaseException:
            with contextlib.suppress(errors.KVTierError):  # else the gateway's sweep drops it
                await self._rpc.abort_put(begun.upload_id)
            raise

    async def _put_file(
        self,
        bucket: str,
        key: str,
        handle: io.BufferedIOBase,
        headers: pb.ObjectHeaders,
        checksums: Sequence[str],
        when: tuple[bool, str],
    ) -> pb.ObjectInfo:
        size = os.fstat(handle.fileno()).st_size - handle.tell()
        begun = await self._begin(bucket, key, size, headers, checksums, when)
        buffer = memoryview(bytearray(min(begun.max_call_bytes, max(size, 1))))

        async def chunk(at: int, n: int) -> memoryview:
            got = await asyncio.to_thread(handle.readinto, buffer[:n])
            if got != n:
                raise errors.InvalidArgument(f"the file shrank while being read ({at + got})")
            return buffer[:n]

        return (await self._send(begun, size, chunk)).object

    # GET.

    async def head_object(self, bucket: str, key: str) -> pb.ObjectInfo:
        """The object's info (NotFound)."""
        return await self._rpc.head_object(bucket, key)

    async def get_object_into(
        self, bucket: str, key: str, into: Any, *, offset: int = 0, if_match: str = ""
    ) -> pb.ObjectInfo:
        """Read bytes [offset, offset + len(into)) (cut at the object's end) into `into`;
        returns the object's info with `size`. Raises NotFound, PreconditionFailed (if_match),
        InvalidArgument (offset past the end)."""
        view = base.as_buffer(into, writable=True)
        got = 0
        info = pb.ObjectInfo()
        while True:
            room = view[got : got + READ_CALL_BYTES]
            request = pb.ReadRangeRequest(
                bucket=bucket, key=key, offset=offset + got, length=room.nbytes, if_match=if_match
            )
            result = await self._call(pb.OBJECT_CALL_METHOD_READ_RANGE, request, intos=[room])
            reply = pb.ReadRangeResponse.FromString(result.reply)
            info = reply.object
            if_match = if_match or info.etag  # later calls must see the same version
            got += reply.length
            if reply.length == 0 or got == view.nbytes or offset + got >= info.size:
                return info

    async def get_object(
        self, bucket: str, key: str, *, offset: int = 0, length: int | None = None
    ) -> bytes:
        """The object's bytes (or a range of them, cut at the object's end)."""
        if length is None:
            length = (await self.head_object(bucket, key)).size - offset
        buffer = bytearray(max(length, 0))
        if not length:
            return b""
        info = await self.get_object_into(bucket, key, buffer, offset=offset)
        return bytes(buffer[: max(0, min(length, info.size - offset))])

    async def download(self, bucket: str, key: str, path: str | Path) -> pb.ObjectInfo:
        """Write the object to a file, one call's bytes at a time."""
        buffer = memoryview(bytearray(READ_CALL_BYTES))
        offset, etag = 0, ""
        handle = await asyncio.to_thread(open, path, "wb")
        with contextlib.closing(handle):
            while True:
                info = await self.get_object_into(bucket, key, buffer, offset=offset, if_match=etag)
                etag = info.etag
                n = min(READ_CALL_BYTES, info.size - offset)
                await asyncio.to_thread(handle.write, buffer[:n])
                offset += n
                if offset >= info.size:
                    return info

    # The rest.

    async def delete_object(self, bucket: str, key: str) -> None:
        """Delete an object (an absent one is not an error)."""
        await self._rpc.delete_object(bucket, key)

    async def copy_object(
        self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str
    ) -> pb.ObjectInfo:
        """Server-side copy (headers and metadata kept)."""
        request = pb.CopyObjectRequest(
            src_bucket=src_bucket, src_key=src_key, dst_bucket=dst_bucket, dst_key=dst_key
        )
        return await self._rpc.copy_object(request)

    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        start_after: str = "",
        continuation_token: str = "",
        max_keys: int = 1000,
    ) -> pb.ListObjectsResponse:
        """One page of a bucket's objects (S3 ListObjectsV2 semantics)."""
        request = pb.ListObjectsRequest(
            bucket=bucket, prefix=prefix, delimiter=delimiter, start_after=start_after,
            continuation_token=continuation_token, max_keys=max_keys,
        )  # fmt: skip
        return await self._rpc.list_objects(request)

    async def iter_objects(
        self, bucket: str, *, prefix: str = "", delimiter: str = ""
    ) -> AsyncIterator[pb.ObjectInfo | str]:
        """Every object (and common prefix, as a str) of a bucket, page after page."""
        token = ""
        while True:
            page = await self.list_objects(
                bucket, prefix=prefix, delimiter=delimiter, continuation_token=token
            )
            for item in page.objects:
                yield item
            for common in page.common_prefixes:
                yield common
            if not page.is_truncated:
                return
            token = page.next_continuation_token

    # Multipart uploads.

    async def create_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        content_type: str = "",
        metadata: Mapping[str, str] | None = None,
        checksum_algorithm: str = "",
        headers: pb.ObjectHeaders | None = None,
    ) -> str:
        """Start a multipart upload; its id. `checksum_algorithm`: each part's checksum is
        kept, and the object gets the checksum of the part checksums ("-N")."""
        h = pb.ObjectHeaders()
        if headers is not None:
            h.CopyFrom(headers)
        if content_type:
            h.content_type = content_type
        h.user_metadata.update(metadata or {})
        request = pb.CreateMultipartUploadRequest(
            bucket=bucket, key=key, headers=h, checksum_algorithm=checksum_algorithm
        )
        return await self._rpc.create_multipart_upload(request)

    async def upload_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        data: Any,
        *,
        content_md5: str = "",
    ) -> pb.PartInfo:
        """Upload (or replace) part `part_number` (1-10000) from a buffer; its info (ETag)."""
        view = base.as_buffer(data, writable=False)
        request = pb.BeginUploadPartRequest(
            bucket=bucket, key=key, upload_id=upload_id, part_number=part_number,
            size=view.nbytes, expected_md5=content_md5,
        )  # fmt: skip
        planned = await self._rpc.begin_upload_part(request)
        begun = pb.BeginPutResponse(
            upload_id=planned.write_id,
            stripe_bytes=planned.stripe_bytes,
            max_call_bytes=planned.max_call_bytes,
        )
        reply = await self._send(begun, view.nbytes, lambda at, n: view[at : at + n])
        return reply.part

    async def upload_part_copy(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        src_bucket: str,
        src_key: str,
        *,
        byte_range: tuple[int, int] | None = None,
    ) -> pb.PartInfo:
        """A part made of the source object, or of its bytes [first, last] (inclusive)."""
        request = pb.UploadPartCopyRequest(
            bucket=bucket, key=key, upload_id=upload_id, part_number=part_number,
            src_bucket=src_bucket, src_key=src_key,
        )  # fmt: skip
        if byte_range is not None:
            request.has_range = True
            request.range_start, request.range_end = byte_range
        return (await self._rpc.upload_part_copy(request)).part

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: Sequence[pb.PartInfo | tuple[int, str]],
        *,
        if_none_match: bool = False,
        if_match: str = "",
    ) -> pb.ObjectInfo:
        """Make the parts (infos from upload_part, or (number, etag)) the object (if_none_match,
        if_match: as put_object's)."""
        request = pb.CompleteMultipartUploadRequest(
            bucket=bucket, key=key, upload_id=upload_id, if_none_match=if_none_match,
            if_match=if_match,
        )  # fmt: skip
        for part in parts:
            if isinstance(part, pb.PartInfo):
                request.parts.add(part_number=part.part_number, etag=part.etag)
            else:
                request.parts.add(part_number=part[0], etag=part[1])
        return await self._rpc.complete_multipart_upload(request)

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Drop an upload and its parts (NotFound: no such upload)."""
        await self._rpc.abort_multipart_upload(bucket, key, upload_id)

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[pb.PartInfo]:
        """Every part uploaded so far, by number."""
        parts: list[pb.PartInfo] = []
        marker = 0
        while True:
            page = await self._rpc.list_parts(
                pb.ListPartsRequest(
                    bucket=bucket, key=key, upload_id=upload_id, part_number_marker=marker
                )
            )
            parts.extend(page.parts)
            if not page.is_truncated:
                return parts
            marker = page.next_part_number_marker

    async def list_multipart_uploads(
        self, bucket: str, *, prefix: str = ""
    ) -> list[pb.MultipartUploadInfo]:
        """Every upload in progress in a bucket, by key then initiation."""
        uploads: list[pb.MultipartUploadInfo] = []
        request = pb.ListMultipartUploadsRequest(bucket=bucket, prefix=prefix)
        while True:
            page = await self._rpc.list_multipart_uploads(request)
            uploads.extend(page.uploads)
            if not page.is_truncated:
                return uploads
            request.key_marker = page.next_key_marker
            request.upload_id_marker = page.next_upload_id_marker


class ObjectClient:
    """The synchronous object SDK (the same operations; a private event loop per client)."""

    def __init__(self, inner: AsyncObjectClient, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, gateway: str, **kwargs: Any) -> ObjectClient:
        """Connect (see `AsyncObjectClient`)."""
        loop = asyncio.new_event_loop()
        try:
            inner = loop.run_until_complete(AsyncObjectClient.connect(gateway, **kwargs))
        except BaseException:
            loop.close()
            raise
        return cls(inner, loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop.is_closed():
                coro.close()
                raise errors.Unavailable("the object client is closed")
            return self._loop.run_until_complete(coro)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)

        def run(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))

        run.__doc__ = method.__doc__
        return run

    def list_all(self, bucket: str, *, prefix: str = "", delimiter: str = "") -> list[Any]:
        """Every object (and common prefix) of a bucket."""

        async def collect() -> list[Any]:
            return [
                i
                async for i in self._inner.iter_objects(bucket, prefix=prefix, delimiter=delimiter)
            ]

        return self._run(collect())

    def close(self) -> None:
        """Close the connections and the loop; idempotent."""
        with self._lock:
            if self._loop.is_closed():
                return
            self._loop.run_until_complete(self._inner.close())
            self._loop.close()

    def __enter__(self) -> ObjectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
