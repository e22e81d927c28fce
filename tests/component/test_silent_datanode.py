"""A datanode that stops answering (a partition drops its packets: no reply, no error) costs the
gateway's writes and reads one straggler grace, not the data plane's deadline on every call
(issue 16; the fault suite's tcp partition of one datanode). And a failed commit whose undo
cannot reach a drive is undone later, in the background, and queued for healing.

The silence is played in this process on the gateway's side of the data plane: calls to that
node never get a reply until the test ends them (then as their deadline would), while the
node's real service stays up for what the test checks on disk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.datanode import shardmeta, shards
from services.gateway import commits, datanodes, fanout, healing, placement
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
GRACE_S = 3.0
#: An operation that did not wait out the grace (on a shared, busy test machine).
QUICK_S = 1.5


@pytest.fixture
async def one_pool(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    # Staging slots of 32 MiB (the least): calls of two 8 MiB stripes, so a 16 MiB + 3 object
    # takes two.
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, staging_slot_bytes=32 * MIB
    ) as c:
        yield c


def _nodes(cluster: Cluster) -> datanodes.Datanodes:
    found = getattr(cluster.gateway.spec.loops[0], "__self__").nodes  # noqa: B009
    assert isinstance(found, datanodes.Datanodes)
    return found


class Silence:
    """Data-plane calls to one datanode get no reply until `end()` (then DeadlineExceeded)."""

    def __init__(self, nodes: datanodes.Datanodes, node_id: str) -> None:
        self.real = nodes.call
        self.node_id = node_id
        self.ended = asyncio.Event()
        #: (method, WRITE_SHARD offset) of each call it swallowed; calls cancelled. The
        #: gateway's probes of a suspect (a READ_METAS naming no drive) go to `probes` only.
        self.calls: list[tuple[int, int]] = []
        self.cancelled = 0
        self.probes: list[float] = []

    async def call(
        self, node_id: str, method: int, request: Any, segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> Any:  # fmt: skip
        if node_id != self.node_id or self.ended.is_set():
            return await self.real(node_id, method, request, segments, intos)
        if isinstance(request, shards_pb2.ReadMetasRequest) and not request.drive_ids:
            self.probes.append(time.monotonic())
            await self.ended.wait()
            raise errors.DeadlineExceeded(f"tcp call to {node_id} took over 30.0s (test)")
        self.calls.append((method, getattr(request, "offset", 0)))
        try:
            await self.ended.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise errors.DeadlineExceeded(f"tcp call to {node_id} took over 30.0s (test)")

    def end(self) -> None:
        self.ended.set()


async def _timed(coro: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await asyncio.wait_for(coro, 20)
    return result, time.monotonic() - started


def _key_drives(cluster: Cluster, bucket: str, key: str) -> dict[str, str]:
    """drive id -> data_id of the current version of bucket/key on each drive holding one."""
    stored = cluster.stored(bucket)
    found = {}
    for drive in cluster.drive_paths():
        for path in drive.glob(f"objects/{stored}/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            if meta.key == key:
                found[cluster.drive_id(drive)] = meta.data_id
    return found


async def test_a_silent_datanode_costs_one_grace_then_none(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One datanode of the set goes silent: the first staged PUT waits the grace once, its
    sends to that node are cancelled and its drives left out of the write (no later block is
    sent there), the object is queued for healing; later PUTs (staged, small, multipart) and
    GETs wait no grace at all. Every object reads back exact, and once the node answers again
    it is no longer suspect and the heal gives its drives their shards."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)  # keep the intake in view
    small = {f"s{n}": objects_cluster.data(n, 4 * KIB) for n in range(3)}
    big = {"big": objects_cluster.data(10, 16 * MIB + 3), "big2": objects_cluster.data(11, 3 * MIB)}
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("silent")
        for key, blob in small.items():
            await client.put_object("silent", key, blob)
        stored = one_pool.stored("silent")
        where = placement.locate(engine.view.current, stored, "big")
        node_id = where.slots[0].node_id
        cut_drives = {s.drive_id for s in where.slots if s.node_id == node_id}
        silence = Silence(nodes, node_id)
        monkeypatch.setattr(nodes, "call", silence.call)

        _, took = await _timed(client.put_object("silent", "big", big["big"]))
        assert GRACE_S * 0.8 < took < GRACE_S * 3 + 5, took  # the grace once, not 30 s
        assert nodes.suspects.suspect(node_id)
        sends = [at for method, at in silence.calls if method == write_shard()]
        assert sends == [0] * len(cut_drives)  # the first block only: never a later offset
        assert silence.cancelled == len(cut_drives)
        assert set(_key_drives(one_pool, "silent", "big")).isdisjoint(cut_drives)
        assert len(_key_drives(one_pool, "silent", "big")) == 12 - len(cut_drives)
        queued = dict(engine.heal_queue.items())
        assert queued[(stored, "big")].reason == (
            f"write committed on {12 - len(cut_drives)} of 12 drives"
        )

        # Suspect: no grace, whatever the operation.
        _, took = await _timed(client.put_object("silent", "big2", big["big2"]))
        assert took < QUICK_S, took
        for key, blob in small.items():
            got, took = await _timed(client.get_object("silent", key))
            assert took < QUICK_S, (key, took)
            assert got == blob, key
        _, took = await _timed(client.put_object("silent", "s9", small["s0"]))
        assert took < QUICK_S, took
        upload = await client.create_multipart_upload("silent", "mp")
        part = objects_cluster.data(12, 1 * MIB + 7)
        one = await client.upload_part("silent", "mp", upload, 1, part)
        await client.complete_multipart_upload("silent", "mp", upload, [one])
        for key, blob in [*big.items(), ("mp", part)]:
            assert await client.get_object("silent", key) == blob, key
            assert (stored, key) in dict(engine.heal_queue.items()), key

        silence.end()  # the partition heals: the next reply clears the suspicion
        deadline = time.monotonic() + 10
        while nodes.suspects.suspect(node_id):
            assert time.monotonic() < deadline, "still suspect"
            assert await client.get_object("silent", "s0") == small["s0"]
        result = await one_pool.healer.heal_object(stored, "big")
        assert result.outcome is healing.Outcome.HEALED
        assert len(_key_drives(one_pool, "silent", "big")) == 12


def write_shard() -> int:
    return shards_pb2.SHARD_CALL_METHOD_WRITE_SHARD


class Unreachable:
    """The gateway's shard client of one datanode, whose DeleteShard calls fail `fails` times
    (unreachable) before they go through."""

    def __init__(self, nodes: datanodes.Datanodes, node_id: str, fails: int) -> None:
        self.real = nodes.shards
        self.node_id = node_id
        self.fails = fails
        self.deletes = 0

    def shards(self, node_id: str) -> Any:
        client = self.real(node_id)
        return self._Proxy(self, client) if node_id == self.node_id else client

    class _Proxy:
        def __init__(self, outer: Unreachable, client: Any) -> None:
            self._outer, self._client = outer, client

        def __getattr__(self, name: str) -> Any:
            return getattr(self._client, name)

        async def delete_shard(self, *args: Any, **kwargs: Any) -> bool:
            self._outer.deletes += 1
            if self._outer.fails > 0:
                self._outer.fails -= 1
                raise errors.Unavailable("datanode unreachable (test)")
            result: bool = await self._client.delete_shard(*args, **kwargs)
            return result


async def test_an_undo_that_cannot_reach_a_drive_is_retried_and_queued_for_healing(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 of 12 drives full: the PUT misses its quorum and is undone on the 4 that took it, but
    one of them cannot be reached at first: that drive keeps the failed version until the
    undo, retried in the background, gets there; the object is queued for healing with why,
    and heals to the version before the failed write."""
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    monkeypatch.setattr(commits, "UNDO_RETRY_FIRST_S", 0.05)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("undo")
        before = objects_cluster.data(1, 4 * KIB)
        await client.put_object("undo", "k", before)
        stored = one_pool.stored("undo")
        kept = set(_key_drives(one_pool, "undo", "k").values())
        where = placement.locate(engine.view.current, stored, "k")
        took = {where.slots[i].drive_id for i in range(4)}  # the drives not full
        node_id = where.slots[0].node_id
        node_drives = [s.drive_id for s in where.slots if s.node_id == node_id]
        cut = set(node_drives) & took  # took the failed write, and the undo misses them
        unreachable = Unreachable(nodes, node_id, fails=2 * len(node_drives))
        monkeypatch.setattr(nodes, "shards", unreachable.shards)
        real_stamp = shardmeta.stamp

        def stamp(stored_meta: datanode_pb2.ShardMeta, at: str) -> None:
            if stored_meta.shard_index >= 4:
                raise errors.StorageFull(f"drive full: {at} (test)")
            real_stamp(stored_meta, at)

        monkeypatch.setattr(shardmeta, "stamp", stamp)
        removed = commits.UNDO_RETRIED.labels("removed")._value.get()
        absent = commits.UNDO_RETRIED.labels("absent")._value.get()
        with pytest.raises(errors.StorageFull):
            await client.put_object("undo", "k", objects_cluster.data(2, 4 * KIB))
        monkeypatch.setattr(shardmeta, "stamp", real_stamp)
        held = _key_drives(one_pool, "undo", "k")
        assert {d for d, data_id in held.items() if data_id not in kept} == cut  # not yet
        intake = dict(engine.heal_queue.items())[(stored, "k")]
        assert intake.reason == (
            f"undo of a failed commit could not reach drive {', '.join(node_drives)}"
        )

        await asyncio.wait_for(nodes.background_idle(), 20)
        assert set(_key_drives(one_pool, "undo", "k").values()) == kept
        assert unreachable.deletes == 3 * len(node_drives)  # the undo, a failed retry, a good one
        assert commits.UNDO_RETRIED.labels("removed")._value.get() == removed + len(cut)
        assert commits.UNDO_RETRIED.labels("absent")._value.get() == (
            absent + len(node_drives) - len(cut)
        )
        result = await one_pool.healer.heal_object(stored, "k")
        assert result.outcome in (healing.Outcome.HEALTHY, healing.Outcome.HEALED)
        assert await client.get_object("undo", "k") == before
