"""A cache-aware router's view of kvtier: follow every kvcache node's KV events and score
prompts against the tier (docs/routing.md).

    python examples/kv_router.py --metadata 127.0.0.1:7001 [--insecure] [--seconds 30]
    python examples/kv_router.py --events tcp://10.0.0.5:5557=tcp://10.0.0.5:5558 ...  # nodes
        # with kv_events_auth = none only (anyone may connect: trusted networks)
    python examples/kv_router.py --metadata ... --tenant team-a --namespace llama@s1 \\
        --score 00ab...,01cd...   # kvtier keys (hex) of a prompt's chain

It finds the nodes' endpoints in the cluster map (`NodeInfo.kv_events_endpoint`), subscribes
to each as an authorized subscriber (`kvtier.kv_events.subscribe`: a CURVE key pair whose
public key the node admits through `AuthorizeEventsSubscriber`, which needs an operator
certificate or an admin user; ZMQ SUB, vLLM's wire format:
`[topic, seq, msgpack(EventBatch)]`), asks the replay
socket for everything buffered first, asks again from the last sequence it saw whenever it
sees a gap (or `AllBlocksCleared`: the node restarted, its DRAM is empty), and keeps an index
(tenant, namespace) -> block hash -> the media (`CPU`: the node's DRAM, `STORAGE`: the durable
tier) that hold it. That index is what llm-d's or Dynamo's indexers keep for vLLM's own events;
`--score` asks the tier directly (`KVClient.score`) instead. Credentials: `--insecure`, or the
`KVTIER_*` environment variables the SDK reads (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

import kvtier
from kvtier import kv_events, kv_routing
from kvtier import security as security_mod

END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Dynamo's router weighs a host-memory hit 0.75 and a disk hit 0.25 of a GPU hit.
WEIGHTS = {"CPU": 0.75, "STORAGE": 0.25}


class Event(msgspec.Struct, tag=True):
    """What a router reads of an event (unknown keys are skipped)."""


class BlockStored(Event):
    block_hashes: list[bytes | int]
    medium: str | None = None
    parent_block_hash: bytes | int | None = None
    tenant_id: str | None = None
    namespace: str | None = None


class BlockRemoved(Event):
    block_hashes: list[bytes | int]
    medium: str | None = None
    tenant_id: str | None = None
    namespace: str | None = None


class AllBlocksCleared(Event):
    pass


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class PrefixIndex:
    """(node, tenant, namespace) -> block hash -> media holding it, from the events."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, str, str], dict[bytes | int, set[str]]] = (
            collections.defaultdict(dict)
        )

    def apply(self, node_id: str, batch: EventBatch) -> None:
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):  # the node restarted: its DRAM is empty
                for (node, _, _), held in self.blocks.items():
                    if node == node_id:
                        for media in held.values():
                            media.discard("CPU")
                continue
            scope = (node_id, event.tenant_id or "", event.namespace or "")
            held = self.blocks[scope]
            for block_hash in event.block_hashes:
                media = held.setdefault(block_hash, set())
                if isinstance(event, BlockStored):
                    media.add(event.medium or "CPU")
                else:
                    media.discard(event.medium or "CPU")
                    if not media:
                        del held[block_hash]

    def summary(self) -> list[str]:
        lines = []
        for (node, tenant, namespace), held in sorted(self.blocks.items()):
            by_medium = collections.Counter(m for media in held.values() for m in media)
            lines.append(f"{node} {tenant}/{namespace}: {dict(by_medium)}")
        return lines


async def follow(subscription: kv_events.Subscription, index: PrefixIndex, stop_at: float) -> None:
    """Replay what was buffered, then apply live batches, replaying over gaps."""
    decoder = msgspec.msgpack.Decoder(type=EventBatch)
    node, sub = subscription.node, subscription.sub
    last = -1
    try:
        last = await replay(subscription, decoder, index, last)
        while (left := stop_at - time.monotonic()) > 0:
            if not await sub.poll(min(left, 0.5) * 1000):
                continue
            _, seq_bytes, payload = await sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if seq <= last:
                continue  # already applied from a replay
            if seq != last + 1:  # a gap (dropped batches, or a restarted node): catch up
                print(f"{node.node_id}: gap {last + 1}..{seq - 1}, replaying")  # noqa: T201
                last = await replay(subscription, decoder, index, last)
                if seq <= last:
                    continue
            index.apply(node.node_id, decoder.decode(payload))
            last = seq
    finally:
        await subscription.close()


async def replay(
    subscription: kv_events.Subscription, decoder: Any, index: PrefixIndex, last: int
) -> int:
    """Ask the node's replay socket for every batch after last; apply them; the new last."""
    node = subscription.node
    dealer = await subscription.replay_socket()
    try:
        await dealer.send_multipart((b"", (last + 1).to_bytes(8, "big")))
        while await dealer.poll(5000):
            _, _, seq_bytes, payload = await dealer.recv_multipart()
            if seq_bytes == END_SEQ:
                break
            seq = int.from_bytes(seq_bytes, "big")
            if seq > last:
                index.apply(node.node_id, decoder.decode(payload))
                last = seq
    finally:
        dealer.close(linger=0)
    return last


async def subscribe(
    args: argparse.Namespace,
    ctx: zmq.asyncio.Context,
    security: security_mod.ClientSecurity | None,
) -> list[kv_events.Subscription]:
    """Every node of the cluster map (authorized: CURVE), or the --events pairs (plain)."""
    # topics=[b"kv@<node id>@<tenant>@"] for one tenant's events
    if not args.events:
        return await kv_events.subscribe_all(args.metadata, ctx=ctx, security=security)
    out = []
    for i, pair in enumerate(args.events.split(",")):
        events, _, replay_endpoint = pair.partition("=")
        node = kv_routing.EventEndpoints(f"node-{i}", events, replay_endpoint)
        out.append(await kv_events.subscribe(node, ctx=ctx))
    return out


async def main_async(args: argparse.Namespace) -> int:
    security = security_mod.ClientSecurity(insecure=True) if args.insecure else None
    ctx = zmq.asyncio.Context()
    try:
        return await run(args, ctx, security)
    finally:
        ctx.destroy(linger=0)  # closes the sockets an error left open


async def run(
    args: argparse.Namespace,
    ctx: zmq.asyncio.Context,
    security: security_mod.ClientSecurity | None,
) -> int:
    subscriptions = await subscribe(args, ctx, security)
    if not subscriptions:
        print("no kvcache node publishes KV events (set kv_events=true)")  # noqa: T201
        return 1
    if args.score:
        chain = [bytes.fromhex(k) for k in args.score.split(",")]
        async with await kvtier.AsyncKVClient.connect(
            metadata=args.metadata, tenant=args.tenant, namespace=args.namespace,
            security=security,
        ) as client:  # fmt: skip
            score = await client.score(chain)
        weighted = score.dram * WEIGHTS["CPU"] + score.durable * WEIGHTS["STORAGE"]
        print(f"score: {score.dram} blocks in DRAM, {score.durable} more durable; "  # noqa: T201
              f"weighted {weighted:.2f}")  # fmt: skip
    index = PrefixIndex()
    stop_at = time.monotonic() + args.seconds
    await asyncio.gather(*(follow(s, index, stop_at) for s in subscriptions))
    for line in index.summary():
        print(line)  # noqa: T201
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--metadata", help="a metadata service address (the cluster map)")
    where.add_argument("--events", help="events=replay endpoint pairs, comma-separated")
    parser.add_argument("--insecure", action="store_true", help="a cluster without TLS")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to follow")
    parser.add_argument("--tenant", default="", help="--score: the tenant to act for")
    parser.add_argument("--namespace", default="", help="--score: the namespace")
    parser.add_argument("--score", default="", help="kvtier keys (hex, comma-separated)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
