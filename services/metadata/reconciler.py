"""Keeps the cluster map in etcd in step with the registered nodes."""

from __future__ import annotations

import asyncio
import logging

from kvtier import errors, membership, service
from kvtier.proto.common.v1 import common_pb2
from services.metadata import placement

log = logging.getLogger(__name__)

_MAX_CAS_ATTEMPTS = 20


async def run(ctx: service.Context, policy: placement.PlacementPolicy) -> None:
    """Recompute the map on every membership change, forever."""
    backoff = membership.Backoff(first_s=0.2, max_s=3.0)
    async for live in ctx.store.watch_nodes():
        while True:
            try:
                await apply(ctx.store, live, policy)
                backoff.reset()
                break
            except errors.Unavailable as exc:
                delay = backoff.next_delay()
                log.warning("cannot update the cluster map (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)


async def apply(
    store: membership.Membership,
    live: dict[str, common_pb2.NodeInfo],
    policy: placement.PlacementPolicy,
) -> common_pb2.ClusterMap | None:
    """Write the map that `live` implies, with compare-and-swap; returns it (None: unchanged).

    Several metadata replicas may run: each write is conditional on the revision it read, and a
    loser recomputes from the winner's map.
    """
    for _attempt in range(_MAX_CAS_ATTEMPTS):
        current = await store.get_map()
        new = placement.reconcile(current.map, live, policy)
        if new is None:
            return None
        if await store.swap_map(new, current.mod_revision):
            log.info(
                "cluster map epoch %d: %d nodes, %d pools, %d pending drives",
                new.epoch,
                len(new.nodes),
                len(new.pools),
                len(new.pending_drives),
            )
            return new
    raise errors.Unavailable("cluster map kept changing under compare-and-swap")


async def set_pool_state(
    store: membership.Membership, index: int, state: common_pb2.PoolState.ValueType
) -> common_pb2.ClusterMap:
    """Move a pool to state (placement.set_pool_state), with compare-and-swap on the map
    (retried when the map changed meanwhile); the map with the pool in that state."""
    for _attempt in range(_MAX_CAS_ATTEMPTS):
        current = await store.get_map()
        new = placement.set_pool_state(current.map, index, state)
        if new is None:
            return current.map
        if await store.swap_map(new, current.mod_revision):
            log.info(
                "cluster map epoch %d: pool %d is %s",
                new.epoch, index, common_pb2.PoolState.Name(state),
            )  # fmt: skip
            return new
    raise errors.Unavailable("cluster map kept changing under compare-and-swap")
