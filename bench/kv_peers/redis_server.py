"""Redis (Debian's redis-server) as a KV-cache peer.

Server: `redis-server` on 127.0.0.1 and a free port, in a temp dir, no persistence
(`--save '' --appendonly no`), `--maxmemory` sized with `noeviction` (a full server is an error,
never silent loss). Ready when it answers PING.
Client: redis-py with the hiredis reply parser, in `.bench-venvs/redis`. A batch is one
non-transactional pipeline of SET or GET; a single-key get is a plain GET. GET returns new bytes,
which are copied into the caller's buffer. Commands are packed by redis-py's Python serializer
(`command_packer`), which sends a memoryview value as it is: with hiredis installed redis-py would
otherwise pack with `hiredis.pack_command`, which copies every value twice (bytes(), then the
packed command) and measured at a third of the put throughput for 32 MiB values.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.kv_peers import base

VENV = "redis"
MAXMEMORY_BYTES = 3 * 1024**3


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisClient(base.BaseClient):
    def __init__(self, port: int) -> None:
        redis: Any = importlib.import_module("redis")
        connection: Any = importlib.import_module("redis.connection")
        encoder = connection.Encoder("utf-8", "strict", False)
        pool = redis.ConnectionPool(
            host="127.0.0.1",
            port=port,
            socket_timeout=60,
            command_packer=connection.PythonRespSerializer(6000, encoder.encode),
        )
        self.conn = redis.Redis(connection_pool=pool)
        if not redis.utils.HIREDIS_AVAILABLE:
            raise RuntimeError("redis-py does not see hiredis")
        self.conn.ping()

    def put_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        pipe = self.conn.pipeline(transaction=False)
        for key, buf in zip(keys, bufs, strict=True):
            pipe.set(key, buf.data)
        if not all(pipe.execute()):
            raise RuntimeError("SET failed")

    def get_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        if len(keys) == 1:
            values = [self.conn.get(keys[0])]
        else:
            pipe = self.conn.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
        for key, buf, value in zip(keys, bufs, values, strict=True):
            if value is None or len(value) != len(buf):
                raise KeyError(f"GET {key!r}: {None if value is None else len(value)} bytes")
            np.copyto(buf, np.frombuffer(value, dtype=np.uint8))

    def lookup(self, chain: Sequence[bytes]) -> int:
        """One non-transactional pipeline of EXISTS, one per key; the leading run."""
        pipe = self.conn.pipeline(transaction=False)
        for key in chain:
            pipe.exists(key)
        found = pipe.execute()
        return next((i for i, n in enumerate(found) if not n), len(chain))

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        removed = self.conn.delete(*keys)
        if removed != len(keys):
            raise RuntimeError(f"DEL removed {removed} of {len(keys)} keys")

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class RedisSpec:
    port: int
    python: str
    env: Mapping[str, str] = field(default_factory=dict)

    def make_client(self) -> base.KVClient:
        return RedisClient(self.port)

    def version(self) -> str:
        return (
            f"redis-py {importlib.metadata.version('redis')}, "
            f"hiredis {importlib.metadata.version('hiredis')}"
        )


class RedisSystem:
    name = "redis"
    kind = "peer"

    def __init__(self) -> None:
        self._server: base.ServerProcess | None = None
        self._dir: Path | None = None
        self._port = 0

    def unavailable(self) -> str | None:
        if shutil.which("redis-server") is None:
            status = base.VENVS / "redis-server.status"
            reason = status.read_text().strip() if status.exists() else ""
            return reason if reason and not reason.startswith("ok") else "no redis-server on PATH"
        return base.install_status(VENV)

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kvbench-redis-"))
        self._port = base.free_port()
        argv = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self._port),
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", str(MAXMEMORY_BYTES),
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip
        self._server = base.ServerProcess(argv, self._dir / "redis.log")
        self._server.wait_ready(lambda: _pong(self._port), "redis-server")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def client_spec(self) -> RedisSpec:
        return RedisSpec(port=self._port, python=str(base.venv_python(VENV)))

    def describe(self) -> str:
        version = "?"
        if shutil.which("redis-server") is not None:
            out = subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, check=False
            ).stdout.split()
            version = next((w[2:] for w in out if w.startswith("v=")), "?")
        return (
            f"Redis {version} (Debian redis-server), no persistence, maxmemory "
            f"{MAXMEMORY_BYTES // 1024**3} GiB; redis-py pipelines SET/GET per batch "
            "(hiredis parser, zero-copy command packing); a chain lookup is one pipeline of "
            "EXISTS"
        )
