"""python -m services.gateway: the stateless front door."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Sequence

import grpc
from aiohttp import web

from kvtier import authservice, buckets, erasure, errors, principal, service, users
from kvtier import config as kvtier_config
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    objects_pb2,
    objects_pb2_grpc,
)
from kvtier.transport import slots
from services.gateway import (
    config,
    datanodes,
    front,
    healing,
    heap,
    lifecycle,
    listing,
    objects,
    pooldrain,
    rebuild,
    servicer,
)
from services.gateway.s3 import access_log as s3_access_log
from services.gateway.s3 import auth as s3_auth
from services.gateway.s3 import http_log as s3_http_log
from services.gateway.s3 import server as s3_server
from services.gateway.s3 import tls as s3_tls

_SWEEP_S = 60.0

log = logging.getLogger(__name__)


class _Gateway:
    def __init__(self, cfg: config.GatewayConfig, node_id: str) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.executor = erasure.new_executor(cfg.codec_threads)
        self.front: front.ObjectFront | None = None
        self.nodes: datanodes.Datanodes | None = None
        self.healer: healing.Healer | None = None
        self.drainer: pooldrain.Drainer | None = None
        self.expirer: lifecycle.Expirer | None = None
        self.s3_runner: web.AppRunner | None = None
        self.s3_tls: s3_tls.S3TLS | None = None
        self.users: users.UserCache | None = None
        self.access: s3_access_log.AccessLog | None = None
        self.buckets: buckets.BucketCache | None = None
        #: Set when the shutdown drain begins: S3 responses then close their connections.
        self.draining = False

    def add_servicers(self, server: grpc.aio.Server, ctx: service.Context) -> Sequence[str]:
        dataplane = ctx.dataplane
        if dataplane is None:
            raise errors.Internal("the gateway needs its data plane")
        region = dataplane.regions.create(self.cfg.staging_bytes, name="gateway-staging")
        staging = slots.SlotPool(region, self.cfg.staging_slot_bytes)
        self.nodes = datanodes.Datanodes(
            ctx.map_view, client_id=self.node_id, security=ctx.security,
            max_write_bytes=self.cfg.datanode_call_bytes,
        )  # fmt: skip
        engine = objects.ObjectEngine(
            ctx.map_view, self.nodes, staging, self.executor,
            max_staged_writes_per_tenant=self.cfg.max_staged_writes_per_tenant,
            small_write_max_bytes=self.cfg.small_write_max_bytes,
        )  # fmt: skip
        self.buckets = buckets.BucketCache(buckets.BucketStore(ctx.store))
        self.front = front.ObjectFront(
            ctx.map_view, engine, listing.Lister(ctx.map_view, self.nodes), watched=self.buckets,
            # A cluster without authentication lets every data-plane session in.
            insecure=self.cfg.insecure, security=ctx.security,
        )  # fmt: skip
        dataplane.ctx.call_handler = self.front.handle_call
        self.healer = healing.Healer(
            ctx.map_view,
            self.front,
            rebuild.Rebuilder(self.nodes, staging, self.executor),
            max_objects=self.cfg.heal_max_objects,
            scan_interval_s=self.cfg.scan_interval_s,
            scan_objects_per_cycle=self.cfg.scan_objects_per_cycle,
        )
        self.expirer = lifecycle.Expirer(
            self.front, interval_s=self.cfg.lifecycle_interval_s, day_s=self.cfg.lifecycle_day_s,
            identity=principal.service("gateway", self.node_id),
            leader=lifecycle.lowest_gateway(ctx.map_view, self.node_id),
        )  # fmt: skip
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            servicer.GatewayServicer(ctx.map_view), server
        )
        objects_pb2_grpc.add_ObjectServiceServicer_to_server(
            servicer.ObjectServicer(self.front), server
        )
        self.drainer = pooldrain.Drainer(
            ctx.map_view, self.front, grace_s=self.cfg.pool_drain_grace_s
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            servicer.AdminServicer(self.healer, self.drainer), server
        )
        return [
            gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
            objects_pb2.DESCRIPTOR.services_by_name["ObjectService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        ]

    async def sweep_loop(self, ctx: service.Context) -> None:
        """Abort uploads whose client vanished, every _SWEEP_S."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            if self.front is not None:
                await sweep_once(self.front)

    async def drain(self, ctx: service.Context, grace_s: float) -> None:
        """Shutdown, once out of the map: S3 stops accepting connections at once (a load
        balancer's next connect goes to another gateway), requests in flight finish within
        grace_s and their responses say `Connection: close`, idle keep-alive connections
        close; what is still running after grace_s is cancelled."""
        self.draining = True
        if self.s3_runner is not None:
            runner, self.s3_runner = self.s3_runner, None
            await runner.cleanup()  # its shutdown_timeout is the grace

    async def drained(self, ctx: service.Context) -> None:
        """After the drain: close the connections to datanodes and kvcache nodes."""
        if self.front is not None:
            await self.front.close()
        if self.nodes is not None:
            await self.nodes.close()
        if self.access is not None:
            self.access.close()

    async def start_s3(self, ctx: service.Context, info: common_pb2.NodeInfo) -> None:
        """Serve the S3 HTTP API (unless s3_port is -1) and announce its address."""
        if self.cfg.s3_port < 0 or self.front is None:
            return
        assert self.users is not None
        authenticator = s3_auth.Authenticator(
            s3_auth.user_lookup(self.users),
            region=self.cfg.s3_region,
            tenants=self.users.has_tenant,
        )
        self.access = s3_access_log.AccessLog(self.cfg.s3_access_log)
        s3 = s3_server.S3Server(
            self.front, authenticator, region=self.cfg.s3_region, domain=self.cfg.s3_domain,
            body_timeout_s=self.cfg.s3_body_timeout_s, send_timeout_s=self.cfg.s3_send_timeout_s,
            lifecycle_day_s=self.cfg.lifecycle_day_s, access=self.access,
        )  # fmt: skip
        self.s3_tls = self._s3_tls(ctx)
        app = s3.app()
        app.on_response_prepare.append(self._closing)
        # cleanup() (at drain) waits this long for requests in flight, then cancels them.
        self.s3_runner = web.AppRunner(
            app, access_log=None, handle_signals=False,
            shutdown_timeout=ctx.cfg.shutdown_grace_s,
            logger=s3_http_log.S3ServerLogger(),  # not-HTTP bytes: one line, no traceback
        )  # fmt: skip
        await self.s3_runner.setup()
        site = web.TCPSite(
            self.s3_runner, self.cfg.host, self.cfg.s3_port, backlog=1024,
            ssl_context=self.s3_tls.context if self.s3_tls is not None else None,
        )  # fmt: skip
        try:
            await site.start()
        except OSError:
            address = f"{self.cfg.host}:{self.cfg.s3_port}"
            raise kvtier_config.ConfigError(service.port_taken("s3_port", address)) from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        info.s3_address = f"{self.cfg.advertised_host()}:{port}"
        scheme = "https" if self.s3_tls is not None else "http"
        log.info("gateway %s serving S3 on %s://%s", self.node_id, scheme, info.s3_address)
        if self.s3_tls is None and ctx.tls is not None:
            log.warning("s3_plain_http: S3 bodies and presigned URLs travel in clear")

    async def _closing(self, request: web.Request, response: web.StreamResponse) -> None:
        """While draining, every response ends its connection (the client reconnects, through
        its load balancer, to a gateway that stays)."""
        if self.draining:
            response.force_close()

    def _s3_tls(self, ctx: service.Context) -> s3_tls.S3TLS | None:
        """HTTPS with the operator's certificate, else the gateway's cluster certificate;
        None (plain HTTP) in an insecure cluster or with s3_plain_http."""
        try:
            if self.cfg.s3_tls_cert_file:
                return s3_tls.S3TLS.from_files(self.cfg.s3_tls_cert_file, self.cfg.s3_tls_key_file)
            if ctx.tls is None or self.cfg.s3_plain_http:
                return None
            return s3_tls.S3TLS(ctx.tls.files)
        except errors.InvalidArgument as exc:
            raise kvtier_config.ConfigError(f"s3 tls: {exc.message}") from None

    async def s3_tls_loop(self, ctx: service.Context) -> None:
        """Serve a replaced S3 certificate on new connections (see s3/tls.py)."""
        while self.s3_tls is not None:
            await asyncio.sleep(s3_tls.RELOAD_CHECK_S)
            self.s3_tls.reload_if_changed()

    def user_lookup(self, ctx: service.Context) -> authservice.UserLookup:
        """The users (and their secrets) as this gateway sees them: for S3 signatures and for
        session tokens (AuthService). Kept current by s3_loop's etcd watch."""
        self.users = s3_auth.user_cache(ctx.store, self.cfg.master_key_file)
        return self.users.get

    async def s3_loop(self, ctx: service.Context) -> None:
        """Keep the users current (an etcd watch) while S3 serves (drained by `drain`)."""
        if self.users is not None:
            await self.users.run()

    async def bucket_loop(self, ctx: service.Context) -> None:
        """Follow every bucket's record in etcd (what object requests are served from)."""
        if self.buckets is not None:
            await self.buckets.run()

    async def heal_loop(self, ctx: service.Context) -> None:
        """Drain the heal queue."""
        if self.healer is not None:
            await self.healer.run_queue()

    async def scan_loop(self, ctx: service.Context) -> None:
        """Verify and heal a slice of the objects every scan_interval_s."""
        if self.healer is not None:
            await self.healer.run_scanner()

    async def lifecycle_loop(self, ctx: service.Context) -> None:
        """Expire objects and uploads by the buckets' lifecycle rules every
        lifecycle_interval_s."""
        if self.expirer is not None:
            await self.expirer.run()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


async def sweep_once(objects_front: front.ObjectFront) -> None:
    """One pass of the upload sweeps. A failed pass is logged and left to the next one: the
    drives may be out of reach for a while (a rack's power, a partition), and a loop that
    raised would end the gateway itself (`kvtier.service`: a failed loop stops the service),
    as a whole-tier power loss did in tests/fault/test_power_loss.py."""
    sweeps = (
        ("staged writes", objects_front.engine.sweep),
        ("multipart", objects_front.multipart.sweep),
    )
    for name, sweep in sweeps:
        try:
            await sweep()
        except errors.KVTierError as exc:  # unreachable drives, no quorum: the next pass
            log.warning("%s sweep skipped: %s", name, exc)
        except Exception:  # boundary: the next pass tries again
            log.exception("%s sweep failed", name)


def build(cfg: config.GatewayConfig) -> service.ServiceSpec:
    """The gateway's plug-in to the shared runtime (stateless: a fresh id unless configured)."""
    node_id = cfg.node_id or f"gateway-{uuid.uuid4().hex[:8]}"
    gateway = _Gateway(cfg, node_id)
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_GATEWAY,
        label="gateway",
        node_id=node_id,
        add_servicers=gateway.add_servicers,
        dataplane=True,
        loops=(
            gateway.sweep_loop,
            gateway.bucket_loop,
            gateway.heal_loop,
            gateway.scan_loop,
            gateway.lifecycle_loop,
            gateway.s3_loop,
            gateway.s3_tls_loop,
        ),
        on_close=gateway.close,
        on_serve=gateway.start_s3,
        on_drain=gateway.drain,
        on_drained=gateway.drained,
        user_lookup=gateway.user_lookup,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a gateway; returns the process exit code."""
    heap.tune()  # body-sized buffers from a heap that keeps its pages (services/gateway/heap.py)
    return service.main(
        config.GatewayConfig,
        "gateway",
        build,
        description="kvtier gateway: the front door (gRPC object API, S3).",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
