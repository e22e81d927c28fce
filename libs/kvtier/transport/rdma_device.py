"""The pyverbs side of the rdma transport: loading pyverbs, an opened device, a verbs thread.

pyverbs (rdma-core's binding; Debian python3-pyverbs) is imported inside functions, so hosts
without it import this module fine. `Device` applies what `rdma_logic` computes (ports, GIDs,
queue-pair transitions) with blocking verbs calls, which `VerbsThread` keeps off the event loop;
`verbs_errors` is the one place pyverbs failures become kvtier errors. Used by `rdma_server`
and `rdma_client`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from kvtier import errors
from kvtier.transport import rdma_logic, rdma_verbs_consts

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verbs:
    """The pyverbs modules (untyped, hence Any)."""

    device: Any
    pd: Any
    cq: Any
    qp: Any
    mr: Any
    wr: Any
    addr: Any
    error: Any


def load_verbs() -> Verbs:
    """Import pyverbs; ImportError when it is not installed."""
    load = importlib.import_module
    return Verbs(
        device=load("pyverbs.device"),
        pd=load("pyverbs.pd"),
        cq=load("pyverbs.cq"),
        qp=load("pyverbs.qp"),
        mr=load("pyverbs.mr"),
        wr=load("pyverbs.wr"),
        addr=load("pyverbs.addr"),
        error=load("pyverbs.pyverbs_error"),
    )


def verbs_or_unavailable() -> Verbs:
    """pyverbs (through load_verbs); Unavailable when it is not installed."""
    try:
        return load_verbs()
    except ImportError as exc:
        raise errors.Unavailable(f"rdma: pyverbs is not installed ({exc})") from exc


@contextlib.contextmanager
def verbs_errors(verbs: Verbs, what: str) -> Iterator[None]:
    """Turn pyverbs failures into Unavailable (the one translation point of the rdma transport)."""
    try:
        yield
    except verbs.error.PyverbsError as exc:
        raise errors.Unavailable(f"rdma: {what} failed: {exc}") from exc


class Device:
    """An opened device: context, protection domain, the chosen port. Blocking: use a thread."""

    def __init__(
        self, verbs: Verbs, spec: rdma_logic.DeviceSpec, tuning: rdma_logic.QpTuning
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
        if pattr.link_layer != rdma_verbs_consts.LINK_LAYER_ETHERNET:
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

    def register(self, addr: int, length: int, access: rdma_verbs_consts.Access) -> Any:
        """An MR over [addr, addr+length) (the memory stays ours; the MR pins it)."""
        return self.verbs.mr.MR(self.pd, length, int(access), address=addr)

    def create_qp(self, cq: Any, depth: int) -> Any:
        """An RC queue pair in RESET; every send work request completes (sq_sig_all)."""
        q = self.verbs.qp
        cap = q.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = q.QPInitAttr(qp_type=rdma_verbs_consts.QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=1)
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


class VerbsThread:
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


def close_all(verbs: Verbs, objects: Iterable[Any]) -> None:
    """Close verbs objects in order, logging (not raising) failures: used on teardown."""
    for obj in objects:
        if obj is None:
            continue
        try:
            obj.close()
        except verbs.error.PyverbsError as exc:
            log.warning("rdma: closing %s failed: %s", type(obj).__name__, exc)
