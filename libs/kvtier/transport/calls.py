"""What the tcp and shm transports share to carry calls (`base.CallPlan`): checking a call on
the client before it leaves, and on the server running the handler, checking its plan against
the call, leasing its spans, awaiting a handler or on_received that returns an awaitable, and
finishing it exactly once.

The wire formats live with each transport (`tcp_wire`, `shm_wire`); docs/transports.md, "Calls".
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeGuard, TypeVar

from kvtier import errors, tracing
from kvtier.transport import base

log = logging.getLogger(__name__)

MAX_METHOD = 0xFFFF_FFFF
#: How long a call's spans stay leased at most (they are released as soon as the call ends; this
#: only bounds a peer that stops answering without hanging up).
LEASE_S = 60.0
#: How many of one connection's calls may await their handler or on_received at once; at this
#: many the connection reads no further requests until one completes (backpressure).
MAX_AWAITING = 64

_T = TypeVar("_T")


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


#: Compiled formats of the u64 runs that calls carry, by count (a call's hot path: no format
#: string built and looked up per call).
_U64S = [struct.Struct(f"<{count}Q") for count in range(65)]


def pack_u64s(values: Sequence[int]) -> bytes:
    """Little-endian u64s (segment lengths, capacities, reply lengths)."""
    count = len(values)
    form = _U64S[count] if count < len(_U64S) else struct.Struct(f"<{count}Q")
    return form.pack(*values)


def unpack_u64s(data: Any, offset: int, count: int) -> tuple[int, ...]:
    """count little-endian u64s from data[offset:]."""
    form = _U64S[count] if count < len(_U64S) else struct.Struct(f"<{count}Q")
    return form.unpack_from(data, offset)


class ServerCall:
    """A call a server is serving: its sizes, its plan (once made) and its leases.

    The server runs `start` (the handler), then once the segments are in `receive`
    (on_received) and `replied` (checks the reply); when the handler or on_received returns an
    awaitable, the server awaits it (`Awaits`) and hands its result to `planned` or `replied`.
    `finish` runs the plan's on_done exactly once, however the call ends.

    A traced call (the caller's span in its header) has a SERVER span, `span`, current in
    `run_in`, the context its handler and completions run in; it ends with the call.
    """

    __slots__ = ("abandoned", "capacities", "finished", "leases", "plan", "request_id",
                 "run_in", "segments", "span")  # fmt: skip

    def __init__(self, request_id: int, segments: Sequence[int], capacities: Sequence[int]) -> None:
        self.request_id = request_id
        self.segments = segments
        self.capacities = capacities
        self.plan: base.CallPlan | None = None
        self.leases: list[int] = []
        self.finished = False
        self.abandoned = False  # shm: the client gave up while an awaitable was pending
        self.span: Any = None  # tracing: the call's span while it is open
        self.run_in: contextvars.Context | None = None

    def start(
        self,
        ctx: base.ServerContext,
        principal: str,
        method: int,
        request: bytes,
        *,
        local_writer: bool = False,
        trace: bytes = b"",
    ) -> Awaitable[base.CallPlan] | None:
        """Run the handler: None once the plan is made and its sinks checked, or the handler's
        awaitable (give its plan to `planned`). Raises the handler's error (no plan then),
        Unavailable without a handler, or Internal for a plan that does not fit the call (it is
        finished with on_done(False) first). local_writer: the caller fills the sinks itself
        (`base.LOCAL_WRITER`, seen by the handler). trace: the header's trace field (the
        caller's span, `tracing.wire_context`; empty or zeros: not traced)."""
        handler = ctx.call_handler
        if handler is None:
            raise errors.Unavailable("this node serves no data-plane calls")
        # LOCAL_WRITER is False outside a handler's run: set only for the calls that change it.
        token = base.LOCAL_WRITER.set(True) if local_writer else None
        try:
            if trace and trace != tracing.NO_WIRE:
                plan = self._start_traced(handler, principal, method, request, trace)
            else:
                plan = handler(principal, method, request, self.segments, self.capacities)
        finally:
            if token is not None:
                base.LOCAL_WRITER.reset(token)
        if type(plan) is not base.CallPlan and inspect.isawaitable(plan):
            return plan
        self.planned(plan)
        return None

    def _start_traced(
        self, handler: base.CallHandler, principal: str, method: int, request: bytes, trace: bytes
    ) -> Any:
        """The handler run in the call's span (when this process traces)."""
        traced = tracing.call_context(trace, f"dataplane.call {method}", {"kvtier.call": method})
        if traced is None:
            return handler(principal, method, request, self.segments, self.capacities)
        self.span, self.run_in = traced
        try:
            return self.run_in.run(
                handler, principal, method, request, self.segments, self.capacities
            )
        except BaseException as exc:
            self.end_trace(exc)
            raise

    def end_trace(self, error: BaseException | str | None = None) -> None:
        """End the call's span, if it has one and it is open (error: the call failed)."""
        if self.span is not None:
            tracing.end_span(self.span, error)
            self.span = None

    def planned(self, plan: object) -> None:
        """The handler's plan is in: check its sinks (Internal, finished with on_done(False)
        first, when they do not fit the call)."""
        if not isinstance(plan, base.CallPlan):
            self.finish(False)
            raise _bug(f"a {type(plan).__name__} instead of a CallPlan")
        self.plan = plan
        sinks = plan.sinks
        if not sinks:
            return  # every segment (if any) is dropped: nothing to check
        try:
            if len(sinks) != len(self.segments):
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

    def receive(self) -> bytes | Awaitable[bytes]:
        """Every sink holds its bytes: run on_received; the reply message, or on_received's
        awaitable of it (give the message to `replied`). Raises on_received's error (the call is
        finished with on_done(False) first)."""
        plan = self.plan
        assert plan is not None
        if plan.on_received is None:
            return plan.reply
        try:
            if self.run_in is not None:
                return self.run_in.run(plan.on_received)
            return plan.on_received()
        except BaseException:
            self.finish(False)
            raise

    def replied(self, reply: object) -> tuple[bytes, list[base.Span | None]]:
        """The reply message is in: it and one source per capacity. Raises Internal for a reply
        that does not fit the call (the call is finished with on_done(False) first)."""
        plan = self.plan
        assert plan is not None
        if not plan.sources and type(reply) is bytes and len(reply) <= base.MAX_CALL_MESSAGE_BYTES:
            return reply, [None] * len(self.capacities)  # a probe's reply: nothing to check
        try:
            sources = list(plan.sources)
            if len(sources) > len(self.capacities):
                raise _bug(f"{len(sources)} sources for {len(self.capacities)} receive buffers")
            for source, capacity in zip(sources, self.capacities, strict=False):
                if source is not None and source.length > capacity:
                    raise _bug(f"a source of {source.length} bytes for a buffer of {capacity}")
                _check_span(source)
            if type(reply) is not bytes and not isinstance(reply, bytearray | memoryview):
                raise _bug(f"a reply of type {type(reply).__name__}")
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
        if not spans:
            return
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
        if self.span is not None:
            self.end_trace(None if ok else "the call did not complete")
        on_done = self.plan.on_done if self.plan is not None else None
        if on_done is None:
            return
        try:
            on_done(ok)
        except Exception:
            log.exception("data-plane call %d: on_done(%s) failed", self.request_id, ok)


def log_unexpected(request_id: int, error: BaseException | None) -> None:
    """Log an error that no reply carries (the client gave up) unless it is a KVTierError."""
    if error is not None and not isinstance(error, errors.KVTierError):
        log.error("data-plane call %d failed", request_id, exc_info=error)


def is_pending(reply: bytes | Awaitable[bytes]) -> TypeGuard[Awaitable[bytes]]:
    """Whether on_received's result is an awaitable to wait for (plain bytes, the usual case, is
    told without the ABC check)."""
    return type(reply) is not bytes and inspect.isawaitable(reply)


#: What an awaited handler or on_received hands on: the call, the result, the error (or None).
Then = Callable[[ServerCall, _T | None, BaseException | None], None]


class Awaits:
    """The awaitables (handlers, on_received) that one connection's calls wait on, as tasks.

    `run` wraps one in a task and hands its outcome to a callback on the loop; `cancel` (the
    connection died) cancels them all, and from then on nothing of theirs reaches the connection:
    a plan that a cancelled handler returns anyway is ended with on_done(False) here. Only calls
    whose service returned an awaitable get a task; sync calls never come here.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Future[Any], ServerCall] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def run(self, call: ServerCall, awaitable: Awaitable[_T], then: Then[_T]) -> None:
        """Await awaitable for call; then(call, result, None) or then(call, None, error) follows
        on the loop (a cancellation counts as an error), unless `cancel` comes first."""
        if call.run_in is not None and asyncio.iscoroutine(awaitable):  # a traced call
            task: asyncio.Future[Any] = asyncio.get_running_loop().create_task(
                awaitable, context=call.run_in
            )
        else:
            task = asyncio.ensure_future(awaitable)
        self._tasks[task] = call
        task.add_done_callback(functools.partial(self._settle, then))

    def cancel(self) -> None:
        """Cancel every pending awaitable; their outcomes are dropped (see `_late`)."""
        tasks, self._tasks = self._tasks, {}
        for task, call in tasks.items():
            task.cancel()  # one that is done already has its callback coming: it drops it
            call.end_trace("the connection was lost")

    def _settle(self, then: Then[Any], task: asyncio.Future[Any]) -> None:
        call = self._tasks.pop(task, None)
        if call is None:
            self._late(task)
        elif task.cancelled():  # not by us: the service cancelled its own awaitable
            log.error("data-plane call %d: the service's awaitable was cancelled", call.request_id)
            call.end_trace("cancelled")
            then(call, None, errors.Internal("the node's call service was cancelled"))
        elif (error := task.exception()) is not None:
            call.end_trace(error)
            then(call, None, error)
        else:
            then(call, task.result(), None)

    @staticmethod
    def _late(task: asyncio.Future[Any]) -> None:
        """An outcome nobody waits for (its connection died): retrieve it, so that no "never
        retrieved" warning follows, and end a plan that a handler returned anyway."""
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if isinstance(result, base.CallPlan) and result.on_done is not None:
            try:
                result.on_done(False)
            except Exception:
                log.exception("data-plane call: on_done(False) of a late plan failed")


def _bug(what: str) -> errors.Internal:
    log.error("data-plane call handler bug: %s", what)
    return errors.Internal(f"the node's call handler returned {what}")


def _check_span(span: base.Span | None) -> None:
    if span is not None and (
        span.offset < 0 or span.length < 0 or span.offset + span.length > span.region.size
    ):
        raise _bug(f"a span {span.offset}+{span.length} outside its region of {span.region.size}")


M = TypeVar("M")


def parse_request(message_type: type[M], data: bytes) -> M:
    """A call's request message; InvalidArgument when the bytes do not parse."""
    message = message_type()
    try:
        message.ParseFromString(data)  # type: ignore[attr-defined]
    except Exception as exc:  # protobuf's DecodeError is a bare Exception subclass
        raise errors.InvalidArgument(f"malformed {message_type.__name__}: {exc}") from None
    return message
