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
subscribed to without CURVE and without the RPC. A registration lasts the node's
`kv_events_key_ttl_s` (15 min); when it lapses the node cuts the subscriber's connection
within about 0.1 s. So a subscription renews it by itself in the background (`renew=True`,
the default) when less than a fifth of it is left, until `close()`; a renewal that fails
is retried (a non-retryable error is logged and ends the renewals). The node rebinds its PUB
socket when another subscriber lapses: ZMQ reconnects by itself and the node holds its events
until the registered subscribers are back, so a router that keeps reading misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

from kvtier import errors, kv_mapsource, kv_routing
from kvtier import security as security_mod
from kvtier.clients import kvcache as kvcache_client

log = logging.getLogger(__name__)

#: Renew a registration when less than this part of its life is left.
_RENEW_FRACTION = 0.2
#: Longest wait before a failed renewal is tried again.
_RENEW_RETRY_S = 5.0


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
        self._renewer: asyncio.Task[None] | None = None
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

    def start_renewing(self) -> None:
        """Renew the registration in the background whenever less than a fifth of it is left,
        until `close()` (nothing to do on a node without CURVE). Call it on the event loop."""
        if self._client is None or self.keys is None or self._renewer is not None:
            return
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_forever(), name=f"kv-events-renew-{self.node.node_id}"
        )

    async def _renew_forever(self) -> None:
        while True:
            due = self.expires_at - self._ttl_s * _RENEW_FRACTION
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await self.renew()
            except Exception as exc:  # the task's boundary: log, retry what may pass
                if isinstance(exc, errors.KVTierError) and not exc.retryable:
                    log.error("KV events of %s: cannot renew the subscriber registration (%s); "
                              "the node cuts this subscriber when it lapses",
                              self.node.node_id, exc)  # fmt: skip
                    return
                retry_s = min(_RENEW_RETRY_S, max(self._ttl_s * _RENEW_FRACTION / 4, 0.05))
                log.warning("KV events of %s: renewing the subscriber registration failed "
                            "(%s); again in %.1f s", self.node.node_id, exc, retry_s)  # fmt: skip
                await asyncio.sleep(retry_s)

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
        """Stop renewing, close the SUB socket and the gRPC channel (not the context).
        Idempotent."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
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
    renew: bool = True,
) -> Subscription:
    """Subscribe to node's events (see the module docstring): topics b"" for everything,
    `b"kv@<node id>@<tenant>@"` for one tenant's. ctx: the ZMQ context (default: the process's
    shared one); options: the SUB socket's (e.g. {zmq.RCVHWM: 100_000}); security: the
    caller's credentials (default: `KVTIER_*`); tokens: a user's session tokens (as
    `subscribe_all` gets them: `kv_mapsource.user_tokens`); renew: keep the registration
    alive in the background until `close()` (False: it lapses after the node's TTL). Raises
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
        if renew:
            subscription.start_renewing()
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
    renew: bool = True,
) -> list[Subscription]:
    """Subscribe to every kvcache node of the cluster map that publishes events (read from
    `metadata`, as `kv_routing.event_endpoints`); each subscription renews its registration
    until closed (renew=False: not). Raises what `subscribe` raises (the subscriptions made
    so far are closed)."""
    sec = security or security_mod.default()
    nodes = await kv_routing.event_endpoints(metadata, security=sec, timeout_s=timeout_s)
    tokens = kv_mapsource.user_tokens(sec, kv_mapsource.endpoints(metadata))
    out: list[Subscription] = []
    try:
        for node in nodes:
            subscription = await subscribe(
                node, ctx=ctx, topics=topics, security=sec, tokens=tokens,
                timeout_s=timeout_s, renew=renew,
            )  # fmt: skip
            out.append(subscription)
    except BaseException:
        for made in out:
            await made.close()
        raise
    return out
