"""A live, watched copy of the cluster map, and helpers to read it.

The metadata service owns the map; every other process keeps a `MapView` fed by an etcd watch.
`MapView.epoch` is what a server compares a caller's epoch against (see `kvtier.rpc`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvtier import membership, telemetry
from kvtier.proto.common.v1 import common_pb2

log = logging.getLogger(__name__)

ROLE_NAMES: dict[int, str] = {
    common_pb2.NODE_ROLE_METADATA: "metadata",
    common_pb2.NODE_ROLE_DATANODE: "datanode",
    common_pb2.NODE_ROLE_KVCACHE: "kvcache",
    common_pb2.NODE_ROLE_GATEWAY: "gateway",
}


def role_name(role: int) -> str:
    """The short name of a NodeRole value."""
    return ROLE_NAMES.get(role, "unknown")


def nodes_with_role(cmap: common_pb2.ClusterMap, role: int) -> list[common_pb2.NodeInfo]:
    """The live nodes of one role, sorted by node id."""
    return [n for n in cmap.nodes if n.role == role]


class MapView:
    """The newest cluster map this process has seen; updated by `run()` from an etcd watch."""

    def __init__(self, store: membership.Membership) -> None:
        self._store = store
        self._map = common_pb2.ClusterMap()
        self._epoch = 0  # _map.epoch as an int: every kvcache reply carries it (`epoch`)
        self._changed = asyncio.Condition()

    @property
    def current(self) -> common_pb2.ClusterMap:
        """The newest map (epoch 0 before the first one arrives). Do not mutate."""
        return self._map

    def newer_than(self, known_epoch: int) -> common_pb2.ClusterMap | None:
        """The map, or None when the caller already has its epoch (known_epoch 0: always)."""
        if known_epoch and known_epoch == self._map.epoch:
            return None
        return self._map

    def epoch(self) -> int:
        """The newest epoch seen."""
        return self._epoch

    async def run(self) -> None:
        """Follow the map in etcd forever (run it in the service's task group)."""
        async for versioned in self._store.watch_map():
            await self._offer(versioned.map)

    async def refresh(self) -> None:
        """Read the map now (after a peer reported a newer epoch)."""
        await self._offer((await self._store.get_map()).map)

    async def _offer(self, cmap: common_pb2.ClusterMap) -> None:
        if cmap.epoch <= self._map.epoch:
            return
        async with self._changed:
            log.info("cluster map epoch %d -> %d", self._map.epoch, cmap.epoch)
            self._map, self._epoch = cmap, int(cmap.epoch)
            telemetry.MAP_EPOCH.set(cmap.epoch)
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[common_pb2.ClusterMap], bool], timeout_s: float
    ) -> common_pb2.ClusterMap:
        """Wait until predicate(map) holds; raises TimeoutError after timeout_s."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self._map))
            return self._map
