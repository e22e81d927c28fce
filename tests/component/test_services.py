"""Each service in-process on port 0 against a real etcd: serve, register, answer, stop."""

from __future__ import annotations

import asyncio
import functools
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvtier import config, errors, etcdserver, membership, rpc
from kvtier.clients import datanode as datanode_client
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.clients import node as node_client
from kvtier.proto.common.v1 import common_pb2
from services.datanode import __main__ as datanode_main
from services.datanode import config as datanode_config
from services.gateway import __main__ as gateway_main
from services.gateway import config as gateway_config
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import pki as test_pki
from tests.component import harness

SERVICES: dict[str, tuple[type[config.ServiceConfig], Callable[[Any], Any], int, str]] = {
    "metadata": (
        metadata_config.MetadataConfig,
        metadata_main.build,
        common_pb2.NODE_ROLE_METADATA,
        "kvtier.metadata.v1.MetadataService",
    ),
    "datanode": (
        datanode_config.DatanodeConfig,
        datanode_main.build,
        common_pb2.NODE_ROLE_DATANODE,
        "kvtier.datanode.v1.DatanodeService",
    ),
    "kvcache": (
        kvcache_config.KVCacheConfig,
        kvcache_main.build,
        common_pb2.NODE_ROLE_KVCACHE,
        "kvtier.kvcache.v1.KVCacheService",
    ),
    "gateway": (
        gateway_config.GatewayConfig,
        gateway_main.build,
        common_pb2.NODE_ROLE_GATEWAY,
        "kvtier.gateway.v1.GatewayService",
    ),
}


def _settings(name: str, etcd: etcdserver.EtcdServer, prefix: str, tmp: Path) -> dict[str, Any]:
    settings: dict[str, Any] = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": prefix}
    if name in {"datanode", "kvcache"}:
        settings["data_dir"] = str(tmp / name)
    if name == "kvcache":
        settings.update(arena_bytes=16 * 1024 * 1024, page_bytes=4 * 1024 * 1024)
    return settings


async def _reflected_services(address: str) -> set[str]:
    async with rpc.open_channel(address) as channel:
        # typeshed types the stub for sync channels only
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            return {s.name for s in reply.list_services_response.service}
    return set()


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_service_serves_registers_and_leaves_on_stop(
    name: str,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    cfg_cls, build, role, service_name = SERVICES[name]
    settings = _settings(name, etcd, etcd_prefix, tmp_path)
    async with harness.run(cfg_cls, name, build, store, **settings) as running:
        assert running.info.role == role
        assert await rpc.check_health(running.address) == "SERVING"
        async with node_client.NodeClient(running.address) as client:
            reply = await client.get_node_info()
        assert reply.node.node_id == running.spec.node_id
        assert reply.node.grpc_address == running.address
        reflected = await _reflected_services(running.address)
        assert {service_name, "grpc.health.v1.Health", "kvtier.common.v1.NodeService"} <= reflected
        address = running.address
    # Stopped: the lease was revoked (key gone at once, not after the TTL) and the port closed.
    nodes, _ = await store.list_nodes()
    assert running.spec.node_id not in nodes
    assert await rpc.check_health(address, timeout_s=1) == "UNREACHABLE"
    assert running.task.exception() is None


async def test_cluster_map_forms_pool_and_every_node_sees_the_epoch(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    base = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig,
            "metadata",
            metadata_main.build,
            store,
            pool_drives=4,
            **base,
        ) as meta,
        harness.run(
            datanode_config.DatanodeConfig,
            "datanode",
            datanode_main.build,
            store,
            data_dir=str(tmp_path / "d1"),
            **base,
        ) as d1,
    ):
        # One datanode with 2 drives: pending, no pool yet.
        cmap = await harness.wait_map(store, lambda m: len(m.pending_drives) == 2)
        assert not cmap.pools
        async with (
            harness.run(
                datanode_config.DatanodeConfig,
                "datanode",
                datanode_main.build,
                store,
                data_dir=str(tmp_path / "d2"),
                **base,
            ) as d2,
            harness.run(
                gateway_config.GatewayConfig, "gateway", gateway_main.build, store, **base
            ) as gw,
        ):
            cmap = await harness.wait_map(store, lambda m: len(m.pools) == 1 and len(m.nodes) == 4)
            (erasure_set,) = cmap.pools[0].sets
            assert (erasure_set.data_shards, erasure_set.parity_shards) == (2, 2)
            assert {s.node_id for s in erasure_set.slots} == {d1.spec.node_id, d2.spec.node_id}
            assert not cmap.pending_drives
            # Everyone converges on the same epoch; the gateway and metadata serve the map.
            for running in (meta, d1, d2, gw):
                async with node_client.NodeClient(running.address) as client:
                    await _eventually(
                        functools.partial(_epoch_of, client), lambda e: e == cmap.epoch
                    )
            async with gateway_client.GatewayClient(gw.address) as gclient:
                served = await gclient.get_cluster_map()
                assert served is not None
                assert served.epoch == cmap.epoch
                assert await gclient.get_cluster_map(known_epoch=cmap.epoch) is None
            async with metadata_client.MetadataClient(meta.address) as mclient:
                served = await mclient.get_cluster_map()
                assert served == cmap
            formed = cmap.pools[0]
        # d2 and the gateway left: d2's slots stay, marked offline; the pool keeps its shape.
        after = await harness.wait_map(store, lambda m: len(m.nodes) == 2)
        assert after.epoch > cmap.epoch
        states = {s.node_id: s.state for s in after.pools[0].sets[0].slots}
        assert states[d2.spec.node_id] == common_pb2.DRIVE_STATE_OFFLINE
        assert states[d1.spec.node_id] == common_pb2.DRIVE_STATE_ONLINE
        assert [s.drive_id for s in after.pools[0].sets[0].slots] == [
            s.drive_id for s in formed.sets[0].slots
        ]


async def _epoch_of(client: node_client.NodeClient) -> int:
    return int((await client.get_node_info()).map_epoch)


async def _eventually(
    probe: Callable[[], Any], accept: Callable[[Any], bool], timeout_s: float = 10.0
) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            value = await probe()
            if accept(value):
                return value
            await asyncio.sleep(0.05)


async def test_stale_epoch_is_refused_and_the_client_refreshes(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    base = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig,
            "metadata",
            metadata_main.build,
            store,
            pool_drives=2,
            **base,
        ),
        harness.run(
            datanode_config.DatanodeConfig,
            "datanode",
            datanode_main.build,
            store,
            data_dir=str(tmp_path / "d1"),
            **base,
        ) as dn,
    ):
        cmap = await harness.wait_map(store, lambda m: len(m.pools) == 1)
        async with node_client.NodeClient(dn.address) as probe:
            await _eventually(lambda: _epoch_of(probe), lambda e: e == cmap.epoch)
        # A caller with an older epoch gets StaleEpoch carrying the current one.
        async with datanode_client.DatanodeClient(dn.address, epoch_source=lambda: 1) as client:
            with pytest.raises(errors.StaleEpoch) as caught:
                await client.list_drives()
            assert caught.value.current_epoch == cmap.epoch
        # A caller that refreshes on StaleEpoch succeeds on the retry, with its new epoch.
        known = {"epoch": 1}
        refreshed: list[int] = []

        async def refresh(current: int) -> None:
            refreshed.append(current)
            known["epoch"] = (await store.get_map()).map.epoch

        async with datanode_client.DatanodeClient(
            dn.address, epoch_source=lambda: known["epoch"], on_stale=refresh
        ) as client:
            drives = await client.list_drives()
        assert refreshed == [cmap.epoch]
        assert {d.drive_id for d in drives} == {s.drive_id for s in cmap.pools[0].sets[0].slots}
        assert all(d.total_bytes > 0 for d in drives)
        # Current or newer epochs pass.
        for epoch in (cmap.epoch, cmap.epoch + 5):
            async with datanode_client.DatanodeClient(
                dn.address, epoch_source=lambda e=epoch: e
            ) as client:
                assert len(await client.list_drives()) == 2


async def test_watch_cluster_map_streams_new_epochs(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    base = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with harness.run(
        metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **base
    ) as meta:
        first = await harness.wait_map(store, lambda m: len(m.nodes) == 1)
        async with metadata_client.MetadataClient(meta.address) as client:
            stream = client.watch_cluster_map(after_epoch=0)
            got = await asyncio.wait_for(anext(stream), 10)
            assert got.epoch >= first.epoch
            async with harness.run(
                kvcache_config.KVCacheConfig,
                "kvcache",
                kvcache_main.build,
                store,
                data_dir=str(tmp_path / "kv"),
                **base,
            ) as kv:
                while True:
                    got = await asyncio.wait_for(anext(stream), 10)
                    if any(n.node_id == kv.spec.node_id for n in got.nodes):
                        break
            await stream.aclose()


async def test_metrics_endpoint_exports_rpc_latency(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with harness.run(
        gateway_config.GatewayConfig,
        "gateway",
        gateway_main.build,
        store,
        etcd_endpoints=(etcd.endpoint,),
        etcd_prefix=etcd_prefix,
        metrics_port=0,
    ) as gw:
        async with node_client.NodeClient(gw.address) as client:
            await client.get_node_info()
        url = f"https://{gw.info.metrics_address}/metrics"
        session = test_pki.session()
        scraper = ssl.create_default_context(cafile=session.ca_file)
        scraper.load_cert_chain(session.cert("operator"), session.key("operator"))
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5, context=scraper).read()
        )
        text = body.decode()
        # Without a client certificate of the cluster (series name tenants): refused.
        anonymous = ssl.create_default_context(cafile=session.ca_file)
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=5, context=anonymous).read()
            )
        assert (
            'kvtier_rpc_server_seconds_count{code="OK",method="GetNodeInfo",service="gateway"}'
            in text
        )
        assert "kvtier_cluster_map_epoch" in text


async def test_unreachable_etcd_fails_with_one_line_after_retrying(tmp_path: Path) -> None:
    port = etcdserver.free_port()
    cfg = gateway_config.GatewayConfig(
        etcd_endpoints=(f"127.0.0.1:{port}",), etcd_wait_s=1.0, metrics_port=-1,
        grpc_port=0, client_port=0, s3_port=0,
        **test_pki.session().service_settings("gateway"),
    )  # fmt: skip
    spec = gateway_main.build(cfg)
    from kvtier import service

    with pytest.raises(errors.Unavailable) as caught:
        await asyncio.wait_for(service.run_service(cfg, spec, asyncio.Event()), 15)
    assert f"127.0.0.1:{port}" in caught.value.message
    assert "\n" not in caught.value.message


async def test_node_reregisters_after_etcd_outage(
    private_etcd: etcdserver.EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    client = membership.EtcdMembership((private_etcd.endpoint,), etcd_prefix)
    await client.connect(wait_s=5)
    try:
        async with harness.run(
            kvcache_config.KVCacheConfig,
            "kvcache",
            kvcache_main.build,
            client,
            etcd_endpoints=(private_etcd.endpoint,),
            etcd_prefix=etcd_prefix,
            data_dir=str(tmp_path / "kv"),
        ) as kv:
            private_etcd.stop()
            await asyncio.sleep(3)  # longer than the 2 s lease: it expires with etcd down
            private_etcd.start()
            private_etcd.wait_ready()
            info = await harness.wait_registered(client, kv.spec.node_id, timeout_s=20)
            assert info.grpc_address == kv.address
            assert await rpc.check_health(kv.address) == "SERVING"
    finally:
        await client.close()


async def test_data_plane_is_negotiated_over_grpc(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    from kvtier.clients import dataplane as dataplane_client
    from kvtier.transport import base as transport_base

    async with harness.run(
        datanode_config.DatanodeConfig, "datanode", datanode_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "dn"),
    ) as dn:  # fmt: skip
        offered = {e.name for e in dn.info.dataplane.endpoints}
        assert {"tcp", "shm"} <= offered  # announced in etcd, so in the cluster map
        plane = dn.ctx.dataplane
        assert plane is not None
        region = plane.regions.create(1 << 20)
        async with dataplane_client.DataPlaneClient(dn.address) as client:
            # Same host: shm wins over tcp; a client may narrow the choice.
            assert (await client.negotiate("c1")).transport == "shm"
            assert (await client.negotiate("c1", ["tcp"])).transport == "tcp"
            for allowed in (["shm"], ["tcp"]):
                session = await client.open("c1", allowed)
                assert session.name == allowed[0]
                # Minted from the caller's certificate: an operator acting for no tenant.
                assert session.principal.startswith("@operator/test-operator/")
                desc = plane.issuer.grant(
                    region, 0, 4096, transport_base.Rights.WRITE, session.principal
                )
                payload = bytes(range(256)) * 16
                await session.transport.write(desc, payload)
                assert bytes(region.view[:4096]) == payload
                # Another caller naming the same client id gets another principal: the
                # descriptor is useless to it.
                other = await client.open("c1", allowed)
                assert other.principal != session.principal
                with pytest.raises(transport_base.DescriptorRejected):
                    await other.transport.write(desc, payload)
                await other.close()
                await session.close()
                region.view[:4096] = bytes(4096)
