"""A KV bucket's PUT read straight into the node's arena (`kv_inplace`), against a kvcache node
in this process over shm and the S3 front's real `body.Payload`: a body that checks out is
stored whole, its block committed from the extent it was read into; a bad digest, a body cut
short and a lost If-None-Match claim store nothing and give the node its room back; a body
that stalls falls back to a blob with every byte."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from aiohttp import streams

from kvtier import checksums, errors, etcdserver, kv, membership
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway.s3 import body, kv_inplace, kv_layout, kv_multipart, s3errors
from tests.component import test_kvcache as kv_tests

MIB = 1024 * 1024


class _Connection:
    """The connection side of an aiohttp StreamReader (bytes are fed by the test)."""

    connected = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def _payload(raw: bytes, size: int, *, end: bool = True) -> tuple[body.Payload, Any]:
    stream = streams.StreamReader(cast(Any, _Connection()), 1 << 16)
    for at in range(0, len(raw), 300_007):  # pieces that never line up with anything
        stream.feed_data(raw[at : at + 300_007])
    if end:
        stream.feed_eof()
    return body.Payload(stream, size=size), stream


def _crc32c(data: bytes) -> str:
    hasher = checksums.new("CRC32C")
    hasher.update(data)
    return checksums.b64(hasher.digest())


async def _put(
    client: kv.AsyncKVClient,
    key: str,
    payload: body.Payload,
    crc32c: str,
    *,
    if_none_match: bool = False,
) -> dict[str, str] | kv_layout.Blob | None:
    return await kv_inplace.put_in_place(
        client, key, payload, pb.ObjectInfo(key=key), algorithms=(),
        expected={"CRC32C": crc32c}, expected_md5="", md5=False,
        if_none_match=if_none_match, ttl_s=None,
    )  # fmt: skip


async def _room_back(client: kv.AsyncKVClient, before: tuple[int, int, int]) -> None:
    """Wait (the abort reaches the node with the call's release) until blocks, pending puts
    and used bytes are as before."""
    async with asyncio.timeout(5):
        while True:
            (stats,) = (await client.stats()).values()
            if (stats.blocks, stats.pending_puts, stats.used_bytes) == before:
                return
            await asyncio.sleep(0.01)


async def test_bodies_land_in_the_arena_and_failures_store_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = np.random.default_rng(5).integers(0, 256, 2 * MIB + 3, dtype=np.uint8).tobytes()
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=["shm"], namespace="s3:inplace")
        async with client:
            (empty,) = (await client.stats()).values()
            start = (empty.blocks, empty.pending_puts, empty.used_bytes)
            sums = await _put(client, "k", _payload(data, len(data))[0], _crc32c(data))
            assert sums == {"CRC32C": _crc32c(data)}  # in place (None: it fell back)
            info, blob = await kv_layout.fetch_object(client, "k")
            assert b"".join(blob.pieces()) == data
            assert info.size == len(data)
            assert info.etag == kv_layout.version_etag(blob.version)
            (stats,) = (await client.stats()).values()
            stored = (stats.blocks, stats.pending_puts, stats.used_bytes)
            assert stored[0] == start[0] + 2  # data and metadata blocks

            other = data[::-1]
            with pytest.raises(errors.DigestMismatch):  # a wrong checksum
                await _put(client, "k", _payload(other, len(other))[0], _crc32c(data))
            await _room_back(client, stored)
            with pytest.raises(s3errors.S3Error) as short:  # a body cut short
                await _put(client, "k", _payload(other[:MIB], len(other))[0], _crc32c(other))
            assert short.value.code == "IncompleteBody"
            await _room_back(client, stored)
            payload = _payload(other, len(other))[0]
            with pytest.raises(s3errors.S3Error) as taken:  # If-None-Match on a present key
                await _put(client, "k", payload, _crc32c(other), if_none_match=True)
            assert taken.value.code == "PreconditionFailed"
            await _room_back(client, stored)
            _, blob = await kv_layout.fetch_object(client, "k")
            assert b"".join(blob.pieces()) == data  # untouched

            # A body that pauses in the middle: the put is aborted, its bytes so far kept in
            # the body, and the rest read into a blob as before.
            monkeypatch.setattr(body, "SLOT_IDLE_S", 0.02)
            payload, stream = _payload(other[:MIB], len(other), end=False)
            assert await _put(client, "s", payload, _crc32c(other)) is None
            await _room_back(client, stored)
            stream.feed_data(other[MIB:])
            stream.feed_eof()
            blob, _, got = await kv_layout.receive(
                payload, most=kv_layout.MAX_KV_OBJECT_BYTES, expected={"CRC32C": _crc32c(other)},
                md5=False,
            )  # fmt: skip
            assert b"".join(blob.pieces()) == other
            assert got == {"CRC32C": _crc32c(other)}

            # Every byte in place but the end of the body late: the bytes move into a blob.
            monkeypatch.setattr(kv_inplace, "IN_PLACE_MAX_S", 0.05)
            payload, stream = _payload(other, len(other), end=False)
            late = await _put(client, "s", payload, _crc32c(other))
            assert isinstance(late, kv_layout.Blob)
            await _room_back(client, stored)
            stream.feed_eof()
            blob, _, got = await kv_layout.receive(
                payload, most=kv_layout.MAX_KV_OBJECT_BYTES, expected={"CRC32C": _crc32c(other)},
                md5=False, read=late,
            )  # fmt: skip
            assert b"".join(blob.pieces()) == other
            assert got == {"CRC32C": _crc32c(other)}

        # Over tcp nothing can be written in place: the caller is told before any byte.
        tcp = await kv_tests._client(nodes, transports=["tcp"], namespace="s3:inplace")
        async with tcp:

            async def never(views: Sequence[memoryview | None]) -> None:
                raise AssertionError("filled over tcp")

            assert await tcp.put_filled(b"t", 10, never, overwrite=True) is None


async def test_an_upload_in_progress_survives_capacity_eviction(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """A KV bucket's multipart upload pins its record while in progress
    (`kv_multipart._pin_record`), and its parts count a second access when written: a flood of
    other blocks past the arena's size evicts those, not the record (without the pin:
    NoSuchUpload) nor a part written before the flood (without the touch: InvalidPart)."""
    part = np.random.default_rng(7).integers(0, 256, MIB + 5, dtype=np.uint8).tobytes()
    arena = {"arena_bytes": 16 * MIB, "page_bytes": 4 * MIB}
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path, **arena) as nodes:
        client = await kv_tests._client(nodes, transports=["shm"], namespace="s3:uploads")
        async with client:
            record = pb.CreateMultipartUploadRequest(bucket="b", key="obj")
            upload_id = await kv_multipart.create_upload(client, record)
            filler = bytes(MIB)
            for i in range(48):  # three arenas' worth of other blocks
                await client.put_batch([b"flood-%d" % i], [filler], overwrite=True)
            begun = pb.BeginUploadPartRequest(
                bucket="b", key="obj", upload_id=upload_id, part_number=1
            )
            info = await kv_multipart.upload_part(client, begun, _payload(part, len(part))[0])
            for i in range(48, 60):  # more pressure once the part is in
                await client.put_batch([b"flood-%d" % i], [filler], overwrite=True)
            (stats,) = (await client.stats()).values()
            assert sum(stats.evictions.values()) > 0  # the arena did evict
            done = pb.CompleteMultipartUploadRequest(bucket="b", key="obj", upload_id=upload_id)
            done.parts.add(part_number=1, etag=info.etag)
            made = await kv_multipart.complete(client, done, lambda size, tags: None)
            assert made.size == len(part)
            _, blob = await kv_layout.fetch_object(client, "obj")
            assert b"".join(blob.pieces()) == part
