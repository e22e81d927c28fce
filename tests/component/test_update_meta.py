"""UpdateMeta (a version's tags and ACL changed in place) on the in-process object tier
(metadata, 6 datanodes x 2 drives = EC 8+4, gateway): the datanode RPC on one drive, then the
engine's change on the whole set (`ObjectEngine.meta_updater`), with drives down and healing.

Every check reads the drives' own answers (ReadMeta, VerifyShard over gRPC) or their meta files,
and every GET compares bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.clients import datanode as datanode_client
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shards
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster

_READER = acl_pb2.Acl(
    grants=[
        acl_pb2.AclGrant(
            grantee_type=acl_pb2.GRANTEE_TYPE_ALL_USERS, permission=acl_pb2.ACL_PERMISSION_READ
        )
    ]
)
_SIZES = {"small": 4 * KIB + 1, "big": 3 * MIB + 7}  # inline in the meta / in part files


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


def _meta_file(cluster: Cluster, drive: Path, bucket: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return drive / "objects" / cluster.stored(bucket) / digest[:2] / digest / "meta"


def _on_disk(cluster: Cluster, drive: Path, bucket: str, key: str) -> datanode_pb2.ShardMeta:
    path = _meta_file(cluster, drive, bucket, key)
    return shards.decode_meta(path.read_bytes(), str(path))


def _node_of(cluster: Cluster, drive: Path) -> int:
    return next(i for i in range(len(cluster.datanodes)) if drive in cluster.drive_paths(i))


def _client(cluster: Cluster, drive: Path) -> datanode_client.ShardClient:
    return datanode_client.ShardClient(cluster.datanodes[_node_of(cluster, drive)].address)


async def _put_both(cluster: Cluster, bucket: str) -> dict[str, bytes]:
    data = {key: objects_cluster.data(i, size) for i, (key, size) in enumerate(_SIZES.items())}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket(bucket)
        for key, body in data.items():
            await client.put_object(bucket, key, body)
    return data


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


# The datanode RPC, one drive.


async def test_update_meta_changes_tags_and_acl_of_the_version_in_place(cluster: Cluster) -> None:
    data = await _put_both(cluster, "umeta")
    drive = cluster.drive_paths(2)[1]
    drive_id, bucket = cluster.drive_id(drive), cluster.stored("umeta")
    async with _client(cluster, drive) as client:
        for key in data:
            before = await client.read_meta(drive_id, bucket, key)
            tags = {"project": "kv", "ü-key": "v" * 256}
            got = await client.update_meta(drive_id, bucket, key, before.data_id, tags=tags)
            assert dict(got.tags) == tags
            acl_only = await client.update_meta(drive_id, bucket, key, before.data_id, acl=_READER)
            assert dict(acl_only.tags) == tags  # tags not named: kept
            assert acl_only.acl == _READER
            stored = await client.read_meta(drive_id, bucket, key)
            assert stored == _on_disk(cluster, drive, "umeta", key) == acl_only
            # Nothing else changed: same version, mtime, ETag, bytes (all blocks verify).
            expected = datanode_pb2.ShardMeta()
            expected.CopyFrom(before)
            expected.tags.update(tags)
            expected.acl.CopyFrom(_READER)
            assert stored == expected
            assert not (await client.verify_shard(drive_id, bucket, key)).bad_blocks
            cleared = await client.update_meta(drive_id, bucket, key, before.data_id, tags={})
            assert not cleared.tags
            assert cleared.acl == _READER
            listed = await client.list_shards(drive_id, bucket, key, "", 10)
            assert [(e.key, e.etag, e.mtime_unix_ns) for e in listed] == [
                (key, before.etag, before.mtime_unix_ns)
            ]
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as sdk:
        for key, body in data.items():
            assert await sdk.get_object("umeta", key) == body


async def test_update_meta_refuses_absent_objects_other_versions_and_bad_tags(
    cluster: Cluster,
) -> None:
    await _put_both(cluster, "refuse")
    drive = cluster.drive_paths(0)[0]
    drive_id, bucket = cluster.drive_id(drive), cluster.stored("refuse")
    async with _client(cluster, drive) as client:
        current = await client.read_meta(drive_id, bucket, "small")
        with pytest.raises(errors.NotFound):
            await client.update_meta(drive_id, bucket, "absent", current.data_id, tags={"a": "b"})
        with pytest.raises(errors.PreconditionFailed):
            await client.update_meta(drive_id, bucket, "small", "0" * 32, tags={"a": "b"})
        with pytest.raises(errors.InvalidArgument):
            await client.update_meta(drive_id, bucket, "small", "", tags={"a": "b"})
        eleven = {f"k{i}": "v" for i in range(11)}
        for bad in (eleven, {"k" * 129: "v"}, {"k": "v" * 257}, {"": "v"}):
            with pytest.raises(errors.InvalidArgument):
                await client.update_meta(drive_id, bucket, "small", current.data_id, tags=bad)
        with pytest.raises(errors.NotFound):
            await client.update_meta("no-such-drive", bucket, "small", current.data_id, tags={})
        assert await client.read_meta(drive_id, bucket, "small") == current  # untouched


async def test_an_update_survives_a_datanode_restart(cluster: Cluster) -> None:
    """Small objects are committed through the drive's journal, which a restart replays: the
    change made after the commit must not be undone by the replay."""
    data = await _put_both(cluster, "durable")
    node = 3
    drive = cluster.drive_paths(node)[0]
    drive_id, bucket = cluster.drive_id(drive), cluster.stored("durable")
    updated = {}
    async with _client(cluster, drive) as client:
        for key in data:
            data_id = (await client.read_meta(drive_id, bucket, key)).data_id
            updated[key] = await client.update_meta(
                drive_id, bucket, key, data_id, tags={"k": key}, acl=_READER
            )
    await cluster.stop_datanode(node)
    await cluster.start_datanode(node)
    async with _client(cluster, drive) as client:
        for key in data:
            assert await client.read_meta(drive_id, bucket, key) == updated[key]
            assert not (await client.verify_shard(drive_id, bucket, key)).bad_blocks


# The engine: the whole set.


async def test_the_engine_changes_every_drive_and_heals_the_ones_that_were_down(
    cluster: Cluster,
) -> None:
    data = await _put_both(cluster, "set")
    bucket, engine = cluster.stored("set"), cluster.engine
    down = cluster.drive_paths(5)
    await cluster.stop_datanode(5)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: sum(len(n.drives) for n in m.nodes) == 10, timeout_s=15
    )
    tags = {"team": "infra", "tier": "hot"}
    for key in data:
        before = (await engine.resolve(bucket, key)).meta
        meta = await engine.meta_updater.update(bucket, key, tags=tags, acl=_READER)
        assert dict(meta.tags) == tags
        assert meta.acl == _READER
        assert (meta.data_id, meta.etag, meta.mtime_unix_ns) == (
            before.data_id, before.etag, before.mtime_unix_ns,
        )  # fmt: skip
        head = await engine.head(bucket, key)
        assert dict(head.headers.tags) == tags
    live = [d for d in cluster.drive_paths() if d not in down]
    for key in data:
        assert all(dict(_on_disk(cluster, d, "set", key).tags) == tags for d in live)
        assert all(dict(_on_disk(cluster, d, "set", key).tags) == {} for d in down)
    # The returned drives still hold the version without the change: the read quorum's
    # variant is served, and healing brings them in line.
    await cluster.start_datanode(5)

    async def healed() -> bool:
        return (
            all(_on_disk(cluster, d, "set", key).acl == _READER for d in down for key in data)
            and not cluster.healer.queue_length
        )

    await _until(healed)
    for key in data:
        assert all(dict(_on_disk(cluster, d, "set", key).tags) == tags for d in down)
        assert dict((await engine.head(bucket, key)).headers.tags) == tags
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as sdk:
        for key, body in data.items():
            assert await sdk.get_object("set", key) == body
            assert dict((await sdk.head_object("set", key)).headers.tags) == tags  # over gRPC
    await engine.meta_updater.update(bucket, "small", tags={})  # removes them, keeps the ACL
    assert not (await engine.resolve(bucket, "small")).meta.tags
    assert (await engine.resolve(bucket, "small")).meta.acl == _READER


async def test_the_engine_prefers_the_quorums_change_over_a_drive_that_missed_it(
    cluster: Cluster,
) -> None:
    await _put_both(cluster, "vote")
    bucket, engine = cluster.stored("vote"), cluster.engine
    await engine.meta_updater.update(bucket, "big", tags={"v": "1"})
    # The drive of the last shard answers last: without a vote, its meta would be served.
    drive = max(
        cluster.drive_paths(), key=lambda d: _on_disk(cluster, d, "vote", "big").shard_index
    )
    async with _client(cluster, drive) as client:  # one drive goes back to other tags
        data_id = (await engine.resolve(bucket, "big")).meta.data_id
        await client.update_meta(cluster.drive_id(drive), bucket, "big", data_id, tags={"v": "0"})
    for _ in range(5):
        assert dict((await engine.head(bucket, "big")).headers.tags) == {"v": "1"}


async def test_the_later_change_prevails_and_an_older_one_is_never_taken(
    cluster: Cluster,
) -> None:
    """Changes carry one stamp for the whole set: of two concurrent changes the later wins on
    every drive, whatever order they arrive in and however many drives each reached."""
    await _put_both(cluster, "stamps")
    bucket, engine = cluster.stored("stamps"), cluster.engine
    first = await engine.meta_updater.update(bucket, "big", tags={"v": "first"})
    assert first.meta_changed_unix_ns > 0
    later = first.meta_changed_unix_ns + 1_000
    drives = cluster.drive_paths()[:3]  # fewer than a write quorum hold the later change
    for drive in drives:
        async with _client(cluster, drive) as client:
            await client.update_meta(
                cluster.drive_id(drive), bucket, "big", first.data_id, tags={"v": "later"},
                changed_unix_ns=later,
            )  # fmt: skip
    for _ in range(5):
        assert dict((await engine.head(bucket, "big")).headers.tags) == {"v": "later"}
    async with _client(cluster, drives[0]) as client:  # an older change arriving late
        kept = await client.update_meta(
            cluster.drive_id(drives[0]), bucket, "big", first.data_id, tags={"v": "older"},
            changed_unix_ns=later - 1,
        )  # fmt: skip
    assert dict(kept.tags) == {"v": "later"}
    assert dict(_on_disk(cluster, drives[0], "stamps", "big").tags) == {"v": "later"}
    # The next change through the engine is stamped after the latest one seen: it lands.
    last = await engine.meta_updater.update(bucket, "big", tags={"v": "last"})
    assert last.meta_changed_unix_ns > later
    for drive in cluster.drive_paths():
        assert dict(_on_disk(cluster, drive, "stamps", "big").tags) == {"v": "last"}


async def test_the_engine_refuses_absent_objects_and_bad_tags(cluster: Cluster) -> None:
    await _put_both(cluster, "none")
    bucket, engine = cluster.stored("none"), cluster.engine
    with pytest.raises(errors.NotFound):
        await engine.meta_updater.update(bucket, "absent", tags={"a": "b"})
    with pytest.raises(errors.InvalidArgument):
        await engine.meta_updater.update(bucket, "small", tags={"k" * 129: "v"})
    assert not (await engine.resolve(bucket, "small")).meta.tags
