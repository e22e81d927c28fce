"""A KV bucket's PUT body read into its blocks (`kv_layout.read_body` / `receive`) through the
S3 front's real `body.Payload`: a plain HTTP chunked body (no length known) grows the blocks as
it comes, exact across the data and tail blocks up to the 64 MiB maximum, and one byte more is
EntityTooLarge; a body of known length is read exactly; digests are checked."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, cast

import numpy as np
import pytest
from aiohttp import streams

from kvtier import checksums, errors
from services.gateway.s3 import body, kv_layout

MAX = kv_layout.MAX_KV_OBJECT_BYTES
HEAD = kv_layout.HEAD_BYTES
MIB = 1 << 20


class _Connection:
    """The connection side of an aiohttp StreamReader (bytes are fed by the test)."""

    connected = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


@pytest.fixture(scope="module")
def data() -> bytes:
    return np.random.default_rng(7).integers(0, 256, MAX + 1, dtype=np.uint8).tobytes()


def _payload(raw: bytes, size: int) -> body.Payload:
    stream = streams.StreamReader(cast(Any, _Connection()), 1 << 16)
    view = memoryview(raw)
    for at in range(0, len(raw), 3 * MIB + 7):  # pieces that never line up with the blocks
        stream.feed_data(bytes(view[at : at + 3 * MIB + 7]))
    stream.feed_eof()
    return body.Payload(stream, size=size)


def _bytes(blob: kv_layout.Blob) -> bytes:
    return b"".join(bytes(piece) for piece in blob.pieces())


@pytest.mark.parametrize("size", [0, 1, MIB, MIB + 1, 3 * MIB + 5, HEAD, HEAD + 1, MAX])
async def test_a_chunked_body_fills_exactly_the_blocks_it_needs(data: bytes, size: int) -> None:
    blob = await kv_layout.read_body(_payload(data[:size], -1), MAX)
    assert blob.size == size
    assert [len(b) for b in blob.blocks] == [len(b) for b in kv_layout.Blob(size).blocks]
    assert all(b[: kv_layout.VERSION_BYTES] == blob.version for b in blob.blocks)
    assert hashlib.sha256(_bytes(blob)).digest() == hashlib.sha256(data[:size]).digest()


async def test_a_chunked_body_over_the_maximum_is_entity_too_large(data: bytes) -> None:
    with pytest.raises(errors.InvalidArgument) as too_large:
        await kv_layout.read_body(_payload(data, -1), MAX)
    assert too_large.value.reason == "EntityTooLarge"


async def test_a_known_length_over_the_maximum_is_refused_before_any_byte(data: bytes) -> None:
    payload = _payload(data, MAX + 1)
    with pytest.raises(errors.InvalidArgument) as too_large:
        await kv_layout.read_body(payload, MAX)
    assert too_large.value.reason == "EntityTooLarge"
    assert payload.read == 0


async def test_receive_checks_the_digests_of_a_chunked_body(data: bytes) -> None:
    raw = data[: 2 * MIB + 3]
    md5 = hashlib.md5(raw).hexdigest()
    blob, etag, sums = await kv_layout.receive(
        _payload(raw, -1), most=MAX, algorithms=["sha256"], expected_md5=md5
    )
    assert (etag, _bytes(blob)) == (md5, raw)
    sha = sums["SHA256"]
    with pytest.raises(errors.DigestMismatch) as wrong:
        await kv_layout.receive(
            _payload(raw[:-1] + b"?", -1), most=MAX, expected={"SHA256": sha}, md5=False
        )
    assert wrong.value.algorithm == "SHA256"


async def test_receive_hashes_hardware_crcs_on_the_loop_and_md5_in_a_thread(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = data[: 2 * MIB]
    hops: list[object] = []
    to_thread = asyncio.to_thread

    async def counted(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    crc = checksums.new("CRC64NVME")
    crc.update(raw)
    _, etag, sums = await kv_layout.receive(
        _payload(raw, -1), most=MAX, algorithms=["crc64nvme"], md5=False
    )
    assert (etag, sums, hops) == ("", {"CRC64NVME": checksums.b64(crc.digest())}, [])
    for algorithms, md5 in ((["crc64nvme"], True), (["crc32"], False), (["sha256"], False)):
        await kv_layout.receive(_payload(raw, -1), most=MAX, algorithms=algorithms, md5=md5)
        assert hops == [kv_layout.digests], (algorithms, md5)
        hops.clear()
