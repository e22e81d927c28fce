"""The S3 access log's file writer (services.gateway.s3.access_log): every line lands, in order,
owner-only, flushed at close; the lines of many requests go in a few write(2) calls, from a
thread of its own, never one per request."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from services.gateway.s3 import access_log


def fields(n: int) -> dict[str, Any]:
    return {"request_id": f"req-{n}", "op": "PutObject", "key": f"ké/{n}", "status": 200}


def test_lines_land_in_order_in_a_few_writes_and_close_flushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "logs" / "s3-access.log"
    writes: list[str] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:  # the real write(2), counted by thread
        writes.append(threading.current_thread().name)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    log = access_log.AccessLog(str(path))
    for n in range(500):
        log.write(**fields(n))
    log.close()
    log.close()  # idempotent
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["request_id"] for line in lines] == [f"req-{n}" for n in range(500)]
    assert lines[7]["key"] == "ké/7"
    assert lines[7]["time"].endswith("Z")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert 1 <= len(writes) <= 3  # one batch (or a few), not a write per line
    assert threading.current_thread().name not in writes  # never on the caller's thread


def test_lines_from_several_threads_all_land(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = access_log.AccessLog(str(path))

    def put(start: int) -> None:
        for n in range(start, start + 200):
            log.write(**fields(n))

    threads = [threading.Thread(target=put, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    got = {json.loads(line)["request_id"] for line in path.read_text().splitlines()}
    assert got == {f"req-{n}" for k in range(4) for n in range(k * 1000, k * 1000 + 200)}


def test_off_and_service_log_destinations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    access_log.AccessLog("").write(**fields(1))  # off: nothing anywhere
    caplog.set_level("INFO", logger=access_log.LOGGER.name)
    log = access_log.AccessLog("-")
    log.write(**fields(2))
    log.close()
    records = [r for r in caplog.records if r.name == access_log.LOGGER.name]
    assert [json.loads(r.getMessage())["request_id"] for r in records] == ["req-2"]
    assert not list(tmp_path.iterdir())
