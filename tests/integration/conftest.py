"""Helpers for tests that run kvtier commands and services as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def kvtier_cmd(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `kvtier ARGS` (through this interpreter) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def wait_file_json(path: Path, proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """Wait for a JSON file written by proc; fail with proc's output if it dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                value = json.loads(path.read_text())
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited with {proc.returncode} before writing {path}:\n{out}")
        time.sleep(0.1)
    raise AssertionError(f"{path} not written within {timeout_s}s")


def pid_alive(pid: int) -> bool:
    """Whether a process exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def dump_logs(state_dir: Path) -> str:
    """Every service log of a dev cluster, for failure reports."""
    parts = []
    for log in sorted((state_dir / "logs").glob("*.log")):
        parts.append(f"===== {log.name}\n{log.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


@pytest.fixture
def state_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A dev-cluster state dir whose logs are printed when the test fails."""
    path = tmp_path / "state"
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(dump_logs(path))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
