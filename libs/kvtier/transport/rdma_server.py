"""The serving side of the rdma transport: MRs over a node's regions, one RC queue pair per client.

Queue pairs are set up over gRPC ConnectRdma (`Server.accept`); clients then RDMA READ/WRITE the
regions without this process seeing it. Blocking verbs calls run on one `rdma_device.VerbsThread`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, grants, rdma_device, rdma_logic, rdma_verbs_consts, registry

log = logging.getLogger(__name__)

#: How often the server drops queue pairs that went to the ERR state.
REAP_INTERVAL_S = 5.0
# Queue pairs one identity (`grants.identity_of`) may hold: ServerContext's
# max_connections_per_principal; past it its oldest go first (leaked by crashed peers).
MAX_CONNECTIONS = 4096


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

    name: ClassVar[str] = rdma_logic.NAME

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
        self._dev: rdma_device.Device | None = None
        self._cq: Any = None
        self._keys: dict[int, _RegionKeys] = {}
        self._conns: dict[int, _Connection] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._thread = rdma_device.VerbsThread("kvtier-rdma-server")

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
            name=rdma_logic.NAME,
            rdma_device=port.device,
            rdma_port=port.port_num,
            rdma_gid=port.gid,
            rdma_lid=port.lid,
        )

    def _open(self, spec: rdma_logic.DeviceSpec) -> tuple[rdma_device.Device, Any]:
        verbs = rdma_device.verbs_or_unavailable()
        with rdma_device.verbs_errors(verbs, "opening the RDMA device"):
            dev = rdma_device.Device(verbs, spec, self._tuning)
            try:
                # Server queue pairs post nothing: their CQ stays empty, a small one is enough.
                return dev, verbs.cq.CQ(dev.ctx, 16, None, None, 0)
            except BaseException:
                dev.close()
                raise

    def _require(self) -> rdma_device.Device:
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

    def _register_blocking(self, dev: rdma_device.Device, region: base.Region) -> _RegionKeys:
        access = rdma_verbs_consts.Access
        full = access.LOCAL_WRITE | access.REMOTE_READ | access.REMOTE_WRITE
        with rdma_device.verbs_errors(dev.verbs, f"registering region {region.region_id}"):
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
                await self._thread.run(rdma_device.close_all, dev.verbs, [old.read, old.write])
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
        self, dev: rdma_device.Device, peer: common_pb2.RdmaQueuePair
    ) -> tuple[Any, common_pb2.RdmaQueuePair]:
        psn = rdma_logic.new_psn()
        steps = rdma_logic.rc_transitions(dev.port, peer, psn, dev.tuning, remote_access=True)
        with rdma_device.verbs_errors(dev.verbs, "connecting a queue pair"):
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
        who = grants.identity_of(principal)
        mine = sorted(
            (c.accepted_at, n)
            for n, c in self._conns.items()
            if grants.identity_of(c.principal) == who
        )
        excess = len(mine) - self._ctx.max_connections_per_principal + 1
        if excess > 0:
            await self._drop([n for _, n in mine[:excess]])

    async def _drop(self, qp_nums: Sequence[int]) -> int:
        doomed = [self._conns.pop(n).qp for n in qp_nums if n in self._conns]
        if doomed and self._dev is not None:
            await self._thread.run(rdma_device.close_all, self._dev.verbs, doomed)
        return len(doomed)

    async def _reap(self) -> int:
        """Destroy queue pairs in the ERR state (their client failed or went away)."""
        if self._dev is None or not self._conns:
            return 0
        live = [(n, c.qp) for n, c in self._conns.items()]
        dead = await self._thread.run(self._dead_blocking, self._dev, live)
        return await self._drop(dead)

    @staticmethod
    def _dead_blocking(dev: rdma_device.Device, live: Sequence[tuple[int, Any]]) -> list[int]:
        dead = []
        for qp_num, qp in live:
            try:
                attr, _init = qp.query(int(rdma_verbs_consts.QpAttrMask.STATE))
            except dev.verbs.error.PyverbsError:
                dead.append(qp_num)
                continue
            if attr.qp_state == rdma_verbs_consts.QpState.ERR:
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
        await self._thread.run(rdma_device.close_all, dev.verbs, [*qps, *mrs, cq, dev])
        self._thread.shutdown()
