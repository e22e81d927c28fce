"""python -m services.datanode: shard storage on local drives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import prometheus_client

from kvtier import errors, features, identity, principal, service
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc, shards_pb2, shards_pb2_grpc
from kvtier.transport import slots
from services.datanode import config, drivemetrics, drives, servicer, shards, shardserver

log = logging.getLogger(__name__)

BACKGROUND_FAILURES = prometheus_client.Counter(
    "kvtier_datanode_background_failures_total",
    "Passes of a datanode's background work that failed (logged; retried at the next pass)",
    ["task"],
)

_SWEEP_S = 60.0
_STALE_TMP_S = 3600.0
#: The listing index's deferred entries of small writes wait in memory at most about this long
#: once writes stop (index.ShardIndex.put_later): the index file on disk then holds them too.
_INDEX_FLUSH_S = 1.0


class _Node:
    """What build() opens and the runtime hooks use: drives, shard stores, the shard API."""

    def __init__(self, cfg: config.DatanodeConfig, local: Sequence[drives.LocalDrive]) -> None:
        self.cfg = cfg
        self.local = local
        self.stores = {d.drive_id: shards.ShardStore(d) for d in local}
        for store in self.stores.values():
            store.sweep_tmp(0)  # staged writes of a previous process can never be committed
        self.executor = concurrent.futures.ThreadPoolExecutor(
            cfg.io_threads, thread_name_prefix="datanode-io"
        )
        self.shards: shardserver.ShardNode | None = None

    def add_servicers(self, server: grpc.aio.Server, ctx: service.Context) -> Sequence[str]:
        dataplane = ctx.dataplane
        if dataplane is None:
            raise errors.Internal("a datanode needs its data plane")
        region = dataplane.regions.create(self.cfg.staging_bytes, name="datanode-staging")
        staging = slots.SlotPool(region, self.cfg.staging_slot_bytes)
        self.shards = shardserver.ShardNode(self.stores, staging, self.executor)
        dataplane.ctx.call_handler = self.shards.handle_call
        datanode_pb2_grpc.add_DatanodeServiceServicer_to_server(
            servicer.DatanodeServicer(ctx.node_id, self.local), server
        )
        shards_pb2_grpc.add_ShardServiceServicer_to_server(
            servicer.ShardServicer(self.shards), server
        )
        return [
            datanode_pb2.DESCRIPTOR.services_by_name["DatanodeService"].full_name,
            shards_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name,
        ]

    async def sweep_loop(self, ctx: service.Context) -> None:
        """Abort staged writes whose writer vanished; drop stale staging directories and the
        superseded versions kept past superseded_keep_s (services.datanode.supersede)."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            if self.shards is not None:
                await _one_pass("staged-write sweep", self.shards.sweep)
            for store in self.stores.values():
                where = f"drive {store.drive.path}"
                await _one_pass(
                    f"{where}: staging sweep",
                    functools.partial(asyncio.to_thread, store.sweep_tmp, _STALE_TMP_S),
                )
                await _one_pass(
                    f"{where}: superseded versions sweep",
                    functools.partial(
                        asyncio.to_thread, store.reclaim_superseded, self.cfg.superseded_keep_s
                    ),
                )

    async def index_loop(self, ctx: service.Context) -> None:
        """Write the drives' deferred index entries every _INDEX_FLUSH_S (none: no work)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_INDEX_FLUSH_S)
            for store in self.stores.values():
                if store.index_deferred:
                    await _one_pass(
                        f"drive {store.drive.path}: index flush",
                        functools.partial(loop.run_in_executor, self.executor, store.flush_index),
                    )

    async def drive_loop(self, ctx: service.Context) -> None:
        """Refresh the drive gauges (capacity, free bytes, online) every REFRESH_S."""
        local = [store.drive for store in self.stores.values()]
        while True:
            await _one_pass(
                "drive gauges", functools.partial(asyncio.to_thread, drivemetrics.refresh, local)
            )
            await asyncio.sleep(drivemetrics.REFRESH_S)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for store in self.stores.values():
            store.close()


async def _one_pass(what: str, work: Callable[[], Awaitable[object]]) -> bool:
    """One pass of a background loop's work (on one drive, mostly); whether it succeeded. A
    failure (a failing drive's EIO or ENOSPC, its SQLite index) is logged, counted and left to
    the next pass: a loop that raised would end the datanode (`kvtier.service`) and take its
    healthy drives out with the failing one."""
    try:
        await work()
    except Exception:  # boundary: the next pass tries again
        log.exception("%s failed", what)
        BACKGROUND_FAILURES.labels(what.rpartition(": ")[2]).inc()
        return False
    return True


def build(cfg: config.DatanodeConfig) -> service.ServiceSpec:
    """Lock the state dir, load the identity, open the drives, and plug into the runtime."""
    data_dir = Path(cfg.data_dir)
    lock = identity.lock_state_dir(data_dir)
    node_id = identity.load_or_create(data_dir, cfg.node_id, "datanode")
    local = drives.open_drives(cfg.drive_paths(), node_id)
    node = _Node(cfg, local)

    def close() -> None:
        node.close()
        lock.close()

    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_DATANODE,
        label="datanode",
        node_id=node_id,
        on_close=close,
        dataplane=True,
        add_servicers=node.add_servicers,
        drives=lambda: servicer.describe(local),
        loops=(node.sweep_loop, node.drive_loop, node.index_loop),
        # Only gateways (and operators) move shards: no users' port, no users' sessions.
        serves_users=False,
        dataplane_access=_gateways_only,
        on_serve=_advertise,
    )


async def _advertise(ctx: service.Context, info: common_pb2.NodeInfo) -> None:
    """What this datanode does that an older one does not (kvtier.features), in the NodeInfo
    it registers: gateways send its conditional undos, conditional commits and small writes of
    shards over 128 KiB only to a datanode that says so."""
    info.features.append(features.DATANODE_CONDITIONAL_UNDO)
    info.features.append(features.DATANODE_CONDITIONAL_COMMIT)
    info.features.append(features.DATANODE_SMALL_WRITES_512K)


def _gateways_only(who: principal.Principal) -> bool:
    """Who may open a data-plane session to a datanode."""
    return who.role == "gateway" or who.kind in (principal.Kind.OPERATOR, principal.Kind.INSECURE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a datanode; returns the process exit code."""
    return service.main(
        config.DatanodeConfig,
        "datanode",
        build,
        description="kvtier datanode: stores erasure-coded shards on local drives.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
