"""Subscribe to kvcache nodes' KV events (vLLM's wire format, docs/routing.md) as an
authorized subscriber.

A secure cluster's nodes serve their events over ZMQ CURVE (`kv_events_auth = curve`): only
subscribers whose public key an operator or admin registered on the node may connect.
`subscribe(node)` makes a key pair in memory, sends only the public key to the node's
`AuthorizeEventsSubscriber` RPC with the caller's credentials (an operator certificate or an
admin user's token), and returns a SUB socket connected with the node's server key:

    nodes = await kv_routing.event_endpoints("10.0.0.1:7001")
    subscription = await kv_events.subscribe(nodes[0])
    topic, seq, payload = await subscription.sub.recv_multipart()

Nodes that announce no server key (`kv_events_auth = none`, an insecure cluster) are
subscribed to without CURVE and without the RPC. A registration admits new connections for a
while (the node's `kv_events_key_ttl_s`); open connections are not cut when it lapses, but
ZMQ's reconnection after a network break is a new connection: a long-lived router calls
`renew()` now and then (`replay_socket()` renews by itself when needed).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

from kvtier import errors, kv_mapsource, kv_routing
from kvtier import security as security_mod
from kvtier.clients import kvcache as kvcache_client

#: Renew a registration when less than this part of its life is left.
_RENEW_FRACTION = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class CurveKeys:
    """A subscriber's CURVE key pair (Z85) and the node's server key it connects to."""

    public_key: bytes
    secret_key: bytes = dataclasses.field(repr=False)
    server_key: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make sock a CURVE client of the node (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


class Subscription:
    """One node's KV events for this process: `sub` (a SUB socket, subscribed to `topics`),
    `replay_socket()` (a DEALER on the replay socket). Close it when done."""

    def __init__(
        self,
        node: kv_routing.EventEndpoints,
        ctx: zmq.asyncio.Context,
        *,
        client: kvcache_client.KVCacheClient | None,
        topics: Sequence[bytes],
        options: Mapping[int, int] | None = None,
    ) -> None:
        self.node = node
        self.ctx = ctx
        #: None: the node's events are unauthenticated (no CURVE).
        self.keys: CurveKeys | None = None
        #: time.monotonic() after which the registration no longer admits new connections.
        self.expires_at = float("inf")
        self._ttl_s = 0.0
        self._client = client
        self._topics = tuple(topics)
        self.sub: zmq.asyncio.Socket = ctx.socket(zmq.SUB)
        for option, value in (options or {}).items():
            self.sub.setsockopt(option, value)

    async def renew(self) -> None:
        """(Re-)register this subscriber's public key on the node. Raises PermissionDenied
        (not an operator or admin), PreconditionFailed (the node's events are off),
        Unauthenticated, Unavailable."""
        if self._client is None:
            return
        if self.keys is None:
            public, secret = zmq.curve_keypair()
        else:
            public, secret = self.keys.public_key, self.keys.secret_key
        started = time.monotonic()
        reply = await self._client.authorize_events_subscriber(public.decode("ascii"))
        if not reply.server_public_key:  # the node serves its events without CURVE
            self.keys = None
            return
        self.keys = CurveKeys(public, secret, reply.server_public_key.encode("ascii"))
        self._ttl_s = reply.expires_s
        self.expires_at = started + reply.expires_s

    def connect(self) -> None:
        """Connect `sub` (with this subscriber's keys when the node speaks CURVE)."""
        if self.keys is not None:
            self.keys.apply(self.sub)
        for name in self._topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, name)
        self.sub.connect(self.node.events)

    async def replay_socket(self, options: Mapping[int, int] | None = None) -> zmq.asyncio.Socket:
        """A new DEALER (with options, e.g. {zmq.RCVHWM: 1000}) connected to the node's replay
        socket (the caller closes it); the registration is renewed first when little of it
        is left."""
        if self.expires_at - time.monotonic() < self._ttl_s * _RENEW_FRACTION:
            await self.renew()
        dealer: zmq.asyncio.Socket = self.ctx.socket(zmq.DEALER)
        for option, value in (options or {}).items():
            dealer.setsockopt(option, value)
        if self.keys is not None:
            self.keys.apply(dealer)
        dealer.connect(self.node.replay)
        return dealer

    async def close(self) -> None:
        """Close the SUB socket and the gRPC channel (not the context). Idempotent."""
        self.sub.close(linger=0)
        if self._client is not None:
            await self._client.close()


async def subscribe(
    node: kv_routing.EventEndpoints,
    *,
    ctx: zmq.asyncio.Context | None = None,
    topics: Sequence[bytes] = (b"",),
    options: Mapping[int, int] | None = None,
    security: security_mod.ClientSecurity | None = None,
    tokens: security_mod.TokenSource | None = None,
    timeout_s: float = 5.0,
) -> Subscription:
    """Subscribe to node's events (see the module docstring): topics b"" for everything,
    `b"kv@<node id>@<tenant>@"` for one tenant's. ctx: the ZMQ context (default: the process's
    shared one); options: the SUB socket's (e.g. {zmq.RCVHWM: 100_000}); security: the
    caller's credentials (default: `KVTIER_*`); tokens: a user's session tokens (as
    `subscribe_all` gets them: `kv_mapsource.user_tokens`). Raises
    PermissionDenied (not an operator or admin), PreconditionFailed (events are off),
    Unauthenticated, Unavailable."""
    client = None
    if node.server_key:
        if not node.address:
            raise errors.InvalidArgument(
                f"{node.node_id}: no gRPC address to authorize the subscriber at"
            )
        client = kvcache_client.KVCacheClient(
            node.address, security=security, tokens=tokens, timeout_s=timeout_s
        )
    subscription = Subscription(
        node, ctx or zmq.asyncio.Context.instance(), client=client, topics=topics, options=options
    )
    try:
        await subscription.renew()
        subscription.connect()
    except BaseException:
        await subscription.close()
        raise
    return subscription


async def subscribe_all(
    metadata: str | Sequence[str],
    *,
    ctx: zmq.asyncio.Context | None = None,
    topics: Sequence[bytes] = (b"",),
    security: security_mod.ClientSecurity | None = None,
    timeout_s: float = 5.0,
) -> list[Subscription]:
    """Subscribe to every kvcache node of the cluster map that publishes events (read from
    `metadata`, as `kv_routing.event_endpoints`). Raises what `subscribe` raises (the
    subscriptions made so far are closed)."""
    sec = security or security_mod.default()
    nodes = await kv_routing.event_endpoints(metadata, security=sec, timeout_s=timeout_s)
    tokens = kv_mapsource.user_tokens(sec, kv_mapsource.endpoints(metadata))
    out: list[Subscription] = []
    try:
        for node in nodes:
            out.append(
                await subscribe(
                    node, ctx=ctx, topics=topics, security=sec, tokens=tokens, timeout_s=timeout_s
                )
            )
    except BaseException:
        for made in out:
            await made.close()
        raise
    return out
