"""Mooncake Store (`mooncake-transfer-engine-non-cuda`, TCP) as a KV-cache peer.

Servers, all from `.bench-venvs/mooncake`: `mooncake_master` (RPC port, its embedded HTTP metadata
server, metrics on 127.0.0.1) and `mooncake_client`, Mooncake's standalone store process that
mounts a `SEGMENT_BYTES` global segment over the TCP transport. Ready when the master's
metrics report the segment's capacity.
Clients: `mooncake.store.MooncakeDistributedStore().setup(...)` with `global_segment_size=0` (they
hold no data), protocol "tcp", and the zero-copy batch APIs: `register_buffer` on the client's
pools, `batch_put_from` / `batch_get_into` with pointers into them, `get_into` for one key,
`batch_remove(force=True)` between cases (a put of an existing key keeps the old value, so keys
are never reused while they exist). Every data byte crosses TCP between the client process and
the store process. MC_TCP_BIND_ADDRESS=127.0.0.1 keeps the transfer engine on loopback (it
otherwise advertises the first non-loopback interface).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.kv_peers import base

VENV = "mooncake"
PACKAGE = "mooncake-transfer-engine-non-cuda"
SEGMENT_BYTES = 3 * 1024**3
CLIENT_LOCAL_BUFFER_BYTES = 16 * 1024**2
LOOPBACK_ENV = {"MC_TCP_BIND_ADDRESS": "127.0.0.1"}


class MooncakeClient(base.BaseClient):
    def __init__(self, metadata_url: str, master: str) -> None:
        store_mod: Any = importlib.import_module("mooncake.store")
        self.store = store_mod.MooncakeDistributedStore()
        rc = self.store.setup(
            "127.0.0.1",  # local_hostname
            metadata_url,
            0,  # global_segment_size: clients contribute no memory
            CLIENT_LOCAL_BUFFER_BYTES,
            "tcp",
            "",  # rdma_devices
            master,
        )
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")

    def register(self, pool: base.Buffer) -> None:
        rc = self.store.register_buffer(pool.ctypes.data, pool.nbytes)
        if rc != 0:
            raise RuntimeError(f"register_buffer returned {rc}")

    def unregister(self, pool: base.Buffer) -> None:
        self.store.unregister_buffer(pool.ctypes.data)

    def put_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        rcs = self.store.batch_put_from(
            [k.decode() for k in keys], [b.ctypes.data for b in bufs], [b.nbytes for b in bufs]
        )
        if any(rcs):
            raise RuntimeError(f"batch_put_from returned {rcs}")

    def get_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        if len(keys) == 1:
            got = [self.store.get_into(keys[0].decode(), bufs[0].ctypes.data, bufs[0].nbytes)]
        else:
            got = self.store.batch_get_into(
                [k.decode() for k in keys],
                [b.ctypes.data for b in bufs],
                [b.nbytes for b in bufs],
            )
        if list(got) != [b.nbytes for b in bufs]:
            raise RuntimeError(f"batch_get_into returned {got}")

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        rcs = self.store.batch_remove([k.decode() for k in keys], True)
        if any(rcs):
            raise RuntimeError(f"batch_remove returned {rcs}")

    def close(self) -> None:
        self.store.close()


@dataclass(frozen=True)
class MooncakeSpec:
    metadata_url: str
    master: str
    python: str
    env: Mapping[str, str] = field(default_factory=lambda: dict(LOOPBACK_ENV))

    def make_client(self) -> base.KVClient:
        return MooncakeClient(self.metadata_url, self.master)

    def version(self) -> str:
        return f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class MooncakeSystem:
    name = "mooncake"
    kind = "peer"

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._procs: list[base.ServerProcess] = []
        self._metadata_url = self._master = ""

    def unavailable(self) -> str | None:
        return base.install_status(VENV)

    def _bin(self, name: str) -> str:
        return str(base.VENVS / VENV / "bin" / name)

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kvbench-mooncake-"))
        rpc, http, metrics, store = (base.free_port() for _ in range(4))
        self._master = f"127.0.0.1:{rpc}"
        self._metadata_url = f"http://127.0.0.1:{http}/metadata"
        master = base.ServerProcess(
            [
                self._bin("mooncake_master"),
                f"--rpc_port={rpc}",
                "--rpc_address=127.0.0.1",
                "--enable_http_metadata_server=true",
                "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={http}",
                "--metrics_host=127.0.0.1",
                f"--metrics_port={metrics}",
                "--logtostderr",
            ],
            self._dir / "master.log",
        )
        self._procs.append(master)
        master.wait_ready(lambda: _metric(metrics, "master_total_capacity_bytes") is not None,
                          "mooncake_master")  # fmt: skip
        holder = base.ServerProcess(
            [
                self._bin("mooncake_client"),
                "--host=127.0.0.1",
                f"--port={store}",
                f"--global_segment_size={SEGMENT_BYTES}",
                f"--master_server_address={self._master}",
                f"--metadata_server={self._metadata_url}",
                "--protocol=tcp",
                "--logtostderr",
            ],
            self._dir / "store.log",
            env=LOOPBACK_ENV,
        )
        self._procs.append(holder)
        holder.wait_ready(
            lambda: (_metric(metrics, "master_total_capacity_bytes") or 0) >= SEGMENT_BYTES,
            "mooncake_client (store segment)",
        )

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def client_spec(self) -> MooncakeSpec:
        return MooncakeSpec(self._metadata_url, self._master, str(base.venv_python(VENV)))

    def describe(self) -> str:
        return (
            f"Mooncake Store ({PACKAGE}): mooncake_master + a mooncake_client store process with a "
            f"{SEGMENT_BYTES // 1024**3} GiB segment, TCP transport; clients hold no segment and "
            "use register_buffer + batch_put_from / batch_get_into"
        )
