"""The one way to build a kvtier gRPC server and channel.

`build_server` returns a grpc.aio server with the shared options (message size, keepalive), the
interceptor that authenticates the caller (`Authenticator`: a cluster certificate over mutual
TLS, or a session token), enforces the authorization table (`kvtier.authz`), binds the caller as
`kvtier.principal.current()`, sets request ids, checks cluster-map epochs, records metrics,
traces the call (`kvtier.tracing`: a SERVER span continuing the caller's W3C `traceparent`) and
maps domain errors to statuses, plus the standard health and reflection services.
`open_channel` is its client-side twin (TLS, or mutual TLS with a certificate); `invoke` is how
typed clients call a stub (deadline, request id, epoch, session token, errors).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtier import authz, errors, pki, principal, telemetry, tokens, tracing
from kvtier import security as security_mod

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"

T = TypeVar("T")

#: Returns the newest epoch the server knows, or None when it does not track the map.
EpochSource = Callable[[], int | None]
if TYPE_CHECKING:  # the stubs' generics are not subscriptable at run time
    #: The context every servicer method receives.
    ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by servers and channels (control-plane sizes, keepalive)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def _metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return str(v)
    return None


class Authenticator:
    """Who is calling: the peer's cluster certificate (mutual TLS on the service port), else a
    session token in the `authorization` metadata (client port), else nobody.

    `insecure` (a cluster run without authentication): everyone is `principal.INSECURE`.
    """

    def __init__(
        self,
        *,
        insecure: bool = False,
        cluster: str = "",
        verifier: tokens.TokenVerifier | None = None,
    ) -> None:
        self.insecure = insecure
        self._cluster = cluster
        self._verifier = verifier

    def identify(
        self, context: ServicerContext, metadata: Iterable[tuple[str, Any]] | None
    ) -> principal.Principal:
        """The caller of one RPC; Unauthenticated for a bad token or a foreign certificate."""
        if self.insecure:
            return principal.INSECURE
        auth = context.auth_context()
        spiffe = list(auth.get("peer_spiffe_id") or auth.get("peer_uri") or ())
        if spiffe:
            ident = pki.parse_uri(spiffe[0].decode(errors="replace"))
            if ident is None or ident.cluster != self._cluster or ident.role == "etcd":
                raise errors.Unauthenticated("the peer certificate names no role of this cluster")
            return principal.service(ident.role, ident.name)
        if auth.get("x509_pem_cert"):
            raise errors.Unauthenticated("the peer certificate names no kvtier role")
        bearer = _metadata_value(metadata, tokens.AUTHORIZATION_KEY)
        if bearer is None:
            return principal.ANONYMOUS
        scheme, _, token = bearer.partition(" ")
        if scheme.lower() != "bearer" or self._verifier is None:
            raise errors.Unauthenticated("authorization must be 'Bearer <session token>'")
        return self._verifier.verify(token.strip())


class _ServerInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, authorization, request ids, epoch checks, metrics and error mapping for
    every RPC of a server."""

    def __init__(
        self, service_label: str, epoch_source: EpochSource, authenticator: Authenticator
    ) -> None:
        self._service_label = service_label
        self._epoch_source = epoch_source
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        rid = _metadata_value(details.invocation_metadata, REQUEST_ID_KEY) or uuid.uuid4().hex
        caller_epoch = _metadata_value(details.invocation_metadata, errors.EPOCH_KEY)
        call = _CallInfo(details.method, method, rid, caller_epoch, details.invocation_metadata)
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary(request: Any, context: ServicerContext) -> Any:
                with self._scope(call, context) as scope:
                    return await scope.run(lambda: inner(request, context))

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
                with self._scope(call, context) as scope:
                    async for item in scope.iterate(lambda: inner_stream(request, context)):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            inner_su: Any = handler.stream_unary

            async def stream_unary(requests: Any, context: ServicerContext) -> Any:
                with self._scope(call, context) as scope:
                    return await scope.run(lambda: inner_su(requests, context))

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        inner_ss: Any = handler.stream_stream  # every handler is authenticated: none slips by

        async def stream_stream(requests: Any, context: ServicerContext) -> AsyncIterator[Any]:
            with self._scope(call, context) as scope:
                async for item in scope.iterate(lambda: inner_ss(requests, context)):
                    yield item

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )

    def _scope(self, call: _CallInfo, context: ServicerContext) -> _CallScope:
        return _CallScope(self, call, context)

    def check_epoch(self, caller_epoch: str | None) -> None:
        """Raise StaleEpoch when the caller's map is older than ours."""
        if caller_epoch is None:
            return
        ours = self._epoch_source()
        try:
            theirs = int(caller_epoch)
        except ValueError:
            raise errors.InvalidArgument(f"bad {errors.EPOCH_KEY}: {caller_epoch!r}") from None
        if ours is not None and theirs < ours:
            raise errors.StaleEpoch(
                f"caller epoch {theirs} is older than {ours}", current_epoch=ours
            )


@dataclasses.dataclass(frozen=True, slots=True)
class _CallInfo:
    """What the interceptor knows of a call before its handler runs."""

    path: str
    method: str
    rid: str
    caller_epoch: str | None
    metadata: Any


class _CallScope:
    """One RPC: authenticates and authorizes the caller, sets the request id, times it, and
    maps what it raises."""

    def __init__(
        self, owner: _ServerInterceptor, call: _CallInfo, context: ServicerContext
    ) -> None:
        self._owner = owner
        self._call = call
        self._method = call.method
        self._rid = call.rid
        self._context = context
        self._code = "OK"
        self._token: Any = None
        self._principal_token: Any = None
        self._start = 0.0
        self._trace: tracing.Scope | None = None

    def __enter__(self) -> _CallScope:
        self._token = telemetry.request_id.set(self._rid)
        self._start = time.perf_counter()
        if tracing.enabled() and not self._call.path.startswith(_UNTRACED):
            self._trace = _server_trace(self._call, self._owner._service_label)
        return self

    def __exit__(self, *exc: object) -> None:
        telemetry.RPC_SECONDS.labels(self._owner._service_label, self._method, self._code).observe(
            time.perf_counter() - self._start
        )
        if self._trace is not None:
            self._trace.span.set_attribute("rpc.grpc.status_code", self._code)
            self._trace.end(error="" if self._code == "OK" else self._code)
        if self._principal_token is not None:
            principal.unbind(self._principal_token)
        telemetry.request_id.reset(self._token)

    def _admit(self) -> None:
        """Authenticate, authorize, bind the caller, check the epoch (raises on refusal)."""
        who = self._owner.authenticator.identify(self._context, self._call.metadata)
        authz.check(self._call.path, who)
        self._principal_token = principal.bind(who)
        self._owner.check_epoch(self._call.caller_epoch)

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            self._admit()
            return await call()
        except BaseException as exc:
            await self._fail(exc)
            raise

    async def iterate(
        self, items: Callable[[], AsyncIterator[T] | Awaitable[None]]
    ) -> AsyncIterator[T]:
        try:
            self._admit()
            produced = items()
            if inspect.isawaitable(produced):  # a handler that sends with context.write
                await produced  # (the standard health service's Watch)
            else:
                async for item in produced:
                    yield item
        except BaseException as exc:
            await self._fail(exc)
            raise

    async def _fail(self, exc: BaseException) -> None:
        """Abort the call with the status exc maps to (abort raises; callers re-raise exc)."""
        if isinstance(exc, errors.KVTierError):
            self._code = exc.grpc_code.name
            self._context.set_trailing_metadata(errors.trailing_metadata(exc))
            await self._context.abort(exc.grpc_code, exc.message)
        elif _is_abort(exc):
            code = self._context.code()
            self._code = code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
        elif isinstance(exc, NotImplementedError):  # a generated base servicer's method
            self._code = grpc.StatusCode.UNIMPLEMENTED.name
            await self._context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_IMPLEMENTED)
        elif isinstance(exc, Exception):
            self._code = grpc.StatusCode.INTERNAL.name
            log.exception("unhandled error in %s", self._method)
            await self._context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {self._rid})"
            )
        else:
            self._code = grpc.StatusCode.CANCELLED.name


#: Services whose calls start no trace (probes and tooling, not work).
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


def _server_trace(call: _CallInfo, service_label: str) -> tracing.Scope | None:
    """The SERVER span of a call, child of the caller's (W3C traceparent in its metadata) or
    the root of a new trace (sampled by the ratio); current while the handler runs."""
    service, _, method = call.path.lstrip("/").rpartition("/")
    return tracing.server_scope(
        call.path.lstrip("/"),
        tracing.extract_pairs(call.metadata),
        {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "kvtier.request_id": call.rid,
            "kvtier.service": service_label,
        },
    )


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a private exception type; it must pass through untouched.
    return type(exc).__name__ == "AbortError"


def build_server(
    *,
    service_label: str,
    max_message_bytes: int,
    epoch_source: EpochSource,
    authenticator: Authenticator | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with the kvtier interceptor and a health service (NOT_SERVING).

    Without an authenticator every caller is `principal.INSECURE` (an insecure server)."""
    server = grpc.aio.server(
        interceptors=[
            _ServerInterceptor(
                service_label, epoch_source, authenticator or Authenticator(insecure=True)
            )
        ],
        options=channel_options(max_message_bytes),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for the given full service names (plus health and reflection)."""
    names = (
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)


def open_channel(
    address: str,
    *,
    security: security_mod.ClientSecurity | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> grpc.aio.Channel:
    """A channel to a kvtier node with the shared options: TLS (mutual with a certificate)
    unless the security is insecure. Without one, the process default (`KVTIER_*` env)."""
    sec = security or security_mod.default()
    options = channel_options(max_message_bytes)
    if sec.insecure:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, sec.channel_credentials(), options=options)


def call_metadata(
    epoch: int | None = None, token: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Metadata for one call: a fresh request id (or the current one), the caller's epoch and
    its session token."""
    rid = telemetry.request_id.get()
    meta: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, rid if rid != "-" else uuid.uuid4().hex),)
    if epoch is not None:
        meta += ((errors.EPOCH_KEY, str(epoch)),)
    if token:
        meta += ((tokens.AUTHORIZATION_KEY, f"Bearer {token}"),)
    if tracing.enabled():  # the current span's W3C context (traceparent), when there is one
        meta += tuple(tracing.inject())
    return meta


async def invoke(
    method: Callable[..., Awaitable[T]],
    request: Any,
    *,
    timeout_s: float,
    epoch: int | None = None,
    token: str | None = None,
) -> T:
    """Call a unary stub method with a deadline; failures come back as kvtier errors. Inside
    a trace the call gets a CLIENT span, whose context the server continues."""
    if not tracing.in_trace():
        return await _invoke(method, request, timeout_s=timeout_s, epoch=epoch, token=token)
    path = getattr(method, "_method", b"")
    name = path.decode(errors="replace").lstrip("/") if isinstance(path, bytes) else "grpc"
    with tracing.span(name, kind=tracing.CLIENT, attributes={"rpc.system": "grpc"}):
        return await _invoke(method, request, timeout_s=timeout_s, epoch=epoch, token=token)


async def _invoke(
    method: Callable[..., Awaitable[T]],
    request: Any,
    *,
    timeout_s: float,
    epoch: int | None = None,
    token: str | None = None,
) -> T:
    try:
        return await method(request, timeout=timeout_s, metadata=call_metadata(epoch, token))
    except grpc.aio.AioRpcError as exc:
        unknown = exc.code() == grpc.StatusCode.UNIMPLEMENTED and not _names_a_kind(exc)
        if unknown and exc.details() != _NOT_IMPLEMENTED:
            # grpc's own answer: the server has no such service (a gateway's address given
            # where the metadata service's belongs, say): say so rather than "Method not found!".
            path = getattr(method, "_method", b"") or b"this RPC"
            name = path.decode(errors="replace") if isinstance(path, bytes) else str(path)
            raise errors.InvalidArgument(
                f"the server at this address does not serve {name}: is it the address of the "
                "right service?",
                reason="WrongService",
            ) from None
        raise errors.from_rpc_error(exc) from None


#: What a kvtier server says of an RPC its servicer lacks (grpc says "Method not found!" of a
#: service it does not serve at all).
_NOT_IMPLEMENTED = "method not implemented"


def _names_a_kind(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call carries a kvtier error kind (a kvtier server raised it)."""
    return any(key == errors.ERROR_KIND_KEY for key, _ in exc.trailing_metadata() or ())


async def check_health(
    address: str,
    *,
    timeout_s: float = 2.0,
    service: str = "",
    security: security_mod.ClientSecurity | None = None,
) -> str:
    """The health status name of a node ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE"."""
    async with open_channel(address, security=security) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed types only the sync stub
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
