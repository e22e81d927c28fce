"""Unit tests of services.datanode.shards: one drive's shard store.

Round trips compare bytes; crashes are simulated by raising from the durable steps (fsync,
rename, replace, rmtree, index updates) one at a time, abandoning the store without cleanup and
opening a new one on the same drive, which must read back the old version or the new one, whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kvtier import errors, names
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import drives, framing, index, shardrecovery, shards

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
BUCKET = "test-bucket"
KEY = "dir/object.bin"
SMALL_BLOCK = 4 * KIB
INLINE = shards.INLINE_MAX_BYTES


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


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip fsync where a test exercises logic, not durability (thousands of commits)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def content(tag: str, size: int) -> bytes:
    return random.Random(f"{tag}/{size}").randbytes(size)


def make_meta(key: str, parts: list[bytes], bucket: str = BUCKET) -> datanode_pb2.ShardMeta:
    whole = b"".join(parts)
    return datanode_pb2.ShardMeta(
        bucket=bucket,
        key=key,
        size=len(whole),
        etag=hashlib.md5(whole).hexdigest(),
        content_type="application/octet-stream",
        parts=[
            datanode_pb2.ShardMeta.Part(
                number=n, size=len(p), etag=hashlib.md5(p).hexdigest(), shard_bytes=len(p)
            )
            for n, p in enumerate(parts, 1)
        ],
    )


def stage(
    store: shards.ShardStore,
    parts: list[bytes],
    *,
    chunk: int = 0,
    block_bytes: int = SMALL_BLOCK,
    write_id: str = "",
) -> shards.StagedWrite:
    write = store.begin_write(write_id or uuid.uuid4().hex, block_bytes=block_bytes)
    for number, data in enumerate(parts, 1):
        step = chunk or max(1, len(data))
        for offset in range(0, len(data), step):
            assert write.write_part(number, offset, data[offset : offset + step]) == len(
                data[offset : offset + step]
            )
    return write


def put(
    store: shards.ShardStore, key: str, parts: list[bytes], bucket: str = BUCKET, **kw: Any
) -> datanode_pb2.ShardMeta:
    with stage(store, parts, **kw) as write:
        return write.commit(make_meta(key, parts, bucket))


def read_parts(
    store: shards.ShardStore, key: str, bucket: str = BUCKET, meta: Any = None
) -> list[bytes]:
    """Every part's shard bytes of the version `meta` (default: the current one)."""
    meta = meta or store.read_meta(bucket, key)
    out = []
    for part in meta.parts:
        buf = bytearray(part.shard_bytes)
        blocks = -(-part.shard_bytes // meta.block_bytes)
        got = store.read_shard(bucket, key, part.number, 0, blocks, buf, data_id=meta.data_id)
        assert got == part.shard_bytes
        out.append(bytes(buf))
    return out


def object_dir(drive: Path, key: str, bucket: str = BUCKET) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return drive / "objects" / bucket / digest[:2] / digest


def part_file(drive: Path, meta: datanode_pb2.ShardMeta, number: int = 1) -> Path:
    return object_dir(drive, meta.key, meta.bucket) / meta.data_id / f"part.{number}"


# Round trips.


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK, shards.BLOCK_BYTES])
@pytest.mark.parametrize(
    "size", [0, 1, 4 * KIB, INLINE - 1, INLINE, INLINE + 1, MIB + 3, 3 * MIB + 5]
)
def test_round_trip_is_byte_exact(
    store: shards.ShardStore, drive_dir: Path, size: int, block_bytes: int
) -> None:
    data = content("rt", size)
    meta = put(store, KEY, [data], block_bytes=block_bytes)
    assert read_parts(store, KEY) == [data]
    assert store.verify(BUCKET, KEY) == []
    stored = store.read_meta(BUCKET, KEY)
    assert stored == meta
    assert (stored.block_bytes, stored.size) == (block_bytes, size)
    entries = [p.name for p in object_dir(drive_dir, KEY).iterdir()]
    if size <= INLINE:
        assert entries == ["meta"]
        assert len(stored.inline_data) == framing.framed_bytes(size, block_bytes)
    else:
        assert sorted(entries) == sorted(["meta", meta.data_id])
        assert part_file(drive_dir, meta).stat().st_size == framing.framed_bytes(size, block_bytes)


@pytest.mark.parametrize(
    "sizes", [[5 * KIB, 3], [INLINE, 1], [MIB + 1, 0, 70 * KIB, 2 * MIB], [100, 200, 300]]
)
def test_several_parts_round_trip(store: shards.ShardStore, sizes: list[int]) -> None:
    parts = [content(f"part{i}", size) for i, size in enumerate(sizes)]
    put(store, KEY, parts, chunk=10_000)
    assert read_parts(store, KEY) == parts
    assert store.verify(BUCKET, KEY) == []


def test_metadata_fields_round_trip(store: shards.ShardStore) -> None:
    meta = make_meta(KEY, [b"x" * 10])
    meta.content_encoding, meta.content_disposition = "gzip", "attachment"
    meta.cache_control, meta.expires = "max-age=60", "Wed, 21 Oct 2026 07:28:00 GMT"
    meta.user_metadata["model"] = "llama"
    meta.checksums["CRC32C"] = "yZRlqg=="
    meta.data_shards, meta.parity_shards, meta.shard_index = 8, 4, 3
    meta.distribution.extend(range(12))
    meta.data_id = "version-1"
    with stage(store, [b"x" * 10]) as write:
        stored = write.commit(meta)
    assert store.read_meta(BUCKET, KEY) == stored
    assert stored.format_version == shards.FORMAT_VERSION
    assert stored.mtime_unix_ns > 0
    assert dict(stored.user_metadata) == {"model": "llama"}
    assert list(stored.distribution) == list(range(12))


def test_partial_block_ranges(store: shards.ShardStore) -> None:
    data = content("ranges", 10 * SMALL_BLOCK + 123)
    put(store, KEY, [data])
    for first, count in [(0, 1), (3, 2), (9, 5), (10, 1), (11, 0), (0, 100)]:
        buf = bytearray(len(data))
        got = store.read_shard(BUCKET, KEY, 1, first, count, buf)
        want = data[first * SMALL_BLOCK : (first + count) * SMALL_BLOCK]
        assert bytes(buf[:got]) == want
    with pytest.raises(errors.InvalidArgument):
        store.read_shard(BUCKET, KEY, 1, 12, 1, bytearray(SMALL_BLOCK))
    with pytest.raises(errors.InvalidArgument):
        store.read_shard(BUCKET, KEY, 1, 0, 2, bytearray(SMALL_BLOCK))  # buffer too small
    with pytest.raises(errors.InvalidArgument):
        store.read_shard(BUCKET, KEY, 2, 0, 1, bytearray(SMALL_BLOCK))  # no part 2


def test_pool_record(store: shards.ShardStore) -> None:
    meta = datanode_pb2.ShardMeta(bucket=BUCKET, key=KEY, size=5 * MIB, etag="e", is_pointer=True)
    meta.pool_pointer = 2
    with store.begin_write("pointer") as write:
        write.commit(meta)
    stored = store.read_meta(BUCKET, KEY)
    assert (stored.is_pointer, stored.pool_pointer) == (True, 2)
    [entry] = store.list(BUCKET)
    assert entry.is_pointer
    assert entry.size == 5 * MIB


# Streaming and validation of writes.


@pytest.mark.parametrize("chunk", [1000, 7 * KIB + 3, SMALL_BLOCK, 3 * SMALL_BLOCK])
def test_streaming_appends(store: shards.ShardStore, chunk: int) -> None:
    data = content("stream", 50 * SMALL_BLOCK + 17)
    put(store, KEY, [data], chunk=chunk)
    assert read_parts(store, KEY) == [data]


def test_block_aligned_writes_out_of_order(store: shards.ShardStore) -> None:
    data = content("ooo", 40 * SMALL_BLOCK + 99)
    spans = [(o, data[o : o + 4 * SMALL_BLOCK]) for o in range(0, len(data), 4 * SMALL_BLOCK)]
    random.Random(1).shuffle(spans)
    with store.begin_write("ooo", block_bytes=SMALL_BLOCK) as write:
        for offset, chunk in spans:
            write.write_part(1, offset, chunk)
        write.commit(make_meta(KEY, [data]))
    assert read_parts(store, KEY) == [data]


def test_bad_writes_are_refused(store: shards.ShardStore) -> None:
    with store.begin_write("bad", block_bytes=SMALL_BLOCK) as write:
        write.write_part(1, 0, b"a" * 100)
        with pytest.raises(errors.InvalidArgument, match="aligned"):
            write.write_part(1, 50, b"b")  # neither aligned nor the append point
        with pytest.raises(errors.InvalidArgument, match="overlaps"):
            write.write_part(1, 0, b"c")
        write.write_part(1, 100, b"d" * (SMALL_BLOCK - 100))
        with pytest.raises(errors.InvalidArgument, match="part number"):
            write.write_part(0, 0, b"x")
    with store.begin_write("hole", block_bytes=SMALL_BLOCK) as write:
        write.write_part(1, 0, b"a" * SMALL_BLOCK)
        write.write_part(1, 2 * SMALL_BLOCK, b"b" * 10)
        with pytest.raises(errors.InvalidArgument, match="holes"):
            write.commit(make_meta(KEY, [b"x" * (SMALL_BLOCK + 10)]))
        with pytest.raises(errors.PreconditionFailed):
            write.write_part(1, SMALL_BLOCK, b"x")  # a failed commit ends the write
    with store.begin_write("mismatch", block_bytes=SMALL_BLOCK) as write:
        write.write_part(1, 0, b"a" * 10)
        with pytest.raises(errors.InvalidArgument, match="shard_bytes"):
            write.commit(make_meta(KEY, [b"a" * 11]))
    with store.begin_write("extra", block_bytes=SMALL_BLOCK) as write:
        write.write_part(2, 0, b"a")
        with pytest.raises(errors.InvalidArgument, match="parts"):
            write.commit(make_meta(KEY, [b"a"]))
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    assert not os.listdir(store.drive.path / shards.TMP_DIR)


def test_a_version_from_the_future_is_refused(store: shards.ShardStore) -> None:
    """A forged ShardMeta with a far-future mtime would become a permanent version (every later
    write loses against it): refused past the 30 min bound (ClockSkew, typed); a stamp 10 min
    ahead (a gateway's clock skew, or a hybrid logical clock that observed one) is fine."""
    forged = make_meta(KEY, [b"x"])
    forged.mtime_unix_ns = time.time_ns() + 1900 * 10**9
    with stage(store, [b"x"]) as write, pytest.raises(errors.ClockSkew, match="ahead"):
        write.commit(forged)
    skewed = make_meta(KEY, [b"y"])
    skewed.mtime_unix_ns = time.time_ns() + 600 * 10**9
    with stage(store, [b"y"]) as write:
        assert write.commit(skewed).mtime_unix_ns == skewed.mtime_unix_ns
    later = put(store, KEY, [b"z"])  # a later write still wins over the skewed one
    assert store.read_meta(BUCKET, KEY).data_id == later.data_id


def test_write_ids_and_names_are_checked(store: shards.ShardStore) -> None:
    for bad in ["", "../x", ".hidden", "a/b", "x" * 200]:
        with pytest.raises(errors.InvalidArgument):
            store.begin_write(bad)
    write = store.begin_write("dup")
    with pytest.raises(errors.AlreadyExists):
        store.begin_write("dup")
    write.abort()
    with store.begin_write("dup") as again:
        again.write_part(1, 0, b"x")
        with pytest.raises(errors.InvalidArgument, match="bucket"):
            again.commit(make_meta(KEY, [b"x"], bucket="../escape"))
    for bucket, key in [("../x", KEY), ("BAD", KEY), (BUCKET, ""), (BUCKET, "a\0b")]:
        with pytest.raises(errors.InvalidArgument):
            store.read_meta(bucket, key)
    with pytest.raises(errors.InvalidArgument):
        store.list("..")


def test_storage_names_and_internal_buckets_are_path_components(drive_dir: Path) -> None:
    """Buckets are stored under `<name>@<storage_id>` (one incarnation each) and the gateway's
    internal buckets under their own names; nothing else with '@' is accepted."""
    store = open_store(drive_dir)
    stored = names.storage_name(BUCKET, "0123456789abcdef")
    for bucket in (stored, names.KV_DURABLE_BUCKET, BUCKET):
        put(store, KEY, [bucket.encode()], bucket=bucket)
        assert read_parts(store, KEY, bucket=bucket) == [bucket.encode()]
        assert object_dir(drive_dir, KEY, bucket).is_dir()
        assert [e.key for e in store.list(bucket)] == [KEY]
    assert sorted(p.name for p in (drive_dir / "objects").iterdir()) == sorted(
        [stored, names.KV_DURABLE_BUCKET, BUCKET]
    )
    for bad in (f"{BUCKET}@", f"{BUCKET}@../x", f"{BUCKET}@0123456789ABCDEF", ".elsewhere"):
        with pytest.raises(errors.InvalidArgument):
            store.read_meta(bad, KEY)
        with pytest.raises(errors.InvalidArgument):
            store.list(bad)
    reopened = open_store(drive_dir)  # the index rebuilt from disk keeps every bucket
    assert reopened.rebuild_index() == 3
    assert [e.key for e in reopened.list(stored)] == [KEY]


def test_an_index_rebuild_logs_its_progress(
    drive_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rebuild (minutes on a drive of millions of keys, at boot) says how far it is."""
    store = open_store(drive_dir)
    for key in ("a", "b", "c"):
        put(store, key, [key.encode()])
    monkeypatch.setattr(shardrecovery._Progress, "EVERY", 1)
    monkeypatch.setattr(shardrecovery._Progress, "PROGRESS_S", 0.0)
    with caplog.at_level(logging.INFO, logger=shardrecovery.__name__):
        assert store.rebuild_index() == 3
    seen = [r.getMessage() for r in caplog.records if "rebuilding the index" in r.getMessage()]
    assert [m.split(", ")[1].split(" ")[0] for m in seen] == ["1", "2", "3"]


def test_sweep_tmp_removes_abandoned_writes(drive_dir: Path) -> None:
    crashed = open_store(drive_dir)
    stage(crashed, [content("big", 2 * MIB)], write_id="abandoned")
    stage(crashed, [b"small"], write_id="abandoned-small")
    reopened = open_store(drive_dir)  # a new process: the old one died mid-write
    live = stage(reopened, [content("live", 2 * MIB)], write_id="live")
    tmp = drive_dir / shards.TMP_DIR
    os.utime(tmp / "abandoned-small", (1, 1))
    assert reopened.sweep_tmp(3600) == 1
    assert sorted(os.listdir(tmp)) == ["abandoned", "live"]
    assert reopened.sweep_tmp(0) == 1  # never a write in progress here
    assert os.listdir(tmp) == ["live"]
    live.commit(make_meta(KEY, [content("live", 2 * MIB)]))
    assert os.listdir(tmp) == []
    assert read_parts(reopened, KEY) == [content("live", 2 * MIB)]
    reopened.close()


# Bitrot.


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


def test_flipped_data_byte_is_corrupt_and_verified(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    block = 64 * KIB
    data = content("rot", 4 * block + 100)
    meta = put(store, KEY, [data], block_bytes=block)
    path = part_file(drive_dir, meta)
    frame = block + framing.HASH_BYTES
    flip(path, frame + 10)  # data of block 1
    with pytest.raises(errors.Corrupt, match="block 1"):
        store.read_shard(BUCKET, KEY, 1, 0, 5, bytearray(len(data)))
    buf = bytearray(block)
    assert store.read_shard(BUCKET, KEY, 1, 0, 1, buf) == block
    assert bytes(buf) == data[:block]
    assert store.verify(BUCKET, KEY) == [(1, 1)]
    flip(path, 3 * frame - 1)  # checksum of block 2
    assert store.verify(BUCKET, KEY) == [(1, 1), (1, 2)]
    with path.open("r+b") as handle:
        handle.truncate(4 * frame + 50)  # the short last block loses its tail
    assert store.verify(BUCKET, KEY) == [(1, 1), (1, 2), (1, 4)]
    path.unlink()
    assert store.verify(BUCKET, KEY) == [(1, b) for b in range(5)]
    with pytest.raises(errors.Corrupt, match="missing"):
        store.read_shard(BUCKET, KEY, 1, 0, 1, buf)


def test_corruption_in_a_later_part(store: shards.ShardStore, drive_dir: Path) -> None:
    parts = [content("p1", 2 * SMALL_BLOCK), content("p2", INLINE + 3 * SMALL_BLOCK)]
    meta = put(store, KEY, parts)
    flip(part_file(drive_dir, meta, 2), 2 * (SMALL_BLOCK + framing.HASH_BYTES) + 5)
    assert store.verify(BUCKET, KEY) == [(2, 2)]
    buf = bytearray(2 * SMALL_BLOCK)
    assert store.read_shard(BUCKET, KEY, 1, 0, 2, buf) == len(buf)  # part 1 still reads
    assert bytes(buf) == parts[0]
    with pytest.raises(errors.Corrupt, match="part 2 block 2"):
        read_parts(store, KEY)


def test_corrupt_meta(store: shards.ShardStore, drive_dir: Path) -> None:
    put(store, KEY, [b"inline bytes"])
    meta_path = object_dir(drive_dir, KEY) / "meta"
    flip(meta_path, 5)
    with pytest.raises(errors.Corrupt, match="meta checksum"):
        store.read_meta(BUCKET, KEY)
    with pytest.raises(errors.Corrupt):
        store.verify(BUCKET, KEY)
    garbage = b"\xff\xff\xff"
    meta_path.write_bytes(garbage + framing.digest(garbage))
    with pytest.raises(errors.Corrupt, match="parse"):
        store.read_meta(BUCKET, KEY)
    meta_path.write_bytes(b"")
    with pytest.raises(errors.Corrupt):
        store.read_meta(BUCKET, KEY)
    assert store.delete(BUCKET, KEY)  # a corrupt object can still be deleted


# Delete, versions, concurrency.


def test_delete(store: shards.ShardStore, drive_dir: Path) -> None:
    put(store, KEY, [content("d", 2 * MIB)])
    put(store, "other", [b"keep"])
    assert store.delete(BUCKET, KEY)
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    with pytest.raises(errors.NotFound):
        store.verify(BUCKET, KEY)
    assert not object_dir(drive_dir, KEY).exists()
    assert [e.key for e in store.list(BUCKET)] == ["other"]
    assert not store.delete(BUCKET, KEY)
    assert read_parts(store, "other") == [b"keep"]


def test_delete_if_data_id_removes_only_that_version(store: shards.ShardStore) -> None:
    """A pool drain deletes the copy it moved, never a version written since."""
    old = put(store, KEY, [content("old", MIB)])
    new = put(store, KEY, [content("new", MIB)])
    assert not store.delete(BUCKET, KEY, if_data_id=old.data_id)
    assert store.read_meta(BUCKET, KEY).data_id == new.data_id
    assert store.delete(BUCKET, KEY, if_data_id=new.data_id)
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    assert not store.delete(BUCKET, KEY, if_data_id=new.data_id)


def test_overwrite_removes_previous_data(store: shards.ShardStore, drive_dir: Path) -> None:
    """Once its superseded copy (kept for an undo: services.datanode.supersede) is reclaimed."""
    first = put(store, KEY, [content("v1", MIB)])
    second = put(store, KEY, [content("v2", 2 * MIB)])
    kept = ["meta", "meta.prev", first.data_id, second.data_id]
    assert sorted(os.listdir(object_dir(drive_dir, KEY))) == sorted(kept)
    with pytest.raises(errors.PreconditionFailed):
        store.read_shard(BUCKET, KEY, 1, 0, 1, bytearray(MIB), data_id=first.data_id)
    assert store.reclaim_superseded(0) == 1
    assert sorted(os.listdir(object_dir(drive_dir, KEY))) == sorted(["meta", second.data_id])
    put(store, KEY, [b"now inline"])
    store.reclaim_superseded(0)
    assert os.listdir(object_dir(drive_dir, KEY)) == ["meta"]
    assert read_parts(store, KEY) == [b"now inline"]


def test_two_writers_of_one_key_last_commit_wins(store: shards.ShardStore, drive_dir: Path) -> None:
    a, b = content("a", MIB + 1), content("b", 2 * MIB + 7)
    write_a, write_b = stage(store, [a]), stage(store, [b])
    write_a.commit(make_meta(KEY, [a]))
    meta_b = write_b.commit(make_meta(KEY, [b]))
    assert read_parts(store, KEY) == [b]
    store.reclaim_superseded(0)  # a's copy, kept for an undo (services.datanode.supersede)
    assert sorted(os.listdir(object_dir(drive_dir, KEY))) == sorted(["meta", meta_b.data_id])
    assert os.listdir(drive_dir / shards.TMP_DIR) == []


@pytest.mark.parametrize("sizes", [[MIB + 3], [10], [300 * KIB, 2 * MIB + 1]])
def test_same_data_id_again_rewrites_the_shard_in_place(
    store: shards.ShardStore, drive_dir: Path, sizes: list[int]
) -> None:
    """Healing commits a version the drive holds (same data_id): its files are replaced."""
    parts = [content(f"heal{i}", size) for i, size in enumerate(sizes)]
    meta = make_meta(KEY, parts)
    meta.data_id = "fixed"
    put(store, KEY, [b"older version"])  # a drive being healed may hold an older one
    with stage(store, parts, block_bytes=shards.BLOCK_BYTES) as write:
        write.commit(meta)
    if not shards.is_inline(meta):
        flip(part_file(drive_dir, store.read_meta(BUCKET, KEY)), 7)
        assert store.verify(BUCKET, KEY)
    with stage(store, parts, block_bytes=shards.BLOCK_BYTES) as write:
        write.commit(meta)
    assert store.verify(BUCKET, KEY) == []
    assert read_parts(store, KEY) == parts
    assert store.read_meta(BUCKET, KEY).data_id == "fixed"
    store.reclaim_superseded(0)  # the older version's copy (services.datanode.supersede)
    expected = ["meta"] if shards.is_inline(meta) else ["fixed", "meta"]
    assert sorted(os.listdir(object_dir(drive_dir, KEY))) == expected
    assert os.listdir(drive_dir / shards.TMP_DIR) == []


def test_concurrent_writers_and_readers(store: shards.ShardStore, drive_dir: Path) -> None:
    versions = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        for round_ in range(4):
            data = content(f"w{n}.{round_}", INLINE + n * 1000 + round_)
            versions[hashlib.md5(data).hexdigest()] = data
            put(store, KEY, [data])

    def reader() -> None:
        while not stop.is_set():
            try:
                meta = store.read_meta(BUCKET, KEY)
                [got] = read_parts(store, KEY, meta=meta)
                assert hashlib.md5(got).hexdigest() == meta.etag
            except (errors.NotFound, errors.PreconditionFailed):
                continue
            except BaseException as exc:
                failures.append(exc)
                return

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert failures == []
    meta = store.read_meta(BUCKET, KEY)
    assert read_parts(store, KEY) == [versions[meta.etag]]
    store.reclaim_superseded(0)
    assert sorted(os.listdir(object_dir(drive_dir, KEY))) == sorted(["meta", meta.data_id])
    assert [(e.key, e.etag) for e in store.list(BUCKET)] == [(KEY, meta.etag)]


# Listing and the index.


def random_key(rng: random.Random) -> str:
    pieces = ["a", "b", "z", "A", "0", "9", "/", ".", "..", "-", "_", " ", "~", "é", "日本"]
    pieces += ["𝄞", "\x7f", "\x01", "ÿ", "\U0010fffd", "../", "//"]
    if rng.random() < 0.03:  # long keys: 339 x 3 bytes + "/" + a 6-byte piece is 1024 bytes
        return rng.choice(["x", "日"]) * rng.randint(200, 339) + "/" + rng.choice(pieces)
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))


def expected(model: list[str], prefix: str, start_after: str, limit: int) -> list[str]:
    keys = sorted(model, key=str.encode)
    return [k for k in keys if k.startswith(prefix) and k.encode() > start_after.encode()][:limit]


ALLOWED_PATHS = re.compile(
    r"\.kvtier/(format\.json|index-2\.sqlite(-wal|-shm)?|index\.clean|tmp|journal)"
    r"|\.kvtier/superseded(/[a-z0-9.-]{3,63}@[0-9a-f]{64})?"
    r"|objects(/[a-z0-9.-]{3,63}(/[0-9a-f]{2}(/[0-9a-f]{64}"
    r"(/meta|/meta\.prev(\.[1-3])?|/[0-9a-f]{32}(/part\.\d+)?)?)?)?)?"
    r"|\.kvtier|\.kvtier/\.format\.json\.[0-9a-f]+\.tmp"
)


@pytest.mark.usefixtures("no_fsync")
def test_listing_matches_a_sorted_model(tmp_path: Path, drive_dir: Path) -> None:
    seed = random.randrange(1 << 30)
    log.info("listing seed %d", seed)
    rng = random.Random(seed)
    store = open_store(drive_dir)
    model: dict[str, set[str]] = {BUCKET: set(), "other.bucket": set()}
    for _ in range(3000):
        key, bucket = random_key(rng), rng.choice(list(model))
        put(store, key, [key.encode()[: rng.randint(0, 40)]], bucket=bucket)
        model[bucket].add(key)
    big = put(store, "big/object", [content("big", INLINE + 1)], bucket=BUCKET)
    model[BUCKET].add(big.key)
    for key in rng.sample(sorted(model[BUCKET]), 200):
        assert store.delete(BUCKET, key)
        model[BUCKET].discard(key)
    keys = sorted(model[BUCKET])
    probes = ["", "/", "..", "a", "日", "日本/", "zz", "\U0010fffd", "x" * 200]
    probes += [k[: rng.randint(0, len(k))] for k in rng.sample(keys, 60)]
    for prefix in probes:
        start_after = rng.choice(["", rng.choice(keys), prefix, random_key(rng)])
        for limit in (1, 7, 1000):
            got = store.list(BUCKET, prefix, start_after, limit)
            assert [e.key for e in got] == expected(keys, prefix, start_after, limit)
    for bucket, members in model.items():
        pages, after = [], ""
        while page := store.list(bucket, start_after=after, limit=97):
            pages += page
            after = page[-1].key
        assert [e.key for e in pages] == sorted(members, key=str.encode)
        for entry in pages[:50]:
            meta = store.read_meta(bucket, entry.key)
            assert (entry.size, entry.etag, entry.mtime_ns) == (
                meta.size,
                meta.etag,
                meta.mtime_unix_ns,
            )
    incremental = {b: store.list(b, limit=10**6) for b in model}
    assert store.rebuild_index() == sum(len(m) for m in model.values())
    assert {b: store.list(b, limit=10**6) for b in model} == incremental
    store.close()
    for path in (drive_dir / ".kvtier").glob("index*.sqlite*"):
        path.unlink()
    reopened = open_store(drive_dir)  # a wiped index is rebuilt on open
    assert {b: reopened.list(b, limit=10**6) for b in model} == incremental
    reopened.close()
    assert [p.name for p in tmp_path.iterdir()] == ["drive"]
    for path in drive_dir.rglob("*"):
        relative = path.relative_to(drive_dir).as_posix()
        assert ALLOWED_PATHS.fullmatch(relative), relative


def test_listing_never_reads_object_data(
    store: shards.ShardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        put(store, f"k{i:02}", [content(str(i), 10 * i)])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("listing touched a file")

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr("builtins.open", refuse)
    assert [e.key for e in store.list(BUCKET, prefix="k1", limit=5)] == [f"k1{i}" for i in range(5)]


def test_lost_index_transactions_are_rebuilt_after_a_reboot(
    drive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(drive_dir)
    put(store, KEY, [b"x"])
    store._index.remove(BUCKET, KEY)  # as if a power loss dropped the WAL's tail
    monkeypatch.setattr(shardrecovery, "_boot_id", lambda: "another-boot")
    reopened = open_store(drive_dir)  # no clean close, another boot: rebuild
    assert [e.key for e in reopened.list(BUCKET)] == [KEY]
    reopened.close()
    store.close()


def test_a_power_loss_after_a_clean_restart_still_rebuilds_the_index(
    drive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "dirty" state must be durable before the first change after a clean start: a power
    loss takes the index's unsynced transactions (synchronous=NORMAL), and with them any dirty
    flag kept in the index itself; the next boot would then trust an index missing commits."""
    first = open_store(drive_dir)
    put(first, "before", [b"x"])
    first.close()  # clean: the index synced, the marker made
    name = shards.INDEX_FILE.name
    names = (name, f"{name}-wal", f"{name}-shm")
    synced = {n: (drive_dir / ".kvtier" / n).read_bytes() for n in names
              if (drive_dir / ".kvtier" / n).exists()}  # fmt: skip
    second = open_store(drive_dir)
    put(second, "after", [b"y"])  # its meta is fsynced; its index row is not
    # Power loss: the process is gone and the index files are as last synced.
    second._index._db.close()
    for n in names:
        path = drive_dir / ".kvtier" / n
        path.unlink(missing_ok=True)
        if n in synced:
            path.write_bytes(synced[n])
    monkeypatch.setattr(shardrecovery, "_boot_id", lambda: "after-the-power-loss")
    reopened = open_store(drive_dir)
    assert [e.key for e in reopened.list(BUCKET)] == ["after", "before"]
    reopened.close()


def test_prefix_end() -> None:
    assert index.prefix_end(b"") is None
    assert index.prefix_end(b"ab") == b"ac"
    assert index.prefix_end(b"a\xff\xff") == b"b"
    assert index.prefix_end(b"\xff") is None


# Crashes.


class SimulatedCrash(BaseException):
    """The process died here (a BaseException: no `except Exception` cleanup runs)."""


class CrashAt:
    """Counts the durable steps and raises SimulatedCrash instead of the step number `at`."""

    TARGETS: ClassVar[list[tuple[object, str]]] = [
        (os, "fsync"),
        (os, "rename"),
        (os, "replace"),
        (os, "unlink"),
        (os, "link"),
        (shutil, "rmtree"),
        (index.ShardIndex, "mark_pending"),
        (index.ShardIndex, "put"),
        (index.ShardIndex, "remove"),
    ]

    def __init__(self, patcher: pytest.MonkeyPatch, at: int | None) -> None:
        self.at = at
        self.done: list[str] = []
        for owner, name in self.TARGETS:
            patcher.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name: str, real: Any) -> Any:
        def step(*args: object, **kwargs: object) -> object:
            if len(self.done) == self.at:
                raise SimulatedCrash(name)
            self.done.append(name)
            return real(*args, **kwargs)

        return step


VERSIONS = {
    "absent-to-large": (None, [MIB + 3]),
    "large-to-two-parts": ([300 * KIB], [200 * KIB, MIB + 3]),
    "large-to-inline": ([300 * KIB], [10]),
    "inline-to-large": ([10], [300 * KIB]),
    "inline-to-inline": ([10], [20]),
}


def sized(tag: str, sizes: list[int] | None) -> list[bytes] | None:
    return None if sizes is None else [content(f"{tag}{i}", s) for i, s in enumerate(sizes)]


def check_after_crash(drive: Path, want: list[bytes] | None) -> shards.ShardStore:
    """Open the drive as a restarted process would and check it holds exactly `want`."""
    store = open_store(drive)
    store.sweep_tmp(0)
    assert os.listdir(drive / shards.TMP_DIR) == []
    if want is None:
        with pytest.raises(errors.NotFound):
            store.read_meta(BUCKET, KEY)
        assert store.list(BUCKET) == []
        return store
    assert read_parts(store, KEY) == want
    assert store.verify(BUCKET, KEY) == []
    meta = store.read_meta(BUCKET, KEY)
    assert [(e.key, e.size, e.etag) for e in store.list(BUCKET)] == [(KEY, meta.size, meta.etag)]
    return store


@pytest.mark.parametrize("case", sorted(VERSIONS))
def test_crash_at_every_commit_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    old, new = sized("old", VERSIONS[case][0]), sized("new", VERSIONS[case][1])
    assert new is not None
    steps = None
    at = 0
    while steps is None or at < steps:
        drive = tmp_path / (f"drive-{at}" if steps is not None else "count")
        crashed = open_store(drive)
        if old is not None:
            put(crashed, KEY, old, block_bytes=64 * KIB)
        write = stage(crashed, new, block_bytes=64 * KIB)
        with monkeypatch.context() as patcher:
            crash = CrashAt(patcher, at if steps is not None else None)
            if steps is None:  # a first run counts the steps
                write.commit(make_meta(KEY, new))
                steps = len(crash.done)
                log.info("%s: %d steps: %s", case, steps, crash.done)
                assert {"fsync", "replace", "put"} <= set(crash.done)
                crashed.close()
                continue
            with pytest.raises(SimulatedCrash):
                write.commit(make_meta(KEY, new))
        replaced = "replace" in crash.done
        store = check_after_crash(drive, new if replaced else old)
        put(store, KEY, [content("after", 2 * MIB)])  # later commits clean up leftovers
        store.reclaim_superseded(0)  # and the reclaim the copy each overwrite keeps
        meta = store.read_meta(BUCKET, KEY)
        assert sorted(os.listdir(object_dir(drive, KEY))) == sorted(["meta", meta.data_id])
        store.close()
        crashed.close()
        at += 1


def test_crash_at_every_step_of_a_rewrite_keeps_the_version_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [content("rw1", 300 * KIB), content("rw2", MIB + 3)]
    meta = make_meta(KEY, parts)
    meta.data_id = "version"
    steps = None
    at = 0
    while steps is None or at < steps:
        drive = tmp_path / (f"drive-{at}" if steps is not None else "count")
        crashed = open_store(drive)
        with stage(crashed, parts, block_bytes=64 * KIB) as first:
            first.commit(meta)
        write = stage(crashed, parts, block_bytes=64 * KIB)
        with monkeypatch.context() as patcher:
            crash = CrashAt(patcher, at if steps is not None else None)
            if steps is None:
                write.commit(meta)
                steps = len(crash.done)
                assert crash.done.count("replace") == len(parts) + 1  # every part file, meta
                crashed.close()
                continue
            with pytest.raises(SimulatedCrash):
                write.commit(meta)
        store = check_after_crash(drive, parts)
        assert sorted(os.listdir(object_dir(drive, KEY))) == ["meta", "version"]
        store.close()
        crashed.close()
        at += 1


@pytest.mark.parametrize("size", [10, MIB])
def test_crash_at_every_delete_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    old = [content("old", size)]
    steps = None
    at = 0
    while steps is None or at < steps:
        drive = tmp_path / (f"drive-{at}" if steps is not None else "count")
        crashed = open_store(drive)
        put(crashed, KEY, old)
        with monkeypatch.context() as patcher:
            crash = CrashAt(patcher, at if steps is not None else None)
            if steps is None:
                assert crashed.delete(BUCKET, KEY)
                steps = len(crash.done)
                crashed.close()
                continue
            with pytest.raises(SimulatedCrash):
                crashed.delete(BUCKET, KEY)
        store = check_after_crash(drive, None if "unlink" in crash.done else old)
        store.delete(BUCKET, KEY)
        assert not object_dir(drive, KEY).exists()
        assert store.list(BUCKET) == []
        store.close()
        crashed.close()
        at += 1


def test_crash_leftovers_without_a_later_commit_are_removed_by_rebuild(
    drive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = open_store(drive_dir)
    write = stage(crashed, [content("new", MIB)])

    def die(*args: object) -> None:
        raise SimulatedCrash("after the data rename")

    with monkeypatch.context() as patcher:
        patcher.setattr(index.ShardIndex, "mark_pending", die)
        with pytest.raises(SimulatedCrash):
            write.commit(make_meta(KEY, [content("new", MIB)]))
    leftovers = os.listdir(object_dir(drive_dir, KEY))
    assert len(leftovers) == 1  # a data dir without meta
    assert leftovers[0] != "meta"
    store = open_store(drive_dir)
    assert store.rebuild_index() == 0
    assert not object_dir(drive_dir, KEY).exists()
    store.close()
    crashed.close()


def test_rebuild_skips_strays_and_misplaced_metas(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    put(store, "a", [b"1"])
    put(store, "b", [b"2"])
    (drive_dir / "objects" / BUCKET / "stray").write_bytes(b"not a dir")
    (drive_dir / "objects" / BUCKET / "00" / "stray").mkdir(parents=True)
    shutil.copy(object_dir(drive_dir, "a") / "meta", object_dir(drive_dir, "b") / "meta")
    assert store.rebuild_index() == 1
    assert [e.key for e in store.list(BUCKET)] == ["a"]
    assert read_parts(store, "a") == [b"1"]


# Compose (multipart complete).


@pytest.mark.parametrize(
    "sizes",
    [[3 * KIB, 1], [INLINE // 2, INLINE // 2 + 1], [MIB + 3, 5 * KIB], [2 * MIB, MIB + 7, 10]],
)
def test_compose_links_part_objects_into_one_version(
    store: shards.ShardStore, drive_dir: Path, sizes: list[int]
) -> None:
    parts = [content(f"c{i}", size) for i, size in enumerate(sizes)]
    sources = []
    for i, data in enumerate(parts):
        meta = put(store, f"p/{i}", [data], bucket=names.MULTIPART_BUCKET)
        sources.append((names.MULTIPART_BUCKET, f"p/{i}", meta.data_id))
    target = make_meta("whole", parts)
    target.block_bytes = SMALL_BLOCK
    stored = store.compose(uuid.uuid4().hex, target, sources)
    assert read_parts(store, "whole") == parts
    if not shards.is_inline(stored):
        for number, (bucket, key, _) in enumerate(sources, 1):
            source = store.read_meta(bucket, key)
            if not shards.is_inline(source):  # hard-linked, not copied
                assert part_file(drive_dir, stored, number).stat().st_ino == (
                    part_file(drive_dir, source).stat().st_ino
                )
    for bucket, key, _ in sources:  # the parts go; the object stays whole
        store.delete(bucket, key)
    assert read_parts(store, "whole") == parts
    assert store.verify(BUCKET, "whole") == []


def test_compose_refuses_missing_or_mismatched_sources(store: shards.ShardStore) -> None:
    data = content("x", 2 * KIB)
    meta = put(store, "p/1", [data], bucket=names.MULTIPART_BUCKET)
    target = make_meta("whole", [data])
    target.block_bytes = SMALL_BLOCK
    with pytest.raises(errors.NotFound):
        store.compose("w1", target, [(names.MULTIPART_BUCKET, "p/1", "0" * 32)])
    with pytest.raises(errors.NotFound):
        store.compose("w2", target, [(names.MULTIPART_BUCKET, "p/9", meta.data_id)])
    wrong = make_meta("whole", [data + b"!"])
    wrong.block_bytes = SMALL_BLOCK
    with pytest.raises(errors.InvalidArgument):
        store.compose("w3", wrong, [(names.MULTIPART_BUCKET, "p/1", meta.data_id)])
    with pytest.raises(errors.InvalidArgument):
        store.compose("w4", target, [])
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, "whole")
    with pytest.raises(errors.InvalidArgument):  # users never reach the internal bucket's name
        names.check_bucket(names.MULTIPART_BUCKET)
