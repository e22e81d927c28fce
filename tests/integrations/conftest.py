"""Fixtures for the engine-integration tests: real kvcache nodes in this process (port 0, the
session's etcd under a private prefix), as in tests/component."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kvtier import etcdserver, membership
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from tests.component import harness
from tests.component.conftest import store  # noqa: F401  (the fixture, re-exported)


@contextlib.asynccontextmanager
async def kvcache_nodes(
    count: int,
    etcd: etcdserver.EtcdServer,
    prefix: str,
    etcd_store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[list[harness.Running]]:
    """count kvcache nodes in this process, registered in etcd; stopped on exit."""
    async with contextlib.AsyncExitStack() as stack:
        running = []
        for i in range(count):
            node = await stack.enter_async_context(
                harness.run(
                    kvcache_config.KVCacheConfig,
                    "kvcache",
                    kvcache_main.build,
                    etcd_store,
                    etcd_endpoints=(etcd.endpoint,),
                    etcd_prefix=prefix,
                    data_dir=str(tmp / f"kv{i}"),
                    **settings,
                )
            )
            running.append(node)
        yield running


async def stop_node(node: harness.Running) -> None:
    """Stop one node now (its listener closes: clients see it as dead)."""
    node.stop.set()
    await node.task
