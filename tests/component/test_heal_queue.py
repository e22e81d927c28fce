"""What a gateway's heal queue holds (`AdminService.ListHealQueue`, `kvtier admin heal queue`)
over the in-process object tier (metadata, 6 datanodes x 2 drives = EC 8+4, gateway).

Objects written while a datanode is down are committed on 10 of 12 drives and queued; their
heal waits for the node's drives. The listing names each with its user-facing bucket, key,
version, reason, age, tries, state and the drives it waits for; the CLI merges every gateway
of the map; once the node is back the objects are healed and leave the queue. Who may list a
queue (admins only): tests/unit/test_authz.py, tests/component/test_probe.py, and a tenant
user refused on a secure cluster in tests/integration/test_console.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kvtier import etcdserver, membership, objects
from kvtier.cli import healqueue as healqueue_cli
from kvtier.cli import main as cli_main
from kvtier.clients import gateway as gateway_client
from kvtier.proto.common.v1 import common_pb2
from tests.component import objects_cluster

Cluster = objects_cluster.Cluster


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main.main(["admin", "heal", "queue", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.timeout(90)
async def test_queue_lists_objects_waiting_for_drives_and_empties_when_they_return(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = {Cluster.drive_id(p) for p in cluster.drive_paths(5)}
    await cluster.stop_datanode(5)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: sum(len(n.drives) for n in m.nodes) == 10, timeout_s=15
    )
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("queued")
        for key in ("first", "second\nline"):  # a key with a newline: shown on one line
            await client.put_object("queued", key, objects_cluster.data(7, 3000))
            await asyncio.sleep(0.01)  # distinct ages: the listing is oldest first

    async def both_waiting() -> bool:
        tried = [
            cluster.healer.queued(cluster.stored("queued"), k) for k in ("first", "second\nline")
        ]
        return all(t is not None and t[0] > 0 and t[1] == down for t in tried)

    await _until(both_waiting)
    address = cluster.gateway.address
    async with gateway_client.AdminServiceClient(address) as admin:
        reply = await admin.list_heal_queue()
        one = await admin.list_heal_queue(limit=1)
    assert (reply.total, reply.waiting, reply.retrying, reply.healing, reply.more) == (
        2,
        2,
        0,
        0,
        0,
    )
    assert [(e.bucket, e.key) for e in reply.entries] == [
        ("queued", "first"),
        ("queued", "second\nline"),
    ]
    for entry in reply.entries:
        assert entry.version_id == "null"  # an unversioned bucket's object
        assert entry.reason == "write committed on 10 of 12 drives"
        assert (entry.state, sorted(entry.waiting_on)) == ("waiting", sorted(down))
        assert entry.attempts >= 1
        assert entry.last_error
        assert 0 < entry.age_s < 60
    assert reply.entries[0].age_s >= reply.entries[1].age_s
    assert ([e.key for e in one.entries], one.total, one.more) == (["first"], 2, 1)

    # The CLI: --gateway asks that one; without it, every gateway of the map (found through
    # the metadata node of --state-dir's cluster.json).
    code, out, _ = await asyncio.to_thread(_cli, capsys, "--gateway", address)
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == healqueue_cli.HEADER
    assert "queued/first  write committed on 10 of 12 drives; waiting for " in lines[1]
    assert "queued/second\\nline  " in lines[2]
    assert lines[-1] == "queued 2 on 1 gateway (waiting 2, retrying 0, healing 0); 2 shown, 0 more"
    assert cluster.store is not None
    cmap = (await cluster.store.get_map()).map
    (meta,) = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_METADATA]
    (gateway,) = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_GATEWAY]
    state = tmp_path / "state"
    state.mkdir()
    (state / "cluster.json").write_text(json.dumps({"metadata": meta.grpc_address}))
    code, out, _ = await asyncio.to_thread(
        _cli, capsys, "--state-dir", str(state), "--json", "--limit", "1"
    )
    shown = json.loads(out)
    assert code == 0
    assert (shown["total"], shown["shown"], shown["more"], shown["failed"]) == (2, 1, 1, {})
    assert shown["gateways"][gateway.node_id]["waiting"] == 2
    (entry,) = shown["entries"]
    assert (entry["gateway"], entry["bucket"], entry["key"]) == (gateway.node_id, "queued", "first")
    assert (entry["state"], entry["version_id"]) == ("waiting", "null")
    code, _, err = await asyncio.to_thread(_cli, capsys, "--gateway", address, "--limit", "0")
    assert (code, err.strip()) == (2, "kvtier admin: error: --limit 0: give at least 1")

    # The drives return: both are healed and leave the queue.
    await cluster.start_datanode(5)

    async def emptied() -> bool:
        return cluster.healer.queue_length == 0

    await _until(emptied)
    async with gateway_client.AdminServiceClient(address) as admin:
        reply = await admin.list_heal_queue()
    assert (reply.total, list(reply.entries)) == (0, [])
    code, out, _ = await asyncio.to_thread(_cli, capsys, "--gateway", address)
    assert (code, out.splitlines()[-1]) == (
        0, "queued 0 on 1 gateway (waiting 0, retrying 0, healing 0); 0 shown, 0 more"
    )  # fmt: skip
