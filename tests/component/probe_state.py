"""What the probes must leave unchanged: a digest of the cluster's state, taken before and after.

`snapshot(world)` maps a name to a SHA-256 for:

- every object of every object bucket (every tenant's), read back as the operator (mutual TLS
  on the gateway's service port), with its headers (`obj:<bucket>/<key>`); every multipart
  upload in progress with its parts (`upload:...`);
- every object of A's S3 KV bucket, read over S3 (HTTPS) by the admin user (`s3kv:...`);
- every KV block of tenant A, read by the admin user acting for A explicitly (`kv:<ns>/<key>`);
- every KV block of every tenant but B, from the kvcache node's index in this process (bytes,
  pin end, TTL end, durability), every tenant's quota but B's, and every namespace TTL but B's
  (`store:...`). Tenant B is left out because B's own probes legitimately write B's own
  namespace (`naming nothing` puts: test_probe's point is that they land there);
- every file on every drive of every datanode, by path (`drive:<path>`): shard bytes, metadata,
  multipart parts, staging; the SQLite listing index by its rows (its -wal and -shm side files
  change on mere reads and checkpoints);
- every key and value in etcd under the cluster's prefix (`etcd:<key>`), read directly with the
  operator's certificate, but tenant B's own KV settings (`kv-settings/*/<B>`: B may set its
  own namespaces' TTLs, as it may write its own blocks). Nothing else is excluded: node
  registrations are written once at start and
  kept alive by lease keepalives, which change no value; the cluster map (and its epoch) is only
  rewritten when membership or drives change, which no probe does; buckets, users and the
  deployment id change only through the RPCs the probes try. `etcd_is_stable` checks this
  assumption on the idle cluster before the first snapshot, so a background writer added later
  shows up as a failure of its own rather than as a probe that changed something.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from kvtier import membership
from kvtier.clients import metadata as metadata_client
from kvtier.kv import AsyncKVClient
from kvtier.objects import AsyncObjectClient
from kvtier.proto.metadata.v1 import metadata_pb2
from services.datanode import index as index_mod
from services.kvcache import blocks as blocks_mod
from tests import pki as test_pki
from tests.component import probe_cluster

Snapshot = dict[str, str]


def _sha(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


async def snapshot(world: probe_cluster.World) -> Snapshot:
    """The digest of everything listed in the module docstring."""
    parts = await asyncio.gather(
        _objects(world.cluster),
        _s3_kv(world),
        _kv_blocks(world),
        asyncio.to_thread(_drives, world.cluster.drive_dirs(), _indexes(world.cluster)),
        etcd_contents(world.cluster.store, skip_tenant=world.b.tenant),
    )
    out: Snapshot = {}
    for part in parts:
        out.update(part)
    out.update(_store(world))
    return out


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs between two snapshots, one line per name."""
    lines = [f"gone: {name}" for name in sorted(before.keys() - after.keys())]
    lines += [f"new: {name}" for name in sorted(after.keys() - before.keys())]
    lines += [
        f"changed: {name}"
        for name in sorted(before.keys() & after.keys())
        if before[name] != after[name]
    ]
    return lines


async def etcd_contents(store: membership.EtcdMembership, skip_tenant: str = "") -> Snapshot:
    """Every key and value under the cluster's prefix (see the module docstring), but the KV
    settings of skip_tenant (tenant B's own namespace TTLs: its probes may set them)."""
    prefix = store.prefix.encode()
    found = await store.call(lambda client: client.get_prefix(prefix))
    own = [
        f"{store.prefix}/kv-settings/{kind}/{skip_tenant}".encode()
        for kind in ("quota", "ttl", "policy")
    ]
    out: Snapshot = {}
    for item in found:
        key = bytes(item.key)
        if skip_tenant and any(key == o or key.startswith(o + b"/") for o in own):
            continue
        out[f"etcd:{key.decode(errors='replace')}"] = _sha(key, bytes(item.value))
    assert out, "nothing in etcd under the prefix"
    return out


async def etcd_is_stable(store: membership.EtcdMembership, wait_s: float) -> list[str]:
    """Keys whose values change on an idle cluster within wait_s (none expected)."""
    first = await etcd_contents(store)
    await asyncio.sleep(wait_s)
    return diff(first, await etcd_contents(store))


async def _objects(cluster: probe_cluster.Cluster) -> Snapshot:
    out: Snapshot = {}
    async with metadata_client.MetadataClient(cluster.metadata.address) as operator:
        infos = await operator.list_buckets()
    async with AsyncObjectClient(
        cluster.gateway.address, security=test_pki.session().client(), transports=["tcp"]
    ) as client:
        for info in infos:
            if info.kind != metadata_pb2.BUCKET_KIND_OBJECTS:
                continue
            async for obj in client.iter_objects(info.name):
                if isinstance(obj, str):
                    continue  # a common prefix (none without a delimiter)
                data = await client.get_object(info.name, obj.key)
                head = await client.head_object(info.name, obj.key)
                out[f"obj:{info.name}/{obj.key}"] = _sha(data, head.SerializeToString())
            for upload in await client.list_multipart_uploads(info.name):
                parts = await client.list_parts(info.name, upload.key, upload.upload_id)
                out[f"upload:{info.name}/{upload.key}/{upload.upload_id}"] = _sha(
                    *(p.SerializeToString() for p in parts)
                )
            out[f"bucket:{info.name}"] = _sha(info.SerializeToString())
    return out


async def _s3_kv(world: probe_cluster.World) -> Snapshot:
    out: Snapshot = {}
    async with aiohttp.ClientSession() as http:
        for key in world.kv_bucket_objects:
            url = f"{world.cluster.s3_url}/{world.kv_bucket}/{key}"
            prepared = probe_cluster.sign(world.admin, "GET", url)
            async with http.get(
                url, headers=dict(prepared.headers), ssl=probe_cluster.tls_context()
            ) as response:
                body = await response.read()
                out[f"s3kv:{world.kv_bucket}/{key}"] = _sha(str(response.status), body)
    return out


async def _kv_blocks(world: probe_cluster.World) -> Snapshot:
    keys = list(world.blocks)
    async with await AsyncKVClient.connect(
        namespace=world.namespace,
        tenant=world.a.tenant,
        metadata=world.cluster.metadata.info.client_address,
        security=world.admin.security,
        transports=["tcp"],
    ) as client:
        buffers = [bytearray(len(world.blocks[k]) + 64) for k in keys]
        sizes = await client.get_batch(keys, buffers)
    return {
        f"kv:{world.namespace}/{key.decode()}": _sha(bytes(buf[: size or 0]), str(size))
        for key, buf, size in zip(keys, buffers, sizes, strict=True)
    }


def block_service_of(cluster: probe_cluster.Cluster) -> blocks_mod.BlockService:
    """The kvcache node's block API (this process runs the node)."""
    node: Any = getattr(cluster.kvcache.spec.loops[0], "__self__", None)
    found = getattr(node, "blocks", None)
    assert isinstance(found, blocks_mod.BlockService), "the kvcache node has no block service"
    return found


def _store(world: probe_cluster.World) -> Snapshot:
    service = block_service_of(world.cluster)
    store, arena = service.store, service._arena.view
    skip = world.b.tenant
    out: Snapshot = {}
    # gRPC puts awaiting CommitPuts and reads awaiting ReleaseReads (with their grants).
    grpc_grants: tuple[tuple[str, dict[int, Any]], ...] = (
        ("put", service._puts),
        ("read", service._reads),
    )
    for kind, pending in grpc_grants:
        for ident, ticket in list(pending.items()):
            if ticket.tenant != skip:
                grant = service._grant_ids.get(ident)
                out[f"store-{kind}:{ident}"] = _sha(repr((ticket, grant)))
    for (tenant, namespace, key), block in list(store._index.items()):
        if tenant == skip:
            continue
        extent = block.extent
        data = bytes(arena[extent.offset : extent.offset + extent.requested])
        out[f"store:{tenant}/{namespace}/{key!r}"] = _sha(
            data,
            repr((block.pinned_until_s, block.expires_at_s, block.ttl_s, block.durable)),
        )
    for tenant, state in store._tenants.items():
        if tenant != skip:
            out[f"store-quota:{tenant}"] = _sha(repr(state.quota_bytes))
    for (tenant, namespace), ttl in store._namespace_ttl.items():
        if tenant != skip:
            out[f"store-ttl:{tenant}/{namespace}"] = _sha(repr(ttl))
    return out


def _indexes(cluster: probe_cluster.Cluster) -> list[index_mod.ShardIndex]:
    """The listing index of every drive of the datanodes (this process runs them)."""
    found: list[index_mod.ShardIndex] = []
    for running in cluster.datanodes:
        node: Any = getattr(running.spec.loops[0], "__self__", None)
        stores = getattr(node, "stores", None)
        assert isinstance(stores, dict), "a datanode has no shard stores"
        found.extend(store._index for store in stores.values())
    return found


def _drives(roots: list[Path], indexes: list[index_mod.ShardIndex]) -> Snapshot:
    # Journaled small writes index their entries later (services/datanode/index.py, put_later):
    # written now, so that the rows hashed are the index's whole content, not how much of it
    # waited in memory when the snapshot was taken.
    for index in indexes:
        index.flush()
    out: Snapshot = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.name.endswith(_SQLITE_SIDE_FILES):
                continue
            name = f"drive:{path.relative_to(root.parent.parent)}"
            if path.suffix == ".sqlite":
                out[name] = _sha(*_sqlite_rows(path))
            else:
                out[name] = _sha(path.read_bytes())
    return out


#: A drive's listing index is SQLite in WAL mode: its -wal and -shm files change on reads and
#: checkpoints without any change of content, so the index is hashed by its rows instead.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def _sqlite_rows(path: Path) -> list[str]:
    """Every row of every table of a SQLite database, sorted (read-only, beside its writer)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sorted(
            f"{table}:{row!r}" for table in tables for row in db.execute(f'SELECT * FROM "{table}"')
        )
    finally:
        db.close()
