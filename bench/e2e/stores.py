"""Where prefix KV blocks are kept between processes: kvtier, local files, Redis.

Every store has the same four operations, as an engine's KV connector would use them: `put` the
blocks of a chain, `lookup` how many leading blocks of a chain are present (one call), `get_into`
preallocated buffers (one per block, each exactly a block long; a miss or short read raises), and
`before_restore` (untimed; the cold-file store evicts its files from the page cache there).
Clients connect when built and `warm_up` opens their connections, as in a long-running server.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

import kvtier
from kvtier import security as security_mod

Buffer = npt.NDArray[np.uint8]
TIMEOUT_S = 30.0


class BlockStore(Protocol):
    """A store of KV blocks keyed by chained hashes (see the module docstring)."""

    name: str

    def put(self, keys: Sequence[bytes], blocks: Sequence[Buffer]) -> None:
        """Store every block (present ones count as stored: keys name their content)."""

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of the chain are present."""

    def get_into(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        """Fill each buffer with its key's block; raises on a miss or a size mismatch."""

    def warm_up(self) -> None:
        """Open connections (untimed)."""

    def before_restore(self, keys: Sequence[bytes]) -> None:
        """Untimed preparation of each timed restore."""

    def close(self) -> None:
        """Release connections."""


class KVTierStore:
    """kvtier's KV-cache tier through the SDK (`kvtier.KVClient`), zero-copy both ways.

    Credentials: `security`, else the KVTIER_* environment variables (as an engine's process
    has them)."""

    def __init__(
        self,
        name: str,
        metadata: str,
        namespace: str,
        transports: Sequence[str] = (),
        security: security_mod.ClientSecurity | None = None,
    ) -> None:
        self.name = name
        self.client = kvtier.KVClient.connect(
            metadata=metadata, namespace=namespace, transports=list(transports),
            timeout_s=TIMEOUT_S, security=security,
        )  # fmt: skip

    def put(self, keys: Sequence[bytes], blocks: Sequence[Buffer]) -> None:
        ok = (kvtier.PutStatus.STORED, kvtier.PutStatus.EXISTS)
        statuses = self.client.put_batch(keys, blocks)
        failed = sorted({str(s) for s in statuses if s not in ok})
        if failed:
            raise RuntimeError(f"{self.name}: put failed: {failed}")

    def lookup(self, keys: Sequence[bytes]) -> int:
        return self.client.lookup(keys)

    def get_into(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        sizes = self.client.get_batch(keys, bufs)
        for key, buf, size in zip(keys, bufs, sizes, strict=True):
            if size != buf.nbytes:
                raise KeyError(f"{self.name}: get {key.hex()[:16]}: {size} bytes")

    def warm_up(self) -> None:
        # A get of a key that is nowhere, one owned by each node, opens every node's data-plane
        # session (and maps its shm region) before anything is timed.
        probes: dict[str, bytes] = {}
        for i in range(1000):
            key = b"e2e-warm-up-%d" % i
            probes.setdefault(self.client.owners(key)[0], key)
            if len(probes) == len(self.client.node_ids):
                break
        buf = np.empty(1, np.uint8)
        self.client.get_batch(list(probes.values()), [buf] * len(probes))

    def before_restore(self, keys: Sequence[bytes]) -> None:
        del keys

    def close(self) -> None:
        self.client.close()


class FileStore:
    """One file per block in a local directory, as a local-disk KV tier keeps them.

    Written with fsync; read with one `readinto` per block straight into the caller's buffer.
    With `cold`, every file is evicted from the page cache before each restore
    (`posix_fadvise(DONTNEED)`: no root needed, and unlike dropping the whole cache it leaves other
    jobs' pages alone), so reads come from the disk; without it they come from the page cache the
    writer filled.
    """

    def __init__(self, name: str, directory: Path, cold: bool = False) -> None:
        self.name = name
        self.directory = directory
        self.cold = cold

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}.kv"

    def put(self, keys: Sequence[bytes], blocks: Sequence[Buffer]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for key, block in zip(keys, blocks, strict=True):
            tmp = self._path(key).with_suffix(".tmp")
            with tmp.open("wb", buffering=0) as out:
                out.write(block.data)
                os.fsync(out.fileno())
            tmp.rename(self._path(key))

    def lookup(self, keys: Sequence[bytes]) -> int:
        for count, key in enumerate(keys):
            if not self._path(key).exists():
                return count
        return len(keys)

    def get_into(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        for key, buf in zip(keys, bufs, strict=True):
            view = buf.data
            with self._path(key).open("rb", buffering=0) as src:
                done = 0
                while done < view.nbytes:
                    got = src.readinto(view[done:])
                    if not got:
                        raise KeyError(f"{self.name}: {key.hex()[:16]}: only {done} bytes")
                    done += got
                if src.read(1):
                    raise KeyError(f"{self.name}: {key.hex()[:16]}: longer than the buffer")

    def warm_up(self) -> None:
        pass

    def before_restore(self, keys: Sequence[bytes]) -> None:
        if not self.cold:
            return
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self._path(key), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def close(self) -> None:
        pass


class RedisStore:
    """Redis through redis-py with the hiredis parser, as LMCache's and others' Redis tiers do.

    A batch is one non-transactional pipeline of SET, EXISTS or GET; GET returns new `bytes`,
    copied into the caller's buffer (part of what a Redis user pays). Commands are packed by
    redis-py's Python serializer, which sends a block's memoryview without copying it (see
    bench/kv_peers/redis_server.py for why).
    """

    def __init__(self, name: str, port: int) -> None:
        redis: Any = importlib.import_module("redis")
        connection: Any = importlib.import_module("redis.connection")
        encoder = connection.Encoder("utf-8", "strict", False)
        pool = redis.ConnectionPool(
            host="127.0.0.1",
            port=port,
            socket_timeout=TIMEOUT_S,
            command_packer=connection.PythonRespSerializer(6000, encoder.encode),
        )
        self.name = name
        self.conn: Any = redis.Redis(connection_pool=pool)

    def put(self, keys: Sequence[bytes], blocks: Sequence[Buffer]) -> None:
        pipe = self.conn.pipeline(transaction=False)
        for key, block in zip(keys, blocks, strict=True):
            pipe.set(key, block.data)
        if not all(pipe.execute()):
            raise RuntimeError(f"{self.name}: SET failed")

    def lookup(self, keys: Sequence[bytes]) -> int:
        pipe = self.conn.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        present = pipe.execute()
        return next((i for i, hit in enumerate(present) if not hit), len(keys))

    def get_into(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        pipe = self.conn.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        for key, buf, value in zip(keys, bufs, pipe.execute(), strict=True):
            if value is None or len(value) != buf.nbytes:
                size = None if value is None else len(value)
                raise KeyError(f"{self.name}: GET {key.hex()[:16]}: {size} bytes")
            np.copyto(buf, np.frombuffer(value, dtype=np.uint8))

    def warm_up(self) -> None:
        self.conn.ping()

    def before_restore(self, keys: Sequence[bytes]) -> None:
        del keys

    def close(self) -> None:
        self.conn.close()
