"""vLLM on kvtier: a secondary tier for vLLM's tiering `OffloadingConnector` (vLLM >= 0.33).

```bash
vllm serve meta-llama/Llama-3.1-8B-Instruct --kv-transfer-config '{
  "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
  "kv_connector_extra_config": {
    "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8589934592,
    "secondary_tiers": [{"type": "KVTierSecondaryTier", "module_path": "kvtier.integrations.vllm",
                         "metadata": "10.0.0.5:7443", "ca_file": "/etc/kvtier/ca.crt",
                         "access_key": "AKTEAMA",
                         "secret_key_file": "/etc/kvtier/team-a.secret"}]}}'
```

vLLM's `SecondaryTierFactory` imports this module, takes `KVTierSecondaryTier` from it (made on
first access against the installed vLLM: importing the module imports no vLLM) and builds it
with the tier dict's other keys: `kvtier.integrations.keys.TierSettings` fields (`metadata` or
`nodes`, `tenant`, `cache_salt`, `namespace`, `timeout_s`, `replicas`, `transports`, `ttl_s`,
`retry_s`, `verify_checksums`, and the credentials `ca_file`, `access_key`, `secret_key` /
`secret_key_file`, `cert_file` / `key_file`, `cluster_file`, `token_address`, `insecure`, which
fall back to the `KVTIER_*` environment variables), `locality` (vLLM's, default REMOTE),
`max_inflight_jobs` (16) and `touch_interval_s` (1; 0 turns forwarding vLLM's touches off).

**Where it sits.** vLLM copies blocks GPU -> CPU (its primary tier, `cpu_bytes_to_use`) and
cascades every stored chunk to its secondary tiers; a chunk missing from the CPU tier is looked
up in the secondary tiers and promoted secondary -> CPU -> GPU. This tier only ever sees the
primary tier's CPU memory (one row of `primary_kv_view` per chunk): stores put rows into
kvtier (put-if-absent), loads get them straight back into the rows vLLM allocated.

**Never blocking the step.** Every method runs in vLLM's scheduler under its manager lock and
returns at once: lookups answer RETRY until this step's probes are answered (all keys looked up
in one step go out in one `exists_batch` when the step ends: each owner node asked once);
stores and loads run as coroutines on the tier's own event-loop thread and are reported by
`get_finished_jobs`.

**Names.** The scheduler-side tier sees whole chunks: a row holds the chunk's bytes of every
worker (tensor, pipeline and context-parallel ranks, in rank order), and its key is vLLM's
`OffloadKey` (block hash + KV-cache group), so keys carry no rank at all. The namespace is
`<model>@<cache salt>` (`keys.TierSettings.namespace_for`) scoped by a digest of the chunk
layout (`keys.with_layout`): dtype, tokens per block, blocks per chunk, layers of each group,
chunk bytes, and the parallel sizes unless vLLM says the bytes are parallelism-agnostic. So a
TP2 and a TP4 deployment share blocks exactly when their bytes are the same. A request's own
`cache_salt` is already mixed into vLLM's block hashes.

**Failures are misses.** An unreachable or slow cluster, a dead node, quota or space refusals,
a refused credential (a wrong secret, a tenant the user may not act for):
lookups answer MISS, stores and loads report failed jobs (vLLM recomputes; a failed load also
turns its keys' cached verdicts into misses, so vLLM does not retry the same promotion), and the
tier logs once per kind of failure every 30 s. Only a configuration error raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import logging
import queue
import threading
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, ClassVar

from kvtier import kv
from kvtier.integrations import keys

log = logging.getLogger(__name__)

CLASS_NAME = "KVTierSecondaryTier"
_STORED = frozenset({kv.PutStatus.STORED, kv.PutStatus.EXISTS, kv.PutStatus.BUSY})
_OWN_SETTINGS = frozenset({"locality", "max_inflight_jobs", "touch_interval_s"})
_TIER_SETTINGS = frozenset(f.name for f in dataclasses.fields(keys.TierSettings))
_LOG_EVERY_S = 30.0
_DRAIN_WARN_S = 5.0
_MAX_TOUCHED = 65536  # keys remembered between touch flushes


@dataclasses.dataclass(frozen=True, slots=True)
class VLLMApi:
    """The vLLM names the tier is built from (vLLM's own, or stand-ins in tests)."""

    base: Any  # vllm.v1.kv_offload.tiering.base.SecondaryTierManager
    lookup_result: Any  # vllm.v1.kv_offload.base.LookupResult (MISS, HIT, RETRY)
    job_result: Any  # vllm.v1.kv_offload.tiering.base.JobResult
    request_context: Any  # vllm.v1.kv_offload.base.RequestOffloadingContext
    locality: Any  # vllm.v1.kv_offload.base.Locality


def vllm_api() -> VLLMApi:
    """The names from the installed vLLM (>= 0.33). Raises ImportError without it."""
    base = importlib.import_module("vllm.v1.kv_offload.base")
    tiering = importlib.import_module("vllm.v1.kv_offload.tiering.base")
    return VLLMApi(
        base=tiering.SecondaryTierManager,
        lookup_result=base.LookupResult,
        job_result=tiering.JobResult,
        request_context=base.RequestOffloadingContext,
        locality=base.Locality,
    )


def layout_fields(offloading_spec: Any, chunk_bytes: int) -> dict[str, Any]:
    """What makes one vLLM deployment's bytes for a key differ from another's (vLLM's
    `OffloadingConfig`, as its own file tier scopes its directories): the model's name is
    not here (it is in the namespace, which an operator may override to share across paths)."""
    config = offloading_spec.config
    parallel = config.parallel
    replicated = bool(getattr(config, "replicated_layout", False))
    fields: dict[str, Any] = {
        "engine": "vllm",
        "dtype": str(config.model.dtype),
        "tokens_per_hash": int(config.cache.tokens_per_hash),
        "blocks_per_chunk": int(config.cache.blocks_per_chunk),
        "groups": [[int(g.tokens_per_block), list(g.layer_names)] for g in config.groups],
        "chunk_bytes": chunk_bytes,
    }
    if not (parallel.is_parallelism_agnostic or replicated):
        fields["parallel"] = [
            parallel.tp_size,
            parallel.pp_size,
            parallel.pcp_size,
            parallel.dcp_size,
        ]
    if replicated:
        fields["replicated"] = True
    if getattr(config, "canonical_layout", False):
        fields["canonical"] = str(config.kv_cache_layout)
    return fields


@dataclasses.dataclass(slots=True)
class _Probe:
    """The lookup verdict of one key, shared by the requests that asked for it."""

    generation: int
    found: bool | None = None  # None: not answered yet
    in_flight: bool = False
    requests: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    success: bool
    done: tuple[int, ...] | None = None  # on a partial load: the indices that loaded
    nbytes: int = 0
    seconds: float | None = None


@dataclasses.dataclass(slots=True)
class _Job:
    load: bool
    keys: list[Any]  # vLLM's OffloadKeys, as the job had them
    future: concurrent.futures.Future[_Outcome]


class KVTierTier:
    """The tier's logic; `KVTierSecondaryTier` is this plus vLLM's `SecondaryTierManager`.

    Built by vLLM's `SecondaryTierFactory.create_secondary_tier` with keyword arguments: vLLM's
    (`offloading_spec`, `primary_kv_view`, `tier_type`, `backpressure_detector`) and the tier
    dict's settings (see the module). Raises ValueError for unknown or missing settings.
    """

    _api: ClassVar[VLLMApi]

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        **settings: Any,
    ) -> None:
        base = self._api.base
        base.__init__(self, offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        unknown = sorted(set(settings) - _OWN_SETTINGS - _TIER_SETTINGS)
        if unknown:
            raise ValueError(f"kvtier tier: unknown settings {unknown}")
        locality = settings.pop("locality", None) or "REMOTE"
        self.locality = self._api.locality(str(locality).upper())
        self._max_inflight = int(settings.pop("max_inflight_jobs", 16))
        self._touch_interval_s = float(settings.pop("touch_interval_s", 1.0))
        if self._max_inflight < 1 or self._touch_interval_s < 0:
            raise ValueError("max_inflight_jobs must be >= 1 and touch_interval_s >= 0")
        self.settings = keys.TierSettings.from_mapping(settings)
        assert primary_kv_view.strides is not None
        self._chunk_bytes = int(primary_kv_view.strides[0])
        self._rows = primary_kv_view.cast("B")  # one flat byte view: rows by byte offset
        model = str(offloading_spec.config.model.name).replace("/", "-")
        self.layout = layout_fields(offloading_spec, self._chunk_bytes)
        self.namespace = keys.with_layout(self.settings.namespace_for(model), self.layout)
        self._connect_kwargs = {
            **self.settings.client_kwargs(model),
            "namespace": self.namespace,
        }
        # Scheduler side (vLLM's manager lock): lookup verdicts, this step's batch, jobs.
        self._probes: dict[bytes, _Probe] = {}
        self._req_keys: dict[str, set[bytes]] = {}
        self._batch: list[tuple[bytes, int]] = []
        self._generation = 0
        self._probe_results: queue.SimpleQueue[list[tuple[bytes, int, bool]]] = queue.SimpleQueue()
        self._probe_futures: list[concurrent.futures.Future[None]] = []
        self._jobs: dict[int, _Job] = {}
        self._touched: set[bytes] = set()
        self._touched_at = time.monotonic()
        self._closed = False
        # Shared with the loop thread (set there, read here).
        self._client: kv.AsyncKVClient | None = None
        self._retry_at = 0.0
        self._notes: dict[str, tuple[float, int]] = {}
        self._notes_lock = threading.Lock()
        # The loop thread: every kvtier call runs there.
        self._loop = asyncio.new_event_loop()
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._connect_lock = asyncio.Lock()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"kvtier-vllm-{tier_type}", daemon=True
        )
        self._thread.start()
        # Connect now, so that the first lookups need not wait for it.
        self._connecting = self._on_loop(self._connected())
        log.info(
            "kvtier vLLM tier %s: namespace %s, tenant %s, as %s, %s, chunk %d B",
            tier_type, self.namespace, self.settings.tenant or "(from the credentials)",
            self.settings.identity(), self.settings.metadata or ",".join(self.settings.nodes),
            self._chunk_bytes,
        )  # fmt: skip

    # Lookups: answered from this step's batch, one exists_batch per step.

    def lookup(self, key: Any, req_context: Any) -> Any:
        """HIT or MISS when this key's probe has been answered, RETRY while it is on its way
        (vLLM asks again next step); MISS at once while the cluster cannot be reached."""
        results = self._api.lookup_result
        self._drain_probes()
        if self._client is None and time.monotonic() < self._retry_at:
            return results.MISS
        name = bytes(key)
        probe = self._probes.get(name)
        if probe is None:
            probe = self._probes[name] = _Probe(self._generation)
            self._generation += 1
            self._batch.append((name, probe.generation))
        probe.requests.add(req_context.req_id)
        self._req_keys.setdefault(req_context.req_id, set()).add(name)
        if probe.found is None:
            return results.RETRY
        return results.HIT if probe.found else results.MISS

    def on_schedule_end(self, context: Any) -> None:
        """Send this step's new lookups as one probe; forward touches (at most every
        `touch_interval_s`)."""
        self._drain_probes()
        batch = [(k, g) for k, g in self._batch if self._current(k, g)]
        self._batch = []
        self._probe_futures = [f for f in self._probe_futures if not f.done()]
        if batch:
            for name, _ in batch:
                self._probes[name].in_flight = True
            self._probe_futures.append(self._on_loop(self._probe(batch)))
        now = time.monotonic()
        if self._touched and now - self._touched_at >= self._touch_interval_s:
            touched, self._touched = list(self._touched), set()
            self._touched_at = now
            self._on_loop(self._touch(touched))

    def touch(self, keys: Iterable[Any], req_context: Any) -> None:
        """Remember keys vLLM uses, to restart their TTL and count the access in kvtier."""
        if self._touch_interval_s > 0 and len(self._touched) < _MAX_TOUCHED:
            self._touched.update(bytes(k) for k in keys)

    def on_new_request(self, req_context: Any) -> Any:
        """Chunk-level offloading (vLLM's default): only newly computed chunks are stored."""
        return self._api.request_context()

    def on_request_finished(self, req_context: Any) -> None:
        """Drop the request's hold on lookup verdicts (probes in flight finish first)."""
        for name in self._req_keys.pop(req_context.req_id, ()):
            probe = self._probes.get(name)
            if probe is None:
                continue
            probe.requests.discard(req_context.req_id)
            if not probe.requests and not probe.in_flight:
                del self._probes[name]

    def _current(self, name: bytes, generation: int) -> bool:
        probe = self._probes.get(name)
        return probe is not None and probe.generation == generation

    def _drain_probes(self) -> None:
        while not self._probe_results.empty():
            for name, generation, found in self._probe_results.get_nowait():
                probe = self._probes.get(name)
                if probe is None or probe.generation != generation:
                    continue
                probe.in_flight = False
                if not probe.requests:
                    del self._probes[name]
                else:
                    probe.found = found

    def _set_verdicts(self, names: Iterable[bytes], found: bool) -> None:
        """After a job: a stored key is present, a key that failed to load is a miss (so vLLM
        does not promote it again). Verdicts still on their way are left to their probe."""
        for name in names:
            probe = self._probes.get(name)
            if probe is not None and probe.found is not None:
                probe.found = found

    # Stores and loads: coroutines on the loop thread, reported by get_finished_jobs.

    def submit_store(self, job_metadata: Any) -> None:
        """Put the job's primary rows into kvtier (put-if-absent); keys already known to be
        there are skipped."""
        names = [bytes(k) for k in job_metadata.keys]
        todo = [
            i
            for i, name in enumerate(names)
            if (probe := self._probes.get(name)) is None or probe.found is not True
        ]
        views = [self._row(job_metadata.chunk_ids[i]) for i in todo]
        coro = self._store([keys.fit_key(names[i]) for i in todo], views)
        self._start(job_metadata.job_id, False, list(job_metadata.keys), coro)

    def submit_load(self, job_metadata: Any) -> None:
        """Get the job's keys from kvtier straight into the primary rows vLLM allocated."""
        names = [keys.fit_key(bytes(k)) for k in job_metadata.keys]
        views = [self._row(c) for c in job_metadata.chunk_ids]
        self._start(job_metadata.job_id, True, list(job_metadata.keys), self._load(names, views))

    def get_finished_jobs(self) -> Iterable[Any]:
        """The jobs that finished since the last call: success, or failure (with the keys that
        did load, for a partial load)."""
        results = []
        for job_id, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[job_id]
            outcome = _outcome_of(job.future)
            names = [bytes(k) for k in job.keys]
            loaded = None
            if job.load and not outcome.success:
                done = set(outcome.done or ())
                loaded = [job.keys[i] for i in sorted(done)]
                self._set_verdicts((n for i, n in enumerate(names) if i not in done), False)
            elif not job.load and outcome.success:
                self._set_verdicts(names, True)
            results.append(
                self._api.job_result(
                    job_id=job_id, success=outcome.success, successful_keys=loaded or None,
                    transfer_time=outcome.seconds, transfer_bytes=outcome.nbytes or None,
                )
            )  # fmt: skip
        return results

    def has_pending_work(self) -> bool:
        """Whether vLLM must keep stepping: jobs or probes in flight, answers not yet read."""
        return bool(
            self._jobs
            or self._batch
            or any(not f.done() for f in self._probe_futures)
            or not self._probe_results.empty()
        )

    def drain_jobs(self) -> None:
        """Block until every submitted store and load has finished (each is bounded by the
        client's deadlines); their results come from the next get_finished_jobs()."""
        futures = [job.future for job in self._jobs.values()]
        _, pending = concurrent.futures.wait(futures, timeout=_DRAIN_WARN_S)
        if pending:
            log.warning("kvtier vLLM tier: still draining %d jobs after 5 s", len(pending))
            concurrent.futures.wait(pending)

    def shutdown(self) -> None:
        """Let jobs in flight finish (or give them up: no byte touches a row once its call is
        abandoned), close the client, stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        futures: list[concurrent.futures.Future[Any]] = [j.future for j in self._jobs.values()]
        futures += [*self._probe_futures, self._connecting]
        bound_s = 2 * self.settings.timeout_s + 1.0
        _, pending = concurrent.futures.wait(futures, timeout=bound_s)
        for future in pending:
            future.cancel()
        try:
            self._on_loop(self._close()).result(timeout=bound_s)
        except Exception as exc:  # the engine's boundary: shutting down never fails it
            self._note("close", repr(exc))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=bound_s)
        if not self._thread.is_alive():
            self._loop.close()

    def _row(self, chunk_id: Any) -> memoryview:
        start = int(chunk_id) * self._chunk_bytes
        return self._rows[start : start + self._chunk_bytes]

    def _start(
        self, job_id: int, load: bool, job_keys: list[Any], coro: Coroutine[Any, Any, _Outcome]
    ) -> None:
        if self._closed:
            coro.close()
            future: concurrent.futures.Future[_Outcome] = concurrent.futures.Future()
            future.set_result(_Outcome(False))
        else:
            future = self._on_loop(coro)
        self._jobs[job_id] = _Job(load, job_keys, future)

    def _on_loop(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # On the loop thread.

    async def _connected(self) -> kv.AsyncKVClient | None:
        """The client, connecting when there is none (not again until retry_s has passed
        after a failed attempt)."""
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None and time.monotonic() >= self._retry_at:
                try:
                    self._client = await kv.AsyncKVClient.connect(**self._connect_kwargs)
                except Exception as exc:  # unreachable cluster: misses until retry_s passes
                    self._retry_at = time.monotonic() + self.settings.retry_s
                    self._note("connect", repr(exc))
            return self._client

    async def _probe(self, batch: Sequence[tuple[bytes, int]]) -> None:
        found = [False] * len(batch)
        client = await self._connected()
        if client is not None:
            try:
                found = await client.exists_batch([keys.fit_key(n) for n, _ in batch])
            except Exception as exc:  # the engine's boundary: a failed probe is a miss
                self._note("lookup", repr(exc))
        self._probe_results.put([(n, g, f) for (n, g), f in zip(batch, found, strict=True)])

    async def _store(self, names: list[bytes], views: list[memoryview]) -> _Outcome:
        if not names:
            return _Outcome(True)
        client = await self._connected()
        if client is None:
            return _Outcome(False)
        async with self._slots:
            started = time.perf_counter()
            try:
                ttl_s = self.settings.ttl_s or None
                statuses = await client.put_batch(
                    names, views, ttl_s=ttl_s, engine_hashes=[_block_hash(n) for n in names]
                )
            except Exception as exc:  # the engine's boundary: a failed store is reported
                self._note("store", repr(exc))
                return _Outcome(False)
            seconds = time.perf_counter() - started
        refused = sorted({s.value for s in statuses if s not in _STORED})
        if refused:
            self._note("store", f"refused: {', '.join(refused)}")
        stored = sum(v.nbytes for v, s in zip(views, statuses, strict=True) if s in _STORED)
        return _Outcome(not refused, nbytes=stored, seconds=seconds)

    async def _load(self, names: list[bytes], views: list[memoryview]) -> _Outcome:
        client = await self._connected()
        if client is None:
            return _Outcome(False, done=())
        async with self._slots:
            started = time.perf_counter()
            try:
                sizes = await client.get_batch(names, views)
            except Exception as exc:  # the engine's boundary: a failed load is recomputed
                self._note("load", repr(exc))
                return _Outcome(False, done=())
            seconds = time.perf_counter() - started
        done = tuple(i for i, size in enumerate(sizes) if size == self._chunk_bytes)
        if any(size is not None and size != self._chunk_bytes for size in sizes):
            self._note("load", f"blocks of another size than the chunk's {self._chunk_bytes} B")
        nbytes = len(done) * self._chunk_bytes
        if len(done) == len(names):
            return _Outcome(True, nbytes=nbytes, seconds=seconds)
        return _Outcome(False, done=done, nbytes=nbytes, seconds=seconds)

    async def _touch(self, names: list[bytes]) -> None:
        client = self._client
        if client is None:
            return
        try:
            await client.touch([keys.fit_key(n) for n in names])
        except Exception as exc:  # touches are hints: a failed one changes nothing
            self._note("touch", repr(exc))

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _note(self, op: str, what: str) -> None:
        """Log a failure at most once per op every 30 s (a dead cluster must not flood the
        engine's log), saying how many were not logged in between."""
        now = time.monotonic()
        with self._notes_lock:
            logged_at, skipped = self._notes.get(op, (-_LOG_EVERY_S, 0))
            if now - logged_at < _LOG_EVERY_S:
                self._notes[op] = (logged_at, skipped + 1)
                return
            self._notes[op] = (now, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        log.warning("kvtier vLLM tier: %s failed, served as misses: %s%s", op, what, more)


def _block_hash(name: bytes) -> bytes:
    """vLLM's block hash in an OffloadKey (the hash, then the KV-cache group as 4 bytes): what
    vLLM's own KV events publish, so the tier's events name the block the same way."""
    return name[:-4] if len(name) > 4 else name


def _outcome_of(future: concurrent.futures.Future[_Outcome]) -> _Outcome:
    """A finished job's outcome; a cancelled or crashed job is a failure."""
    if future.cancelled():
        return _Outcome(False, done=())
    error = future.exception()
    if error is not None:
        log.warning("kvtier vLLM tier: a job failed: %r", error)
        return _Outcome(False, done=())
    return future.result()


def tier_class(api: VLLMApi) -> type:
    """`KVTierTier` as a subclass of api.base (vLLM's `SecondaryTierManager`, or a stand-in)."""
    return type(CLASS_NAME, (KVTierTier, api.base), {"__module__": __name__, "_api": api})


def __getattr__(name: str) -> Any:
    """`KVTierSecondaryTier`, made on first access against the installed vLLM."""
    if name != CLASS_NAME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = tier_class(vllm_api())
    globals()[CLASS_NAME] = cls
    return cls
