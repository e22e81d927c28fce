"""The kvcache nodes an SDK client talks to: discovery, placement, sessions, failure handling.

Used by `kvtier.kv`; see its docstring for the behaviour this implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import prometheus_client

from kvtier import errors, kv_mapsource, principal, rendezvous
from kvtier import security as security_mod
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.clients import node as node_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

log = logging.getLogger(__name__)

T = TypeVar("T")

NODE_FAILURES = prometheus_client.Counter(
    "kvtier_kv_client_node_failures_total", "Node calls that failed (node marked down)", ["op"]
)

#: The caller's deadline for the current operation (loop time), when it set a shorter one than
#: the client's timeout: a node that misses it is skipped (misses), not marked down.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "kvtier_kv_call_deadline", default=None
)

#: Keys whose owners a client remembers (see `NodeSet.owners`); past it the memory starts over.
_OWNERS_CACHED = 1 << 16
_DOWN_FIRST_S = 0.5
_DOWN_MAX_S = 8.0
#: The tag of `repeated bytes keys = 2` (length-delimited) in every probe request.
_KEYS_TAG = b"\x12"
# Errors that mean "this node cannot answer now": its keys become misses.
NODE_ERRORS = (errors.Unavailable, errors.DeadlineExceeded, errors.Overloaded, OSError)
_NODE_ERRORS = NODE_ERRORS


@dataclass(slots=True)
class Node:
    """One kvcache node: its gRPC client, negotiator and (lazily opened) data-plane session."""

    node_id: str
    address: str
    grpc: kvcache_client.KVCacheClient
    negotiator: dataplane_client.DataPlaneClient
    session: dataplane_client.DataPlaneSession | None = None
    opening: asyncio.Future[dataplane_client.DataPlaneSession] | None = None
    down_until: float = 0.0
    down_for_s: float = 0.0
    #: What the node advertises in its NodeInfo (kvtier.features), as of the last map refresh.
    features: frozenset[str] = frozenset()

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        await self.grpc.close()
        await self.negotiator.close()


@dataclass(slots=True)
class Plan:
    """The keys of one batch that go to one node: their positions in the caller's lists."""

    node: Node
    indices: list[int] = field(default_factory=list)


class ChainProbe:
    """`lookup`'s search for the leading run of a chain that is present.

    A chain is a prefix: its run ends at the first missing key. Each round asks the owners of
    one rank for the keys from `run` on, each node only the keys it owns, in one request
    (the node answers how many of them lead present); the new run is the smallest position
    of a node's first miss. The key there is missing on its owner of that rank: the next
    round asks the next rank from there, and a round of a later rank that moves the run on
    starts over at the primaries. The search stops at the end of the chain or when the last
    rank does not move it: with one replica, one round trip.
    """

    def __init__(self, chain: Sequence[bytes], replicas: int) -> None:
        self.chain = chain
        self.run = 0
        self._replicas = replicas
        self._rank = 0
        self._start = 0

    def next_plans(self, nodes: NodeSet) -> list[Plan] | None:
        """The next round's plans (positions relative to `run`), or None when the run is known."""
        while self.run < len(self.chain) and self._rank < self._replicas:
            self._start = self.run
            plans = nodes.plans(self.chain[self.run :], self._rank)
            if plans:
                return plans
            self._rank += 1  # no node of this rank (fewer nodes than replicas)
        return None

    def keys_of(self, plan: Plan) -> list[bytes]:
        """The keys plan's node is asked about, in chain order."""
        return [self.chain[self._start + i] for i in plan.indices]

    def answered(self, plans: Sequence[Plan], counts: Sequence[int | None]) -> None:
        """Each node's leading count of its keys (None: it did not answer, all misses)."""
        end = len(self.chain)
        for plan, count in zip(plans, counts, strict=True):
            owned = plan.indices
            if count is None:
                count = 0
            if count < len(owned):
                end = min(end, self._start + owned[count])
        if end > self.run and self._rank:
            self.run, self._rank = end, 0  # later keys may be on their primaries again
        else:
            self.run, self._rank = max(end, self.run), self._rank + 1


class NodeSet:
    """The kvcache nodes of a cluster as one client sees them (see `kvtier.kv`)."""

    def __init__(
        self,
        *,
        namespace: str,
        tenant: str,
        metadata: str | Sequence[str],
        nodes: Sequence[str],
        transports: Sequence[str],
        replicas: int,
        timeout_s: float,
        refresh_s: float,
        client_id: str,
        settings: registry.ClientSettings | None,
        security: security_mod.ClientSecurity | None = None,
        map_source: Callable[[], common_pb2.ClusterMap] | None = None,
    ) -> None:
        map_endpoints = kv_mapsource.endpoints(metadata)
        if bool(map_endpoints) + bool(nodes) + (map_source is not None) != 1:
            raise errors.InvalidArgument(
                "give one of metadata (metadata or gateway addresses), nodes (addresses) or "
                "map_source"
            )
        if replicas < 1:
            raise errors.InvalidArgument("replicas must be >= 1")
        if timeout_s <= 0:
            raise errors.InvalidArgument("timeout_s must be > 0")
        self.tenant = tenant
        self.security = security or security_mod.default()
        # Users' session tokens: from the configured issuer, then the map endpoints (a metadata
        # node or a gateway: whichever answers; `kv_mapsource`).
        self._tokens = kv_mapsource.user_tokens(self.security, map_endpoints)
        if self.security.has_user and self._tokens is None:
            raise errors.InvalidArgument(
                "with fixed nodes, a user's credentials need token_address (a metadata or "
                "gateway client port that issues session tokens)"
            )
        self.replicas = replicas
        self.timeout_s = timeout_s
        self._ns_prefix = namespace.encode() + b"\0"
        self._owners: dict[bytes, list[str]] = {}  # see owners()
        # key -> (its primary owner, the key as a probe request's keys field): see probe_plans.
        self._fields: dict[bytes, tuple[str, bytes]] = {}
        self._metadata_address = map_endpoints
        #: The map this process watches itself (a gateway's): no call at all.
        self._map_source = map_source
        self._static = list(nodes)
        self._allowed = list(transports)
        self._refresh_s = refresh_s
        self._client_id = client_id or f"{socket.gethostname()}:{os.getpid()}"
        base_settings = settings or registry.ClientSettings()
        self._settings = registry.ClientSettings(
            connections=base_settings.connections,
            max_inflight_bytes=base_settings.max_inflight_bytes,
            timeout_s=timeout_s,
            rdma_device=base_settings.rdma_device,
            tls_ca_file=base_settings.tls_ca_file,
        )
        self._metadata: kv_mapsource.MapSources | None = None
        self._nodes: dict[str, Node] = {}
        self._node_ids: list[str] = []
        self.epoch = 0
        self._stale = True
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._closed = False

    async def close(self) -> None:
        """Close every connection; idempotent."""
        self._closed = True
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            await node.close()
        if self._metadata is not None:
            await self._metadata.close()
            self._metadata = None

    @property
    def node_ids(self) -> list[str]:
        """The kvcache nodes keys are placed on, as of the last map refresh."""
        return list(self._node_ids)

    def nodes(self) -> list[Node]:
        """Every known node, by id."""
        return [self._nodes[n] for n in self._node_ids]

    def advertises(self, node_id: str, feature: str) -> bool:
        """Whether node_id advertised feature (kvtier.features) at the last map refresh."""
        node = self._nodes.get(node_id)
        return node is not None and feature in node.features

    def owners(self, key: bytes) -> list[str]:
        """The nodes that own key (best first; up to `replicas`). Remembered per key until the
        node list changes: hashing costs ~2.5 µs per key and node, and engines ask about the
        same prefix chains over and over."""
        found = self._owners.get(key)
        if found is None:
            if len(self._owners) >= _OWNERS_CACHED:
                self._owners.clear()
            found = rendezvous.owners(self._node_ids, self._ns_prefix + key, self.replicas)
            self._owners[key] = found
        return found

    async def refresh(self) -> None:
        """Reload the kvcache node list (from the metadata service, or probe the fixed nodes)."""
        async with self._refresh_lock:
            if self._map_source is not None:
                cmap = self._map_source()
                infos = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_KVCACHE]
                epoch = cmap.epoch
            elif self._metadata_address:
                got = await self._from_metadata()
                if got is None:  # the endpoint has the epoch we have: nothing to adopt
                    self._stale = False
                    self._refreshed_at = time.monotonic()
                    return
                infos, epoch = got
            else:
                infos, epoch = await self._from_static()
            if not infos:
                raise errors.Unavailable("no kvcache node in the cluster")
            self._adopt(infos, epoch)

    async def _from_metadata(self) -> tuple[list[common_pb2.NodeInfo], int] | None:
        if self._metadata is None:
            self._metadata = kv_mapsource.MapSources(
                self._metadata_address,
                timeout_s=self.timeout_s,
                security=self.security,
                tokens=self._tokens,
            )
        # Our epoch, once we have nodes of it: an endpoint that has no newer map sends none.
        cmap = await self._metadata.cluster_map(self.epoch if self._nodes else 0)
        if cmap is None:
            return None
        kvnodes = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_KVCACHE]
        return kvnodes, cmap.epoch

    async def _from_static(self) -> tuple[list[common_pb2.NodeInfo], int]:
        async def probe(address: str) -> common_pb2.NodeInfo | None:
            try:
                async with node_client.NodeClient(
                    address, timeout_s=self.timeout_s, security=self.security, tokens=self._tokens
                ) as probe:
                    reply = await probe.get_node_info()
            except errors.KVTierError as exc:
                log.warning("kvcache node %s does not answer: %s", address, exc)
                return None
            info = common_pb2.NodeInfo()
            info.CopyFrom(reply.node)
            info.grpc_address = address  # as the caller reaches it
            info.client_address = address
            return info

        found = await asyncio.gather(*(probe(a) for a in self._static))
        infos = [i for i in found if i is not None and i.role == common_pb2.NODE_ROLE_KVCACHE]
        if self._nodes and not infos:
            return [], self.epoch
        return infos, self.epoch

    def _adopt(self, infos: Sequence[common_pb2.NodeInfo], epoch: int) -> None:
        by_id = {info.node_id: info for info in infos}
        for node_id in [n for n in self._nodes if n not in by_id]:
            asyncio.ensure_future(self._nodes.pop(node_id).close())  # noqa: RUF006 - best effort
        for node_id, info in by_id.items():
            address = self.security.address_of(info.grpc_address, info.client_address)
            known = self._nodes.get(node_id)
            if known is not None and known.address != address:
                asyncio.ensure_future(self._nodes.pop(node_id).close())  # noqa: RUF006
                known = None
            if known is None:
                self._nodes[node_id] = Node(
                    node_id=node_id,
                    address=address,
                    grpc=kvcache_client.KVCacheClient(
                        address,
                        timeout_s=self.timeout_s,
                        security=self.security,
                        tokens=self._tokens,
                    ),
                    negotiator=dataplane_client.DataPlaneClient(
                        address,
                        timeout_s=self.timeout_s,
                        security=self.security,
                        tokens=self._tokens,
                    ),
                )
            # A node restarted with another build keeps its id and address: refreshed each time.
            self._nodes[node_id].features = frozenset(info.features)
        node_ids = sorted(self._nodes)
        if node_ids != self._node_ids:
            self._owners.clear()
            self._fields.clear()
        self._node_ids = node_ids
        self.epoch = max(self.epoch, epoch)
        self._stale = False
        self._refreshed_at = time.monotonic()

    async def fresh(self) -> None:
        """Refresh the map when a node said it is stale, or when it is old; never raises."""
        if self._closed:
            raise errors.Unavailable("the KV client is closed")
        if self._stale or time.monotonic() - self._refreshed_at > self._refresh_s:
            try:
                await self.refresh()
            except errors.KVTierError as exc:
                self._refreshed_at = time.monotonic()  # keep the old map; try again later
                log.warning("could not refresh the kvcache node list: %s", exc)

    def current(self) -> bool:
        """Whether the map may be used without a refresh (`fresh` would do nothing)."""
        return (
            not self._closed
            and not self._stale
            and time.monotonic() - self._refreshed_at <= self._refresh_s
        )

    def open_session(self, node: Node) -> dataplane_client.DataPlaneSession | None:
        """node's data-plane session when it is open and the node is not marked down."""
        return node.session if self._usable(node) else None

    def succeeded(self, node: Node) -> None:
        """node answered (see `run`)."""
        node.down_for_s = 0.0

    async def failed(self, node: Node, op: str, exc: BaseException) -> None:
        """node could not answer (see `run`): mark it down for a moment, drop its session."""
        await self._failed(node, op, exc)

    def saw_epoch(self, epoch: int) -> None:
        """A node replied with its epoch: a newer one than ours makes the next op refresh."""
        if epoch > self.epoch and (self._metadata_address or self._map_source is not None):
            self._stale = True

    def plans(self, keys: Sequence[bytes], rank: int) -> list[Plan]:
        """Group key positions by their owner of the given rank (0 = primary)."""
        # Per key only a lookup of the remembered owners and an append: a router's 128-key
        # chain is planned in ~13 µs (a call of owners() and a Plan lookup per key: ~20).
        by_node: dict[str, list[int]] = {}
        known = self._owners.get
        for index, key in enumerate(keys):
            owners = known(key)
            if owners is None:
                owners = self.owners(key)
            if rank < len(owners):
                indices = by_node.get(owners[rank])
                if indices is None:
                    indices = by_node[owners[rank]] = []
                indices.append(index)
        return [Plan(self._nodes[node_id], indices) for node_id, indices in by_node.items()]

    def probe_plans(self, keys: Sequence[bytes], head: bytes) -> list[tuple[Plan, bytes]] | None:
        """`plans(keys, 0)`, each with its node's request serialized: head (the request's
        fields before its keys) and its keys as `repeated bytes keys = 2` of a probe request
        (ScoreRequest, LookupRequest, BatchExistsRequest), bytes equal to protobuf's. None when
        a key is not bytes or has no owner (the caller takes the protobuf path, as before).

        A router's 128-key chain costs one remembered lookup per key and one join per node:
        each key's owner and encoded field are remembered together (until the node list
        changes, as `owners`), so no message is built per call (~25 % less than `plans` and
        a ScoreRequest per node)."""
        by_node: dict[str, tuple[list[int], list[bytes]]] = {}
        known = self._fields.get
        for index, key in enumerate(keys):
            entry = known(key)
            if entry is None:
                entry = self._field_of(key)
                if entry is None:
                    return None
            group = by_node.get(entry[0])
            if group is None:
                group = by_node[entry[0]] = ([], [head])
            group[0].append(index)
            group[1].append(entry[1])
        return [
            (Plan(self._nodes[node_id], indices), b"".join(fields))
            for node_id, (indices, fields) in by_node.items()
        ]

    def _field_of(self, key: bytes) -> tuple[str, bytes] | None:
        """key's primary owner and its keys field (see probe_plans), remembered."""
        if type(key) is not bytes:
            return None  # protobuf takes, or refuses, anything else as it did
        owners = self.owners(key)
        if not owners:
            return None
        if len(self._fields) >= _OWNERS_CACHED:
            self._fields.clear()
        entry = self._fields[key] = (owners[0], _KEYS_TAG + _varint(len(key)) + key)
        return entry

    # Connections.

    async def session(self, node: Node) -> dataplane_client.DataPlaneSession:
        if node.session is not None:
            return node.session
        if node.opening is None:
            node.opening = asyncio.ensure_future(
                node.negotiator.open(
                    self._client_id, self._allowed, self._settings, tenant=self.session_tenant()
                )
            )
        opening = node.opening
        try:
            session = await asyncio.shield(opening)
        finally:
            if node.opening is opening and opening.done():
                node.opening = None
        if node.session is None:
            node.session = session
        return node.session

    def session_tenant(self) -> str:
        """The tenant data-plane sessions act for: a user's own (empty: the node takes it from
        the token); certificate holders act for the tenant they name, "default" when none."""
        if self.tenant or self.security.has_user:
            return self.tenant
        return principal.DEFAULT_TENANT

    def _usable(self, node: Node) -> bool:
        return node.down_until <= time.monotonic()

    async def _failed(self, node: Node, op: str, exc: BaseException) -> None:
        NODE_FAILURES.labels(op).inc()
        node.down_for_s = min(max(node.down_for_s * 2, _DOWN_FIRST_S), _DOWN_MAX_S)
        node.down_until = time.monotonic() + node.down_for_s
        self._stale = True
        log.warning("kvcache node %s failed (%s): %s", node.node_id, op, exc)
        session, node.session = node.session, None
        if session is not None:
            try:
                await session.close()
            except Exception:  # the connection is already broken: closing is best effort
                log.debug("closing a broken data-plane session failed", exc_info=True)

    async def run(
        self,
        node: Node,
        op: str,
        attempt: Callable[[dataplane_client.DataPlaneSession], Awaitable[T]],
        *,
        idempotent: bool,
    ) -> T | None:
        """Run attempt on node's session; None when the node cannot answer (marked down).

        A broken connection found on first use is reopened and, for idempotent operations,
        the attempt is repeated once.
        """
        if not self._usable(node):
            return None
        for tries_left in (1, 0) if idempotent else (0,):
            try:
                session = await self.session(node)
                # The transport bounds each operation by timeout_s (ClientSettings) and the
                # gRPC clients theirs: no extra timer per call unless the caller set a deadline.
                deadline = call_deadline.get()
                if deadline is None:
                    result = await attempt(session)
                else:
                    async with asyncio.timeout_at(deadline):
                        result = await attempt(session)
            except TimeoutError:
                log.debug("kvcache node %s missed the caller's deadline (%s)", node.node_id, op)
                return None
            except base.PeerLost as exc:
                if tries_left:
                    await self._drop_session(node)
                    continue
                await self._failed(node, op, exc)
                return None
            except _NODE_ERRORS as exc:
                await self._failed(node, op, exc)
                return None
            node.down_for_s = 0.0
            return result
        return None

    async def _drop_session(self, node: Node) -> None:
        session, node.session = node.session, None
        if session is not None:
            try:
                await session.close()
            except Exception:  # broken already: closing is best effort
                log.debug("closing a broken data-plane session failed", exc_info=True)


@contextlib.contextmanager
def deadline(timeout_s: float | None) -> Iterator[None]:
    """Within this block, node operations also end after timeout_s (None: no extra bound)."""
    if timeout_s is None:
        yield
        return
    if timeout_s <= 0:
        raise errors.InvalidArgument("timeout_s must be > 0")
    token = call_deadline.set(asyncio.get_running_loop().time() + timeout_s)
    try:
        yield
    finally:
        call_deadline.reset(token)


def _varint(value: int) -> bytes:
    """value as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
