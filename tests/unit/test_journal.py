"""The journal's file is preallocated with zeros ahead of its appends: a replay reads exactly the
records before the zeros, stops at a torn record as before, and a reset leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier import errors
from services.datanode import journal


def records(count: int, tag: str = "record") -> list[bytes]:
    return [journal.encode(journal.Kind.INSTALL, f"{tag} {i}".encode()) for i in range(count)]


def bodies(path: Path) -> list[bytes]:
    return [body for _, body in journal.Journal(path).read()]


def test_appends_go_into_a_preallocated_zero_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.commit_many(records(3))
    size = path.stat().st_size
    assert size >= log.bytes + journal.PREALLOCATE_BYTES
    assert path.read_bytes()[log.bytes :] == bytes(size - log.bytes)
    log.commit_many(records(2, "more"))  # within the chunk: the file does not grow
    assert path.stat().st_size == size
    assert bodies(path) == [b"record 0", b"record 1", b"record 2", b"more 0", b"more 1"]
    log.close()


def test_the_file_grows_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "PREALLOCATE_BYTES", 64)
    path = tmp_path / "journal"
    log = journal.Journal(path)
    wanted = records(20)
    for record in wanted:
        log.commit(record)
        assert log.bytes < path.stat().st_size <= log.bytes + len(record) + 64
    assert bodies(path) == [f"record {i}".encode() for i in range(20)]
    log.close()


def test_a_torn_record_before_the_zero_tail_ends_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.commit_many(records(2))
    end = log.bytes
    log.commit_many(records(1, "torn"))
    log.close()
    raw = bytearray(path.read_bytes())
    raw[log.bytes - 3 : log.bytes] = bytes(3)  # the last record lost its tail in a crash
    path.write_bytes(raw)
    assert bodies(path) == [b"record 0", b"record 1"]
    assert list(journal.decode(bytes(raw[:end]) + bytes(1 << 16))) == list(
        journal.decode(bytes(raw))
    )


def test_a_reset_truncates_and_the_next_append_preallocates_again(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.commit_many(records(5, "old"))
    log.reset()
    assert path.stat().st_size == 0
    assert log.bytes == 0
    log.commit(records(1, "new")[0])
    assert path.stat().st_size > log.bytes
    assert bodies(path) == [b"new 0"]  # nothing of the earlier generation after it
    log.close()


def test_a_drive_too_full_to_preallocate_still_takes_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    log = journal.Journal(path)
    real = os.pwrite

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if not any(data):  # the zeros of a preallocation
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    log.commit_many(records(2))
    assert path.stat().st_size == log.bytes
    assert bodies(path) == [b"record 0", b"record 1"]
    log.commit(records(1, "next")[0])  # not broken
    assert bodies(path) == [b"record 0", b"record 1", b"next 0"]
    log.close()


def test_a_full_drive_refuses_commits_while_full_and_takes_them_once_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC writing a batch (before its sync): the batch fails and is cut off the file, and
    the journal is not broken: once space is back the next commit goes through (it refused
    every commit until the datanode restarted: tests/fault/test_scenarios.py, every drive
    full). A failed sync still breaks it (below)."""
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.commit_many(records(2, "before"))
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "pwritev", full)
    for _ in range(2):
        with pytest.raises(errors.Unavailable, match="No space left"):
            log.commit_many(records(40, "refused"))
    assert path.stat().st_size == log.bytes
    assert bodies(path) == [b"before 0", b"before 1"]
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    log.commit(records(1, "after")[0])
    assert bodies(path) == [b"before 0", b"before 1", b"after 0"]
    log.close()


def test_a_failed_sync_breaks_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fdatasync the file's state is unknown (the kernel may have dropped the
    dirty pages): every later commit is refused until a restart replays what checks."""
    log = journal.Journal(tmp_path / "journal")
    log.commit(records(1)[0])
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(errors.Unavailable):
        log.commit(records(1, "lost")[0])
    monkeypatch.setattr(os, "fdatasync", real)
    with pytest.raises(errors.Unavailable, match="broken"):
        log.commit(records(1, "later")[0])
    log.close()
