"""LMCache's lm server (`lm://`) as a KV-cache peer.

Server: `python -m lmcache.v1.server 127.0.0.1 <port> cpu` from `.bench-venvs/lmcache`
(lmcache 0.5.6 pins protobuf < 7 and numpy <= 2.2.6, hence its own virtualenv). It keeps values
in a Python dict and has no delete command, so its memory grows by each case's volume until stop.
Ready when its port accepts a connection (its protocol's HEALTH message needs a parsed cache key).
Client: LMCache's own `LMCServerConnector` (what `remote_url: lm://host:port` builds), with a
`LocalCPUBackend` from an `LMCacheEngineConfig` as its allocator, driven from an asyncio loop the
way LMCache's remote backend drives it. A put wraps the caller's buffer in a `TensorMemoryObj`
(no copy); a get receives into a memory object from LMCache's allocator, which is copied into the
caller's buffer and released (LMCache copies it on to the GPU the same way).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.kv_peers import base

VENV = "lmcache"
MODEL = "kvbench"
LAYERS = 32
TOKEN_BYTES = 128 * 1024  # Llama-3-8B bf16: 32 layers x K,V x 8 heads x 128 x 2 bytes
ALLOCATOR_GIB = 0.25  # per client: holds one batch of received memory objects


def _shape(nbytes: int) -> tuple[int, int, int, int]:
    """A KV_2LTD shape [K/V, layers, tokens, bytes per token per layer] of nbytes uint8."""
    tokens = max(1, nbytes // TOKEN_BYTES)
    per = nbytes // (2 * LAYERS * tokens)
    if 2 * LAYERS * tokens * per != nbytes:
        raise ValueError(f"{nbytes} bytes is not a KV block shape")
    return (2, LAYERS, tokens, per)


class LMCacheClient(base.BaseClient):
    def __init__(self, port: int) -> None:
        self.asyncio: Any = importlib.import_module("asyncio")
        self.torch: Any = importlib.import_module("torch")
        config: Any = importlib.import_module("lmcache.v1.config")
        metadata: Any = importlib.import_module("lmcache.v1.metadata")
        cpu_backend: Any = importlib.import_module("lmcache.v1.storage_backend.local_cpu_backend")
        connector: Any = importlib.import_module(
            "lmcache.v1.storage_backend.connector.lm_connector"
        )
        self.mm: Any = importlib.import_module("lmcache.v1.memory_management")
        self.utils: Any = importlib.import_module("lmcache.utils")
        url = f"lm://127.0.0.1:{port}"
        cfg = config.load_engine_config_with_overrides(
            overrides={
                "chunk_size": 256,
                "local_cpu": False,
                "max_local_cpu_size": ALLOCATOR_GIB,
                "remote_url": url,
                "remote_serde": "naive",
            }
        )
        md = metadata.LMCacheMetadata(
            model_name=MODEL,
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=self.torch.bfloat16,
            kv_shape=(LAYERS, 2, 256, 8, 128),
            chunk_size=256,
        )
        self.backend = cpu_backend.LocalCPUBackend(cfg, md)
        self.loop = self.asyncio.new_event_loop()
        self.conn = connector.LMCServerConnector("127.0.0.1", port, self.loop, self.backend)

    def _key(self, key: bytes) -> Any:
        chunk_hash = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return self.utils.CacheEngineKey(MODEL, 1, 0, chunk_hash, self.torch.uint8)

    def _wrap(self, buf: base.Buffer) -> Any:
        shape = self.torch.Size(_shape(buf.nbytes))
        meta = self.mm.MemoryObjMetadata(
            shape=shape,
            dtype=self.torch.uint8,
            address=buf.ctypes.data,
            phy_size=buf.nbytes,
            ref_count=1,
            fmt=self.mm.MemoryFormat.KV_2LTD,
        )
        return self.mm.TensorMemoryObj(self.torch.from_numpy(buf), meta, None)

    def _run_all(self, coroutines: list[Any]) -> list[Any]:
        """Run the connector's coroutines together on this client's loop (as LMCache does)."""

        async def gather() -> list[Any]:
            results: list[Any] = await self.asyncio.gather(*coroutines)
            return results

        results: list[Any] = self.loop.run_until_complete(gather())
        return results

    def put_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        self._run_all(
            [self.conn.put(self._key(k), self._wrap(b)) for k, b in zip(keys, bufs, strict=True)]
        )

    def get_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        objs = self._run_all([self.conn.get(self._key(k)) for k in keys])
        try:
            for key, buf, obj in zip(keys, bufs, objs, strict=True):
                if obj is None:
                    raise KeyError(f"lm server has no {key!r}")
                np.copyto(buf, np.frombuffer(obj.byte_array, dtype=np.uint8))
        finally:
            for obj in objs:
                if obj is not None:
                    obj.ref_count_down()

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@dataclass(frozen=True)
class LMCacheSpec:
    port: int
    python: str
    env: Mapping[str, str] = field(default_factory=dict)

    def make_client(self) -> base.KVClient:
        return LMCacheClient(self.port)

    def version(self) -> str:
        return (
            f"lmcache {importlib.metadata.version('lmcache')}, "
            f"torch {importlib.metadata.version('torch')}"
        )


class LMCacheSystem:
    name = "lmcache"
    kind = "peer"

    def __init__(self) -> None:
        self._server: base.ServerProcess | None = None
        self._dir: Path | None = None
        self._port = 0

    def unavailable(self) -> str | None:
        return base.install_status(VENV)

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kvbench-lmcache-"))
        self._port = base.free_port()
        python = str(base.venv_python(VENV))
        argv = [python, "-m", "lmcache.v1.server", "127.0.0.1", str(self._port), "cpu"]
        self._server = base.ServerProcess(argv, self._dir / "lm_server.log")
        self._server.wait_ready(lambda: base.tcp_accepts(self._port), "lmcache lm server", 120)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def client_spec(self) -> LMCacheSpec:
        return LMCacheSpec(port=self._port, python=str(base.venv_python(VENV)))

    def describe(self) -> str:
        return (
            "LMCache lm server (`python -m lmcache.v1.server`, CPU), driven by LMCache's own "
            "LMCServerConnector; puts wrap the caller's buffer, gets copy out of LMCache's "
            "allocator"
        )
