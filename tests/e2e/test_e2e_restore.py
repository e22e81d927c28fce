"""Issue 7's end-to-end proof in CI: a transformer's prefix KV cache restored from kvtier (and from
files and Redis) in a fresh process gives the recompute's logits, KV and greedy tokens.

A real dev cluster (`kvtier up --detach`, 2 kvcache nodes, secure by default) and a real
redis-server run on 127.0.0.1 for the module. The worker processes use kvtier as a user of the
cluster would: a user trusted for same-host shared memory (`kvtier admin user add --trust-shm`) in
KVTIER_CA_FILE / KVTIER_ACCESS_KEY / KVTIER_SECRET_KEY, none of the test's own credentials. The
model is `bench.e2e.layout.SMALL` (a Llama config with seeded random weights, no download); the
processes are `bench.e2e.worker`'s, as in `make e2e`. Redis is skipped only when redis-server is not
installed; kvtier never is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.e2e import jobs, layout, servers, stores, sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SALT = "ci"
CHUNK = 256
#: 1024: every chunk of the context is restored; 1000: three full chunks are, the rest of the
#: context is prefilled with the question.
LENGTHS = (1024, 1000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.DevCluster]:
    dev = servers.DevCluster(tmp_path_factory.mktemp("e2e-cluster") / "state")
    try:
        dev.start()
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    """A redis-server's port, or 0 when it is not installed (the Redis test then skips)."""
    if servers.redis_unavailable() is not None:
        yield 0
        return
    server = servers.Redis()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def restored(
    cluster: servers.DevCluster, redis_port: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One producer and one fresh restorer process over every store that is available."""
    reason = sweep.missing_dependencies()
    if reason is not None:
        pytest.skip(f"the e2e model needs the e2e extra: {reason}")
    work = tmp_path_factory.mktemp("e2e-work")
    job = jobs.Job(
        model="small",
        lengths=LENGTHS,
        salt=SALT,
        recompute_repeats=1,
        restore_repeats=1,
        methods=("kvtier", "disk", "redis") if redis_port else ("kvtier", "disk"),
        metadata=cluster.metadata,
        redis_port=redis_port,
        disk_dir=str(work / "files"),
    )
    try:
        return sweep.run_workers(job, work / "workers", cluster.client_env())
    except sweep.WorkerFailed as exc:
        pytest.fail(f"{exc}\n{cluster.log_tails()}")


def _assert_restores(run: dict[str, Any], method: str) -> None:
    rows = [r for r in sweep.checks(run) if r["method"] == method]
    assert [r["length"] for r in rows] == list(LENGTHS)
    assert all(r["ok"] for r in rows), rows
    lengths = run["restored"]["lengths"]
    assert lengths["1024"]["methods"][method]["restored_tokens"] == 1024
    assert lengths["1000"]["methods"][method]["restored_tokens"] == 768
    for entry in lengths.values():
        result = entry["methods"][method]
        assert result["tokens"] == entry["recompute"]["tokens"]
        assert len(result["tokens"]) == run["job"]["generate_tokens"]
        assert result["logit_diff"] <= sweep.LOGIT_TOLERANCE
        assert result["ttft_s"] > 0


def test_restore_from_kvtier_matches_recompute(restored: dict[str, Any]) -> None:
    assert restored["produced"]["weights_digest"] == restored["restored"]["weights_digest"]
    _assert_restores(restored, "kvtier")


def test_restore_from_files_matches_recompute(restored: dict[str, Any]) -> None:
    _assert_restores(restored, "disk")


def test_restore_from_redis_matches_recompute(restored: dict[str, Any], redis_port: int) -> None:
    if not redis_port:
        pytest.skip(f"Redis: {servers.redis_unavailable()}")
    _assert_restores(restored, "redis")


def _sha(buf: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(buf.data).hexdigest()


def test_chain_keys_find_the_shared_prefix(cluster: servers.DevCluster) -> None:
    """Chained keys in kvtier (no model needed): lookup finds exactly the shared prefix, a cache
    salt isolates, and 2 MiB blocks come back byte for byte into preallocated buffers."""
    spec = layout.BENCH
    block = spec.block_bytes(CHUNK)
    tokens = layout.context_tokens(spec, 4 * CHUNK, seed=11)
    keys = layout.chain_keys(spec.model_id, SALT, tokens, CHUNK)
    rng = np.random.default_rng(11)
    blocks = [rng.integers(0, 256, block, dtype=np.uint8) for _ in keys]
    store = stores.KVTierStore(
        "kvtier", cluster.metadata, f"{spec.model_id}@{SALT}", security=cluster.security()
    )
    try:
        store.warm_up()
        # The user is trusted for shared memory: every node's session is the shm fast path.
        sessions = [n.session for n in store.client._inner._set.nodes()]
        assert [s.name if s else None for s in sessions] == ["shm"] * len(sessions)
        store.put(keys, blocks)
        forked = tokens.copy()
        forked[2 * CHUNK + 5] = (forked[2 * CHUNK + 5] + 1) % spec.vocab_size
        forked_keys = layout.chain_keys(spec.model_id, SALT, forked, CHUNK)
        assert forked_keys[:2] == keys[:2]
        assert not set(forked_keys[2:]) & set(keys)
        longer = np.concatenate([tokens, layout.question_tokens(spec, 1, 2 * CHUNK, seed=11)])
        assert store.lookup(keys) == 4
        assert store.lookup(forked_keys) == 2
        assert store.lookup(layout.chain_keys(spec.model_id, SALT, longer, CHUNK)) == 4
        assert store.lookup(layout.chain_keys(spec.model_id, "other", tokens, CHUNK)) == 0
        outs = [np.empty(block, np.uint8) for _ in keys]
        store.get_into(keys, outs)
        assert [_sha(o) for o in outs] == [_sha(b) for b in blocks]
    finally:
        store.close()


def test_restorable_chunks_leave_a_token_to_compute() -> None:
    assert layout.restorable_chunks(1024, CHUNK) == 3
    assert layout.restorable_chunks(1025, CHUNK) == 4
    assert layout.restorable_chunks(1, CHUNK) == 0


def test_files_store_round_trips_and_reports_short_reads(tmp_path: Path) -> None:
    store = stores.FileStore("disk-cold", tmp_path, cold=True)
    keys = [b"a" * 32, b"b" * 32]
    blocks = [np.full(4096, i, np.uint8) for i in range(2)]
    store.put(keys, blocks)
    assert store.lookup([*keys, b"c" * 32]) == 2
    store.before_restore(keys)
    outs = [np.empty(4096, np.uint8) for _ in keys]
    store.get_into(keys, outs)
    assert [_sha(o) for o in outs] == [_sha(b) for b in blocks]
    with pytest.raises(KeyError, match="only 4096 bytes"):
        store.get_into(keys[:1], [np.empty(8192, np.uint8)])
