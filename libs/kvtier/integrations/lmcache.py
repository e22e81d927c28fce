"""LMCache remote storage on kvtier: a remote storage plugin (connector adapter) for LMCache 0.5.

```yaml
chunk_size: 256
local_cpu: true
max_local_cpu_size: 5
remote_serde: naive
remote_storage_plugins: ["kvtier"]
extra_config:
  remote_storage_plugin.kvtier.module_path: kvtier.integrations.lmcache
  remote_storage_plugin.kvtier.class_name: KVTierConnectorAdapter
  remote_storage_plugin.kvtier.metadata: "10.0.0.5:7443"   # its client port
  remote_storage_plugin.kvtier.ca_file: /etc/kvtier/ca.crt
  remote_storage_plugin.kvtier.access_key: AKTEAMA
  remote_storage_plugin.kvtier.secret_key_file: /etc/kvtier/team-a.secret   # mode 0600
```

LMCache's `ConnectorManager` imports `module_path` and takes `class_name`: `KVTierConnectorAdapter`
(a `ConnectorAdapter` for plugins named `kvtier` or `kvtier.<instance>`) or `KVTierConnector`
itself (a `RemoteConnector`, which LMCache wraps in its `DynamicConnectorAdapter`; any plugin
name). Both classes are made on first access (module `__getattr__`), so importing this module
imports no LMCache. The other `remote_storage_plugin.<name>.*` keys are
`kvtier.integrations.keys.TierSettings` fields (`metadata` or `nodes`, `tenant`, `cache_salt`,
`namespace`, `timeout_s`, `replicas`, `transports`, `ttl_s`, `retry_s`, `verify_checksums`; the
credentials `ca_file`, `access_key`, `secret_key` / `secret_key_file`, `cert_file` / `key_file`,
`cluster_file`, `token_address`, `insecure`, which fall back to the `KVTIER_*` environment
variables) and `pin_s`: how long a lookup that LMCache asks to pin keeps its hits from eviction
(default 30 s).

**Names.** Namespace: the served model (`LMCacheMetadata.model_name`) + `cache_salt`. A
`CacheEngineKey` (`model@world_size@worker_id@chunk_hash@dtype[@tags]`) loses its model (it is
the namespace) and, for MLA models, `world_size@worker_id` too: MLA KV is the same on every
rank, so every rank and every TP size share one block per chunk. Other models keep them: each
rank holds its own heads.

**Calls.** LMCache runs the connector's coroutines on its own event loop, where the kvtier
client lives (connected on first use). `batched_get`, `batched_put`, `batched_async_contains`
and `batched_get_non_blocking` are one kvtier batch each (every owner node asked once,
concurrently); gets land straight in the `MemoryObj`s LMCache allocates (partial last chunks
are sized by what kvtier returns, so no chunk metadata is stored). A pinning lookup pins its
hits in kvtier until the matching get (or `pin_s`). Puts carry each chunk's `chunk_hash` as its
engine hash (`engine_hashes`), so the nodes' KV events name chunks by LMCache's hash.

**Failures are misses.** An unreachable or slow cluster, a dead node, quota or space refusals,
a refused credential:
lookups count misses, gets return None, puts are dropped (logged, at most every 30 s); LMCache
recomputes. Only a configuration error (no address, no model name) raises.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from kvtier import kv
from kvtier.integrations import keys

log = logging.getLogger(__name__)

PLUGIN_TYPE = "kvtier"
CONNECTOR_NAME = "KVTierConnector"
ADAPTER_NAME = "KVTierConnectorAdapter"
_EXTRA = "remote_storage_plugin.{}.{}"
_STORED = frozenset({kv.PutStatus.STORED, kv.PutStatus.EXISTS, kv.PutStatus.BUSY})
_LOG_EVERY_S = 30.0
_DEFAULT_PIN_S = 30.0

T = TypeVar("T")


class KVTierRemote:
    """The connector logic; `KVTierConnector` is this plus LMCache's `RemoteConnector` base
    (whose `__init__(config, metadata)` sets `meta_shapes`, `meta_dtypes`, `meta_fmt` and
    `full_chunk_size_bytes`, and which provides `reshape_partial_chunk`).

    Built as `(loop=, local_cpu_backend=, config=)` by LMCache's `DynamicConnectorAdapter`,
    or by `KVTierConnectorAdapter` with the plugin name and metadata too. `client_factory`
    (tests) replaces `kvtier.AsyncKVClient.connect`.
    """

    meta_shapes: Any
    meta_dtypes: Any
    meta_fmt: Any
    reshape_partial_chunk: Callable[[Any, int], Any]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: Any,
        config: Any,
        plugin_name: str | None = None,
        metadata: Any = None,
        *,
        client_factory: Callable[..., Awaitable[kv.AsyncKVClient]] | None = None,
    ) -> None:
        metadata = metadata if metadata is not None else local_cpu_backend.metadata
        super().__init__(config, metadata)  # type: ignore[call-arg]  # RemoteConnector
        name = plugin_name or _plugin_name(config)
        extra = dict(config.extra_config or {})
        self.settings = keys.TierSettings.from_mapping(extra, prefix=_EXTRA.format(name, ""))
        self.pin_s = float(extra.get(_EXTRA.format(name, "pin_s")) or _DEFAULT_PIN_S)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self._model = str(metadata.model_name)
        self._mla = bool(getattr(metadata, "use_mla", False))
        self._connect_kwargs = self.settings.client_kwargs(self._model.replace("/", "-"))
        self.namespace = self._connect_kwargs["namespace"]
        self._factory = client_factory or kv.AsyncKVClient.connect
        self._client: kv.AsyncKVClient | None = None
        self._connecting: asyncio.Lock | None = None
        self._retry_at = 0.0
        self._logged_at: dict[str, float] = {}
        self._pinned: dict[str, list[bytes]] = {}
        log.info(
            "kvtier LMCache connector %s: namespace %s, tenant %s, as %s, MLA keys shared: %s",
            name, self.namespace, self.settings.tenant or "(from the credentials)",
            self.settings.identity(), self._mla,
        )  # fmt: skip

    # Probes.

    async def exists(self, key: Any) -> bool:
        """Whether kvtier holds key's chunk (unreachable: False)."""
        block = self._key(key)
        present = await self._call("exists", lambda c: c.exists_batch([block]), [False])
        return present[0]

    def exists_sync(self, key: Any) -> bool:
        """`exists` from a thread other than LMCache's loop."""
        return self._sync(self.exists(key), False)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[Any]) -> int:
        """How many leading keys are in kvtier (from a thread other than LMCache's loop)."""
        return self._sync(self._lookup(keys), 0)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: list[Any], pin: bool = False
    ) -> int:
        """How many leading keys are in kvtier: one lookup. With pin, the hits are pinned
        against eviction until `batched_get_non_blocking(lookup_id, ...)` or `pin_s`."""
        found = await self._lookup(keys)
        if pin and found:
            blocks = [self._key(k) for k in keys[:found]]
            await self._call("pin", lambda c: c.pin(blocks, self.pin_s), 0)
            self._pinned[lookup_id] = blocks
        return found

    async def _lookup(self, keys: Sequence[Any]) -> int:
        if not keys:
            return 0
        blocks = [self._key(k) for k in keys]
        return await self._call("lookup", lambda c: c.lookup(blocks), 0)

    # Gets.

    async def get(self, key: Any) -> Any | None:
        """key's chunk in a MemoryObj from LMCache's allocator; None for a miss."""
        return (await self.batched_get([key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[Any]) -> list[Any | None]:
        """Chunks of keys, read straight into MemoryObjs: one kvtier batch. None per miss."""
        objs = [self._allocate() for _ in keys]
        wanted = [i for i, obj in enumerate(objs) if obj is not None]
        blocks = [self._key(keys[i]) for i in wanted]
        views = [objs[i].byte_array for i in wanted]  # type: ignore[union-attr]
        missed: list[int | None] = [None] * len(blocks)
        sizes = await self._call("get", lambda c: c.get_batch(blocks, views), missed)
        results: list[Any | None] = [None] * len(keys)
        for i, size in zip(wanted, sizes, strict=True):
            results[i] = self._filled(objs[i], size)
        return results

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[Any]) -> list[Any]:
        """The leading chunks of keys that kvtier holds (what LMCache's prefetch wants); the
        lookup's pins end here."""
        got = await self.batched_get(keys)
        blocks = self._pinned.pop(lookup_id, None)
        if blocks:
            await self._call("unpin", lambda c: c.unpin(blocks), 0)
        prefix: list[Any] = []
        broken = False
        for obj in got:
            if obj is None:
                broken = True
            elif broken:  # after a miss: LMCache only uses the leading run
                obj.ref_count_down()
            else:
                prefix.append(obj)
        return prefix

    def _allocate(self) -> Any | None:
        try:
            return self.local_cpu_backend.allocate(
                self.meta_shapes, self.meta_dtypes, self.meta_fmt
            )
        except Exception as exc:  # no room in LMCache's buffer: a miss
            self._note("allocate", repr(exc))
            return None

    def _filled(self, obj: Any, size: int | None) -> Any | None:
        """obj holding size bytes read (a partial last chunk reshaped), or None (released)."""
        try:
            if size is not None:
                full = memoryview(obj.byte_array).nbytes
                return obj if size == full else self.reshape_partial_chunk(obj, size)
        except ValueError as exc:  # not a whole number of tokens: a foreign block
            self._note("get", repr(exc))
        obj.ref_count_down()
        return None

    # Puts.

    async def put(self, key: Any, memory_obj: Any) -> None:
        """Store one chunk (put-if-absent: chunks name their content)."""
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[Any], memory_objs: list[Any]) -> None:
        """Store chunks straight from their MemoryObjs: one kvtier batch. Refusals (quota,
        space, an unreachable node) drop the chunk: LMCache recomputes it if asked again."""
        blocks = [self._key(k) for k in keys]
        views = [obj.byte_array for obj in memory_objs]
        ttl_s = self.settings.ttl_s or None
        hashes = engine_hashes(keys)
        statuses = await self._call(
            "put",
            lambda c: c.put_batch(blocks, views, ttl_s=ttl_s, engine_hashes=hashes),
            [kv.PutStatus.UNAVAILABLE] * len(blocks),
        )
        refused = sorted({s.value for s in statuses if s not in _STORED})
        if refused:
            self._note("put", f"refused: {', '.join(refused)}")

    # The rest of LMCache's connector interface.

    def remove_sync(self, key: Any) -> bool:
        """Delete key's chunk (from a thread other than LMCache's loop)."""
        block = self._key(key)
        return self._sync(self._call("delete", lambda c: c.delete([block]), 0), 0) > 0

    async def list(self) -> list[str]:
        """The namespace's keys held in DRAM (first 10,000), as strings."""
        return await self._call("list", _key_strings, [])

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when a kvcache node answers, else 1."""
        none: dict[str, Any] = {}
        stats = await self._call("ping", lambda c: c.stats(), none)
        return 0 if stats else 1

    async def close(self) -> None:
        """Close the kvtier client; idempotent."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # the engine's boundary: closing never fails LMCache
                self._note("close", repr(exc))

    # kvtier calls: every failure is a miss.

    def _key(self, key: Any) -> bytes:
        model, *rest = key.to_string().split("@")
        if self._mla:
            rest = rest[2:]  # world_size@worker_id: the same chunk on every rank
        parts = rest if model == self._model else [model, *rest]
        return keys.fit_key("@".join(parts).encode())

    async def _call(self, op: str, fn: Callable[[kv.AsyncKVClient], Awaitable[T]], miss: T) -> T:
        client = await self._connected()
        if client is None:
            return miss
        try:
            return await fn(client)
        except Exception as exc:  # the engine's boundary: a failure is a miss, never a crash
            self._note(op, repr(exc))
            return miss

    async def _connected(self) -> kv.AsyncKVClient | None:
        if self._client is not None or time.monotonic() < self._retry_at:
            return self._client
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None and time.monotonic() >= self._retry_at:
                try:
                    self._client = await self._factory(**self._connect_kwargs)
                except Exception as exc:  # unreachable cluster: misses until retry_s passed
                    self._retry_at = time.monotonic() + self.settings.retry_s
                    self._note("connect", repr(exc))
        return self._client

    def _sync(self, coro: Coroutine[Any, Any, T], miss: T) -> T:
        """Run coro on LMCache's loop from another thread; miss on failure or deadline."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # blocking here would deadlock the loop
            coro.close()
            self._note("sync", "called on LMCache's own event loop")
            return miss
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=self.settings.timeout_s * 4)
        except Exception as exc:
            future.cancel()
            self._note("sync", repr(exc))
            return miss

    def _note(self, op: str, what: str) -> None:
        """Log a failure, at most once per op every 30 s (a dead cluster must not flood)."""
        now = time.monotonic()
        if now - self._logged_at.get(op, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged_at[op] = now
            log.warning("kvtier LMCache %s failed (served as misses): %s", op, what)


def engine_hashes(keys: Sequence[Any]) -> list[bytes] | None:
    """LMCache's own hash of each chunk (`CacheEngineKey.chunk_hash`, an integer) as bytes:
    8 bytes big-endian for a 64-bit hash (signed ones in two's complement), the fewest bytes
    that hold a longer one. None (the events then name the kvtier keys) when a key has none."""
    out = []
    for key in keys:
        value = getattr(key, "chunk_hash", None)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        if -(1 << 63) <= value < (1 << 64):
            out.append(value.to_bytes(8, "big", signed=value < 0))
        else:
            length = (value.bit_length() + (8 if value < 0 else 7)) // 8  # room for a sign
            out.append(value.to_bytes(length, "big", signed=value < 0))
    return out


async def _key_strings(client: kv.AsyncKVClient) -> list[str]:
    entries, _ = await client.list_keys(limit=10_000)
    return [key.decode(errors="replace") for key, _ in entries]


def _plugin_name(config: Any) -> str:
    """The plugin name whose extra config loads this module (LMCache's dynamic adapter does not
    pass it); `kvtier` when none does."""
    extra = config.extra_config or {}
    for name in config.remote_storage_plugins or ():
        if extra.get(_EXTRA.format(name, "module_path")) == __name__:
            return str(name)
    return PLUGIN_TYPE


class KVTierAdapterLogic:
    """The adapter logic; `KVTierConnectorAdapter` is this plus LMCache's `ConnectorAdapter`."""

    def __init__(self) -> None:
        super().__init__(f"{PLUGIN_TYPE}://")  # type: ignore[call-arg]  # ConnectorAdapter

    def can_parse(self, url: str) -> bool:
        """Plugins named `kvtier` or `kvtier.<instance>` (`plugin://kvtier...`)."""
        plugin = url.removeprefix("plugin://")
        return url.startswith("plugin://") and plugin.split(".", 1)[0] == PLUGIN_TYPE

    def create_connector(self, context: Any) -> Any:
        """A `KVTierConnector` for LMCache's connector context."""
        return _made(CONNECTOR_NAME)(
            context.loop,
            context.local_cpu_backend,
            context.config,
            plugin_name=context.plugin_name,
            metadata=context.metadata,
        )


def connector_class(base: type) -> type:
    """`KVTierRemote` as a subclass of base (LMCache's `RemoteConnector`, or a stand-in)."""
    return type(CONNECTOR_NAME, (KVTierRemote, base), {"__module__": __name__})


def adapter_class(base: type) -> type:
    """`KVTierAdapterLogic` as a subclass of base (LMCache's `ConnectorAdapter`, or a stand-in)."""
    return type(ADAPTER_NAME, (KVTierAdapterLogic, base), {"__module__": __name__})


_BASES = {
    CONNECTOR_NAME: ("lmcache.v1.storage_backend.connector.base_connector", "RemoteConnector"),
    ADAPTER_NAME: ("lmcache.v1.storage_backend.connector", "ConnectorAdapter"),
}
_MAKERS = {CONNECTOR_NAME: connector_class, ADAPTER_NAME: adapter_class}


def _made(name: str) -> Any:
    """The class called name, made once (against the installed LMCache unless set already)."""
    cls = globals().get(name)
    if cls is None:
        module, base = _BASES[name]
        cls = _MAKERS[name](getattr(importlib.import_module(module), base))
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> Any:
    """`KVTierConnector` and `KVTierConnectorAdapter`, made on first access against the
    installed LMCache."""
    if name not in _BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _made(name)
