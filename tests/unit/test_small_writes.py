"""Small writes of one drive: the journal's group commit and `ShardStore.write_small`.

Concurrent commits share one fdatasync (the sync is held until the others have queued, so the
batch is known); a failed sync fails every commit of its batch. A small write is one step that
leaves no staging directory and is read back whole, also after a "crash" that lost the meta file
the journal had already made durable (the store is abandoned and a new one opened on the drive).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import drives, journal, shards

BUCKET = "small-bucket"
WRITERS = 6


def open_store(path: Path) -> shards.ShardStore:
    return shards.ShardStore(drives.open_drive(path, "node-1"))


@pytest.fixture
def drive_dir(tmp_path: Path) -> Path:
    return tmp_path / "drive"


@pytest.fixture
def store(drive_dir: Path) -> Iterator[shards.ShardStore]:
    opened = open_store(drive_dir)
    yield opened
    opened.close()


def held_first_sync(
    monkeypatch: pytest.MonkeyPatch, log: journal.Journal, then: Callable[[int], None]
) -> list[int]:
    """Make the journal's first fdatasync wait until WRITERS - 1 more records are queued; every
    sync calls then(n) (n: 1 for the first) before the real one. Returns the fds synced."""
    real = os.fdatasync
    synced: list[int] = []

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 1:
            deadline = time.monotonic() + 10
            while len(log._queued) < WRITERS - 1:
                assert time.monotonic() < deadline, "the other writers never queued"
                time.sleep(0.001)
        then(len(synced))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return synced


def commit_all(log: journal.Journal, records: list[bytes]) -> list[BaseException | None]:
    """Commit each record from its own thread, the first one alone before the others."""

    def commit(record: bytes) -> BaseException | None:
        try:
            log.commit(record)
        except errors.KVTierError as exc:
            return exc
        return None

    with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        first = pool.submit(commit, records[0])
        while not log._syncing:
            time.sleep(0.001)
        rest = [pool.submit(commit, r) for r in records[1:]]
        return [first.result(), *(f.result() for f in rest)]


def records(count: int) -> list[bytes]:
    return [journal.encode(journal.Kind.INSTALL, f"record {i}".encode()) for i in range(count)]


def test_concurrent_commits_share_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = journal.Journal(tmp_path / "journal")
    held_first_sync(monkeypatch, log, lambda n: None)
    wanted = records(WRITERS)
    assert commit_all(log, wanted) == [None] * WRITERS
    # One sync for the first writer, one for the other WRITERS - 1 queued behind it.
    assert log.syncs == 2
    got = [body for _, body in journal.Journal(tmp_path / "journal").read()]
    assert sorted(got) == sorted(f"record {i}".encode() for i in range(WRITERS))
    assert got[0] == b"record 0"
    log.close()


def test_a_failed_sync_fails_its_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = journal.Journal(tmp_path / "journal")

    def second_fails(n: int) -> None:
        if n == 2:
            raise OSError(5, "Input/output error")

    held_first_sync(monkeypatch, log, second_fails)
    results = commit_all(log, records(WRITERS))
    assert results[0] is None
    assert all(isinstance(r, errors.Unavailable) for r in results[1:]), results
    # The journal is broken until a restart; the failed batch is not replayed.
    with pytest.raises(errors.Unavailable):
        log.commit(records(1)[0])
    assert [body for _, body in journal.Journal(tmp_path / "journal").read()] == [b"record 0"]
    log.close()


def test_a_torn_tail_ends_the_replay() -> None:
    raw = b"".join(records(3))
    assert len(list(journal.decode(raw))) == 3
    assert [b for _, b in journal.decode(raw[:-3])] == [b"record 0", b"record 1"]
    flipped = bytearray(raw)
    flipped[len(records(1)[0]) + 7] ^= 1
    assert [b for _, b in journal.decode(bytes(flipped))] == [b"record 0"]


def small_meta(key: str, shard: bytes, mtime_ns: int = 0) -> datanode_pb2.ShardMeta:
    meta = datanode_pb2.ShardMeta(
        bucket=BUCKET, key=key, size=len(shard) * 2, etag="e" * 32, data_shards=2,
        parity_shards=1, mtime_unix_ns=mtime_ns or time.time_ns(), data_id=os.urandom(8).hex(),
    )  # fmt: skip
    meta.parts.add(number=1, size=len(shard) * 2, etag="e" * 32, shard_bytes=len(shard))
    return meta


def read_back(store: shards.ShardStore, key: str) -> bytes:
    meta = store.read_meta(BUCKET, key)
    out = bytearray(meta.parts[0].shard_bytes)
    store.read_shard(BUCKET, key, 1, 0, 1, out, data_id=meta.data_id)
    return bytes(out)


def test_a_small_write_is_one_step_with_its_shard_inline(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    shard = os.urandom(2048)
    stored = store.write_small(small_meta("k", shard), shard)
    assert shards.is_inline(stored)
    assert stored.format_version == shards.FORMAT_VERSION
    assert read_back(store, "k") == shard
    assert [e.key for e in store.list(BUCKET)] == ["k"]
    assert store.verify(BUCKET, "k") == []
    object_dir = next(drive_dir.glob(f"objects/{BUCKET}/*/*"))
    assert [p.name for p in object_dir.iterdir()] == ["meta"]
    assert list((drive_dir / shards.TMP_DIR).iterdir()) == []
    assert store._journal.bytes > 0
    # Empty shards (0-byte objects) and the 512 KiB limit.
    store.write_small(small_meta("empty", b""), b"")
    assert store.read_meta(BUCKET, "empty").parts[0].shard_bytes == 0
    big = bytes(shards.SMALL_WRITE_MAX_BYTES + 1)
    with pytest.raises(errors.InvalidArgument):
        store.write_small(small_meta("big", big), big)
    with pytest.raises(errors.InvalidArgument):
        store.write_small(small_meta("short", shard[:10]), shard)


def test_concurrent_small_writes_are_each_durable(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    by_key = {f"k{i}": os.urandom(100 + i) for i in range(32)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.write_small(small_meta(k, by_key[k]), by_key[k]), by_key))
    assert store._journal.syncs <= len(by_key)
    # A crash that loses every meta file the journal covered: all come back at open.
    for meta_file in drive_dir.glob(f"objects/{BUCKET}/*/*/meta"):
        meta_file.write_bytes(b"")
    reopened = open_store(drive_dir)
    try:
        for key, shard in by_key.items():
            assert read_back(reopened, key) == shard
        assert [e.key for e in reopened.list(BUCKET)] == sorted(by_key)
        assert reopened._journal.bytes == 0  # replayed, synced, emptied
    finally:
        reopened.close()


def test_an_older_small_write_is_superseded_also_at_replay(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    newer, older = os.urandom(64), os.urandom(64)
    now = time.time_ns()
    store.write_small(small_meta("k", newer, now), newer)
    with pytest.raises(shards.Superseded):
        store.write_small(small_meta("k", older, now - 1000), older)
    assert read_back(store, "k") == newer
    reopened = open_store(drive_dir)
    try:
        assert read_back(reopened, "k") == newer
    finally:
        reopened.close()


def test_a_journaled_delete_stays_deleted_and_spares_a_later_version(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    gone, kept = os.urandom(64), os.urandom(64)
    store.write_small(small_meta("gone", gone), gone)
    store.write_small(small_meta("kept", kept), kept)
    assert store.delete(BUCKET, "gone")
    assert store.delete(BUCKET, "kept")
    # A later version of "kept" by the staged path (synced, not journaled).
    later = small_meta("kept", kept, time.time_ns() + 1000)
    with store.begin_write("w1", block_bytes=later.block_bytes or shards.BLOCK_BYTES) as write:
        write.write_part(1, 0, kept)
        write.only_if_newer = True
        write.commit(later)
    reopened = open_store(drive_dir)  # the crash: the journal is replayed
    try:
        with pytest.raises(errors.NotFound):
            reopened.read_meta(BUCKET, "gone")
        assert reopened.read_meta(BUCKET, "kept").data_id == later.data_id
        assert read_back(reopened, "kept") == kept
        assert [e.key for e in reopened.list(BUCKET)] == ["kept"]
    finally:
        reopened.close()


def test_a_checkpoint_empties_the_journal(
    store: shards.ShardStore, drive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = journal.sync_filesystem

    def sync_filesystem(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(journal, "sync_filesystem", sync_filesystem)
    monkeypatch.setattr(shards, "JOURNAL_CHECKPOINT_BYTES", 4096)
    for i in range(20):
        shard = os.urandom(500)
        store.write_small(small_meta(f"k{i}", shard), shard)
    assert synced
    assert store._journal.bytes <= 4096 + 2048
    # (the file runs on past the records: preallocated zeros)
    assert (drive_dir / shards.JOURNAL_FILE).stat().st_size > store._journal.bytes
    store.close()
    assert (drive_dir / shards.JOURNAL_FILE).stat().st_size == 0
    reopened = open_store(drive_dir)
    try:
        assert len(reopened.list(BUCKET)) == 20
    finally:
        reopened.close()


def test_a_failed_journal_sync_fails_the_small_write_and_stores_nothing(
    store: shards.ShardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", broken)
    shard = os.urandom(64)
    with pytest.raises(errors.Unavailable):
        store.write_small(small_meta("k", shard), shard)
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, "k")
    assert store.list(BUCKET) == []


def test_small_writes_and_readers_of_one_key(store: shards.ShardStore) -> None:
    """Readers see one whole version or the next, never a mix, while writers replace it."""
    stop = threading.Event()
    seen: set[bytes] = set()
    versions = [bytes([i]) * 300 for i in range(20)]

    def reader() -> None:
        while not stop.is_set():
            try:
                got = read_back(store, "k")
            except (errors.NotFound, errors.PreconditionFailed):
                continue  # not there yet, or replaced between the meta read and the shard read
            assert got in versions
            seen.add(got)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        for v in versions:
            store.write_small(small_meta("k", v), v)
        stop.set()
        for r in readers:
            r.result()
    assert read_back(store, "k") == versions[-1]


def test_replay_restores_an_index_entry_a_crash_lost(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    """The crash came after the meta file was replaced and before its index entry was written."""
    shard = os.urandom(64)
    store.write_small(small_meta("k", shard), shard)
    store._index.remove(BUCKET, "k")
    assert store.list(BUCKET) == []
    reopened = open_store(drive_dir)
    try:
        assert [e.key for e in reopened.list(BUCKET)] == ["k"]
        assert read_back(reopened, "k") == shard
    finally:
        reopened.close()


def test_a_small_write_over_128_kib_is_inline_journaled_and_replayed(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    # A 2 MiB object's shard on RS 4+2 (512 KiB) and on 8+4 (256 KiB), in 64 KiB blocks.
    by_key = {"four": os.urandom(shards.SMALL_WRITE_MAX_BYTES), "eight": os.urandom(256 << 10)}
    metas = [small_meta(k, s) for k, s in by_key.items()]
    for meta in metas:
        meta.block_bytes = 64 << 10
    got = store.write_smalls([(m, by_key[m.key]) for m in metas])
    assert all(isinstance(g, datanode_pb2.ShardMeta) and shards.is_inline(g) for g in got)
    assert store._journal.bytes > sum(map(len, by_key.values()))
    for key, shard in by_key.items():
        object_dir = store._object_dir(BUCKET, key)
        assert [p.name for p in object_dir.iterdir()] == ["meta"]
        assert store.verify(BUCKET, key) == []
        meta = store.read_meta(BUCKET, key)
        out = bytearray(64 << 10)  # a block in the middle (a ranged read)
        assert store.read_shard(BUCKET, key, 1, 2, 1, out, data_id=meta.data_id) == len(out)
        assert bytes(out) == shard[128 << 10 : 192 << 10]
    # A crash that lost the meta files: the journal's large records bring them back.
    for meta_file in drive_dir.glob(f"objects/{BUCKET}/*/*/meta"):
        meta_file.write_bytes(b"")
    reopened = open_store(drive_dir)
    try:
        for key, shard in by_key.items():
            out = bytearray(len(shard))
            meta = reopened.read_meta(BUCKET, key)
            reopened.read_shard(BUCKET, key, 1, 0, len(shard) >> 16, out, data_id=meta.data_id)
            assert out == shard
        # A staged write of that size stays in files, whatever inline_data its request had.
        shard = os.urandom(300 << 10)
        meta = small_meta("four", shard)
        meta.inline_data = b"stale"
        write = reopened.begin_write("staged")
        write.write_part(1, 0, shard)
        stored = write.commit(meta)
        assert not shards.is_inline(stored)
        assert not stored.inline_data
        assert read_back(reopened, "four") == shard
        assert (reopened._object_dir(BUCKET, "four") / stored.data_id / "part.1").exists()
    finally:
        reopened.close()
