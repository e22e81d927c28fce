"""A steady mixed workload with a byte-exact checker, run in the test process during a fault.

Two paced threads: S3 (boto3 through the gateway: PUT, GET, LIST, multipart) and KV
(kvtier.KVClient: put_batch, get_batch, lookup). Every write uses a fresh key, so a write is
either acknowledged (its bytes recorded) or not (never read back, allowed in listings). Every
read is compared with the recorded bytes. `verify()` (after the fault is healed) reads every
acknowledged object back and lists the bucket: an acknowledged object that is missing is a lost
write. KV blocks live in a cache (memory durability): a block that reads as a miss is counted as
a miss, never as lost; a block that reads with other bytes is a wrong read, always.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
import numpy as np
from botocore.config import Config

import kvtier
from kvtier import errors, security

KV_BLOCK_BYTES = 16 << 10
PART_BYTES = 5 << 20  # S3's smallest non-last part
#: Blocks read back per get_batch by the KV check after the fault (far below any arena).
VERIFY_BATCH = 16
#: A block that reads as a miss in that check is asked again, MISS_PAUSE_S apart (past the
#: second a kvcache node skips the durable tier after a read-through failed), with the client's
#: map refreshed (an overloaded node's lease may lapse: it leaves the map for a moment), for up
#: to MISS_WINDOW_S per batch and MISS_BUDGET_S in all (a block that is really lost stays so).
MISS_PAUSE_S = 1.2
MISS_WINDOW_S = 15.0
MISS_BUDGET_S = 60.0


def body(seed: int, size: int) -> bytes:
    """Deterministic bytes for seed (cheap to make, never equal for two seeds)."""
    block = hashlib.sha256(b"fault %d" % seed).digest()
    return (block * (size // len(block) + 1))[:size]


def kv_block(key: bytes) -> np.ndarray:
    """The block stored under key."""
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, KV_BLOCK_BYTES, dtype=np.uint8)


@dataclasses.dataclass(slots=True)
class Report:
    """What a scenario measured."""

    operations: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    wrong_bytes: list[str] = dataclasses.field(default_factory=list)
    wrong_listings: list[str] = dataclasses.field(default_factory=list)
    lost_acknowledged: list[str] = dataclasses.field(default_factory=list)
    kv_misses: int = 0
    acknowledged: int = 0
    recovery_s: float = 0.0
    #: Seconds from the heal until the map showed every node SERVING again.
    ready_s: float = 0.0
    #: Latencies (s) of the operations that started during the fault.
    fault_latencies_s: list[float] = dataclasses.field(default_factory=list)
    #: Operations started during the fault that took over a second: kind -> latencies (s).
    fault_slow_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures_at: list[float] = dataclasses.field(default_factory=list)

    def row(self, name: str) -> str:
        """The docs/reliability.md table row."""
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()))
        return (
            f"| {name} | {sum(self.operations.values())} | {self.acknowledged}"
            f" | {sum(self.failed.values())}{f' ({failed})' if failed else ''}"
            f" | {len(self.wrong_bytes)} | {len(self.wrong_listings)}"
            f" | {len(self.lost_acknowledged)} | {self.kv_misses}"
            f" | {self.p99_fault_ms():.0f} ms | {self.ready_s:.1f} s | {self.recovery_s:.1f} s |"
        )

    def p99_fault_ms(self) -> float:
        """The 99th percentile latency of operations started during the fault, in ms."""
        if not self.fault_latencies_s:
            return 0.0
        ordered = sorted(self.fault_latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def as_dict(self) -> dict[str, object]:
        """The report as JSON-able values."""
        return {
            "operations": dict(self.operations),
            "acknowledged": self.acknowledged,
            "failed": dict(self.failed),
            "wrong_bytes": self.wrong_bytes,
            "wrong_listings": self.wrong_listings,
            "lost_acknowledged": self.lost_acknowledged,
            "kv_misses": self.kv_misses,
            "p99_fault_ms": round(self.p99_fault_ms(), 1),
            "fault_ops": len(self.fault_latencies_s),
            "fault_slow_s": {k: [round(s, 2) for s in v] for k, v in self.fault_slow_s.items()},
            "ready_s": round(self.ready_s, 2),
            "recovery_s": round(self.recovery_s, 2),
        }


class Workload:
    """Start with `start()`, mark the fault with `fault_started()` / `fault_ended()`, then
    `stop()` and `verify()`; the report is in `report`."""

    def __init__(
        self,
        info: dict[str, Any],
        user: security.ClientSecurity,
        *,
        seed: int,
        bucket: str = "fault",
        ops_per_s: float = 12.0,
        kv_write_through: bool = False,
        kv_durability: str = "",
        kv_kept: bool = False,
        kv_put_blocks: int = 4,
        s3: bool = True,
    ) -> None:
        self.info = info
        #: The KV namespace is write-through: a put is acknowledged (STORED) only once its
        #: block's durable copy is committed (docs/kvcache.md, "What survives what"), so every
        #: acknowledged block must read back exact after the fault; a miss is a lost write.
        self.kv_write_through = kv_write_through
        #: The KV namespace's durability as set at start ("write_back", "write_through"; empty:
        #: none, or write-through when kv_write_through).
        self.kv_durability = kv_durability or ("write_through" if kv_write_through else "")
        #: No kvcache node is lost in the scenario: every block a put acknowledged (STORED)
        #: must read back exact after the heal, from DRAM, the spill buffer or the durable
        #: tier (a miss then is a lost acknowledged write); misses during the fault are allowed.
        self.kv_kept = kv_kept
        self.kv_put_blocks = kv_put_blocks
        #: Whether the S3 thread runs (off: a second KV namespace beside another workload).
        self.s3_enabled = s3
        self.kv_acked_at: dict[bytes, float] = {}
        #: Acknowledged blocks verified after the fault (the check means something only when
        #: there are some).
        self.kv_settled_verified = 0
        self._miss_budget_s = MISS_BUDGET_S
        self.user = user
        self.bucket = bucket
        self.rng = random.Random(seed)
        self.seed = seed
        self.interval_s = 1.0 / ops_per_s
        self.report = Report()
        self.objects: dict[str, bytes] = {}  # acknowledged: key -> sha256
        self.kv_keys: list[bytes] = []
        self.started_at = self.healed_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.s3 = self.s3_client()

    def s3_client(self) -> Any:
        """A boto3 client as applications configure one: standard retries (3 attempts)."""
        return boto3.client(
            "s3", endpoint_url=self.info["gateway_s3"], region_name="us-east-1",
            aws_access_key_id=self.info["s3_access_key"],
            aws_secret_access_key=self.info["s3_secret_key"], verify=self.info["ca_file"],
            config=Config(
                s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=5, read_timeout=15,
            ),
        )  # fmt: skip

    def start(self) -> None:
        """Create the bucket and start both threads."""
        if self.s3_enabled:
            self.s3.create_bucket(Bucket=self.bucket)
        if self.kv_durability:
            asyncio.run(self._write_through())
        kv = kvtier.KVClient.connect(
            metadata=self.info["metadata_client"], namespace=f"fault-{self.seed}",
            transports=["tcp"], timeout_s=2.0, refresh_s=0.5, security=self.user,
        )  # fmt: skip
        self._threads = [
            threading.Thread(target=self._loop, args=(self._kv_op, kv), name="kv-load"),
        ]
        if self.s3_enabled:
            self._threads.append(
                threading.Thread(target=self._loop, args=(self._s3_op, None), name="s3-load")
            )
        for thread in self._threads:
            thread.start()

    async def _write_through(self) -> None:
        """The namespace's durability (kv_durability), set as an operator does (kept in etcd;
        every node applies it), on every kvcache node."""
        from kvtier.clients import kvcache as kvcache_client
        from kvtier.proto.kvcache.v1 import kvcache_pb2

        addresses = self.info["kvcache_clients"]
        namespace = f"fault-{self.seed}"
        for address in addresses:
            async with kvcache_client.KVCacheClient(address, security=self.user) as node:
                durability = f"DURABILITY_{self.kv_durability.upper()}"
                await node.set_namespace_policy(
                    "default", namespace, kvcache_pb2.Durability.Value(durability)
                )

    def fault_started(self) -> None:
        """Mark the start of the fault."""
        self.started_at = time.time()

    def fault_ended(self) -> None:
        """Mark the end of the fault (healed, resumed or restarted)."""
        self.healed_at = time.time()

    def stop(self) -> None:
        """Stop the threads (each finishes its operation)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), f"{thread.name} did not stop within 60 s"
        if self._errors:
            raise self._errors[0]
        late = [t for t in self.report.failures_at if t > self.healed_at]
        self.report.recovery_s = max(0.0, max(late, default=self.healed_at) - self.healed_at)

    def _loop(self, op: Callable[[Any, int], None], client: Any) -> None:
        n = 0
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                op(client, n)
                n += 1
                next_at += self.interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # a checker bug: surfaced by stop()
            self._errors.append(exc)
        finally:
            if client is not None:
                client.close()

    def _record(self, kind: str, call: Callable[[], Any]) -> Any:
        with self._lock:
            self.report.operations[kind] += 1
        started = time.time()
        in_fault = self.started_at > 0 and not self.healed_at
        try:
            result = call()
            if in_fault:
                took = time.time() - started
                self.report.fault_latencies_s.append(took)
                if took > 1.0:
                    self.report.fault_slow_s.setdefault(kind, []).append(took)
            return result
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
            with self._lock:
                self.report.failed[f"{kind}:{code or type(exc).__name__}"] += 1
                self.report.failures_at.append(time.time())
            return None

    # -- S3 -----------------------------------------------------------------------------------

    def _s3_op(self, _client: Any, n: int) -> None:
        if n % 40 == 39:
            self._multipart(n)
        elif n % 3 == 0 or not self.objects:
            self._put(n)
        elif n % 10 == 5:
            self._list()
        else:
            self._get()

    def _put(self, n: int) -> None:
        key, data = f"put-{n}", body(n, self.rng.choice((1 << 10, 40 << 10, 300 << 10)))
        if self._record("put", lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)):
            self._ack(key, data)

    def _ack(self, key: str, data: bytes) -> None:
        with self._lock:
            self.objects[key] = hashlib.sha256(data).digest()
            self.report.acknowledged += 1

    def _get(self) -> None:
        key = self.rng.choice(list(self.objects))
        data = self._record(
            "get", lambda: self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        )
        if data is not None and hashlib.sha256(data).digest() != self.objects[key]:
            self.report.wrong_bytes.append(f"GET {key}: {len(data)} bytes of other content")

    def _list(self) -> None:
        before = set(self.objects)
        keys: set[str] = set()
        token: dict[str, str] = {}
        while True:
            page = self._record("list", functools.partial(self._list_page, token))
            if page is None:
                return
            keys |= {o["Key"] for o in page.get("Contents", [])}
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        missing = before - keys
        if missing:
            self.report.wrong_listings.append(f"LIST missed acknowledged {sorted(missing)[:3]}")

    def _list_page(self, token: dict[str, str]) -> Any:
        return self.s3.list_objects_v2(Bucket=self.bucket, **token)

    def _multipart(self, n: int) -> None:
        key = f"mpu-{n}"
        parts = [body(n, PART_BYTES), body(n + 1, 64 << 10)]

        def upload() -> bool:
            upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            done = []
            for number, part in enumerate(parts, 1):
                etag = self.s3.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
                )["ETag"]
                done.append({"PartNumber": number, "ETag": etag})
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
            return True

        if self._record("multipart", upload):
            self._ack(key, b"".join(parts))

    # -- KV -------------------------------------------------------------------------------------

    def _kv_op(self, kv: kvtier.KVClient, n: int) -> None:
        if n % 3 == 0 or not self.kv_keys:
            keys = [f"kv-{n}-{i}".encode() for i in range(self.kv_put_blocks)]
            stored = self._record("kv_put", lambda: kv.put_batch(keys, [kv_block(k) for k in keys]))
            if stored is not None:
                now = time.time()
                for k, status in zip(keys, stored, strict=True):
                    if status == kvtier.PutStatus.STORED:
                        self.kv_keys.append(k)
                        self.kv_acked_at[k] = now
                refused = [s for s in stored if s != kvtier.PutStatus.STORED]
                with self._lock:  # a key no node stored (e.g. unavailable) failed for the caller
                    for status in refused:
                        self.report.failed[f"kv_put_key:{status}"] += 1
                        self.report.failures_at.append(time.time())
        elif n % 3 == 1:
            keys = self.rng.sample(self.kv_keys, min(4, len(self.kv_keys)))
            outs = [np.zeros(KV_BLOCK_BYTES, np.uint8) for _ in keys]
            sizes = self._record("kv_get", lambda: kv.get_batch(keys, outs))
            for key, size, out in zip(keys, sizes or [], outs, strict=False):
                if size is None:
                    self.report.kv_misses += 1
                elif size != KV_BLOCK_BYTES or not np.array_equal(out, kv_block(key)):
                    self.report.wrong_bytes.append(f"KV get {key!r}: other bytes")
        else:
            chain = self.kv_keys[-4:]
            self._record("kv_lookup", lambda: kv.lookup(chain))

    # -- after the fault ------------------------------------------------------------------------

    def verify(self, timeout_s: float = 60.0) -> None:
        """Read back every acknowledged object (retrying errors until timeout_s: the cluster may
        still be recovering) and list the bucket; fills lost_acknowledged and wrong_bytes."""
        deadline = time.monotonic() + timeout_s
        if self.s3_enabled:
            self.verify_objects(self.s3_client(), deadline)
        if self.kv_write_through or self.kv_kept:
            self._verify_kv(deadline)

    def verify_objects(self, client: Any, deadline: float) -> None:
        """Read back every acknowledged object through client (retrying errors until the
        deadline) and list the bucket; fills lost_acknowledged and wrong_bytes."""
        for key, digest in sorted(self.objects.items()):
            while True:
                try:
                    data = client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                    break
                except Exception as exc:
                    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
                    if code == "NoSuchKey" or time.monotonic() > deadline:
                        self.report.lost_acknowledged.append(f"{key}: {code or exc!r}")
                        data = None
                        break
                    time.sleep(0.5)
            if data is not None and hashlib.sha256(data).digest() != digest:
                self.report.wrong_bytes.append(f"verify {key}: other content")
        paginator = client.get_paginator("list_objects_v2")
        listed = {o["Key"] for page in paginator.paginate(Bucket=self.bucket)
                  for o in page.get("Contents", [])}  # fmt: skip
        for key in sorted(set(self.objects) - listed):
            self.report.lost_acknowledged.append(f"{key}: not listed")

    def _verify_kv(self, deadline: float) -> None:
        """Every block a put acknowledged as stored reads back exact (write-through: a miss is
        a lost acknowledged write), through a new client."""
        with kvtier.KVClient.connect(
            metadata=self.info["metadata_client"], namespace=f"fault-{self.seed}",
            transports=["tcp"], timeout_s=5.0, security=self.user,
        ) as kv:  # fmt: skip
            for at in range(0, len(self.kv_keys), VERIFY_BATCH):
                self._verify_kv_batch(kv, self.kv_keys[at : at + VERIFY_BATCH], deadline)

    def _verify_kv_batch(self, kv: kvtier.KVClient, keys: list[bytes], deadline: float) -> None:
        outs = [np.zeros(KV_BLOCK_BYTES, np.uint8) for _ in keys]
        sizes = self._read_kv(kv, keys, outs, deadline)
        window_ends = time.monotonic() + min(MISS_WINDOW_S, self._miss_budget_s)
        # A read-through that timed out reads as a miss, and the node then skips the durable
        # tier for a second (docs/kvcache.md): ask again for the misses after it.
        while (missed := [i for i, size in enumerate(sizes) if size is None]) and (
            time.monotonic() < window_ends
        ):
            started = time.monotonic()
            time.sleep(MISS_PAUSE_S)
            with contextlib.suppress(errors.KVTierError):
                kv.refresh()
            again = self._read_kv(kv, [keys[i] for i in missed], [outs[i] for i in missed],
                                  max(deadline, window_ends))  # fmt: skip
            for i, size in zip(missed, again, strict=True):
                sizes[i] = size
            self._miss_budget_s -= time.monotonic() - started
        for key, size, out in zip(keys, sizes, outs, strict=True):
            self.kv_settled_verified += 1
            if size is None:  # acknowledged, so durable (write-through) or kept: it was lost
                self.report.lost_acknowledged.append(f"KV {key!r}: a miss")
            elif size != KV_BLOCK_BYTES or not np.array_equal(out, kv_block(key)):
                self.report.wrong_bytes.append(f"KV verify {key!r}: other bytes")

    @staticmethod
    def _read_kv(
        kv: kvtier.KVClient, keys: list[bytes], outs: list[np.ndarray], deadline: float
    ) -> list[int | None]:
        """get_batch, retrying errors until the deadline (then every key reads as a miss)."""
        while True:
            try:
                return list(kv.get_batch(keys, outs))
            except errors.KVTierError:
                if time.monotonic() > deadline:
                    return [None] * len(keys)
                time.sleep(0.5)
