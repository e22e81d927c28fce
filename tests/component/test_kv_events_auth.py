"""Who reads a kvcache node's KV events (issue 18, zero trust): on a secure cluster both event
sockets are CURVE servers that admit only the subscriber keys an operator or admin registered
with AuthorizeEventsSubscriber; a plain subscriber, an unregistered CURVE key and a key a tenant
user tried to register get nothing, on the PUB socket and the replay socket alike, while an
authorized subscriber on the same node does. `kv_events_auth = none` serves anyone (as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
import zmq.asyncio

from kvtier import errors, etcdserver, kv_events, membership, principal
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import events, eventsauth, servicer
from tests.component import tenants
from tests.component import test_kv_events as kvt

pytestmark = pytest.mark.timeout(120)
#: How long a refused subscriber is watched for a message (an authorized one gets its first
#: within milliseconds of the put).
SILENCE_S = 0.5
DECODER = msgspec.msgpack.Decoder(type=events.EventBatch)
OPERATOR = principal.service("operator", "ops")


def _hashes(payloads: list[bytes]) -> list[bytes | int]:
    return [
        h
        for payload in payloads
        for e in DECODER.decode(payload).events
        if isinstance(e, events.BlockStored)
        for h in e.block_hashes
    ]


@contextlib.asynccontextmanager
async def _sockets(ctx: zmq.asyncio.Context, node: Any, curve: bytes | None) -> AsyncIterator[
    tuple[zmq.asyncio.Socket, zmq.asyncio.Socket, str]
]:  # fmt: skip
    """A SUB (everything), a DEALER on node's event sockets and their public key; curve: the
    node's server key, with a fresh key pair nobody registered (None: no CURVE at all)."""
    sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    try:
        if curve is not None:
            for sock in (sub, dealer):
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                    curve, public, secret
                )  # fmt: skip
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(node.info.kv_events_endpoint)
        dealer.connect(node.info.kv_events_replay_endpoint)
        yield sub, dealer, public.decode()
    finally:
        sub.close(linger=0)
        dealer.close(linger=0)


async def _replay_answer(dealer: zmq.asyncio.Socket, timeout_s: float) -> list[bytes]:
    """Ask for a replay from 0; the payloads answered within timeout_s (none: nothing came)."""
    with contextlib.suppress(zmq.Again):  # queued until a connection takes it (or never)
        await dealer.send_multipart((b"", (0).to_bytes(8, "big")), flags=zmq.NOBLOCK)
    payloads = []
    while await dealer.poll(timeout_s * 1000):
        _, _, seq, payload = await dealer.recv_multipart()
        if seq == events.END_SEQ:
            break
        payloads.append(payload)
        timeout_s = 5.0
    return payloads


async def test_only_subscribers_an_admin_authorized_receive_events_and_replays(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kvt._node(etcd, etcd_prefix, store, tmp_path, kv_events=True) as node:
        inner = kvt._inner(node)
        server_key = node.info.kv_events_server_key.encode()
        assert server_key == inner.events.keys.public_key.encode()  # announced in the map
        grpc_api = servicer.KVCacheServicer(inner.blocks, events=inner.events)
        authorized = await kvt.Subscriber.open(node)  # the operator, over gRPC
        client = await kvt._client(node, tenant="team-a")
        try:
            async with (
                _sockets(authorized.ctx, node, None) as (plain_sub, plain_dealer, _),
                _sockets(authorized.ctx, node, server_key) as (
                    stranger_sub, stranger_dealer, stranger_key
                ),
            ):  # fmt: skip
                # A tenant user may not register the stranger's key: still refused below.
                request = pb.AuthorizeEventsSubscriberRequest(client_public_key=stranger_key)
                with tenants.acting(tenants.ALICE), pytest.raises(errors.PermissionDenied):
                    await grpc_api.AuthorizeEventsSubscriber(request, tenants.NO_CONTEXT)
                assert not inner.events.keys.admitted(stranger_key.encode())
                # Put until the authorized subscriber's connection carries events.
                for i in range(100):
                    await client.put_batch([b"auth-%d" % i], [np.ones(4 * kvt.KIB, np.uint8)])
                    if await authorized.receive(0.1):
                        break
                await client.put_batch([b"after"], [np.ones(4 * kvt.KIB, np.uint8)])
                assert await authorized.receive(5.0)
                assert b"after" in _hashes([payload for _, _, payload in authorized.live])
                replayed = _hashes([p for _, _, p in await authorized.replay(0)])
                assert b"auth-0" in replayed
                assert b"after" in replayed
                heard = await asyncio.gather(
                    plain_sub.poll(SILENCE_S * 1000), stranger_sub.poll(SILENCE_S * 1000),
                    _replay_answer(plain_dealer, SILENCE_S),
                    _replay_answer(stranger_dealer, SILENCE_S),
                )  # fmt: skip
                assert heard == [0, 0, [], []]
        finally:
            await client.close()
            await authorized.close()


async def test_kv_events_auth_none_serves_any_subscriber_as_before(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """The explicit opt-out for unmodified routers on a trusted network: no server key is
    announced, a plain SUB and DEALER get everything, the SDK subscribes without the RPC."""
    async with kvt._node(
        etcd, etcd_prefix, store, tmp_path, kv_events=True, kv_events_auth="none"
    ) as node:
        assert node.info.kv_events_server_key == ""
        inner = kvt._inner(node)
        assert inner.events.keys is None
        grpc_api = servicer.KVCacheServicer(inner.blocks, events=inner.events)
        public, _ = zmq.curve_keypair()
        request = pb.AuthorizeEventsSubscriberRequest(client_public_key=public.decode())
        with tenants.acting(OPERATOR):
            reply = await grpc_api.AuthorizeEventsSubscriber(request, tenants.NO_CONTEXT)
        assert (reply.server_public_key, reply.expires_s) == ("", 0.0)
        client = await kvt._client(node, tenant="team-a")
        sdk = await kv_events.subscribe(kvt.endpoints(node))
        try:
            async with _sockets(sdk.ctx, node, None) as (plain_sub, plain_dealer, _):
                for i in range(100):
                    await client.put_batch([b"open-%d" % i], [np.ones(4 * kvt.KIB, np.uint8)])
                    if await plain_sub.poll(100):
                        break
                _, _, payload = await plain_sub.recv_multipart()
                assert str(_hashes([payload])[0]).startswith("b'open-")
                assert b"open-0" in _hashes(await _replay_answer(plain_dealer, 5.0))
                assert await sdk.sub.poll(5000)  # the SDK's plain SUB gets them too
        finally:
            await client.close()
            await sdk.close()


def test_an_expired_registration_is_cut_and_gets_no_replay_a_renewed_one_misses_nothing() -> None:
    """Past kv_events_key_ttl_s a key's open SUB connection is cut (the PUB socket is rebound),
    it opens no new one and its open replay connection is answered no more; a key renewed in
    time reconnects by itself and gets every batch, the ones published meanwhile included."""
    now = [100.0]
    keys = eventsauth.SubscriberKeys(ttl_s=10.0, clock=lambda: now[0])
    publisher = events.EventPublisher("node-x", host="127.0.0.1", keys=keys)
    lapsing, renewed = zmq.curve_keypair(), zmq.curve_keypair()
    keys.authorize(lapsing[0].decode())
    keys.authorize(renewed[0].decode())
    ctx = zmq.Context()

    def connect(kind: int, endpoint: str, pair: tuple[bytes, bytes]) -> zmq.Socket[bytes]:
        sock = ctx.socket(kind)
        sock.curve_serverkey = keys.public_key.encode()
        sock.curve_publickey, sock.curve_secretkey = pair
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        return sock

    def replayed(dealer: zmq.Socket[bytes], timeout_s: float) -> int:
        dealer.send_multipart((b"", (0).to_bytes(8, "big")))
        count = 0
        while dealer.poll(int(timeout_s * 1000)):
            if dealer.recv_multipart()[2] == events.END_SEQ:
                return count
            count += 1
        return -1  # no answer

    def seqs(sub: zmq.Socket[bytes], timeout_s: float) -> list[int]:
        out = []
        while sub.poll(int(timeout_s * 1000)):
            out.append(int.from_bytes(sub.recv_multipart()[1], "big"))
            timeout_s = 0.05
        return out

    try:
        publisher.start()
        sub, dealer, kept = (
            connect(zmq.SUB, publisher.endpoint, lapsing),
            connect(zmq.DEALER, publisher.replay_endpoint, lapsing),
            connect(zmq.SUB, publisher.endpoint, renewed),
        )
        for i in range(100):  # until both SUBs' connections carry events
            publisher.linked("t", "ns", b"k%d" % i, None)
            if sub.poll(100) and kept.poll(100):
                break
        assert replayed(dealer, 5.0) >= 1
        before = seqs(kept, 0.1)
        seqs(sub, 0.1)
        now[0] += 5.0
        keys.authorize(renewed[0].decode())  # renewed until 115
        now[0] += 5.0  # the other registration expires
        for _ in range(100):  # the sender notices within CHECK_INTERVAL_S
            if publisher.rotations:
                break
            time.sleep(0.02)
        assert publisher.rotations == 1
        late = connect(zmq.SUB, publisher.endpoint, lapsing)
        for i in range(3):  # published while the renewed subscriber reconnects: held for it
            publisher.linked("t", "ns", b"after-%d" % i, None)
        after = seqs(kept, 5.0)
        assert after == list(range(before[-1] + 1, before[-1] + 4))  # no gap
        assert seqs(sub, SILENCE_S) == []  # the lapsed connection is cut
        assert replayed(dealer, SILENCE_S) == -1  # its replays are refused
        assert not late.poll(int(SILENCE_S * 1000))  # and no new connection opens
        assert publisher.rotations == 1
    finally:
        ctx.destroy(linger=0)
        publisher.close()
