"""What the KV SDK does for cache-aware routers (docs/routing.md).

- **Engine hashes** on puts: `AsyncKVClient.put_batch(..., engine_hashes=, parent_hashes=)`
  sends the engine's own hash of each block (and of its parent in the chain) with the put, so the
  node's KV events name blocks the way the engine's own events do. They travel in
  `BatchPutRequest.engine_hashes` / `engine_parent_hashes`, scoped to one put call.
- **Where the events are**: `event_endpoints(metadata)`: the PUB and replay endpoints every
  kvcache node announces in the cluster map (`NodeInfo.kv_events_endpoint`, `_replay_endpoint`),
  with its CURVE server key (`kv_events_server_key`); `kvtier.kv_events` subscribes to them.
- **Score**: `AsyncKVClient.score(chain)` asks each node owning keys of the chain (primaries,
  one concurrent round trip) how far it serves them from DRAM and from the durable tier, and
  returns the chain's leading run per tier (`ChainScore`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

from kvtier import errors, kv_mapsource
from kvtier import security as security_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb

#: key -> (engine hash, parent hash or b"") of the put running in this context.
_ENGINE_HASHES: contextvars.ContextVar[dict[bytes, tuple[bytes, bytes]] | None] = (
    contextvars.ContextVar("kvtier_engine_hashes", default=None)
)


@contextlib.contextmanager
def engine_hashes(
    keys: Sequence[bytes],
    hashes: Sequence[bytes] | None,
    parents: Sequence[bytes | None] | None,
) -> Iterator[None]:
    """Within it, the puts of keys carry the engine's hashes (one per key; parents optional,
    None for a chain's first block). Raises InvalidArgument for lists that do not match keys."""
    if hashes is None:
        if parents is not None:
            raise errors.InvalidArgument("parent_hashes need engine_hashes")
        yield
        return
    if len(hashes) != len(keys) or (parents is not None and len(parents) != len(keys)):
        raise errors.InvalidArgument("engine_hashes and parent_hashes: give one per key")
    if any(not isinstance(h, bytes) or not h for h in hashes):
        raise errors.InvalidArgument("engine_hashes must be non-empty bytes")
    parent_list = [p or b"" for p in parents] if parents is not None else [b""] * len(keys)
    found = dict(zip(keys, zip(hashes, parent_list, strict=True), strict=True))
    token = _ENGINE_HASHES.set(found)
    try:
        yield
    finally:
        _ENGINE_HASHES.reset(token)


def add_engine_hashes(request: pb.BatchPutRequest, keys: Sequence[bytes]) -> None:
    """Fill request's engine hashes for keys when the running put has them."""
    found = _ENGINE_HASHES.get()
    if not found:
        return
    pairs = [found[key] for key in keys]
    request.engine_hashes.extend(h for h, _ in pairs)
    if any(p for _, p in pairs):
        request.engine_parent_hashes.extend(p for _, p in pairs)


@dataclasses.dataclass(frozen=True, slots=True)
class ChainScore:
    """How much of a chain the tier serves: its first `dram` blocks from DRAM, the `durable`
    blocks after them from the durable tier (read through into DRAM on a get)."""

    dram: int
    durable: int

    @property
    def blocks(self) -> int:
        """The chain's leading run present in either tier."""
        return self.dram + self.durable


def leading_runs(
    chain_length: int,
    owned: Sequence[Sequence[int]],
    replies: Sequence[pb.ScoreResponse | None],
) -> ChainScore:
    """Merge the nodes' answers: each node's keys are at positions owned[i] of the chain, and
    its reply counts how many of them lead in DRAM and then in the durable tier (None: it did
    not answer, all misses). A run ends at the first position any node misses."""
    dram_end = total_end = chain_length
    for positions, reply in zip(owned, replies, strict=True):
        dram = total = 0
        if reply is not None:
            dram, total = reply.dram_count, reply.dram_count + reply.durable_count
        if dram < len(positions):
            dram_end = min(dram_end, positions[dram])
        if total < len(positions):
            total_end = min(total_end, positions[total])
    dram_end = min(dram_end, total_end)
    return ChainScore(dram=dram_end, durable=total_end - dram_end)


@dataclasses.dataclass(frozen=True, slots=True)
class EventEndpoints:
    """Where one kvcache node publishes its KV events (ZMQ tcp:// endpoints); server_key: its
    CURVE public key (Z85; empty: unauthenticated events), address: its gRPC address for this
    caller (`kvtier.kv_events` authorizes the subscriber's key there)."""

    node_id: str
    events: str
    replay: str
    server_key: str = ""
    address: str = ""


async def event_endpoints(
    metadata: str | Sequence[str],
    *,
    security: security_mod.ClientSecurity | None = None,
    timeout_s: float = 5.0,
) -> list[EventEndpoints]:
    """The KV-event endpoints of every kvcache node of the cluster map that publishes them,
    read from `metadata` (one or several metadata or gateway addresses, tried in order, as
    `KVClient.connect(metadata=...)` reads them: `kvtier.kv_mapsource`). Raises Unavailable,
    Unauthenticated."""
    sec = security or security_mod.default()
    endpoints = kv_mapsource.endpoints(metadata)
    tokens = kv_mapsource.user_tokens(sec, endpoints)
    sources = kv_mapsource.MapSources(endpoints, timeout_s=timeout_s, security=sec, tokens=tokens)
    try:
        cmap = await sources.cluster_map()
    finally:
        await sources.close()
    assert cmap is not None  # known_epoch 0: always a map
    return [
        EventEndpoints(
            n.node_id,
            n.kv_events_endpoint,
            n.kv_events_replay_endpoint,
            server_key=n.kv_events_server_key,
            address=sec.address_of(n.grpc_address, n.client_address),
        )
        for n in cmap.nodes
        if n.role == common_pb2.NODE_ROLE_KVCACHE and n.kv_events_endpoint
    ]
