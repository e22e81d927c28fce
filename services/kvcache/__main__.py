"""python -m services.kvcache: a DRAM block-pool node of the KV-cache tier."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc

from kvtier import authz, errors, features, identity, kvsettings, principal, service
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from services.kvcache import (
    blocks,
    config,
    durable,
    events,
    eventsauth,
    gatewaylink,
    servicer,
    spillqueue,
)
from services.kvcache import store as block_store

log = logging.getLogger(__name__)


class _Node:
    """What build() prepares and the runtime hooks fill in: the arena and its block API."""

    def __init__(self, cfg: config.KVCacheConfig) -> None:
        self.cfg = cfg
        self.blocks: blocks.BlockService | None = None
        self.tier: durable.DurableTier | None = None
        self.settings: kvsettings.KVSettingsStore | None = None
        self.events: events.EventPublisher | None = None

    def add_servicers(self, server: grpc.aio.Server, ctx: service.Context) -> Sequence[str]:
        """Allocate the arena in the data plane (registered with every transport at its
        start), build the block API, and serve it over gRPC and as data-plane calls."""
        dataplane = ctx.dataplane
        if dataplane is None:
            raise errors.Internal("a kvcache node needs its data plane")
        cfg = self.cfg
        arena = dataplane.regions.create(cfg.arena_bytes, name="kvcache-arena")
        tier = self._durable_tier(ctx)
        store = block_store.BlockStore(
            cfg.arena_bytes,
            page_bytes=cfg.page_bytes,
            policy=cfg.eviction_policy,
            high_watermark=cfg.high_watermark,
            low_watermark=cfg.low_watermark,
            put_timeout_s=cfg.put_timeout_s,
            max_pin_s=cfg.max_pin_s,
            max_pinned_fraction=cfg.max_pinned_fraction,
            default_quota_bytes=cfg.default_tenant_quota_bytes or None,
            spill_sink=tier.spill,
            spill_admit=tier.admit,
            # An extent a transport still moves bytes in, or a live descriptor still names, is
            # quarantined instead of reused (the descriptor reuse attack).
            reuse_guard=functools.partial(dataplane.in_use, arena.region_id),
        )
        tier.bind(store, arena.view)
        if cfg.kv_events:  # listening before the first put; bound and started in start_events
            keys = None
            if cfg.events_authenticated():
                keys = eventsauth.SubscriberKeys(ttl_s=cfg.kv_events_key_ttl_s)
            elif not cfg.insecure:
                log.warning("kv_events_auth=none: anyone who reaches the KV-event ports reads "
                            "every tenant's block hashes")  # fmt: skip
            self.events = events.EventPublisher(
                ctx.node_id, host=cfg.advertised_host(), port=cfg.kv_events_port,
                replay_port=cfg.kv_events_replay_port,
                queue_batches=cfg.kv_events_queue_batches,
                replay_batches=cfg.kv_events_replay_batches, keys=keys,
            )  # fmt: skip
            store.listener = tier.events = self.events
        for tenant, quota in cfg.quotas().items():
            store.set_quota(tenant, quota)

        # gRPC puts and gets grant descriptors (with the rkey when rdma is served: the rdma
        # server's grant wraps the issuer's, so revoke works for every transport's grants).
        self.blocks = blocks.BlockService(
            store, arena, dataplane.grant, read_lease_s=cfg.read_lease_s,
            epoch=ctx.map_view.epoch, tier=tier, revoke=dataplane.issuer.revoke,
        )  # fmt: skip
        dataplane.ctx.call_handler = self.blocks.handle_call
        self.settings = kvsettings.KVSettingsStore(ctx.store)
        kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(
            servicer.KVCacheServicer(self.blocks, self.settings, events=self.events), server
        )
        log.info("kvcache arena: %d bytes, policy %s", cfg.arena_bytes, cfg.eviction_policy)
        return [kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name]

    def _durable_tier(self, ctx: service.Context) -> durable.DurableTier:
        """The durable tier through the map's gateways, with the configured policies."""
        cfg = self.cfg
        link = gatewaylink.GatewayObjects(
            ctx.map_view,
            ctx.node_id,
            timeout_s=max(cfg.spill_timeout_s, cfg.read_through_timeout_s),
            security=ctx.security,
        )
        queue = spillqueue.SpillQueue(
            link,
            buffer_bytes=cfg.spill_buffer_bytes,
            page_bytes=cfg.page_bytes,
            concurrency=cfg.spill_concurrency,
            retries=cfg.spill_retries,
            timeout_s=cfg.spill_timeout_s,
            drain_s=cfg.spill_drain_s,
        )
        self.tier = durable.DurableTier(
            queue, read_timeout_s=cfg.read_through_timeout_s,
            write_through_timeout_s=cfg.write_through_timeout_s,
        )  # fmt: skip
        for (tenant, namespace), mode in cfg.durable_policies().items():
            self.tier.set_policy(tenant, namespace, durable.parse_durability(mode))
        return self.tier

    async def start_events(self, ctx: service.Context, info: common_pb2.NodeInfo) -> None:
        """Bind the KV-event sockets and announce them in the NodeInfo (before it registers),
        with what this node does that an older one does not (kvtier.features): clients send
        compare-and-swap puts only to a node that says so."""
        info.features.append(features.KVCACHE_COMPARE_AND_SWAP)
        if self.events is not None:
            self.events.start()
            info.kv_events_endpoint = self.events.endpoint
            info.kv_events_replay_endpoint = self.events.replay_endpoint
            if self.events.keys is not None:
                info.kv_events_server_key = self.events.keys.public_key

    def close(self, lock: IO[bytes]) -> None:
        """Stop the KV events, then release the state dir."""
        if self.events is not None:
            self.events.close()
        lock.close()

    async def spill_loop(self, ctx: service.Context) -> None:
        """Upload spilled blocks (and at a stop, drain what is queued for spill_drain_s)."""
        if self.tier is None:
            return
        try:
            await self.tier.queue.run()
        finally:
            await self.tier.queue.objects.close()

    async def settings_loop(self, ctx: service.Context) -> None:
        """Apply the cluster's KV settings (quotas, namespace TTLs and durability) from etcd, at
        start and after every change: they override this node's configuration."""
        if self.settings is None or self.blocks is None:
            return
        async for snapshot in self.settings.watch():
            for setting in snapshot:
                try:
                    self.blocks.apply_setting(setting)
                except errors.KVTierError as exc:  # e.g. durability on a node without a tier
                    log.warning("KV setting not applied here: %s", exc.message)

    async def sweep_loop(self, ctx: service.Context) -> None:
        """Expire TTLs, stale leases and stuck puts; refresh the gauges."""
        while True:
            await asyncio.sleep(self.cfg.expire_interval_s)
            if self.blocks is not None:
                expired = self.blocks.sweep()
                if expired:
                    log.debug("expired %d blocks by TTL", expired)


def build(cfg: config.KVCacheConfig) -> service.ServiceSpec:
    """Lock the state dir, load the identity, and plug into the runtime."""
    data_dir = Path(cfg.data_dir)
    lock = identity.lock_state_dir(data_dir)
    node = _Node(cfg)
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_KVCACHE,
        label="kvcache",
        node_id=identity.load_or_create(data_dir, cfg.node_id, "kvcache"),
        on_close=functools.partial(node.close, lock),
        dataplane=True,
        add_servicers=node.add_servicers,
        on_serve=node.start_events,
        loops=(node.sweep_loop, node.spill_loop, node.settings_loop),
        dataplane_access=_block_api_callers,
    )


#: A data RPC of the block API: its rule in the authorization table is the data-plane calls'.
_BLOCK_API = "/kvtier.kvcache.v1.KVCacheService/BatchGet"


def _block_api_callers(who: principal.Principal) -> bool:
    """Who may open a data-plane session on a kvcache node: whoever may call its block API over
    gRPC (users, gateways, admins), since a session's calls are that API. A kvcache node's
    certificate may not, as it may not call KVCacheService."""
    return authz.table()[_BLOCK_API].allows(who)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a kvcache node; returns the process exit code."""
    return service.main(
        config.KVCacheConfig,
        "kvcache",
        build,
        description="kvtier kvcache node: shared DRAM pools for KV-cache blocks.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
