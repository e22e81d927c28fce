"""The durable tier of a kvcache node (services/kvcache/durable.py, spillqueue.py) over a fake
object store: spill copies, backpressure, op order, retries, read-through, probes, drain."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from kvtier import config, errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks, durable, spillqueue
from services.kvcache import config as kvcache_config
from services.kvcache import store as block_store

KIB = 1024
PAGE = 64 * KIB
ARENA = 1024 * KIB
T, NS = "tenant-a", "ns"
PRINCIPAL = "default/engine-1/abcd"


class FakeObjects:
    """An in-memory durable tier; `gate` holds puts back, `fail` fails the next n calls."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.checksums: dict[str, int] = {}  # the checksum metadata of each key that has one
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = 0
        self.error: errors.KVTierError = errors.Unavailable("fake gateway down")
        self.puts = 0
        self.heads = 0
        self.gets = 0
        self.up = True

    def available(self) -> bool:
        return self.up

    def _maybe_fail(self) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error

    async def put(
        self, key: str, data: memoryview, expires_unix_ms: int, checksum: int | None
    ) -> None:
        await self.gate.wait()
        self._maybe_fail()
        self.puts += 1
        self.data[key] = (bytes(data), expires_unix_ms)
        self.checksums.pop(key, None)
        if checksum is not None:
            self.checksums[key] = checksum

    async def head(self, key: str) -> spillqueue.ObjectMeta | None:
        self.heads += 1
        self._maybe_fail()
        if key not in self.data:
            return None
        body, expires = self.data[key]
        md5 = hashlib.md5(body).hexdigest()
        return spillqueue.ObjectMeta(len(body), md5, expires, self.checksums.get(key))

    async def get_into(self, key: str, into: memoryview, etag: str) -> None:
        self.gets += 1
        await asyncio.sleep(0)
        body, _ = self.data[key]
        if hashlib.md5(body).hexdigest() != etag:
            raise errors.PreconditionFailed("changed")
        into[:] = body

    async def delete(self, key: str) -> None:
        await self.gate.wait()
        self._maybe_fail()
        self.data.pop(key, None)
        self.checksums.pop(key, None)

    async def close(self) -> None:
        pass


class Node:
    """A store, its arena bytes and a tier, wired as the node wires them."""

    def __init__(
        self, *, buffer_bytes: int = 4 * PAGE, wall: float = 1_000_000.0, through_s: float = 3.0
    ) -> None:
        self.objects = FakeObjects()
        self.queue = spillqueue.SpillQueue(
            self.objects, buffer_bytes=buffer_bytes, page_bytes=PAGE, concurrency=2,
            retries=2, timeout_s=5.0, drain_s=5.0,
        )  # fmt: skip
        self.wall = wall
        self.tier = durable.DurableTier(
            self.queue, read_timeout_s=5.0, write_through_timeout_s=through_s,
            wall_clock=lambda: self.wall,
        )  # fmt: skip
        self.store = block_store.BlockStore(
            ARENA, page_bytes=PAGE, spill_sink=self.tier.spill, spill_admit=self.tier.admit
        )
        self.arena = memoryview(bytearray(ARENA))
        self.tier.bind(self.store, self.arena)
        self.tier.set_policy(T, NS, durable.Durability.WRITE_BACK)

    def put(self, key: bytes, data: bytes, ns: str = NS, **kwargs: object) -> None:
        ticket = self.store.begin_put(T, ns, key, len(data), **kwargs)  # type: ignore[arg-type]
        assert ticket is not None
        self.arena[ticket.extent.offset : ticket.extent.offset + len(data)] = data
        self.store.commit(ticket)
        self.tier.committed(ticket)

    async def put_through(self, key: bytes, data: bytes) -> str:
        """A write-through put as the block API makes it: "" once committed (its durable copy
        first), else why not (then nothing is in DRAM)."""
        ticket = self.store.begin_put(T, NS, key, len(data))
        assert ticket is not None
        self.arena[ticket.extent.offset : ticket.extent.offset + len(data)] = data
        (outcome,) = await self.tier.write_through([(ticket, None)])
        if outcome:
            self.store.abort(ticket)
        else:
            self.store.commit(ticket, durable=True)
        return outcome

    def upload(self, key: bytes, data: bytes) -> None:
        """Queue an upload of data as key's durable copy, as a spill does."""
        room = self.queue.reserve(len(data))
        assert room is not None
        self.queue.view(room)[:] = data
        key_name = durable.object_key(T, NS, key)
        self.queue.enqueue(spillqueue.Op(key_name, T, spillqueue.Cause.CAPACITY, room))

    async def put_backing_off(self, key: bytes, data: bytes) -> int:
        """put, waiting for the spill buffer to drain while the store is Overloaded; returns
        how many times it had to wait."""
        for waits in range(100):
            try:
                self.put(key, data)
            except errors.Overloaded:
                await self.queue.drained()
            else:
                return waits
        raise AssertionError("the spill buffer never drained")

    def dram(self, key: bytes, ns: str = NS) -> bytes | None:
        lease = self.store.begin_get(T, ns, key, count=False)
        if lease is None:
            return None
        try:
            return bytes(
                self.arena[lease.extent.offset : lease.extent.offset + lease.extent.requested]
            )
        finally:
            self.store.end_get(lease)

    async def read(self, key: bytes, ns: str = NS) -> bytes | None:
        """DRAM, else read-through."""
        found = self.dram(key, ns)
        if found is not None:
            return found
        (lease,) = await self.tier.read_through(T, ns, [key], 5.0)
        if lease is None:
            return None
        self.store.end_get(lease)
        return self.dram(key, ns)

    def stored(self, key: bytes, ns: str = NS) -> bytes | None:
        found = self.objects.data.get(durable.object_key(T, ns, key))
        return found[0] if found else None


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def _data(tag: int, size: int = 32 * KIB) -> bytes:
    seed = hashlib.sha256(b"%d" % tag).digest()
    return (seed * (size // 32 + 1))[:size]


def test_object_keys_are_hex_tenant_prefixed_and_bounded() -> None:
    assert durable.object_key("t", "ns", b"\x00/..") == "t/6e73/002f2e2e"
    assert durable.object_key("t", "", b"k") == "t/-/6b"
    long_key = durable.object_key("t" * 64, "n" * 1024, b"k" * 1024)
    assert len(long_key.encode()) <= 1024
    assert long_key.split("/")[1].startswith("h")
    assert durable.object_key("a", "n", b"k") != durable.object_key("b", "n", b"k")
    assert durable.parse_durability("Write_Back") is durable.Durability.WRITE_BACK
    with pytest.raises(ValueError, match="durability"):
        durable.parse_durability("sometimes")


async def test_write_back_spills_victims_byte_exact_and_reads_them_through() -> None:
    node = Node(buffer_bytes=4 * PAGE)
    datas = {b"k%d" % i: _data(i) for i in range(3 * ARENA // (32 * KIB))}
    worker = asyncio.create_task(node.queue.run())
    try:
        refused = 0
        for key, data in datas.items():  # the arena is reused: spill must have copied first
            refused += await node.put_backing_off(key, data)
        assert refused > 0
        await node.queue.drained()
        spilled = [k for k in datas if node.dram(k) is None]
        assert len(spilled) > len(datas) // 2
        assert all(node.stored(k) == datas[k] for k in spilled)
        for key in spilled[:8]:
            assert await node.read(key) == datas[key]
        assert node.objects.gets == 8
        # A repopulated block has a current durable copy: evicting it again uploads nothing.
        puts = node.objects.puts
        for i in range(len(datas), len(datas) + 40):
            await node.put_backing_off(b"k%d" % i, _data(i))
        await node.queue.drained()
        assert all(node.stored(k) == datas[k] for k in spilled[:8])
        assert node.objects.puts - puts <= 40
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_a_full_spill_buffer_keeps_durable_victims_and_evicts_others_first() -> None:
    node = Node(buffer_bytes=1 * PAGE)  # two 32 KiB blocks fit
    node.objects.gate.clear()  # the durable tier does not answer: nothing drains
    worker = asyncio.create_task(node.queue.run())
    try:
        durable_keys = [b"d%d" % i for i in range(24)]
        for i, key in enumerate(durable_keys):
            node.put(key, _data(i))
        plain = [b"p%d" % i for i in range(8)]
        for i, key in enumerate(plain):
            node.put(key, _data(100 + i), ns="plain")

        def fill() -> None:
            for i in range(1000):
                node.put(b"more-%d" % i, _data(200 + i))
                durable_keys.append(b"more-%d" % i)

        with pytest.raises(errors.Overloaded):  # no room and nothing evictable
            fill()
        kept = [k for k in durable_keys if node.dram(k) is not None]
        assert len(kept) == len(durable_keys) - 2  # two went to the (stuck) spill buffer
        assert all(node.dram(k, "plain") is None for k in plain)  # evicted, never spilled
        assert node.queue.pending() == 2
        assert node.tier.stats(T)["spill_backpressure"] >= 1
        node.objects.gate.set()  # the tier comes back: the buffer drains, eviction goes on
        await node.queue.drained()
        assert await node.put_backing_off(b"after", _data(999)) <= 2
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_ops_of_one_key_stay_in_order_and_reads_see_the_newest() -> None:
    node = Node()
    node.objects.gate.clear()
    worker = asyncio.create_task(node.queue.run())
    try:
        node.upload(b"k", _data(1))
        await _until(lambda: node.queue.inflight == 1)  # the upload waits at the gate
        node.upload(b"k", _data(2))  # waits behind the first
        node.upload(b"k", _data(3))  # replaces the waiting one
        assert node.queue.pending() == 2
        assert await node.tier.present(T, NS, [b"k"]) == [True]
        node.tier.deleted(T, NS, [b"k"])  # replaces the waiting upload
        assert await node.tier.present(T, NS, [b"k"]) == [False]
        assert await node.read(b"k") is None
        node.objects.gate.set()
        await node.queue.drained()
        assert node.stored(b"k") is None
        assert node.objects.puts == 1
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_reads_before_the_upload_come_from_the_spill_buffer() -> None:
    node = Node(buffer_bytes=16 * PAGE)
    for i in range(40):
        node.put(b"k%d" % i, _data(i))
    spilled = [i for i in range(40) if node.dram(b"k%d" % i) is None]
    assert spilled
    key = b"k%d" % spilled[0]
    assert await node.tier.present(T, NS, [key]) == [True]
    assert await node.read(key) == _data(spilled[0])  # no worker ran: from the buffer
    assert node.objects.heads == 0
    worker = asyncio.create_task(node.queue.run())
    try:
        await node.queue.drained()
        # The queued upload made the repopulated copy durable too.
        assert node.stored(key) == _data(spilled[0])
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_concurrent_reads_of_one_key_fetch_it_once_and_ttl_is_kept() -> None:
    node = Node()
    node.objects.data[durable.object_key(T, NS, b"k")] = (_data(5), 0)
    node.objects.data[durable.object_key(T, NS, b"old")] = (_data(6), int(node.wall * 1000) - 1)
    got = await asyncio.gather(*(node.read(b"k") for _ in range(5)))
    assert got == [_data(5)] * 5
    assert node.objects.gets == 1
    assert await node.read(b"old") is None  # its TTL ended: not brought back
    assert await node.tier.present(T, NS, [b"k", b"old", b"none"]) == [True, False, False]
    assert await node.tier.leading(T, NS, [b"k", b"none", b"k"]) == 1


async def test_write_through_puts_wait_for_their_copy_retried_and_fail_without_one() -> None:
    node = Node(through_s=0.5)
    node.tier.set_policy(T, NS, durable.Durability.WRITE_THROUGH)
    worker = asyncio.create_task(node.queue.run())
    try:
        node.objects.fail = 2  # two transient failures: the third try lands, then the put
        assert await node.put_through(b"a", _data(1)) == ""
        assert node.stored(b"a") == _data(1)  # no drain: committed before the put returned
        assert node.dram(b"a") == _data(1)
        node.objects.fail = 10  # more than the retries: refused, and nothing in DRAM
        reason = await node.put_through(b"b", _data(2))
        assert "did not take the upload" in reason
        assert "fake gateway down" in reason
        assert (node.stored(b"b"), node.dram(b"b")) == (None, None)
        assert node.tier.stats(T)["spill_failures"] == 1
        assert node.queue.queue_bytes == 0
        node.objects.error = errors.InvalidArgument("bad")  # not retryable: one try
        node.objects.fail = 1
        assert "bad" in await node.put_through(b"c", _data(3))
        assert node.tier.stats(None)["spill_failures"] == 2
        node.objects.gate.clear()  # the tier hangs: the put fails at write_through_timeout_s
        assert "within 0.5 s" in await node.put_through(b"d", _data(4))
        assert node.dram(b"d") is None
        # A delete of the key while its upload is on the way: the put is not acknowledged.
        racing = asyncio.create_task(node.put_through(b"e", _data(5)))
        await _until(lambda: node.queue.latest(durable.object_key(T, NS, b"e")) is not None)
        node.tier.deleted(T, NS, [b"e"])
        assert await racing == spillqueue.SUPERSEDED
        node.objects.gate.set()
        await node.queue.drained()
        assert node.stored(b"d") == _data(4)  # it landed late: the caller was told it failed
        assert (node.stored(b"e"), node.dram(b"e")) == (None, None)
        node.objects.up = False  # no gateway in the map: write-through refuses at once
        assert await node.put_through(b"f", _data(6)) == durable.NO_GATEWAY
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_write_through_uploads_of_a_batch_run_together_and_wait_for_buffer_room() -> None:
    node = Node(buffer_bytes=1 * PAGE)  # two 32 KiB blocks fit
    node.tier.set_policy(T, NS, durable.Durability.WRITE_THROUGH)
    node.objects.gate.clear()
    worker = asyncio.create_task(node.queue.run())
    try:
        puts = [asyncio.create_task(node.put_through(b"k%d" % i, _data(i))) for i in range(4)]
        await _until(lambda: node.queue.inflight == 2)  # both in flight, two wait for room
        assert not any(p.done() for p in puts)
        assert all(node.dram(b"k%d" % i) is None for i in range(4))  # not acknowledged yet
        node.objects.gate.set()
        assert await asyncio.gather(*puts) == [""] * 4
        assert all(node.stored(b"k%d" % i) == _data(i) for i in range(4))
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_a_write_through_upload_starts_before_queued_spills() -> None:
    node = Node(buffer_bytes=16 * PAGE)
    node.tier.set_policy(T, NS, durable.Durability.WRITE_THROUGH)
    node.objects.gate.clear()
    worker = asyncio.create_task(node.queue.run())
    try:
        for i in range(5):  # two in flight (concurrency 2), three queued
            node.upload(b"spill-%d" % i, _data(i))
        await _until(lambda: node.queue.inflight == 2)
        put = asyncio.create_task(node.put_through(b"wt", _data(9)))
        await _until(lambda: node.queue.pending() == 6)
        node.objects.gate.set()
        assert await put == ""
        order = list(node.objects.data)
        queued = [order.index(durable.object_key(T, NS, b"spill-%d" % i)) for i in (2, 3, 4)]
        assert order.index(durable.object_key(T, NS, b"wt")) < min(queued)  # it went first
        await node.queue.drained()
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_a_cancelled_queue_drains_before_it_stops() -> None:
    node = Node(buffer_bytes=16 * PAGE)
    node.objects.gate.clear()
    worker = asyncio.create_task(node.queue.run())
    for i in range(6):
        node.upload(b"k%d" % i, _data(i))
    await _until(lambda: node.queue.inflight == 2)
    worker.cancel()  # a clean stop while uploads are held
    await asyncio.sleep(0)
    node.objects.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert all(node.stored(b"k%d" % i) == _data(i) for i in range(6))
    assert node.queue.pending() == 0


async def test_without_a_durable_tier_victims_are_dropped_not_kept() -> None:
    node = Node()
    node.objects.up = False
    for i in range(3 * ARENA // (32 * KIB)):
        node.put(b"k%d" % i, _data(i))  # never Overloaded: nothing waits for room
    assert node.queue.pending() == 0
    assert not node.tier.reads_through(T, NS)


def _service(node: Node) -> blocks.BlockService:
    region = base.Region(1, ARENA)
    node.arena = region.view
    node.tier.bind(node.store, region.view)
    return blocks.BlockService(
        node.store, region, base.Issuer("n1").grant, epoch=lambda: 3, tier=node.tier
    )


def _call_put(svc: blocks.BlockService, keys: list[bytes], datas: list[bytes]) -> None:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name=NS), keys=keys)
    plan = svc.handle_call(
        PRINCIPAL, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(),
        [len(d) for d in datas], [],
    )  # fmt: skip
    assert isinstance(plan, base.CallPlan)
    for sink, data in zip(plan.sinks, datas, strict=True):
        assert sink is not None
        sink.view()[:] = data
    assert plan.on_received is not None
    assert plan.on_done is not None
    assert isinstance(plan.on_received(), bytes)
    plan.on_done(True)


async def _call_get(
    svc: blocks.BlockService, keys: list[bytes], *, awaited: bool
) -> list[bytes | None]:
    request = pb.BatchGetRequest(namespace=pb.Namespace(name=NS), keys=keys)
    plan = svc.handle_call(
        PRINCIPAL, pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), [], [64 * KIB] * len(keys)
    )
    assert isinstance(plan, base.CallPlan) is not awaited  # the sync fast path for hits only
    if not isinstance(plan, base.CallPlan):
        plan = await plan
    reply = pb.BatchGetResponse.FromString(plan.reply)
    out = [
        bytes(src.view()) if item.status == pb.ITEM_STATUS_OK and src is not None else None
        for item, src in zip(reply.items, plan.sources, strict=True)
    ]
    assert plan.on_done is not None
    plan.on_done(True)
    return out


async def _simple(svc: blocks.BlockService, method: int, request: Any, reply_type: Any) -> Any:
    plan = svc.handle_call(PRINCIPAL, method, request.SerializeToString(), [], [])
    if not isinstance(plan, base.CallPlan):
        plan = await plan
    return reply_type.FromString(plan.reply)


async def test_the_block_api_reads_through_and_reports_both_tiers() -> None:
    node = Node(buffer_bytes=16 * PAGE)
    node.tier.set_policy("default", NS, durable.Durability.WRITE_BACK)
    svc = _service(node)
    keys = [b"k%d" % i for i in range(40)]
    for i, key in enumerate(keys):
        _call_put(svc, [key], [_data(i)])
    gone = [k for k in keys if not node.store.exists("default", NS, [k])[0]]
    assert gone
    hit = next(k for k in keys if k not in gone)
    assert await _call_get(svc, [hit], awaited=False) == [_data(keys.index(hit))]
    got = await _call_get(svc, [gone[0], hit, b"absent"], awaited=True)
    assert got == [_data(keys.index(gone[0])), _data(keys.index(hit)), None]
    stats = svc.stats("default")
    assert (stats.hits, stats.durable_hits, stats.misses) == (2, 1, 1)
    assert stats.hit_rate == 0.75
    assert stats.dram_hit_rate == 0.5
    assert stats.spill_queue_bytes > 0

    request = pb.BatchExistsRequest(namespace=pb.Namespace(name=NS), keys=[gone[1], hit, b"no"])
    exists = await _simple(svc, pb.CALL_METHOD_BATCH_EXISTS, request, pb.BatchExistsResponse)
    assert list(exists.present) == [True, True, False]
    assert list(exists.in_dram) == [False, True, False]
    chain = pb.LookupRequest(namespace=pb.Namespace(name=NS), keys=[hit, gone[1], b"no", hit])
    lookup = await _simple(svc, pb.CALL_METHOD_LOOKUP, chain, pb.LookupResponse)
    assert (lookup.count, lookup.dram_count) == (2, 1)

    delete = pb.DeleteRequest(namespace=pb.Namespace(name=NS), keys=[gone[1]])
    await _simple(svc, pb.CALL_METHOD_DELETE, delete, pb.DeleteResponse)
    assert await _call_get(svc, [gone[1]], awaited=True) == [None]

    svc.set_namespace_policy(
        pb.SetNamespacePolicyRequest(namespace=pb.Namespace(name=NS), durability=pb.DURABILITY_NONE)
    )
    assert await _call_get(svc, [gone[2]], awaited=False) == [None]  # DRAM only again
    with pytest.raises(errors.InvalidArgument):
        svc.set_namespace_policy(
            pb.SetNamespacePolicyRequest(namespace=pb.Namespace(name=NS), durability=7)  # type: ignore[arg-type]
        )


def test_durable_namespaces_setting_parses_and_rejects_bad_items() -> None:
    cfg = config.load(
        kvcache_config.KVCacheConfig,
        service="kvcache",
        argv=["--durable-namespaces", "team-a/llama=write_back, team-b/m/x=WRITE_THROUGH"],
        environ={"KVTIER_KVCACHE_INSECURE": "true"},
    )
    assert cfg.durable_policies() == {
        ("team-a", "llama"): "write_back",
        ("team-b", "m/x"): "write_through",
    }
    for argv, needle in (
        (["--durable-namespaces", "no-tenant=write_back"], "durable_namespaces"),
        (["--durable-namespaces", "t/ns=sometimes"], "durable_namespaces"),
        (["--spill-buffer-bytes", "1000"], "spill_buffer_bytes"),
        (["--read-through-timeout-s", "60"], "read_through_timeout_s"),
    ):
        with pytest.raises(config.ConfigError, match=needle):
            config.load(
                kvcache_config.KVCacheConfig,
                service="kvcache",
                argv=argv,
                environ={"KVTIER_KVCACHE_INSECURE": "true"},
            )


async def test_a_failed_durable_read_pauses_read_through_briefly() -> None:
    node = Node()
    node.objects.data[durable.object_key(T, NS, b"k")] = (_data(1), 0)
    assert node.tier.reads_through(T, NS)
    node.objects.fail = 1  # the gateway does not answer the HEAD
    assert await node.read(b"k") is None
    assert not node.tier.reads_through(T, NS)  # misses stay fast for a moment
    node.tier._reads_off_until = 0.0  # the pause is over
    assert await node.read(b"k") == _data(1)
