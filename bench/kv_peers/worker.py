"""A client process of the KV-cache benchmark: `python -m bench.kv_peers.worker <fd>`.

Runs under the system's own interpreter (its virtualenv), so it imports only the standard library,
numpy and, through the pickled `ClientSpec`, the driver module of that system. It talks to the
benchmark process over the inherited end of a socket pair (`multiprocessing.connection`):
the benchmark sends (command, argument) pairs, the worker answers ("ok", value) or ("error", text).
Timed phases start at an absolute `time.perf_counter()` instant sent to every worker
(CLOCK_MONOTONIC is system-wide on Linux), so all clients leave the same barrier; each reports its
own start and end.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from bench.kv_peers import base


@dataclass
class Case:
    """The keys and buffers of one client in one (block size, clients) case."""

    keys: list[bytes]
    block: int
    batch: int
    src: base.Buffer
    dst: base.Buffer

    def blocks(self, pool: base.Buffer) -> list[base.Buffer]:
        return [pool[i * self.block : (i + 1) * self.block] for i in range(len(self.keys))]


def _content(count: int, block: int, seed: int) -> base.Buffer:
    """Distinct content per block without generating count*block random bytes.

    Block i is a window of one random pattern shifted by 8*i bytes, so blocks differ from each
    other and from other clients' (other seeds); a mixed-up or stale block fails the check.
    """
    pattern = np.random.default_rng(seed).integers(0, 256, block + 8 * count, dtype=np.uint8)
    src = np.empty(count * block, dtype=np.uint8)
    for i in range(count):
        src[i * block : (i + 1) * block] = pattern[8 * i : 8 * i + block]
    return src


def _edges_match(case: Case, lo: int, hi: int) -> bool:
    """Cheap in-loop check of blocks lo..hi: their first and last 8 bytes."""
    got = case.dst[lo * case.block : hi * case.block].reshape(-1, case.block)
    want = case.src[lo * case.block : hi * case.block].reshape(-1, case.block)
    return bool(
        np.array_equal(got[:, :8], want[:, :8]) and np.array_equal(got[:, -8:], want[:, -8:])
    )


def _wait_for(start_at: float) -> None:
    while time.perf_counter() < start_at:
        pass


class Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.client: base.KVClient | None = None
        self.case: Case | None = None

    def serve(self) -> None:
        while True:
            command, arg = self.conn.recv()
            try:
                value = getattr(self, f"do_{command}")(arg)
            except Exception:
                self.conn.send(("error", traceback.format_exc(limit=8)))
                continue
            self.conn.send(("ok", value))
            if command == "close":
                return

    def _client(self) -> base.KVClient:
        if self.client is None:
            raise RuntimeError("init first")
        return self.client

    def _case(self) -> Case:
        if self.case is None:
            raise RuntimeError("prepare first")
        return self.case

    def do_init(self, spec: base.ClientSpec) -> str:
        self.client = spec.make_client()
        return spec.version()

    def do_prepare(self, arg: dict[str, Any]) -> None:
        """Allocate and pre-fault this case's buffers, register them, warm the connection up."""
        self.do_release(None)
        block, count, batch = arg["block"], arg["count"], arg["batch"]
        src = _content(count, block, arg["seed"])
        dst = np.empty(count * block, dtype=np.uint8)
        dst.fill(0)  # pre-faulted, and a block that is never written fails the check
        keys = [f"{arg['prefix']}/{i}".encode() for i in range(count)]
        self.case = Case(keys, block, batch, src, dst)
        client = self._client()
        client.register(src)
        client.register(dst)
        # Warm-up outside the timed phases: connections, client-side pools, first-use faults.
        warm = [f"{arg['prefix']}/warm/{i}".encode() for i in range(batch)]
        client.put_batch(warm, self.case.blocks(src)[:batch])
        client.get_batch(warm, self.case.blocks(dst)[:batch])
        client.delete_batch(warm)
        dst[: batch * block].fill(0)

    def do_put(self, start_at: float) -> tuple[float, float]:
        case, client = self._case(), self._client()
        bufs = case.blocks(case.src)
        _wait_for(start_at)
        t0 = time.perf_counter()
        for lo in range(0, len(case.keys), case.batch):
            client.put_batch(case.keys[lo : lo + case.batch], bufs[lo : lo + case.batch])
        return t0, time.perf_counter()

    def do_get(self, start_at: float) -> tuple[float, float, bool]:
        case, client = self._case(), self._client()
        bufs = case.blocks(case.dst)
        ok = True
        _wait_for(start_at)
        t0 = time.perf_counter()
        for lo in range(0, len(case.keys), case.batch):
            hi = min(lo + case.batch, len(case.keys))
            client.get_batch(case.keys[lo:hi], bufs[lo:hi])
            ok = _edges_match(case, lo, hi) and ok
        return t0, time.perf_counter(), ok

    def do_verify(self, _: None) -> bool:
        """The full content check, outside the timed region."""
        case = self._case()
        return bool(np.array_equal(case.src, case.dst))

    def do_delete(self, _: None) -> None:
        case = self._case()
        for lo in range(0, len(case.keys), case.batch):
            self._client().delete_batch(case.keys[lo : lo + case.batch])

    def do_release(self, _: None) -> None:
        if self.case is not None:
            self._client().unregister(self.case.src)
            self._client().unregister(self.case.dst)
            self.case = None

    def do_latency(self, arg: dict[str, Any]) -> dict[str, Any]:
        """Single-key gets of `block` bytes, cycling over `keys` keys after a warm-up, then (when
        the client has one) lookups of those keys as one chain; timed from `start_at` on (every
        client of a run leaves the same barrier). Returns the sorted samples in µs and the
        get p50/p99 of this client."""
        block, nkeys, samples, warmup = arg["block"], arg["keys"], arg["samples"], arg["warmup"]
        self.do_prepare(
            {"block": block, "count": nkeys, "batch": 1, "prefix": arg["prefix"], "seed": 7}
        )
        case, client = self._case(), self._client()
        client.put_batch(case.keys, case.blocks(case.src))
        bufs = case.blocks(case.dst)
        for i in range(warmup):
            client.get_batch([case.keys[i % nkeys]], [bufs[i % nkeys]])
        _wait_for(arg.get("start_at", 0.0))
        times = []
        for i in range(samples):
            key, buf = [case.keys[i % nkeys]], [bufs[i % nkeys]]
            t0 = time.perf_counter_ns()
            client.get_batch(key, buf)
            times.append((time.perf_counter_ns() - t0) / 1000)
        lookups = self._lookups(case.keys, arg.get("lookups", 0))
        times.sort()
        verified = self.do_verify(None)
        client.delete_batch(case.keys)
        self.do_release(None)
        return {
            "p50": statistics.median(times),
            "p99": times[int(len(times) * 0.99)],
            "mean": statistics.fmean(times),
            "samples": len(times),
            "verified": float(verified),
            "times": times,
            "lookup_times": lookups,
        }

    def _lookups(self, chain: list[bytes], samples: int) -> list[float]:
        """Sorted µs of `samples` lookups of the whole chain (every key present); [] when the
        client has no lookup."""
        client = self._client()
        if not samples:
            return []
        try:
            found = client.lookup(chain)
        except NotImplementedError:
            return []
        if found != len(chain):
            raise RuntimeError(f"lookup found {found} of {len(chain)} keys")
        times = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            client.lookup(chain)
            times.append((time.perf_counter_ns() - t0) / 1000)
        return sorted(times)

    def do_close(self, _: None) -> None:
        self.do_release(None)
        if self.client is not None:
            self.client.close()


def main() -> int:
    conn = Connection(int(sys.argv[1]))
    try:
        Worker(conn).serve()
    except EOFError:  # the benchmark went away
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
