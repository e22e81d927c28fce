"""The per-drive listing index: `<drive>/.kvtier/index-<GENERATION>.sqlite`, (bucket, key) →
listing fields.

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

Journaled small writes index their entries later (`put_later`): the entries wait in memory and
go in one transaction with the next LATER_MAX - 1 ones, or first thing in any other call (every
call runs them before its own statements, under the same lock, so reads and later changes see
them, in order). A crash loses nothing the store needs: it replays the journal at open and
re-indexes every key in it, and it runs `flush` before it empties the journal (a checkpoint).
One transaction per small write cost ~25-85 µs of CPU, about what its meta file's steps cost.

The file's name carries its schema's generation (GENERATION; the first, v0.1.0's, was
`index.sqlite`), so that releases with different schemas never share a file: an older release
writes rows of its own shape (v0.1.0 inserts six values positionally, which a table with this
schema's columns refuses), and a newer one would trust rows that lack its columns. A store that
finds another generation's file at open rebuilds its own from the metas (the other release may
have changed the drive since this file was last written) and removes the other file, so that
the other release, run again (a rollback, or an upgrade after one), rebuilds its own in turn
(v0.1.0 rebuilds an index it does not find). See docs/upgrades.md.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
  bucket TEXT NOT NULL,
  key BLOB NOT NULL,
  size INTEGER NOT NULL,
  etag TEXT NOT NULL,
  mtime_ns INTEGER NOT NULL,
  is_pointer INTEGER NOT NULL,
  delete_marker INTEGER NOT NULL DEFAULT 0,
  owner TEXT NOT NULL DEFAULT '',
  initiator TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
  bucket TEXT NOT NULL,
  key BLOB NOT NULL,
  PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
  bucket TEXT NOT NULL,
  key BLOB NOT NULL,
  mtime_ns INTEGER NOT NULL,
  data_id TEXT NOT NULL,
  version_id TEXT NOT NULL,
  size INTEGER NOT NULL,
  etag TEXT NOT NULL,
  is_latest INTEGER NOT NULL,
  delete_marker INTEGER NOT NULL,
  owner TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (bucket, key, mtime_ns, data_id)
) WITHOUT ROWID;
"""


class ListEntry(NamedTuple):
    """One listed object: what a listing needs, never its data."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    is_pointer: bool
    #: The key's current version is an S3 delete marker (listings of objects skip it).
    delete_marker: bool = False
    #: The tenant recorded as the object's owner in its meta's ACL (`Acl.owner`: a writer of
    #: another tenant); "" when unset: the bucket's tenant. Listings show it (S3's Owner).
    owner: str = ""
    #: A multipart-upload record's initiator (`ShardMeta.upload_initiator`), which listings
    #: of uploads show beside the owner its ACL records; "" for anything else.
    initiator: str = ""


class VersionEntry(NamedTuple):
    """One version of a key in a versioned bucket (ListObjectVersions)."""

    key: str
    mtime_ns: int
    data_id: str
    version_id: str
    size: int
    etag: str
    is_latest: bool
    delete_marker: bool
    #: As ListEntry.owner, of this version.
    owner: str = ""


Rows = list[tuple[str, ListEntry]]

#: deferred entries (put_later) that go in one transaction
LATER_MAX = 32
#: The schema's generation, in the file's name (module docstring): a new one for every change
#: of a table's columns, so that no release reads or writes another's rows.
GENERATION = 2


def file_name(generation: int = GENERATION) -> str:
    """The index file of a generation (the first's had none in its name)."""
    return "index.sqlite" if generation == 1 else f"index-{generation}.sqlite"


def other_generations(path: Path) -> list[Path]:
    """Index files beside path (this generation's) of other generations, with their SQLite
    companions (-wal, -shm, -journal)."""
    ours = {path.name + suffix for suffix in ("", "-wal", "-shm", "-journal")}
    if not path.parent.is_dir():
        return []
    return sorted(
        p for p in path.parent.iterdir()
        if _OTHER.fullmatch(p.name) and p.name not in ours
    )  # fmt: skip


_OTHER = re.compile(r"index(-[0-9]+)?\.sqlite(-wal|-shm|-journal)?")


def _inside(low: bytes, after: bool, end: bytes | None) -> Callable[[bytes], bool]:
    """Whether a key is in a listing's range: from low (after it, with after) to end."""
    return lambda key: (key > low if after else key >= low) and (end is None or key < end)


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
        self._later: list[tuple[str, bytes, int, str, int, int, int, str, str]] = []  # put_later
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
            self._run_later()
            if synced:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def put_later(self, entries: Sequence[tuple[str, ListEntry]]) -> None:
        """put_many, deferred (module docstring): only for keys whose change is journaled (a
        crash loses the entries; the journal's replay indexes them again)."""
        rows = [(bucket, entry.key.encode(), *_columns(entry)) for bucket, entry in entries]
        with self._lock:
            self._later.extend(rows)
            if len(self._later) >= LATER_MAX:
                self._flushed()  # a full drive keeps them deferred: the journal covers them

    @property
    def deferred(self) -> int:
        """Entries put_later holds in memory now (read without the lock: a hint)."""
        return len(self._later)

    def flush(self) -> None:
        """Index the deferred entries now (before the journal that covers them is emptied)."""
        with self._lock:
            self._run_later()

    def _run_later(self) -> None:
        """The deferred entries in one transaction (the caller holds self._lock)."""
        if not self._later:
            return
        rows, self._later = self._later, []
        try:
            with self._db:
                self._db.executemany(_INSERT_OBJECT, rows)
                self._db.executemany(
                    "DELETE FROM pending WHERE bucket = ? AND key = ?", [row[:2] for row in rows]
                )
        except BaseException:
            self._later[:0] = rows  # rolled back: kept for the next try
            raise

    def _flushed(self) -> bool:
        """Before a read (the caller holds self._lock): index the deferred entries; False where
        the drive is full (SQLITE_FULL) and they stay in memory, for the read to merge
        (`_merge_later`): listings stay exact on a full drive, whose writes fail meanwhile."""
        try:
            self._run_later()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            return False
        return True

    def _merge_later(
        self, rows: list[Any], bucket: str | None, inside: Callable[[bytes], bool]
    ) -> list[Any]:
        """rows (key first, as `list` selects them; with bucket None: bucket then key, as
        `dump` does) with the deferred entries of bucket whose key is inside, the last one of a
        key winning, in key order."""
        merged: dict[tuple[Any, ...], Any] = {
            (bytes(r[0]),) if bucket is not None else (r[0], bytes(r[1])): r for r in rows
        }
        for b, key, *columns in self._later:
            if (bucket is None or b == bucket) and inside(key):
                row = (key, *columns) if bucket is not None else (b, key, *columns)
                merged[(key,) if bucket is not None else (b, key)] = row
        return [merged[k] for k in sorted(merged)]

    def put(self, bucket: str, entry: ListEntry) -> None:
        """Insert or replace the entry of (bucket, entry.key) and clear its pending mark."""
        key = entry.key.encode()
        row = (bucket, key, *_columns(entry))
        with self._lock, self._db:
            self._run_later()
            self._db.execute(_INSERT_OBJECT, row)
            self._db.execute("DELETE FROM pending WHERE bucket = ? AND key = ?", (bucket, key))

    def put_many(self, entries: Sequence[tuple[str, ListEntry]]) -> None:
        """put of several (bucket, entry) in one transaction, in order."""
        rows = [(bucket, entry.key.encode(), *_columns(entry)) for bucket, entry in entries]
        with self._lock, self._db:
            self._run_later()
            self._db.executemany(_INSERT_OBJECT, rows)
            self._db.executemany(
                "DELETE FROM pending WHERE bucket = ? AND key = ?", [row[:2] for row in rows]
            )

    def remove(self, bucket: str, key: str, *, versions: bool = False) -> None:
        """Remove the entry of (bucket, key), if any (versions: its versions' too), and clear
        its pending mark."""
        args = (bucket, key.encode())
        with self._lock, self._db:
            self._run_later()
            self._db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", args)
            self._db.execute("DELETE FROM pending WHERE bucket = ? AND key = ?", args)
            if versions:
                self._db.execute("DELETE FROM versions WHERE bucket = ? AND key = ?", args)

    def put_key(
        self, bucket: str, key: str, current: ListEntry | None, versions: Iterable[VersionEntry]
    ) -> None:
        """Replace everything indexed of a versioned key (its current entry, absent when None,
        and its versions) and clear its pending mark, in one transaction."""
        raw = key.encode()
        args = (bucket, raw)
        with self._lock, self._db:
            self._run_later()
            self._db.execute("DELETE FROM versions WHERE bucket = ? AND key = ?", args)
            self._db.executemany(_INSERT_VERSION, ((bucket, *_version_row(v)) for v in versions))
            if current is None:
                self._db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", args)
            else:
                self._db.execute(_INSERT_OBJECT, (bucket, raw, *_columns(current)))
            self._db.execute("DELETE FROM pending WHERE bucket = ? AND key = ?", args)

    def list_versions(
        self, bucket: str, prefix: str, after_key: str, after: tuple[int, str] | None, limit: int
    ) -> list[VersionEntry]:
        """Up to limit versions by key (byte order), newest first: those of keys under prefix
        after after_key, and when `after` ((mtime_ns, data_id) of a version of after_key) is
        given, first after_key's versions older than it. Keys never versioned (only an
        `objects` entry) come as their one "null" version."""
        end = prefix_end(prefix.encode())
        out: list[VersionEntry] = []
        with self._lock:
            flushed = self._flushed()
            if after is not None:
                rows = self._db.execute(
                    _SELECT_VERSIONS + " WHERE bucket = ? AND key = ?"
                    " AND (mtime_ns, data_id) < (?, ?)"
                    " ORDER BY mtime_ns DESC, data_id DESC LIMIT ?",
                    (bucket, after_key.encode(), *after, limit),
                ).fetchall()
                out.extend(_version_entry(r) for r in rows)
            low = max(prefix.encode(), after_key.encode())
            op = ">" if after_key and low == after_key.encode() else ">="
            bound = " AND key < ?" if end is not None else ""
            tail = [end] if end is not None else []
            rows = self._db.execute(
                _SELECT_VERSIONS + f" WHERE bucket = ? AND key {op} ?{bound}"
                " ORDER BY key, mtime_ns DESC, data_id DESC LIMIT ?",
                (bucket, low, *tail, limit),
            ).fetchall()
            versioned = [_version_entry(r) for r in rows]
            plain = self._db.execute(
                "SELECT key, size, etag, mtime_ns, owner FROM objects o WHERE bucket = ?"
                f" AND key {op} ?{bound} AND NOT EXISTS (SELECT 1 FROM versions v"
                " WHERE v.bucket = o.bucket AND v.key = o.key) ORDER BY key LIMIT ?",
                (bucket, low, *tail, limit),
            ).fetchall()
            if not flushed:  # journaled writes of keys never versioned: plain entries
                versioned_keys = {bytes(r[0]) for r in rows}
                later = self._merge_later(
                    [(bytes(k), s, e, m, 0, 0, o, "") for k, s, e, m, o in plain],
                    bucket, _inside(low, op == ">", end),
                )  # fmt: skip
                plain = [(k, s, e, m, o) for k, s, e, m, _, _, o, _ in later
                         if k not in versioned_keys][:limit]  # fmt: skip
        unversioned = [
            VersionEntry(bytes(k).decode(), m, "", "null", s, e, True, False, o)
            for k, s, e, m, o in plain
        ]
        merged = sorted(versioned + unversioned, key=lambda v: (v.key.encode(), -v.mtime_ns))
        return (out + merged)[:limit]

    def version_of(self, bucket: str, key: str, version_id: str) -> tuple[int, str] | None:
        """(mtime_ns, data_id) of an indexed version of a key, or None."""
        with self._lock:
            self._flushed()  # deferred entries are never versions
            row = self._db.execute(
                "SELECT mtime_ns, data_id FROM versions WHERE bucket = ? AND key = ?"
                " AND version_id = ?",
                (bucket, key.encode(), version_id),
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def mark_pending(self, bucket: str, key: str) -> None:
        """Record that (bucket, key)'s meta is about to change on disk."""
        with self._lock, self._db:
            self._run_later()
            self._db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?)", (bucket, key.encode()))

    def pending(self) -> list[tuple[str, str]]:
        """Every (bucket, key) marked pending and not yet cleared."""
        with self._lock:
            self._flushed()  # at open, before any entry is deferred
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
            "SELECT key, size, etag, mtime_ns, is_pointer, delete_marker, owner, initiator"
            f" FROM objects WHERE bucket = ? AND key {op} ?"
        )
        args: list[object] = [bucket, low]
        end = prefix_end(prefix.encode())
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        with self._lock:
            flushed = self._flushed()
            rows = self._db.execute(sql, args).fetchall()
            if not flushed:
                rows = self._merge_later(rows, bucket, _inside(low, op == ">", end))[:limit]
        return [
            ListEntry(bytes(k).decode(), s, e, m, bool(p), bool(d), o, i)
            for k, s, e, m, p, d, o, i in rows
        ]

    def replace_all(
        self,
        rows: Iterable[tuple[str, ListEntry]],
        versions: Iterable[tuple[str, VersionEntry]] = (),
    ) -> None:
        """Replace the whole index by rows of (bucket, entry) and versions of (bucket,
        version) in one transaction; clears pending."""
        with self._lock, self._db:
            self._run_later()
            self._db.execute("DELETE FROM objects")
            self._db.execute("DELETE FROM pending")
            self._db.execute("DELETE FROM versions")
            self._db.executemany(
                _INSERT_OBJECT, ((b, e.key.encode(), *_columns(e)) for b, e in rows)
            )
            self._db.executemany(_INSERT_VERSION, ((b, *_version_row(v)) for b, v in versions))

    def dump(self) -> Rows:
        """Every (bucket, entry), sorted: for tests and consistency checks."""
        with self._lock:
            flushed = self._flushed()
            rows = self._db.execute(
                "SELECT bucket, key, size, etag, mtime_ns, is_pointer, delete_marker, owner,"
                " initiator FROM objects ORDER BY bucket, key"
            ).fetchall()
            if not flushed:
                rows = self._merge_later(rows, None, lambda key: True)
        return [
            (b, ListEntry(bytes(k).decode(), s, e, m, bool(p), owner=o, initiator=i))
            for b, k, s, e, m, p, _, o, i in rows
        ]

    def get_state(self) -> dict[str, str]:
        """The index's bookkeeping values (the boot id)."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM state").fetchall()
        return {str(n): str(v) for n, v in rows}

    def set_state(self, **values: str) -> None:
        """Set bookkeeping values."""
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", values.items())


# Columns named: an index migrated by ALTER TABLE has them in another order than a new one.
_INSERT_OBJECT = (
    "INSERT OR REPLACE INTO objects (bucket, key, size, etag, mtime_ns, is_pointer,"
    " delete_marker, owner, initiator) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_VERSION = (
    "INSERT OR REPLACE INTO versions (bucket, key, mtime_ns, data_id, version_id, size, etag,"
    " is_latest, delete_marker, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_VERSIONS = (
    "SELECT key, mtime_ns, data_id, version_id, size, etag, is_latest, delete_marker, owner"
    " FROM versions"
)


def _columns(entry: ListEntry) -> tuple[int, str, int, int, int, str, str]:
    return (
        entry.size, entry.etag, entry.mtime_ns, int(entry.is_pointer), int(entry.delete_marker),
        entry.owner, entry.initiator,
    )  # fmt: skip


def _version_row(v: VersionEntry) -> tuple[bytes, int, str, str, int, str, int, int, str]:
    return (
        v.key.encode(), v.mtime_ns, v.data_id, v.version_id, v.size, v.etag,
        int(v.is_latest), int(v.delete_marker), v.owner,
    )  # fmt: skip


def _version_entry(row: tuple[bytes, int, str, str, int, str, int, int, str]) -> VersionEntry:
    k, m, d, v, s, e, latest, marker, owner = row
    return VersionEntry(bytes(k).decode(), m, d, v, s, e, bool(latest), bool(marker), owner)
