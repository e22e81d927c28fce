"""Run kvtier services in-process (port 0, real etcd) for component tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvtier import config, errors, membership, service
from kvtier.proto.common.v1 import common_pb2
from tests import pki as test_pki


@dataclass
class Running:
    """A service running in this process."""

    spec: service.ServiceSpec
    ctx: service.Context
    info: common_pb2.NodeInfo
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def address(self) -> str:
        return self.info.grpc_address


async def wait_registered(
    store: membership.EtcdMembership,
    node_id: str,
    timeout_s: float = 15.0,
    task: asyncio.Task[None] | None = None,
) -> common_pb2.NodeInfo:
    """Poll etcd until node_id is registered (ready = visible in etcd, never a sleep)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if task is not None and task.done():
                task.result()  # raises what the service raised
                raise AssertionError(f"{node_id} stopped before registering")
            with contextlib.suppress(errors.Unavailable):  # etcd restarting: poll again
                nodes, _ = await store.list_nodes()
                if node_id in nodes:
                    return nodes[node_id]
            await asyncio.sleep(0.05)


async def wait_map(
    store: membership.EtcdMembership,
    predicate: Callable[[common_pb2.ClusterMap], bool],
    timeout_s: float = 15.0,
) -> common_pb2.ClusterMap:
    """Poll etcd until the cluster map satisfies predicate."""
    async with asyncio.timeout(timeout_s):
        while True:
            cmap = (await store.get_map()).map
            if predicate(cmap):
                return cmap
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run(
    cfg_cls: type[config.ServiceConfig],
    service_name: str,
    build: Callable[[Any], service.ServiceSpec],
    store: membership.EtcdMembership,
    **settings: Any,
) -> AsyncIterator[Running]:
    """Start one service in-process; stop it cleanly on exit."""
    defaults = {
        "host": "127.0.0.1",
        "grpc_port": 0,  # the services' own defaults are fixed ports (docs/operations.md)
        "client_port": 0,
        "metrics_port": -1,
        "lease_ttl_s": 2,
        "shutdown_grace_s": 1.0,
        # No lame duck (1 s more per stop, in every test); the fault suite runs with it
        # (tests/fault/test_rolling.py, docs/upgrades.md).
        "drain_linger_s": 0.0,
        "etcd_wait_s": 5.0,
    }
    if any(f.name == "s3_port" for f in dataclasses.fields(cfg_cls)):
        defaults["s3_port"] = 0  # gateway
    if any(f.name == "arena_bytes" for f in dataclasses.fields(cfg_cls)):
        defaults.update(arena_bytes=16 * 1024 * 1024, page_bytes=4 * 1024 * 1024)  # kvcache
    if not settings.get("insecure"):
        defaults.update(test_pki.session().service_settings(service_name))
    cfg = cfg_cls(**{**defaults, **settings})
    spec = build(cfg)
    captured: list[service.Context] = []
    add_servicers = spec.add_servicers

    def capture(server: Any, ctx: service.Context) -> Any:
        captured.append(ctx)  # the test may look inside the running service
        return add_servicers(server, ctx)

    spec.add_servicers = capture
    stop = asyncio.Event()
    task = asyncio.create_task(service.run_service(cfg, spec, stop))
    try:
        info = await wait_registered(store, spec.node_id, task=task)
        yield Running(spec=spec, ctx=captured[0], info=info, stop=stop, task=task)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except TimeoutError:
            for pending in asyncio.all_tasks():  # say what did not stop
                frames = pending.get_stack(limit=12)
                where = " <- ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in frames)
                print(f"not stopped: {pending.get_name()} {where}", file=sys.stderr)  # noqa: T201
            raise
