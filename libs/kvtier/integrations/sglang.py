"""SGLang HiCache L3 storage on kvtier: a `HiCacheStorage` for `--hicache-storage-backend dynamic`.

```bash
python -m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct \\
  --enable-hierarchical-cache --hicache-mem-layout page_first \\
  --hicache-storage-backend dynamic \\
  --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
    "module_path": "kvtier.integrations.sglang", "class_name": "KVTierHiCacheStorage",
    "interface_v1": 1, "metadata": "10.0.0.5:7443", "ca_file": "/etc/kvtier/ca.crt",
    "access_key": "AKTEAMA", "secret_key_file": "/etc/kvtier/team-a.secret"}'
```

SGLang's `StorageBackendFactory` imports this module, checks that `KVTierHiCacheStorage` is a
`HiCacheStorage` subclass and builds it with `(storage_config, kwargs)`; the class is made on
first access (module `__getattr__`), so importing this module imports neither SGLang nor torch.
The other keys of the extra config are `kvtier.integrations.keys.TierSettings` fields
(`metadata` or `nodes`, `tenant`, `cache_salt`, `namespace`, `timeout_s`, `replicas`,
`transports`, `ttl_s`, `retry_s`, `verify_checksums`, and the credentials `ca_file`,
`access_key`, `secret_key` / `secret_key_file`, `cert_file` / `key_file`, `cluster_file`,
`token_address`, `insecure`, which fall back to the `KVTIER_*` environment variables);
`interface_v1: 1` makes SGLang use the zero-copy calls.

**Names.** Namespace: the served model + `cache_salt` (`keys.TierSettings.namespace_for`).
SGLang hands the backend chained SHA-256 page hashes (a request's own cache salt is already
mixed into the chain's seed); the backend adds what makes one rank's bytes differ from
another's, and nothing more:
- MLA-style pools (`is_mla_model`: KV replicated on every attention-TP rank): no TP rank at
  all, so every rank, and deployments of any TP size, share one block per page (SGLang lets
  only the storage-writer rank back pages up);
- MHA pools hold a slice of the heads per TP rank: `tp<r>of<n>` stays, except on the
  zero-copy path with `tp_lcm_size` set and K and V per page (`page_first`, `page_head`):
  there each block is the K or V of one head group on the `tp_lcm_size` grid
  (`h<g>of<lcm>.k`), which a TP2 rank (split by SGLang into groups, `page_head`) and the
  TP4 ranks write and read alike;
- pipeline, context and decode-context parallel ranks (`pp`, `cp`, `dcp`) hold disjoint
  layers or tokens: their rank stays;
- the host pool's layout and dtype are part of every key: `page_first` and
  `page_first_direct` order a page's bytes differently, so they must never read each other.

**Page layout.** The zero-copy calls (`batch_get_v1` / `batch_set_v1`) move each buffer the
host pool reports for a page (`get_page_buffer_meta`: K and V per page for MHA page-first,
K and V per layer for layer-first, one buffer for MLA page-first) as its own kvtier block,
straight between the pool's memory and the kvcache node (no copy into a staging buffer). The
generic calls (`batch_get` / `batch_set`) store the flat page SGLang hands over as one block.
A page counts as present when all its blocks are; `batch_exists` asks every owner node once.

**Engine hashes.** Every put carries SGLang's own page hash (`page_hashes`: the page key as
bytes, its parent the page before it or the last of `extra_info.prefix_keys`), so the nodes' KV
events name pages as SGLang's storage layer does (docs/routing.md).

**Failures are misses.** An unreachable or slow cluster, a node that dies, quota or space
refusals, a refused credential: gets and probes report misses, sets report failure, and SGLang
recomputes. Only a configuration error (no address, no model name, a layout without zero-copy
metadata, an unusable credential setting) raises.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from kvtier import kv, kv_sync
from kvtier.integrations import keys

log = logging.getLogger(__name__)

CLASS_NAME = "KVTierHiCacheStorage"
_STORED = frozenset({kv.PutStatus.STORED, kv.PutStatus.EXISTS, kv.PutStatus.BUSY})
_LOG_EVERY_S = 30.0

T = TypeVar("T")


class HiCacheKVTier:
    """The storage logic; `KVTierHiCacheStorage` is this plus SGLang's `HiCacheStorage` base.

    Built by SGLang as `(storage_config, kwargs)`. `client_factory` (tests) replaces
    `kvtier.KVClient.connect`.
    """

    mem_pool_host: Any

    def __init__(
        self,
        storage_config: Any,
        kwargs: Any = None,
        *,
        client_factory: Callable[..., kv_sync.KVClient] | None = None,
    ) -> None:
        extra = dict(storage_config.extra_config or {})
        self.settings = keys.TierSettings.from_mapping(extra)
        model = storage_config.model_name or ""
        self.namespace = self.settings.namespace_for(model.replace("/", "-"))
        self._connect_kwargs = self.settings.client_kwargs(model.replace("/", "-"))
        self.zero_copy = bool(int(extra.get("interface_v1", 0) or 0))
        self._config = storage_config
        self._scope = _rank_scope(storage_config)  # pp / cp / dcp coordinates
        self._tp = "" if storage_config.is_mla_model else f"tp{_tp(storage_config)}"
        self._block_tp = self._tp  # the TP part of zero-copy block keys (see register)
        self._factory = client_factory or kv_sync.KVClient.connect
        self._client: kv_sync.KVClient | None = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._logged_at: dict[str, float] = {}
        self._identity = ""  # layout and dtype of the host pool, once registered
        self._components: list[str] = []  # block suffixes of one page (zero-copy)
        self._split_factor = 0
        log.info(
            "kvtier HiCache storage: namespace %s, tenant %s, as %s, scope %s, zero-copy %s",
            self.namespace, self.settings.tenant or "(from the credentials)",
            self.settings.identity(), self._scope or "-", self.zero_copy,
        )  # fmt: skip

    # Host pool.

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Remember the host pool; work out the layout identity and a page's blocks. Raises
        ValueError when zero-copy is on and the pool reports no per-page buffers."""
        self.mem_pool_host = mem_pool_host
        dtype = str(getattr(mem_pool_host, "dtype", "")).removeprefix("torch.")
        self._identity = f"{getattr(mem_pool_host, 'layout', 'flat')}.{dtype}"
        if not self.zero_copy:
            return
        probe = np.arange(int(mem_pool_host.page_size))
        config = self._config
        lcm = int(getattr(config, "tp_lcm_size", None) or 0)
        factor = lcm // int(config.tp_size) if lcm else 0
        if getattr(config, "should_split_heads", False):
            self._split_factor = factor
            ptrs, _ = mem_pool_host.get_split_heads_page_buffer_meta(probe, factor)
        else:
            try:
                ptrs, _ = mem_pool_host.get_page_buffer_meta(probe)
            except (ValueError, NotImplementedError) as exc:
                raise ValueError(f"kvtier zero-copy needs per-page buffers: {exc}") from exc
        if self._tp and lcm and len(ptrs) == 2 * max(factor, 1):
            # K and V of each of this rank's head groups on the tp_lcm_size grid: the same
            # bytes whichever TP size wrote them, so no TP rank in the key.
            first = int(config.tp_rank) * factor
            self._block_tp = ""
            self._components = [f"h{first + j // 2}of{lcm}.{'kv'[j % 2]}" for j in range(len(ptrs))]
        else:
            self._components = [f"c{j}of{len(ptrs)}" for j in range(len(ptrs))]

    # Generic interface: one flat page per key.

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any | None:
        """The page of key read into target_location (a flat page); None for a miss."""
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[Any | None]:
        """Read each key's page into its target (flat pages, allocated from the host pool when
        absent): the target for a hit, None for a miss."""
        targets = list(target_locations or [None] * len(keys))
        for i, target in enumerate(targets):
            if target is None:
                targets[i] = self.mem_pool_host.get_dummy_flat_data_page()
        views = [_byte_view(t) for t in targets]
        sizes = self._get([self._key(k, self._tp, "flat") for k in keys], views)
        return [t if s == v.nbytes else None for t, v, s in zip(targets, views, sizes, strict=True)]

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        """Store one flat page; True when it is (or already was) in kvtier."""
        return self.batch_set([key], [value if value is not None else target_location])

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Store flat pages (put-if-absent: pages name their content); True when all are in."""
        pages = values if values is not None else target_locations
        views = [_byte_view(p) for p in pages]
        hashes, parents = page_hashes(keys, None, 1)
        block_keys = [self._key(k, self._tp, "flat") for k in keys]
        return all(self._put(block_keys, views, hashes, parents))

    def exists(self, key: str) -> bool:
        """Whether the page of key is in kvtier (all of its blocks)."""
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages of keys are in kvtier: one prefix lookup (each owner node
        asked once, concurrently)."""
        if not keys:
            return 0
        parts = self._components if self.zero_copy else ["flat"]
        tp = self._block_tp if self.zero_copy else self._tp
        probes = [self._key(k, tp, part) for k in keys for part in parts]
        if len(parts) == 1:
            return self._call("lookup", lambda c: c.lookup(probes), 0)
        present = self._call("exists", lambda c: c.exists_batch(probes), [False] * len(probes))
        width = len(parts)
        return next(
            (i for i in range(len(keys)) if not all(present[i * width : (i + 1) * width])),
            len(keys),
        )

    # Zero-copy interface: the host pool's own buffers.

    def batch_get_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        """Read pages straight into the host pool at host_indices: a flag per page."""
        block_keys, views = self._page_blocks(keys, host_indices)
        sizes = self._get(block_keys, views)
        hits = [s == v.nbytes for s, v in zip(sizes, views, strict=True)]
        return _per_page(hits, len(keys))

    def batch_set_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        """Store pages straight from the host pool at host_indices: a flag per page."""
        block_keys, views = self._page_blocks(keys, host_indices)
        hashes, parents = page_hashes(keys, extra_info, len(self._components))
        return _per_page(self._put(block_keys, views, hashes, parents), len(keys))

    def _page_blocks(self, keys: list[str], host_indices: Any) -> tuple[list[bytes], list[Any]]:
        if self._split_factor:
            ptrs, sizes = self.mem_pool_host.get_split_heads_page_buffer_meta(
                host_indices, self._split_factor
            )
        else:
            ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if isinstance(sizes, int):
            sizes = [sizes] * len(ptrs)
        if len(ptrs) != len(keys) * len(self._components):
            raise ValueError(
                f"host pool reported {len(ptrs)} buffers for {len(keys)} pages of "
                f"{len(self._components)} blocks"
            )
        block_keys = [self._key(k, self._block_tp, part) for k in keys for part in self._components]
        views = [_pointer_view(int(p), int(n)) for p, n in zip(ptrs, sizes, strict=True)]
        return block_keys, views

    # Lifetime.

    def clear(self) -> None:
        """Nothing: the namespace is shared with other engines; eviction and TTLs bound it."""
        log.info("kvtier HiCache storage: clear() leaves the shared namespace alone")

    def close(self) -> None:
        """Close the kvtier client; idempotent."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # the engine's boundary: closing never fails the engine
                self._note("close", repr(exc))

    # kvtier calls: every failure is a miss.

    def _key(self, page_hash: str, tp: str, part: str) -> bytes:
        scope = ".".join(p for p in (tp, self._scope) if p)
        return keys.fit_key(f"{page_hash}|{self._identity}|{scope}|{part}".encode())

    def _get(self, block_keys: list[bytes], views: list[Any]) -> list[int | None]:
        return self._call("get", lambda c: c.get_batch(block_keys, views), [None] * len(block_keys))

    def _put(
        self,
        block_keys: list[bytes],
        views: list[Any],
        hashes: list[bytes],
        parents: list[bytes | None],
    ) -> list[bool]:
        ttl_s = self.settings.ttl_s or None
        statuses = self._call(
            "put",
            lambda c: c.put_batch(
                block_keys, views, ttl_s=ttl_s, engine_hashes=hashes, parent_hashes=parents
            ),
            [kv.PutStatus.UNAVAILABLE] * len(block_keys),
        )
        refused = sorted({s.value for s in statuses if s not in _STORED})
        if refused:
            self._note("put", f"refused: {', '.join(refused)}")
        return [s in _STORED for s in statuses]

    def _call(self, op: str, fn: Callable[[kv_sync.KVClient], T], miss: T) -> T:
        client = self._connected()
        if client is None:
            return miss
        try:
            return fn(client)
        except Exception as exc:  # the engine's boundary: a failure is a miss, never a crash
            self._note(op, repr(exc))
            return miss

    def _connected(self) -> kv_sync.KVClient | None:
        with self._lock:
            if self._client is not None or time.monotonic() < self._retry_at:
                return self._client
            try:
                self._client = self._factory(**self._connect_kwargs)
            except Exception as exc:  # unreachable cluster: misses until retry_s has passed
                self._retry_at = time.monotonic() + self.settings.retry_s
                self._note("connect", repr(exc))
            return self._client

    def _note(self, op: str, what: str) -> None:
        """Log a failure, at most once per op every 30 s (a dead cluster must not flood)."""
        now = time.monotonic()
        if now - self._logged_at.get(op, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged_at[op] = now
            log.warning("kvtier HiCache %s failed (served as misses): %s", op, what)


def _rank_scope(config: Any) -> str:
    """The pipeline / context-parallel coordinates that make this rank's bytes of a page its
    own (the TP part is decided per page layout: see `register_mem_pool_host`)."""
    parts = []
    if config.pp_size > 1:
        parts.append(f"pp{config.pp_rank}of{config.pp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp{config.attn_cp_rank}of{config.attn_cp_size}")
    dcp_size = int(getattr(config, "dcp_size", 1) or 1)
    if dcp_size > 1:
        parts.append(f"dcp{config.dcp_rank}of{dcp_size}")
    return ".".join(parts)


def page_hashes(
    page_keys: Sequence[str], extra_info: Any, blocks_per_page: int
) -> tuple[list[bytes], list[bytes | None]]:
    """The engine hashes of a put's blocks (blocks_per_page per page, in order) and their
    parents: SGLang's own page hash (the chained SHA-256 hex digest HiCache names a page by,
    as its 32 bytes; another key as its UTF-8 bytes), the parent being the page before it in
    the batch or, for the first, the last of `extra_info.prefix_keys` when SGLang gives them
    (None: the chain's first page, or a parent SGLang did not say)."""
    hashes = [_hash_bytes(k) for k in page_keys]
    prefix = list(getattr(extra_info, "prefix_keys", None) or [])
    first = _hash_bytes(prefix[-1]) if prefix else None
    parents = [first, *hashes[:-1]] if hashes else []
    width = range(blocks_per_page)
    return [h for h in hashes for _ in width], [p for p in parents for _ in width]


def _hash_bytes(page_key: str) -> bytes:
    try:
        return bytes.fromhex(page_key) or page_key.encode()
    except ValueError:
        return page_key.encode()


def _tp(config: Any) -> str:
    return f"{config.tp_rank}of{config.tp_size}"


def _per_page(flags: Sequence[bool], pages: int) -> list[bool]:
    width = len(flags) // pages if pages else 0
    return [all(flags[i * width : (i + 1) * width]) for i in range(pages)]


def _pointer_view(address: int, nbytes: int) -> memoryview:
    """A writable view of nbytes of the host pool's memory at address (no copy)."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def _byte_view(page: Any) -> memoryview:
    """A flat byte view of a page: numpy or any buffer; torch CPU tensors of any dtype."""
    try:
        return memoryview(page).cast("B")
    except TypeError:
        pass
    torch = importlib.import_module("torch")  # a torch tensor: SGLang's own pages
    flat = page.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def storage_class(base: type) -> type:
    """`HiCacheKVTier` as a subclass of base (SGLang's `HiCacheStorage`, or a stand-in)."""
    return type(CLASS_NAME, (HiCacheKVTier, base), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    """`KVTierHiCacheStorage`, made on first access against the installed SGLang."""
    if name != CLASS_NAME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = importlib.import_module("sglang.srt.mem_cache.hicache_storage").HiCacheStorage
    cls = storage_class(base)
    globals()[CLASS_NAME] = cls
    return cls
