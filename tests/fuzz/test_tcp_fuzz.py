"""Fuzzing the tcp data plane's server (`kvtier.transport.tcp_server`, frames of `tcp_wire`)
over real sockets, before and after a valid HELLO.

A node (tcp transport, a kvcache BlockService as its call handler) serves from a thread with
its own event loop; each example talks to it with a blocking socket. Properties:
- junk, before or after HELLO, is answered or the connection dropped: once the client has
  sent everything and shut its side, the server closes within a timeout (never hangs);
- protocol-valid frames (reads and writes with granted, forged or altered descriptors, calls
  of any method, request, segments and capacities) are each answered, in order, with a known
  status, and the connection stays open;
- nothing escapes into the loop's exception handler or is logged at ERROR (an unexpected
  exception on a connection is a bug), no lease outlives its connection, and another client's
  read keeps returning the right bytes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.transport import base, calls, tcp_wire
from tests.fuzz import _node, _support, test_calls_fuzz

KIB = _support.KIB
Node = _node.Node
FUZZER, WITNESS = _node.FUZZER, _node.WITNESS


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with _node.serving("tcp") as started:
        yield started


def _hello(node: Node, sock: socket.socket) -> None:
    token = node.token(FUZZER)
    sock.sendall(tcp_wire.HELLO.pack(tcp_wire.MAGIC, len(token)) + token)
    request_id, status, message_len, payload_len = tcp_wire.RESPONSE.unpack(
        _recv_exactly(sock, tcp_wire.RESPONSE.size)
    )
    assert (request_id, status, message_len, payload_len) == (0, tcp_wire.Status.OK, 0, 0)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        got = sock.recv(size - len(data))  # socket.timeout: the server hangs
        assert got, f"the server closed the connection after {len(data)} of {size} bytes"
        data += got
    return bytes(data)


def _drain(sock: socket.socket) -> int:
    """Read until the server closes; how many bytes came (socket.timeout: it hangs)."""
    total = 0
    while True:
        try:
            got = sock.recv(256 * KIB)
        except ConnectionResetError:
            return total
        if not got:
            return total
        total += len(got)


def _connect(node: Node) -> socket.socket:
    host, _, port = node.endpoint.address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=_node.TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
    return sock


# --- junk ---


def _junk_frames() -> st.SearchStrategy[bytes]:
    """Bytes that look like frames now and then: HELLO, REQUEST and CALL headers of random
    fields, and random bytes."""
    hello = st.builds(
        lambda magic, size, rest: tcp_wire.HELLO.pack(magic, size) + rest,
        st.sampled_from([tcp_wire.MAGIC, b"KVT1", b"\0\0\0\0"]),
        st.integers(0, 0xFFFF),
        st.binary(max_size=64),
    )
    op = st.one_of(
        st.sampled_from([tcp_wire.READ, tcp_wire.WRITE, tcp_wire.CALL]), st.integers(0, 255)
    )
    headers = st.builds(
        lambda first, rest: bytes([first]) + rest,
        op,
        st.binary(min_size=tcp_wire.REQUEST.size - 1, max_size=tcp_wire.REQUEST.size - 1),
    )
    return st.lists(st.one_of(hello, headers, st.binary(max_size=256)), max_size=6).map(b"".join)


@given(data=_junk_frames(), hello=st.booleans(), cut=st.booleans())
@_support.budget(0.5, deadline=False)
def test_junk_is_answered_or_dropped_and_others_are_served(
    node: Node, data: bytes, hello: bool, cut: bool
) -> None:
    with _connect(node) as sock:
        if hello:
            _hello(node, sock)
        try:
            sock.sendall(data)
            if cut:
                sock.shutdown(socket.SHUT_WR)  # else: close with a reset (linger 0)
                hypothesis.event("answered bytes", min(_drain(sock), 1))
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were sending: allowed
    node.check_health()


# --- protocol-valid frames ---


@dataclass(frozen=True)
class Sent:
    """A frame sent, and what its answer carries after the RESPONSE header when it is OK."""

    request_id: int
    ok_extra: int  # bytes of lengths (calls) that follow an OK answer's message
    frame: bytes


@st.composite
def descriptor_frames(draw: st.DrawFn, node: Node, request_id: int) -> Sent:
    """A READ or WRITE of a descriptor granted to the fuzzer, perhaps altered in one field."""
    offset = draw(st.integers(0, node.scratch.size))
    length = draw(st.integers(0, node.scratch.size - offset))
    rights = base.Rights(draw(st.sampled_from([1, 2, 3])))
    owner = draw(st.sampled_from([FUZZER, FUZZER, WITNESS]))
    desc = node.plane.issuer.grant(node.scratch, offset, length, rights, owner, ttl_s=30)
    fields: dict[str, Any] = {
        "region_id": desc.region_id, "offset": desc.offset, "length": desc.length,
        "rights": int(desc.rights), "expires_at_ms": desc.expires_at_ms,
        "grant_id": desc.grant_id, "mac": desc.mac,
    }  # fmt: skip
    altered = draw(st.sampled_from([None, *fields]))
    if altered == "mac":
        fields["mac"] = bytes(b ^ 1 for b in desc.mac)
    elif altered == "length":
        fields["length"] = draw(st.integers(0, 128 * KIB))
    elif altered is not None:
        fields[altered] = draw(st.integers(0, 255 if altered == "rights" else 2**31))
    op = draw(st.sampled_from([tcp_wire.READ, tcp_wire.WRITE]))
    header = tcp_wire.REQUEST.pack(
        op, fields["rights"], 0, fields["region_id"], request_id, fields["offset"],
        fields["length"], fields["expires_at_ms"], fields["grant_id"], fields["mac"],
    )  # fmt: skip
    payload = b"\x5a" * fields["length"] if op == tcp_wire.WRITE else b""
    return Sent(request_id, 0, header + payload)


@st.composite
def call_frames(draw: st.DrawFn, request_id: int) -> Sent:
    """A CALL of the kvcache's calls, coherent or random (`test_calls_fuzz`)."""
    _principal, method, message, segments, capacities = draw(
        st.one_of(test_calls_fuzz.coherent_calls(), test_calls_fuzz.random_calls())
    )
    header = tcp_wire.CALL_REQUEST.pack(
        tcp_wire.CALL, 0, 0, method, request_id, len(message), sum(segments), len(segments),
        len(capacities),
    )  # fmt: skip
    body = message + calls.pack_u64s([*segments, *capacities])
    payload = b"".join(bytes([i & 0xFF]) * n for i, n in enumerate(segments))
    return Sent(request_id, 8 * len(capacities), header + body + payload)


@given(data=st.data(), count=st.integers(1, 6))
@_support.budget(0.5, deadline=False)
def test_valid_frames_are_all_answered_in_order(
    node: Node, data: st.DataObject, count: int
) -> None:
    node.on_loop(node.fresh_blocks)
    frames = [
        data.draw(st.one_of(descriptor_frames(node, request_id), call_frames(request_id)))
        for request_id in range(1, count + 1)
    ]
    with _connect(node) as sock:
        _hello(node, sock)
        sock.sendall(b"".join(sent.frame for sent in frames))
        for sent in frames:
            request_id, status, message_len, payload_len = tcp_wire.RESPONSE.unpack(
                _recv_exactly(sock, tcp_wire.RESPONSE.size)
            )
            assert request_id == sent.request_id
            hypothesis.event("status", tcp_wire.Status(status).name)  # ValueError: unknown
            extra = sent.ok_extra if status == tcp_wire.Status.OK else 0
            _recv_exactly(sock, message_len + extra + payload_len)
        sock.shutdown(socket.SHUT_WR)
        assert _drain(sock) == 0
    node.check_health()
