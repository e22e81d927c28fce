"""The synchronous KV SDK (`kvtier.KVClient`): `kvtier.kv.AsyncKVClient` for plain threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from kvtier import errors, kv, kv_now, kv_routing, kv_stats, tracing

T = TypeVar("T")


class KVClient:
    """The synchronous KV SDK: `kvtier.kv.AsyncKVClient`'s operations, callable from plain threads.

    It owns a private event loop and runs each operation on it in the calling thread (no
    hand-off to another thread, which would cost tens of microseconds per call); calls from
    several threads take turns. Small gets, probes and lookups skip the loop altogether when
    their nodes' tcp sessions are open (`kvtier.kv_now`). Puts always run on the loop: in a
    write-through namespace a put's reply comes only once the node's upload to the durable
    tier committed (the node bounds that by its write_through_timeout_s, 3 s by default; the
    transport's timeout_s, 5 s by default, bounds the call). Build with `KVClient.connect(...)`
    (same arguments as `kvtier.kv.AsyncKVClient`); close with `close()` or use `with`.
    """

    def __init__(self, inner: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, **kwargs: Any) -> KVClient:
        """Connect (see `kvtier.kv.AsyncKVClient.connect`)."""
        loop = _new_loop()
        try:
            inner = loop.run_until_complete(kv.AsyncKVClient.connect(**kwargs))
        except BaseException:
            loop.close()
            raise
        return cls(inner, loop)

    def _short(
        self,
        short: Callable[..., T | None],
        full: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
    ) -> T:
        """The short path, `short(inner, loop, *args)` (`kvtier.kv_now`), else the full
        operation on the loop, `full(*args)` (no closures built per call)."""
        with self._lock:
            if self._loop.is_closed():
                raise errors.Unavailable("the KV client is closed")
            result = short(self._inner, self._loop, *args)
            if result is not None:
                return result
            return self._loop.run_until_complete(full(*args))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop.is_closed():
                coro.close()
                raise errors.Unavailable("the KV client is closed")
            return self._loop.run_until_complete(coro)

    @property
    def node_ids(self) -> list[str]:
        """The kvcache nodes keys are placed on."""
        return self._inner.node_ids

    @property
    def corrupt_blocks(self) -> int:
        """Blocks this client read whose bytes did not match their checksum (see
        `kvtier.kv.AsyncKVClient`: served as misses and deleted where they were found)."""
        return self._inner.corrupt_blocks

    def owners(self, key: bytes) -> list[str]:
        """The nodes that own key, best first."""
        return self._inner.owners(key)

    def put_batch(
        self,
        keys: Sequence[bytes],
        blocks: Sequence[Any],
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        engine_hashes: Sequence[bytes] | None = None,
        parent_hashes: Sequence[bytes | None] | None = None,
    ) -> list[kv.PutStatus]:
        """See `kvtier.kv.AsyncKVClient.put_batch`."""
        put = self._inner.put_batch(
            keys, blocks, overwrite=overwrite, ttl_s=ttl_s, timeout_s=timeout_s,
            engine_hashes=engine_hashes, parent_hashes=parent_hashes,
        )  # fmt: skip
        return self._run(put)

    def put_batch_results(
        self,
        keys: Sequence[bytes],
        blocks: Sequence[Any],
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
    ) -> list[kv.PutResult]:
        """See `kvtier.kv.AsyncKVClient.put_batch_results` (each refused key's reason)."""
        return self._run(
            self._inner.put_batch_results(
                keys, blocks, overwrite=overwrite, ttl_s=ttl_s, timeout_s=timeout_s
            )
        )

    def put(
        self, key: bytes, block: Any, *, overwrite: bool = False, ttl_s: float | None = None
    ) -> bool:
        """See `kvtier.kv.AsyncKVClient.put`."""
        return self._run(self._inner.put(key, block, overwrite=overwrite, ttl_s=ttl_s))

    def get_batch(
        self, keys: Sequence[bytes], buffers: Sequence[Any], *, timeout_s: float | None = None
    ) -> list[int | None]:
        """See `kvtier.kv.AsyncKVClient.get_batch` (small ones take the short path)."""
        if timeout_s is not None:
            return self._run(self._inner.get_batch(keys, buffers, timeout_s=timeout_s))
        with tracing.op_span(kv.GET_SPAN, attributes={"kvtier.kv.keys": len(keys)}):
            return self._short(kv_now.get_batch, self._inner.get_batch, keys, buffers)

    def get(self, key: bytes, buffer: Any) -> int | None:
        """See `kvtier.kv.AsyncKVClient.get`."""
        (size,) = self.get_batch([key], [buffer])
        return size

    def exists_batch(self, keys: Sequence[bytes], *, timeout_s: float | None = None) -> list[bool]:
        """See `kvtier.kv.AsyncKVClient.exists_batch`."""
        if timeout_s is not None:
            return self._run(self._inner.exists_batch(keys, timeout_s=timeout_s))
        return self._short(kv_now.exists_batch, self._inner.exists_batch, keys)

    def score(
        self, chain: Sequence[bytes], *, timeout_s: float | None = None
    ) -> kv_routing.ChainScore:
        """See `kvtier.kv.AsyncKVClient.score` (it takes the short path when it can)."""
        if timeout_s is not None:
            return self._run(self._inner.score(chain, timeout_s=timeout_s))
        return self._short(kv_now.score, self._inner.score, chain)

    def lookup(self, chain: Sequence[bytes], *, timeout_s: float | None = None) -> int:
        """See `kvtier.kv.AsyncKVClient.lookup`."""
        if timeout_s is not None:
            return self._run(self._inner.lookup(chain, timeout_s=timeout_s))
        return self._short(kv_now.lookup, self._inner.lookup, chain)

    def delete(self, keys: Sequence[bytes]) -> int:
        """See `kvtier.kv.AsyncKVClient.delete`."""
        return self._run(self._inner.delete(keys))

    def pin(self, keys: Sequence[bytes], pin_s: float) -> int:
        """See `kvtier.kv.AsyncKVClient.pin`."""
        return self._run(self._inner.pin(keys, pin_s))

    def unpin(self, keys: Sequence[bytes]) -> int:
        """See `kvtier.kv.AsyncKVClient.unpin`."""
        return self._run(self._inner.unpin(keys))

    def touch(self, keys: Sequence[bytes]) -> int:
        """See `kvtier.kv.AsyncKVClient.touch`."""
        return self._run(self._inner.touch(keys))

    def stats(self) -> dict[str, kv_stats.KVStats]:
        """See `kvtier.kv.AsyncKVClient.stats`."""
        return self._run(self._inner.stats())

    def set_durability(self, durability: kv.Durability | str) -> int:
        """See `kvtier.kv.AsyncKVClient.set_durability`."""
        return self._run(self._inner.set_durability(durability))

    def refresh(self) -> None:
        """Reload the node list now."""
        self._run(self._inner.refresh())

    def close(self) -> None:
        """Close connections and the loop; idempotent."""
        with self._lock:
            if self._loop.is_closed():
                return
            self._loop.run_until_complete(self._inner.close())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()
