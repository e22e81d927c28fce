"""What the tcp and shm transports share to carry calls (`base.CallPlan`): checking a call on
the client before it leaves, and on the server running the handler, checking its plan against
the call, leasing its spans and finishing it exactly once.

The wire formats live with each transport (`tcp_wire`, `shm_wire`); docs/transports.md, "Calls".
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

from kvtier import errors
from kvtier.transport import base

log = logging.getLogger(__name__)

MAX_METHOD = 0xFFFF_FFFF
#: How long a call's spans stay leased at most (they are released as soon as the call ends; this
#: only bounds a peer that stops answering without hanging up).
LEASE_S = 60.0


def check_request(
    method: int, request: Any, segments: Sequence[memoryview], intos: Sequence[memoryview]
) -> memoryview:
    """Client side: the request message as bytes-like; InvalidArgument when a limit is broken."""
    if not 0 <= method <= MAX_METHOD:
        raise errors.InvalidArgument(f"call method {method} outside 0..{MAX_METHOD}")
    message = base.as_buffer(request, writable=False)
    if message.nbytes > base.MAX_CALL_MESSAGE_BYTES:
        raise errors.InvalidArgument(
            f"call request of {message.nbytes} bytes exceeds {base.MAX_CALL_MESSAGE_BYTES}"
        )
    if len(segments) > base.MAX_CALL_ITEMS or len(intos) > base.MAX_CALL_ITEMS:
        raise errors.InvalidArgument(
            f"a call carries at most {base.MAX_CALL_ITEMS} segments and receive buffers"
        )
    return message


def pack_u64s(values: Sequence[int]) -> bytes:
    """Little-endian u64s (segment lengths, capacities, reply lengths)."""
    return struct.pack(f"<{len(values)}Q", *values)


def unpack_u64s(data: Any, offset: int, count: int) -> tuple[int, ...]:
    """count little-endian u64s from data[offset:]."""
    return struct.unpack_from(f"<{count}Q", data, offset)


class ServerCall:
    """A call a server is serving: its sizes, its plan (once made) and its leases.

    `finish` runs the plan's on_done exactly once, however the call ends.
    """

    __slots__ = ("capacities", "finished", "leases", "plan", "request_id", "segments")

    def __init__(self, request_id: int, segments: Sequence[int], capacities: Sequence[int]) -> None:
        self.request_id = request_id
        self.segments = segments
        self.capacities = capacities
        self.plan: base.CallPlan | None = None
        self.leases: list[int] = []
        self.finished = False

    def start(self, ctx: base.ServerContext, principal: str, method: int, request: bytes) -> None:
        """Run the handler and check its sinks. Raises the handler's error (no plan then),
        Unavailable without a handler, or Internal for a plan that does not fit the call (it is
        finished with on_done(False) first)."""
        if ctx.call_handler is None:
            raise errors.Unavailable("this node serves no data-plane calls")
        self.plan = ctx.call_handler(principal, method, request, self.segments, self.capacities)
        try:
            sinks = self.plan.sinks
            if sinks and len(sinks) != len(self.segments):
                raise _bug(f"{len(sinks)} sinks for {len(self.segments)} segments")
            for sink, length in zip(sinks, self.segments, strict=False):
                if sink is not None and sink.length != length:
                    raise _bug(f"a sink of {sink.length} bytes for a segment of {length}")
                _check_span(sink)
        except errors.Internal:
            self.finish(False)
            raise

    def sinks(self) -> Sequence[base.Span | None]:
        """Where each segment lands (an empty sequence: every segment is dropped)."""
        return self.plan.sinks if self.plan is not None else ()

    def received(self) -> tuple[bytes, list[base.Span | None]]:
        """Every sink holds its bytes: the reply message and one source per capacity.

        Raises on_received's error or Internal for a reply that does not fit the call (the call
        is finished with on_done(False) first in both cases).
        """
        plan = self.plan
        assert plan is not None
        try:
            reply = plan.on_received() if plan.on_received is not None else plan.reply
            sources = list(plan.sources)
            if len(sources) > len(self.capacities):
                raise _bug(f"{len(sources)} sources for {len(self.capacities)} receive buffers")
            for source, capacity in zip(sources, self.capacities, strict=False):
                if source is not None and source.length > capacity:
                    raise _bug(f"a source of {source.length} bytes for a buffer of {capacity}")
                _check_span(source)
            if len(reply) > base.MAX_CALL_MESSAGE_BYTES:
                raise _bug(f"a reply of {len(reply)} bytes")
        except BaseException:
            self.finish(False)
            raise
        sources.extend([None] * (len(self.capacities) - len(sources)))
        return bytes(reply), sources

    def lease(
        self, ctx: base.ServerContext, spans: Sequence[base.Span | None], owner: object
    ) -> None:
        """Lease the spans that move bytes (for whoever reuses region memory; see LeaseTable)."""
        until = base.now_ms() + int(LEASE_S * 1000)
        for span in spans:
            if span is not None and span.length:
                self.leases.append(
                    ctx.leases.acquire(
                        span.region.region_id, span.offset, span.length, owner, until
                    )
                )

    def unlease(self, ctx: base.ServerContext) -> None:
        """End the leases taken so far."""
        for lease_id in self.leases:
            ctx.leases.release(lease_id)
        self.leases.clear()

    def finish(self, ok: bool) -> None:
        """Run on_done(ok) unless it has run; an error in it is logged (the call is over)."""
        if self.finished:
            return
        self.finished = True
        on_done = self.plan.on_done if self.plan is not None else None
        if on_done is None:
            return
        try:
            on_done(ok)
        except Exception:
            log.exception("data-plane call %d: on_done(%s) failed", self.request_id, ok)


def _bug(what: str) -> errors.Internal:
    log.error("data-plane call handler bug: %s", what)
    return errors.Internal(f"the node's call handler returned {what}")


def _check_span(span: base.Span | None) -> None:
    if span is not None and (
        span.offset < 0 or span.length < 0 or span.offset + span.length > span.region.size
    ):
        raise _bug(f"a span {span.offset}+{span.length} outside its region of {span.region.size}")
