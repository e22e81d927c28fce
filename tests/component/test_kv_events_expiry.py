"""A KV-events subscriber whose registration lapses is cut (issue 18, zero trust): a kvcache
node with a short `kv_events_key_ttl_s` rebinds its PUB socket when a subscribed key lapses,
so that subscriber hears nothing more within a second, while a subscriber that the SDK keeps
renewing reconnects by itself and hears every batch (no sequence gap), and an unregistered
key hears nothing at all.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from kvtier import etcdserver, kv_events, membership
from tests.component import test_kv_events as kvt
from tests.component import test_kv_events_auth as kva

pytestmark = pytest.mark.timeout(120)
#: The node's registration TTL: the SDK renews when a fifth is left (0.5 s of slack).
TTL_S = 2.5
#: A lapsed subscriber hears nothing this long after its registration's end (the node checks
#: every 0.1 s; the rest is slack for a busy machine and the client's earlier clock).
CUT_BOUND_S = 1.0
#: Puts go on this long past the cut, so a lapsed subscriber has something to miss.
AFTER_CUT_S = 0.5


async def _listen(sock: zmq.asyncio.Socket, heard: list[tuple[float, int]]) -> None:
    """Record (arrival time, seq) of everything sock receives, until cancelled."""
    while True:
        _, seq, _ = await sock.recv_multipart()
        heard.append((time.monotonic(), int.from_bytes(seq, "big")))


async def test_a_lapsed_subscriber_is_cut_while_a_renewing_one_misses_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kvt._node(
        etcd, etcd_prefix, store, tmp_path, kv_events=True, kv_events_key_ttl_s=TTL_S
    ) as node:
        publisher = kvt._inner(node).events
        ctx = zmq.asyncio.Context()
        renewing = await kv_events.subscribe(kvt.endpoints(node), ctx=ctx)
        lapsing = await kv_events.subscribe(kvt.endpoints(node), ctx=ctx, renew=False)
        first_expiry = renewing.expires_at
        client = await kvt._client(node, tenant="team-a")
        heard: dict[str, list[tuple[float, int]]] = {"renewing": [], "lapsing": [], "other": []}
        server_key = node.info.kv_events_server_key.encode()
        try:
            async with kva._sockets(ctx, node, server_key) as (stranger, _, _):
                listeners = [
                    asyncio.create_task(_listen(sock, heard[name]))
                    for name, sock in (
                        ("renewing", renewing.sub), ("lapsing", lapsing.sub), ("other", stranger)
                    )
                ]  # fmt: skip
                block = np.ones(4 * kvt.KIB, np.uint8)
                for i in range(200):  # until both registered connections carry events
                    await client.put_batch([b"warm-%d" % i], [block])
                    await asyncio.sleep(0.02)
                    if heard["renewing"] and heard["lapsing"]:
                        break
                i = 0
                while time.monotonic() < lapsing.expires_at + CUT_BOUND_S + AFTER_CUT_S:
                    await client.put_batch([b"run-%d" % i], [block])
                    await asyncio.sleep(0.02)
                    i += 1
                last = (await kvt.Subscriber(renewing).replay(0))[-1][1]  # the last published
                for _ in range(250):
                    if heard["renewing"][-1][1] >= last:
                        break
                    await asyncio.sleep(0.02)
                for task in listeners:
                    task.cancel()
                await asyncio.gather(*listeners, return_exceptions=True)
        finally:
            await client.close()
            await renewing.close()
            await lapsing.close()
            ctx.term()
        assert publisher.dropped_batches == 0
        assert renewing.expires_at > first_expiry  # the SDK renewed it
        cut_by = lapsing.expires_at + CUT_BOUND_S
        assert heard["lapsing"]
        assert [seq for at, seq in heard["lapsing"] if at > cut_by] == []
        assert heard["lapsing"][-1][1] < last - 10  # it missed the batches after the cut
        assert heard["other"] == []
        seqs = [seq for _, seq in heard["renewing"]]
        assert seqs == list(range(seqs[0], last + 1))  # every batch across the rotation
        assert publisher.rotations == 1  # the lapsed key's expiry, nothing else
