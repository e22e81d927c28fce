"""KV events and Score (issue 18): a kvcache node in this process publishes vLLM-format KV
events, decoded here with vLLM 0.33's own classes (`vllm.distributed.kv_events`, installed
`--no-deps` under .engines/ for the plugin tests); routers score chains per tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import prometheus_client
import pytest
import zmq
import zmq.asyncio

import kvtier
from kvtier import errors, etcdserver, kv, kv_events, kv_routing, membership
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import events, servicer
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness, tenants

#: Importing vLLM takes tens of seconds on a busy machine (once per session).
pytestmark = pytest.mark.timeout(240)
KIB, MIB = 1024, 1024 * 1024
BLOCK = 128 * KIB
NAMESPACE = "model-a"
#: 8 MiB arenas of 1 MiB pages: 64 blocks of 128 KiB fill it, eviction starts at 95 %.
SMALL = {"arena_bytes": 8 * MIB, "page_bytes": 1 * MIB}
ENGINE_DIR = Path(__file__).resolve().parents[2] / ".engines" / "vllm"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kv_router.py"


def _vllm_events() -> Any:
    if ENGINE_DIR.is_dir() and str(ENGINE_DIR) not in sys.path:
        sys.path.append(str(ENGINE_DIR))  # after ours: our packages win any overlap
    return pytest.importorskip(
        "vllm.distributed.kv_events", reason="vLLM 0.33 (scripts/bootstrap.sh test) not here"
    )


def _hash(key: bytes) -> bytes:
    """An engine-style block hash (vLLM's default: SHA-256 bytes)."""
    return hashlib.sha256(b"engine:" + key).digest()


@contextlib.asynccontextmanager
async def _node(
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[harness.Running]:
    async with harness.run(
        kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=prefix, data_dir=str(tmp / "kv"),
        **{**SMALL, **settings},
    ) as node:  # fmt: skip
        yield node


def _inner(node: harness.Running) -> Any:
    """The node's `_Node` (its block API, its publisher)."""
    return node.spec.on_serve.__self__  # type: ignore[union-attr]


async def _client(node: harness.Running, **kwargs: Any) -> kv.AsyncKVClient:
    kwargs.setdefault("namespace", NAMESPACE)
    return await kv.AsyncKVClient.connect(nodes=[node.address], transports=["tcp"], **kwargs)


def endpoints(node: harness.Running) -> kv_routing.EventEndpoints:
    """node's events as the cluster map announces them to an operator."""
    info = node.info
    return kv_routing.EventEndpoints(
        info.node_id, info.kv_events_endpoint, info.kv_events_replay_endpoint,
        server_key=info.kv_events_server_key, address=node.address,
    )  # fmt: skip


class Subscriber:
    """A router's side: an authorized subscription (`kvtier.kv_events`, as the operator: SUB
    on the events, DEALERs on the replay socket, over CURVE), vLLM's decoder."""

    def __init__(self, subscription: kv_events.Subscription) -> None:
        self.subscription = subscription
        self.ctx = subscription.ctx
        self.sub = subscription.sub
        self.live: list[tuple[bytes, int, bytes]] = []

    @classmethod
    async def open(cls, node: harness.Running, **options: int) -> Subscriber:
        ctx = zmq.asyncio.Context()
        sockopts = {getattr(zmq, name): value for name, value in options.items()}
        return cls(await kv_events.subscribe(endpoints(node), ctx=ctx, options=sockopts))

    async def close(self) -> None:
        await self.subscription.close()
        self.ctx.term()

    async def receive(self, timeout_s: float = 0.2) -> bool:
        """Take what arrived within timeout_s; whether anything did."""
        got = False
        while await self.sub.poll(timeout_s * 1000):
            name, seq, payload = await self.sub.recv_multipart()
            self.live.append((name, int.from_bytes(seq, "big"), payload))
            got, timeout_s = True, 0.05
        return got

    async def replay(self, start_seq: int) -> list[tuple[bytes, int, bytes]]:
        """Everything buffered from start_seq on, as vLLM's replay protocol answers it."""
        dealer = await self.subscription.replay_socket()
        try:
            await dealer.send_multipart((b"", start_seq.to_bytes(8, "big")))
            out: list[tuple[bytes, int, bytes]] = []
            while True:
                assert await dealer.poll(5000), "no replay answer"
                empty, name, seq, payload = await dealer.recv_multipart()
                assert empty == b""
                if seq == events.END_SEQ:
                    assert (name, payload) == (b"", b"")
                    return out
                out.append((name, int.from_bytes(seq, "big"), payload))
        finally:
            dealer.close(linger=0)

    def decode(self, batches: Sequence[tuple[bytes, int, bytes]]) -> list[tuple[bytes, Any]]:
        """(topic, event) in order, decoded with vLLM's classes."""
        decoder = msgspec.msgpack.Decoder(type=_vllm_events().KVEventBatch)
        return [(name, e) for name, _, payload in batches for e in decoder.decode(payload).events]


def _index(decoded: Sequence[tuple[bytes, Any]], vllm: Any) -> dict[bytes, list[str]]:
    """Block hash -> the kinds of its events, in order (what a router's index replays)."""
    kinds: dict[bytes, list[str]] = {}
    for _, event in decoded:
        if isinstance(event, vllm.AllBlocksCleared):
            continue
        kind = "stored" if isinstance(event, vllm.BlockStored) else "removed"
        for block_hash in event.block_hashes:
            kinds.setdefault(block_hash, []).append(kind)
    return kinds


async def test_events_follow_puts_evictions_ttl_expiry_and_deletes_in_order_gap_free(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    vllm = _vllm_events()
    async with _node(
        etcd, etcd_prefix, store, tmp_path, kv_events=True, expire_interval_s=0.05
    ) as node:
        assert node.info.kv_events_endpoint.startswith("tcp://127.0.0.1:")
        assert node.info.kv_events_replay_endpoint.startswith("tcp://127.0.0.1:")
        sub = await Subscriber.open(node)
        client = await _client(node, tenant="team-a")
        try:
            # A chain with the engine's hashes, then a block without (named by its key).
            chain = [f"chain-{i}".encode() for i in range(4)]
            parents: list[bytes | None] = [None, *(_hash(k) for k in chain[:-1])]
            blocks = [np.full(BLOCK, i, np.uint8) for i in range(4)]
            stored = await client.put_batch(
                chain, blocks, engine_hashes=[_hash(k) for k in chain], parent_hashes=parents
            )
            assert stored == [kv.PutStatus.STORED] * 4
            await client.put_batch([b"plain"], [np.ones(BLOCK, np.uint8)])
            await client.put_batch([b"short-lived"], [np.ones(BLOCK, np.uint8)], ttl_s=0.2)
            assert await client.delete([chain[1]]) == 1
            for _ in range(200):  # the sweep expires it (no read needed)
                seen = _index(sub.decode(await sub.replay(0)), vllm).get(b"short-lived")
                if seen == ["stored", "removed"]:
                    break
                await asyncio.sleep(0.05)
            # Fill the arena twice over: capacity evictions.
            fill = [f"fill-{i}".encode() for i in range(128)]
            for start in range(0, len(fill), 16):
                await client.put_batch(fill[start : start + 16], [np.ones(BLOCK, np.uint8)] * 16)
            await sub.receive()
            everything = await sub.replay(0)
            keys = [*chain, b"plain", b"short-lived", *fill]
            held = dict(zip(keys, await client.exists_batch(keys), strict=True))
            dropped = _inner(node).events.dropped_batches
        finally:
            await client.close()
            await sub.close()
    # Gap-free from 0 (AllBlocksCleared at start), and what the live subscriber got is the
    # same bytes under the same sequence numbers.
    assert [seq for _, seq, _ in everything] == list(range(len(everything)))
    by_seq = {seq: (name, payload) for name, seq, payload in everything}
    assert sub.live, "the live subscriber got nothing"
    live_seqs = [seq for _, seq, _ in sub.live]
    assert live_seqs == list(range(live_seqs[0], live_seqs[0] + len(live_seqs)))
    assert all(by_seq[seq] == (name, payload) for name, seq, payload in sub.live)
    decoded = sub.decode(everything)
    assert isinstance(decoded[0][1], vllm.AllBlocksCleared)
    topic = f"kv@{node.info.node_id}@team-a@{NAMESPACE}".encode()
    assert all(name == topic for name, _ in decoded[1:])
    first = decoded[1][1]
    assert isinstance(first, vllm.BlockStored)
    assert (first.block_hashes, first.parent_block_hash) == ([_hash(chain[0])], None)
    assert (first.medium, first.ownership) == (events.MEDIUM_DRAM, events.OWNERSHIP)
    second = decoded[2][1]
    assert (second.block_hashes, second.parent_block_hash) == ([_hash(chain[1])], _hash(chain[0]))
    kinds = _index(decoded, vllm)
    assert kinds[_hash(chain[1])] == ["stored", "removed"]  # the delete
    assert kinds[b"plain"][0] == "stored"  # no engine hash: the key
    assert kinds[b"short-lived"] == ["stored", "removed"]  # the TTL expiry
    evicted = [k for k in fill if kinds.get(k) == ["stored", "removed"]]
    assert evicted, "128 blocks in a 64-block arena evicted nothing"
    # The router's index equals the node's contents.
    names = {**{_hash(k): k for k in chain}, **{k: k for k in keys[4:]}}
    assert set(kinds) == set(names)
    assert all(seen in (["stored"], ["stored", "removed"]) for seen in kinds.values())
    assert {names[h]: seen[-1] == "stored" for h, seen in kinds.items()} == held
    assert dropped == 0


async def test_a_late_subscriber_replays_from_a_sequence_number(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    vllm = _vllm_events()
    async with _node(etcd, etcd_prefix, store, tmp_path, kv_events=True) as node:
        client = await _client(node, tenant="team-a")
        try:
            for i in range(6):  # one batch each (one put per loop iteration at least)
                await client.put_batch([f"early-{i}".encode()], [np.ones(4 * KIB, np.uint8)])
            # The publisher sends from its own queue: wait until every batch went out (the
            # replay buffer holds them all), so the late subscriber misses them for sure.
            sent = await Subscriber.open(node)
            try:
                deadline = asyncio.get_running_loop().time() + 10
                while len(await sent.replay(0)) < 7:
                    assert asyncio.get_running_loop().time() < deadline, "batches not sent"
                    await asyncio.sleep(0.05)
            finally:
                await sent.close()
            late = await Subscriber.open(node)  # joins now: saw none of it
            try:
                assert not await late.receive(0.1)
                missed = await late.replay(3)
                everything = await late.replay(0)
            finally:
                await late.close()
        finally:
            await client.close()
    assert everything[3:] == missed
    assert [seq for _, seq, _ in missed] == list(range(3, 3 + len(missed)))
    hashes = [e.block_hashes[0] for _, e in late.decode(everything[1:])]
    assert hashes == [f"early-{i}".encode() for i in range(6)]
    assert all(isinstance(e, vllm.BlockStored) for _, e in late.decode(missed))


async def test_a_stalled_or_dead_subscriber_never_slows_puts(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """Puts are timed with no subscriber, with one that never reads (1-message buffers, and a
    replay it never collects), and after it was killed; then a new subscriber still replays
    the newest batches: the publisher kept going."""
    _vllm_events()
    async with _node(etcd, etcd_prefix, store, tmp_path, kv_events=True) as node:
        client = await _client(node, tenant="team-a")
        block = np.ones(64 * KIB, np.uint8)

        async def put_p50(tag: str) -> float:
            took = []
            for i in range(150):
                started = time.perf_counter()
                await client.put_batch([f"{tag}-{i}".encode()], [block], overwrite=True)
                took.append(time.perf_counter() - started)
            return statistics.median(took)

        try:
            alone = await put_p50("alone")
            stalled = await Subscriber.open(node, RCVHWM=1, RCVBUF=4096)
            greedy = await stalled.subscription.replay_socket({zmq.RCVHWM: 1})
            await greedy.send_multipart((b"", (0).to_bytes(8, "big")))  # never collected
            with_stalled = await put_p50("stalled")
            greedy.close(linger=0)
            await stalled.close()  # killed
            after = await put_p50("after")
            fresh = await Subscriber.open(node)
            try:
                tail = await fresh.replay(0)
            finally:
                await fresh.close()
        finally:
            await client.close()
    # A shared 2-core machine: generous bounds, but a put waiting on a subscriber would take
    # the 20 ms poll or block outright.
    assert with_stalled < alone * 3 + 0.002, (alone, with_stalled)
    assert after < alone * 3 + 0.002, (alone, after)
    last = tail[-1]
    assert [seq for _, seq, _ in tail] == list(range(last[1] - len(tail) + 1, last[1] + 1))
    assert fresh.decode([last])[-1][1].block_hashes == [b"after-149"]


def test_a_full_queue_drops_batches_and_leaves_a_sequence_gap() -> None:
    """The queue is bounded: past it batches are dropped and counted, never waited for; a
    subscriber sees the gap in the sequence numbers (and can replay what was kept)."""
    vllm = _vllm_events()
    publisher = events.EventPublisher("node-x", host="127.0.0.1", queue_batches=2)
    for i in range(5):  # not started: nothing drains the queue (no loop: one batch each)
        publisher.linked("t", "ns", f"k{i}".encode(), None)
    assert publisher.dropped_batches == 4  # seq 0 (AllBlocksCleared) and k0 fill it
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        publisher.start()
        deadline = time.monotonic() + 10
        while not publisher._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)  # the sender drains what was kept
        publisher.linked("t", "ns", b"k5", None)  # seq 6, after the gap
        assert publisher.dropped_batches == 4
        dealer.connect(publisher.replay_endpoint)
        seqs: list[int] = []
        while 6 not in seqs and time.monotonic() < deadline:
            dealer.send_multipart((b"", (0).to_bytes(8, "big")))
            seqs, payloads = [], []
            while True:
                assert dealer.poll(5000)
                _, _, seq, payload = dealer.recv_multipart()
                if seq == events.END_SEQ:
                    break
                seqs.append(int.from_bytes(seq, "big"))
                payloads.append(payload)
    finally:
        dealer.close(linger=0)
        ctx.term()
        publisher.close()
    assert seqs == [0, 1, 6]  # 2..5 were dropped: the gap
    decoder = msgspec.msgpack.Decoder(type=vllm.KVEventBatch)
    assert isinstance(decoder.decode(payloads[0]).events[0], vllm.AllBlocksCleared)
    assert decoder.decode(payloads[1]).events[0].block_hashes == [b"k0"]
    assert decoder.decode(payloads[2]).events[0].block_hashes == [b"k5"]


async def test_score_counts_the_leading_run_of_a_chain(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _node(etcd, etcd_prefix, store, tmp_path) as node:
        client = await _client(node, tenant="team-a")
        try:
            chain = [f"link-{i}".encode() for i in range(128)]
            await client.put_batch(chain[:100], [np.ones(4 * KIB, np.uint8)] * 100)
            score = await client.score(chain)
            assert (score.dram, score.durable, score.blocks) == (100, 0, 100)
            await client.put_batch(chain[100:], [np.ones(4 * KIB, np.uint8)] * 28)
            assert (await client.score(chain)).dram == 128
            await client.delete([chain[60]])
            assert (await client.score(chain)).dram == 60
            assert (await client.score([b"absent", *chain])).blocks == 0
            assert (await client.score([])).blocks == 0
            async with await _client(node, tenant="team-a", use_calls=False) as over_grpc:
                assert (await over_grpc.score(chain)).dram == 60  # the Score RPC
        finally:
            await client.close()


async def test_score_of_another_tenants_chain_is_denied_or_zero(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """Score has Lookup's tenancy: a user naming another tenant is PermissionDenied (gRPC and
    data-plane calls alike); the same chain in the user's own tenant scores 0."""
    alice, bob = tenants.ALICE, tenants.BOB
    async with _node(etcd, etcd_prefix, store, tmp_path) as node:
        owner = await _client(node, tenant=alice.tenant)
        other = await _client(node, tenant=bob.tenant)
        try:
            chain = [f"secret-{i}".encode() for i in range(8)]
            await owner.put_batch(chain, [np.ones(4 * KIB, np.uint8)] * 8)
            grpc_api = servicer.KVCacheServicer(_inner(node).blocks)
            naming_a = pb.ScoreRequest(
                namespace=pb.Namespace(tenant=alice.tenant, name=NAMESPACE), keys=chain
            )
            with tenants.acting(alice):
                reply = await grpc_api.Score(naming_a, tenants.NO_CONTEXT)
                assert (reply.dram_count, reply.durable_count) == (8, 0)
            with tenants.acting(bob):
                for call in (
                    grpc_api.Score(pb.ScoreRequest().FromString(naming_a.SerializeToString()),
                                   tenants.NO_CONTEXT),
                    grpc_api.Lookup(pb.LookupRequest(namespace=naming_a.namespace, keys=chain),
                                    tenants.NO_CONTEXT),
                ):  # fmt: skip
                    with pytest.raises(errors.PermissionDenied):
                        await call
                own = pb.ScoreRequest(namespace=pb.Namespace(name=NAMESPACE), keys=chain)
                reply = await grpc_api.Score(own, tenants.NO_CONTEXT)
                assert (reply.dram_count, reply.durable_count) == (0, 0)
            assert (await other.score(chain)).blocks == 0
            session = await other._set.session(other._set.nodes()[0])
            with pytest.raises(errors.PermissionDenied):
                await session.transport.call(pb.CALL_METHOD_SCORE, naming_a.SerializeToString())
            assert (await owner.score(chain)).dram == 8
        finally:
            await owner.close()
            await other.close()


async def test_the_router_example_indexes_what_a_node_holds(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """examples/kv_router.py (docs/routing.md) runs: it finds the node in the cluster map,
    subscribes as an authorized subscriber (the operator certificate of KVTIER_*), replays the
    node's events and indexes the blocks it holds."""
    example = EXAMPLE
    settings = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **settings
        ) as meta,
        _node(etcd, etcd_prefix, store, tmp_path, kv_events=True) as node,
    ):
        await harness.wait_map(store, lambda m: len(m.nodes) == 2)
        client = await _client(node, tenant="team-a")
        try:
            keys = [b"ex-%d" % i for i in range(3)]
            await client.put_batch(keys, [np.ones(4 * KIB, np.uint8)] * 3)
            assert await client.delete(keys[:1]) == 1
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(example), "--metadata", meta.address, "--seconds", "1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await client.close()
    assert proc.returncode == 0, out.decode()
    line = f"{node.info.node_id} team-a/{NAMESPACE}: {{'CPU': 2}}"
    assert line in out.decode(), out.decode()


async def test_sync_score_takes_the_short_path_and_matches_the_full_one(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    def short_scores() -> float:
        value = prometheus_client.REGISTRY.get_sample_value(
            "kvtier_kv_client_short_path_total", {"op": "score"}
        )
        return value or 0.0

    def body(address: str) -> None:
        with kvtier.KVClient.connect(
            nodes=[address], transports=["tcp"], namespace=NAMESPACE, tenant="team-a"
        ) as client:
            chain = [b"sync-%d" % i for i in range(128)]
            client.put_batch(chain[:90], [np.ones(4 * KIB, np.uint8)] * 90)
            first = client.score(chain)  # opens the session: the full path
            before = short_scores()
            again = client.score(chain)
            assert short_scores() == before + 1
            assert first == again
            assert (again.dram, again.durable) == (90, 0)
            assert client.score(chain, timeout_s=5.0) == again  # a deadline: the full path

    async with _node(etcd, etcd_prefix, store, tmp_path) as node:
        await asyncio.to_thread(body, node.address)


async def test_the_cluster_map_announces_the_event_endpoints(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    settings = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **settings
        ) as meta,
        _node(etcd, etcd_prefix, store, tmp_path / "on", kv_events=True) as on,
        _node(etcd, etcd_prefix, store, tmp_path / "off") as off,
    ):
        await harness.wait_map(store, lambda m: len(m.nodes) == 3)
        assert not off.info.kv_events_endpoint
        assert not off.info.kv_events_server_key
        async with kvcache_client.KVCacheClient(off.address) as client:
            with pytest.raises(errors.PreconditionFailed, match="KV events are off"):
                await client.authorize_events_subscriber(zmq.curve_keypair()[0].decode())
        (found,) = await kv_routing.event_endpoints(meta.address)
    assert len(on.info.kv_events_server_key) == 40  # CURVE (Z85) on a secure cluster
    assert found == kv_routing.EventEndpoints(
        on.info.node_id, on.info.kv_events_endpoint, on.info.kv_events_replay_endpoint,
        server_key=on.info.kv_events_server_key, address=on.address,
    )  # fmt: skip
