"""Fixtures of the fault suite: a FaultCluster per test, its logs printed when the test fails."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault import harness


def _missing() -> str:
    """Why this machine cannot run the fault harness, or ''."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tmpfs mounts)"
    for tool in ("ip", "mount", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (the user-space netem)"
    return ""


@pytest.fixture
def fault_host() -> None:
    """Skips the test where this machine cannot run the harness (not root, no iproute2)."""
    reason = _missing()
    if reason:
        pytest.skip(f"fault harness: {reason}")


@pytest.fixture
def open_cluster(
    fault_host: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., harness.FaultCluster]]:
    """Starts FaultClusters (keyword arguments: FaultCluster's) under tmp_path; each is
    closed at the end of the test whatever happened, its logs printed when the test failed."""
    opened: list[harness.FaultCluster] = []

    def open_(**kwargs: Any) -> harness.FaultCluster:
        cluster = harness.FaultCluster(tmp_path / f"cluster{len(opened)}", **kwargs)
        opened.append(cluster)
        cluster.start()
        return cluster

    yield open_
    report = getattr(request.node, "rep_call", None)
    for cluster in opened:
        if report is None or report.failed:
            sys.stderr.write(cluster.logs())
        cluster.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
