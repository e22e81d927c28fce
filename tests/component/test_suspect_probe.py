"""A suspect datanode is probed until it answers (issue 16): a node that went silent and came
back is cleared within about a second with no client traffic (before, it stayed suspect until
some GET, listing or commit happened to reach it: large PUTs meanwhile left its drives out);
one still silent is probed at the interval and stays suspect; closing the gateway's datanodes
ends every probe.

The silence is played as in test_silent_datanode (`Silence`, on the gateway's side of the data
plane), which the probe goes through like every data-plane call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kvtier import errors, objects
from services.gateway import datanodes, fanout, placement, suspects
from tests.component import objects_cluster
from tests.component.test_silent_datanode import Silence, _nodes, one_pool

Cluster = objects_cluster.Cluster
MIB = objects_cluster.MIB
__all__ = ["one_pool"]


def _probe_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("probe of") and not t.done()]


async def _suspect_after_put(
    monkeypatch: pytest.MonkeyPatch,
    cluster: Cluster,
    nodes: datanodes.Datanodes,
    client: objects.AsyncObjectClient,
    key: str,
) -> tuple[str, Silence]:
    """Silence a node of key's set and PUT key (small): the node is left behind, suspect."""
    where = placement.locate(cluster.engine.view.current, cluster.stored("probe"), key)
    silence = Silence(nodes, where.slots[0].node_id)
    monkeypatch.setattr(nodes, "call", silence.call)
    await asyncio.wait_for(client.put_object("probe", key, objects_cluster.data(1, 4096)), 10)
    assert nodes.suspects.suspect(silence.node_id)
    return silence.node_id, silence


async def test_a_recovered_datanode_is_cleared_by_its_probe_without_traffic(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent: probed every interval (+ the probe's timeout), still suspect; answering again:
    cleared by the next probe, no client call made; its probe task ends. Suspect again and the
    datanodes closed: no probe task remains."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 0.3)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)  # no heal traffic either
    nodes = _nodes(one_pool)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("probe")
        await client.put_object("probe", "first", b"x")  # (the bucket's drives: on disk)
        node_id, silence = await _suspect_after_put(monkeypatch, one_pool, nodes, client, "k")
        assert nodes.suspects.probing() == [node_id]
        silent = suspects.PROBES.labels("silent")._value.get()
        answered = suspects.PROBES.labels("answered")._value.get()

        await asyncio.sleep(2.2)  # no traffic
        assert nodes.suspects.suspect(node_id)
        period = suspects.PROBE_INTERVAL_S + suspects.PROBE_TIMEOUT_S
        assert 2 <= len(silence.probes) <= 2.2 / suspects.PROBE_INTERVAL_S, silence.probes
        gaps = [b - a for a, b in zip(silence.probes, silence.probes[1:], strict=False)]
        assert all(period * 0.9 < gap < period + 1.0 for gap in gaps), gaps
        assert suspects.PROBES.labels("silent")._value.get() >= silent + 1

        silence.end()  # the partition heals; nobody calls the node
        started = time.monotonic()
        while nodes.suspects.suspect(node_id):
            assert time.monotonic() - started < 2.0, "still suspect without traffic"
            await asyncio.sleep(0.02)
        assert suspects.PROBES.labels("answered")._value.get() == answered + 1
        await asyncio.sleep(0)
        assert nodes.suspects.probing() == []
        assert _probe_tasks() == []

        node_id, _ = await _suspect_after_put(monkeypatch, one_pool, nodes, client, "k2")
        assert nodes.suspects.probing() == [node_id]
        await nodes.close()
        assert nodes.suspects.probing() == []
        assert _probe_tasks() == []


async def test_a_staged_write_that_lost_its_quorum_without_a_suspect_fails_at_once(
    one_pool: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node is suspect (silent) and three other drives of the set refuse their shards: the
    write quorum (8 of 12) needs the suspect's drives, so the staged PUT fails (Unavailable)
    without waiting for the silent node (before: until its calls' deadline, 30 s), and
    nothing of it is stored."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 0.3)
    monkeypatch.setattr(one_pool.healer, "_absorb", lambda: None)
    nodes = _nodes(one_pool)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("probe")
        await client.put_object("probe", "first", b"x")
        node_id, silence = await _suspect_after_put(monkeypatch, one_pool, nodes, client, "big")
        where = placement.locate(one_pool.engine.view.current, one_pool.stored("probe"), "big")
        full = [s.drive_id for s in where.slots if s.node_id != node_id][:3]
        silent = silence.call

        async def call(node: str, method: int, request: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(request, "drive_id", "") in full:
                raise errors.StorageFull(f"drive {request.drive_id} full (test)")
            return await silent(node, method, request, *args, **kwargs)

        monkeypatch.setattr(nodes, "call", call)
        started = time.monotonic()
        with pytest.raises(errors.Unavailable):  # 5 MiB: staged (shards over 512 KiB)
            await asyncio.wait_for(
                client.put_object("probe", "big", objects_cluster.data(2, 5 * MIB)), 8
            )
        assert time.monotonic() - started < 2.0
        assert await client.get_object("probe", "big") == objects_cluster.data(1, 4096)
        silence.end()
