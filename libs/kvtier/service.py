"""The lifecycle every kvtier service shares: one `run_service()` from config to clean exit.

Start: TLS material (unless insecure) → metrics endpoint → gRPC server (health NOT_SERVING) on
host:grpc_port (mutual TLS: services and operators) and host:client_port (TLS: users with session
tokens) → etcd over mutual TLS (retried with backoff) → register under a lease → health SERVING
→ background loops in one TaskGroup.
Stop (SIGTERM/SIGINT only set an Event): cancel loops → revoke the lease → health NOT_SERVING →
drain for `shutdown_grace_s` (gRPC calls, the service's own servers: `ServiceSpec.on_drain`,
data-plane calls: `_drain`) → close what the drained calls used (`on_drained`) and the data
plane → close etcd → stop metrics. Shutdown is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health_pb2

import kvtier
from kvtier import (
    authservice,
    clustermap,
    config,
    errors,
    membership,
    principal,
    rpc,
    security,
    telemetry,
    tokens,
    tracing,
)
from kvtier.proto.auth.v1 import auth_pb2, auth_pb2_grpc
from kvtier.proto.common.v1 import common_pb2, common_pb2_grpc
from kvtier.transport import dataplane as transport_dataplane
from kvtier.transport import grpc_service as dataplane_grpc
from kvtier.transport import registry as transport_registry

log = logging.getLogger(__name__)

C = TypeVar("C", bound=config.ServiceConfig)

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(slots=True)
class Context:
    """What a service's servicers and loops get from the shared runtime."""

    cfg: config.ServiceConfig
    node_id: str
    store: membership.EtcdMembership
    map_view: clustermap.MapView
    #: The node's data plane (regions, grants, transports) when spec.dataplane is set.
    dataplane: transport_dataplane.DataPlane | None = None
    #: The node's TLS identity (None in an insecure cluster).
    tls: security.ServerTLS | None = None
    #: How the node calls other nodes: mutual TLS as itself (or insecure).
    security: security.ClientSecurity = field(
        default_factory=lambda: security.ClientSecurity(insecure=True)
    )


@dataclass(slots=True)
class ServiceSpec:
    """How one service plugs into `run_service`."""

    role: int
    label: str
    node_id: str
    #: Adds the service's servicers to the server; returns their full names (for reflection).
    add_servicers: Callable[[grpc.aio.Server, Context], Sequence[str]]
    #: Current drives, for datanodes; called at registration.
    drives: Callable[[], Sequence[common_pb2.Drive]] = tuple
    #: Long-running loops, started once registered; each gets the Context.
    loops: Sequence[Callable[[Context], Coroutine[Any, Any, None]]] = field(default_factory=tuple)
    #: Whether this process watches the cluster map (and checks callers' epochs).
    watches_map: bool = True
    #: Whether the node owns bulk bytes and serves a data plane (cfg: DataPlaneServiceConfig).
    dataplane: bool = False
    #: Releases what build() took (state-dir locks); called last at shutdown.
    on_close: Callable[[], object] = lambda: None
    #: Starts what else the node serves (the gateway's S3 HTTP server) once gRPC serves and
    #: before it registers; may fill in the NodeInfo it will announce.
    on_serve: Callable[[Context, common_pb2.NodeInfo], Awaitable[None]] | None = None
    #: Whether users (session tokens) call this node: it then also serves client_port.
    serves_users: bool = True
    #: Nodes that can open users' secrets serve AuthService with this user lookup.
    user_lookup: Callable[[Context], authservice.UserLookup] | None = None
    #: Who may open data-plane sessions (default: every authenticated caller).
    dataplane_access: Callable[[principal.Principal], bool] | None = None
    #: Drains what else the node serves (the gateway's S3 server: stop accepting, finish what
    #: is in flight) within the grace period given; runs while gRPC drains, after the lease
    #: is revoked and health says NOT_SERVING.
    on_drain: Callable[[Context, float], Awaitable[None]] | None = None
    #: Closes what in-flight calls used (connections to other nodes), once they are drained.
    on_drained: Callable[[Context], Awaitable[None]] | None = None


class _NodeServicer(common_pb2_grpc.NodeServiceServicer):
    def __init__(self, info: common_pb2.NodeInfo, view: clustermap.MapView | None) -> None:
        self._info = info
        self._view = view
        self._started = time.monotonic()

    async def GetNodeInfo(
        self, request: common_pb2.GetNodeInfoRequest, context: rpc.ServicerContext
    ) -> common_pb2.GetNodeInfoResponse:
        return common_pb2.GetNodeInfoResponse(
            node=self._info,
            map_epoch=self._view.epoch() if self._view is not None else 0,
            uptime_s=time.monotonic() - self._started,
        )


async def run_service(cfg: config.ServiceConfig, spec: ServiceSpec, stop: asyncio.Event) -> None:
    """Run one service until `stop` is set; returns after a clean shutdown.

    Raises errors.Unavailable when etcd cannot be reached within cfg.etcd_wait_s, and
    errors.AlreadyExists when the node id is held by another live process. A stop during
    start-up (etcd still unreachable, an old lease still held) ends it at once.
    """
    tls = _server_tls(cfg, spec)
    client_security = (
        tls.client_security() if tls is not None else security.ClientSecurity(insecure=True)
    )
    store = membership.EtcdMembership(cfg.etcd_endpoints, cfg.etcd_prefix, security=client_security)
    view = clustermap.MapView(store)
    ctx = Context(
        cfg=cfg, node_id=spec.node_id, store=store, map_view=view, tls=tls,
        security=client_security,
    )  # fmt: skip
    metrics = telemetry.MetricsServer(
        cfg.host,
        cfg.metrics_port,
        tls=(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file) if tls is not None else None,
    )
    server: grpc.aio.Server | None = None
    health: Any = None
    try:
        try:
            metrics_port = metrics.start() if cfg.metrics_port >= 0 else None
        except OSError:
            raise config.ConfigError(
                port_taken("metrics_port", f"{cfg.host}:{cfg.metrics_port}")
            ) from None
        server, health, info, names = _build(cfg, spec, ctx, metrics_port)
        starting = asyncio.ensure_future(_start(cfg, spec, ctx, server, health, info, names))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                log.info("stop requested during start-up")
        with contextlib.suppress(asyncio.CancelledError):
            await starting  # re-raises what start-up raised
        if not starting.cancelled():
            await _run_loops(ctx, spec, stop)
    finally:
        await _shutdown(cfg, ctx, health, server, metrics, spec)


def _server_tls(cfg: config.ServiceConfig, spec: ServiceSpec) -> security.ServerTLS | None:
    """The node's TLS identity; ConfigError when its certificate is not of this role."""
    tls = security.ServerTLS.from_config(cfg)
    if tls is None:
        log.warning(
            "insecure: no TLS and no authentication; every caller has every right. Never "
            "run this on a network."
        )
        return None
    if tls.identity.role != spec.label:
        raise config.ConfigError(
            f"tls_cert_file: the certificate is for role {tls.identity.role!r}, this node is "
            f"a {spec.label}"
        )
    return tls


def _authenticator(ctx: Context) -> rpc.Authenticator:
    tls = ctx.tls
    if tls is None:
        return rpc.Authenticator(insecure=True)
    files = tls.files
    verifier = tokens.TokenVerifier(lambda: files.material.ca_pem)
    return rpc.Authenticator(cluster=tls.identity.cluster, verifier=verifier)


def _add_ports(
    cfg: config.ServiceConfig, spec: ServiceSpec, ctx: Context, server: grpc.aio.Server
) -> tuple[int, int | None]:
    """Bind the service port (mutual TLS) and the client port (TLS) when users call this
    node; insecure: one plaintext port. Returns (grpc port, client port or None)."""
    if ctx.tls is None:
        return _bind(server, "grpc_port", f"{cfg.host}:{cfg.grpc_port}", None), None
    mutual = ctx.tls.credentials(require_client_cert=True)
    port = _bind(server, "grpc_port", f"{cfg.host}:{cfg.grpc_port}", mutual)
    if not spec.serves_users or cfg.client_port < 0:
        return port, None
    plain = ctx.tls.credentials(require_client_cert=False)
    return port, _bind(server, "client_port", f"{cfg.host}:{cfg.client_port}", plain)


def _bind(
    server: grpc.aio.Server, setting: str, address: str, creds: grpc.ServerCredentials | None
) -> int:
    """Bind address; ConfigError (one line, exit 2) when it cannot be: a taken port is the
    likely cause, since the services' default ports are fixed (docs/operations.md)."""
    try:
        if creds is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, creds)
    except RuntimeError:
        raise config.ConfigError(port_taken(setting, address)) from None


def port_taken(setting: str, address: str) -> str:
    """The one-line error of a port that cannot be bound."""
    return (
        f"{setting}: cannot listen on {address} (in use by another process?); set "
        f"--{setting.replace('_', '-')} (0: any free port)"
    )


def _build(
    cfg: config.ServiceConfig, spec: ServiceSpec, ctx: Context, metrics_port: int | None
) -> tuple[grpc.aio.Server, Any, common_pb2.NodeInfo, list[str]]:
    """The server with every servicer, and the NodeInfo this node will announce."""
    view = ctx.map_view
    server, health = rpc.build_server(
        service_label=spec.label,
        max_message_bytes=cfg.max_message_bytes,
        epoch_source=view.epoch if spec.watches_map else (lambda: None),
        authenticator=_authenticator(ctx),
    )
    advertised = cfg.advertised_host()
    if spec.dataplane:  # before the servicers, which register their regions in it
        ctx.dataplane = _make_dataplane(cfg, spec, advertised)
    names = list(spec.add_servicers(server, ctx))
    port, client_port = _add_ports(cfg, spec, ctx, server)
    info = common_pb2.NodeInfo(
        node_id=spec.node_id,
        role=spec.role,  # type: ignore[arg-type]
        grpc_address=f"{advertised}:{port}",
        client_address=(
            f"{cfg.advertised_client_host()}:{client_port}" if client_port is not None else ""
        ),
        tls=ctx.tls is not None,
        metrics_address=f"{advertised}:{metrics_port}" if metrics_port is not None else "",
        hostname=socket.gethostname(),
        pid=os.getpid(),
        version=kvtier.__version__,
        started_at_unix_ms=int(time.time() * 1000),
    )
    if spec.user_lookup is not None:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            authservice.AuthServicer(spec.user_lookup(ctx), ctx.tls), server
        )
        names.append(auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name)
    common_pb2_grpc.add_NodeServiceServicer_to_server(
        _NodeServicer(info, view if spec.watches_map else None), server
    )
    names.append(common_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name)
    if ctx.dataplane is not None:
        common_pb2_grpc.add_DataPlaneServiceServicer_to_server(
            dataplane_grpc.DataPlaneServicer(ctx.dataplane), server
        )
        names.append(common_pb2.DESCRIPTOR.services_by_name["DataPlaneService"].full_name)
    rpc.enable_reflection(server, names)
    telemetry.NODE_INFO.info({"node_id": spec.node_id, "role": spec.label})
    return server, health, info, names


async def _start(
    cfg: config.ServiceConfig,
    spec: ServiceSpec,
    ctx: Context,
    server: grpc.aio.Server,
    health: Any,
    info: common_pb2.NodeInfo,
    names: list[str],
) -> None:
    """Serve (NOT_SERVING), reach etcd, register, then report SERVING."""
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if ctx.dataplane is not None:
        info.dataplane.CopyFrom(await ctx.dataplane.start())
    await server.start()
    log.info("%s %s serving gRPC on %s", spec.label, spec.node_id, info.grpc_address)
    if spec.on_serve is not None:
        await spec.on_serve(ctx, info)
    await ctx.store.connect(cfg.etcd_wait_s)
    info.drives.extend(await asyncio.to_thread(spec.drives))
    await ctx.store.register(info, cfg.lease_ttl_s)
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s %s ready", spec.label, spec.node_id)


def _make_dataplane(
    cfg: config.ServiceConfig, spec: ServiceSpec, advertised: str
) -> transport_dataplane.DataPlane:
    if not isinstance(cfg, config.DataPlaneServiceConfig):
        raise TypeError("a data-plane service needs a DataPlaneServiceConfig")
    settings = transport_registry.ServerSettings(
        host=cfg.host,
        advertise_host=advertised,
        client_advertise_host=cfg.advertise_client_host,
        tcp_port=cfg.dataplane_port,
        rdma_device=cfg.rdma_device,
        max_inflight_bytes=cfg.dataplane_max_inflight_bytes,
        max_connections_per_principal=cfg.dataplane_max_connections_per_principal,
        tls=cfg.dataplane_tls,
        tls_cert_file=cfg.tls_cert_file,
        tls_key_file=cfg.tls_key_file,
        tls_ca_file=cfg.tls_ca_file,
    )
    if spec.dataplane_access is None:
        return transport_dataplane.DataPlane(spec.node_id, cfg.dataplane_transports, settings)
    return transport_dataplane.DataPlane(
        spec.node_id, cfg.dataplane_transports, settings, may_open=spec.dataplane_access
    )


#: How long the background loops get to end once cancelled at stop. A loop stuck past it (an
#: etcd or gRPC call that turned the cancellation into an error and retried, seen once in CI
#: right after an etcd restart) is left behind, logged: the shutdown (lease revoke, drain) must
#: never wait on it.
LOOPS_STOP_S = 10.0


async def _run_loops(ctx: Context, spec: ServiceSpec, stop: asyncio.Event) -> None:
    """Run the service's background loops until stop is set; a loop that fails ends the
    service (an ExceptionGroup, as a TaskGroup raises it)."""
    loops: list[Callable[[], Coroutine[Any, Any, None]]] = [ctx.store.keep_alive]
    if spec.watches_map:
        loops.append(ctx.map_view.run)
    loops.extend(functools.partial(loop, ctx) for loop in spec.loops)
    tasks = [asyncio.ensure_future(loop()) for loop in loops]
    stopping = asyncio.ensure_future(stop.wait())
    try:
        pending: set[asyncio.Future[Any]] = {*tasks, stopping}
        while stopping in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = None if task is stopping or task.cancelled() else task.exception()
                if isinstance(failure, Exception):
                    raise ExceptionGroup("a service loop failed", [failure])
                if failure is not None:  # a BaseException (KeyboardInterrupt, SystemExit)
                    raise failure
        log.info("stopping")
    finally:
        stopping.cancel()
        for task in tasks:
            task.cancel()
        running = [t for t in tasks if not t.done()]
        if running:
            _, stuck = await asyncio.wait(running, timeout=LOOPS_STOP_S)
            for task in stuck:
                log.warning("a background loop did not stop within %gs: %r", LOOPS_STOP_S, task)


async def _shutdown(
    cfg: config.ServiceConfig,
    ctx: Context,
    health: Any,
    server: grpc.aio.Server | None,
    metrics: telemetry.MetricsServer,
    spec: ServiceSpec,
) -> None:
    """Revoke the lease → NOT_SERVING → drain (gRPC, the service's own servers, data-plane
    calls) → close etcd, transports, metrics, locks.

    Each step runs even when an earlier one failed.
    """
    try:
        await ctx.store.deregister()
        if health is not None:
            await health.enter_graceful_shutdown()
        if server is not None:
            await _drain(cfg, ctx, server, spec)
        await ctx.store.close()
    finally:
        try:
            if spec.on_drained is not None and server is not None:
                await spec.on_drained(ctx)
            if ctx.dataplane is not None:
                await ctx.dataplane.stop()
        finally:
            await asyncio.to_thread(metrics.stop)  # blocks up to its poll interval
            spec.on_close()
            log.info("stopped")


async def _drain(
    cfg: config.ServiceConfig, ctx: Context, server: grpc.aio.Server, spec: ServiceSpec
) -> None:
    """Finish what is in flight within shutdown_grace_s.

    A data-plane node (datanode, kvcache, gateway) is first a lame duck for drain_linger_s
    (within the grace): out of the map and NOT_SERVING, it still answers
    gRPC and data-plane calls, because its clients hold sessions and learn that it left from
    the map (every reply carries the newer epoch): calls already on their way, and the staged
    writes they continue (a datanode's CommitWrite after its WRITE_SHARDs), complete instead
    of failing. Then gRPC refuses new calls and lets running ones end. The service's own
    servers (`on_drain`: the gateway's S3) drain meanwhile.
    """
    grace_s = cfg.shutdown_grace_s

    async def grpc_drain() -> None:
        linger_s = min(cfg.drain_linger_s, grace_s) if ctx.dataplane is not None else 0.0
        await asyncio.sleep(linger_s)
        await server.stop(grace_s - linger_s)

    drains: list[Awaitable[None]] = [grpc_drain()]
    if spec.on_drain is not None:
        drains.append(spec.on_drain(ctx, grace_s))
    for result in await asyncio.gather(*drains, return_exceptions=True):
        if isinstance(result, Exception):
            log.warning("draining: %s", result)


def main(
    cfg_cls: type[C],
    service: str,
    build: Callable[[C], ServiceSpec],
    *,
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Entry point of `python -m services.<service>`: config, logging, uvloop, exit code.

    Bad config → one line on stderr and exit 2; a fatal runtime error → one line, exit 1.
    """
    prog = f"kvtier-{service}"
    try:
        cfg = config.load(
            cfg_cls,
            service=service,
            argv=sys.argv[1:] if argv is None else argv,
            description=description,
        )
        # Before build(): opening state logs what recovery did (a datanode's journal replay
        # and index rebuild after a crash); again below with the node id build() settled.
        telemetry.configure_logging(cfg.log_level, cfg.log_format, node_id=cfg.node_id)
        spec = build(cfg)
    except config.ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)  # noqa: T201
        return config.EXIT_BAD_CONFIG
    except OSError as exc:  # a state dir or drive that cannot be created or read
        print(f"{prog}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILED
    telemetry.configure_logging(cfg.log_level, cfg.log_format, node_id=spec.node_id)
    log.info("starting %s with %s", prog, config.describe(cfg))
    if tracing.configure_service(cfg, service=service, node_id=spec.node_id):
        log.info("tracing to %s", tracing.endpoint_from(cfg.otlp_endpoint))

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_service(cfg, spec, stop)

    try:
        uvloop.run(_main())
    except config.ConfigError as exc:  # TLS material found unusable at start
        print(f"{prog}: error: {exc}", file=sys.stderr)  # noqa: T201
        return config.EXIT_BAD_CONFIG
    except errors.KVTierError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILED
    except ExceptionGroup as group:  # raised by a background loop (TaskGroup)
        ours = group.subgroup(errors.KVTierError)
        if ours is None:
            raise
        print(f"{prog}: error: {_first(ours)}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILED
    return EXIT_OK


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first
