"""LMCache's own RemoteBackend driving the kvtier plugin, run by test_lmcache_engine.py with the
Python of LMCache's virtualenv (LMCache 0.5.6 pins protobuf < 7 and numpy <= 2.2.6, so it cannot
share the project's). kvtier's SDK is put on the path after LMCache's packages: LMCache's numpy,
torch and prometheus_client win, kvtier's protobuf and grpc fill in what LMCache lacks.

    python lmcache_driver.py LIBS_DIR EXTRA_SITE NODES [USERS_JSON]

NODES: comma-separated kvcache node addresses (real nodes, over TCP), reached as the operator
(its certificate from KVTIER_CERT_FILE / KVTIER_KEY_FILE, inherited from the test). USERS_JSON:
the credential settings of tenant users (`alice`, `bob`, and `wrong`: alice's access key with a
wrong secret), as an operator writes them into LMCache's extra_config; the driver then also runs
as those users. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import sys
import threading
import time
from typing import Any


def _paths() -> None:
    libs, extra_site = sys.argv[1:3]
    sys.path.insert(0, libs)
    sys.path.append(extra_site)


_paths()

# Imported by name: these live in LMCache's virtualenv only (mypy never sees them).
torch: Any = importlib.import_module("torch")
CacheEngineKey: Any = importlib.import_module("lmcache.utils").CacheEngineKey
load_engine_config_with_overrides: Any = importlib.import_module(
    "lmcache.v1.config"
).load_engine_config_with_overrides
LMCacheMetadata: Any = importlib.import_module("lmcache.v1.metadata").LMCacheMetadata
RemoteConnector: Any = importlib.import_module(
    "lmcache.v1.storage_backend.connector.base_connector"
).RemoteConnector
LocalCPUBackend: Any = importlib.import_module(
    "lmcache.v1.storage_backend.local_cpu_backend"
).LocalCPUBackend
RemoteBackend: Any = importlib.import_module(
    "lmcache.v1.storage_backend.remote_backend"
).RemoteBackend

MODEL = "meta-llama/Llama-x"
LAYERS, CHUNK, HEADS, DIM = 4, 256, 2, 64  # 256 KiB chunks of bf16


def backend(nodes: str, loop: asyncio.AbstractEventLoop, *, worker: int = 0, world: int = 1,
            mla: bool = False, class_name: str = "KVTierConnectorAdapter", plugin: str = "kvtier",
            **settings: Any) -> tuple[RemoteBackend, LocalCPUBackend]:  # fmt: skip
    """A RemoteBackend as LMCache's storage manager builds it for `remote_storage_plugins`."""
    prefix = f"remote_storage_plugin.{plugin}."
    extra = {
        prefix + "module_path": "kvtier.integrations.lmcache",
        prefix + "class_name": class_name,
        prefix + "timeout_s": 1.0,
        prefix + "transports": "tcp",
        **{prefix + k: v for k, v in settings.items()},
    }
    if nodes:  # else the settings name the metadata service
        extra[prefix + "nodes"] = nodes
    cfg = load_engine_config_with_overrides(
        overrides={
            "chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": 0.25,
            "remote_serde": "naive", "remote_storage_plugins": [plugin], "extra_config": extra,
        }
    )  # fmt: skip
    heads = 1 if mla else HEADS
    md = LMCacheMetadata(
        model_name=MODEL, world_size=world, local_world_size=world, worker_id=worker,
        local_worker_id=worker, kv_dtype=torch.bfloat16,
        kv_shape=(LAYERS, 1 if mla else 2, CHUNK, heads, DIM), use_mla=mla,
    )  # fmt: skip
    cpu = LocalCPUBackend(cfg, md)
    return RemoteBackend(cfg, md, loop, cpu, "cpu", plugin_name=plugin), cpu


def key(i: int, *, worker: int = 0, world: int = 1) -> CacheEngineKey:
    chunk_hash = int.from_bytes(hashlib.sha256(f"chunk-{i}".encode()).digest()[:8], "little")
    return CacheEngineKey(MODEL, world, worker, chunk_hash, torch.bfloat16)


def chunk(cpu: LocalCPUBackend, seed: int, tokens: int = CHUNK) -> Any:
    """A MemoryObj from LMCache's allocator holding random bytes (tokens < CHUNK: a partial
    last chunk, as LMCache stores with save_unfull_chunk)."""
    assert cpu.metadata is not None
    obj = cpu.allocate(cpu.metadata.get_shapes(tokens), [torch.bfloat16])
    data = torch.randint(0, 256, (obj.get_size(),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    memoryview(obj.byte_array).cast("B")[:] = data.numpy().tobytes()
    return obj


def digest(obj: Any) -> str:
    return hashlib.sha256(bytes(obj.byte_array)).hexdigest()


def settle(rb: RemoteBackend, timeout_s: float = 10) -> None:
    """Wait for submitted puts (LMCache's put tasks) to finish."""
    deadline = time.monotonic() + timeout_s
    while rb.put_tasks and time.monotonic() < deadline:
        time.sleep(0.01)


def run(nodes: str, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    rb, cpu = backend(nodes, loop, tenant="team-a", cache_salt="s1")
    connector = rb.connection.getWrappedConnector()
    seen["connector"] = f"{type(connector).__module__}.{type(connector).__name__}"
    seen["is_remote_connector"] = isinstance(connector, RemoteConnector)
    keys = [key(i) for i in range(6)]
    objs = [chunk(cpu, i) for i in range(5)] + [chunk(cpu, 5, tokens=100)]  # last: partial
    digests = [digest(o) for o in objs]
    rb.batched_submit_put_task(keys[:3], objs[:3])
    for k, o in zip(keys[3:], objs[3:], strict=True):
        rb.submit_put_task(k, o)
    settle(rb)
    seen["contains"] = [rb.contains(k) for k in keys] + [rb.contains(key(99))]
    seen["batched_contains"] = rb.batched_contains([*keys[:4], key(99), keys[4]])
    lookup = asyncio.run_coroutine_threadsafe(
        rb.batched_async_contains("lookup-1", [*keys, key(98)], pin=True), loop
    ).result(10)
    seen["async_contains"] = lookup
    got = rb.batched_get_blocking(keys)
    seen["batched_get_exact"] = [
        g is not None and digest(g) == d for g, d in zip(got, digests, strict=True)
    ]
    seen["partial_tokens"] = int(got[5].get_shape()[2]) if got[5] is not None else None
    one = rb.get_blocking(keys[1])
    seen["get_exact"] = one is not None and digest(one) == digests[1]
    prefetched = asyncio.run_coroutine_threadsafe(
        rb.batched_get_non_blocking("lookup-1", [keys[0], keys[1], key(97), keys[2]]), loop
    ).result(10)
    seen["non_blocking"] = [digest(o) == digests[i] for i, o in enumerate(prefetched)]
    # Other tenants, salts and TP ranks see nothing; the same ones see everything.
    for name, kw in {
        "tenant_b": {"tenant": "team-b", "cache_salt": "s1"},
        "salt_s2": {"tenant": "team-a", "cache_salt": "s2"},
        "same": {"tenant": "team-a", "cache_salt": "s1", "class_name": "KVTierConnector",
                 "plugin": "mycache"},
    }.items():  # fmt: skip
        other, _ = backend(nodes, loop, **kw)  # type: ignore[arg-type]
        seen[name] = other.batched_contains(keys)
        other.close()
    mha1, _ = backend(nodes, loop, worker=1, world=2, tenant="team-a", cache_salt="s1")
    seen["mha_rank1_sees_rank0"] = mha1.batched_contains(
        [key(i, worker=0, world=2) for i in range(1)]
    )
    mha1.close()
    # MLA: what TP rank 0 of 2 wrote, rank 1 and a TP4 rank read (LMCache's worker-0 mode off,
    # so every rank asks with its own worker id).
    mla0, mla_cpu = backend(nodes, loop, world=2, mla=True, tenant="team-a")
    mla_obj = chunk(mla_cpu, 42)
    mla0.submit_put_task(key(50, worker=0, world=2), mla_obj)
    settle(mla0)
    mla_seen = []
    for worker, world in ((1, 2), (3, 4)):
        reader, _ = backend(nodes, loop, worker=worker, world=world, mla=True, tenant="team-a",
                            remote_enable_mla_worker_id_as0=False)  # fmt: skip
        reader.config.extra_config["remote_enable_mla_worker_id_as0"] = False
        reader._mla_worker_id_as0_mode = False
        r = reader.get_blocking(key(50, worker=worker, world=world))
        mla_seen.append(r is not None and digest(r) == digest(mla_obj))
        reader.close()
    seen["mla_shared"] = mla_seen
    mla0.close()
    rb.close()
    # A cluster that does not answer: misses and dropped puts, never an exception.
    dead, dead_cpu = backend("127.0.0.1:9", loop, retry_s=60)
    started = time.monotonic()
    dead.submit_put_task(key(1), chunk(dead_cpu, 1))
    settle(dead)
    seen["dead"] = {
        "contains": dead.contains(key(1)),
        "batched_contains": dead.batched_contains(keys),
        "get": dead.get_blocking(key(1)),
        "batched_get": dead.batched_get_blocking(keys[:2]),
        "put_failed_count": dead.put_failed_count,
        "seconds": round(time.monotonic() - started, 1),
    }
    dead.close()
    return seen


def run_users(nodes: str, users: dict[str, dict[str, Any]], loop: asyncio.AbstractEventLoop
              ) -> dict[str, Any]:  # fmt: skip
    """Tenant users' credentials in the extra config: alice's chunks are hers alone."""
    seen: dict[str, Any] = {}
    alice, cpu = backend("", loop, **users["alice"])
    keys = [key(200 + i) for i in range(4)]
    objs = [chunk(cpu, 200 + i) for i in range(4)]
    alice.batched_submit_put_task(keys, objs)
    settle(alice)
    reader, _ = backend("", loop, class_name="KVTierConnector", plugin="mycache", **users["alice"])
    got = reader.batched_get_blocking(keys)
    seen["alice_exact"] = [
        g is not None and digest(g) == digest(o) for g, o in zip(got, objs, strict=True)
    ]
    reader.close()
    cases = {
        "bob": ("", users["bob"]),
        "alice_naming_team_b": ("", {**users["alice"], "tenant": "team-b"}),
        "operator_default": (nodes, {}),
        "operator_team_a": (nodes, {"tenant": "team-a"}),
    }
    for name, (where, settings) in cases.items():
        other, _ = backend(where, loop, **settings)
        seen[name] = other.batched_contains(keys)
        other.close()
    wrong, wrong_cpu = backend("", loop, retry_s=60, **users["wrong"])
    wrong.submit_put_task(key(300), chunk(wrong_cpu, 300))
    settle(wrong)
    seen["wrong_secret"] = {
        "contains": wrong.contains(keys[0]),
        "batched_contains": wrong.batched_contains(keys),
        "get": wrong.get_blocking(keys[0]),
    }
    wrong.close()
    alice.close()
    return seen


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)  # LMCache's loop thread
    thread.start()
    try:
        seen = run(sys.argv[3], loop)
        if len(sys.argv) > 4:
            seen["users"] = run_users(sys.argv[3], json.loads(sys.argv[4]), loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    sys.stdout.write(json.dumps(seen, default=str) + "\n")


if __name__ == "__main__":
    main()
