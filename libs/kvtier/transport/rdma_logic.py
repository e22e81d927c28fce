"""Everything of the rdma transport that does not touch a device, as plain data and functions.

The rdma server and client (`rdma_server`, `rdma_client`) drive pyverbs with what this module
computes: how an operation is cut into work requests, the queue-pair attributes of each state
transition, which GID and port to use, how a work completion's status becomes a kvtier error,
and whether a descriptor may be posted at all. Nothing here imports pyverbs; the verbs
constants it computes with are in `kvtier.transport.rdma_verbs_consts`.
"""

from __future__ import annotations

import bisect
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, rdma_verbs_consts

#: The transport's name (`kvtier.transport.rdma.NAME`, `Server.name`, `Client.name`).
NAME: Final = "rdma"


def mtu_bytes(mtu: int) -> int:
    """Bytes of an ibv_mtu enum value (3 → 1024)."""
    lowest, highest = rdma_verbs_consts.MTU_MIN, rdma_verbs_consts.MTU_MAX
    if not lowest <= mtu <= highest:
        raise errors.InvalidArgument(f"ibv_mtu {mtu} outside {lowest}..{highest}")
    return 128 << mtu


# --- devices, ports, GIDs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Which device, port and GID index to use: "mlx5_0", "mlx5_0:1" or "mlx5_0:1:3"."""

    name: str = ""
    port: int | None = None
    gid_index: int | None = None


def parse_device_spec(text: str) -> DeviceSpec:
    """Parse `rdma_device` settings; empty parts mean "choose" (first device, active port...)."""
    parts = text.strip().split(":") if text.strip() else []
    if len(parts) > 3:
        raise errors.InvalidArgument(f"rdma device {text!r}: expected name[:port[:gid_index]]")
    try:
        numbers = [int(p) if p else None for p in parts[1:]]
    except ValueError:
        raise errors.InvalidArgument(
            f"rdma device {text!r}: port and GID index are integers"
        ) from None
    numbers += [None] * (2 - len(numbers))
    port, gid_index = numbers
    if port is not None and port < 1:
        raise errors.InvalidArgument(f"rdma device {text!r}: ports are numbered from 1")
    if gid_index is not None and gid_index < 0:
        raise errors.InvalidArgument(f"rdma device {text!r}: negative GID index")
    return DeviceSpec(name=parts[0] if parts else "", port=port, gid_index=gid_index)


def choose_port(states: Sequence[tuple[int, int]]) -> int:
    """The first ACTIVE port of (port_num, ibv_port_state) pairs; Unavailable when none is."""
    for port_num, state in states:
        if state == rdma_verbs_consts.PORT_ACTIVE:
            return port_num
    raise errors.Unavailable(f"no active RDMA port (port states {list(states)})")


def gid_bytes(text: str) -> bytes:
    """pyverbs' GID text ("fe80:0000:...", 8 groups of 4 hex digits) as 16 bytes."""
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != rdma_verbs_consts.GID_BYTES:
        raise errors.InvalidArgument(f"GID {text!r} is not 16 bytes")
    return raw


def gid_text(raw: bytes) -> str:
    """16 GID bytes in pyverbs' text form (what `GID.gid` accepts)."""
    if len(raw) != rdma_verbs_consts.GID_BYTES:
        raise errors.InvalidArgument(f"GID of {len(raw)} bytes, expected 16")
    digits = raw.hex()
    return ":".join(digits[i : i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True, slots=True)
class GidEntry:
    """One row of a port's GID table."""

    index: int
    gid: bytes
    gid_type: int = rdma_verbs_consts.GID_TYPE_IB_ROCE_V1


def _gid_rank(entry: GidEntry) -> int:
    """Lower is better: RoCE v2 IPv4-mapped, RoCE v2 routable, RoCE v2, anything else."""
    ipv4_mapped = entry.gid[:10] == bytes(10) and entry.gid[10:12] == b"\xff\xff"
    link_local = entry.gid[:2] == b"\xfe\x80"
    if entry.gid_type == rdma_verbs_consts.GID_TYPE_ROCE_V2:
        return 0 if ipv4_mapped else 1 if not link_local else 2
    return 3


def choose_gid_index(entries: Sequence[GidEntry], link_layer: int) -> int:
    """The GID index to use on a port.

    InfiniBand: 0 (the port GID; routing uses the LID). Ethernet (RoCE): a RoCE v2 GID holding
    an IPv4-mapped address if any (routable, what most fabrics are configured for), then any
    other RoCE v2 GID, then any non-zero GID. Unavailable when the table has no usable GID.
    """
    if link_layer != rdma_verbs_consts.LINK_LAYER_ETHERNET:
        return 0
    usable = [e for e in entries if any(e.gid)]
    if not usable:
        raise errors.Unavailable("no non-zero GID on the RoCE port (no IP address configured?)")
    return min(usable, key=lambda e: (_gid_rank(e), e.index)).index


# --- queue-pair set-up ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalPort:
    """What a side knows of its own port (from query_port / query_gid)."""

    device: str
    port_num: int
    gid_index: int
    gid: bytes
    lid: int
    active_mtu: int
    link_layer: int
    max_msg_bytes: int


@dataclass(frozen=True, slots=True)
class QpTuning:
    """Timeouts and depths of an RC queue pair (the values ibv_rc_pingpong uses by default).

    timeout: local ACK timeout, 4.096 µs * 2^timeout (14 ≈ 67 ms); retry_cnt / rnr_retry: 7 is
    the maximum (rnr 7 = retry forever, moot for one-sided ops); max_rd_atomic: RDMA READs this
    side may have outstanding; max_dest_rd_atomic: incoming READs it can serve at once. The
    queue-pair exchange does not carry these, so both sides must use values the other supports
    (16 is what current HCAs offer; `for_device` lowers them to the local limits).
    """

    pkey_index: int = 0
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = 7
    min_rnr_timer: int = 12
    max_rd_atomic: int = 16
    max_dest_rd_atomic: int = 16
    hop_limit: int = 64

    def for_device(self, max_qp_rd_atom: int, max_qp_init_rd_atom: int) -> QpTuning:
        """These values, capped by a device's limits (ibv_device_attr)."""
        return QpTuning(
            pkey_index=self.pkey_index,
            timeout=self.timeout,
            retry_cnt=self.retry_cnt,
            rnr_retry=self.rnr_retry,
            min_rnr_timer=self.min_rnr_timer,
            max_rd_atomic=max(1, min(self.max_rd_atomic, max_qp_init_rd_atom)),
            max_dest_rd_atomic=max(1, min(self.max_dest_rd_atomic, max_qp_rd_atom)),
            hop_limit=self.hop_limit,
        )


@dataclass(frozen=True, slots=True)
class AddressVector:
    """ibv_ah_attr of the path to the peer (AHAttr + GlobalRoute in pyverbs)."""

    port_num: int
    dlid: int
    is_global: bool
    dgid: str
    sgid_index: int
    hop_limit: int


@dataclass(frozen=True, slots=True)
class QpTransition:
    """One ibv_modify_qp: the QPAttr fields to set, the mask naming them, and the path (RTR)."""

    state: rdma_verbs_consts.QpState
    mask: rdma_verbs_consts.QpAttrMask
    attrs: dict[str, int]
    av: AddressVector | None = None


def new_psn() -> int:
    """A random 24-bit starting packet sequence number."""
    return secrets.randbits(24)


def local_qp_info(port: LocalPort, qp_num: int, psn: int) -> common_pb2.RdmaQueuePair:
    """What a side sends the other (gRPC ConnectRdma); mtu is the ibv_mtu enum of its port."""
    return common_pb2.RdmaQueuePair(
        qp_num=qp_num, psn=psn, gid=port.gid, lid=port.lid, mtu=port.active_mtu
    )


def check_peer(peer: common_pb2.RdmaQueuePair, port: LocalPort) -> None:
    """Reject queue-pair info that cannot be connected to (InvalidArgument)."""
    if not 0 < peer.qp_num <= rdma_verbs_consts.QPN_MASK:
        raise errors.InvalidArgument(f"peer QP number {peer.qp_num} outside 1..2^24-1")
    if peer.psn > rdma_verbs_consts.PSN_MASK:
        raise errors.InvalidArgument(f"peer PSN {peer.psn} wider than 24 bits")
    mtu_bytes(peer.mtu)
    if peer.gid and len(peer.gid) != rdma_verbs_consts.GID_BYTES:
        raise errors.InvalidArgument(f"peer GID of {len(peer.gid)} bytes")
    roce = port.link_layer == rdma_verbs_consts.LINK_LAYER_ETHERNET
    if roce and not any(peer.gid):
        raise errors.InvalidArgument("RoCE needs the peer's GID; it sent none")
    if not roce and not any(peer.gid) and not peer.lid:
        raise errors.InvalidArgument("InfiniBand needs the peer's LID or GID; it sent neither")


def init_transition(port: LocalPort, tuning: QpTuning, *, remote_access: bool) -> QpTransition:
    """RESET → INIT. remote_access: the peer may READ/WRITE through this QP (the server side)."""
    flags = rdma_verbs_consts.Access
    state, mask = rdma_verbs_consts.QpState, rdma_verbs_consts.QpAttrMask
    access = flags.REMOTE_READ | flags.REMOTE_WRITE if remote_access else flags(0)
    return QpTransition(
        state=state.INIT,
        mask=mask.STATE | mask.PKEY_INDEX | mask.PORT | mask.ACCESS_FLAGS,
        attrs={
            "qp_state": int(state.INIT),
            "pkey_index": tuning.pkey_index,
            "port_num": port.port_num,
            "qp_access_flags": int(access),
        },
    )


def connect_transitions(
    port: LocalPort, peer: common_pb2.RdmaQueuePair, local_psn: int, tuning: QpTuning
) -> list[QpTransition]:
    """INIT → RTR → RTS towards peer. Our receive PSN is the peer's send PSN and vice versa."""
    check_peer(peer, port)
    state, mask = rdma_verbs_consts.QpState, rdma_verbs_consts.QpAttrMask
    is_global = port.link_layer == rdma_verbs_consts.LINK_LAYER_ETHERNET or any(peer.gid)
    av = AddressVector(
        port_num=port.port_num,
        dlid=peer.lid,
        is_global=is_global,
        dgid=gid_text(peer.gid) if is_global else "",
        sgid_index=port.gid_index,
        hop_limit=tuning.hop_limit,
    )
    rtr = QpTransition(
        state=state.RTR,
        mask=mask.STATE
        | mask.AV
        | mask.PATH_MTU
        | mask.DEST_QPN
        | mask.RQ_PSN
        | mask.MAX_DEST_RD_ATOMIC
        | mask.MIN_RNR_TIMER,
        attrs={
            "qp_state": int(state.RTR),
            "path_mtu": min(port.active_mtu, peer.mtu),
            "dest_qp_num": peer.qp_num,
            "rq_psn": peer.psn,
            "max_dest_rd_atomic": tuning.max_dest_rd_atomic,
            "min_rnr_timer": tuning.min_rnr_timer,
        },
        av=av,
    )
    rts = QpTransition(
        state=state.RTS,
        mask=mask.STATE
        | mask.TIMEOUT
        | mask.RETRY_CNT
        | mask.RNR_RETRY
        | mask.SQ_PSN
        | mask.MAX_QP_RD_ATOMIC,
        attrs={
            "qp_state": int(state.RTS),
            "timeout": tuning.timeout,
            "retry_cnt": tuning.retry_cnt,
            "rnr_retry": tuning.rnr_retry,
            "sq_psn": local_psn & rdma_verbs_consts.PSN_MASK,
            "max_rd_atomic": tuning.max_rd_atomic,
        },
    )
    return [rtr, rts]


def rc_transitions(
    port: LocalPort,
    peer: common_pb2.RdmaQueuePair,
    local_psn: int,
    tuning: QpTuning,
    *,
    remote_access: bool,
) -> list[QpTransition]:
    """The whole RESET → INIT → RTR → RTS sequence of an RC queue pair."""
    init = init_transition(port, tuning, remote_access=remote_access)
    return [init, *connect_transitions(port, peer, local_psn, tuning)]


def error_transition() -> QpTransition:
    """→ ERR: outstanding work requests complete at once, flushed (used to abort)."""
    return QpTransition(
        state=rdma_verbs_consts.QpState.ERR,
        mask=rdma_verbs_consts.QpAttrMask.STATE,
        attrs={"qp_state": int(rdma_verbs_consts.QpState.ERR)},
    )


# --- work requests --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """One work request's share of an operation."""

    local_offset: int
    remote_addr: int
    length: int


def plan_chunks(remote_addr: int, length: int, max_bytes: int) -> list[Chunk]:
    """Cut [remote_addr, +length) into pieces of at most max_bytes, with matching local offsets."""
    if max_bytes <= 0:
        raise errors.InvalidArgument(f"chunk size must be positive, got {max_bytes}")
    if length < 0:
        raise errors.InvalidArgument(f"negative length {length}")
    return [
        Chunk(local_offset=off, remote_addr=remote_addr + off, length=min(max_bytes, length - off))
        for off in range(0, length, max_bytes)
    ]


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """One signaled RDMA READ/WRITE: SGE (local_addr, length, lkey) + rdma (rkey, remote_addr)."""

    wr_id: int
    opcode: int
    local_addr: int
    lkey: int
    length: int
    rkey: int
    remote_addr: int


# --- descriptors and completions ------------------------------------------------------------


def check_descriptor(desc: base.Descriptor, need: base.Rights, nbytes: int, now_ms: int) -> None:
    """Whether desc may be posted for an operation needing `need` on a buffer of nbytes.

    The client checks what it can before any byte moves: expiry (DescriptorExpired), the right
    (DescriptorRejected), an RDMA key and address (DescriptorRejected: granted without rdma), and
    the buffer size (InvalidArgument). The HCA enforces only the memory region behind the rkey.
    """
    if desc.expires_at_ms < now_ms:
        raise base.DescriptorExpired(
            f"descriptor of region {desc.region_id} expired {now_ms - desc.expires_at_ms} ms ago"
        )
    if desc.rights & need != need:
        raise base.DescriptorRejected(f"descriptor lacks the {need.name} right")
    if desc.rkey == 0 or desc.remote_addr == 0:
        raise base.DescriptorRejected("descriptor has no rkey/remote address (not an rdma grant)")
    if desc.remote_addr + desc.length > 1 << 64:
        raise base.DescriptorRejected("descriptor range wraps the address space")
    if nbytes != desc.length:
        raise errors.InvalidArgument(f"buffer of {nbytes} bytes for a descriptor of {desc.length}")


def completion_error(status: int, vendor_err: int = 0) -> errors.KVTierError | None:
    """The kvtier error of a work completion's status; None on success.

    REM_ACCESS_ERR: the peer's HCA refused the rkey or range (rotated or revoked key, forged
    descriptor) → DescriptorRejected. RETRY_EXC_ERR, RNR_RETRY_EXC_ERR, RESP_TIMEOUT_ERR: the
    peer stopped answering → PeerLost. WR_FLUSH_ERR: the queue pair had already failed →
    PeerLost. REM_OP_ERR, REM_ABORT_ERR, FATAL_ERR, GENERAL_ERR: the peer or device failed →
    Unavailable. Anything else is a local bug (bad lkey, length, state) → Internal.
    Every error leaves the RC queue pair in the ERR state: the connection must be rebuilt.
    """
    wc = rdma_verbs_consts.WcStatus
    if status == wc.SUCCESS:
        return None
    try:
        name = wc(status).name
    except ValueError:
        name = f"status {status}"
    text = f"RDMA work completion {name} (vendor error {vendor_err:#x})"
    if status == wc.REM_ACCESS_ERR:
        return base.DescriptorRejected(f"{text}: the peer's HCA refused the rkey or range")
    if status in (wc.RETRY_EXC_ERR, wc.RNR_RETRY_EXC_ERR, wc.RESP_TIMEOUT_ERR):
        return base.PeerLost(f"{text}: the peer stopped answering")
    if status == wc.WR_FLUSH_ERR:
        return base.PeerLost(f"{text}: the queue pair failed on an earlier request")
    if status in (
        wc.REM_OP_ERR,
        wc.REM_ABORT_ERR,
        wc.FATAL_ERR,
        wc.GENERAL_ERR,
    ):
        return errors.Unavailable(f"{text}: the peer or the device failed")
    return errors.Internal(text)


# --- client resources -----------------------------------------------------------------------

STAGING_SLOT_BYTES: Final = 256 << 10
STAGING_MAX_BYTES: Final = 64 << 20
MIN_SLOT_BYTES: Final = 4096
NO_SLOT: Final = -1


@dataclass(frozen=True, slots=True)
class StagingPlan:
    """A client's registered bounce buffer: `slots` slots of `slot_bytes` each."""

    slot_bytes: int
    slots: int

    @property
    def total_bytes(self) -> int:
        """Bytes to allocate and register."""
        return self.slot_bytes * self.slots


def staging_plan(max_inflight_bytes: int, memlock_limit: int, max_msg_bytes: int) -> StagingPlan:
    """Size the staging MR: ≤ the in-flight bound, ≤ 64 MiB, ≤ half of RLIMIT_MEMLOCK.

    memlock_limit < 0 means unlimited. A chunk never exceeds a slot or the port's max message.
    Unavailable when the memlock limit leaves not even one page to pin.
    """
    total = min(max_inflight_bytes, STAGING_MAX_BYTES)
    if memlock_limit >= 0:
        total = min(total, memlock_limit // 2)
    slot = min(STAGING_SLOT_BYTES, max_msg_bytes, total)
    if slot < MIN_SLOT_BYTES:
        raise errors.Unavailable(
            f"RLIMIT_MEMLOCK {memlock_limit} or max in-flight {max_inflight_bytes} bytes leaves "
            "no room for an RDMA staging buffer (raise `ulimit -l`)"
        )
    return StagingPlan(slot_bytes=slot, slots=max(1, total // slot))


def queue_sizes(max_qp_wr: int, max_cqe: int, want_depth: int = 512) -> tuple[int, int]:
    """(send-queue depth, CQ entries) within the device's limits; the CQ fits two queues' worth."""
    depth = max(1, min(want_depth, max_qp_wr, (max_cqe - 16) // 2))
    return depth, min(max_cqe, 2 * depth + 16)


@dataclass(slots=True)
class SendWindow:
    """Credits of a client queue pair: send-queue entries and staging slots.

    Every posted work request holds one send-queue entry until its completion; a staged one
    also holds a staging slot. Posting only with a credit in hand keeps ibv_post_send from
    ever failing for a full queue.
    """

    sq_depth: int
    slots: int
    in_flight: int = 0
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.slots - 1, -1, -1))

    def take(self, staged: bool) -> int | None:
        """A credit: the slot index (or NO_SLOT when not staged); None when none is free."""
        if self.in_flight >= self.sq_depth or (staged and not self._free):
            return None
        self.in_flight += 1
        return self._free.pop() if staged else NO_SLOT

    def give(self, slot: int) -> None:
        """Return a credit taken with take()."""
        self.in_flight -= 1
        if slot != NO_SLOT:
            self._free.append(slot)

    def reset(self) -> None:
        """Every credit back (the queue pair was destroyed or moved to ERR)."""
        self.in_flight = 0
        self.__post_init__()

    @property
    def free_slots(self) -> int:
        """Staging slots not in use."""
        return len(self._free)


@dataclass(frozen=True, slots=True)
class Registration:
    """A caller buffer registered as an MR: [addr, addr+length) with lkey."""

    addr: int
    length: int
    lkey: int


class RegistrationIndex:
    """The caller buffers a client registered, found by address (zero-copy operations)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[Registration] = []

    def add(self, reg: Registration) -> None:
        """Index a registration; InvalidArgument when it overlaps one already indexed."""
        at = bisect.bisect_left(self._starts, reg.addr)
        left = self._entries[at - 1] if at else None
        right = self._entries[at] if at < len(self._entries) else None
        if (left and left.addr + left.length > reg.addr) or (
            right and reg.addr + reg.length > right.addr
        ):
            raise errors.InvalidArgument("buffer overlaps one registered already")
        self._starts.insert(at, reg.addr)
        self._entries.insert(at, reg)

    def remove(self, addr: int) -> Registration | None:
        """Drop the registration starting at addr; returns it (None when there is none)."""
        at = bisect.bisect_left(self._starts, addr)
        if at < len(self._starts) and self._starts[at] == addr:
            del self._starts[at]
            return self._entries.pop(at)
        return None

    def find(self, addr: int, length: int) -> Registration | None:
        """The registration containing all of [addr, addr+length), if any."""
        at = bisect.bisect_right(self._starts, addr) - 1
        if at < 0:
            return None
        reg = self._entries[at]
        return reg if addr + length <= reg.addr + reg.length else None

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class PollBackoff:
    """How long the completion poller sleeps after an empty poll.

    Spin (yield only) for the first `spins` empty polls, then sleep doubling from min_sleep_s to
    max_sleep_s: microsecond latency while completions flow, little CPU while waiting on a slow
    peer. Any completion resets it.
    """

    spins: int = 64
    min_sleep_s: float = 5e-6
    max_sleep_s: float = 200e-6
    _empty: int = 0

    def after_poll(self, polled: int) -> float:
        """Seconds to sleep after a poll that returned `polled` completions."""
        if polled:
            self._empty = 0
            return 0.0
        self._empty += 1
        if self._empty <= self.spins:
            return 0.0
        doublings = min(self._empty - self.spins - 1, 30)
        return float(min(self.max_sleep_s, self.min_sleep_s * (1 << doublings)))
