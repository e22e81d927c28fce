"""The LMCache plugin in this process against real kvcache nodes, driven the way LMCache 0.5.6's
`RemoteBackend` drives a connector: coroutines on a loop of LMCache's own in another thread
(`run_coroutine_threadsafe`), the sync calls (`exists_sync`, `batched_contains`,
`remove_sync`) from the caller's thread.

LMCache itself cannot be installed next to kvtier (it pins protobuf < 7), so its interface is
copied here as stand-ins of 0.5.6's `RemoteConnector` base (the `(config, metadata)` init and
`reshape_partial_chunk`), `CacheEngineKey.to_string`, `MemoryObj` and `LocalCPUBackend.allocate`.
test_lmcache_engine.py runs the plugin under LMCache's own code in LMCache's virtualenv.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytest

from kvtier import etcdserver, kv, membership
from tests.component import harness
from tests.integrations.conftest import kvcache_nodes, secure_cluster, stop_node

T = TypeVar("T")
MODULE = "kvtier.integrations.lmcache"
MODEL = "meta-llama/Llama-x"
LAYERS, CHUNK, HIDDEN = 2, 16, 64  # bf16: 8 KiB per full chunk
plugin = importlib.import_module(MODULE)


# Stand-ins for LMCache 0.5.6 (lmcache/utils.py, v1/memory_management.py,
# v1/storage_backend/connector/base_connector.py, v1/storage_backend/local_cpu_backend.py).


@dataclasses.dataclass(frozen=True)
class CacheEngineKey:
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: int
    dtype: str = "bfloat16"

    def to_string(self) -> str:
        return (
            f"{self.model_name}@{self.world_size}@{self.worker_id}@{self.chunk_hash:x}@{self.dtype}"
        )


class MemoryObj:
    """A TensorMemoryObj: byte_array is the logical size of the chunk; ref counted."""

    def __init__(self, shape: tuple[int, ...], owner: LocalCPUBackend) -> None:
        self.shape = list(shape)
        self.raw_data = np.zeros(int(np.prod(shape)) * 2, np.uint8)
        self.ref_count, self.owner = 1, owner

    @property
    def byte_array(self) -> memoryview:
        return self.raw_data.data

    def get_shape(self) -> list[int]:
        return self.shape

    def ref_count_up(self) -> None:
        self.ref_count += 1

    def ref_count_down(self) -> None:
        self.ref_count -= 1
        if self.ref_count == 0:
            self.owner.live -= 1


class LocalCPUBackend:
    def __init__(self, metadata: Any, capacity: int = 10_000) -> None:
        self.metadata, self.config, self.live, self.capacity = metadata, None, 0, capacity

    def allocate(self, shapes: Any, dtypes: Any, fmt: Any = None) -> MemoryObj | None:
        if self.live >= self.capacity:
            return None
        self.live += 1
        return MemoryObj(tuple(shapes[0]), self)


class RemoteConnector:
    """0.5.6's base: what its __init__ sets and reshape_partial_chunk."""

    def __init__(self, config: Any, metadata: Any) -> None:
        assert metadata is not None
        self.meta_shapes = metadata.get_shapes()
        self.meta_dtypes = ["bfloat16"]
        self.meta_fmt = "KV_MLA_FMT" if metadata.use_mla else "KV_2LTD"
        self.full_chunk_size_bytes = int(np.prod(self.meta_shapes[0])) * 2
        self.single_token_size = self.full_chunk_size_bytes // metadata.chunk_size

    def reshape_partial_chunk(self, memory_obj: MemoryObj, bytes_read: int) -> MemoryObj:
        if (
            bytes_read == 0
            or bytes_read % self.single_token_size != 0
            or bytes_read > self.full_chunk_size_bytes
        ):
            raise ValueError(f"bytes_read: {bytes_read} is illegal")
        if bytes_read == self.full_chunk_size_bytes:
            return memory_obj
        memory_obj.raw_data = memory_obj.raw_data[:bytes_read]
        memory_obj.shape[2] = bytes_read // self.single_token_size
        return memory_obj


class ConnectorAdapter:
    def __init__(self, schema: str = "") -> None:
        self.schema = schema


def metadata(*, world: int = 1, worker: int = 0, mla: bool = False) -> Any:
    kv_size = 1 if mla else 2
    return SimpleNamespace(
        model_name=MODEL, world_size=world, worker_id=worker, use_mla=mla, chunk_size=CHUNK,
        get_shapes=lambda: [(kv_size, LAYERS, CHUNK, HIDDEN)],
    )  # fmt: skip


def engine_config(plugin_name: str, class_name: str, **settings: Any) -> Any:
    prefix = f"remote_storage_plugin.{plugin_name}."
    extra = {prefix + "module_path": MODULE, prefix + "class_name": class_name}
    extra |= {prefix + k: v for k, v in settings.items()}
    return SimpleNamespace(
        remote_storage_plugins=[plugin_name], extra_config=extra, use_layerwise=False
    )


# LMCache's side: its loop in a thread, and the calls RemoteBackend makes.


class Engine:
    """One LMCache worker's RemoteBackend view of the connector."""

    def __init__(
        self, connector: Any, loop: asyncio.AbstractEventLoop, cpu: LocalCPUBackend
    ) -> None:
        self.connector, self.loop, self.cpu = connector, loop, cpu

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """A connector coroutine on LMCache's loop, awaited from the test's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def sync(self, fn: Any, *args: Any) -> Any:
        """A sync connector call from a worker thread (as LMCache's callers make it)."""
        return await asyncio.to_thread(fn, *args)


@pytest.fixture
def lmcache_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture(autouse=True)
def stand_in_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's classes made against the stand-in bases (LMCache is not installed here)."""
    classes = vars(plugin)  # not setattr: reading the old value would import LMCache
    monkeypatch.setitem(classes, "KVTierConnector", plugin.connector_class(RemoteConnector))
    monkeypatch.setitem(classes, "KVTierConnectorAdapter", plugin.adapter_class(ConnectorAdapter))


@pytest.fixture
async def nodes(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[list[harness.Running]]:
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as running:
        yield running


@pytest.fixture
async def engines(lmcache_loop: asyncio.AbstractEventLoop) -> AsyncIterator[list[Engine]]:
    """Engines made by the test; closed after it (on LMCache's loop)."""
    made: list[Engine] = []
    yield made
    for engine in made:
        await engine.run(engine.connector.close())


def make_engine(
    made: list[Engine],
    loop: asyncio.AbstractEventLoop,
    addresses: list[str] | str,
    *,
    via_adapter: bool = True,
    md: Any = None,
    **settings: Any,
) -> Engine:
    """The connector as LMCache's ConnectorManager makes it: through KVTierConnectorAdapter
    (plugin `kvtier`) or as a bare RemoteConnector under another plugin name."""
    md = md or metadata()
    cpu = LocalCPUBackend(md)
    nodes = addresses if isinstance(addresses, str) else ",".join(addresses)
    where = {} if "metadata" in settings else {"nodes": nodes}
    settings = {**where, "timeout_s": 1.0, "transports": "tcp", **settings}
    if via_adapter:
        config = engine_config("kvtier", "KVTierConnectorAdapter", **settings)
        adapter = plugin.KVTierConnectorAdapter()
        assert adapter.can_parse("plugin://kvtier")
        assert not adapter.can_parse("plugin://fs")
        context = SimpleNamespace(
            loop=loop, local_cpu_backend=cpu, config=config, metadata=md, plugin_name="kvtier"
        )
        connector = adapter.create_connector(context)
    else:  # LMCache's DynamicConnectorAdapter: no plugin name, no metadata
        config = engine_config("mycache", "KVTierConnector", **settings)
        connector = plugin.KVTierConnector(loop=loop, local_cpu_backend=cpu, config=config)
    assert isinstance(connector, RemoteConnector)
    engine = Engine(connector, loop, cpu)
    made.append(engine)
    return engine


def key(i: int, *, world: int = 1, worker: int = 0) -> CacheEngineKey:
    chunk_hash = int.from_bytes(hashlib.sha256(f"chunk-{i}".encode()).digest()[:8], "little")
    return CacheEngineKey(MODEL, world, worker, chunk_hash)


def chunk(engine: Engine, seed: int, tokens: int = CHUNK) -> MemoryObj:
    obj = engine.cpu.allocate(engine.connector.meta_shapes, ["bfloat16"])
    assert obj is not None
    if tokens < CHUNK:
        engine.connector.reshape_partial_chunk(obj, tokens * engine.connector.single_token_size)
    obj.raw_data[:] = np.random.default_rng(seed).integers(0, 256, obj.raw_data.size, np.uint8)
    return obj


def digest(obj: MemoryObj | None) -> str | None:
    return None if obj is None else hashlib.sha256(obj.byte_array).hexdigest()


async def test_chunks_round_trip_byte_exact_with_partial_last_chunk(
    nodes: list[harness.Running], engines: list[Engine], lmcache_loop: asyncio.AbstractEventLoop
) -> None:
    addresses = [n.address for n in nodes]
    writer = make_engine(engines, lmcache_loop, addresses)
    reader = make_engine(engines, lmcache_loop, addresses, via_adapter=False)
    keys = [key(i) for i in range(5)]
    objs = [chunk(writer, i) for i in range(4)] + [chunk(writer, 4, tokens=5)]
    await writer.run(writer.connector.batched_put(keys[:3], objs[:3]))
    for k, o in zip(keys[3:], objs[3:], strict=True):
        await writer.run(writer.connector.put(k, o))
    got = await reader.run(reader.connector.batched_get(keys))
    assert [digest(g) for g in got] == [digest(o) for o in objs]
    assert got[4] is not None
    assert got[4].get_shape()[2] == 5  # the partial chunk's own token count
    assert digest(await reader.run(reader.connector.get(keys[1]))) == digest(objs[1])
    assert await reader.run(reader.connector.get(key(99))) is None
    assert await reader.run(reader.connector.exists(keys[0])) is True
    assert await reader.sync(reader.connector.exists_sync, keys[2]) is True
    assert await reader.sync(reader.connector.exists_sync, key(99)) is False
    assert reader.cpu.live == 6  # five hits and the single get held; the miss was released
    assert await reader.run(reader.connector.ping()) == 0
    assert len(await reader.run(reader.connector.list())) == 5
    assert await reader.sync(reader.connector.remove_sync, keys[0]) is True
    assert await reader.run(reader.connector.exists(keys[0])) is False


async def test_contains_is_one_lookup_and_pins_hold_hits_until_the_get(
    nodes: list[harness.Running],
    engines: list[Engine],
    lmcache_loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: dict[str, list[int]] = {"lookup": [], "pin": [], "unpin": []}
    for name in calls:
        original = getattr(kv.AsyncKVClient, name)

        async def spy(self: Any, keys: Any, *a: Any, _o: Any = original, _n: str = name) -> Any:
            calls[_n].append(len(keys))
            return await _o(self, keys, *a)

        monkeypatch.setattr(kv.AsyncKVClient, name, spy)
    engine = make_engine(engines, lmcache_loop, [n.address for n in nodes])
    keys = [key(i) for i in range(8)]
    stored = [k for i, k in enumerate(keys) if i != 5]
    await engine.run(engine.connector.batched_put(stored, [chunk(engine, i) for i in range(7)]))
    assert await engine.sync(engine.connector.batched_contains, keys) == 5
    found = await engine.run(engine.connector.batched_async_contains("req-1", keys, True))
    assert found == 5
    assert calls["lookup"] == [8, 8]  # one lookup per call, whatever the number of nodes
    assert calls["pin"] == [5]  # the hits, pinned until the get
    prefix = await engine.run(engine.connector.batched_get_non_blocking("req-1", keys))
    assert len(prefix) == 5
    assert calls["unpin"] == [5]
    assert engine.cpu.live == 7 + 5  # the chunks put, plus the prefix; later hits released


async def test_a_dead_node_turns_its_chunks_into_misses_not_errors(
    nodes: list[harness.Running], engines: list[Engine], lmcache_loop: asyncio.AbstractEventLoop
) -> None:
    engine = make_engine(engines, lmcache_loop, [n.address for n in nodes])
    keys = [key(i) for i in range(16)]
    objs = [chunk(engine, i) for i in range(16)]
    await engine.run(engine.connector.batched_put(keys, objs))
    await stop_node(nodes[1])
    live_before = engine.cpu.live
    started = time.monotonic()
    got = await engine.run(engine.connector.batched_get(keys))
    found = await engine.run(engine.connector.batched_async_contains("r", keys, False))
    await engine.run(engine.connector.batched_put([key(100 + i) for i in range(8)], objs[:8]))
    assert time.monotonic() - started < 5.0
    hits = [g is not None for g in got]
    assert 0 < sum(hits) < 16, hits
    assert found == hits.index(False)
    for g, o in zip(got, objs, strict=True):
        assert g is None or digest(g) == digest(o)
    assert engine.cpu.live == live_before + sum(hits)  # every miss's buffer went back
    assert await engine.sync(engine.connector.batched_contains, keys) == found


async def test_an_unreachable_cluster_is_all_misses(
    engines: list[Engine], lmcache_loop: asyncio.AbstractEventLoop
) -> None:
    engine = make_engine(engines, lmcache_loop, "127.0.0.1:9", timeout_s=0.5, retry_s=60)
    keys = [key(i) for i in range(3)]
    await engine.run(engine.connector.batched_put(keys, [chunk(engine, i) for i in range(3)]))
    assert await engine.run(engine.connector.batched_get(keys)) == [None] * 3
    assert await engine.run(engine.connector.batched_async_contains("r", keys, True)) == 0
    assert await engine.sync(engine.connector.batched_contains, keys) == 0
    assert await engine.sync(engine.connector.exists_sync, keys[0]) is False
    assert await engine.run(engine.connector.ping()) == 1
    assert engine.cpu.live == 3  # the chunks put; the gets' buffers went back


async def test_tenants_salts_and_tp_ranks(
    nodes: list[harness.Running], engines: list[Engine], lmcache_loop: asyncio.AbstractEventLoop
) -> None:
    addresses = [n.address for n in nodes]
    owner = make_engine(engines, lmcache_loop, addresses, tenant="team-a", cache_salt="s1")
    keys = [key(i) for i in range(4)]
    await owner.run(owner.connector.batched_put(keys, [chunk(owner, i) for i in range(4)]))
    cases: list[tuple[dict[str, Any], int]] = [
        ({"tenant": "team-b", "cache_salt": "s1"}, 0),
        ({"tenant": "team-a", "cache_salt": "s2"}, 0),
        ({"tenant": "team-a"}, 0),
        ({"tenant": "team-a", "cache_salt": "s1"}, 4),
    ]
    for who, expected in cases:
        other = make_engine(engines, lmcache_loop, addresses, **who)
        assert await other.sync(other.connector.batched_contains, keys) == expected, who
    # MHA: TP rank 1 holds other heads, so rank 0's chunks are not its chunks.
    rank0 = make_engine(engines, lmcache_loop, addresses, md=metadata(world=2, worker=0))
    rank1 = make_engine(engines, lmcache_loop, addresses, md=metadata(world=2, worker=1))
    mha = [key(i, world=2, worker=0) for i in range(3)]
    await rank0.run(rank0.connector.batched_put(mha, [chunk(rank0, i) for i in range(3)]))
    mine = [key(i, world=2, worker=1) for i in range(3)]
    assert await rank1.sync(rank1.connector.batched_contains, mine) == 0
    # MLA: every rank and every TP size reads the one copy.
    mla0 = make_engine(engines, lmcache_loop, addresses, md=metadata(world=2, mla=True))
    mla_objs = [chunk(mla0, 10 + i) for i in range(3)]
    await mla0.run(mla0.connector.batched_put(mha, mla_objs))
    for world, worker in ((2, 1), (4, 3), (1, 0)):
        reader = make_engine(
            engines, lmcache_loop, addresses, md=metadata(world=world, worker=worker, mla=True)
        )
        asked = [key(i, world=world, worker=worker) for i in range(3)]
        got = await reader.run(reader.connector.batched_get(asked))
        assert [digest(g) for g in got] == [digest(o) for o in mla_objs]


async def test_a_tenant_user_reaches_only_its_own_tenants_chunks(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    engines: list[Engine],
    lmcache_loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with secure_cluster(2, etcd, etcd_prefix, store, tmp_path) as c:
        alice, bob = await c.user("team-a"), await c.user("team-b")
        as_alice = c.credentials(alice)
        writer = make_engine(engines, lmcache_loop, "", **as_alice)
        reader = make_engine(engines, lmcache_loop, "", via_adapter=False, **as_alice)
        keys = [key(i) for i in range(4)]
        objs = [chunk(writer, 30 + i) for i in range(4)]
        await writer.run(writer.connector.batched_put(keys, objs))
        got = await reader.run(reader.connector.batched_get(keys))
        assert [digest(g) for g in got] == [digest(o) for o in objs]
        service = {"metadata": c.metadata.address}
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("bob (team-b)", c.credentials(bob), 0),
            ("alice naming team-b", {**as_alice, "tenant": "team-b"}, 0),
            ("operator, default tenant", service, 0),
            ("operator acting for team-a", {**service, "tenant": "team-a"}, 4),
        ]
        for name, who, expected in cases:
            other = make_engine(engines, lmcache_loop, "", **who)
            assert await other.sync(other.connector.batched_contains, keys) == expected, name
            if name == "alice naming team-b":  # refused: a dropped put, never an exception
                await other.run(other.connector.batched_put(keys[:1], [chunk(other, 1)]))
                assert await other.run(other.connector.get(keys[0])) is None
        for engine in engines:  # before the cluster stops
            await engine.run(engine.connector.close())
    assert alice.secret.reveal() not in caplog.text
    assert bob.secret.reveal() not in caplog.text
    assert alice.secret.reveal() not in repr(writer.connector.settings)
    assert any("as user " + alice.access_key in r.getMessage() for r in caplog.records)


async def test_a_wrong_secret_is_all_misses(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    engines: list[Engine],
    lmcache_loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-of-this-user"
    async with secure_cluster(1, etcd, etcd_prefix, store, tmp_path) as c:
        user = await c.user("team-a")
        settings = {**c.credentials(user, secret=wrong), "retry_s": 60}
        engine = make_engine(engines, lmcache_loop, "", **settings)
        keys = [key(i) for i in range(3)]
        await engine.run(engine.connector.batched_put(keys, [chunk(engine, i) for i in range(3)]))
        assert await engine.run(engine.connector.batched_get(keys)) == [None] * 3
        assert await engine.run(engine.connector.batched_async_contains("r", keys, True)) == 0
        assert await engine.sync(engine.connector.batched_contains, keys) == 0
        assert await engine.run(engine.connector.ping()) == 1
        assert engine.cpu.live == 3  # the chunks put; the gets' buffers went back
    connects = [r for r in caplog.records if "connect failed" in r.getMessage()]
    assert len(connects) == 1
    assert "Unauthenticated" in connects[0].getMessage()
    assert wrong not in caplog.text
    assert user.secret.reveal() not in caplog.text


def test_the_plugin_modules_import_no_engine() -> None:
    """Engines import the modules by path; kvtier must not need an engine (or torch) to
    import them, nor may importing kvtier.integrations load any SDK."""
    code = (
        "import sys, kvtier.integrations; sdk = 'kvtier.kv' in sys.modules; "
        "import kvtier.integrations.lmcache, kvtier.integrations.sglang; "
        "print(sdk, any(m.split('.')[0] in ('lmcache', 'sglang', 'torch') for m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert run.stdout.split() == ["False", "False"]
