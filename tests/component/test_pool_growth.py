"""Adding a pool under load: a cluster of one pool (3 datanodes x 2 drives) gets 3 more
datanodes while a writer adds and overwrites objects and a reader reads every acknowledged one
byte-exact; their 6 pending drives form pool 1. Nothing fails, nothing is lost, new objects go
to both pools by free space, and nothing already written moves (pools are never rebalanced)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects
from services.datanode import shards
from tests.component import objects_cluster

KIB = objects_cluster.KIB
Cluster = objects_cluster.Cluster
BUCKET = "growme"
FIRST_NODES = 3  # 6 drives: pool 0; the next 3 datanodes' 6 drives form pool 1


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, datanodes=FIRST_NODES
    ) as c:
        yield c


def _metas(drives: list[Path]) -> collections.Counter[tuple[str, bool]]:
    found: collections.Counter[tuple[str, bool]] = collections.Counter()
    for drive in drives:
        for path in drive.glob(f"objects/{BUCKET}@*/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            found[(meta.key, meta.is_pointer)] += 1
    return found


async def test_pool_added_under_load(cluster: Cluster) -> None:
    sizes = [1 * KIB, 60 * KIB, 300 * KIB]  # small (inline) and staged writes
    before = {f"a{i:02d}": objects_cluster.data(i, sizes[i % 3] + i) for i in range(18)}
    overwritten = list(before)[:4]  # the writer overwrites these during growth
    acked: dict[str, bytes] = dict(before)  # what a GET must return, as last acknowledged
    failures: list[str] = []
    reads: list[str] = []
    after_growth: list[str] = []  # new keys whose PUT began once the gateway saw pool 1
    grown = asyncio.Event()
    enough = asyncio.Event()  # 24 new objects were written after growth
    stop = asyncio.Event()
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket(BUCKET)
        for key, data in before.items():
            await client.put_object(BUCKET, key, data)

        async def reader() -> None:
            while not stop.is_set():
                for key, data in list(acked.items()):
                    if key in overwritten:
                        continue  # its bytes change under the read; checked at the end
                    reads.append(key)
                    try:
                        if await client.get_object(BUCKET, key) != data:
                            failures.append(f"GET {key}: wrong bytes")
                    except errors.KVTierError as exc:
                        failures.append(f"GET {key}: {exc!r}")

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                key = f"n{i:03d}"
                data = objects_cluster.data(1000 + i, sizes[i % 3] + i)
                if i % 3 == 0:  # an overwrite between new objects
                    key = overwritten[(i // 3) % len(overwritten)]
                late = grown.is_set()
                try:
                    await client.put_object(BUCKET, key, data)
                except errors.KVTierError as exc:
                    failures.append(f"PUT {key}: {exc!r}")
                else:
                    acked[key] = data
                    if late and key.startswith("n"):
                        after_growth.append(key)
                        if len(after_growth) >= 24:
                            enough.set()
                i += 1
                await asyncio.sleep(0)

        load = [asyncio.create_task(f()) for f in (reader, writer)]
        try:
            await asyncio.sleep(0.5)
            for i in range(FIRST_NODES, objects_cluster.DATANODES):
                await cluster.start_datanode(i)
            await cluster.gateway.ctx.map_view.wait_for(lambda m: len(m.pools) == 2, timeout_s=10)
            grown.set()
            await asyncio.sleep(2)  # the load goes on in the grown cluster
            await asyncio.wait_for(enough.wait(), timeout=10)
        finally:
            stop.set()
            await asyncio.gather(*load)

        assert failures == []
        assert len(reads) >= len(before)  # reads went on during growth ...
        assert len(after_growth) >= 24  # ... and writes after it
        engine, stored = cluster.engine, cluster.stored(BUCKET)
        for key, data in acked.items():
            assert await client.get_object(BUCKET, key) == data, key
        pools = {key: await engine._pool_of(stored, key) for key in acked}
        # Equal free space: new objects go to both pools once pool 1 is there.
        assert {pools[k] for k in after_growth} == {0, 1}, [pools[k] for k in after_growth]
        # Nothing moved: what was written before growth and not overwritten stays in pool 0.
        untouched = [k for k in before if k not in overwritten]
        assert {pools[k] for k in untouched} == {0}
        listed = [o.key async for o in client.iter_objects(BUCKET) if not isinstance(o, str)]
        assert listed == sorted(acked)

    # On disk: every object in exactly one pool (6 data copies, plus 6 records in pool 0 when
    # it lives in pool 1), and pool 1's drives hold only objects placed there.
    cmap = cluster.gateway.ctx.map_view.current
    ids = {s.drive_id for p in cmap.pools if p.index == 1 for es in p.sets for s in es.slots}
    second = [d for d in cluster.drive_paths() if Cluster.drive_id(d) in ids]
    assert len(second) == 6
    assert {Cluster.drive_id(d) for d in cluster.drive_paths(0)}.isdisjoint(ids)
    everywhere = _metas(cluster.drive_paths())
    for key in acked:
        copies = (everywhere[(key, False)], everywhere[(key, True)])
        assert copies == ((6, 6) if pools[key] == 1 else (6, 0)), (key, copies)
    assert {k for k, _ in _metas(second)} == {k for k, p in pools.items() if p == 1}
