"""Systems for the KV-cache benchmark (`bench/kv_bench.py`): one driver module per system.

Peers: `redis_server`, `mooncake_store`, `lmcache_server`. kvtier's own systems come from an
optional module `bench/kv_peers/kvtier.py` exposing `systems() -> list[base.KVSystem]` (one per
transport, `kind = "kvtier"`, names like "kvtier-tcp"); the targets compare the best kvtier row
against each peer. Its spec runs in the project's interpreter, e.g.:

    @dataclass(frozen=True)
    class KVTierSpec:
        nodes: tuple[str, ...]
        transport: str
        python: str = sys.executable
        env: Mapping[str, str] = field(default_factory=dict)
        security: Mapping[str, Any] = field(default_factory=dict)  # ClientSecurity arguments

        def make_client(self) -> base.KVClient:
            return KVTierClient(kvtier.KVClient.connect(
                nodes=list(self.nodes), namespace="bench", transports=[self.transport],
                security=kvtier.security.ClientSecurity(**self.security)))

with `KVTierClient(base.BaseClient)` forwarding put_batch/get_batch (and delete_batch, close),
and a system whose start() runs the servers (ready when healthy; secure, with a cluster CA and
certificates of its own) and stop() ends them.
Importing this package imports nothing beyond the standard library and numpy: client processes
run it under each peer's own virtualenv.
"""

from __future__ import annotations

import importlib
import importlib.util

from bench.kv_peers import base, lmcache_server, mooncake_store, redis_server


def peer_systems() -> list[base.KVSystem]:
    return [
        redis_server.RedisSystem(),
        mooncake_store.MooncakeSystem(),
        lmcache_server.LMCacheSystem(),
    ]


def kvtier_systems() -> list[base.KVSystem]:
    """kvtier over each transport, once `bench/kv_peers/kvtier.py` exists (the hook)."""
    if importlib.util.find_spec("bench.kv_peers.kvtier") is None:
        return []
    module = importlib.import_module("bench.kv_peers.kvtier")
    systems: list[base.KVSystem] = module.systems()
    return systems


def all_systems() -> list[base.KVSystem]:
    return kvtier_systems() + peer_systems()
