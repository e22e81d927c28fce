"""Draining and removing a pool under load (`AdminService.DrainPool` / `RemovePool`): two pools,
objects in both; pool 1 is drained while readers read every object byte-exact, writers add new
objects and overwrite objects of pool 1; then every object reads back as last written, pool 1's
drives hold nothing, no pool record is left, and pool 1 is retired in the map."""

from __future__ import annotations

import asyncio
import collections
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, membership, objects, security
from kvtier.cli import main as cli_main
from kvtier.cli import pools as pools_cmd
from kvtier.cli import progress as progress_mod
from kvtier.clients import gateway as gateway_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.datanode import shards
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
BUCKET = "drainme"
TAGS = {"moved": "while-tagged"}


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, pools=2, pool_drain_grace_s=1.0
    ) as c:
        yield c


def _pool_drives(cluster: Cluster, index: int) -> list[Path]:
    cmap = cluster.gateway.ctx.map_view.current
    ids = {s.drive_id for p in cmap.pools if p.index == index for es in p.sets for s in es.slots}
    return [d for d in cluster.drive_paths() if Cluster.drive_id(d) in ids]


def _metas(drives: list[Path]) -> collections.Counter[tuple[str, bool]]:
    found: collections.Counter[tuple[str, bool]] = collections.Counter()
    for drive in drives:
        for path in drive.glob(f"objects/{BUCKET}@*/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            found[(meta.key, meta.is_pointer)] += 1
    return found


def _state(cluster: Cluster, index: int) -> int:
    cmap = cluster.gateway.ctx.map_view.current
    return next(p.state for p in cmap.pools if p.index == index)


async def test_drain_under_load_then_remove(cluster: Cluster) -> None:
    sizes = [1 * KIB, 60 * KIB, 300 * KIB, 1100 * KIB]  # small (inline) and staged writes
    blobs = {f"k{i:02d}": objects_cluster.data(i, sizes[i % 4] + i) for i in range(32)}
    engine, stored = cluster.engine, cluster.stored
    async with (
        await objects.AsyncObjectClient.connect(cluster.gateway.address) as client,
        gateway_client.AdminServiceClient(cluster.gateway.address) as admin,
    ):
        await client.create_bucket(BUCKET)
        for key, data in blobs.items():
            await client.put_object(BUCKET, key, data)
        in_pool1 = [k for k in blobs if await engine._pool_of(stored(BUCKET), k) == 1]
        assert len(in_pool1) >= 4, in_pool1  # equal free space: both pools get objects
        with pytest.raises(errors.PreconditionFailed):
            await admin.remove_pool(1)  # not drained
        with pytest.raises(errors.PreconditionFailed):
            _ = [p async for p in admin.drain_pool(0)]  # pool 0 holds the pool records
        with pytest.raises(errors.NotFound):
            _ = [p async for p in admin.drain_pool(7)]

        overwritten = in_pool1[:4]  # clients overwrite these while they are being moved
        stable = [k for k in blobs if k not in overwritten]
        written: dict[str, bytes] = {}
        failures: list[str] = []
        reads: list[str] = []
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                for key in stable:
                    reads.append(key)
                    try:
                        if await client.get_object(BUCKET, key) != blobs[key]:
                            failures.append(f"{key}: wrong bytes")
                    except errors.KVTierError as exc:
                        failures.append(f"{key}: {exc!r}")

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                key = f"new{i:03d}"
                data = objects_cluster.data(1000 + i, 20 * KIB + i)
                await client.put_object(BUCKET, key, data)
                written[key] = data
                i += 1

        async def overwriter() -> None:
            round_ = 0
            while not stop.is_set():
                for key in overwritten:
                    data = objects_cluster.data(2000 + round_, 40 * KIB + round_)
                    await client.put_object(BUCKET, key, data)
                    blobs[key] = data  # acknowledged: it must be what a GET returns
                round_ += 1
                await asyncio.sleep(0)

        load = [asyncio.create_task(f()) for f in (reader, reader, writer, overwriter)]
        try:
            progress = [p async for p in admin.drain_pool(1)]
        finally:
            stop.set()
            await asyncio.gather(*load)

        last = progress[-1]
        assert (last.done, last.drained) == (True, True), last
        assert last.objects_total >= len(in_pool1) - len(overwritten), last
        assert last.objects_moved > 0, last
        assert last.bytes_moved > 0, last
        assert last.bytes_total >= last.bytes_moved, last
        assert any(not p.done for p in progress)  # progress came before the end
        assert failures == []
        assert len(reads) >= len(stable)  # reads went on during the drain ...
        assert written  # ... and writes
        assert _state(cluster, 1) == common_pb2.POOL_STATE_DRAINED

        # Every object as last acknowledged, all in pool 0, none left in pool 1, no record.
        for key, data in {**blobs, **written}.items():
            assert await client.get_object(BUCKET, key) == data, key
            assert await engine._pool_of(stored(BUCKET), key) == 0, key
        assert _metas(_pool_drives(cluster, 1)) == collections.Counter()
        in_first = _metas(_pool_drives(cluster, 0))
        assert not any(pointer for _, pointer in in_first)
        assert {key for key, _ in in_first} == set(blobs) | set(written)
        listed = [o.key for o in (await client.list_objects(BUCKET, max_keys=1000)).objects]
        assert listed == sorted({*blobs, *written})

        # Drained again: nothing to do. Then retired for good; pool 0 serves on.
        again = [p async for p in admin.drain_pool(1)]
        assert (again[-1].drained, again[-1].objects_total) == (True, 0)
        epoch = await admin.remove_pool(1)
        await cluster.gateway.ctx.map_view.wait_for(lambda m: m.epoch >= epoch, timeout_s=5)
        assert _state(cluster, 1) == common_pb2.POOL_STATE_RETIRED
        assert [p.index for p in cluster.gateway.ctx.map_view.current.pools] == [0, 1]
        assert await admin.remove_pool(1) == epoch  # idempotent
        with pytest.raises(errors.PreconditionFailed):
            _ = [p async for p in admin.drain_pool(1)]  # retired: for good
        await client.put_object(BUCKET, "after", b"x" * 5000)
        assert await client.get_object(BUCKET, "after") == b"x" * 5000
        assert await engine._pool_of(stored(BUCKET), "after") == 0


async def test_drain_progress_and_the_cli(cluster: Cluster) -> None:
    """Totals come first (from the pool's listing), so a client can show a bar and an ETA;
    `kvtier admin pool status|add|drain|remove` show states and progress."""
    sec = security.default()  # the test session's operator credentials
    meta = cluster.front.metadata_address()

    async def cli(*argv: str) -> tuple[int, str, str]:
        args, _ = cli_main._parser().parse_known_args(["admin", "pool", *argv])
        out, err = io.StringIO(), io.StringIO()
        code = await pools_cmd.run(args, out, err, sec)
        return code, out.getvalue(), err.getvalue()

    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket(BUCKET)
        for i in range(12):
            await client.put_object(BUCKET, f"p{i}", objects_cluster.data(i, 100 * KIB))
        in_pool1 = [
            k
            for k in (f"p{i}" for i in range(12))
            if await cluster.engine._pool_of(cluster.stored(BUCKET), k) == 1
        ]
    code, out, _ = await cli("status", "--metadata", meta)
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()[1:3]] == [
        ["0", "ACTIVE"],
        ["1", "ACTIVE"],
    ]
    assert out.splitlines()[-1] == "pending drives: 0 (a new pool forms at 6: 6 more needed)"
    code, out, _ = await cli("add", "--metadata", meta, "--json")
    assert json.loads(out) == {"pending_drives": [], "pool_drives": 6, "needed": 6}
    with pytest.raises(errors.PreconditionFailed, match="drain it first"):
        await cli("remove", "1", "--gateway", cluster.gateway.address)  # `kvtier` exits 1

    async with gateway_client.AdminServiceClient(cluster.gateway.address) as admin:
        progress: list[admin_pb2.DrainProgress] = [p async for p in admin.drain_pool(1)]
        first, last = progress[0], progress[-1]
        total = len(in_pool1) * 100 * KIB
        assert (first.objects_total, first.bytes_total) == (len(in_pool1), total)
        assert first.objects_moved == 0
        assert (last.objects_moved, last.bytes_moved) == (len(in_pool1), total)
        assert (last.errors, last.objects_dropped, last.passes) == (0, 0, 2)
        assert pools_cmd.render_bar(first, progress_mod.Meter(), bar=True).startswith(
            "[........................]   0% 0 B of "
        )

    code, out, err = await cli("drain", "1", "--gateway", cluster.gateway.address)
    assert code == 0  # drained already: nothing to move
    assert err.startswith("drain: ")
    assert out.endswith("the pool is DRAINED (kvtier admin pool remove retires it)\n")
    code, out, _ = await cli("remove", "1", "--gateway", cluster.gateway.address)
    assert (code, out.startswith("pool 1 retired")) == (0, True)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: m.pools[1].state == common_pb2.POOL_STATE_RETIRED, timeout_s=5
    )
    code, out, _ = await cli("status", "--metadata", meta, "--json")
    assert [(p["index"], p["state"]) for p in json.loads(out)] == [(0, "ACTIVE"), (1, "RETIRED")]


@pytest.fixture
async def three_pools(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, pools=3, pool_drain_grace_s=0.2
    ) as c:
        yield c


async def test_client_writes_racing_a_move_win(
    three_pools: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client PUT or DELETE of a key landing between the drain's read of it and its switch
    wins: the overwrite is what GET returns, the deleted key stays deleted. Moves go to pool 0
    (the copy is the switch) and to pool 2 (copy, then a new pool record), small objects
    (WRITE_SMALL) and staged ones alike."""
    cluster, engine = three_pools, three_pools.engine
    drainer = getattr(cluster.gateway.spec.loops[0], "__self__").drainer  # noqa: B009
    monkeypatch.setattr(drainer, "_parallel", 1)  # one key at a time, in key order
    small = {i for i in range(12) if i % 4 < 2}  # r00 r01 small, r02 r03 staged, ...
    blobs = {
        f"r{i:02d}": objects_cluster.data(i, (60 if i in small else 1100) * KIB) for i in range(12)
    }
    drains = iter([0, 2] * 20)  # the drain's targets alternate: r00 -> 0, r01 -> 2, ...
    client_pool = [1]  # the clients' PUTs: pool 1 at first, pool 0 while racing

    def choose(cmap: Any) -> int:
        return client_pool[0] if client_pool[0] >= 0 else next(drains)

    monkeypatch.setattr(engine, "choose_pool", choose)
    async with (
        await objects.AsyncObjectClient.connect(cluster.gateway.address) as client,
        gateway_client.AdminServiceClient(cluster.gateway.address) as admin,
    ):
        await client.create_bucket(BUCKET)
        for key, data in blobs.items():
            await client.put_object(BUCKET, key, data)
        for key in ("z-mp0", "z-mp1"):  # multipart objects keep their parts when moved
            upload = await client.create_multipart_upload(BUCKET, key)
            one = await client.upload_part(BUCKET, key, upload, 1, objects_cluster.data(7, 5 * MIB))
            two = await client.upload_part(BUCKET, key, upload, 2, b"tail")
            await client.complete_multipart_upload(BUCKET, key, upload, [one, two])
            blobs[key] = objects_cluster.data(7, 5 * MIB) + b"tail"
        multipart_etag = (await client.head_object(BUCKET, "z-mp0")).etag
        assert {await engine._pool_of(cluster.stored(BUCKET), k) for k in blobs} == {1}
        races = {f"r{i:02d}": "put" for i in range(4)} | {
            f"r{i:02d}": "delete" for i in range(4, 8)
        }
        races |= {"r08": "tag", "r09": "tag"}
        commit_moved = engine.commit_moved

        async def racing(upload_id: str, meta: Any) -> int:
            action = races.pop(meta.key, None)
            client_pool[0] = 0
            if action == "put":
                blobs[meta.key] = objects_cluster.data(99, 70 * KIB)
                await client.put_object(BUCKET, meta.key, blobs[meta.key])
            elif action == "delete":
                await client.delete_object(BUCKET, meta.key)
                del blobs[meta.key]
            elif action == "tag":  # PutObjectTagging, in place on the copy being moved
                await engine.meta_updater.update(cluster.stored(BUCKET), meta.key, tags=TAGS)
            client_pool[0] = -1
            return await commit_moved(upload_id, meta)

        client_pool[0] = -1
        monkeypatch.setattr(engine, "commit_moved", racing)
        progress = [p async for p in admin.drain_pool(1)]
        assert races == {}
        last = progress[-1]
        assert last.drained, last
        assert last.objects_moved == 6, last  # r08..r11, z-mp*; the raced ones were dropped
        for key, data in blobs.items():
            assert await client.get_object(BUCKET, key) == data, key
        for key in ("r04", "r05", "r06", "r07"):
            with pytest.raises(errors.NotFound):
                await client.get_object(BUCKET, key)
        listed = [o.key for o in (await client.list_objects(BUCKET)).objects]
        assert listed == sorted(blobs)
    assert _metas(_pool_drives(cluster, 1)) == collections.Counter()
    pools = {k: await engine._pool_of(cluster.stored(BUCKET), k) for k in blobs}
    moved = {"r08": 0, "r09": 2, "r10": 0, "r11": 2, "z-mp0": 0, "z-mp1": 2}
    assert pools == {f"r{i:02d}": 0 for i in range(4)} | moved
    for key in ("r08", "r09"):  # moved to pool 0 and to pool 2: tags carried over
        assert dict((await engine.resolve(cluster.stored(BUCKET), key)).meta.tags) == TAGS
    for key in ("z-mp0", "z-mp1"):
        meta = (await engine.resolve(cluster.stored(BUCKET), key)).meta
        assert [(p.number, p.size) for p in meta.parts] == [(1, 5 * MIB), (2, 4)]
        assert meta.etag == multipart_etag
    # Objects in pool 2 have a record in pool 0; nothing else is anywhere (no part is left).
    in_first, in_third = _metas(_pool_drives(cluster, 0)), _metas(_pool_drives(cluster, 2))
    in_pool2 = {"r09", "r11", "z-mp1"}
    assert {k for k, pointer in in_first if pointer} == {k for k, _ in in_third} == in_pool2
    assert not [p for p in cluster.tmp.glob("dn*/drive*/objects/.multipart/*/*/meta")]
    assert {k for k, _ in in_first} == set(blobs)
