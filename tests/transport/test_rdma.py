"""The rdma transport: its device-independent logic, and its engine against a fake HCA or a device.

Three layers:
- unit tests of `rdma_logic` and `rdma_verbs_consts` (run everywhere);
- the same end-to-end scenarios (server + client, loopback, bytes compared by hash) run against
  `FakeFabric`, an in-memory stand-in for pyverbs that moves real bytes with memmove and checks
  keys, ranges, access flags, queue-pair states and send-queue depth like an HCA would;
- those scenarios again on a real device when KVTIER_RDMA_DEVICE names one
  (`KVTIER_RDMA_DEVICE=mlx5_0 pytest tests/transport/test_rdma.py`); pyverbs must then import.
The fake checks our call shapes and bookkeeping, not the hardware: only the device run does that.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import hashlib
import itertools
import os
import random
import sys
import threading
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, rdma, rdma_device, rdma_logic, rdma_verbs_consts, registry

L = rdma_logic
V = rdma_verbs_consts
KIB, MIB = 1024, 1024 * 1024
DEVICE = os.environ.get("KVTIER_RDMA_DEVICE", "")
ON_DEVICE = pytest.mark.skipif(
    not DEVICE, reason="set KVTIER_RDMA_DEVICE=<device[:port[:gid_index]]> to run on RDMA hardware"
)
PRINCIPAL = "client-a"
RW = base.Rights.READ | base.Rights.WRITE


def _port(link_layer: int = V.LINK_LAYER_ETHERNET, mtu: int = 5) -> L.LocalPort:
    return L.LocalPort(
        device="dev0",
        port_num=1,
        gid_index=3,
        gid=bytes.fromhex("00000000000000000000ffff0a000001"),
        lid=0,
        active_mtu=mtu,
        link_layer=link_layer,
        max_msg_bytes=1 << 30,
    )


def _peer(**kw: Any) -> common_pb2.RdmaQueuePair:
    fields: dict[str, Any] = {
        "qp_num": 0x1234,
        "psn": 0xABCDEF,
        "gid": bytes.fromhex("00000000000000000000ffff0a000002"),
        "lid": 0,
        "mtu": 3,
    }
    fields.update(kw)
    return common_pb2.RdmaQueuePair(**fields)


def _desc(**kw: Any) -> base.Descriptor:
    fields: dict[str, Any] = {
        "node_id": "n1",
        "region_id": 1,
        "offset": 0,
        "length": 4096,
        "rights": RW,
        "expires_at_ms": base.now_ms() + 60_000,
        "mac": b"m" * 16,
        "rkey": 0x42,
        "remote_addr": 0x7F00_0000_0000,
    }
    fields.update(kw)
    return base.Descriptor(**fields)


# --- rdma_verbs_consts ----------------------------------------------------------------------


def test_constants_match_pyverbs_enums() -> None:
    enums = pytest.importorskip("pyverbs.enums")
    for status in V.WcStatus:
        assert getattr(enums, f"IBV_WC_{status.name}") == status
    for state in V.QpState:
        assert getattr(enums, f"IBV_QPS_{state.name}") == state
    for bit in V.QpAttrMask:
        assert getattr(enums, f"IBV_QP_{bit.name}") == bit
    for flag in V.Access:
        assert getattr(enums, f"IBV_ACCESS_{flag.name}") == flag
    assert enums.IBV_WR_RDMA_READ == V.WR_RDMA_READ
    assert enums.IBV_WR_RDMA_WRITE == V.WR_RDMA_WRITE
    assert enums.IBV_SEND_SIGNALED == V.SEND_SIGNALED
    assert enums.IBV_QPT_RC == V.QPT_RC
    assert enums.IBV_PORT_ACTIVE == V.PORT_ACTIVE
    assert enums.IBV_LINK_LAYER_ETHERNET == V.LINK_LAYER_ETHERNET
    assert enums.IBV_GID_TYPE_SYSFS_ROCE_V2 == V.GID_TYPE_ROCE_V2
    assert enums.IBV_MTU_4096 == V.MTU_MAX


def test_mtu_bytes() -> None:
    assert [L.mtu_bytes(m) for m in range(1, 6)] == [256, 512, 1024, 2048, 4096]
    with pytest.raises(errors.InvalidArgument):
        L.mtu_bytes(0)


# --- rdma_logic: chunks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "max_bytes", "sizes"),
    [(0, 8, []), (5, 8, [5]), (8, 8, [8]), (17, 8, [8, 8, 1]), (24, 8, [8, 8, 8])],
)
def test_plan_chunks_cover_the_range_contiguously(
    length: int, max_bytes: int, sizes: list[int]
) -> None:
    chunks = L.plan_chunks(0x1000, length, max_bytes)
    assert [c.length for c in chunks] == sizes
    offset = 0
    for chunk in chunks:
        assert chunk.local_offset == offset
        assert chunk.remote_addr == 0x1000 + offset
        offset += chunk.length
    assert offset == length


def test_plan_chunks_rejects_bad_sizes() -> None:
    with pytest.raises(errors.InvalidArgument):
        L.plan_chunks(0, 10, 0)
    with pytest.raises(errors.InvalidArgument):
        L.plan_chunks(0, -1, 8)


# --- rdma_logic: queue-pair transitions -----------------------------------------------------


def test_init_transition_sets_port_pkey_and_access() -> None:
    server = L.init_transition(_port(), L.QpTuning(), remote_access=True)
    client = L.init_transition(_port(), L.QpTuning(), remote_access=False)
    assert server.state == V.QpState.INIT
    assert server.mask == (
        V.QpAttrMask.STATE | V.QpAttrMask.PKEY_INDEX | V.QpAttrMask.PORT | V.QpAttrMask.ACCESS_FLAGS
    )
    assert server.attrs == {"qp_state": 1, "pkey_index": 0, "port_num": 1, "qp_access_flags": 6}
    assert client.attrs["qp_access_flags"] == 0


def test_rtr_and_rts_take_the_peer_and_local_values() -> None:
    tuning = L.QpTuning(timeout=12, retry_cnt=6, rnr_retry=5, max_rd_atomic=8)
    rtr, rts = L.connect_transitions(_port(mtu=5), _peer(mtu=3), 0x1_000_005, tuning)
    assert rtr.state == V.QpState.RTR
    assert rtr.attrs == {
        "qp_state": 2,
        "path_mtu": 3,  # the smaller of both ports
        "dest_qp_num": 0x1234,
        "rq_psn": 0xABCDEF,  # we receive from the peer's starting PSN
        "max_dest_rd_atomic": 16,
        "min_rnr_timer": 12,
    }
    for bit in ("AV", "PATH_MTU", "DEST_QPN", "RQ_PSN", "MAX_DEST_RD_ATOMIC", "MIN_RNR_TIMER"):
        assert rtr.mask & V.QpAttrMask[bit]
    assert rtr.av == L.AddressVector(
        port_num=1,
        dlid=0,
        is_global=True,
        dgid="0000:0000:0000:0000:0000:ffff:0a00:0002",
        sgid_index=3,
        hop_limit=64,
    )
    assert rts.attrs == {
        "qp_state": 3,
        "timeout": 12,
        "retry_cnt": 6,
        "rnr_retry": 5,
        "sq_psn": 5,  # masked to 24 bits
        "max_rd_atomic": 8,
    }
    for bit in ("TIMEOUT", "RETRY_CNT", "RNR_RETRY", "SQ_PSN", "MAX_QP_RD_ATOMIC"):
        assert rts.mask & V.QpAttrMask[bit]


def test_rc_transitions_are_init_rtr_rts_in_order() -> None:
    steps = L.rc_transitions(_port(), _peer(), 1, L.QpTuning(), remote_access=True)
    assert [s.state for s in steps] == [V.QpState.INIT, V.QpState.RTR, V.QpState.RTS]
    assert L.error_transition().attrs == {"qp_state": int(V.QpState.ERR)}


def test_infiniband_without_gid_routes_by_lid() -> None:
    port = _port(link_layer=V.LINK_LAYER_INFINIBAND)
    rtr, _rts = L.connect_transitions(port, _peer(gid=b"", lid=7), 1, L.QpTuning())
    assert rtr.av is not None
    assert (rtr.av.is_global, rtr.av.dlid, rtr.av.dgid) == (False, 7, "")


@pytest.mark.parametrize(
    "bad",
    [
        {"qp_num": 0},
        {"qp_num": 1 << 24},
        {"psn": 1 << 24},
        {"mtu": 6},
        {"gid": b"short"},
        {"gid": bytes(16)},  # RoCE needs a GID
    ],
)
def test_check_peer_rejects_unusable_queue_pairs(bad: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidArgument):
        L.check_peer(_peer(**bad), _port())


def test_tuning_is_capped_by_the_device() -> None:
    tuning = L.QpTuning().for_device(max_qp_rd_atom=4, max_qp_init_rd_atom=0)
    assert (tuning.max_dest_rd_atomic, tuning.max_rd_atomic) == (4, 1)
    assert tuning.timeout == L.QpTuning().timeout


def test_new_psn_is_24_bits() -> None:
    assert all(0 <= L.new_psn() <= V.PSN_MASK for _ in range(100))


def test_local_qp_info() -> None:
    info = L.local_qp_info(_port(), 77, 88)
    assert (info.qp_num, info.psn, info.gid, info.mtu) == (77, 88, _port().gid, 5)


# --- rdma_logic: devices, ports, GIDs -------------------------------------------------------


def test_parse_device_spec() -> None:
    assert L.parse_device_spec("") == L.DeviceSpec()
    assert L.parse_device_spec("mlx5_0") == L.DeviceSpec("mlx5_0")
    assert L.parse_device_spec("mlx5_0:2") == L.DeviceSpec("mlx5_0", 2)
    assert L.parse_device_spec("mlx5_0::3") == L.DeviceSpec("mlx5_0", None, 3)
    assert L.parse_device_spec("rxe0:1:0") == L.DeviceSpec("rxe0", 1, 0)
    for bad in ("a:b", "a:0", "a:1:-1", "a:1:2:3"):
        with pytest.raises(errors.InvalidArgument):
            L.parse_device_spec(bad)


def test_choose_port_takes_the_first_active() -> None:
    assert L.choose_port([(1, 1), (2, V.PORT_ACTIVE)]) == 2
    with pytest.raises(errors.Unavailable):
        L.choose_port([(1, 1)])


def test_gid_text_round_trip() -> None:
    raw = bytes(range(16))
    text = L.gid_text(raw)
    assert text == "0001:0203:0405:0607:0809:0a0b:0c0d:0e0f"
    assert L.gid_bytes(text) == raw
    with pytest.raises(errors.InvalidArgument):
        L.gid_bytes("fe80:0000")


def test_choose_gid_index_prefers_roce_v2_ipv4() -> None:
    link_local = bytes.fromhex("fe800000000000000202c9fffe000001")
    v4 = bytes.fromhex("00000000000000000000ffff0a000001")
    entries = [
        L.GidEntry(0, link_local, V.GID_TYPE_IB_ROCE_V1),
        L.GidEntry(1, link_local, V.GID_TYPE_ROCE_V2),
        L.GidEntry(2, v4, V.GID_TYPE_IB_ROCE_V1),
        L.GidEntry(3, v4, V.GID_TYPE_ROCE_V2),
        L.GidEntry(4, bytes(16), V.GID_TYPE_ROCE_V2),
    ]
    assert L.choose_gid_index(entries, V.LINK_LAYER_ETHERNET) == 3
    assert L.choose_gid_index(entries[:3], V.LINK_LAYER_ETHERNET) == 1
    assert L.choose_gid_index(entries[:1], V.LINK_LAYER_ETHERNET) == 0
    assert L.choose_gid_index([], V.LINK_LAYER_INFINIBAND) == 0
    with pytest.raises(errors.Unavailable):
        L.choose_gid_index(entries[4:], V.LINK_LAYER_ETHERNET)


# --- rdma_logic: descriptors and completions ------------------------------------------------


def test_check_descriptor_accepts_a_good_grant() -> None:
    L.check_descriptor(_desc(), base.Rights.READ, 4096, base.now_ms())
    L.check_descriptor(_desc(rights=base.Rights.WRITE), base.Rights.WRITE, 4096, base.now_ms())


@pytest.mark.parametrize(
    ("fields", "need", "nbytes", "error"),
    [
        ({"expires_at_ms": 1}, base.Rights.READ, 4096, base.DescriptorExpired),
        ({"rights": base.Rights.READ}, base.Rights.WRITE, 4096, base.DescriptorRejected),
        ({"rkey": 0}, base.Rights.READ, 4096, base.DescriptorRejected),
        ({"remote_addr": 0}, base.Rights.READ, 4096, base.DescriptorRejected),
        ({"remote_addr": (1 << 64) - 10}, base.Rights.READ, 4096, base.DescriptorRejected),
        ({}, base.Rights.READ, 4095, errors.InvalidArgument),
    ],
)
def test_check_descriptor_refuses(
    fields: dict[str, Any], need: base.Rights, nbytes: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        L.check_descriptor(_desc(**fields), need, nbytes, base.now_ms())


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (V.WcStatus.REM_ACCESS_ERR, base.DescriptorRejected),
        (V.WcStatus.RETRY_EXC_ERR, base.PeerLost),
        (V.WcStatus.RNR_RETRY_EXC_ERR, base.PeerLost),
        (V.WcStatus.RESP_TIMEOUT_ERR, base.PeerLost),
        (V.WcStatus.WR_FLUSH_ERR, base.PeerLost),
        (V.WcStatus.REM_OP_ERR, errors.Unavailable),
        (V.WcStatus.FATAL_ERR, errors.Unavailable),
        (V.WcStatus.LOC_PROT_ERR, errors.Internal),
        (V.WcStatus.LOC_LEN_ERR, errors.Internal),
        (V.WcStatus.REM_INV_REQ_ERR, errors.Internal),
        (99, errors.Internal),
    ],
)
def test_completion_errors(status: int, error: type[errors.KVTierError]) -> None:
    mapped = L.completion_error(status, vendor_err=0x81)
    assert type(mapped) is error
    assert "0x81" in mapped.message


def test_completion_success_is_no_error() -> None:
    assert L.completion_error(V.WcStatus.SUCCESS) is None


def test_descriptor_rejected_is_not_retryable_but_peer_lost_is() -> None:
    assert not base.DescriptorRejected.retryable
    assert base.PeerLost.retryable


# --- rdma_logic: client resources -----------------------------------------------------------


def test_staging_plan_respects_memlock_and_inflight() -> None:
    unlimited = L.staging_plan(256 * MIB, -1, 1 << 31)
    assert (unlimited.slot_bytes, unlimited.total_bytes) == (256 * KIB, 64 * MIB)
    small = L.staging_plan(256 * MIB, 8 * MIB, 1 << 31)  # `ulimit -l` of 8 MiB
    assert small.total_bytes == 4 * MIB
    tiny_msg = L.staging_plan(1 * MIB, -1, 64 * KIB)
    assert (tiny_msg.slot_bytes, tiny_msg.slots) == (64 * KIB, 16)
    with pytest.raises(errors.Unavailable):
        L.staging_plan(256 * MIB, 4 * KIB, 1 << 31)


def test_queue_sizes_fit_the_device() -> None:
    assert L.queue_sizes(16384, 4194303) == (512, 1040)
    depth, cqe = L.queue_sizes(100, 120)
    assert depth == 52
    assert 2 * depth <= cqe <= 120


def test_send_window_bounds_queue_and_slots() -> None:
    window = L.SendWindow(sq_depth=3, slots=2)
    first, second = window.take(staged=True), window.take(staged=True)
    assert {first, second} == {0, 1}
    assert window.take(staged=True) is None  # no slot left
    assert window.take(staged=False) == L.NO_SLOT  # a queue entry is
    assert window.take(staged=False) is None  # queue full
    assert first is not None
    window.give(first)
    assert window.take(staged=True) == first
    window.reset()
    assert (window.in_flight, window.free_slots) == (0, 2)


def test_registration_index() -> None:
    index = L.RegistrationIndex()
    index.add(L.Registration(1000, 100, 7))
    index.add(L.Registration(2000, 100, 8))
    assert index.find(1000, 100) == L.Registration(1000, 100, 7)
    assert index.find(1050, 10) is not None
    assert index.find(1050, 60) is None  # runs past the end
    assert index.find(999, 2) is None
    assert index.find(2099, 1) == L.Registration(2000, 100, 8)
    with pytest.raises(errors.InvalidArgument):
        index.add(L.Registration(1099, 2, 9))
    with pytest.raises(errors.InvalidArgument):
        index.add(L.Registration(1900, 101, 9))
    assert index.remove(1000) is not None
    assert index.remove(1000) is None
    assert len(index) == 1


def test_poll_backoff_spins_then_sleeps_then_resets() -> None:
    backoff = L.PollBackoff(spins=2, min_sleep_s=1e-6, max_sleep_s=4e-6)
    assert [backoff.after_poll(0) for _ in range(6)] == [0, 0, 1e-6, 2e-6, 4e-6, 4e-6]
    assert backoff.after_poll(3) == 0
    assert backoff.after_poll(0) == 0


# --- the module without pyverbs or a device -------------------------------------------------


def test_importing_rdma_does_not_import_pyverbs() -> None:
    if "pyverbs" in sys.modules:
        pytest.skip("pyverbs already imported by another test")
    assert rdma.NAME == "rdma"
    assert "pyverbs" not in sys.modules


def test_not_available_without_pyverbs(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> rdma_device.Verbs:
        raise ImportError("No module named 'pyverbs'")

    monkeypatch.setattr(rdma_device, "load_verbs", missing)
    assert rdma.available() is False


def test_not_available_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fabric = FakeFabric(devices=0)
    monkeypatch.setattr(rdma_device, "load_verbs", fabric.verbs)
    assert rdma.available() is False


def test_available_with_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdma_device, "load_verbs", FakeFabric().verbs)
    assert rdma.available() is True


async def test_server_start_is_unavailable_without_pyverbs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing() -> rdma_device.Verbs:
        raise ImportError("No module named 'pyverbs'")

    monkeypatch.setattr(rdma_device, "load_verbs", missing)
    ctx = base.ServerContext(node_id="n1", regions=base.RegionTable(), issuer=base.Issuer("n1"))
    server = rdma.make_server(ctx, registry.ServerSettings())
    with pytest.raises(errors.Unavailable):
        await server.start()
    await server.stop()


async def test_connect_needs_an_exchange() -> None:
    with pytest.raises(errors.InvalidArgument):
        await rdma.connect(
            common_pb2.TransportEndpoint(name="rdma"), b"", registry.ClientSettings()
        )


async def test_unknown_device_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdma_device, "load_verbs", FakeFabric().verbs)
    ctx = base.ServerContext(node_id="n1", regions=base.RegionTable(), issuer=base.Issuer("n1"))
    server = rdma.make_server(ctx, registry.ServerSettings(rdma_device="nope0"))
    with pytest.raises(errors.Unavailable, match="nope0"):
        await server.start()


# --- a fake HCA ------------------------------------------------------------------------------


class FakeVerbsError(Exception):
    """pyverbs.pyverbs_error.PyverbsError."""


class _Attrs(types.SimpleNamespace):
    """QPAttr, QPCap, QPInitAttr, GID, GlobalRoute, AHAttr: bags of attributes."""


class FakeMR:
    def __init__(self, fabric: FakeFabric, pd: Any, length: int, access: int, address: int):
        self.fabric, self.pd, self.addr, self.length, self.access = (
            fabric,
            pd,
            address,
            length,
            access,
        )
        self.lkey = self.rkey = next(fabric.keys)
        fabric.mrs[self.rkey] = self

    def covers(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length

    def close(self) -> None:
        self.fabric.mrs.pop(self.rkey, None)


class FakeCQ:
    def __init__(self, ctx: Any, cqe: int, cq_context: Any, channel: Any, vector: int) -> None:
        self.cqe = cqe
        self.lock = threading.Lock()
        self.entries: collections.deque[tuple[FakeQP, int, int]] = collections.deque()

    def push(self, qp: FakeQP, wr_id: int, status: int) -> None:
        if len(self.entries) >= self.cqe:
            raise AssertionError("CQ overrun")
        self.entries.append((qp, wr_id, status))

    def poll(self, num_entries: int) -> tuple[int, list[_Attrs]]:
        with self.lock:
            got = [self.entries.popleft() for _ in range(min(num_entries, len(self.entries)))]
            for qp, _wr_id, _status in got:
                qp.in_flight -= 1
        return len(got), [_Attrs(wr_id=w, status=s, vendor_err=0) for _qp, w, s in got]

    def close(self) -> None:
        pass


class FakeSendWR:
    def __init__(self, wr_id: int, opcode: int, num_sge: int, sg: list[Any], send_flags: int):
        self.wr_id, self.opcode, self.sg, self.send_flags = wr_id, opcode, sg, send_flags
        self.next_wr: FakeSendWR | None = None
        self.rkey = self.remote_addr = 0

    def set_wr_rdma(self, rkey: int, addr: int) -> None:
        self.rkey, self.remote_addr = rkey, addr


class FakeQP:
    def __init__(self, fabric: FakeFabric, pd: Any, init: Any) -> None:
        assert init.qp_type == V.QPT_RC
        assert init.sq_sig_all == 1
        self.fabric, self.pd, self.cq, self.depth = fabric, pd, init.scq, init.cap.max_send_wr
        self.qp_num = next(fabric.qpns)
        self.state, self.access, self.dest, self.in_flight = V.QpState.RESET, 0, 0, 0
        fabric.qps[self.qp_num] = self

    def modify(self, attr: Any, mask: int) -> None:
        if mask & V.QpAttrMask.ACCESS_FLAGS:
            self.access = attr.qp_access_flags
        if mask & V.QpAttrMask.DEST_QPN:
            self.dest = attr.dest_qp_num
        new = V.QpState(attr.qp_state)
        allowed = {V.QpState.INIT: 0, V.QpState.RTR: 1, V.QpState.RTS: 2}
        if new != V.QpState.ERR and allowed[new] != self.state:
            raise FakeVerbsError(f"bad transition {self.state.name} -> {new.name}")
        self.state = new

    def query(self, mask: int) -> tuple[Any, Any]:
        return _Attrs(qp_state=self.state), None

    def post_send(self, wr: FakeSendWR | None, bad_wr: Any) -> None:
        self.fabric.doorbells += 1
        if self.fabric.hang:
            return
        with self.cq.lock:
            while wr is not None:
                if self.in_flight >= self.depth:
                    raise FakeVerbsError("send queue full (ENOMEM)")
                self.fabric.work_requests += 1
                status = (
                    self._execute(wr) if self.state == V.QpState.RTS else V.WcStatus.WR_FLUSH_ERR
                )
                if status != V.WcStatus.SUCCESS:
                    self.state = V.QpState.ERR
                self.in_flight += 1
                self.cq.push(self, wr.wr_id, status)
                wr = wr.next_wr

    def _execute(self, wr: FakeSendWR) -> int:
        (sge,) = wr.sg
        local = self.fabric.mrs.get(sge.lkey)
        if local is None or local.pd is not self.pd or not local.covers(sge.addr, sge.length):
            return V.WcStatus.LOC_PROT_ERR
        if sge.length > self.fabric.max_msg:
            return V.WcStatus.LOC_LEN_ERR
        peer = self.fabric.qps.get(self.dest)
        if peer is None or peer.state not in (V.QpState.RTR, V.QpState.RTS):
            return V.WcStatus.RETRY_EXC_ERR
        reading = wr.opcode == V.WR_RDMA_READ
        need = V.Access.REMOTE_READ if reading else V.Access.REMOTE_WRITE
        remote = self.fabric.mrs.get(wr.rkey)
        if (
            remote is None
            or remote.pd is not peer.pd
            or not remote.covers(wr.remote_addr, sge.length)
            or not remote.access & need
            or not peer.access & need
        ):
            peer.state = V.QpState.ERR
            return V.WcStatus.REM_ACCESS_ERR
        src, dst = (wr.remote_addr, sge.addr) if reading else (sge.addr, wr.remote_addr)
        ctypes.memmove(dst, src, sge.length)
        return V.WcStatus.SUCCESS

    def close(self) -> None:
        self.fabric.qps.pop(self.qp_num, None)


class FakeContext:
    def __init__(self, fabric: FakeFabric, name: str) -> None:
        self.fabric, self.name = fabric, name

    def query_device(self) -> _Attrs:
        return _Attrs(
            phys_port_cnt=2,
            max_qp_rd_atom=16,
            max_qp_init_rd_atom=16,
            max_qp_wr=self.fabric.max_qp_wr,
            max_cqe=4 * self.fabric.max_qp_wr,
        )

    def query_port(self, port_num: int) -> _Attrs:
        state = V.PORT_ACTIVE if port_num == 2 else 1
        return _Attrs(
            state=state,
            lid=port_num,
            active_mtu=5,
            link_layer=V.LINK_LAYER_INFINIBAND,
            max_msg_sz=self.fabric.max_msg,
            gid_tbl_len=1,
        )

    def query_gid(self, port_num: int, index: int) -> _Attrs:
        return _Attrs(gid="fe80:0000:0000:0000:0002:c903:0000:0001")

    def close(self) -> None:
        pass


class FakePD:
    def __init__(self, ctx: FakeContext) -> None:
        self.ctx = ctx

    def close(self) -> None:
        pass


class FakeFabric:
    """In-memory stand-in for pyverbs: one device, port 2 active, IB link layer."""

    def __init__(self, devices: int = 1, max_msg: int = 1 << 31, max_qp_wr: int = 1024) -> None:
        self.devices, self.max_msg, self.max_qp_wr = devices, max_msg, max_qp_wr
        self.mrs: dict[int, FakeMR] = {}
        self.qps: dict[int, FakeQP] = {}
        self.keys = itertools.count(0x100, 0x100)
        self.qpns = itertools.count(0x40)
        self.doorbells = self.work_requests = 0
        self.hang = False  # accept work requests but never complete them

    def verbs(self) -> rdma_device.Verbs:
        ns = types.SimpleNamespace
        names = [ns(name=f"fake{i}".encode()) for i in range(self.devices)]
        return rdma_device.Verbs(
            device=ns(get_device_list=lambda: names, Context=lambda name: FakeContext(self, name)),
            pd=ns(PD=FakePD),
            cq=ns(CQ=FakeCQ),
            qp=ns(
                QPCap=_Attrs,
                QPInitAttr=_Attrs,
                QPAttr=_Attrs,
                QP=lambda pd, init: FakeQP(self, pd, init),
            ),
            mr=ns(MR=lambda pd, length, access, address: FakeMR(self, pd, length, access, address)),
            wr=ns(
                SGE=lambda addr, length, lkey: _Attrs(addr=addr, length=length, lkey=lkey),
                SendWR=FakeSendWR,
            ),
            addr=ns(GID=_Attrs, GlobalRoute=_Attrs, AHAttr=_Attrs),
            error=ns(PyverbsError=FakeVerbsError),
        )


# --- end to end: fake HCA always, the device when KVTIER_RDMA_DEVICE is set -----------------

REGION_BYTES = 16 * MIB


@dataclasses.dataclass
class Rig:
    backend: str
    fabric: FakeFabric | None
    region: base.Region
    server: rdma.Server
    client: rdma.Client
    connect: Any

    def grant(self, offset: int, length: int, rights: base.Rights = RW) -> base.Descriptor:
        return self.server.grant(self.region, offset, length, rights, PRINCIPAL)


@pytest.fixture(params=["fake", pytest.param("device", marks=ON_DEVICE)])
async def rig(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    fabric: FakeFabric | None = None
    device = DEVICE
    if request.param == "fake":
        fabric = FakeFabric()
        monkeypatch.setattr(rdma_device, "load_verbs", fabric.verbs)
        device = ""
    regions = base.RegionTable()
    region = regions.create(REGION_BYTES)
    ctx = base.ServerContext(node_id="n1", regions=regions, issuer=base.Issuer("n1"))
    server = rdma.make_server(ctx, registry.ServerSettings(rdma_device=device))
    endpoint = await server.start()
    clients: list[rdma.Client] = []

    async def connect(principal: str = PRINCIPAL, timeout_s: float = 20) -> rdma.Client:
        async def exchange(mine: common_pb2.RdmaQueuePair) -> common_pb2.RdmaQueuePair:
            return await server.accept(mine, principal)

        settings = registry.ClientSettings(
            rdma_device=device, rdma_exchange=exchange, timeout_s=timeout_s
        )
        client = await rdma.connect(endpoint, b"token", settings)
        clients.append(client)
        return client

    try:
        yield Rig(request.param, fabric, region, server, await connect(), connect)
    finally:
        for client in clients:
            await client.close()
        await server.stop()
        regions.close()


def _digest(buf: Any) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()


def _random(n: int) -> bytes:
    return random.Random(n).randbytes(n)


async def test_one_queue_pair_per_client(rig: Rig) -> None:
    assert rig.server.connection_count() == 1
    assert rig.server.name == rig.client.name == "rdma"


async def test_write_then_read_is_byte_exact(rig: Rig) -> None:
    data = _random(MIB + 3)
    desc = rig.grant(4097, len(data))
    await rig.client.write(desc, data)
    assert _digest(rig.region.view[4097 : 4097 + len(data)]) == _digest(data)
    out = bytearray(len(data))
    await rig.client.read(desc, out)
    assert _digest(out) == _digest(data)


async def test_large_operations_are_chunked(rig: Rig) -> None:
    data = _random(5 * MIB + 7)  # more than the staging buffer under an 8 MiB memlock limit
    desc = rig.grant(MIB, len(data))
    before = rig.fabric.work_requests if rig.fabric else 0
    await rig.client.write(desc, data)
    out = bytearray(len(data))
    await rig.client.read(desc, out)
    assert _digest(out) == _digest(data)
    if rig.fabric is not None:
        chunks = -(-len(data) // (256 * KIB))
        assert rig.fabric.work_requests - before == 2 * chunks


async def test_batch_of_64(rig: Rig) -> None:
    size = 16 * KIB
    datas = [_random(size + i) for i in range(64)]
    descs = [rig.grant(i * 64 * KIB, len(d)) for i, d in enumerate(datas)]
    await rig.client.write_batch(descs, datas)
    outs = [bytearray(len(d)) for d in datas]
    await rig.client.read_batch(descs, outs)
    assert [_digest(o) for o in outs] == [_digest(d) for d in datas]
    for desc, data in zip(descs, datas, strict=True):
        assert _digest(rig.region.view[desc.offset : desc.offset + desc.length]) == _digest(data)


async def test_registered_buffers_are_zero_copy_and_one_doorbell(rig: Rig) -> None:
    size = 16 * KIB
    pool = bytearray(64 * size)
    await rig.client.register(pool)
    view = memoryview(pool)
    src = _random(64 * size)
    descs = [rig.grant(8 * MIB + i * size, size) for i in range(64)]
    rig.region.view[8 * MIB : 8 * MIB + len(src)] = src
    bells = rig.fabric.doorbells if rig.fabric else 0
    await rig.client.read_batch(descs, [view[i * size : (i + 1) * size] for i in range(64)])
    assert _digest(pool) == _digest(src)
    if rig.fabric is not None:
        assert rig.fabric.doorbells - bells == 1  # 64 work requests, one post_send
    view.release()
    await rig.client.unregister(pool)


async def test_expired_descriptor_is_refused_before_posting(rig: Rig) -> None:
    desc = dataclasses.replace(rig.grant(0, 4096), expires_at_ms=base.now_ms() - 1)
    posted = rig.fabric.work_requests if rig.fabric else 0
    with pytest.raises(base.DescriptorExpired):
        await rig.client.read(desc, bytearray(4096))
    if rig.fabric is not None:
        assert rig.fabric.work_requests == posted


async def test_read_only_key_refuses_a_forged_write(rig: Rig) -> None:
    read_only = rig.grant(0, 4096, base.Rights.READ)
    forged = dataclasses.replace(read_only, rights=RW)  # passes the client's own checks
    rig.region.view[0:4096] = bytes(4096)
    with pytest.raises(base.DescriptorRejected):
        await rig.client.write(forged, b"x" * 4096)
    assert bytes(rig.region.view[0:4096]) == bytes(4096)
    out = bytearray(4096)
    await rig.client.read(read_only, out)  # the client reconnected
    assert bytes(out) == bytes(4096)


async def test_rotated_keys_reject_old_descriptors(rig: Rig) -> None:
    data = _random(64 * KIB)
    old = rig.grant(0, len(data))
    await rig.client.write(old, data)
    assert await rig.server.rotate_keys() == 1
    with pytest.raises(base.DescriptorRejected):
        await rig.client.read(old, bytearray(len(data)))
    fresh = rig.grant(0, len(data))
    assert fresh.rkey != old.rkey
    out = bytearray(len(data))
    await rig.client.read(fresh, out)
    assert _digest(out) == _digest(data)
    if rig.fabric is not None:  # the fake fails the responder too; hardware need not
        assert rig.server.connection_count() == 2
        assert await rig.server._reap() == 1
        assert rig.server.connection_count() == 1


async def test_deadline_fails_the_queue_pair_and_the_next_call_reconnects(rig: Rig) -> None:
    if rig.fabric is None:
        pytest.skip("needs a peer that stops answering (the fake HCA)")
    client = await rig.connect(timeout_s=0.3)
    desc = rig.grant(0, 4096)
    rig.fabric.hang = True
    with pytest.raises(errors.DeadlineExceeded):
        await client.read(desc, bytearray(4096))
    rig.fabric.hang = False
    rig.region.view[0:4096] = b"h" * 4096
    out = bytearray(4096)
    await client.read(desc, out)
    assert bytes(out) == b"h" * 4096


async def test_in_flight_operations_fail_together_and_recover(rig: Rig) -> None:
    good = [rig.grant(i * 4 * KIB, 4 * KIB) for i in range(8)]
    bad = dataclasses.replace(good[0], rkey=good[0].rkey ^ 0x55AA00)
    with pytest.raises(base.DescriptorRejected):
        await rig.client.read_batch([*good[:4], bad, *good[4:]], [bytearray(4 * KIB)] * 9)
    outs = [bytearray(4 * KIB) for _ in good]
    await rig.client.read_batch(good, outs)
    for desc, out in zip(good, outs, strict=True):
        assert bytes(out) == bytes(rig.region.view[desc.offset : desc.offset + desc.length])


async def test_concurrent_operations(rig: Rig) -> None:
    datas = [_random(300 * KIB + i) for i in range(16)]
    descs = [rig.grant(i * 512 * KIB, len(d)) for i, d in enumerate(datas)]
    await asyncio.gather(*(rig.client.write(d, b) for d, b in zip(descs, datas, strict=True)))
    outs = [bytearray(len(d)) for d in datas]
    await asyncio.gather(*(rig.client.read(d, o) for d, o in zip(descs, outs, strict=True)))
    assert [_digest(o) for o in outs] == [_digest(d) for d in datas]


async def test_region_added_later_is_served_after_registering(rig: Rig) -> None:
    later = rig.server._ctx.regions.create(MIB)
    with pytest.raises(errors.PreconditionFailed):
        rig.server.rkey(later.region_id, base.Rights.READ)
    assert await rig.server.sync_regions() == 1
    desc = rig.server.grant(later, 0, 4096, RW, PRINCIPAL)
    await rig.client.write(desc, b"z" * 4096)
    assert bytes(later.view[:4096]) == b"z" * 4096


async def test_disconnect_and_close_are_idempotent(rig: Rig) -> None:
    second = await rig.connect("client-b")
    assert rig.server.connection_count() == 2
    assert await rig.server.disconnect("client-b") == 1
    await second.close()
    await second.close()
    with pytest.raises(errors.Unavailable):
        await second.read(rig.grant(0, 16), bytearray(16))
    assert rig.server.connection_count() == 1
