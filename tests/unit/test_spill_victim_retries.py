"""A write-back victim's upload is retried past `retries` while a gateway is known: its bytes in
the spill buffer are the acknowledged block's only copy (services/kvcache/spillqueue.py). Found
by the fault suite: a kvcache node partitioned from the gateway for 60 s gave up 110 such
uploads, and the blocks were lost (tests/fault/test_partitions.py)."""

from __future__ import annotations

import asyncio

from kvtier import errors
from services.kvcache import spillqueue

PAGE = 64 << 10


class DownObjects:
    """A durable tier that refuses the first `down_for` calls as a gateway out of reach does."""

    def __init__(self, down_for: int, *, in_map: bool = True) -> None:
        self.down_for = down_for
        self.in_map = in_map
        self.calls = 0
        self.data: dict[str, bytes] = {}

    def available(self) -> bool:
        return self.in_map

    async def put(
        self, key: str, data: memoryview, expires_unix_ms: int, checksum: int | None
    ) -> None:
        self.calls += 1
        if self.calls <= self.down_for:
            raise errors.Unavailable("failed to connect to all addresses")
        self.data[key] = bytes(data)

    async def head(self, key: str) -> spillqueue.ObjectMeta | None:
        raise NotImplementedError

    async def get_into(self, key: str, into: memoryview, etag: str) -> None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def close(self) -> None:
        pass


async def _spill(objects: DownObjects, cause: spillqueue.Cause) -> spillqueue.SpillQueue:
    """One 4 KiB upload of `cause` through a queue of 1 retry; returns once it is settled."""
    queue = spillqueue.SpillQueue(
        objects, buffer_bytes=PAGE, page_bytes=PAGE, concurrency=1, retries=1, timeout_s=1.0
    )
    room = queue.reserve(4096)
    assert room is not None
    queue.view(room)[:] = b"v" * 4096
    queue.enqueue(spillqueue.Op("t/ns/key", "t", cause, room))
    async with asyncio.timeout(30):
        await queue.drained(work=True)
    return queue


async def test_a_victim_upload_outlasts_its_retries_while_a_gateway_is_known() -> None:
    objects = DownObjects(down_for=4)  # 2 tries allowed: twice as many refused
    queue = await _spill(objects, spillqueue.Cause.CAPACITY)
    assert objects.data == {"t/ns/key": b"v" * 4096}
    assert queue.failures["t"] == 0
    assert queue.queue_bytes == 0


async def test_without_a_gateway_and_for_write_through_it_is_given_up() -> None:
    gone = DownObjects(down_for=6, in_map=False)  # durable namespaces work as `none`
    queue = await _spill(gone, spillqueue.Cause.CAPACITY)
    assert (gone.data, queue.failures["t"], gone.calls) == ({}, 1, 2)
    waited = DownObjects(down_for=6)  # a write-through upload: its put is refused instead
    queue = await _spill(waited, spillqueue.Cause.WRITE_THROUGH)
    assert (waited.data, queue.failures["t"], waited.calls) == ({}, 1, 2)
