"""What a drive tells a writer about version stamps: the current version's stamp
(`ShardStore.current_stamp`, sent with a write's first WRITE_SHARD reply) and, when a commit is
superseded, the newer version's stamp (`Superseded.current_mtime_unix_ns`, sent in the commit's
reply), from which the gateway's hybrid logical clock stamps its write above it."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import drives, shards

BUCKET = "stamps"
MINUTE_NS = 60 * 10**9


@pytest.fixture
def store(tmp_path: Path) -> Iterator[shards.ShardStore]:
    opened = shards.ShardStore(drives.open_drive(tmp_path / "drive", "node-1"))
    yield opened
    opened.close()


def meta(key: str, data: bytes, mtime_ns: int, data_id: str) -> datanode_pb2.ShardMeta:
    etag = hashlib.md5(data).hexdigest()
    return datanode_pb2.ShardMeta(
        bucket=BUCKET, key=key, size=len(data), etag=etag, mtime_unix_ns=mtime_ns,
        data_id=data_id, block_bytes=4096,
        parts=[datanode_pb2.ShardMeta.Part(number=1, size=len(data), etag=etag,
                                           shard_bytes=len(data))],
    )  # fmt: skip


def staged_commit(store: shards.ShardStore, m: datanode_pb2.ShardMeta, data: bytes) -> None:
    """A staged write committed as the datanode commits a gateway's (only_if_newer)."""
    with store.begin_write(os.urandom(8).hex(), block_bytes=m.block_bytes) as write:
        write.write_part(1, 0, data)
        write.only_if_newer = True
        write.commit(m)


def test_current_stamp_is_the_current_versions_mtime(store: shards.ShardStore) -> None:
    assert store.current_stamp(BUCKET, "k") == 0
    now = time.time_ns()
    store.write_small(meta("k", b"a", now, "v1"), b"a")
    assert store.current_stamp(BUCKET, "k") == now
    big = os.urandom(200 << 10)  # not inline: a data dir
    staged_commit(store, meta("k", big, now + 5, "v2"), big)
    assert store.current_stamp(BUCKET, "k") == now + 5
    assert store.delete(BUCKET, "k")
    assert store.current_stamp(BUCKET, "k") == 0


def test_a_superseded_small_write_names_the_newer_stamp(store: shards.ShardStore) -> None:
    """A gateway 10 min behind writes after one 10 min ahead: refused, with the stamp to beat;
    the same version stamped above it is then taken."""
    ahead = time.time_ns() + 10 * MINUTE_NS
    store.write_small(meta("k", b"first", ahead, "a" * 32), b"first")
    behind = meta("k", b"second", ahead - 20 * MINUTE_NS, "b" * 32)
    with pytest.raises(shards.Superseded) as refused:
        store.write_small(behind, b"second")
    assert refused.value.current_mtime_unix_ns == ahead
    behind.mtime_unix_ns = refused.value.current_mtime_unix_ns + 1
    store.write_small(behind, b"second")
    assert store.read_meta(BUCKET, "k").data_id == "b" * 32


def test_a_superseded_staged_commit_names_the_newer_stamp(store: shards.ShardStore) -> None:
    ahead = time.time_ns() + 10 * MINUTE_NS
    newer = os.urandom(200 << 10)
    staged_commit(store, meta("k", newer, ahead, "a" * 32), newer)
    older = os.urandom(200 << 10)
    with pytest.raises(shards.Superseded) as refused:
        staged_commit(store, meta("k", older, ahead - MINUTE_NS, "b" * 32), older)
    assert refused.value.current_mtime_unix_ns == ahead
    assert store.read_meta(BUCKET, "k").data_id == "a" * 32


def test_the_skew_bound_is_30_minutes_and_typed(store: shards.ShardStore) -> None:
    """Stamps up to 30 min ahead of the drive's clock are taken (gateways skewed ±10 min, and
    hybrid clocks that observed them); beyond, ClockSkew (Unavailable) and nothing stored."""
    assert shards.MAX_FUTURE_MTIME_NS == 30 * MINUTE_NS
    store.write_small(meta("k", b"ok", time.time_ns() + 25 * MINUTE_NS, "c" * 32), b"ok")
    far = meta("k", b"no", time.time_ns() + 31 * MINUTE_NS, "d" * 32)
    with pytest.raises(errors.ClockSkew, match="ahead of this datanode's clock"):
        store.write_small(far, b"no")
    assert store.read_meta(BUCKET, "k").data_id == "c" * 32
