"""OpenTelemetry traces of every kvtier process (docs/operations.md, "Traces").

A service turns tracing on in its `__main__` (`configure_service`): its spans go to the OTLP/gRPC
collector named by `otlp_endpoint` (flag `--otlp-endpoint`, env `KVTIER_<SERVICE>_OTLP_ENDPOINT`),
else by the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`; the
resource names the service (`kvtier-<service>`) and the node. New traces are sampled with the
probability `trace_sample_ratio`; a caller's decision is followed (parent-based), so a trace is
whole or absent. An SDK process hands its own provider to `use_provider`.

Context travels as W3C trace context: `traceparent` in gRPC metadata and HTTP headers, and, on the
data plane, the sampled caller's trace id and span id in the call header (`wire_context`: 24
bytes, all zero when the call is not traced, so an untraced call costs the server one compare).

Without an endpoint nothing is set up: `enabled()` is False and every helper returns at once
(no span, no context lookup). Spans inside a process (etcd, disk I/O, datanode calls) are made
only within a sampled trace (`child_span`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation import tracecontext

import kvtier

#: W3C trace context header / gRPC metadata key.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Bytes of the data plane's trace field: trace id (16) and span id (8), big-endian.
WIRE_BYTES = 24
NO_WIRE = bytes(WIRE_BYTES)

_PROPAGATOR = tracecontext.TraceContextTextMapPropagator()
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
SERVER = trace.SpanKind.SERVER
CLIENT = trace.SpanKind.CLIENT


#: Marks a root span whose sampling `op_span` decided already (see `root_sampler`).
_PREDRAWN = "kvtier.sampled"


class _State:
    __slots__ = ("on", "provider", "ratio", "tracer")

    def __init__(self) -> None:
        self.on = False
        self.provider: trace.TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        #: The root sampling ratio when `configure` made the provider (op_span draws itself).
        self.ratio: float | None = None


_state = _State()


def enabled() -> bool:
    """Whether this process traces (an endpoint was configured or a provider handed in)."""
    return _state.on


def endpoint_from(configured: str, environ: Mapping[str, str] | None = None) -> str:
    """The collector to export to: the configured one, else the standard OTEL_* variables;
    "" (tracing off) without one, or when OTEL_SDK_DISABLED is true."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return (
        configured
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    ).strip()


def configure(
    *,
    service: str,
    node_id: str,
    endpoint: str,
    sample_ratio: float,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Trace this process to an OTLP/gRPC collector: a provider with the service's resource,
    parent-based ratio sampling and a batching exporter, also set as the global provider.
    Returns False (nothing set up) when `endpoint_from(endpoint)` is empty.

    TLS and headers of the exporter follow the standard variables (an `https://` endpoint, or
    one without a scheme: TLS with OTEL_EXPORTER_OTLP_CERTIFICATE; `http://`: plaintext)."""
    target = endpoint_from(endpoint, environ)
    if not target:
        return False
    if not (math.isfinite(sample_ratio) and 0.0 <= sample_ratio <= 1.0):
        raise ValueError(f"trace_sample_ratio: {sample_ratio} is not within 0..1")
    # The SDK is loaded only when tracing is on.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk import resources
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace import export, sampling

    resource = resources.Resource.create(
        {
            "service.name": f"kvtier-{service}",
            "service.namespace": "kvtier",
            "service.instance.id": node_id or f"pid-{os.getpid()}",
            "service.version": kvtier.__version__,
            "kvtier.node_id": node_id,
        }
    )
    provider = sdk_trace.TracerProvider(
        resource=resource, sampler=sampling.ParentBased(root_sampler(sample_ratio))
    )
    provider.add_span_processor(export.BatchSpanProcessor(OTLPSpanExporter(endpoint=target)))
    trace.set_tracer_provider(provider)
    use_provider(provider, sample_ratio=sample_ratio)
    return True


def root_sampler(ratio: float) -> Any:
    """TraceIdRatioBased(ratio) for new traces, except a root that `op_span` drew already
    (marked `_PREDRAWN`): sampled. op_span draws first so that an operation left out costs
    one random number, not a span (the hot path of the KV SDK)."""
    from opentelemetry.sdk.trace import sampling

    class RootSampler(sampling.Sampler):
        def __init__(self) -> None:
            self._ratio = sampling.TraceIdRatioBased(ratio)

        def should_sample(
            self,
            parent_context: otel_context.Context | None,
            trace_id: int,
            name: str,
            kind: trace.SpanKind | None = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> sampling.SamplingResult:
            if attributes and attributes.get(_PREDRAWN):
                kept = {k: v for k, v in attributes.items() if k != _PREDRAWN}
                return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, kept)
            return self._ratio.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"KvtierRoot{{{self._ratio.get_description()}}}"

    return RootSampler()


def configure_service(cfg: Any, *, service: str, node_id: str) -> bool:
    """`configure` from a service's config (`otlp_endpoint`, `trace_sample_ratio`)."""
    return configure(
        service=service,
        node_id=node_id,
        endpoint=cfg.otlp_endpoint,
        sample_ratio=cfg.trace_sample_ratio,
    )


def use_provider(
    provider: trace.TracerProvider | None, *, sample_ratio: float | None = None
) -> None:
    """Trace with provider (an SDK application's own, or a test's); None turns tracing off.
    sample_ratio: only for a provider whose root sampler is `root_sampler(sample_ratio)`
    (`op_span` then draws new traces itself); else the provider's sampler decides alone."""
    _state.provider, _state.ratio = provider, sample_ratio
    if provider is None:
        _state.on, _state.tracer = False, trace.NoOpTracer()
        return
    _state.tracer = provider.get_tracer("kvtier", kvtier.__version__)
    _state.on = True


def shutdown() -> None:
    """Flush and stop the exporter of `configure` (the SDK also does this at exit)."""
    provider = _state.provider
    use_provider(None)
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


def tracer() -> trace.Tracer:
    """The tracer of kvtier's spans (a no-op tracer while tracing is off)."""
    return _state.tracer


def span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span made current for the block (a new trace when none is current, sampled by the
    ratio); a no-op while tracing is off."""
    if not _state.on:
        return _NULL
    return _state.tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def child_span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span made current for the block only inside a sampled trace (etcd, disk I/O, calls
    between nodes): nothing when tracing is off or no recording span is current."""
    if not _state.on or not trace.get_current_span().is_recording():
        return _NULL
    return _state.tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def op_span(
    name: str, *, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A CLIENT span for an SDK operation (a KV get or put), made current for the block: a
    child of the current span, or a new trace sampled by the ratio. A new trace left out
    costs one random number (no span, no context: its data-plane calls go untraced, as any
    unsampled call's do); an operation inside one of the same name (the sync client's
    fallback to the async one) adds none."""
    if not _state.on:
        return _NULL
    current = trace.get_current_span()
    if current.get_span_context().is_valid:
        if getattr(current, "name", None) == name:
            return _NULL
    elif _state.ratio is not None:
        if random.random() >= _state.ratio:
            return _NULL
        attributes = {**(attributes or {}), _PREDRAWN: True}
    return _state.tracer.start_as_current_span(name, kind=CLIENT, attributes=attributes)


def in_trace() -> bool:
    """Whether a span (sampled or not) is current: calls made now should carry its context."""
    return _state.on and trace.get_current_span().get_span_context().is_valid


def rename(name: str) -> None:
    """Give the current span (when it records) a better name, e.g. a call's method."""
    if _state.on:
        current = trace.get_current_span()
        if current.is_recording():
            current.update_name(name)


def name_call(service: str, methods: Any, method: int) -> None:
    """Name the current data-plane call span after its method (methods: the protobuf enum of
    the service's call methods); nothing unless a span records."""
    if _state.on:
        current = trace.get_current_span()
        if current.is_recording():
            with contextlib.suppress(ValueError):  # an unknown method: the handler refuses it
                short = methods.Name(method).rpartition("CALL_METHOD_")[2]
                current.update_name(f"{service} {short}")


# W3C text context (gRPC metadata, HTTP headers).


def inject() -> list[tuple[str, str]]:
    """The current context as (key, value) pairs (traceparent, tracestate); [] without one."""
    carrier: dict[str, str] = {}
    if _state.on:
        _PROPAGATOR.inject(carrier)
    return list(carrier.items())


def extract(headers: Any) -> otel_context.Context:
    """The context a caller sent (a mapping of headers; an empty context without one)."""
    return _PROPAGATOR.extract(headers)


def extract_pairs(pairs: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """As `extract`, from gRPC invocation metadata."""
    carrier = {k: str(v) for k, v in pairs or () if k in (TRACEPARENT, TRACESTATE)}
    return _PROPAGATOR.extract(carrier)


class Scope:
    """A span started for an incoming request and made current until `end` (gRPC servers,
    whose handlers run in the interceptor's task)."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span = span
        self.token = token

    def end(self, error: str = "") -> None:
        """End the span; error (a status name) marks it failed."""
        if error:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end()
        otel_context.detach(self.token)  # type: ignore[arg-type]


def server_scope(
    name: str, parent: otel_context.Context, attributes: Mapping[str, Any]
) -> Scope | None:
    """A SERVER span under parent, made current; None while tracing is off."""
    if not _state.on:
        return None
    started = _state.tracer.start_span(name, context=parent, kind=SERVER, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(started, parent))
    return Scope(started, token)


# The data plane's binary context (tcp and shm call headers).


def wire_context() -> bytes:
    """The current sampled span as the call header's trace field; b"" when none (the caller
    then sends zeros)."""
    if not _state.on:
        return b""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.trace_flags.sampled or not ctx.is_valid:
        return b""
    return ctx.trace_id.to_bytes(16, "big") + ctx.span_id.to_bytes(8, "big")


def wire_parent(data: bytes) -> trace.SpanContext | None:
    """The caller's span of a call header's trace field; None when absent or malformed."""
    if len(data) != WIRE_BYTES or data == NO_WIRE:
        return None
    parent = trace.SpanContext(
        trace_id=int.from_bytes(data[:16], "big"),
        span_id=int.from_bytes(data[16:], "big"),
        is_remote=True,
        trace_flags=_SAMPLED,
    )
    return parent if parent.is_valid else None


def call_context(
    data: bytes, name: str, attributes: Mapping[str, Any]
) -> tuple[trace.Span, contextvars.Context] | None:
    """For a traced data-plane call: its SERVER span, child of the caller's, and a context in
    which that span is current (run the call's handler and completions in it); None when the
    call is not traced or this process does not trace."""
    if not _state.on:
        return None
    parent = wire_parent(data)
    if parent is None:
        return None
    parent_ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    started = _state.tracer.start_span(name, context=parent_ctx, kind=SERVER, attributes=attributes)
    run_in = contextvars.copy_context()
    run_in.run(otel_context.attach, trace.set_span_in_context(started, parent_ctx))
    return started, run_in


def end_span(started: trace.Span, error: BaseException | str | None = None) -> None:
    """End a span started by `call_context`, failed with error (an exception or why) when one
    is given."""
    if isinstance(error, BaseException):
        started.record_exception(error)
        started.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    elif error:
        started.set_status(trace.Status(trace.StatusCode.ERROR, error))
    started.end()


# Log correlation.


def log_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current sampled span, for log lines; None without."""
    if not _state.on:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextlib.contextmanager
def using(
    provider: trace.TracerProvider | None, *, sample_ratio: float | None = None
) -> Iterator[None]:
    """`use_provider` for a block, restoring the previous provider after (tests, benches)."""
    before = _state.provider, _state.ratio
    use_provider(provider, sample_ratio=sample_ratio)
    try:
        yield
    finally:
        use_provider(before[0], sample_ratio=before[1])
