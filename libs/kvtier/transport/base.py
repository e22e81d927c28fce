"""What every transport shares: regions, descriptors, grants and tokens, flow control, buffers.

Everything here is device-independent and tested through the tcp and shm transports; the rdma
transport uses the same descriptors (plus rkey and remote address) and the same checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import enum
import hashlib
import hmac
import itertools
import mmap
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import grants as grant_table

MAC_BYTES = 16
_MAC_FIELDS = struct.Struct("<IQQBqQ")  # region_id, offset, length, rights, expires_at_ms, grant
_TOKEN_HEAD = struct.Struct("<qHB")  # expires_at_ms, principal bytes, transport bytes


class Rights(enum.IntFlag):
    """What a descriptor allows."""

    READ = 1
    WRITE = 2


class DescriptorExpired(errors.PermissionDenied):
    """The descriptor's grant has expired: ask the control plane for a new one."""


class DescriptorRejected(errors.PermissionDenied):
    """The descriptor is forged, altered, out of range, revoked, or lacks the needed right."""


class PeerLost(errors.Unavailable):
    """The data-plane connection broke; in-flight operations failed, nothing was half-applied."""


def now_ms() -> int:
    """Wall-clock milliseconds (expiries travel between hosts, so not monotonic)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A grant to access [offset, offset+length) of a peer's region until expires_at_ms, or
    until the grant `grant_id` is revoked, whichever comes first."""

    node_id: str
    region_id: int
    offset: int
    length: int
    rights: Rights
    expires_at_ms: int
    mac: bytes
    rkey: int = 0
    remote_addr: int = 0
    grant_id: int = 0

    def to_proto(self) -> common_pb2.Descriptor:
        """The wire form that travels in gRPC messages."""
        return common_pb2.Descriptor(
            node_id=self.node_id,
            region_id=self.region_id,
            offset=self.offset,
            length=self.length,
            rights=int(self.rights),
            expires_at_unix_ms=self.expires_at_ms,
            mac=self.mac,
            rkey=self.rkey,
            remote_addr=self.remote_addr,
            grant_id=self.grant_id,
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.Descriptor) -> Descriptor:
        """Parse the wire form (validity is checked by the owner, not here)."""
        return cls(
            node_id=msg.node_id,
            region_id=msg.region_id,
            offset=msg.offset,
            length=msg.length,
            rights=Rights(msg.rights & 3),
            expires_at_ms=msg.expires_at_unix_ms,
            mac=bytes(msg.mac),
            rkey=msg.rkey,
            remote_addr=msg.remote_addr,
            grant_id=msg.grant_id,
        )


class Region:
    """A preallocated arena backed by a memfd, so same-host peers can map it (shm).

    The memory is populated at creation (no page faults on the hot path). `view` is a writable
    memoryview over the whole arena; `address` is its virtual address (for RDMA registration).
    """

    def __init__(self, region_id: int, size: int, name: str = "kvtier") -> None:
        if size <= 0:
            raise errors.InvalidArgument(f"region size must be positive, got {size}")
        self.region_id = region_id
        self.size = size
        self.fd = os.memfd_create(f"{name}-{region_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(self.fd, size, flags=flags)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def close(self) -> None:
        """Unmap and close; the region must no longer be in use. Idempotent."""
        if self.fd < 0:
            return
        self.view.release()
        # A ctypes export may still refer to the map; then it is freed with the process.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
        self.fd = -1


class RegionTable:
    """The regions a node has registered, by id."""

    def __init__(self) -> None:
        self._regions: dict[int, Region] = {}
        self._next_id = 1

    def create(self, size: int, name: str = "kvtier") -> Region:
        """Allocate and register a new region."""
        region = Region(self._next_id, size, name)
        self._regions[region.region_id] = region
        self._next_id += 1
        return region

    def get(self, region_id: int) -> Region:
        """The region; DescriptorRejected when there is none with that id."""
        region = self._regions.get(region_id)
        if region is None:
            raise DescriptorRejected(f"no region {region_id}")
        return region

    def all(self) -> list[Region]:
        """Every registered region."""
        return list(self._regions.values())

    def close(self) -> None:
        """Release every region."""
        for region in self._regions.values():
            region.close()
        self._regions.clear()


class Issuer:
    """Grants descriptors and connection tokens, and checks them (HMAC-SHA256, per-process key).

    A descriptor's MAC covers region, range, rights, expiry and its grant id and is keyed to the
    principal (client id) it was granted to, so it is only valid on that client's connections.
    Every grant is recorded live (`grants`) until it expires or is revoked (`revoke`): a
    revoked descriptor is refused even though its MAC is good. A token names the transport it
    was negotiated for; each server accepts only its own. The key lives in memory only: a
    restarted node invalidates every outstanding grant and token.
    """

    def __init__(self, node_id: str, secret: bytes | None = None) -> None:
        self.node_id = node_id
        self._secret = secret or secrets.token_bytes(32)
        self.grants = grant_table.GrantTable()
        self._grant_ids = itertools.count(1)

    def _mac(
        self, principal: str, region_id: int, offset: int, length: int, rights: int, exp: int,
        grant_id: int,
    ) -> bytes:  # fmt: skip
        fields = _MAC_FIELDS.pack(region_id, offset, length, rights, exp, grant_id)
        return hmac.digest(self._secret, fields + principal.encode(), hashlib.sha256)[:MAC_BYTES]

    def grant(
        self,
        region: Region,
        offset: int,
        length: int,
        rights: Rights,
        principal: str,
        ttl_s: float = 30.0,
        *,
        rkey: int = 0,
    ) -> Descriptor:
        """A descriptor of region[offset:offset+length] for principal, valid for ttl_s or until
        `revoke(descriptor.grant_id)`."""
        if offset < 0 or length < 0 or offset + length > region.size:
            raise errors.InvalidArgument(
                f"range {offset}+{length} outside region {region.region_id} of {region.size} bytes"
            )
        exp = now_ms() + int(ttl_s * 1000)
        grant_id = next(self._grant_ids)
        mac = self._mac(principal, region.region_id, offset, length, int(rights), exp, grant_id)
        self.grants.add(grant_id, region.region_id, offset, length, exp, now_ms())
        return Descriptor(
            node_id=self.node_id,
            region_id=region.region_id,
            offset=offset,
            length=length,
            rights=rights,
            expires_at_ms=exp,
            mac=mac,
            rkey=rkey,
            remote_addr=region.address + offset if rkey else 0,
            grant_id=grant_id,
        )

    def revoke(self, grant_id: int) -> bool:
        """End a grant before its expiry: its descriptor is refused from now on (tcp, shm;
        on rdma only the client-side checks know, see docs/transports.md). False when the
        grant had already ended."""
        return self.grants.revoke(grant_id)

    def in_use(self, region_id: int, offset: int, length: int) -> bool:
        """Whether a live grant still names bytes of region[offset:offset+length]."""
        return self.grants.overlaps(region_id, offset, length, now_ms())

    def check(
        self,
        regions: RegionTable,
        principal: str,
        need: Rights,
        region_id: int,
        offset: int,
        length: int,
        rights: int,
        expires_at_ms: int,
        mac: bytes,
        grant_id: int,
    ) -> Region:
        """Verify a descriptor's fields for principal; returns its region.

        Raises DescriptorRejected (bad MAC, missing right, revoked grant, range outside the
        region) or DescriptorExpired.
        """
        expected = self._mac(principal, region_id, offset, length, rights, expires_at_ms, grant_id)
        if not hmac.compare_digest(expected, mac):
            raise DescriptorRejected("descriptor not granted to this client (bad MAC)")
        if rights & need != need:
            raise DescriptorRejected(f"descriptor lacks the {need.name} right")
        now = now_ms()
        if expires_at_ms < now:
            raise DescriptorExpired("descriptor expired")
        if not self.grants.is_live(grant_id, now):
            raise DescriptorRejected(
                "descriptor revoked: its grant has ended (commit, abort or release)"
            )
        region = regions.get(region_id)
        if offset + length > region.size:
            raise DescriptorRejected("descriptor range outside its region")
        return region

    def issue_token(
        self, principal: str, ttl_s: float = 300.0, *, transport: str
    ) -> tuple[bytes, int]:
        """A data-plane connection token for principal over `transport` (only that transport's
        server accepts it) and its expiry (ms)."""
        exp = now_ms() + int(ttl_s * 1000)
        name, kind = principal.encode(), transport.encode()
        body = _TOKEN_HEAD.pack(exp, len(name), len(kind)) + name + kind
        return body + hmac.digest(self._secret, b"token" + body, hashlib.sha256)[:MAC_BYTES], exp

    def check_token(self, token: bytes, transport: str) -> str:
        """The principal a token was issued to; PermissionDenied when forged, expired, or
        issued for another transport."""
        if len(token) < _TOKEN_HEAD.size + MAC_BYTES:
            raise errors.PermissionDenied("malformed data-plane token")
        body, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        expected = hmac.digest(self._secret, b"token" + body, hashlib.sha256)[:MAC_BYTES]
        if not hmac.compare_digest(expected, mac):
            raise errors.PermissionDenied("data-plane token not issued by this node")
        exp, size, kind_size = _TOKEN_HEAD.unpack_from(body)
        if exp < now_ms():
            raise errors.PermissionDenied("data-plane token expired")
        if _TOKEN_HEAD.size + size + kind_size != len(body):
            raise errors.PermissionDenied("malformed data-plane token")
        kind = body[_TOKEN_HEAD.size + size :].decode(errors="replace")
        if kind != transport:
            raise errors.PermissionDenied(
                f"data-plane token issued for {kind or 'no transport'}, not {transport}"
            )
        return body[_TOKEN_HEAD.size : _TOKEN_HEAD.size + size].decode()


class ByteBudget:
    """Bounds the bytes in flight to one peer; a single request larger than the bound runs alone."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._cond = asyncio.Condition()

    @property
    def used_bytes(self) -> int:
        """Bytes currently in flight."""
        return self._used

    async def acquire(self, n: int) -> None:
        """Wait until n more bytes fit (or nothing is in flight)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._used == 0 or self._used + n <= self.limit_bytes)
            self._used += n

    async def release(self, n: int) -> None:
        """Return n bytes to the budget."""
        async with self._cond:
            self._used -= n
            self._cond.notify_all()

    def take_now(self, n: int) -> bool:
        """Take n bytes at once when nothing is in flight (the synchronous short path, whose
        caller runs the loop only between its own operations); whether they were taken."""
        if self._used:
            return False
        self._used = n
        return True

    def give_now(self, n: int) -> None:
        """Return bytes taken by `take_now` (nobody can be waiting: nothing else was in flight)."""
        self._used -= n


def as_buffer(obj: Any, *, writable: bool) -> memoryview:
    """A flat byte view of a buffer-protocol object (memoryview, bytearray, numpy, torch CPU).

    Never copies. Raises InvalidArgument for non-contiguous or (when writable) read-only buffers.
    """
    try:
        view = memoryview(obj)
    except TypeError:
        numpy_view = getattr(obj, "numpy", None)  # torch CPU tensors share memory with .numpy()
        if numpy_view is None:
            raise errors.InvalidArgument(f"{type(obj).__name__} has no buffer") from None
        view = memoryview(numpy_view())
    if not view.c_contiguous:
        raise errors.InvalidArgument("buffer must be C-contiguous")
    if writable and view.readonly:
        raise errors.InvalidArgument("buffer to read into is read-only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_sizes(descs: Sequence[Descriptor], bufs: Sequence[memoryview]) -> None:
    """Each buffer must be exactly its descriptor's length."""
    if len(descs) != len(bufs):
        raise errors.InvalidArgument(f"{len(descs)} descriptors but {len(bufs)} buffers")
    for desc, buf in zip(descs, bufs, strict=True):
        if buf.nbytes != desc.length:
            raise errors.InvalidArgument(
                f"buffer of {buf.nbytes} bytes for a descriptor of {desc.length}"
            )


def host_id() -> str:
    """This kernel's identity: same id ⇒ same host (shm possible)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


class LeaseTable:
    """Ranges of regions that a peer is reading or writing right now.

    A transport leases a range before bytes move and releases it when they have moved (or its
    connection dies). Whoever reuses region memory (the KV pool's eviction, a datanode's buffer
    pool) must not reuse a range while `overlaps()` says it is leased: so a range is never
    reused under a reader. Leases past their end are forgotten as new ones come.
    """

    def __init__(self) -> None:
        self._next = 1
        self._ranges = grant_table.RangeIndex()

    def acquire(
        self, region_id: int, offset: int, length: int, owner: object, until_ms: int
    ) -> int:
        """Lease a range for owner until until_ms; returns the lease id."""
        lease_id = self._next
        self._next += 1
        self._ranges.add(lease_id, region_id, offset, length, until_ms, now_ms(), owner)
        return lease_id

    def release(self, lease_id: int) -> None:
        """End one lease (unknown ids are ignored: release is idempotent)."""
        self._ranges.remove(lease_id)

    def release_owner(self, owner: object) -> int:
        """End every lease of owner (its connection closed); returns how many."""
        return self._ranges.remove_owner(owner)

    def expire(self, now: int | None = None) -> int:
        """Drop leases past their end; returns how many."""
        return self._ranges.expire(now_ms() if now is None else now)

    def overlaps(self, region_id: int, offset: int, length: int) -> bool:
        """Whether any live lease touches region[offset:offset+length]."""
        return self._ranges.overlaps(region_id, offset, length, now_ms())

    def __len__(self) -> int:
        return len(self._ranges)


# Calls: a small request to the node's service, answered in the same round trip, whose bulk
# payloads move straight between the caller's buffers and region memory that the service picks.
# This is how the KV-cache SDK gets or puts a batch of blocks in one round trip on the data-plane
# connection it already has (a gRPC unary call costs ~0.5 ms here; a data-plane round trip ~60 us).

#: Largest request or reply message of a call.
MAX_CALL_MESSAGE_BYTES = 8 * 1024 * 1024
#: Most payload segments (request side) or receive buffers (reply side) of one call.
MAX_CALL_ITEMS = 65536


@dataclass(frozen=True, slots=True)
class Span:
    """A range of a registered region that a call's payload lands in or is sent from."""

    region: Region
    offset: int
    length: int

    def view(self) -> memoryview:
        """The range as a memoryview of region memory."""
        return self.region.view[self.offset : self.offset + self.length]


#: True while a handler serves a call whose payload its caller writes into this node's memory
#: itself (shm: a process of this host, no network between): a handler may then keep the
#: writer's own checksums of that payload instead of reading it all again.
LOCAL_WRITER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kvtier_local_writer", default=False
)


@dataclass(slots=True)
class CallPlan:
    """How the node serves one call; built by the service's `CallHandler`.

    - `sinks`: one per request segment, where its bytes land (None: the transport drops them);
      a sink's length equals its segment's.
    - `on_received`: run once every sink holds its bytes; returns the reply message (e.g. after
      committing puts), or an awaitable of it (e.g. when the bytes go to disk in an executor
      first), and may raise a `KVTierError` (or fail the awaitable with one), which becomes the
      call's error. Without it, `reply` is the reply message. The sinks stay leased until it
      has returned (or its awaitable has completed).
    - `sources`: one per reply slot (the caller's receive buffers, in order), the bytes sent
      back into it (None: nothing); a source is never longer than its slot's capacity.
    - `on_done(ok)`: run exactly once when the plan is finished with: ok=True after the reply and
      its sources have gone out (or been copied out, on shm); ok=False when the connection died
      or the call failed after the plan was made (abort pending puts, end read leases). When
      the connection dies while on_received's awaitable is pending, that awaitable is cancelled
      and on_done(False) runs at once (a job it started in an executor may still be running).
    """

    reply: bytes = b""
    sinks: Sequence[Span | None] = ()
    sources: Sequence[Span | None] = ()
    on_received: Callable[[], bytes | Awaitable[bytes]] | None = None
    on_done: Callable[[bool], None] | None = None


class CallHandler(Protocol):
    """A node service's entry point for calls (set as `ServerContext.call_handler`).

    Called on the event loop (it must not block) once the request message has arrived and before
    any payload is read. `segments` are the lengths of the payload segments that follow the
    request; `capacities` the sizes of the caller's receive buffers. Returns the plan, or an
    awaitable of it when the service must wait for something first (e.g. fetch shards from other
    nodes before it knows the sources); a plain return takes no task and no extra loop turn.
    Raises a `KVTierError` (or fails the awaitable with one) to fail the whole call (the
    transport drops the payload and replies with the error; no plan means no `on_done`).

    While the awaitable is pending the transport holds the call (tcp reads no further request
    on that connection; shm serves others); the caller's deadline still runs. If the connection
    dies first, the awaitable is cancelled; a plan it returns anyway is ended with on_done(False).
    """

    def __call__(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> CallPlan | Awaitable[CallPlan]: ...


@dataclass(frozen=True, slots=True)
class CallResult:
    """What a call returned: the reply message and the bytes received into each buffer."""

    reply: bytes
    lengths: Sequence[int]


@dataclass(slots=True)
class ServerContext:
    """What a transport server needs from its node."""

    node_id: str
    regions: RegionTable
    issuer: Issuer
    leases: LeaseTable = field(default_factory=LeaseTable)
    max_inflight_bytes: int = 256 * 1024 * 1024
    #: Data-plane connections one identity (`identity_of`) may hold open, over every transport.
    max_connections_per_principal: int = 64
    connections: grant_table.ConnectionCounts = field(default_factory=grant_table.ConnectionCounts)
    #: The service's call handler; None: calls fail with Unavailable.
    call_handler: CallHandler | None = None

    def in_use(self, region_id: int, offset: int, length: int) -> bool:
        """Whether region[offset:offset+length] must not be reused yet: a transport moves
        bytes in it (a lease) or a live grant still names it (a descriptor that still works)."""
        return self.leases.overlaps(region_id, offset, length) or self.issuer.in_use(
            region_id, offset, length
        )


class Transport(Protocol):
    """A client's connection to one peer's registered memory."""

    name: ClassVar[str]
    #: Whether `call` is carried by this transport (rdma: not yet; use gRPC plus descriptors).
    supports_calls: ClassVar[bool]

    async def read(self, desc: Descriptor, into: Any) -> None:
        """Copy the described range into `into` (len == desc.length)."""

    async def write(self, desc: Descriptor, data: Any) -> None:
        """Copy `data` (len == desc.length) into the described range."""

    async def read_batch(self, descs: Sequence[Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, pipelined; all complete or the first error is raised."""

    async def write_batch(self, descs: Sequence[Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, pipelined; all complete or the first error is raised."""

    async def call(
        self,
        method: int,
        request: bytes,
        segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> CallResult:
        """One call to the peer's service (see `CallPlan`): send request and the segments'
        bytes; the reply's payloads land in `intos` (buffers, used in order, each filled from
        its start). Raises the service's error, PeerLost, DeadlineExceeded, or Unavailable
        when this transport or node offers no calls.
        """

    async def close(self) -> None:
        """Close the connection; idempotent."""


#: Writes a call's segments itself into the sinks a peer handed out (`FillsSinks.call_filled`):
#: a writable view of each (None: the peer drops that segment).
SinkFill = Callable[[Sequence[memoryview | None]], Awaitable[None]]


@runtime_checkable
class FillsSinks(Protocol):
    """A transport whose calls' segments the caller may write straight into the peer's memory
    (shm: its mapped regions), so that bytes arriving from elsewhere (an HTTP body) land where
    the peer keeps them with no buffer of the caller's in between."""

    async def call_filled(
        self, method: int, request: bytes, sizes: Sequence[int], fill: SinkFill
    ) -> CallResult:
        """A call whose segments (of these sizes) fill writes into the sinks; when fill raises,
        the call is aborted (nothing of it is kept) and its error raised."""


class TransportServer(Protocol):
    """The serving side of one transport on a node."""

    name: ClassVar[str]

    async def start(self) -> common_pb2.TransportEndpoint:
        """Listen; returns how clients reach it."""

    async def stop(self) -> None:
        """Stop listening and drop connections (their leases end); idempotent."""

    def connection_count(self) -> int:
        """Open client connections (for tests and metrics)."""
