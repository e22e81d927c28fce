"""The rdma data-plane transport: one-sided RDMA READ/WRITE over reliable-connected queue pairs.

Written against pyverbs (rdma-core's binding; Debian python3-pyverbs), imported inside functions
so hosts without it import this module fine. The server registers each region as memory regions
(MRs) and connects one RC queue pair per client (set up over gRPC ConnectRdma); the client posts
RDMA READ/WRITE work requests with a descriptor's rkey and remote address, and a thread polls the
completion queue. Everything that does not touch a device is in `rdma_logic` (unit-tested).
This module has NOT yet run on an RDMA device: see docs/transports.md, "What has and has not run".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import importlib
import itertools
import logging
import mmap
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, rdma_logic, registry

NAME = "rdma"

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often the server drops queue pairs that went to the ERR state.
REAP_INTERVAL_S = 5.0
#: Queue pairs one principal may hold on a server; its oldest go first (leaked by crashed peers).
MAX_QPS_PER_PRINCIPAL = 64
MAX_CONNECTIONS = 4096
POLL_BATCH = 64
#: The poller's wait while nothing is outstanding (it is woken by every post anyway).
IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class _Verbs:
    """The pyverbs modules (untyped, hence Any)."""

    device: Any
    pd: Any
    cq: Any
    qp: Any
    mr: Any
    wr: Any
    addr: Any
    error: Any


def _load_verbs() -> _Verbs:
    """Import pyverbs; ImportError when it is not installed."""
    load = importlib.import_module
    return _Verbs(
        device=load("pyverbs.device"),
        pd=load("pyverbs.pd"),
        cq=load("pyverbs.cq"),
        qp=load("pyverbs.qp"),
        mr=load("pyverbs.mr"),
        wr=load("pyverbs.wr"),
        addr=load("pyverbs.addr"),
        error=load("pyverbs.pyverbs_error"),
    )


def _verbs_or_unavailable() -> _Verbs:
    try:
        return _load_verbs()
    except ImportError as exc:
        raise errors.Unavailable(f"rdma: pyverbs is not installed ({exc})") from exc


def available() -> bool:
    """Whether pyverbs imports and at least one RDMA device exists."""
    try:
        return bool(_load_verbs().device.get_device_list())
    except Exception as exc:  # ImportError, or PyverbsRDMAError without kernel support
        log.debug("rdma not available: %s", exc)
        return False


@contextlib.contextmanager
def _verbs_errors(verbs: _Verbs, what: str) -> Iterator[None]:
    """Turn pyverbs failures into Unavailable (the one translation point of this module)."""
    try:
        yield
    except verbs.error.PyverbsError as exc:
        raise errors.Unavailable(f"rdma: {what} failed: {exc}") from exc


class _Device:
    """An opened device: context, protection domain, the chosen port. Blocking: use a thread."""

    def __init__(
        self, verbs: _Verbs, spec: rdma_logic.DeviceSpec, tuning: rdma_logic.QpTuning
    ) -> None:
        self.verbs = verbs
        names = [dev.name.decode() for dev in verbs.device.get_device_list()]
        name = spec.name or (names[0] if names else "")
        if name not in names:
            raise errors.Unavailable(f"rdma device {name!r} not found (devices: {names})")
        self.ctx = verbs.device.Context(name=name)
        try:
            attr = self.ctx.query_device()
            ports = range(1, attr.phys_port_cnt + 1)
            port_num = spec.port or rdma_logic.choose_port(
                [(p, self.ctx.query_port(p).state) for p in ports]
            )
            pattr = self.ctx.query_port(port_num)
            gid_index = spec.gid_index
            if gid_index is None:
                gid_index = rdma_logic.choose_gid_index(
                    self._gid_table(port_num, pattr), pattr.link_layer
                )
            self.port = rdma_logic.LocalPort(
                device=name,
                port_num=port_num,
                gid_index=gid_index,
                gid=rdma_logic.gid_bytes(self.ctx.query_gid(port_num, gid_index).gid),
                lid=pattr.lid,
                active_mtu=pattr.active_mtu,
                link_layer=pattr.link_layer,
                max_msg_bytes=pattr.max_msg_sz,
            )
            self.tuning = tuning.for_device(attr.max_qp_rd_atom, attr.max_qp_init_rd_atom)
            self.max_qp_wr: int = attr.max_qp_wr
            self.max_cqe: int = attr.max_cqe
            self.pd = verbs.pd.PD(self.ctx)
        except BaseException:
            self.ctx.close()
            raise

    def _gid_table(self, port_num: int, pattr: Any) -> list[rdma_logic.GidEntry]:
        if pattr.link_layer != rdma_logic.LINK_LAYER_ETHERNET:
            return []  # InfiniBand: index 0, see choose_gid_index
        entries = []
        for index in range(pattr.gid_tbl_len):
            try:
                gid = rdma_logic.gid_bytes(self.ctx.query_gid(port_num, index).gid)
                gid_type = self.ctx.query_gid_type(port_num, index)
            except self.verbs.error.PyverbsError:
                continue  # unpopulated entries fail on some providers
            entries.append(rdma_logic.GidEntry(index, gid, gid_type))
        return entries

    def register(self, addr: int, length: int, access: rdma_logic.Access) -> Any:
        """An MR over [addr, addr+length) (the memory stays ours; the MR pins it)."""
        return self.verbs.mr.MR(self.pd, length, int(access), address=addr)

    def create_qp(self, cq: Any, depth: int) -> Any:
        """An RC queue pair in RESET; every send work request completes (sq_sig_all)."""
        q = self.verbs.qp
        cap = q.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = q.QPInitAttr(qp_type=rdma_logic.QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=1)
        return q.QP(self.pd, init)

    def modify(self, qp: Any, transitions: Iterable[rdma_logic.QpTransition]) -> None:
        """Apply state transitions (rdma_logic computes them) with ibv_modify_qp."""
        for step in transitions:
            attr = self.verbs.qp.QPAttr()
            for key, value in step.attrs.items():
                setattr(attr, key, value)
            if step.av is not None:
                attr.ah_attr = self._ah_attr(step.av)
            qp.modify(attr, int(step.mask))

    def _ah_attr(self, av: rdma_logic.AddressVector) -> Any:
        a = self.verbs.addr
        route = None
        if av.is_global:
            gid = a.GID()
            gid.gid = av.dgid
            route = a.GlobalRoute(dgid=gid, sgid_index=av.sgid_index, hop_limit=av.hop_limit)
        return a.AHAttr(port_num=av.port_num, is_global=int(av.is_global), gr=route, dlid=av.dlid)

    def close(self) -> None:
        """Close the PD and the context (pyverbs closes what hangs off them too)."""
        with contextlib.suppress(self.verbs.error.PyverbsError):
            self.pd.close()
        self.ctx.close()


class _VerbsThread:
    """One thread for an owner's blocking verbs calls: off the loop, and never two at once
    (so a queue pair is never closed while another call still uses it)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        """Let the thread end once its queued calls ran; a later run() starts a new one."""
        self._pool.shutdown(wait=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._name)


def _close_all(verbs: _Verbs, objects: Iterable[Any]) -> None:
    """Close verbs objects in order, logging (not raising) failures: used on teardown."""
    for obj in objects:
        if obj is None:
            continue
        try:
            obj.close()
        except verbs.error.PyverbsError as exc:
            log.warning("rdma: closing %s failed: %s", type(obj).__name__, exc)


# --- server -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _RegionKeys:
    region: base.Region
    read: Any  # MR with REMOTE_READ only (None when read-only keys are off)
    write: Any  # MR with LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE


@dataclass(slots=True)
class _Connection:
    qp: Any
    principal: str
    accepted_at: float


class Server:
    """The rdma side of a node: MRs over its regions and one RC queue pair per client.

    One-sided RDMA never reaches this process: the HCA checks only that a request's rkey names a
    live MR of this PD with the needed access and that the range lies inside it. So descriptors
    here are enforced by the client (expiry, rights) and by the keys: read-only grants carry the
    rkey of a read-only MR (`read_only_keys`), and `rotate_keys` re-registers MRs so that every
    rkey handed out before stops working (docs/transports.md says when to use it).
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        ctx: base.ServerContext,
        settings: registry.ServerSettings,
        *,
        tuning: rdma_logic.QpTuning | None = None,
        read_only_keys: bool = True,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self._tuning = tuning or rdma_logic.QpTuning()
        self._read_only_keys = read_only_keys
        self._max_connections = max_connections
        self._dev: _Device | None = None
        self._cq: Any = None
        self._keys: dict[int, _RegionKeys] = {}
        self._conns: dict[int, _Connection] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._thread = _VerbsThread("kvtier-rdma-server")

    async def start(self) -> common_pb2.TransportEndpoint:
        """Open the device, register every region; returns the endpoint (device, port, GID, LID)."""
        spec = rdma_logic.parse_device_spec(self._settings.rdma_device)
        dev, self._cq = await self._thread.run(self._open, spec)
        self._dev = dev
        await self.sync_regions()
        self._reaper = asyncio.create_task(self._reap_forever(), name="kvtier-rdma-reaper")
        port = dev.port
        log.info(
            "rdma serving on %s port %d (gid index %d, lid %d, mtu %d, %d regions)",
            port.device,
            port.port_num,
            port.gid_index,
            port.lid,
            rdma_logic.mtu_bytes(port.active_mtu),
            len(self._keys),
        )
        return common_pb2.TransportEndpoint(
            name=NAME,
            rdma_device=port.device,
            rdma_port=port.port_num,
            rdma_gid=port.gid,
            rdma_lid=port.lid,
        )

    def _open(self, spec: rdma_logic.DeviceSpec) -> tuple[_Device, Any]:
        verbs = _verbs_or_unavailable()
        with _verbs_errors(verbs, "opening the RDMA device"):
            dev = _Device(verbs, spec, self._tuning)
            try:
                # Server queue pairs post nothing: their CQ stays empty, a small one is enough.
                return dev, verbs.cq.CQ(dev.ctx, 16, None, None, 0)
            except BaseException:
                dev.close()
                raise

    def _require(self) -> _Device:
        if self._dev is None:
            raise errors.Unavailable("rdma server is not started")
        return self._dev

    async def register(self, region: base.Region) -> None:
        """Register a region (idempotent): needed before granting descriptors of it."""
        dev = self._require()
        async with self._lock:
            if region.region_id not in self._keys:
                keys = await self._thread.run(self._register_blocking, dev, region)
                self._keys[region.region_id] = keys

    async def sync_regions(self) -> int:
        """Register the regions of the node added since; returns how many."""
        fresh = [r for r in self._ctx.regions.all() if r.region_id not in self._keys]
        for region in fresh:
            await self.register(region)
        return len(fresh)

    def _register_blocking(self, dev: _Device, region: base.Region) -> _RegionKeys:
        access = rdma_logic.Access
        full = access.LOCAL_WRITE | access.REMOTE_READ | access.REMOTE_WRITE
        with _verbs_errors(dev.verbs, f"registering region {region.region_id}"):
            write = dev.register(region.address, region.size, full)
            try:
                read = None
                if self._read_only_keys:
                    read = dev.register(region.address, region.size, access.REMOTE_READ)
            except BaseException:
                write.close()
                raise
        return _RegionKeys(region, read, write)

    def rkey(self, region_id: int, rights: base.Rights) -> int:
        """The rkey to put in a descriptor of region_id with these rights."""
        keys = self._keys.get(region_id)
        if keys is None:
            raise errors.PreconditionFailed(f"region {region_id} is not registered with rdma")
        mr = keys.write if rights & base.Rights.WRITE or keys.read is None else keys.read
        return int(mr.rkey)

    def grant(
        self,
        region: base.Region,
        offset: int,
        length: int,
        rights: base.Rights,
        principal: str,
        ttl_s: float = 30.0,
    ) -> base.Descriptor:
        """A descriptor (issuer.grant) carrying the rkey and remote address for its rights."""
        rkey = self.rkey(region.region_id, rights)
        return self._ctx.issuer.grant(region, offset, length, rights, principal, ttl_s, rkey=rkey)

    async def rotate_keys(self, region_ids: Sequence[int] | None = None) -> int:
        """Re-register the MRs of these regions (all when None): every older rkey stops working.

        The new MRs are registered while the old ones still exist, so their keys differ; then
        the old ones are deregistered. A client still using an old key gets DescriptorRejected
        (and its queue pair fails; it reconnects on its next operation). Returns regions rotated.
        """
        dev = self._require()
        async with self._lock:
            ids = list(self._keys) if region_ids is None else list(region_ids)
            rotated = 0
            for region_id in ids:
                old = self._keys.get(region_id)
                if old is None:
                    continue
                self._keys[region_id] = await self._thread.run(
                    self._register_blocking, dev, old.region
                )
                await self._thread.run(_close_all, dev.verbs, [old.read, old.write])
                rotated += 1
        log.info("rdma: rotated the keys of %d regions", rotated)
        return rotated

    async def accept(
        self, client_qp: common_pb2.RdmaQueuePair, principal: str
    ) -> common_pb2.RdmaQueuePair:
        """Connect a queue pair to a client's (after ConnectRdma checked its token); ours back."""
        dev = self._require()
        rdma_logic.check_peer(client_qp, dev.port)
        if len(self._conns) >= self._max_connections:
            await self._reap()
            if len(self._conns) >= self._max_connections:
                raise errors.Overloaded(f"rdma: {len(self._conns)} queue pairs connected")
        await self._evict_oldest(principal)
        qp, reply = await self._thread.run(self._accept_blocking, dev, client_qp)
        self._conns[reply.qp_num] = _Connection(qp, principal, time.monotonic())
        log.info("rdma: queue pair %d connected for %s", reply.qp_num, principal)
        return reply

    def _accept_blocking(
        self, dev: _Device, peer: common_pb2.RdmaQueuePair
    ) -> tuple[Any, common_pb2.RdmaQueuePair]:
        psn = rdma_logic.new_psn()
        steps = rdma_logic.rc_transitions(dev.port, peer, psn, dev.tuning, remote_access=True)
        with _verbs_errors(dev.verbs, "connecting a queue pair"):
            qp = dev.create_qp(self._cq, 1)
            try:
                dev.modify(qp, steps)
            except BaseException:
                qp.close()
                raise
            return qp, rdma_logic.local_qp_info(dev.port, qp.qp_num, psn)

    async def disconnect(self, principal: str) -> int:
        """Destroy every queue pair of principal (revocation); returns how many."""
        return await self._drop([n for n, c in self._conns.items() if c.principal == principal])

    async def _evict_oldest(self, principal: str) -> None:
        mine = sorted(
            (c.accepted_at, n) for n, c in self._conns.items() if c.principal == principal
        )
        excess = len(mine) - MAX_QPS_PER_PRINCIPAL + 1
        if excess > 0:
            await self._drop([n for _, n in mine[:excess]])

    async def _drop(self, qp_nums: Sequence[int]) -> int:
        doomed = [self._conns.pop(n).qp for n in qp_nums if n in self._conns]
        if doomed and self._dev is not None:
            await self._thread.run(_close_all, self._dev.verbs, doomed)
        return len(doomed)

    async def _reap(self) -> int:
        """Destroy queue pairs in the ERR state (their client failed or went away)."""
        if self._dev is None or not self._conns:
            return 0
        live = [(n, c.qp) for n, c in self._conns.items()]
        dead = await self._thread.run(self._dead_blocking, self._dev, live)
        return await self._drop(dead)

    @staticmethod
    def _dead_blocking(dev: _Device, live: Sequence[tuple[int, Any]]) -> list[int]:
        dead = []
        for qp_num, qp in live:
            try:
                attr, _init = qp.query(int(rdma_logic.QpAttrMask.STATE))
            except dev.verbs.error.PyverbsError:
                dead.append(qp_num)
                continue
            if attr.qp_state == rdma_logic.QpState.ERR:
                dead.append(qp_num)
        return dead

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await self._reap()
            except Exception:
                log.exception("rdma: reaping failed queue pairs failed")

    def connection_count(self) -> int:
        """Connected client queue pairs."""
        return len(self._conns)

    async def stop(self) -> None:
        """Destroy every queue pair and MR, close the device; idempotent."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.wait([self._reaper])
            self._reaper = None
        dev, self._dev = self._dev, None
        if dev is None:
            return
        qps = [c.qp for c in self._conns.values()]
        mrs = [mr for k in self._keys.values() for mr in (k.read, k.write)]
        self._conns.clear()
        self._keys.clear()
        cq, self._cq = self._cq, None
        await self._thread.run(_close_all, dev.verbs, [*qps, *mrs, cq, dev])
        self._thread.shutdown()


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> Server:
    """The serving side (nothing touches the device until start())."""
    return Server(ctx, settings)


# --- client -----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Op:
    """One descriptor's transfer: done when all its work requests completed."""

    future: asyncio.Future[None]
    pending: int = 0
    all_posted: bool = False
    error: errors.KVTierError | None = None


@dataclass(slots=True)
class _Posted:
    op: _Op
    slot: int
    copy_out: memoryview | None  # staged READ: where the slot's bytes go on success
    staging_offset: int


class _Staging:
    """The client's bounce buffer: anonymous memory, populated up front, registered once."""

    def __init__(self, size: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(-1, size, flags=flags)
        self.view = memoryview(self._map)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.addr = ctypes.addressof(anchor)
        del anchor  # drop the export so the map can close

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def _address(view: memoryview) -> int | None:
    """The address of a writable buffer (None for read-only or empty ones)."""
    if view.readonly or not view.nbytes:
        return None
    anchor = ctypes.c_char.from_buffer(view)
    return ctypes.addressof(anchor)


class Client:
    """A client's RC queue pair to one node, with its staging MR and completion poller.

    Buffers go through the registered staging buffer (one copy) unless they lie inside a buffer
    given to `register()` (zero copy). Each chunk of at most min(slot, port max message) bytes
    is one signaled work request; requests queued in one event-loop turn are posted as one
    chain (one doorbell). After any failed completion the queue pair is in ERR: every operation
    in flight fails (PeerLost unless it was the failing one) and the next call reconnects.
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        endpoint: common_pb2.TransportEndpoint,
        settings: registry.ClientSettings,
        tuning: rdma_logic.QpTuning | None = None,
    ) -> None:
        if settings.rdma_exchange is None:
            raise errors.InvalidArgument("rdma needs settings.rdma_exchange (gRPC ConnectRdma)")
        self._exchange = settings.rdma_exchange
        self._endpoint = endpoint
        self._settings = settings
        self._tuning = tuning or rdma_logic.QpTuning()
        self._loop = asyncio.get_running_loop()
        self._budget = base.ByteBudget(settings.max_inflight_bytes)
        self._dev: _Device | None = None
        self._cq: Any = None
        self._qp: Any = None
        self._staging: _Staging | None = None
        self._staging_mr: Any = None
        self._staging_lkey = 0
        self._plan = rdma_logic.StagingPlan(slot_bytes=1, slots=1)
        self._sizes = (1, 1)
        self._window = rdma_logic.SendWindow(sq_depth=1, slots=1)
        self._registrations = rdma_logic.RegistrationIndex()
        self._caller_mrs: dict[int, tuple[Any, memoryview]] = {}
        self._wr_ids = itertools.count(1)
        self._posted: dict[int, _Posted] = {}
        self._chain: list[rdma_logic.WorkRequest] = []
        self._flush_scheduled = False
        self._credits = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._broken: errors.KVTierError | None = None
        self._closed = False
        self._reconnect_lock = asyncio.Lock()
        self._wake = threading.Event()
        self._poll_stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._thread = _VerbsThread("kvtier-rdma-client")

    # --- set-up and teardown

    async def open(self) -> None:
        """Open the device, register the staging buffer, connect the queue pair."""
        verbs = _verbs_or_unavailable()
        spec = rdma_logic.parse_device_spec(self._settings.rdma_device)
        self._dev = dev = await self._thread.run(self._open_device, verbs, spec)
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        memlock = -1 if soft == resource.RLIM_INFINITY else soft
        self._plan = rdma_logic.staging_plan(
            self._settings.max_inflight_bytes, memlock, dev.port.max_msg_bytes
        )
        self._sizes = rdma_logic.queue_sizes(dev.max_qp_wr, dev.max_cqe)
        self._window = rdma_logic.SendWindow(sq_depth=self._sizes[0], slots=self._plan.slots)
        self._staging = _Staging(self._plan.total_bytes)
        self._staging_mr = await self._thread.run(self._register_staging, dev, self._staging)
        self._staging_lkey = int(self._staging_mr.lkey)
        await self._connect_qp()

    def _open_device(self, verbs: _Verbs, spec: rdma_logic.DeviceSpec) -> _Device:
        with _verbs_errors(verbs, "opening the RDMA device"):
            return _Device(verbs, spec, self._tuning)

    @staticmethod
    def _register_staging(dev: _Device, staging: _Staging) -> Any:
        with _verbs_errors(dev.verbs, "registering the staging buffer"):
            return dev.register(staging.addr, len(staging.view), rdma_logic.Access.LOCAL_WRITE)

    async def _connect_qp(self) -> None:
        dev = self._require()
        self._cq, self._qp = await self._thread.run(self._new_qp_blocking, dev)
        psn = rdma_logic.new_psn()
        mine = rdma_logic.local_qp_info(dev.port, self._qp.qp_num, psn)
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                peer = await self._exchange(mine)
        except TimeoutError:
            raise errors.DeadlineExceeded("rdma: the ConnectRdma exchange timed out") from None
        steps = rdma_logic.connect_transitions(dev.port, peer, psn, dev.tuning)
        await self._thread.run(self._modify_blocking, dev, self._qp, steps)
        self._window.reset()
        self._broken = None
        self._start_poller()
        log.debug("rdma: queue pair %d connected to %d", self._qp.qp_num, peer.qp_num)

    def _new_qp_blocking(self, dev: _Device) -> tuple[Any, Any]:
        depth, cqe = self._sizes
        with _verbs_errors(dev.verbs, "creating the queue pair"):
            cq = dev.verbs.cq.CQ(dev.ctx, cqe, None, None, 0)
            try:
                qp = dev.create_qp(cq, depth)
                steps = [rdma_logic.init_transition(dev.port, dev.tuning, remote_access=False)]
                dev.modify(qp, steps)
            except BaseException:
                cq.close()
                raise
        return cq, qp

    @staticmethod
    def _modify_blocking(dev: _Device, qp: Any, steps: Sequence[rdma_logic.QpTransition]) -> None:
        with _verbs_errors(dev.verbs, "connecting the queue pair"):
            dev.modify(qp, steps)

    def _require(self) -> _Device:
        if self._dev is None or self._closed:
            raise errors.Unavailable("rdma client is closed")
        return self._dev

    async def _ensure_connected(self) -> None:
        """Reconnect (new CQ and queue pair, same MRs) when the queue pair failed."""
        dev = self._require()
        if self._broken is None:
            return
        async with self._reconnect_lock:
            if self._broken is None:
                return
            await self._stop_poller()
            old, self._qp, self._cq = [self._qp, self._cq], None, None
            await self._thread.run(_close_all, dev.verbs, old)
            await self._connect_qp()
            log.info("rdma: reconnected to %s", self._endpoint.rdma_device or "peer")

    async def register(self, buf: Any) -> None:
        """Register a writable buffer: operations on memory inside it skip the staging copy.

        The buffer stays pinned (and cannot be resized) until unregister() or close();
        InvalidArgument when it overlaps a registered buffer.
        """
        dev = self._require()
        view = base.as_buffer(buf, writable=True)
        addr = _address(view)
        if addr is None:
            raise errors.InvalidArgument("cannot register an empty buffer")
        access = rdma_logic.Access.LOCAL_WRITE

        def reg() -> Any:
            with _verbs_errors(dev.verbs, "registering a buffer"):
                return dev.register(addr, view.nbytes, access)

        mr = await self._thread.run(reg)
        try:
            self._registrations.add(rdma_logic.Registration(addr, view.nbytes, int(mr.lkey)))
        except errors.InvalidArgument:
            await self._thread.run(_close_all, dev.verbs, [mr])
            raise
        self._caller_mrs[addr] = (mr, view)

    async def unregister(self, buf: Any) -> None:
        """Deregister a buffer given to register() (no operation may be using it)."""
        addr = _address(base.as_buffer(buf, writable=True))
        if addr is None or self._registrations.remove(addr) is None:
            raise errors.NotFound("buffer was not registered")
        mr, _view = self._caller_mrs.pop(addr)
        await self._thread.run(_close_all, self._require().verbs, [mr])

    async def close(self) -> None:
        """Fail what is in flight, destroy the queue pair and MRs, close the device; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._break(base.PeerLost("rdma client closed"), quiet=True)
        await self._stop_poller()
        dev, self._dev = self._dev, None
        mrs = [mr for mr, _view in self._caller_mrs.values()]
        self._caller_mrs.clear()
        if dev is not None:
            objects = [self._qp, self._cq, *mrs, self._staging_mr, dev]
            await self._thread.run(_close_all, dev.verbs, objects)
        self._qp = self._cq = self._staging_mr = None
        self._thread.shutdown()
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    # --- completions (poller thread → event loop)

    def _start_poller(self) -> None:
        self._poll_stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_loop,
            args=(self._cq, self._poll_stop),
            name="kvtier-rdma-cq",
            daemon=True,
        )
        self._poller.start()

    async def _stop_poller(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            self._poll_stop.set()
            self._wake.set()
            await asyncio.to_thread(poller.join)

    def _poll_loop(self, cq: Any, stop: threading.Event) -> None:
        """Poll the CQ while work is outstanding; hand completions to the loop in batches."""
        backoff = rdma_logic.PollBackoff()
        while not stop.is_set():
            self._wake.clear()
            if not self._posted:
                self._wake.wait(IDLE_WAIT_S)
                continue
            try:
                count, wcs = cq.poll(POLL_BATCH)
                done = [(wc.wr_id, wc.status, wc.vendor_err) for wc in wcs[:count]]
                if done:
                    self._loop.call_soon_threadsafe(self._on_completions, done)
            except RuntimeError:
                return  # the event loop closed under us
            except Exception as exc:  # the CQ failed: the connection is gone
                lost = base.PeerLost(f"polling the completion queue failed: {exc}")
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._break, lost)
                return
            # sleep(0) still releases the GIL, so spinning never starves the event loop.
            time.sleep(backoff.after_poll(count))

    def _on_completions(self, done: list[tuple[int, int, int]]) -> None:
        failure: errors.KVTierError | None = None
        for wr_id, status, vendor_err in done:
            posted = self._posted.pop(wr_id, None)
            if posted is None:
                continue  # a queue pair already failed and torn down
            error = rdma_logic.completion_error(status, vendor_err)
            if error is None and posted.copy_out is not None and not posted.op.future.done():
                start = posted.staging_offset
                staging = self._staging_view()
                posted.copy_out[:] = staging[start : start + posted.copy_out.nbytes]
            self._window.give(posted.slot)
            self._settle(posted.op, error)
            if error is not None and failure is None:
                failure = error
        self._credits.set()
        if failure is not None:
            self._break(failure)

    def _settle(self, op: _Op, error: errors.KVTierError | None) -> None:
        op.pending -= 1
        if error is not None and op.error is None:
            op.error = error
        if op.pending == 0 and op.all_posted:
            self._finish(op)

    @staticmethod
    def _finish(op: _Op) -> None:
        if op.future.done():
            return
        if op.error is not None:
            op.future.set_exception(op.error)
        else:
            op.future.set_result(None)

    def _break(self, reason: errors.KVTierError, *, quiet: bool = False) -> None:
        """The queue pair failed: move it to ERR, fail everything in flight, free the credits."""
        if self._broken is not None:
            return
        self._broken = reason
        if not quiet:
            log.warning("rdma: queue pair failed (%s); reconnecting on next use", reason)
        if self._qp is not None and self._dev is not None:
            # One modify_qp syscall, on the loop on purpose: nothing may post meanwhile, and
            # in ERR the HCA stops touching our buffers before the credits are reused.
            try:
                self._dev.modify(self._qp, [rdma_logic.error_transition()])
            except Exception as exc:
                log.warning("rdma: moving the queue pair to ERR failed: %s", exc)
        lost = base.PeerLost(f"rdma queue pair failed: {reason.message}")
        posted, self._posted = self._posted, {}
        self._chain = []
        self._window.reset()
        for item in posted.values():
            self._settle(item.op, lost)
        self._credits.set()

    # --- posting

    def _staging_view(self) -> memoryview:
        if self._staging is None:
            raise errors.Unavailable("rdma client is closed")
        return self._staging.view

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Post every work request queued in this loop turn as one chain: one doorbell."""
        self._flush_scheduled = False
        chain, self._chain = self._chain, []
        if not chain or self._qp is None or self._dev is None:
            return
        w = self._dev.verbs.wr
        wrs = []
        for req in chain:
            sge = w.SGE(req.local_addr, req.length, req.lkey)
            wr = w.SendWR(
                wr_id=req.wr_id,
                opcode=req.opcode,
                num_sge=1,
                sg=[sge],
                send_flags=rdma_logic.SEND_SIGNALED,
            )
            wr.set_wr_rdma(req.rkey, req.remote_addr)
            wrs.append(wr)
        for prev, nxt in itertools.pairwise(wrs):
            prev.next_wr = nxt
        try:
            self._qp.post_send(wrs[0], None)
        except Exception as exc:  # credits make a full queue impossible: the QP is broken
            self._break(base.PeerLost(f"ibv_post_send failed: {exc}"))
            return
        self._wake.set()

    async def _credit(self, staged: bool) -> int:
        while True:
            if self._broken is not None:
                raise base.PeerLost(f"rdma queue pair failed: {self._broken.message}")
            slot = self._window.take(staged)
            if slot is not None:
                return slot
            self._credits.clear()
            await self._credits.wait()

    async def _post_op(self, op: _Op, opcode: int, desc: base.Descriptor, view: memoryview) -> None:
        addr = _address(view) if len(self._registrations) else None
        reg = self._registrations.find(addr, view.nbytes) if addr is not None else None
        dev = self._require()
        max_bytes = self._plan.slot_bytes if reg is None else dev.port.max_msg_bytes
        reading = opcode == rdma_logic.WR_RDMA_READ
        for chunk in rdma_logic.plan_chunks(desc.remote_addr, desc.length, max_bytes):
            slot = await self._credit(staged=reg is None)
            piece = view[chunk.local_offset : chunk.local_offset + chunk.length]
            offset = 0
            if reg is None:
                offset = slot * self._plan.slot_bytes
                local, lkey = self._staging_addr() + offset, self._staging_lkey
                if not reading:
                    self._staging_view()[offset : offset + chunk.length] = piece
            else:
                assert addr is not None
                local, lkey = addr + chunk.local_offset, reg.lkey
            wr_id = next(self._wr_ids)
            copy_out = piece if reading and reg is None else None
            self._posted[wr_id] = _Posted(op, slot, copy_out, offset)
            op.pending += 1
            self._chain.append(
                rdma_logic.WorkRequest(
                    wr_id, opcode, local, lkey, chunk.length, desc.rkey, chunk.remote_addr
                )
            )
            self._schedule_flush()

    def _staging_addr(self) -> int:
        if self._staging is None:
            raise errors.Unavailable("rdma client is closed")
        return self._staging.addr

    async def _submit(self, opcode: int, desc: base.Descriptor, view: memoryview) -> _Op:
        await self._budget.acquire(desc.length)
        op = _Op(self._loop.create_future())
        op.future.add_done_callback(functools.partial(self._op_done, desc.length))
        try:
            await self._post_op(op, opcode, desc, view)
        except BaseException as exc:
            if op.error is None:
                op.error = exc if isinstance(exc, errors.KVTierError) else base.PeerLost(repr(exc))
            raise
        finally:
            op.all_posted = True
            if op.pending == 0:
                self._finish(op)
        return op

    def _op_done(self, nbytes: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a failed batch raises only its first error
        task = self._loop.create_task(self._budget.release(nbytes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _transfer(
        self, opcode: int, descs: Sequence[base.Descriptor], bufs: Sequence[Any]
    ) -> None:
        reading = opcode == rdma_logic.WR_RDMA_READ
        views = [base.as_buffer(b, writable=reading) for b in bufs]
        base.check_sizes(descs, views)
        need = base.Rights.READ if reading else base.Rights.WRITE
        now = base.now_ms()
        for desc, view in zip(descs, views, strict=True):
            rdma_logic.check_descriptor(desc, need, view.nbytes, now)
        await self._ensure_connected()
        ops: list[_Op] = []
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                for desc, view in zip(descs, views, strict=True):
                    ops.append(await self._submit(opcode, desc, view))
                if ops:
                    await asyncio.wait([op.future for op in ops])
        except TimeoutError:
            self._break(errors.DeadlineExceeded(f"rdma transfer exceeded {timeout_s} s"))
            raise errors.DeadlineExceeded(f"rdma transfer exceeded {timeout_s} s") from None
        for op in ops:
            error = op.future.exception()
            if error is not None:
                raise error

    # --- the Transport protocol

    async def read(self, desc: base.Descriptor, into: Any) -> None:
        """RDMA READ the described range into `into` (len == desc.length)."""
        await self._transfer(rdma_logic.WR_RDMA_READ, [desc], [into])

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """RDMA WRITE `data` (len == desc.length) into the described range."""
        await self._transfer(rdma_logic.WR_RDMA_WRITE, [desc], [data])

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, posted together; all complete or the first error is raised."""
        await self._transfer(rdma_logic.WR_RDMA_READ, descs, intos)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, posted together; all complete or the first error is raised."""
        await self._transfer(rdma_logic.WR_RDMA_WRITE, descs, datas)


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> Client:
    """A connected client. The token travels inside settings.rdma_exchange (ConnectRdma)."""
    client = Client(endpoint, settings)
    try:
        await client.open()
    except BaseException:
        await client.close()
        raise
    return client
