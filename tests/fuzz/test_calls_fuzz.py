"""Fuzzing data-plane call requests: `calls.parse_request` over every request message of the
kvcache, gateway object and datanode shard APIs, and the kvcache's call handler
(`BlockService.handle_call`) driven the way a transport server drives it (`calls.ServerCall`).

Properties: `parse_request` raises nothing but InvalidArgument, whatever the bytes (random,
mutated valid messages, deep nesting); `handle_call` and the plan it returns raise nothing but
`KVTierError`s, and never `errors.Internal` (a plan that does not fit its call, a handler bug),
with random methods, requests, segments and capacities; nothing is logged at ERROR; a call's
plan is finished exactly once and leaves no lease behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from hypothesis import given
from hypothesis import strategies as st

from kvtier import errors
from kvtier.proto.datanode.v1 import shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2
from kvtier.transport import base, calls
from services.kvcache import blocks
from services.kvcache import store as block_store
from tests.fuzz import _support

MIB = _support.MIB
FieldDescriptor = pb_descriptor.FieldDescriptor


def _requests() -> list[type[pb_message.Message]]:
    found = []
    for module in (kvcache_pb2, objects_pb2, shards_pb2):
        for name in module.DESCRIPTOR.message_types_by_name:
            if name.endswith("Request"):
                found.append(getattr(module, name))
    return found


REQUESTS = _requests()
KVCACHE_REQUESTS: dict[int, type[pb_message.Message]] = {
    kvcache_pb2.CALL_METHOD_BATCH_PUT: kvcache_pb2.BatchPutRequest,
    kvcache_pb2.CALL_METHOD_BATCH_GET: kvcache_pb2.BatchGetRequest,
    kvcache_pb2.CALL_METHOD_BATCH_EXISTS: kvcache_pb2.BatchExistsRequest,
    kvcache_pb2.CALL_METHOD_LOOKUP: kvcache_pb2.LookupRequest,
    kvcache_pb2.CALL_METHOD_DELETE: kvcache_pb2.DeleteRequest,
    kvcache_pb2.CALL_METHOD_PIN: kvcache_pb2.PinRequest,
    kvcache_pb2.CALL_METHOD_UNPIN: kvcache_pb2.UnpinRequest,
    kvcache_pb2.CALL_METHOD_TOUCH: kvcache_pb2.TouchRequest,
    kvcache_pb2.CALL_METHOD_STATS: kvcache_pb2.StatsRequest,
    kvcache_pb2.CALL_METHOD_LIST_KEYS: kvcache_pb2.ListKeysRequest,
}


# --- random messages of a given type, built from its descriptor ---

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.one_of(
        st.sampled_from(["", "fuzz", "victim", "@gateway", "m", "a/b", "x" * 300]),
        st.text(_support.UNICODE, max_size=12),
    ),
    FieldDescriptor.TYPE_BYTES: st.one_of(st.binary(max_size=16), st.sampled_from([b"k", b""])),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
}
_INT_BITS = {
    FieldDescriptor.TYPE_INT32: (True, 32), FieldDescriptor.TYPE_SINT32: (True, 32),
    FieldDescriptor.TYPE_SFIXED32: (True, 32), FieldDescriptor.TYPE_INT64: (True, 64),
    FieldDescriptor.TYPE_SINT64: (True, 64), FieldDescriptor.TYPE_SFIXED64: (True, 64),
    FieldDescriptor.TYPE_UINT32: (False, 32), FieldDescriptor.TYPE_FIXED32: (False, 32),
    FieldDescriptor.TYPE_UINT64: (False, 64), FieldDescriptor.TYPE_FIXED64: (False, 64),
}  # fmt: skip


def _integers(signed: bool, bits: int) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [low, high, 0, 1, -1 if signed else 2, 16384, 16385, 3600, 10**9]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(min_value=low, max_value=high),
    )


def _value(draw: st.DrawFn, field: Any, depth: int) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return draw(st.one_of(st.sampled_from(numbers), st.integers(-5, 100)))
    if field.type in _INT_BITS:
        return draw(_integers(*_INT_BITS[field.type]))
    return draw(_SCALARS[field.type])


def fill(draw: st.DrawFn, msg: pb_message.Message, depth: int = 0) -> None:
    """Set a random subset of msg's fields to random values (messages 3 levels deep at most)."""
    fields: Any = msg.DESCRIPTOR.fields  # descriptors: typed loosely by protobuf's stubs
    for field in fields:
        if not draw(st.booleans()):
            continue
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        repeated = field.is_repeated
        count = draw(st.integers(0, 3)) if repeated else 1
        for _ in range(count):
            if is_map:
                key_field, value_field = field.message_type.fields
                key = _value(draw, key_field, depth)
                if value_field.message_type is None:
                    getattr(msg, field.name)[key] = _value(draw, value_field, depth)
                elif depth < 3:
                    fill(draw, getattr(msg, field.name)[key], depth + 1)
            elif field.message_type is not None:
                if depth < 3:
                    child = getattr(msg, field.name).add() if repeated else getattr(msg, field.name)
                    fill(draw, child, depth + 1)
                    if not repeated:
                        child.SetInParent()
            elif repeated:
                getattr(msg, field.name).append(_value(draw, field, depth))
            else:
                setattr(msg, field.name, _value(draw, field, depth))


@st.composite
def encoded(draw: st.DrawFn, message_type: type[pb_message.Message]) -> bytes:
    """Bytes for message_type: a random valid message, perhaps mutated, or random bytes."""
    msg = message_type()
    fill(draw, msg)
    data = msg.SerializeToString()
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "random"]))
    if kind == "random" or (kind == "mutated" and not data):
        return draw(st.binary(max_size=256))
    if kind == "mutated":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=0, max_size=4))
        return data[:at] + junk + data[at + draw(st.integers(0, 2)) :]
    return data


@given(data=st.data(), message_type=st.sampled_from(REQUESTS))
@_support.budget(2)
def test_requests_parse_or_are_invalid_arguments(
    data: st.DataObject, message_type: type[pb_message.Message]
) -> None:
    raw = data.draw(encoded(message_type))
    with _support.bounded_memory(MIB + 64 * len(raw)), contextlib.suppress(errors.InvalidArgument):
        calls.parse_request(message_type, raw)


# Bytes that are hard on a decoder: nesting past the recursion limit (groups, sub-messages),
# lengths past the end, truncated and overlong varints, wrong wire types, huge field numbers.
NASTY = [
    b"\x0b" * 100_000,  # field 1 start-group, 100000 deep
    b"\x0a\x80\x80\x04" * 1000,  # field 1 length 65536, nested, never there
    b"\x0a\x02" * 20_000 + b"\x08\x01",
    b"\x08" + b"\xff" * 20,  # a varint of 20 bytes
    b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB
    b"\xf8\xff\xff\xff\x0f\x01",  # field 2**29 - 1
    b"\x00\x00",  # field 0
    b"\x0c",  # end-group without a start
    b"\x0f\x01",  # wire type 7
]


@pytest.mark.parametrize("raw", NASTY, ids=lambda raw: raw[:6].hex())
def test_nasty_bytes_parse_or_are_invalid_arguments(raw: bytes) -> None:
    for message_type in REQUESTS:
        with _support.bounded_memory(8 * MIB), contextlib.suppress(errors.InvalidArgument):
            calls.parse_request(message_type, raw)


# --- the kvcache's call handler ---

TENANT_PRINCIPALS = ["fuzz/engine/1", "victim/engine/2", "@gateway/g1/3", "/x/y", "fuzz"]


class _Records(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


@contextlib.contextmanager
def no_error_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect the records logged at ERROR or above while the body runs; fail if any."""
    records: list[logging.LogRecord] = []
    handler = _Records(records)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


def node() -> tuple[base.ServerContext, blocks.BlockService]:
    """A node context whose calls go to a BlockService over a 4 MiB arena."""
    ctx = base.ServerContext(node_id="n1", regions=base.RegionTable(), issuer=base.Issuer("n1"))
    arena = ctx.regions.create(4 * MIB)
    store = block_store.BlockStore(4 * MIB, page_bytes=1 * MIB)
    service = blocks.BlockService(store, arena, ctx.issuer.grant, epoch=lambda: 7)
    ctx.call_handler = service.handle_call
    return ctx, service


def _settle(result: Any) -> Any:
    """An awaitable's result (a handler may return one; none should take long)."""
    if inspect.isawaitable(result):
        return asyncio.run(asyncio.wait_for(_await(result), 5))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def drive(ctx: base.ServerContext, principal: str, method: int, request: bytes,
          segments: list[int], capacities: list[int], ok: bool) -> None:  # fmt: skip
    """Serve one call as a transport does: handler, sinks filled, on_received, reply, finish.
    KVTierErrors are answers (but Internal, a handler bug)."""
    call = calls.ServerCall(1, segments, capacities)
    try:
        call.planned(_settle(call.start(ctx, principal, method, request) or call.plan))
        call.lease(ctx, call.sinks(), "conn")
        for sink in call.sinks():
            if sink is not None:
                sink.view()[:] = b"\xa5" * sink.length
        reply = _settle(call.receive())
        call.unlease(ctx)
        _message, sources = call.replied(reply)
        for source, capacity in zip(sources, capacities, strict=True):
            assert source is None or 0 <= source.length <= capacity
        hypothesis.event("served", f"{len(call.sinks())} sinks, {len(sources)} sources")
    except errors.Internal:
        raise
    except errors.KVTierError as exc:
        hypothesis.event("refused", type(exc).__name__)
        ok = False
    finally:
        call.unlease(ctx)
    call.finish(ok)
    assert call.finished


Call = tuple[str, int, bytes, list[int], list[int]]
_LONGEST = block_store.MAX_KEY_BYTES
KEYS = st.sampled_from(
    [b"a", b"b", b"c", b"a", b"b", b"c", b"k" * _LONGEST, b"k" * (_LONGEST + 1), b""]
)


@st.composite
def coherent_calls(draw: st.DrawFn) -> Call:
    """A kvcache call whose parts agree (its own tenant, a segment per key, a capacity per key),
    so that it reaches the store: puts and gets of a few keys, and the other methods."""
    principal = draw(st.sampled_from(TENANT_PRINCIPALS[:2]))
    method = draw(st.sampled_from(sorted(KVCACHE_REQUESTS)))
    message_type = KVCACHE_REQUESTS[method]
    msg = message_type()
    if draw(st.integers(0, 3)) == 0:  # other fields too, now and then
        fill(draw, msg)
    if hasattr(msg, "namespace"):
        msg.namespace.name = draw(st.sampled_from(["m", "n"]))
        msg.namespace.tenant = draw(st.sampled_from(["", principal.split("/")[0]]))
    keys = draw(st.lists(KEYS, max_size=4))
    if hasattr(msg, "keys"):
        del msg.keys[:]
        msg.keys.extend(keys)
    sizes = draw(st.lists(st.integers(0, 300_000), min_size=len(keys), max_size=len(keys)))
    if isinstance(msg, kvcache_pb2.BatchPutRequest):
        del msg.sizes[:]
        msg.sizes.extend(sizes if draw(st.booleans()) else [])
    segments = sizes if method == kvcache_pb2.CALL_METHOD_BATCH_PUT else []
    capacities = draw(st.lists(st.integers(0, 400_000), min_size=len(keys), max_size=len(keys)))
    if method != kvcache_pb2.CALL_METHOD_BATCH_GET:
        capacities = []
    return principal, method, msg.SerializeToString(), segments, capacities


@st.composite
def random_calls(draw: st.DrawFn) -> Call:
    """A kvcache call of any method, request, segments and capacities."""
    method = draw(st.one_of(st.sampled_from(sorted(KVCACHE_REQUESTS)), st.integers(0, 2**32 - 1)))
    request = draw(encoded(KVCACHE_REQUESTS.get(method, kvcache_pb2.BatchPutRequest)))
    segments = draw(st.lists(st.integers(0, 70_000), max_size=8))
    capacities = draw(st.lists(st.integers(0, 1 << 20), max_size=8))
    return draw(st.sampled_from(TENANT_PRINCIPALS)), method, request, segments, capacities


@given(
    sequence=st.lists(
        st.tuples(st.one_of(coherent_calls(), random_calls()), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
@_support.budget(2)
def test_kvcache_calls_answer_or_fail_with_typed_errors(sequence: list[tuple[Call, bool]]) -> None:
    ctx, _service = node()
    with no_error_logs(), _support.bounded_memory(4 * MIB):
        for call, ok in sequence:
            drive(ctx, *call, ok=ok)
    assert len(ctx.leases) == 0
