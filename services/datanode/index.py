"""The per-drive listing index: `<drive>/.kvtier/index.sqlite`, (bucket, key) → listing fields.

The index is a cache of the drive's `meta` files, kept in step by `shards.ShardStore` at commit
and delete and rebuilt from them when lost. Keys are stored as UTF-8 BLOBs so SQLite's memcmp
order is S3's byte order; a prefix becomes a key range, so a listing page is one index seek.

A store marks a key *pending* (committed, no fsync) before it replaces or removes the key's meta
and clears the mark with the entry's update; on open, pending keys are re-read from disk. The WAL
runs with synchronous=NORMAL: a process crash loses nothing; a power loss may lose the last
transactions, which the store detects (the boot id in `state`, and a clean marker file made
durably at close and removed durably at open: `shards.CLEAN_FILE`) and repairs by a rebuild.

Measured (20,000 objects in one bucket under 10 prefixes; a listing under one prefix, which
matches 2,024 keys; ext4, warm page cache, 2-vCPU AMD EPYC VM, Python 3.11; median of 20 / 5 runs;
the walk reads and parses every meta of the bucket, filters, sorts by key bytes):

| method | one page (limit 1,000) | the whole prefix (2,024 keys) |
|---|---|---|
| SQLite range query (this index) | 1.2 ms | 2.2 ms |
| sorted walk of the meta files | 362 ms | 377 ms |

Keys are hashed into directories, so a walk reads every meta of the bucket for any page and
grows with the bucket, while the index query grows with the page: the index stays (~300x).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
  bucket TEXT NOT NULL,
  key BLOB NOT NULL,
  size INTEGER NOT NULL,
  etag TEXT NOT NULL,
  mtime_ns INTEGER NOT NULL,
  is_pointer INTEGER NOT NULL,
  PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
  bucket TEXT NOT NULL,
  key BLOB NOT NULL,
  PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class ListEntry(NamedTuple):
    """One listed object: what a listing needs, never its data."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    is_pointer: bool


Rows = list[tuple[str, ListEntry]]


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with prefix (None: no bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class ShardIndex:
    """One drive's index; thread-safe (one connection behind a lock; every call is short)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Python's implicit transactions: each `with self._db` block commits as one.
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self, *, synced: bool = False) -> None:
        """Close the connection (idempotent); synced: checkpoint the WAL into the database first
        (SQLite syncs the WAL before and the database after a checkpoint), so that everything
        written is on disk when this returns."""
        with self._lock:
            if synced:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def put(self, bucket: str, entry: ListEntry) -> None:
        """Insert or replace the entry of (bucket, entry.key) and clear its pending mark."""
        key = entry.key.encode()
        row = (bucket, key, entry.size, entry.etag, entry.mtime_ns, int(entry.is_pointer))
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)", row)
            self._db.execute("DELETE FROM pending WHERE bucket = ? AND key = ?", (bucket, key))

    def remove(self, bucket: str, key: str) -> None:
        """Remove the entry of (bucket, key), if any, and clear its pending mark."""
        args = (bucket, key.encode())
        with self._lock, self._db:
            self._db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", args)
            self._db.execute("DELETE FROM pending WHERE bucket = ? AND key = ?", args)

    def mark_pending(self, bucket: str, key: str) -> None:
        """Record that (bucket, key)'s meta is about to change on disk."""
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?)", (bucket, key.encode()))

    def pending(self) -> list[tuple[str, str]]:
        """Every (bucket, key) marked pending and not yet cleared."""
        with self._lock:
            rows = self._db.execute("SELECT bucket, key FROM pending").fetchall()
        return [(str(bucket), bytes(key).decode()) for bucket, key in rows]

    def list(
        self, bucket: str, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ListEntry]:
        """Up to limit entries of bucket whose key starts with prefix and sorts after start_after.

        Keys are in byte order of their UTF-8 encoding.
        """
        low = max(prefix.encode(), start_after.encode())
        op = ">" if start_after and low == start_after.encode() else ">="
        sql = (
            "SELECT key, size, etag, mtime_ns, is_pointer FROM objects"
            f" WHERE bucket = ? AND key {op} ?"
        )
        args: list[object] = [bucket, low]
        end = prefix_end(prefix.encode())
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [ListEntry(bytes(k).decode(), s, e, m, bool(p)) for k, s, e, m, p in rows]

    def replace_all(self, rows: Iterable[tuple[str, ListEntry]]) -> None:
        """Replace the whole index by rows of (bucket, entry) in one transaction; clears pending."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM objects")
            self._db.execute("DELETE FROM pending")
            self._db.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (b, e.key.encode(), e.size, e.etag, e.mtime_ns, int(e.is_pointer))
                    for b, e in rows
                ),
            )

    def dump(self) -> Rows:
        """Every (bucket, entry), sorted: for tests and consistency checks."""
        with self._lock:
            rows = self._db.execute(
                "SELECT bucket, key, size, etag, mtime_ns, is_pointer FROM objects"
                " ORDER BY bucket, key"
            ).fetchall()
        return [(b, ListEntry(bytes(k).decode(), s, e, m, bool(p))) for b, k, s, e, m, p in rows]

    def get_state(self) -> dict[str, str]:
        """The index's bookkeeping values (the boot id)."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM state").fetchall()
        return {str(n): str(v) for n, v in rows}

    def set_state(self, **values: str) -> None:
        """Set bookkeeping values."""
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", values.items())
