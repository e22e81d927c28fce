"""Fuzzing the shm data plane (`kvtier.transport.shm_wire`, `shm_server`): the parsers of
long messages and call answers, and a real server fed random messages before and after a valid
HELLO.

Properties: `Reassembler.feed` and `parse_answer` raise nothing but ValueError and
struct.error (which both sides catch and answer by dropping the connection) and a long message
never costs more than MAX_LONG_BYTES; the server drops or answers every message sequence,
closes once the client hangs up, hands out no fd it should not, and keeps serving another
client (`_node.Node.check_health`).
"""

from __future__ import annotations

import array
import contextlib
import socket
import struct
from collections.abc import Iterator

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.transport import base, shm_wire
from tests.fuzz import _node, _support

Node = _node.Node
HEADER = shm_wire.HEADER
KINDS = list(range(0, 16))


@st.composite
def messages(draw: st.DrawFn, node: Node | None = None) -> bytes:
    """One shm message: a HEADER of any kind with a body that fits it now and then (LEASE
    items from granted descriptors, perhaps altered; RELEASEs; long-message pieces), or junk."""
    kind = draw(st.sampled_from(KINDS))
    count = draw(st.one_of(st.integers(0, 4), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255)))
    request = draw(st.integers(0, 8))
    body = draw(st.binary(max_size=128))
    if kind == shm_wire.LEASE and node is not None:
        items = [draw(lease_items(node)) for _ in range(count if count <= 4 else 1)]
        releases = draw(st.lists(st.integers(0, 8), max_size=3))
        body = (
            shm_wire.COUNT.pack(len(releases))
            + struct.pack(f"<{len(releases)}I", *releases)
            + b"".join(items)
        )
        count = len(items)
    elif kind == shm_wire.RELEASE:
        body = struct.pack(f"<{min(count, 64)}I", *range(min(count, 64)))
    elif kind in (shm_wire.CALL, shm_wire.MORE) and draw(st.booleans()):
        long = shm_wire.LONG.pack(draw(st.integers(0, 1 << 24)), draw(st.integers(0, 4)))
        body = (long if kind == shm_wire.CALL else b"") + body
    return HEADER.pack(kind, flags, count, request) + body


@st.composite
def lease_items(draw: st.DrawFn, node: Node) -> bytes:
    offset = draw(st.integers(0, node.scratch.size))
    length = draw(st.integers(0, node.scratch.size - offset))
    rights = base.Rights(draw(st.sampled_from([1, 2, 3])))
    owner = draw(st.sampled_from([_node.FUZZER, _node.WITNESS]))
    desc = node.plane.issuer.grant(node.scratch, offset, length, rights, owner)
    mac = desc.mac if draw(st.booleans()) else bytes(16)
    return shm_wire.ITEM.pack(
        desc.region_id, desc.offset, desc.length, int(desc.rights), desc.expires_at_ms,
        desc.grant_id, mac,
    )  # fmt: skip


# --- the parsers ---


@given(pieces=st.lists(st.tuples(messages(), st.integers(0, 4)), max_size=6))
@_support.budget()
def test_long_messages_reassemble_or_are_refused(pieces: list[tuple[bytes, int]]) -> None:
    reassembler = shm_wire.Reassembler()
    with _support.bounded_memory(shm_wire.MAX_LONG_BYTES + _support.MIB):
        for message, fds in pieces:
            try:
                reassembler.feed(memoryview(message), fds)
            except (ValueError, struct.error):
                reassembler = shm_wire.Reassembler()  # the connection is dropped


@given(kind=st.sampled_from([shm_wire.SINKS, shm_wire.CALL_REPLY]), body=st.binary(max_size=512))
@_support.budget()
def test_call_answers_parse_or_are_refused(kind: int, body: bytes) -> None:
    with _support.bounded_memory(_support.MIB), contextlib.suppress(ValueError, struct.error):
        answer = shm_wire.parse_answer(kind, memoryview(body))
        assert answer.kind == kind


# --- a real server ---


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with _node.serving("shm") as started:
        yield started


def _received(sock: socket.socket) -> int:
    """Read until the server hangs up, closing every fd it passes; how many messages came."""
    count = 0
    fd_room = socket.CMSG_SPACE(shm_wire.MAX_REGIONS * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(shm_wire.MAX_MESSAGE, fd_room)
        except ConnectionResetError:
            return count
        shm_wire.close_fds(shm_wire.fds_of(ancillary))
        if not data:
            return count
        count += 1


@given(data=st.data(), hello=st.booleans())
@_support.budget(0.5, deadline=False)
def test_messages_are_answered_or_dropped_and_others_are_served(
    node: Node, data: st.DataObject, hello: bool
) -> None:
    sequence = data.draw(st.lists(messages(node), max_size=6))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(_node.TIMEOUT_S)
        sock.connect(node.endpoint.address)
        if hello:
            token = node.token(_node.FUZZER)
            sock.send(HEADER.pack(shm_wire.HELLO, shm_wire.VERSION, len(token), 0) + token)
        try:
            for message in sequence:
                sock.send(message)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were sending: allowed
        hypothesis.event("answers", min(_received(sock), 3))
    node.check_health()
