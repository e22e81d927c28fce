"""Trace context on data-plane calls (tcp and shm): a call made inside a sampled span carries
it in its header, and the node serves it in a SERVER span that continues it, current in the
handler, in the awaitables it returns and in on_received; a call made outside one carries
nothing and the node makes no span. Real DataPlanes (tests/transport/test_calls.py's `_node`),
spans kept by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export, sampling
from opentelemetry.sdk.trace.export import in_memory_span_exporter

from kvtier import errors, tracing
from kvtier.transport import base
from tests.transport import test_calls

SYNC, ASYNC, FAIL = 1, 2, 3


class Recorder:
    """A call handler that notes the span context current at each step of a call."""

    def __init__(self, region: base.Region) -> None:
        self.region = region
        self.seen: list[tuple[str, trace.SpanContext]] = []

    def _note(self, step: str) -> None:
        self.seen.append((step, trace.get_current_span().get_span_context()))

    def __call__(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        self._note("handler")
        if method == FAIL:
            raise errors.NotFound("no such thing")
        if method == SYNC:
            return base.CallPlan(reply=b"sync")
        return self._later(segments)

    async def _later(self, segments: Sequence[int]) -> base.CallPlan:
        await asyncio.sleep(0)
        self._note("awaited handler")

        async def on_received() -> bytes:
            await asyncio.sleep(0)
            self._note("on_received")
            return b"async"

        sinks = [base.Span(self.region, 0, n) for n in segments]
        return base.CallPlan(sinks=sinks, on_received=on_received)


@pytest.fixture
def spans() -> Iterator[in_memory_span_exporter.InMemorySpanExporter]:
    exporter = in_memory_span_exporter.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=sampling.ParentBased(sampling.ALWAYS_ON))
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    with tracing.using(provider):
        yield exporter
    provider.shutdown()


@contextlib.asynccontextmanager
async def _recording(name: str) -> AsyncIterator[tuple[Recorder, base.Transport]]:
    async with test_calls._node(name) as setup:
        recorder = Recorder(setup.region)
        setup.plane.ctx.call_handler = recorder
        yield recorder, await setup.connect()


def _server_spans(
    exporter: in_memory_span_exporter.InMemorySpanExporter,
) -> list[sdk_trace.ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", test_calls._transports())
@pytest.mark.parametrize("method", [SYNC, ASYNC])
async def test_a_traced_call_continues_the_callers_trace_on_the_node(
    name: str, method: int, spans: in_memory_span_exporter.InMemorySpanExporter
) -> None:
    async with _recording(name) as (recorder, client):
        with tracing.tracer().start_as_current_span("caller") as caller:
            result = await client.call(method, b"{}", [b"x" * 4096])
        assert result.reply in (b"sync", b"async")
        await test_calls._until(lambda: len(_server_spans(spans)) == 1)
    (served,) = _server_spans(spans)
    ours = caller.get_span_context()
    assert served.parent is not None
    assert (served.parent.trace_id, served.parent.span_id) == (ours.trace_id, ours.span_id)
    assert dict(served.attributes or {}) == {"kvtier.call": method}
    steps = ["handler"] if method == SYNC else ["handler", "awaited handler", "on_received"]
    assert [step for step, _ in recorder.seen] == steps
    for step, seen in recorder.seen:  # the node's span is current at every step
        assert (seen.trace_id, seen.span_id) == (ours.trace_id, served.context.span_id), step
    assert served.status.is_ok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", test_calls._transports())
async def test_a_failed_call_ends_its_span_failed(
    name: str, spans: in_memory_span_exporter.InMemorySpanExporter
) -> None:
    async with _recording(name) as (_, client):
        with tracing.tracer().start_as_current_span("caller"), pytest.raises(errors.NotFound):
            await client.call(FAIL, b"{}")
        await test_calls._until(lambda: len(_server_spans(spans)) == 1)
    (served,) = _server_spans(spans)
    assert not served.status.is_ok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", test_calls._transports())
async def test_an_untraced_call_carries_nothing_and_makes_no_span(
    name: str, spans: in_memory_span_exporter.InMemorySpanExporter
) -> None:
    async with _recording(name) as (recorder, client):
        assert (await client.call(ASYNC, b"{}", [b"y" * 100])).reply == b"async"
        assert (await client.call(SYNC, b"{}")).reply == b"sync"
    assert spans.get_finished_spans() == ()
    assert all(not seen.is_valid for _, seen in recorder.seen)


def test_wire_context_round_trips_and_zeros_mean_untraced() -> None:
    assert tracing.wire_parent(tracing.NO_WIRE) is None
    assert tracing.wire_parent(b"") is None
    provider = sdk_trace.TracerProvider(sampler=sampling.ALWAYS_ON)
    with tracing.using(provider), tracing.tracer().start_as_current_span("x") as span:
        wire = tracing.wire_context()
        parent = tracing.wire_parent(wire)
    ctx = span.get_span_context()
    assert len(wire) == tracing.WIRE_BYTES
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.trace_flags.sampled) == (
        ctx.trace_id,
        ctx.span_id,
        True,
    )
    assert tracing.wire_context() == b""  # tracing off again: nothing, at once
