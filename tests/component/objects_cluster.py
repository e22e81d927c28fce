"""The durable object tier in one process: metadata, 6 datanodes x 2 drives (one EC 8+4 set) and
a gateway over real etcd, for component tests (test_objects, test_healing)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier import etcdserver, membership, names
from services.datanode import __main__ as datanode_main
from services.datanode import config as datanode_config
from services.gateway import __main__ as gateway_main
from services.gateway import config as gateway_config
from services.gateway import front as front_mod
from services.gateway import healing, objects
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness

KIB, MIB = 1024, 1024 * 1024
DATANODES = 6
DRIVES_PER_NODE = 2


@dataclass
class Cluster:
    gateway: harness.Running
    datanodes: list[harness.Running]
    stack: contextlib.AsyncExitStack
    store: membership.EtcdMembership | None = None
    common: dict[str, Any] = field(default_factory=dict)
    tmp: Path = Path()

    @property
    def healer(self) -> healing.Healer:
        """The gateway's healer (its loops are methods of the object that owns it)."""
        owner = getattr(self.gateway.spec.loops[0], "__self__", None)
        healer = getattr(owner, "healer", None)
        assert isinstance(healer, healing.Healer)
        return healer

    @property
    def front(self) -> front_mod.ObjectFront:
        """The gateway's object front."""
        owner = getattr(self.gateway.spec.loops[0], "__self__", None)
        found = getattr(owner, "front", None)
        assert isinstance(found, front_mod.ObjectFront)
        return found

    @property
    def engine(self) -> objects.ObjectEngine:
        """The gateway's object engine."""
        return self.front.engine

    async def stored_keys(self, bucket: str) -> list[str]:
        """Every key of a storage name (or an internal bucket), as the gateway lists it."""
        return [e.key async for e in self.front.lister.scan(bucket, "")]

    def stored(self, bucket: str) -> str:
        """The storage name of bucket's objects (see stored_name)."""
        return stored_name(self.tmp, bucket)

    def drive_paths(self, node: int | None = None) -> list[Path]:
        """Every drive directory (of one datanode, when given), in node order."""
        nodes = range(DATANODES) if node is None else [node]
        return [self.tmp / f"dn{i}" / f"drive{d}" for i in nodes for d in range(DRIVES_PER_NODE)]

    @staticmethod
    def drive_id(path: Path) -> str:
        """The id a drive directory was formatted with."""
        return str(json.loads((path / ".kvtier" / "format.json").read_text())["drive_id"])

    async def stop_datanode(self, i: int) -> None:
        """Stop datanode i (its lease is revoked: its drives go OFFLINE in the map)."""
        node = self.datanodes[i]
        node.stop.set()
        await node.task

    async def start_datanode(self, i: int) -> harness.Running:
        """(Re)start datanode i on its state dir; returns once it is registered."""
        assert self.store is not None
        node = await self.stack.enter_async_context(_datanode(self.store, self.tmp, i, self.common))
        if i < len(self.datanodes):
            self.datanodes[i] = node
        else:
            self.datanodes.append(node)
        return node


def stored_name(root: Path, bucket: str) -> str:
    """The storage name (`<bucket>@<storage_id>`) bucket's objects have on the drives of the
    cluster in root (a drive's parent's parent), found on disk: each test names its buckets
    once, so exactly one incarnation is there."""
    found = {
        p.name
        for p in root.glob("dn*/drive*/objects/*")
        if p.name.partition(names.STORAGE_MARK)[0] == bucket
    }
    assert len(found) == 1, (bucket, found)
    return found.pop()


def data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _datanode(
    store: membership.EtcdMembership,
    tmp: Path,
    i: int,
    common: dict[str, Any],
    drives: int = DRIVES_PER_NODE,
) -> contextlib.AbstractAsyncContextManager[harness.Running]:
    return harness.run(
        datanode_config.DatanodeConfig,
        "datanode",
        datanode_main.build,
        store,
        data_dir=str(tmp / f"dn{i}"),
        drive_count=drives,
        staging_bytes=32 * MIB,
        staging_slot_bytes=8 * MIB,
        **common,
    )


@contextlib.asynccontextmanager
async def object_cluster(
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    tmp: Path,
    *,
    pools: int = 1,
    datanodes: int = DATANODES,
    drives_per_node: int = DRIVES_PER_NODE,
    **gateway_settings: Any,
) -> AsyncIterator[Cluster]:
    """Start the cluster; its drives form `pools` pools of equal size. gateway_settings
    override the gateway's config (the heal scanner is off unless they turn it on). Another
    shape (`datanodes` x `drives_per_node`) is for tests of the engine alone: the Cluster's
    drive helpers assume the default one."""
    common: dict[str, Any] = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": prefix}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            harness.run(
                metadata_config.MetadataConfig,
                "metadata",
                metadata_main.build,
                store,
                pool_drives=datanodes * drives_per_node // pools,
                **common,
            )
        )
        nodes = [
            await stack.enter_async_context(_datanode(store, tmp, i, common, drives_per_node))
            for i in range(datanodes)
        ]
        settings = {
            "staging_bytes": 128 * MIB,
            "staging_slot_bytes": 64 * MIB,
            "scan_interval_s": 0.0,
            **gateway_settings,
        }
        gateway = await stack.enter_async_context(
            harness.run(
                gateway_config.GatewayConfig,
                "gateway",
                gateway_main.build,
                store,
                **settings,
                **common,
            )
        )
        await harness.wait_map(
            store, lambda m: len(m.pools) == pools and len(m.nodes) == datanodes + 2
        )
        await gateway.ctx.map_view.wait_for(lambda m: len(m.pools) == pools, timeout_s=10)
        yield Cluster(gateway, nodes, stack, store, common, tmp)


#: The name other test modules import (it lived in test_objects before this module).
_cluster = object_cluster
