"""vLLM on kvtier: `KVTierSecondaryTier` loaded by vLLM 0.33's tiering `OffloadingConnector` as
an out-of-tree secondary tier (`{"type": ..., "module_path": ...}`) and driven the way vLLM's
`TieringOffloadingManager` drives its tiers, against real kvcache nodes.

Where vLLM 0.33 imports (`pip install --no-deps vllm==0.33.0` plus the few pure-Python modules
`vllm.v1.kv_offload.tiering` imports; the CUDA wheels are not needed), the tier is made by
vLLM's own `SecondaryTierFactory` from vLLM's classes, and one more test runs vLLM's
`TieringOffloadingSpec` / `TieringOffloadingManager` with its real CPU primary tier end to end.
Elsewhere (CI), the same calls go through stand-ins that copy 0.33's signatures
(vllm/v1/kv_offload/base.py, tiering/base.py) and factory rules (tiering/factory.py).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import hashlib
import importlib
import logging
import os
import socket
import sys
import time
import types
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest

from kvtier import etcdserver, kv, membership
from kvtier.integrations import keys
from kvtier.integrations import vllm as tier_module
from tests.component import harness
from tests.integrations.conftest import kvcache_nodes, secure_cluster, stop_node

MODULE = "kvtier.integrations.vllm"
KIB, MIB = 1024, 1024 * 1024
CHUNK = 64 * KIB
NODE_SETTINGS = {"arena_bytes": 64 * MIB, "page_bytes": 4 * MIB}


#: Where `scripts/bootstrap.sh test` installs vLLM 0.33 `--no-deps` (with the pure-Python
#: modules its offloading code imports), apart from the project's packages.
ENGINE_DIR = Path(__file__).resolve().parents[2] / ".engines" / "vllm"


def _vllm() -> types.SimpleNamespace | None:
    """vLLM 0.33's modules the tests use, if vLLM imports here."""
    if ENGINE_DIR.is_dir() and str(ENGINE_DIR) not in sys.path:
        sys.path.append(str(ENGINE_DIR))  # after ours: our packages win any overlap
    try:
        names = ("base", "config", "tiering.base", "tiering.factory", "tiering.spec")
        mods = [importlib.import_module(f"vllm.v1.kv_offload.{n}") for n in names]
    except ImportError:
        return None
    base, config, tiering, factory, spec = mods
    return types.SimpleNamespace(
        base=base, config=config, tiering=tiering, factory=factory, spec=spec
    )


VLLM = _vllm()


# Stand-ins for vLLM 0.33 (vllm/v1/kv_offload/base.py, config.py, tiering/base.py, factory.py).


class LookupResult(enum.Enum):
    MISS = enum.auto()
    HIT = enum.auto()
    HIT_PENDING = enum.auto()
    RETRY = enum.auto()


class Locality(enum.Enum):
    LOCAL = "LOCAL"
    REMOTE = "REMOTE"


@dataclasses.dataclass
class ReqContext:
    req_id: str
    kv_transfer_params: dict[str, Any] | None = None


@dataclasses.dataclass
class RequestOffloadingContext:
    policy: str = "chunk_level"


class ScheduleEndContext(NamedTuple):
    new_req_ids: Collection[str]
    preempted_req_ids: Collection[str]


@dataclasses.dataclass
class TransferJob:
    job_id: int
    keys: Collection[bytes]
    chunk_ids: np.ndarray[Any, Any]
    is_promotion: bool
    req_context: ReqContext
    submit_time: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class JobResult:
    job_id: int
    success: bool
    successful_keys: Collection[bytes] | None = None
    transfer_time: float | None = None
    transfer_bytes: int | None = None


class StandInSecondaryTierManager(abc.ABC):
    """`SecondaryTierManager` of vLLM 0.33: constructor, abstract methods and defaults."""

    medium: ClassVar[Any] = None
    tolerates_off_thread_polling: ClassVar[bool] = False

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
    ) -> None:
        self._offloading_spec = offloading_spec
        self._primary_kv_view = primary_kv_view
        assert primary_kv_view.strides is not None
        self._block_size_bytes = primary_kv_view.strides[0]
        self.tier_type = tier_type
        self.locality: Locality | None = None
        self._bp_detector = backpressure_detector

    @abc.abstractmethod
    def lookup(self, key: bytes, req_context: ReqContext) -> LookupResult: ...

    @abc.abstractmethod
    def submit_store(self, job_metadata: TransferJob) -> None: ...

    @abc.abstractmethod
    def submit_load(self, job_metadata: TransferJob) -> None: ...

    @abc.abstractmethod
    def get_finished_jobs(self) -> Iterable[JobResult]: ...

    def has_pending_work(self) -> bool:
        return False

    def touch(self, keys: Collection[bytes], req_context: ReqContext) -> None:
        return

    @abc.abstractmethod
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext: ...

    def on_request_finished(self, req_context: ReqContext) -> None:
        return

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        return

    @abc.abstractmethod
    def drain_jobs(self) -> None: ...

    def shutdown(self) -> None:
        return


@dataclasses.dataclass(frozen=True)
class GroupConfig:  # OffloadingGroupConfig
    tokens_per_block: int
    layer_names: tuple[str, ...]
    group_id: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:  # OffloadingModelConfig
    name: str
    dtype: str
    max_model_len: int = 0


@dataclasses.dataclass(frozen=True)
class CacheConfig:  # OffloadingCacheConfig
    tokens_per_hash: int
    blocks_per_chunk: int


@dataclasses.dataclass(frozen=True)
class ParallelConfig:  # OffloadingParallelConfig
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    pcp_size: int
    dcp_size: int
    data_parallel_index: int
    data_parallel_size: int
    data_parallel_rank_local: int | None
    is_parallelism_agnostic: bool


@dataclasses.dataclass(frozen=True)
class OffloadingConfig:
    groups: tuple[GroupConfig, ...]
    worker_kv_bytes_per_block: int
    enable_kv_cache_events: bool
    extra_config: dict[str, Any]
    engine_id: str
    model: ModelConfig
    cache: CacheConfig
    parallel: ParallelConfig
    replicated_layout: bool = False
    canonical_layout: bool = False
    kv_cache_layout: str | None = None


def _stand_in_create(tier_config: dict[str, Any], view: memoryview, spec: Any) -> Any:
    """`SecondaryTierFactory.create_secondary_tier` of vLLM 0.33 (out-of-tree path)."""
    config = dict(tier_config)
    tier_type = config.pop("type")
    module_path = config.pop("module_path")
    config.pop("backpressure", None)
    cls = getattr(importlib.import_module(module_path), tier_type)
    assert issubclass(cls, StandInSecondaryTierManager)
    return cls(
        offloading_spec=spec, primary_kv_view=view, tier_type=tier_type,
        backpressure_detector=None, **config,
    )  # fmt: skip


STAND_IN = tier_module.VLLMApi(
    base=StandInSecondaryTierManager,
    lookup_result=LookupResult,
    job_result=JobResult,
    request_context=RequestOffloadingContext,
    locality=Locality,
)

if VLLM is None:
    API = STAND_IN
    Result: Any = LookupResult
    Job: Any = TransferJob
    Ctx: Any = ReqContext
    StepEnd: Any = ScheduleEndContext
    configs: Any = types.SimpleNamespace(
        OffloadingConfig=OffloadingConfig, OffloadingGroupConfig=GroupConfig,
        OffloadingModelConfig=ModelConfig, OffloadingCacheConfig=CacheConfig,
        OffloadingParallelConfig=ParallelConfig,
    )  # fmt: skip
    create: Callable[..., Any] = _stand_in_create
    if tier_module.CLASS_NAME not in vars(tier_module):
        setattr(tier_module, tier_module.CLASS_NAME, tier_module.tier_class(STAND_IN))
else:
    API = tier_module.vllm_api()
    Result = VLLM.base.LookupResult
    Job = VLLM.tiering.TransferJob
    Ctx = VLLM.base.ReqContext
    StepEnd = VLLM.base.ScheduleEndContext
    configs = VLLM.config
    create = VLLM.factory.SecondaryTierFactory.create_secondary_tier


# An engine's side: vLLM's config and primary memory, and the calls its manager makes.


def offloading_config(
    *,
    tp: int = 1,
    agnostic: bool = True,
    dtype: str = "bfloat16",
    engine_id: str = "",
    **extra: Any,
) -> Any:
    """vLLM's `OffloadingConfig` for a 4-layer model, 16-token blocks, one block per chunk."""
    c = configs
    return c.OffloadingConfig(
        groups=(c.OffloadingGroupConfig(16, tuple(f"layers.{i}" for i in range(4)), 0),),
        worker_kv_bytes_per_block=CHUNK // tp, enable_kv_cache_events=False,
        extra_config=extra, engine_id=engine_id or uuid.uuid4().hex,
        model=c.OffloadingModelConfig(name="meta-llama/Llama-x", dtype=dtype),
        cache=c.OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=c.OffloadingParallelConfig(
            rank=0, world_size=tp, tp_size=tp, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=agnostic,
        ),
    )  # fmt: skip


class Engine:
    """One engine's primary tier (a (chunks, chunk bytes) int8 array, as vLLM's
    `SharedOffloadRegion.create_kv_memoryview` makes it) and its kvtier tier, driven the way
    `TieringOffloadingManager` drives a secondary tier. Its calls block: run them in a thread."""

    def __init__(self, settings: dict[str, Any], chunks: int = 64, **config: Any) -> None:
        self.primary = np.zeros((chunks, CHUNK), np.int8)
        spec = types.SimpleNamespace(config=offloading_config(**config), blocks_per_chunk=1)
        tier_dict = {"type": tier_module.CLASS_NAME, "module_path": MODULE, **settings}
        self.tier = create(tier_dict, memoryview(self.primary.data), spec)
        assert isinstance(self.tier, API.base)
        self.results: dict[int, Any] = {}
        self._next_job = 0

    def step_end(self) -> None:
        self.tier.on_schedule_end(StepEnd((), ()))

    def poll(self) -> None:
        for result in self.tier.get_finished_jobs():
            assert result.job_id not in self.results
            self.results[result.job_id] = result

    def lookup_prefix(self, chain: list[bytes], req: str, timeout_s: float = 10.0) -> int:
        """`_maximal_prefix_lookup`, stepping while the tier answers RETRY: the leading hits."""
        ctx = Ctx(req_id=req)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            hits, retry = 0, False
            for key in chain:
                result = self.tier.lookup(key, ctx)
                if result is Result.HIT:
                    hits += 1
                elif result is Result.RETRY:
                    retry = True
                else:
                    assert result is Result.MISS
                    break
            self.step_end()
            if not retry:
                return hits
            time.sleep(0.002)
        raise AssertionError("lookups still RETRY")

    def submit(self, load: bool, chain: list[bytes], chunk_ids: list[int], req: str) -> int:
        job_id, self._next_job = self._next_job, self._next_job + 1
        job = Job(
            job_id=job_id, keys=list(chain), chunk_ids=np.array(chunk_ids, dtype=np.int32),
            is_promotion=load, req_context=Ctx(req_id=req),
        )  # fmt: skip
        (self.tier.submit_load if load else self.tier.submit_store)(job)
        return job_id

    def run(self, load: bool, chain: list[bytes], chunk_ids: list[int], req: str = "r") -> Any:
        """Submit one job and wait for its result."""
        job_id = self.submit(load, chain, chunk_ids, req)
        deadline = time.monotonic() + 15
        while job_id not in self.results:
            assert time.monotonic() < deadline, "job did not finish"
            self.poll()
            time.sleep(0.002)
        return self.results.pop(job_id)

    def fill(self, chunk_ids: list[int], seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        for c in chunk_ids:
            self.primary[c] = np.frombuffer(rng.bytes(CHUNK), np.int8)
        return self.digests(chunk_ids)

    def digests(self, chunk_ids: list[int]) -> list[str]:
        return [hashlib.sha256(self.primary[c].tobytes()).hexdigest() for c in chunk_ids]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.tier.has_pending_work():
            assert time.monotonic() < deadline, "tier still busy"
            self.poll()
            self.step_end()
            time.sleep(0.002)


def chain_of(n: int, seed: str = "prompt", group: int = 0) -> list[bytes]:
    """vLLM-style offload keys: chained SHA-256 block hashes + a 4-byte group index."""
    out, prev = [], hashlib.sha256(seed.encode()).digest()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "big")).digest()
        out.append(prev + group.to_bytes(4, "big"))
    return out


def _settings(nodes: list[harness.Running], **more: Any) -> dict[str, Any]:
    return {"nodes": [n.address for n in nodes], "timeout_s": 1.0, "transports": ["tcp"], **more}


async def shutdown(*engines: Engine) -> None:
    for engine in engines:
        await asyncio.to_thread(engine.tier.shutdown)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every exists_batch the SDK was asked for."""
    sizes: list[int] = []
    original = kv.AsyncKVClient.exists_batch

    async def counted(self: kv.AsyncKVClient, keys: Any, **kw: Any) -> list[bool]:
        sizes.append(len(keys))
        return await original(self, keys, **kw)

    monkeypatch.setattr(kv.AsyncKVClient, "exists_batch", counted)
    return sizes


# Against real kvcache nodes.


async def test_chunks_round_trip_byte_exact_between_engines(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        writer, reader = Engine(_settings(nodes)), Engine(_settings(nodes))
        try:
            chain = chain_of(12)
            digests = writer.fill(list(range(12)), seed=1)
            for part in (slice(0, 5), slice(5, 12)):  # two cascades, as two steps would
                ids = list(range(12))[part]
                result = await asyncio.to_thread(writer.run, False, chain[part], ids)
                assert result.success
                assert result.transfer_bytes == len(ids) * CHUNK
            assert await asyncio.to_thread(reader.lookup_prefix, chain, "q") == 12
            gap = [*chain[:3], chain_of(1, "other")[0], *chain[3:]]
            assert await asyncio.to_thread(reader.lookup_prefix, gap, "q2") == 3
            slots = list(range(20, 32))
            result = await asyncio.to_thread(reader.run, True, chain, slots, "q")
            assert result.success
            assert result.successful_keys is None
            assert reader.digests(slots) == digests
            # Stored again (a later cascade of the same prefix): put-if-absent, still a success.
            result = await asyncio.to_thread(writer.run, False, chain[:2], [0, 1])
            assert result.success
            await asyncio.to_thread(reader.wait_idle)
        finally:
            await shutdown(writer, reader)


async def test_lookups_of_a_step_go_out_as_one_probe(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    probes: list[int],
) -> None:
    async with kvcache_nodes(3, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        writer, reader = Engine(_settings(nodes)), Engine(_settings(nodes))
        try:
            first, second = chain_of(6, "a"), chain_of(4, "b")
            writer.fill(list(range(10)), seed=2)
            stored = await asyncio.to_thread(writer.run, False, first + second, list(range(10)))
            assert stored.success
            probes.clear()

            def one_step() -> list[Any]:
                a, b = Ctx(req_id="a"), Ctx(req_id="b")
                answers = [reader.tier.lookup(k, a) for k in first]
                answers += [reader.tier.lookup(k, b) for k in second]
                reader.step_end()
                return answers

            assert set(await asyncio.to_thread(one_step)) == {Result.RETRY}
            assert await asyncio.to_thread(reader.lookup_prefix, first, "a") == 6
            assert await asyncio.to_thread(reader.lookup_prefix, second, "b") == 4
            assert probes == [10]  # both requests' keys, one exists_batch, each node asked once
        finally:
            await shutdown(writer, reader)


async def test_namespaces_keep_salts_tenants_and_layouts_apart(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        base = _settings(nodes, cache_salt="s1", tenant="team-a")
        writer = Engine(base)
        others = {
            "same": (Engine(base), 8),
            "tp4, parallelism-agnostic": (Engine(base, tp=4), 8),
            "other salt": (Engine({**base, "cache_salt": "s2"}), 0),
            "other tenant": (Engine({**base, "tenant": "team-b"}), 0),
            "tp4, per-topology bytes": (Engine(base, tp=4, agnostic=False), 0),
            "other dtype": (Engine(base, dtype="float8_e4m3fn"), 0),
        }
        try:
            chain = chain_of(8)
            digests = writer.fill(list(range(8)), seed=3)
            assert (await asyncio.to_thread(writer.run, False, chain, list(range(8)))).success
            assert writer.tier.namespace.startswith("meta-llama-Llama-x@s1#")
            for name, (engine, expected) in others.items():
                hits = await asyncio.to_thread(engine.lookup_prefix, chain, "q")
                assert hits == expected, name
            shared = others["tp4, parallelism-agnostic"][0]
            result = await asyncio.to_thread(shared.run, True, chain, list(range(8)), "q")
            assert result.success
            assert shared.digests(list(range(8))) == digests
        finally:
            await shutdown(writer, *(e for e, _ in others.values()))


async def test_unreachable_cluster_is_misses_and_failed_jobs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    engine = Engine({"nodes": [address], "timeout_s": 0.5, "retry_s": 60, "transports": ["tcp"]})
    caplog.set_level(logging.WARNING, logger=MODULE)
    try:
        chain = chain_of(4)
        assert await asyncio.to_thread(engine.lookup_prefix, chain, "q") == 0
        engine.fill([0, 1], seed=4)
        for load in (False, True):
            result = await asyncio.to_thread(engine.run, load, chain[:2], [0, 1])
            assert not result.success
            assert not result.successful_keys
        assert await asyncio.to_thread(engine.lookup_prefix, chain, "q2") == 0
        await asyncio.to_thread(engine.wait_idle)
        connects = [r for r in caplog.records if "connect failed" in r.getMessage()]
        assert len(connects) == 1  # once per burst, not once per call
    finally:
        await shutdown(engine)


async def test_dead_node_is_misses_and_partial_loads(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        writer, reader = Engine(_settings(nodes)), Engine(_settings(nodes))
        try:
            chain = chain_of(16)
            digests = writer.fill(list(range(16)), seed=5)
            assert (await asyncio.to_thread(writer.run, False, chain, list(range(16)))).success
            assert await asyncio.to_thread(reader.lookup_prefix, chain, "q") == 16
            await stop_node(nodes[1])
            slots = list(range(30, 46))
            result = await asyncio.to_thread(reader.run, True, chain, slots, "q")
            loaded = set(result.successful_keys or ())
            assert not result.success
            assert 0 < len(loaded) < 16  # the live node's share
            got = reader.digests(slots)
            for i, key in enumerate(chain):
                assert (got[i] == digests[i]) == (key in loaded)
            # The keys that failed are misses now: vLLM recomputes instead of retrying them.
            first_lost = next(i for i, k in enumerate(chain) if k not in loaded)
            assert await asyncio.to_thread(reader.lookup_prefix, chain, "q") == first_lost
            # A new request probes again: the dead node's keys read as misses.
            assert await asyncio.to_thread(reader.lookup_prefix, chain, "fresh") == first_lost
            result = await asyncio.to_thread(writer.run, False, chain_of(8, "new"), list(range(8)))
            assert result.job_id is not None  # a failed or partial store, never an exception
        finally:
            await shutdown(writer, reader)


async def test_drain_and_shutdown_report_every_job(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with kvcache_nodes(1, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        engine = Engine(_settings(nodes))
        try:
            engine.fill(list(range(16)), seed=6)
            jobs = [
                engine.submit(False, chain_of(4, f"p{i}"), list(range(4 * i, 4 * i + 4)), "r")
                for i in range(4)
            ]
            await asyncio.to_thread(engine.tier.drain_jobs)
            engine.poll()  # every result is there at once after drain_jobs()
            assert sorted(engine.results) == jobs
            assert not engine.tier.has_pending_work()
            assert all(r.success for r in engine.results.values())
            await asyncio.to_thread(engine.tier.shutdown)
            await asyncio.to_thread(engine.tier.shutdown)  # idempotent
            late = engine.submit(True, chain_of(4, "p0"), [60, 61, 62, 63], "r")
            engine.poll()
            assert not engine.results[late].success
        finally:
            await shutdown(engine)


# Credentials: tenant users with an access key and a secret, as vLLM's tier dict names them.


def negotiated(engine: Engine) -> set[str]:
    """The data-plane transports the tier's client opened (one session per node)."""
    client = engine.tier._client
    assert client is not None
    return {n.session.name for n in client._set.nodes() if n.session is not None}


async def test_a_tenant_user_reaches_only_its_own_tenants_blocks(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with secure_cluster(2, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as c:
        alice, bob = await c.user("team-a"), await c.user("team-b")
        as_alice = {**c.credentials(alice), "timeout_s": 2.0}
        writer, reader = Engine(as_alice), Engine(as_alice)
        service = {"metadata": c.metadata.address, "timeout_s": 2.0}  # the operator's port
        others = {
            "bob (team-b)": (Engine({**c.credentials(bob), "timeout_s": 2.0}), 0),
            "alice naming team-b": (Engine({**as_alice, "tenant": "team-b"}), 0),
            "operator, default tenant": (Engine(service), 0),
            "operator acting for team-a": (Engine({**service, "tenant": "team-a"}), 8),
        }
        try:
            chain = chain_of(8)
            digests = writer.fill(list(range(8)), seed=21)
            result = await asyncio.to_thread(writer.run, False, chain, list(range(8)))
            assert result.success
            assert await asyncio.to_thread(reader.lookup_prefix, chain, "q") == 8
            result = await asyncio.to_thread(reader.run, True, chain, list(range(20, 28)), "q")
            assert result.success
            assert reader.digests(list(range(20, 28))) == digests
            assert negotiated(reader) == {"tcp"}  # not trusted for shared memory
            for name, (engine, expected) in others.items():
                assert await asyncio.to_thread(engine.lookup_prefix, chain, "q") == expected, name
            # Alice claiming team-b is refused at every call: misses and failed jobs, no crash.
            impostor = others["alice naming team-b"][0]
            impostor.fill([0], seed=22)
            for load in (False, True):
                assert not (await asyncio.to_thread(impostor.run, load, chain[:1], [0])).success
        finally:
            await shutdown(writer, reader, *(e for e, _ in others.values()))
    secret = alice.secret.reveal()
    assert secret not in caplog.text
    assert bob.secret.reveal() not in caplog.text
    assert secret not in repr(writer.tier.settings)
    assert secret not in repr(writer.tier._connect_kwargs)
    assert any("as user " + alice.access_key in r.getMessage() for r in caplog.records)


async def test_shared_memory_only_for_principals_trusted_for_it(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with secure_cluster(1, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as c:
        trusted = await c.user("team-t", trusted=True)
        plain = await c.user("team-t")
        engines = {
            "trusted user": (Engine(c.credentials(trusted)), "shm"),
            "operator": (Engine({"metadata": c.metadata.address, "tenant": "team-t"}), "shm"),
            "user": (Engine(c.credentials(plain)), "tcp"),
        }
        try:
            for seed, (name, (engine, transport)) in enumerate(engines.items()):
                chain = chain_of(4, name)
                digests = engine.fill([0, 1, 2, 3], seed=seed)
                assert (await asyncio.to_thread(engine.run, False, chain, [0, 1, 2, 3])).success
                loaded = await asyncio.to_thread(engine.run, True, chain, [8, 9, 10, 11])
                assert loaded.success
                assert engine.digests([8, 9, 10, 11]) == digests
                assert negotiated(engine) == {transport}, name
        finally:
            await shutdown(*(e for e, _ in engines.values()))


async def test_a_wrong_secret_is_misses_and_failed_jobs(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-of-this-user"
    async with secure_cluster(1, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as c:
        user = await c.user("team-a")
        settings = {**c.credentials(user, secret=wrong), "timeout_s": 1.0, "retry_s": 60}
        engine = Engine(settings)
        try:
            chain = chain_of(4)
            assert await asyncio.to_thread(engine.lookup_prefix, chain, "q") == 0
            engine.fill([0, 1], seed=23)
            for load in (False, True):
                result = await asyncio.to_thread(engine.run, load, chain[:2], [0, 1])
                assert not result.success
                assert not result.successful_keys
            await asyncio.to_thread(engine.wait_idle)
        finally:
            await shutdown(engine)
    connects = [r for r in caplog.records if "connect failed" in r.getMessage()]
    assert len(connects) == 1
    assert "Unauthenticated" in connects[0].getMessage()
    assert wrong not in caplog.text
    assert user.secret.reveal() not in caplog.text


def test_credential_settings_that_cannot_work_raise_at_startup(tmp_path: Path) -> None:
    secret = "a-secret-that-must-not-leak"
    loose = tmp_path / "loose.secret"
    loose.write_text(secret)
    os.chmod(loose, 0o644)
    base = {"metadata": "127.0.0.1:1", "access_key": "AKUSER"}
    with pytest.raises(ValueError, match="mode 0644") as raised:
        Engine({**base, "secret_key_file": str(loose)})
    assert secret not in str(raised.value)
    with pytest.raises(ValueError, match="not both"):
        Engine({**base, "secret_key": secret, "secret_key_file": str(loose)})
    with pytest.raises(ValueError, match="needs its access_key"):
        Engine({"metadata": "127.0.0.1:1", "secret_key": secret})
    with pytest.raises(ValueError, match="insecure must be true or false"):
        Engine({"metadata": "127.0.0.1:1", "insecure": "maybe"})


# Without nodes.


def test_bad_settings_raise_at_startup() -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        Engine({"nodes": ["127.0.0.1:1"], "metadta": "x"})
    with pytest.raises(ValueError, match="metadata"):
        Engine({"tenant": "team-a"})


def test_layout_collapses_parallel_sizes_only_for_agnostic_bytes() -> None:
    def fields(**config: Any) -> dict[str, Any]:
        spec = types.SimpleNamespace(config=offloading_config(**config))
        return tier_module.layout_fields(spec, CHUNK)

    assert fields(tp=2) == fields(tp=4)
    assert "parallel" not in fields(tp=2)
    assert fields(tp=2, agnostic=False)["parallel"] == [2, 1, 1, 1]
    assert keys.with_layout("m@s", fields(tp=2)) == keys.with_layout("m@s", fields(tp=8))
    assert keys.with_layout("m@s", fields(tp=2)) != keys.with_layout("m@s", fields(dtype="fp8"))
    assert keys.layout_digest({"a": 1, "b": [2]}) == keys.layout_digest({"b": [2], "a": 1})


# vLLM's own manager and CPU primary tier, end to end (only where vLLM 0.33 imports).


def _manager(settings: dict[str, Any]) -> Any:
    assert VLLM is not None
    tier = {"type": tier_module.CLASS_NAME, "module_path": MODULE, **settings}
    config = offloading_config(cpu_bytes_to_use=32 * CHUNK, secondary_tiers=[tier])
    return VLLM.spec.TieringOffloadingSpec(config).get_manager()


def _cascade(manager: Any, chain: list[bytes], seed: int) -> list[str]:
    """A request's chunks stored GPU -> CPU (bytes written where the worker would), then
    cascaded by vLLM to the secondary tiers; returns the chunks' digests."""
    view = np.asarray(manager.primary_tier.get_kv_memoryview())
    ctx = Ctx(req_id="w")
    with manager.lock:
        manager.on_new_request(ctx)
        out = manager.prepare_store(chain, ctx)
    rng = np.random.default_rng(seed)
    ids = [int(c) for c in out.store_spec.chunk_ids]
    for c in ids:
        view[c] = np.frombuffer(rng.bytes(view.shape[1]), np.int8)
    with manager.lock:
        manager.complete_store(chain, ctx)
        manager.on_request_finished(ctx)
    return [hashlib.sha256(view[c].tobytes()).hexdigest() for c in ids]


def _promote(manager: Any, chain: list[bytes], timeout_s: float = 15.0) -> list[str]:
    """The scheduler's lookups for a new request, step after step, until every chunk is a
    HIT in the CPU tier (promoted from kvtier); returns the loaded chunks' digests."""
    ctx = Ctx(req_id="q")
    with manager.lock:
        manager.on_new_request(ctx)
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "promotion did not finish"
        with manager.lock:
            results = [manager.lookup(k, ctx) for k in chain]
            manager.on_schedule_end(StepEnd((), ()))
        assert Result.MISS not in results
        if all(r is Result.HIT for r in results):
            break
        time.sleep(0.002)
    with manager.lock:
        spec = manager.prepare_load(chain, ctx)
        view = np.asarray(manager.primary_tier.get_kv_memoryview())
        digests = [hashlib.sha256(view[int(c)].tobytes()).hexdigest() for c in spec.chunk_ids]
        manager.complete_load(chain, ctx)
        manager.on_request_finished(ctx)
    return digests


def _settle(manager: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with manager.lock:
            manager.on_schedule_end(StepEnd((), ()))
            if not manager.has_pending_work():
                return
        assert time.monotonic() < deadline, "cascades did not finish"
        time.sleep(0.002)


@pytest.mark.skipif(VLLM is None, reason="vLLM 0.33 is not importable here")
async def test_vllm_tiering_manager_cascades_and_promotes_through_kvtier(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path, **NODE_SETTINGS) as nodes:
        writer = await asyncio.to_thread(_manager, _settings(nodes))
        reader = await asyncio.to_thread(_manager, _settings(nodes))
        try:
            chain = chain_of(10)
            digests = await asyncio.to_thread(_cascade, writer, chain, 7)
            await asyncio.to_thread(_settle, writer)
            assert await asyncio.to_thread(_promote, reader, chain) == digests
        finally:
            for manager in (writer, reader):
                await asyncio.to_thread(manager.shutdown)
