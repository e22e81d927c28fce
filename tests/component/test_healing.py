"""Healing over the in-process object tier (metadata, 6 datanodes x 2 drives = EC 8+4, gateway).

Damage is done on disk (flipped bytes, deleted files, a wiped drive); "healed" is checked by the
datanodes themselves (VerifyShard, ReadMeta over gRPC) and by comparing the rebuilt files with
the bytes they held before the damage. Every GET compares bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.cli import admin as admin_cli
from kvtier.cli import main as cli_main
from kvtier.cli import progress as progress_cli
from kvtier.clients import datanode as datanode_client
from kvtier.clients import gateway as gateway_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.datanode import shards
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
ShardMeta = datanode_pb2.ShardMeta


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


# Helpers.


def _object_dir(drive: Path, bucket: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    stored = objects_cluster.stored_name(drive.parent.parent, bucket)
    return drive / "objects" / stored / digest[:2] / digest


def _meta(drive: Path, bucket: str, key: str) -> ShardMeta:
    path = _object_dir(drive, bucket, key) / "meta"
    return shards.decode_meta(path.read_bytes(), str(path))


def _part(drive: Path, bucket: str, key: str) -> Path:
    return _object_dir(drive, bucket, key) / _meta(drive, bucket, key).data_id / "part.1"


def _flip(path: Path, offsets: tuple[int, ...] = (100,)) -> None:
    raw = bytearray(path.read_bytes())
    for at in offsets:
        raw[at] ^= 0x5A
    path.write_bytes(bytes(raw))


def _drives_by_shard(cluster: Cluster, bucket: str, key: str) -> dict[int, Path]:
    """Shard index -> the drive directory holding it."""
    return {_meta(d, bucket, key).shard_index: d for d in cluster.drive_paths()}


def _node_of(cluster: Cluster, drive: Path) -> int:
    return next(i for i in range(len(cluster.datanodes)) if drive in cluster.drive_paths(i))


async def _verified(cluster: Cluster, drive: Path, bucket: str, key: str, data_id: str) -> bool:
    """Whether the datanode says the drive holds the version whole."""
    address = cluster.datanodes[_node_of(cluster, drive)].address
    drive_id = cluster.drive_id(drive)
    bucket = cluster.stored(bucket)
    async with datanode_client.ShardClient(address) as client:
        try:
            reply = await client.verify_shard(drive_id, bucket, key)
            meta = await client.read_meta(drive_id, bucket, key)
        except (errors.Corrupt, errors.NotFound):  # an unreadable or absent meta
            return False
        return not reply.missing and not reply.bad_blocks and meta.data_id == data_id


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


async def _heal(
    cluster: Cluster, bucket: str = "", prefix: str = "", *, dry_run: bool = False
) -> tuple[admin_pb2.HealProgress, list[str]]:
    """The last progress message of a Heal and every unrecoverable key reported."""
    async with gateway_client.AdminServiceClient(cluster.gateway.address) as client:
        messages = [p async for p in client.heal(bucket, prefix, dry_run=dry_run)]
    assert messages[-1].done
    assert not any(m.done for m in messages[:-1])
    return messages[-1], [k for m in messages for k in m.unrecoverable_keys]


def _snapshot(drives: list[Path]) -> dict[Path, bytes]:
    return {f: f.read_bytes() for d in drives for f in sorted((d / "objects").rglob("*"))
            if f.is_file()}  # fmt: skip


# Heal on read, the queue.


async def test_flipped_bytes_are_healed_after_a_read(cluster: Cluster) -> None:
    big, small = objects_cluster.data(1, 20 * MIB + 11), objects_cluster.data(2, 40 * KIB + 3)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("heal")
        await client.put_object("heal", "big", big)
        await client.put_object("heal", "small", small)
        by_shard = _drives_by_shard(cluster, "heal", "big")
        data_drive, meta_drive = by_shard[3], _drives_by_shard(cluster, "heal", "small")[5]
        big_id = _meta(data_drive, "heal", "big").data_id
        small_meta = _meta(meta_drive, "heal", "small")
        part = _part(data_drive, "heal", "big")
        original = part.read_bytes()
        _flip(part, (100, MIB + 8 + 5, len(original) - 20))  # blocks 0, 1 and the last
        _flip(_object_dir(meta_drive, "heal", "small") / "meta", (30,))  # inline: the meta
        assert await client.get_object("heal", "big") == big  # rebuilt on read, queued
        assert await client.get_object("heal", "small") == small  # 11 metas agree: queued

        async def healed() -> bool:
            return (
                await _verified(cluster, data_drive, "heal", "big", big_id)
                and await _verified(cluster, meta_drive, "heal", "small", small_meta.data_id)
                and cluster.healer.queue_length == 0
            )

        await _until(healed)
        assert part.read_bytes() == original  # byte for byte what the drive held
        healed_meta = _meta(meta_drive, "heal", "small")
        # The drive stamps when it stored the healed copy (its own clock): all else is as it was.
        assert healed_meta.stored_unix_ns >= small_meta.stored_unix_ns
        healed_meta.stored_unix_ns = small_meta.stored_unix_ns
        assert healed_meta == small_meta
        # Reads come from the healed shards even with the four other drives of a stripe gone.
        assert (
            await client.get_object("heal", "big", offset=3 * MIB, length=MIB)
            == (big[3 * MIB : 4 * MIB])
        )


async def test_a_partial_write_waits_for_its_drives_and_is_healed_when_they_return(
    cluster: Cluster,
) -> None:
    data = objects_cluster.data(3, 9 * MIB + 1)
    down = cluster.drive_paths(5)
    await cluster.stop_datanode(5)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: sum(len(n.drives) for n in m.nodes) == 10, timeout_s=15
    )
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("partial")
        await client.put_object("partial", "k", data)  # committed on 10 drives: queued
        await _until(lambda: _waiting(cluster))  # tried, and now waits for the 2 drives
        assert all(not _object_dir(d, "partial", "k").exists() for d in down)
        await cluster.start_datanode(5)
        data_id = _meta(cluster.drive_paths(0)[0], "partial", "k").data_id

        async def healed() -> bool:
            return all([await _verified(cluster, d, "partial", "k", data_id) for d in down])

        await _until(healed)
        for i in (0, 1):  # the returned drives now carry the object
            await cluster.stop_datanode(i)
        assert await client.get_object("partial", "k") == data


async def _waiting(cluster: Cluster) -> bool:
    queued = cluster.healer.queued(cluster.stored("partial"), "k")
    return queued is not None and queued[0] > 0 and len(queued[1]) == 2


# The scanner.


async def test_the_scanner_finds_and_heals_damage_nobody_read(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    settings: dict[str, Any] = {"scan_interval_s": 0.1, "scan_objects_per_cycle": 2}
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, **settings
    ) as cluster:
        sizes = {"a": 3 * MIB, "b": 100, "c": 200 * KIB, "d": 0}
        async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
            for bucket in ("scan1", "scan2"):
                await client.create_bucket(bucket)
                for key, size in sizes.items():
                    await client.put_object(bucket, key, objects_cluster.data(len(key), size))
        damaged = []
        for bucket in ("scan1", "scan2"):
            for key in sizes:
                drive = _drives_by_shard(cluster, bucket, key)[0]
                data_id = _meta(drive, bucket, key).data_id
                shutil.rmtree(_object_dir(drive, bucket, key))  # the drive lost it
                damaged.append((drive, bucket, key, data_id))

        async def healed() -> bool:
            return all([await _verified(cluster, *d) for d in damaged])

        await _until(healed)  # 8 objects, 2 a cycle: the scanner went round


# AdminService.Heal.


async def test_heal_rebuilds_a_replaced_drive(cluster: Cluster) -> None:
    sizes = [0, 1, 100 * KIB, 128 * KIB + 1, 3 * MIB + 7, 20 * MIB + 11]
    contents = {("fleet", f"obj/{size}"): objects_cluster.data(size, size) for size in sizes}
    contents[("other", "x")] = b"in another bucket"
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        for bucket in ("fleet", "other"):
            await client.create_bucket(bucket)
        for (bucket, key), data in contents.items():
            await client.put_object(bucket, key, data)
        ids = {name: _meta(cluster.drive_paths(1)[0], *name).data_id for name in contents}
        wiped = cluster.drive_paths(0)[0]
        # A replaced drive: same identity (format.json), no objects, no index.
        await cluster.stop_datanode(0)
        shutil.rmtree(wiped / "objects")
        for index_file in (wiped / ".kvtier").glob("index*.sqlite*"):
            index_file.unlink()
        await cluster.start_datanode(0)
        await cluster.gateway.ctx.map_view.wait_for(_all_online, timeout_s=15)

        last, lost = await _heal(cluster)
        assert (last.scanned, last.healed, last.shards_healed) == (len(contents),) * 3
        assert (last.unrecoverable, last.skipped, lost) == (0, 0, [])
        for (bucket, key), data_id in ids.items():
            assert await _verified(cluster, wiped, bucket, key, data_id), key
        again, _ = await _heal(cluster)
        assert again.healthy == len(contents)

        # The rebuilt drive carries its share: with 4 other drives gone, 8 = k remain.
        for i in (1, 2):
            await cluster.stop_datanode(i)
        listed = await client.list_objects("fleet")
        assert sorted(o.key for o in listed.objects) == sorted(
            k for b, k in contents if b == "fleet"
        )
        for (bucket, key), data in contents.items():
            assert await client.get_object(bucket, key) == data, key


def _all_online(cmap: common_pb2.ClusterMap) -> bool:
    slots = [s for p in cmap.pools for es in p.sets for s in es.slots]
    return bool(slots) and all(s.state == common_pb2.DRIVE_STATE_ONLINE for s in slots)


async def test_dry_run_reports_and_writes_nothing(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("dry")
        for key in ("one", "two", "fine"):
            # 5 MiB: in part files (a small write's inline shards go up to 512 KiB)
            await client.put_object("dry", key, objects_cluster.data(len(key), 5 * MIB))
    one, two = _drives_by_shard(cluster, "dry", "one"), _drives_by_shard(cluster, "dry", "two")
    _flip(_part(one[0], "dry", "one"))
    _flip(_part(one[9], "dry", "one"))  # parity: no read would notice
    (_object_dir(two[4], "dry", "two") / "meta").unlink()
    before = _snapshot(cluster.drive_paths())

    last, _ = await _heal(cluster, "dry", dry_run=True)
    assert (last.scanned, last.healed, last.healthy, last.shards_healed) == (3, 2, 1, 3)
    # Bytes: the listed sizes of the objects looked at, and of those healed (would be).
    assert (last.bytes_scanned, last.bytes_healed) == (3 * 5 * MIB, 2 * 5 * MIB)
    assert _snapshot(cluster.drive_paths()) == before
    assert cluster.healer.queue_length == 0  # a dry run queues nothing either

    last, _ = await _heal(cluster, "dry", "t")  # the prefix selects "two" only
    assert (last.scanned, last.healed, last.shards_healed) == (1, 1, 1)
    assert (last.bytes_scanned, last.bytes_healed) == (5 * MIB, 5 * MIB)
    last, _ = await _heal(cluster, "dry")
    assert (last.scanned, last.healed, last.healthy, last.shards_healed) == (3, 1, 2, 2)


async def test_more_than_m_bad_shards_are_unrecoverable_and_nothing_is_written(
    cluster: Cluster,
) -> None:
    data = objects_cluster.data(9, 5 * MIB)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("lost")
        await client.put_object("lost", "broken", data)
        await client.put_object("lost", "fine", b"fine")
    for drive in list(_drives_by_shard(cluster, "lost", "broken").values())[:5]:  # m = 4
        _flip(_part(drive, "lost", "broken"), (200,))  # block 0 of 5 shards
    before = _snapshot(cluster.drive_paths())

    last, lost = await _heal(cluster, "lost")
    assert (last.scanned, last.healthy, last.healed, last.unrecoverable) == (2, 1, 0, 1)
    assert lost == ["lost/broken"]
    assert _snapshot(cluster.drive_paths()) == before
    assert cluster.healer.queue_length == 0
    for drive in cluster.drive_paths():
        assert not any((drive / shards.TMP_DIR).iterdir())


# The command line.


async def test_cli_heals_and_exits_by_outcome(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("cli")
        for key in ("a", "b"):
            # in part files: over a small write's 512 KiB shards
            await client.put_object("cli", f"dir/{key}", objects_cluster.data(5, 4 * MIB + 1))
    _flip(_part(_drives_by_shard(cluster, "cli", "dir/a")[2], "cli", "dir/a"))
    address = cluster.gateway.address

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = await asyncio.to_thread(run, "admin", "heal", "cli/dir/", "--gateway", address)
    assert code == 0
    assert out.splitlines()[-1] == "scanned 2, healed 1, unrecoverable 0"

    state = tmp_path / "state"
    state.mkdir()
    (state / "cluster.json").write_text(json.dumps({"gateway_grpc": address}))
    code, out, _ = await asyncio.to_thread(run, "admin", "heal", "--state-dir", str(state))
    assert (code, out.splitlines()[-1]) == (0, "scanned 2, healed 0, unrecoverable 0")

    for drive in list(_drives_by_shard(cluster, "cli", "dir/b").values())[:5]:
        _flip(_part(drive, "cli", "dir/b"))
    code, out, _ = await asyncio.to_thread(
        run, "admin", "heal", "cli", "--gateway", address, "--dry-run"
    )
    assert code == 1
    assert "unrecoverable: cli/dir/b" in out.splitlines()
    assert out.splitlines()[-1] == (
        "scanned 2, healed 0, unrecoverable 1 (dry run: nothing was written)"
    )
    code, _, err = await asyncio.to_thread(run, "admin", "heal", "nope", "--gateway", address)
    assert code == 1
    assert err.startswith("kvtier admin: error:")
    assert "nope" in err


async def test_cli_progress_bar_on_a_terminal(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("bar")
        for i in range(3):
            await client.put_object("bar", f"k{i}", b"x" * i)
    err, out = io.StringIO(), io.StringIO()
    # What the bar measures: the listing's objects and bytes (0 + 1 + 2).
    totals = await admin_cli.count_objects(cluster.gateway.address, "bar", "")
    assert totals == progress_cli.Totals(objects=3, bytes=3)
    now = [100.0]
    display = admin_cli.Display(err, tty=True, clock=lambda: now[0])
    progress = admin_pb2.HealProgress(scanned=2, healed=1, bytes_scanned=1, current_key="bar/k1")
    now[0] += 2.0
    display.show(progress, totals)
    assert err.getvalue().startswith(  # cut at the terminal's width (100 columns without one)
        "\r[########................]  33% 1 B of 3 B, 0.5 B/s, ETA 4s; scanned 2 of 3, healed 1"
    )
    display.clear()
    assert err.getvalue().endswith("\r")
    last = await admin_cli.heal(cluster.gateway.address, "bar", dry_run=False, out=out, err=err)
    assert (last.done, last.scanned, last.healthy) == (True, 3, 3)
    assert (last.bytes_scanned, last.bytes_healed) == (3, 0)
