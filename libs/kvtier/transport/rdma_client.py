"""The client side of the rdma transport: one RC queue pair to a node, posting RDMA READ/WRITE.

Work requests carry a descriptor's rkey and remote address; a thread polls the completion queue
and hands completions to the event loop. Blocking verbs calls run on one
`rdma_device.VerbsThread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import logging
import mmap
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, rdma_device, rdma_logic, rdma_verbs_consts, registry

log = logging.getLogger(__name__)

POLL_BATCH = 64
#: The poller's wait while nothing is outstanding (it is woken by every post anyway).
IDLE_WAIT_S = 0.5


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

    name: ClassVar[str] = rdma_logic.NAME
    #: Calls would need a message channel beside the queue pair (two-sided SEND/RECV): not yet.
    supports_calls: ClassVar[bool] = False

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
        self._dev: rdma_device.Device | None = None
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
        self._thread = rdma_device.VerbsThread("kvtier-rdma-client")

    # --- set-up and teardown

    async def open(self) -> None:
        """Open the device, register the staging buffer, connect the queue pair."""
        verbs = rdma_device.verbs_or_unavailable()
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

    def _open_device(
        self, verbs: rdma_device.Verbs, spec: rdma_logic.DeviceSpec
    ) -> rdma_device.Device:
        with rdma_device.verbs_errors(verbs, "opening the RDMA device"):
            return rdma_device.Device(verbs, spec, self._tuning)

    @staticmethod
    def _register_staging(dev: rdma_device.Device, staging: _Staging) -> Any:
        with rdma_device.verbs_errors(dev.verbs, "registering the staging buffer"):
            return dev.register(
                staging.addr, len(staging.view), rdma_verbs_consts.Access.LOCAL_WRITE
            )

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

    def _new_qp_blocking(self, dev: rdma_device.Device) -> tuple[Any, Any]:
        depth, cqe = self._sizes
        with rdma_device.verbs_errors(dev.verbs, "creating the queue pair"):
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
    def _modify_blocking(
        dev: rdma_device.Device, qp: Any, steps: Sequence[rdma_logic.QpTransition]
    ) -> None:
        with rdma_device.verbs_errors(dev.verbs, "connecting the queue pair"):
            dev.modify(qp, steps)

    def _require(self) -> rdma_device.Device:
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
            await self._thread.run(rdma_device.close_all, dev.verbs, old)
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
        access = rdma_verbs_consts.Access.LOCAL_WRITE

        def reg() -> Any:
            with rdma_device.verbs_errors(dev.verbs, "registering a buffer"):
                return dev.register(addr, view.nbytes, access)

        mr = await self._thread.run(reg)
        try:
            self._registrations.add(rdma_logic.Registration(addr, view.nbytes, int(mr.lkey)))
        except errors.InvalidArgument:
            await self._thread.run(rdma_device.close_all, dev.verbs, [mr])
            raise
        self._caller_mrs[addr] = (mr, view)

    async def unregister(self, buf: Any) -> None:
        """Deregister a buffer given to register() (no operation may be using it)."""
        addr = _address(base.as_buffer(buf, writable=True))
        if addr is None or self._registrations.remove(addr) is None:
            raise errors.NotFound("buffer was not registered")
        mr, _view = self._caller_mrs.pop(addr)
        await self._thread.run(rdma_device.close_all, self._require().verbs, [mr])

    async def call(
        self,
        method: int,
        request: Any,
        segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> base.CallResult:
        """Not carried over rdma (`supports_calls` is False): always raises Unavailable."""
        raise errors.Unavailable(
            "calls are not carried over rdma yet; use the gRPC API with descriptors"
        )

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
            await self._thread.run(rdma_device.close_all, dev.verbs, objects)
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
                send_flags=rdma_verbs_consts.SEND_SIGNALED,
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
        reading = opcode == rdma_verbs_consts.WR_RDMA_READ
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
        reading = opcode == rdma_verbs_consts.WR_RDMA_READ
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
        await self._transfer(rdma_verbs_consts.WR_RDMA_READ, [desc], [into])

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """RDMA WRITE `data` (len == desc.length) into the described range."""
        await self._transfer(rdma_verbs_consts.WR_RDMA_WRITE, [desc], [data])

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, posted together; all complete or the first error is raised."""
        await self._transfer(rdma_verbs_consts.WR_RDMA_READ, descs, intos)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, posted together; all complete or the first error is raised."""
        await self._transfer(rdma_verbs_consts.WR_RDMA_WRITE, descs, datas)
