"""A drive's listing index when SQLite cannot grow (SQLITE_FULL, as on a full drive; here
SQLite's own page limit, `PRAGMA max_page_count`, makes it refuse the same way): journaled
small writes keep their entries deferred in memory (the journal covers them), and reads merge
them, so listings stay exact until space is back and the entries are written."""

from __future__ import annotations

from pathlib import Path

from services.datanode import index


def _entry(key: str, size: int = 1) -> index.ListEntry:
    return index.ListEntry(key, size, f"e{size}", size, False)


def test_listings_stay_exact_while_the_index_cannot_grow(tmp_path: Path) -> None:
    ix = index.ShardIndex(tmp_path / "index.sqlite")
    try:
        ix.put("b", _entry("a"))
        ix.put("b", _entry("m"))
        pages = ix._db.execute("PRAGMA page_count").fetchone()[0]
        ix._db.execute(f"PRAGMA max_page_count = {pages}")  # full from now on
        deferred = [("b", _entry(f"k{i:03}" + "x" * 200, 2)) for i in range(index.LATER_MAX)]
        deferred += [("b", _entry("m", 9)), ("other", _entry("k000", 3))]
        ix.put_later(deferred)  # its flush fails: nothing raised, nothing lost
        assert ix.deferred == len(deferred)
        keys = [e.key for e in ix.list("b", limit=100)]
        assert keys == ["a", *(f"k{i:03}" + "x" * 200 for i in range(index.LATER_MAX)), "m"]
        assert ix.list("b", prefix="m") == [_entry("m", 9)]  # the deferred entry wins
        after = [e.key for e in ix.list("b", start_after="k030" + "x" * 200, limit=3)]
        assert after == ["k031" + "x" * 200, "m"]
        assert [e.key for e in ix.list("other")] == ["k000"]
        assert len(ix.list("b", limit=5)) == 5
        assert len(ix.dump()) == 2 + index.LATER_MAX + 1
        versions = ix.list_versions("b", "", "", None, 3)
        assert [(v.key[:4], v.version_id) for v in versions] == [
            ("a", "null"), ("k000", "null"), ("k001", "null")
        ]  # fmt: skip
        ix._db.execute("PRAGMA max_page_count = 1000000")  # space is back
        ix.flush()
        assert ix.deferred == 0
        assert [e.key for e in ix.list("b", limit=100)] == keys
    finally:
        ix.close()
