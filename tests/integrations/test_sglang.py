"""SGLang HiCache on kvtier: `KVTierHiCacheStorage` loaded as SGLang's `dynamic` backend and driven
the way SGLang 0.5.23's `HiCacheController` drives its L3 storage, against real kvcache nodes.

Where SGLang is installed (`pip install --no-deps sglang==0.5.23` plus the few modules
`sglang.srt.mem_cache.hicache_storage` imports), the backend is built by SGLang's own
`StorageBackendFactory` from its own `HiCacheStorageConfig` and subclasses its `HiCacheStorage`.
Elsewhere (CI: SGLang needs CUDA wheels), the same calls go through stand-ins that copy 0.5.23's
signatures and factory rules. The host pool is a stand-in either way (SGLang's needs a GPU
device pool): `HostPool` copies the pointer arithmetic of `MHATokenToKVPoolHost` and
`MLATokenToKVPoolHost` for the layouts tested.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hashlib
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import etcdserver, kv_sync, membership
from tests.component import harness
from tests.integrations.conftest import kvcache_nodes, secure_cluster, stop_node

MODULE = "kvtier.integrations.sglang"
STORAGE_BATCH_SIZE = 128  # sglang.srt.mem_cache.hicache_storage.STORAGE_BATCH_SIZE


def _sglang() -> tuple[Any, Any, Any] | None:
    """SGLang's (HiCacheStorage, HiCacheStorageConfig, StorageBackendFactory), if installed."""
    try:
        storage = importlib.import_module("sglang.srt.mem_cache.hicache_storage")
        factory = importlib.import_module("sglang.srt.mem_cache.storage.backend_factory")
    except ImportError:
        return None
    return storage.HiCacheStorage, storage.HiCacheStorageConfig, factory.StorageBackendFactory


SGLANG = _sglang()


# Stand-ins for SGLang 0.5.23 (sglang/srt/mem_cache/hicache_storage.py, storage/backend_factory.py).


class StandInHiCacheStorage(abc.ABC):
    """`HiCacheStorage` of SGLang 0.5.23: the abstract methods and defaults the plugin meets."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> Any:
        raise NotImplementedError

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> Any:
        raise NotImplementedError

    @abc.abstractmethod
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any: ...

    @abc.abstractmethod
    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> Any: ...

    @abc.abstractmethod
    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool: ...

    @abc.abstractmethod
    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)


@dataclasses.dataclass
class StandInStorageConfig:
    """`HiCacheStorageConfig` of SGLang 0.5.23."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    attn_cp_rank: int
    attn_cp_size: int
    is_mla_model: bool
    enable_storage_metrics: bool
    is_page_first_layout: bool
    model_name: str | None
    tp_lcm_size: int | None = None
    should_split_heads: bool = False
    dp_rank: int = 0
    extra_config: dict[str, Any] | None = None
    dcp_size: int = 1
    dcp_rank: int = 0
    logical_page_size: int | None = None


def _stand_in_create(config: StandInStorageConfig) -> Any:
    """`StorageBackendFactory._create_dynamic_backend` of SGLang 0.5.23."""
    extra = config.extra_config or {}
    for field in ("backend_name", "module_path", "class_name"):
        if field not in extra:
            raise ValueError(f"Missing required field '{field}'")
    cls = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    if not issubclass(cls, StandInHiCacheStorage):
        raise TypeError("Backend class must inherit from HiCacheStorage")
    return cls(config, {})


def make_backend(pool: HostPool, settings: dict[str, Any], **config: Any) -> Any:
    """The backend as SGLang's cache controller attaches it (`attach_storage_backend`): the
    factory builds it from the extra config, then the host pool is registered."""
    fields: dict[str, Any] = {
        "tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1, "attn_cp_rank": 0,
        "attn_cp_size": 1, "is_mla_model": pool.mla, "enable_storage_metrics": False,
        "is_page_first_layout": pool.layout == "page_first", "model_name": "meta-llama/Llama-x",
    }  # fmt: skip
    fields.update(config)
    extra = {
        "backend_name": "kvtier", "module_path": MODULE, "class_name": "KVTierHiCacheStorage",
        **settings,
    }  # fmt: skip
    if SGLANG is not None:
        base, config_cls, factory = SGLANG
        backend = factory.create_backend("dynamic", config_cls(**fields, extra_config=extra), pool)
        assert isinstance(backend, base)
    else:
        module = importlib.import_module(MODULE)
        if "KVTierHiCacheStorage" not in vars(module):
            setattr(module, "KVTierHiCacheStorage", module.storage_class(StandInHiCacheStorage))  # noqa: B010
        backend = _stand_in_create(StandInStorageConfig(**fields, extra_config=extra))
    backend.register_mem_pool_host(pool)
    return backend


# The host pool (SGLang 0.5.23 sglang/srt/mem_cache/pool_host/mha.py, mla.py), on numpy.


class HostPool:
    """A host KV pool with SGLang's buffer shapes and zero-copy metadata, filled with random
    bytes (float16 stands in for bf16: two bytes per element)."""

    def __init__(
        self,
        *,
        layout: str,
        pages: int = 64,
        page_size: int = 16,
        layer_num: int = 4,
        head_num: int = 4,
        head_dim: int = 32,
        mla: bool = False,
        seed: int | None = 0,
    ) -> None:
        self.layout, self.page_size, self.layer_num = layout, page_size, layer_num
        self.head_num, self.head_dim, self.mla = (1 if mla else head_num), head_dim, mla
        self.size = pages * page_size
        self.dtype = np.dtype(np.float16)
        if mla:
            assert layout == "page_first"
            dims: tuple[int, ...] = (self.size, layer_num, 1, head_dim)
        elif layout == "layer_first":
            dims = (2, layer_num, self.size, head_num, head_dim)
        elif layout == "page_first":
            dims = (2, self.size, layer_num, head_num, head_dim)
        elif layout == "page_head":
            dims = (2, pages, head_num, page_size, layer_num, head_dim)
        else:
            raise ValueError(layout)
        count = int(np.prod(dims))
        raw = np.random.default_rng(seed).bytes(count * 2) if seed is not None else None
        data = np.frombuffer(raw, np.float16).copy() if raw else np.zeros(count, np.float16)
        self.kv_buffer = data.reshape(dims)

    def _isz(self) -> int:
        return self.dtype.itemsize

    def get_page_buffer_meta(self, indices: Any) -> tuple[list[int], list[int]]:
        assert len(indices) % self.page_size == 0
        base, idx, isz = self.kv_buffer.ctypes.data, list(indices.tolist()), self._isz()
        heads, dim, layers = self.head_num, self.head_dim, self.layer_num
        ptrs: list[int] = []
        if self.mla:  # MLATokenToKVPoolHost, page_first
            for i in range(0, len(idx), self.page_size):
                ptrs.append(base + idx[i] * layers * dim * isz)
            return ptrs, [layers * isz * self.page_size * dim] * len(ptrs)
        v_offset = layers * self.size * heads * dim * isz
        if self.layout == "layer_first":
            for i in range(0, len(idx), self.page_size):
                for layer in range(layers):
                    k = base + idx[i] * heads * dim * isz + layer * self.size * heads * dim * isz
                    ptrs += [k, k + v_offset]
            return ptrs, [isz * self.page_size * heads * dim] * len(ptrs)
        for i in range(0, len(idx), self.page_size):  # page_first, page_head
            k = base + idx[i] * layers * heads * dim * isz
            ptrs += [k, k + v_offset]
        return ptrs, [layers * isz * self.page_size * heads * dim] * len(ptrs)

    def get_split_heads_page_buffer_meta(
        self, indices: Any, split_factor: int
    ) -> tuple[list[int], list[int]]:
        assert self.layout == "page_head"
        assert self.head_num % split_factor == 0
        base, idx, isz = self.kv_buffer.ctypes.data, list(indices.tolist()), self._isz()
        heads, dim, layers = self.head_num, self.head_dim, self.layer_num
        v_offset = layers * self.size * heads * dim * isz
        ptrs: list[int] = []
        for i in range(0, len(idx), self.page_size):
            for head in range(0, heads, heads // split_factor):
                k = base + idx[i] * layers * heads * dim * isz
                k += head * self.page_size * layers * dim * isz
                ptrs += [k, k + v_offset]
        size = layers * isz * self.page_size * heads * dim // split_factor
        return ptrs, [size] * len(ptrs)

    def get_data_page(self, index: int, flat: bool = True) -> np.ndarray:
        ps = self.page_size
        if self.mla:
            page = self.kv_buffer[index : index + ps]
        elif self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + ps]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + ps]
        else:
            page = self.kv_buffer[:, index // ps : index // ps + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> np.ndarray:
        return np.zeros(self.get_data_page(0).size, self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: np.ndarray) -> None:
        self.get_data_page(index, flat=False)[...] = data_page.reshape(
            self.get_data_page(index, flat=False).shape
        )

    def page_digest(self, page: int) -> str:
        return hashlib.sha256(self.get_data_page(page * self.page_size).tobytes()).hexdigest()


def page_hashes(pages: int, seed: int = 0, page_size: int = 16) -> list[str]:
    """Chained SHA-256 page hashes of a token sequence, as `get_hash_str` makes them."""
    tokens = np.random.default_rng(seed).integers(0, 32000, pages * page_size, dtype=np.int32)
    out, prior = [], b""
    for p in range(pages):
        prior = hashlib.sha256(
            prior + tokens[p * page_size : (p + 1) * page_size].tobytes()
        ).digest()
        out.append(prior.hex())
    return out


def slots(first_page: int, pages: int, page_size: int = 16) -> np.ndarray:
    """Token-level host indices of pages first_page.. (what SGLang passes as host_indices)."""
    return np.arange(first_page * page_size, (first_page + pages) * page_size)


# What HiCacheController (sglang/srt/managers/cache_controller.py, 0.5.23) does with a backend.


def backup(backend: Any, pool: HostPool, hashes: list[str], first_page: int, v1: bool) -> bool:
    """`_page_backup`: batches of STORAGE_BATCH_SIZE through `_page_set_zero_copy` (v1) or
    `_generic_page_set`."""
    ok = True
    for start in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[start : start + STORAGE_BATCH_SIZE]
        indices = slots(first_page + start, len(batch), pool.page_size)
        if v1:
            ok &= all(backend.batch_set_v1(batch, indices, None))
        else:
            data = [pool.get_data_page(int(indices[i * pool.page_size])) for i in range(len(batch))]
            ok &= bool(backend.batch_set(batch, data))
    return ok


def hit_query(backend: Any, hashes: list[str]) -> int:
    """`_storage_hit_query`: pages found, batch by batch, stopping at the first short batch."""
    hits = 0
    for start in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[start : start + STORAGE_BATCH_SIZE]
        found = backend.batch_exists(batch, None)
        hits += found
        if found < len(batch):
            break
    return hits


def prefetch(backend: Any, pool: HostPool, hashes: list[str], first_page: int, v1: bool) -> int:
    """`_page_transfer` through `_page_get_zero_copy` (v1) or `_generic_page_get`: how many
    leading pages landed in the pool."""
    done = 0
    for start in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[start : start + STORAGE_BATCH_SIZE]
        indices = slots(first_page + start, len(batch), pool.page_size)
        if v1:
            results = backend.batch_get_v1(batch, indices, None)
            got = next((i for i, r in enumerate(results) if not r), len(batch))
        else:
            dummies = [pool.get_dummy_flat_data_page() for _ in batch]
            data = backend.batch_get(batch, dummies)
            got = 0
            for i, page in enumerate(data):
                if page is None:
                    break
                pool.set_from_flat_data_page(int(indices[i * pool.page_size]), page)
                got += 1
        done += got
        if got < len(batch):
            break
    return done


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the plugin called each KVClient probe."""
    counts = {"lookup": 0, "exists_batch": 0}
    for name in counts:
        original: Callable[..., Any] = getattr(kv_sync.KVClient, name)

        def counted(self: Any, *args: Any, _o: Any = original, _n: str = name, **kw: Any) -> Any:
            counts[_n] += 1
            return _o(self, *args, **kw)

        monkeypatch.setattr(kv_sync.KVClient, name, counted)
    return counts


async def close(*backends: Any) -> None:
    """Close backends from a thread of their own, as SGLang's detach does."""
    for backend in backends:
        await asyncio.to_thread(backend.close)


def _settings(nodes: list[harness.Running], **more: Any) -> dict[str, Any]:
    return {"nodes": [n.address for n in nodes], "timeout_s": 1.0, "transports": ["tcp"], **more}


CASES = [
    pytest.param("page_first", False, True, id="mha-page_first-zero_copy"),
    pytest.param("layer_first", False, True, id="mha-layer_first-zero_copy"),
    pytest.param("page_first", True, True, id="mla-page_first-zero_copy"),
    pytest.param("page_first", False, False, id="mha-page_first-generic"),
    pytest.param("layer_first", False, False, id="mha-layer_first-generic"),
]


@pytest.mark.parametrize(("layout", "mla", "v1"), CASES)
async def test_pages_round_trip_byte_exact_between_engines(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    layout: str,
    mla: bool,
    v1: bool,
) -> None:
    pages = 12
    hashes = page_hashes(pages)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        settings = _settings(nodes, interface_v1=int(v1))
        writer_pool = HostPool(layout=layout, mla=mla, seed=1)
        writer = make_backend(writer_pool, settings)
        reader_pool = HostPool(layout=layout, mla=mla, seed=None)
        reader = make_backend(reader_pool, settings)
        try:
            assert await asyncio.to_thread(hit_query, reader, hashes) == 0
            assert await asyncio.to_thread(backup, writer, writer_pool, hashes, 3, v1)
            assert await asyncio.to_thread(hit_query, reader, hashes) == pages
            # Into other slots of a zeroed pool: what the reader holds is what the writer had.
            got = await asyncio.to_thread(prefetch, reader, reader_pool, hashes, 40, v1)
            assert got == pages
            for p in range(pages):
                assert reader_pool.page_digest(40 + p) == writer_pool.page_digest(3 + p)
            assert reader_pool.page_digest(39) == HostPool(
                layout=layout, mla=mla, seed=None
            ).page_digest(0)
            # Backing up again stores nothing new and still succeeds (put-if-absent).
            assert await asyncio.to_thread(backup, writer, writer_pool, hashes, 3, v1)
        finally:
            await close(writer, reader)


@pytest.mark.parametrize(("mla", "probe"), [(False, "exists_batch"), (True, "lookup")])
async def test_batch_exists_is_one_probe_and_stops_at_the_first_missing_page(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    calls: dict[str, int],
    mla: bool,
    probe: str,
) -> None:
    hashes = page_hashes(10)
    async with kvcache_nodes(3, etcd, etcd_prefix, store, tmp_path) as nodes:
        pool = HostPool(layout="page_first", mla=mla)
        backend = make_backend(pool, _settings(nodes, interface_v1=1))
        try:
            assert await asyncio.to_thread(backup, backend, pool, hashes[:6], 0, True)
            assert await asyncio.to_thread(backup, backend, pool, hashes[7:], 7, True)
            before = dict(calls)
            assert await asyncio.to_thread(backend.batch_exists, hashes, None) == 6
            assert await asyncio.to_thread(backend.batch_exists, hashes[7:], None) == 3
            # One probe per batch_exists: every owner node asked once, concurrently (MHA pages
            # are K and V blocks, so the probe is exists_batch; an MLA page is one block).
            assert calls[probe] - before[probe] == 2
            assert sum(calls.values()) - sum(before.values()) == 2
            assert await asyncio.to_thread(backend.exists, hashes[6]) is False
            assert await asyncio.to_thread(backend.exists, hashes[5]) is True
        finally:
            await close(backend)


async def test_mla_pages_are_shared_across_tp_ranks_and_tp_sizes(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    hashes = page_hashes(8, seed=3)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        settings = _settings(nodes, interface_v1=1)
        writer_pool = HostPool(layout="page_first", mla=True, seed=5)
        writer = make_backend(writer_pool, settings, tp_rank=0, tp_size=2)
        readers = [
            (make_backend(pool, settings, tp_rank=r, tp_size=n), pool)
            for r, n in ((1, 2), (3, 4), (0, 1))
            for pool in [HostPool(layout="page_first", mla=True, seed=None)]
        ]
        try:
            assert await asyncio.to_thread(backup, writer, writer_pool, hashes, 0, True)
            for reader, pool in readers:
                assert await asyncio.to_thread(hit_query, reader, hashes) == 8
                assert await asyncio.to_thread(prefetch, reader, pool, hashes, 0, True) == 8
                for p in range(8):
                    assert pool.page_digest(p) == writer_pool.page_digest(p)
        finally:
            await close(writer, *(r for r, _ in readers))


async def test_mha_tp_ranks_keep_their_own_head_slices(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    hashes = page_hashes(8, seed=4)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        settings = _settings(nodes, interface_v1=1)
        pools = [HostPool(layout="page_first", seed=10 + r) for r in range(2)]
        ranks = [make_backend(pools[r], settings, tp_rank=r, tp_size=2) for r in range(2)]
        other_size = make_backend(HostPool(layout="page_first"), settings, tp_rank=0, tp_size=4)
        try:
            assert await asyncio.to_thread(backup, ranks[0], pools[0], hashes, 0, True)
            # Rank 1 holds other heads: rank 0's bytes are not its pages; nor are they a TP4
            # rank's (a different head slice).
            assert await asyncio.to_thread(hit_query, ranks[1], hashes) == 0
            assert await asyncio.to_thread(hit_query, other_size, hashes) == 0
            assert await asyncio.to_thread(backup, ranks[1], pools[1], hashes, 0, True)
            restored = HostPool(layout="page_first", seed=None)
            again = make_backend(restored, settings, tp_rank=1, tp_size=2)
            assert await asyncio.to_thread(prefetch, again, restored, hashes, 0, True) == 8
            assert [restored.page_digest(p) for p in range(8)] == [
                pools[1].page_digest(p) for p in range(8)
            ]
            await close(again)
        finally:
            await close(*ranks, other_size)


async def test_head_groups_on_the_tp_lcm_grid_are_shared_across_tp_sizes(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """TP2 with tp_lcm_size 4 (SGLang splits each page into head groups) writes; the TP4
    ranks read their own group, byte-exact, under the same keys."""
    hashes = page_hashes(6, seed=6)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        settings = _settings(nodes, interface_v1=1)
        tp2 = HostPool(layout="page_head", head_num=4, seed=7)  # 8 KV heads over TP2
        writer = make_backend(
            tp2, settings, tp_rank=0, tp_size=2, tp_lcm_size=4, should_split_heads=True
        )
        quarter = [HostPool(layout="page_head", head_num=2, seed=None) for _ in range(2)]
        readers = [
            make_backend(quarter[r], settings, tp_rank=r, tp_size=4, tp_lcm_size=4)
            for r in range(2)
        ]
        try:
            assert await asyncio.to_thread(backup, writer, tp2, hashes, 0, True)
            for r, reader in enumerate(readers):
                assert await asyncio.to_thread(prefetch, reader, quarter[r], hashes, 0, True) == 6
                # TP4 rank r holds KV heads 2r..2r+1: heads 2r..2r+1 of TP2 rank 0's page.
                for p in range(6):
                    mine = quarter[r].kv_buffer[:, p]
                    theirs = tp2.kv_buffer[:, p, 2 * r : 2 * r + 2]
                    assert mine.tobytes() == theirs.tobytes()
        finally:
            await close(writer, *readers)


async def test_a_dead_node_turns_its_pages_into_misses_not_errors(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    hashes = page_hashes(24, seed=8)
    fresh = page_hashes(24, seed=9)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        settings = _settings(nodes, interface_v1=1)
        pool = HostPool(layout="page_first", seed=11)
        backend = make_backend(pool, settings)
        reader_pool = HostPool(layout="page_first", seed=None)
        reader = make_backend(reader_pool, settings)
        try:
            assert await asyncio.to_thread(backup, backend, pool, hashes, 0, True)
            await stop_node(nodes[1])
            started = time.monotonic()
            flags = await asyncio.to_thread(reader.batch_get_v1, hashes, slots(0, 24), None)
            hits = await asyncio.to_thread(reader.batch_exists, hashes, None)
            stored = await asyncio.to_thread(backend.batch_set_v1, fresh, slots(0, 24), None)
            elapsed = time.monotonic() - started
            # Pages on the live node still come back whole; the dead node's are misses.
            assert 0 < sum(flags) < 24, flags
            assert hits == flags.index(False)
            for p, ok in enumerate(flags):
                if ok:
                    assert reader_pool.page_digest(p) == pool.page_digest(p)
            # New pages all land: the stopped node left the map (its lease is revoked as it
            # drains), and the SDK re-sends the keys it refused to the node that now owns them.
            assert all(stored), stored
            assert elapsed < 5.0  # one deadline (timeout_s 1.0) per call, not one per page
        finally:
            await close(backend, reader)


async def test_an_unreachable_cluster_is_all_misses_from_the_start(tmp_path: Path) -> None:
    pool = HostPool(layout="page_first")
    dead = {"nodes": ["127.0.0.1:9"], "timeout_s": 0.5, "interface_v1": 1, "retry_s": 60}
    backend = make_backend(pool, dead)
    hashes = page_hashes(4)
    try:
        assert await asyncio.to_thread(backend.batch_exists, hashes, None) == 0
        assert (
            await asyncio.to_thread(backend.batch_get_v1, hashes, slots(0, 4), None) == [False] * 4
        )
        assert (
            await asyncio.to_thread(backend.batch_set_v1, hashes, slots(0, 4), None) == [False] * 4
        )
        assert (
            await asyncio.to_thread(backend.get, hashes[0], pool.get_dummy_flat_data_page()) is None
        )
        assert await asyncio.to_thread(backend.set, hashes[0], pool.get_data_page(0)) is False
    finally:
        await close(backend)


async def test_tenants_and_cache_salts_never_share_pages(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    hashes = page_hashes(5, seed=12)
    async with kvcache_nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        base = _settings(nodes, interface_v1=1)
        pool = HostPool(layout="page_first", seed=13)
        owner = make_backend(pool, {**base, "tenant": "team-a", "cache_salt": "s1"})
        others = [
            make_backend(HostPool(layout="page_first", seed=None), {**base, **who})
            for who in (
                {"tenant": "team-b", "cache_salt": "s1"},
                {"tenant": "team-a", "cache_salt": "s2"},
                {"tenant": "team-a"},
            )
        ]
        other_model = make_backend(
            HostPool(layout="page_first", seed=None),
            {**base, "tenant": "team-a", "cache_salt": "s1"},
            model_name="another/model",
        )
        same_pool = HostPool(layout="page_first", seed=None)
        same = make_backend(same_pool, {**base, "tenant": "team-a", "cache_salt": "s1"})
        try:
            assert await asyncio.to_thread(backup, owner, pool, hashes, 0, True)
            for other in [*others, other_model]:
                assert await asyncio.to_thread(hit_query, other, hashes) == 0
                assert (
                    await asyncio.to_thread(other.batch_get_v1, hashes, slots(0, 5), None)
                    == [False] * 5
                )
            assert await asyncio.to_thread(prefetch, same, same_pool, hashes, 0, True) == 5
            assert [same_pool.page_digest(p) for p in range(5)] == [
                pool.page_digest(p) for p in range(5)
            ]
        finally:
            await close(owner, *others, other_model, same)


# Credentials: tenant users with an access key and a secret in the extra config.


async def test_a_tenant_user_reaches_only_its_own_tenants_pages(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hashes = page_hashes(6, seed=21)
    async with secure_cluster(2, etcd, etcd_prefix, store, tmp_path) as c:
        alice, bob = await c.user("team-a"), await c.user("team-b")
        as_alice = {**c.credentials(alice), "interface_v1": 1, "timeout_s": 2.0}
        pool = HostPool(layout="page_first", seed=22)
        writer = make_backend(pool, as_alice)
        reader_pool = HostPool(layout="page_first", seed=None)
        reader = make_backend(reader_pool, as_alice)
        service = {"metadata": c.metadata.address, "interface_v1": 1, "timeout_s": 2.0}
        others = {
            "bob (team-b)": (make_backend(HostPool(layout="page_first", seed=None),
                                          {**c.credentials(bob), "interface_v1": 1}), 0),
            "alice naming team-b": (make_backend(HostPool(layout="page_first", seed=None),
                                                 {**as_alice, "tenant": "team-b"}), 0),
            "operator, default tenant": (make_backend(HostPool(layout="page_first"), service), 0),
            "operator acting for team-a": (
                make_backend(HostPool(layout="page_first"), {**service, "tenant": "team-a"}), 6
            ),
        }  # fmt: skip
        try:
            assert await asyncio.to_thread(backup, writer, pool, hashes, 0, True)
            assert await asyncio.to_thread(prefetch, reader, reader_pool, hashes, 10, True) == 6
            for p in range(6):
                assert reader_pool.page_digest(10 + p) == pool.page_digest(p)
            for name, (backend, expected) in others.items():
                assert await asyncio.to_thread(hit_query, backend, hashes) == expected, name
            impostor = others["alice naming team-b"][0]
            flags = await asyncio.to_thread(impostor.batch_set_v1, hashes, slots(0, 6), None)
            assert flags == [False] * 6
        finally:
            await close(writer, reader, *(b for b, _ in others.values()))
    assert alice.secret.reveal() not in caplog.text
    assert bob.secret.reveal() not in caplog.text
    assert alice.secret.reveal() not in repr(writer.settings)
    assert any("as user " + alice.access_key in r.getMessage() for r in caplog.records)


async def test_a_wrong_secret_is_all_misses_not_errors(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-of-this-user"
    hashes = page_hashes(4, seed=24)
    async with secure_cluster(1, etcd, etcd_prefix, store, tmp_path) as c:
        user = await c.user("team-a")
        settings = {**c.credentials(user, secret=wrong), "interface_v1": 1, "retry_s": 60}
        pool = HostPool(layout="page_first", seed=25)
        backend = make_backend(pool, settings)
        try:
            assert (
                await asyncio.to_thread(backend.batch_set_v1, hashes, slots(0, 4), None)
                == [False] * 4
            )
            assert await asyncio.to_thread(backend.batch_exists, hashes, None) == 0
            assert (
                await asyncio.to_thread(backend.batch_get_v1, hashes, slots(0, 4), None)
                == [False] * 4
            )
        finally:
            await close(backend)
    connects = [r for r in caplog.records if "connect failed" in r.getMessage()]
    assert len(connects) == 1
    assert "Unauthenticated" in connects[0].getMessage()
    assert wrong not in caplog.text
    assert user.secret.reveal() not in caplog.text
