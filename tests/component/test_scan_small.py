"""The heal scanner on small objects (issue 14): a drive holding a small version keeps its shard
inline in the meta, whose checksum the drive checks to answer ReadMeta, so the probe asks it no
VerifyShard (half the RPCs of a scan of small objects); damage to that meta is still found and
healed. Versions kept in shard files are verified block by block as before."""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.clients import datanode as datanode_client
from services.datanode import shards
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB


def _meta_file(cluster: objects_cluster.Cluster, drive: Path, bucket: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    stored = cluster.stored(bucket)
    return drive / "objects" / stored / digest[:2] / digest / "meta"


def _healthy() -> float:
    labels = {"outcome": "healthy"}
    return (
        prometheus_client.REGISTRY.get_sample_value("kvtier_gateway_heal_objects_total", labels)
        or 0.0
    )


async def _until(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if done():
                return
            await asyncio.sleep(0.05)


async def test_small_versions_are_scanned_without_verify_shard_and_still_healed(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verified: collections.Counter[str] = collections.Counter()
    real_verify = datanode_client.ShardClient.verify_shard

    async def verify_shard(self: Any, drive_id: str, bucket: str, key: str, *more: Any) -> Any:
        verified[key] += 1  # the real RPC, counted by key
        return await real_verify(self, drive_id, bucket, key, *more)

    monkeypatch.setattr(datanode_client.ShardClient, "verify_shard", verify_shard)
    settings: dict[str, Any] = {"scan_interval_s": 0.1, "scan_objects_per_cycle": 10}
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, **settings
    ) as cluster:
        sizes = {"small": 4 * KIB, "multi-block": 300 * KIB, "empty": 0, "files": 3 * MIB}
        bodies = {key: objects_cluster.data(len(key), size) for key, size in sizes.items()}
        async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
            await client.create_bucket("scan")
            before = _healthy()
            for key, body in bodies.items():
                await client.put_object("scan", key, body)
            await _until(lambda: _healthy() >= before + 2 * len(sizes))  # all scanned twice
            assert set(verified) == {"files"}  # the only version kept in shard files
            # A flipped byte in one drive's inline shard: its meta's checksum fails, the probe
            # finds the drive stale, and the scanner rebuilds it.
            drive = cluster.drive_paths()[3]
            path = _meta_file(cluster, drive, "scan", "small")
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x5A
            path.write_bytes(bytes(raw))
            with pytest.raises(errors.Corrupt):
                shards.decode_meta(path.read_bytes(), str(path))
            async with asyncio.timeout(30):
                while True:
                    try:
                        healed = shards.decode_meta(path.read_bytes(), str(path))
                        break
                    except errors.Corrupt:
                        await asyncio.sleep(0.05)
            assert healed.key == "small"
            for key, body in bodies.items():
                assert await client.get_object("scan", key) == body
