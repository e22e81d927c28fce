"""`kvnodes.ChainProbe`: lookup's search for the leading run of a chain, over a real `NodeSet`
whose placement (rendezvous hashing over three node ids) decides who owns which key. Each node's
answer is computed from what that node holds, as the node's Lookup does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from kvtier import kvnodes
from kvtier import security as security_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb

CHAIN = [b"block-%d" % i for i in range(64)]


@contextlib.asynccontextmanager
async def _nodes(replicas: int) -> AsyncIterator[kvnodes.NodeSet]:
    """A NodeSet of three nodes (never dialled: nothing here opens a connection)."""
    nodes = kvnodes.NodeSet(
        namespace="m", tenant="t", metadata="", nodes=["127.0.0.1:1"], transports=["tcp"],
        replicas=replicas, timeout_s=1.0, refresh_s=60.0, client_id="test", settings=None,
        security=security_mod.ClientSecurity(insecure=True),
    )  # fmt: skip
    infos = [
        common_pb2.NodeInfo(node_id=f"n{i}", grpc_address=f"127.0.0.1:{i + 1}") for i in range(3)
    ]
    nodes._adopt(infos, 1)
    try:
        yield nodes
    finally:
        await nodes.close()


def _search(
    nodes: kvnodes.NodeSet, held: dict[str, set[bytes]], chain: Sequence[bytes]
) -> tuple[int, list[list[tuple[str, list[bytes]]]]]:
    """Run the probe; each node answers the leading count of its keys that it holds. Returns
    the run and, per round, what each node was asked."""
    probe = kvnodes.ChainProbe(chain, nodes.replicas)
    rounds = []
    while (plans := probe.next_plans(nodes)) is not None:
        asked = [(plan.node.node_id, probe.keys_of(plan)) for plan in plans]
        rounds.append(asked)
        counts: list[int | None] = []
        for node_id, keys in asked:
            count = next((i for i, k in enumerate(keys) if k not in held[node_id]), len(keys))
            counts.append(count)
        probe.answered(plans, counts)
    return probe.run, rounds


def _held(nodes: kvnodes.NodeSet, present: Sequence[bytes], rank: int = 0) -> dict[str, set[bytes]]:
    held: dict[str, set[bytes]] = {n: set() for n in nodes.node_ids}
    for key in present:
        held[nodes.owners(key)[rank]].add(key)
    return held


@pytest.mark.parametrize("missing", [None, 0, 1, 17, 63])
async def test_one_round_trip_each_node_asked_only_for_its_own_keys(missing: int | None) -> None:
    async with _nodes(replicas=1) as nodes:
        _one_round(nodes, missing)


def _one_round(nodes: kvnodes.NodeSet, missing: int | None) -> None:
    present = [k for i, k in enumerate(CHAIN) if i != missing]
    run, rounds = _search(nodes, _held(nodes, present), CHAIN)
    assert run == (len(CHAIN) if missing is None else missing)
    assert len(rounds) == 1
    asked = dict(rounds[0])
    assert len(asked) == 3  # the chain spans every node, each asked once
    for node_id, keys in asked.items():
        assert keys == [k for k in CHAIN if nodes.owners(k)[0] == node_id]


async def test_a_node_that_does_not_answer_ends_the_run_at_its_first_key() -> None:
    async with _nodes(replicas=1) as nodes:
        _silent_node(nodes)


def _silent_node(nodes: kvnodes.NodeSet) -> None:
    probe = kvnodes.ChainProbe(CHAIN, 1)
    plans = probe.next_plans(nodes)
    assert plans is not None
    silent = plans[1]
    counts = [None if p is silent else len(p.indices) for p in plans]
    probe.answered(plans, counts)
    assert probe.run == silent.indices[0]
    assert probe.next_plans(nodes) is None


async def test_keys_missing_on_their_primary_are_found_on_the_next_replica() -> None:
    async with _nodes(replicas=2) as nodes:
        _next_replica(nodes)


def _next_replica(nodes: kvnodes.NodeSet) -> None:
    held = _held(nodes, CHAIN)
    lost = CHAIN[10:14]  # the primary lost these; the second replica still has them
    for key in lost:
        held[nodes.owners(key)[0]].discard(key)
        held[nodes.owners(key)[1]].add(key)
    run, rounds = _search(nodes, held, CHAIN)
    assert run == len(CHAIN)
    # The second round starts where the primaries stopped and asks the second replicas.
    second = {k for _, keys in rounds[1] for k in keys}
    assert CHAIN[10] in second
    assert not second & set(CHAIN[:10])
    assert all(nodes.owners(k)[1] == n for n, keys in rounds[1] for k in keys)


async def test_a_chain_missing_everywhere_stops_after_every_rank_was_asked_once() -> None:
    async with _nodes(replicas=2) as nodes:
        run, rounds = _search(nodes, _held(nodes, CHAIN[:30]), CHAIN)
    assert run == 30
    assert len(rounds) == 2


async def test_an_empty_chain_asks_nobody() -> None:
    async with _nodes(replicas=1) as nodes:
        assert _search(nodes, {}, []) == (0, [])


async def test_probe_plans_are_plans_with_the_requests_protobuf_would_serialize() -> None:
    """`NodeSet.probe_plans` (Score's short path) packs the keys itself: the same plans as
    `plans(keys, 0)`, and each node's request byte for byte what protobuf serializes (keys
    whose length needs a one- and a two-byte varint included); refreshed after the node list
    changes; None for a key that is not bytes."""
    ns = pb.Namespace(tenant="t", name="m")
    head = pb.ScoreRequest(namespace=ns).SerializeToString()
    keys = [*CHAIN, b"x" * 127, b"y" * 128, b"z" * 300]
    async with _nodes(replicas=2) as nodes:
        for _ in range(2):  # the second time from the remembered fields
            planned = nodes.probe_plans(keys, head)
            assert planned is not None
            plans = nodes.plans(keys, 0)
            assert [(p.node, p.indices) for p, _ in planned] == [(p.node, p.indices) for p in plans]
            for (_, request), want in zip(planned, plans, strict=True):
                keys_of = [keys[i] for i in want.indices]
                assert request == pb.ScoreRequest(namespace=ns, keys=keys_of).SerializeToString()
        infos = [
            common_pb2.NodeInfo(node_id=f"n{i}", grpc_address=f"127.0.0.1:{i + 1}")
            for i in range(2)
        ]
        nodes._adopt(infos, 2)  # a node left: its keys have other owners now
        planned = nodes.probe_plans(keys, head)
        assert planned is not None
        assert {p.node.node_id for p, _ in planned} == {"n0", "n1"}
        assert [p.indices for p, _ in planned] == [p.indices for p in nodes.plans(keys, 0)]
        assert nodes.probe_plans([b"a", "b"], head) is None  # type: ignore[list-item]
