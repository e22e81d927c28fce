"""Shared fixtures: a real etcd server per session (and per test where a test breaks it)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import etcdserver
from tests import pki as test_pki


def pytest_configure(config: pytest.Config) -> None:
    """The session's PKI, before any test builds a client (see tests/pki.py)."""
    test_pki.session()


def pytest_report_header() -> str:
    seed = os.environ.get("KVTIER_TEST_SEED") or str(random.randrange(2**32))
    os.environ["KVTIER_TEST_SEED"] = seed
    random.seed(int(seed))
    return f"kvtier random seed: {seed} (set KVTIER_TEST_SEED to replay)"


def start_etcd(base: Path) -> etcdserver.EtcdServer:
    """A fresh etcd on free ports with its data under base, already healthy; over TLS with
    client certificates required, as in a real cluster."""
    server = etcdserver.EtcdServer(
        base / "etcd",
        client_port=etcdserver.free_port(),
        peer_port=etcdserver.free_port(),
        log_path=base / "etcd.log",
        tls=test_pki.session().etcd_tls(),
    )
    server.start()
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[etcdserver.EtcdServer]:
    """One etcd for the session; tests isolate themselves with `etcd_prefix`."""
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[etcdserver.EtcdServer]:
    """An etcd of the test's own, for tests that stop or restart it."""
    server = start_etcd(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/kvtier-test-{uuid.uuid4().hex[:10]}"
