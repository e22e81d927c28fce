"""The rest of the gateway's paths with a silent datanode (issue 16, the tcp partition of one
datanode): listings (LIST, ListObjectVersions, multipart Complete's and Abort's scan of the
parts), deletes (DELETE, the parts' clean-up), a staged write's abort, tag and ACL changes, a
DeleteBucket's aborts, the undo of a failed commit, and a GET whose shard reads hang on a node
that answered its metadata read. Each is decided without the silent node
after one straggler grace (none once it is suspect), not after the 30 s deadline of its calls;
a deleted object stays deleted once the node answers again and the heal ran.

The silence is played as in test_silent_datanode: on the gateway's side, its data-plane calls
(`Silence`) and its gRPC shard calls (`GrpcSilence`) to that node get no reply until the test
ends them. Every operation runs under asyncio.wait_for(OP_TIMEOUT_S): before the change each
of them waited for the silent node (here: until the test's timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from kvtier import errors, objects, principal
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.datanode import shards
from services.gateway import (
    commits,
    datanodes,
    deleteretry,
    fanout,
    healing,
    objectlayer,
    placement,
    versioned,
)
from tests.component import objects_cluster
from tests.component import test_skew_undo as skew
from tests.component.test_silent_datanode import Silence, _key_drives, _nodes, one_pool

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
GRACE_S = 1.0
#: Well under the data plane's and gRPC's 30 s deadline, above one grace on a busy machine.
OP_TIMEOUT_S = 8.0

drives_full = skew.drives_full
__all__ = ["drives_full", "one_pool"]


class GrpcSilence:
    """gRPC shard calls (ListShards, DeleteShard, AbortWrite, commits, ...) to one datanode
    get no reply until `end()` (then DeadlineExceeded, as gRPC's deadline would)."""

    def __init__(self, nodes: datanodes.Datanodes, node_id: str) -> None:
        self.real = nodes.shards
        self.node_id = node_id
        self.ended = asyncio.Event()
        #: Calls it swallowed, by method name.
        self.calls: list[str] = []

    def shards(self, node_id: str) -> Any:
        client = self.real(node_id)
        return _Hanging(self, client) if node_id == self.node_id else client

    def end(self) -> None:
        self.ended.set()


class _Hanging:
    def __init__(self, outer: GrpcSilence, client: Any) -> None:
        self._outer, self._client = outer, client

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(real):
            return real

        async def hang(*args: Any, **kwargs: Any) -> Any:
            outer = self._outer
            if outer.ended.is_set():
                return await real(*args, **kwargs)
            outer.calls.append(name)
            await outer.ended.wait()
            raise errors.DeadlineExceeded("gRPC call took over 30 s (test)")

        return hang


async def _quick(coro: Any) -> Any:
    """coro's result; TimeoutError when it waited for the silent node."""
    return await asyncio.wait_for(coro, OP_TIMEOUT_S)


async def _listed(client: objects.AsyncObjectClient, bucket: str) -> list[str]:
    page = await _quick(client.list_objects(bucket))
    return [o.key for o in page.objects]


async def test_listings_deletes_and_aborts_leave_a_silent_datanode_behind(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One datanode (2 of the 12 drives) goes silent on both planes. LIST, ListObjectVersions,
    DELETE, CompleteMultipartUpload (its parts' scan and clean-up), AbortMultipartUpload and
    a staged write's abort each finish well within OP_TIMEOUT_S, with the right answers. Once
    the node answers again (its drives still hold the deleted object and the parts) and the
    heal ran, the deleted object is neither listed nor readable."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)
    monkeypatch.setattr(deleteretry, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(deleteretry, "RETRY_MAX_S", 0.1)
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    blobs = {f"k{n}": objects_cluster.data(n, 4 * KIB) for n in range(4)}
    blobs["big"] = objects_cluster.data(9, 5 * MIB + 5)  # staged (over 512 KiB shards)
    parts = [objects_cluster.data(20, 5 * MIB), objects_cluster.data(21, MIB + 7)]
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("quiet")
        for key, blob in blobs.items():
            await client.put_object("quiet", key, blob)
        done_id = await client.create_multipart_upload("quiet", "mp")
        done_parts = [
            await client.upload_part("quiet", "mp", done_id, n, blob)
            for n, blob in enumerate(parts, 1)
        ]
        dropped_id = await client.create_multipart_upload("quiet", "dropped")
        await client.upload_part("quiet", "dropped", dropped_id, 1, parts[1])
        stored = one_pool.stored("quiet")
        node_id = placement.locate(engine.view.current, stored, "k0").slots[0].node_id
        plane = Silence(nodes, node_id)
        grpc = GrpcSilence(nodes, node_id)
        monkeypatch.setattr(nodes, "call", plane.call)
        monkeypatch.setattr(nodes, "shards", grpc.shards)

        assert await _listed(client, "quiet") == sorted(blobs)  # the grace, once
        assert nodes.suspects.suspect(node_id)
        # Suspect: no grace any more (a grace past the timeout would show).
        monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 30.0)
        page = await _quick(one_pool.front.version_lister.list_versions(stored))
        assert sorted(v.key for v in page.versions) == sorted(blobs)
        await _quick(client.delete_object("quiet", "k1"))
        assert await _listed(client, "quiet") == sorted(set(blobs) - {"k1"})
        # k2 deleted, then written again (Y2) while the node is silent: its drives keep X2.
        cut = {s.drive_id for s in placement.locate(engine.view.current, stored, "k1").slots
               if s.node_id == node_id}  # fmt: skip
        old_k2 = _key_drives(one_pool, "quiet", "k2")
        await _quick(client.delete_object("quiet", "k2"))
        blobs["k2"] = objects_cluster.data(77, 5 * KIB)
        await _quick(client.put_object("quiet", "k2", blobs["k2"]))
        new_k2 = {d: i for d, i in _key_drives(one_pool, "quiet", "k2").items() if d not in cut}
        assert len(new_k2) == 10
        assert not set(new_k2.values()) & set(old_k2.values())
        with pytest.raises(errors.NotFound):
            await _quick(client.get_object("quiet", "k1"))
        await _quick(client.complete_multipart_upload("quiet", "mp", done_id, done_parts))
        assert await _quick(client.get_object("quiet", "mp")) == b"".join(parts)
        await _quick(client.abort_multipart_upload("quiet", "dropped", dropped_id))
        assert await _quick(client.list_multipart_uploads("quiet")) == []
        # A staged write's abort (a copy into a write, then AbortPut).
        found = await engine.resolve(stored, "big")
        begun = engine.begin_write(
            pb.BeginPutRequest(bucket=stored, key="aborted", size=len(blobs["big"])), found.where
        )
        await _quick(engine.fill(begun.upload_id, found, 0, len(blobs["big"])))
        await _quick(engine.abort_put(pb.AbortPutRequest(upload_id=begun.upload_id)))
        assert "abort_write" in grpc.calls
        assert {"list_shards", "delete_shard"} <= set(grpc.calls)
        assert await _listed(client, "quiet") == sorted({*blobs, "mp"} - {"k1"})

        assert set(_key_drives(one_pool, "quiet", "k1")) == cut  # the delete missed them
        assert {d: i for d, i in _key_drives(one_pool, "quiet", "k2").items() if d in cut} == {
            d: old_k2[d] for d in cut
        }
        plane.end()
        grpc.end()  # the partition heals: the node's drives still hold k1 (and X2) ...
        for key in blobs:
            result = await one_pool.healer.heal_object(stored, key)
            assert result.outcome is not healing.Outcome.UNRECOVERABLE, key
        assert (await one_pool.healer.heal_object(stored, "k1")).outcome is healing.Outcome.GONE
        assert await _listed(client, "quiet") == sorted({*blobs, "mp"} - {"k1"})
        page = await _quick(one_pool.front.version_lister.list_versions(stored))
        assert "k1" not in {v.key for v in page.versions}
        with pytest.raises(errors.NotFound):
            await client.get_object("quiet", "k1")
        for key, blob in blobs.items():
            if key != "k1":
                assert await client.get_object("quiet", key) == blob, key
        # ... until the deletes that missed them are finished there (deleteretry): k1's copy
        # is gone, k2's Y2 untouched on every drive holding it (the heal may have given the
        # node's drives Y2 before the retry looked: kept).
        await asyncio.wait_for(nodes.background_idle(), OP_TIMEOUT_S)
        assert _key_drives(one_pool, "quiet", "k1") == {}
        k2 = _key_drives(one_pool, "quiet", "k2")
        assert set(new_k2.items()) <= set(k2.items())
        assert set(k2.values()) == set(new_k2.values())
        assert await client.get_object("quiet", "k2") == blobs["k2"]


async def test_a_get_whose_shard_reads_hang_rebuilds_from_parity(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A datanode answers a GET's metadata read, then its shard reads hang: once the other
    blocks arrived and the grace passed, its blocks are rebuilt from parity (the object
    queued for healing); the next GETs wait no grace, while the node still answers metadata
    reads and its probe (its shard reads stay suspect: services.gateway.suspects, `reads`)."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    blob = objects_cluster.data(30, 16 * MIB + 3)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("reads")
        await client.put_object("reads", "big", blob)
        stored = one_pool.stored("reads")
        where = placement.locate(engine.view.current, stored, "big")
        node_id = where.slots[0].node_id  # shard 0: a data shard of every stripe
        plane = Silence(nodes, node_id)
        real = plane.call

        async def reads_hang(node: str, method: int, *args: Any, **kwargs: Any) -> Any:
            if method == shards_pb2.SHARD_CALL_METHOD_READ_SHARD:
                return await real(node, method, *args, **kwargs)
            return await plane.real(node, method, *args, **kwargs)

        monkeypatch.setattr(nodes, "call", reads_hang)
        assert await _quick(client.get_object("reads", "big")) == blob
        assert plane.calls
        assert plane.cancelled == len(plane.calls)
        assert nodes.suspects.suspect(node_id, reads=True)
        assert (stored, "big") in dict(engine.heal_queue.items())
        # It answers metadata reads (and its probe), its shard reads still hang: the next GETs
        # give them no grace either (before, each GET's metadata read cleared the suspicion).
        monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 30.0)  # past the timeout: none taken
        for _ in range(2):
            assert await _quick(client.get_object("reads", "big")) == blob
        assert nodes.suspects.suspect(node_id, reads=True)
        assert not nodes.suspects.suspect(node_id)  # its other calls answer
        plane.end()  # (a node silent to every call: test_silent_datanode)


async def test_a_version_deleted_past_a_silent_datanode_stays_deleted(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A versioned key's current version v2 is deleted (by its version id) while a datanode is
    silent: quick, and LIST shows v1 as current. The node answers again with v2 still current
    on its 2 drives (the heal leaves a drive ahead alone): LIST and ListObjectVersions still
    show v1 and no v2, and a GET reads v1. Before, LIST took the newest entry of any drive.
    Then the gateway finishes the delete there: v1 is current on every drive."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)
    monkeypatch.setattr(deleteretry, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(deleteretry, "RETRY_MAX_S", 0.1)
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    v1, v2 = objects_cluster.data(40, 3 * KIB), objects_cluster.data(41, 5 * KIB)
    bound = principal.bind(principal.INSECURE)
    try:
        async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
            await client.create_bucket("kept")
            enabled = metadata_pb2.BucketVersioning(status=metadata_pb2.VERSIONING_STATUS_ENABLED)
            await one_pool.front.set_bucket_config(
                "kept", metadata_pb2.SetBucketConfigRequest(versioning=enabled)
            )
            first = await client.put_object("kept", "v", v1)
            second = await client.put_object("kept", "v", v2)
            stored = one_pool.stored("kept")
            node_id = placement.locate(engine.view.current, stored, "v").slots[0].node_id
            plane, grpc = Silence(nodes, node_id), GrpcSilence(nodes, node_id)
            monkeypatch.setattr(nodes, "call", plane.call)
            monkeypatch.setattr(nodes, "shards", grpc.shards)
            await _quick(versioned.delete_version(engine, stored, "v", second.version_id))
            page = await _quick(client.list_objects("kept"))
            assert [(o.key, o.etag) for o in page.objects] == [("v", first.etag)]
            plane.end()
            grpc.end()
            assert (await one_pool.healer.heal_object(stored, "v")).outcome in (
                healing.Outcome.HEALTHY, healing.Outcome.SKIPPED,
            )  # fmt: skip
            page = await client.list_objects("kept")
            assert [(o.key, o.etag) for o in page.objects] == [("v", first.etag)]
            listed = await one_pool.front.version_lister.list_versions(stored)
            assert [v.version_id for v in listed.versions] == [first.version_id]
            assert await client.get_object("kept", "v") == v1
            # The delete is finished on the node's drives (deleteretry): v1 current there too.
            await asyncio.wait_for(nodes.background_idle(), OP_TIMEOUT_S)
            assert set(_key_drives(one_pool, "kept", "v").values()) == {first.version_id}
    finally:
        principal.unbind(bound)


_READER = acl_pb2.Acl(
    grants=[
        acl_pb2.AclGrant(
            grantee_type=acl_pb2.GRANTEE_TYPE_ALL_USERS, permission=acl_pb2.ACL_PERMISSION_READ
        )
    ]
)


def _drive_metas(cluster: Cluster, bucket: str, key: str) -> dict[str, datanode_pb2.ShardMeta]:
    """drive id -> the meta of the current version of bucket/key (a storage name) on each
    drive holding one."""
    found = {}
    for drive in cluster.drive_paths():
        for path in drive.glob(f"objects/{bucket}/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            if meta.key == key:
                found[cluster.drive_id(drive)] = meta
    return found


def _upload_drives(cluster: Cluster, upload_id: str) -> set[str]:
    """The drives still holding the record or a part of a multipart upload."""
    return {
        cluster.drive_id(drive)
        for drive in cluster.drive_paths()
        for path in drive.glob("objects/*/*/*/meta")
        if upload_id in shards.decode_meta(path.read_bytes(), str(path)).key
    }


async def test_tags_acl_bucket_aborts_and_undos_leave_a_silent_datanode_behind(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch,
    drives_full: Callable[[set[int]], None],
) -> None:  # fmt: skip
    """One datanode (2 of the 12 drives) goes silent on both planes. PutObjectTagging,
    PutObjectAcl, DeleteObjectTagging and a DeleteBucket that aborts an upload in progress each
    finish well within OP_TIMEOUT_S (decided on the write quorum), the tags and ACL read as
    written. Then the node answers data-plane calls again but not gRPC: a small PUT that misses
    the write quorum (5 other drives full) fails at once, its undo leaving that node behind
    after the grace (a retry in the background gets there later); silent on both planes again,
    a small PUT that misses the quorum without it fails at once too. Once the node answers again
    and the heal ran, its drives hold the new tags and ACL. Before, each waited for the silent
    node's calls (here: until the test's timeout)."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)
    monkeypatch.setattr(commits, "UNDO_RETRY_FIRST_S", 0.05)
    engine, nodes = one_pool.engine, _nodes(one_pool)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    layer = objectlayer.ErasureLayer(one_pool.front)
    blobs = {key: objects_cluster.data(n, 4 * KIB) for n, key in enumerate(("t", "d", "u"))}
    tags = {"team": "infra", "tier": "hot"}
    bound = principal.bind(principal.INSECURE)
    try:
        async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
            await client.create_bucket("meta")
            await client.create_bucket("gone")
            for key, blob in blobs.items():
                await client.put_object("meta", key, blob)
            await layer.set_tags("meta", "d", {"old": "1"})
            upload_id = await client.create_multipart_upload("gone", "mp")
            await client.upload_part("gone", "mp", upload_id, 1, blobs["t"])
            stored = one_pool.stored("meta")
            where = placement.locate(engine.view.current, stored, "t")
            node_id = where.slots[0].node_id
            cut = {s.drive_id for s in where.slots if s.node_id == node_id}
            plane, grpc = Silence(nodes, node_id), GrpcSilence(nodes, node_id)
            monkeypatch.setattr(nodes, "call", plane.call)
            monkeypatch.setattr(nodes, "shards", grpc.shards)

            await _quick(layer.set_tags("meta", "t", tags))  # PutObjectTagging: the grace, once
            assert nodes.suspects.suspect(node_id)
            monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 30.0)  # suspect: no grace
            await _quick(one_pool.front.set_object_acl("meta", "t", _READER))  # PutObjectAcl
            await _quick(layer.set_tags("meta", "d", {}))  # DeleteObjectTagging
            assert grpc.calls.count("update_meta") == 3 * len(cut)  # per drive
            head = await _quick(layer.head("meta", "t"))
            assert dict(head.headers.tags) == tags
            assert (await _quick(engine.resolve(stored, "t"))).meta.acl == _READER
            assert not (await _quick(layer.head("meta", "d"))).headers.tags
            assert {(stored, "t"), (stored, "d")} <= set(dict(engine.heal_queue.items()))
            await _quick(client.delete_bucket("gone"))  # aborts "mp" (front._abort_uploads)
            assert _upload_drives(one_pool, upload_id) <= cut

            # The node answers the data plane again (a small PUT's commit), not gRPC (the undo).
            monkeypatch.setattr(nodes, "call", plane.real)
            monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", GRACE_S)  # it is heard: the grace
            where_u = placement.locate(engine.view.current, stored, "u")
            assert {s.drive_id for s in where_u.slots if s.node_id == node_id} == cut
            acked = {m.data_id for m in _drive_metas(one_pool, stored, "u").values()}
            assert len(acked) == 1
            others = [i for i, s in enumerate(where_u.slots) if s.node_id != node_id]
            drives_full(set(others[:5]))  # 7 of 12 take it: below the write quorum (8)
            with pytest.raises(errors.StorageFull):
                await _quick(client.put_object("meta", "u", objects_cluster.data(50, 4 * KIB)))
            drives_full(set())
            assert "delete_shard" in grpc.calls
            held = {d: m.data_id for d, m in _drive_metas(one_pool, stored, "u").items()}
            assert {held[d] for d in held if d not in cut} == acked  # undone there
            assert {held[d] for d in cut}.isdisjoint(acked)  # the undo is still to get there
            assert await _quick(client.get_object("meta", "u")) == blobs["u"]
            assert (stored, "u") in dict(engine.heal_queue.items())
            # Silent on both planes again (not suspect: the GET heard it): a small PUT that
            # cannot reach the write quorum even with its drives fails after the grace, not at
            # its calls' deadline (fanout.until_decided's lacking), and the undo restores "u".
            monkeypatch.setattr(nodes, "call", plane.call)
            drives_full(set(others[:5]))  # 5 + its 2 drives: below the write quorum (8)
            with pytest.raises(errors.StorageFull):
                await _quick(client.put_object("meta", "u", objects_cluster.data(51, 4 * KIB)))
            drives_full(set())
            held = {d: m.data_id for d, m in _drive_metas(one_pool, stored, "u").items()}
            assert {held[d] for d in held if d not in cut} == acked

            plane.end()
            grpc.end()  # the partition heals: its drives lack the changes and keep "u"'s
            metas = _drive_metas(one_pool, stored, "t")
            assert all(dict(metas[d].tags) == {} for d in cut)
            for _ in range(100):  # the undo's retry in the background gets there
                if {m.data_id for m in _drive_metas(one_pool, stored, "u").values()} == acked:
                    break
                await asyncio.sleep(0.05)
            for key in blobs:
                result = await one_pool.healer.heal_object(stored, key)
                assert result.outcome is not healing.Outcome.UNRECOVERABLE, key
            for drive, meta in _drive_metas(one_pool, stored, "t").items():
                assert (dict(meta.tags), meta.acl) == (tags, _READER), drive
            assert all(not m.tags for m in _drive_metas(one_pool, stored, "d").values())
            assert {m.data_id for m in _drive_metas(one_pool, stored, "u").values()} == acked
            for key, blob in blobs.items():
                assert await client.get_object("meta", key) == blob, key
    finally:
        principal.unbind(bound)
