"""Fixtures for component tests: an etcd session per test under a private prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvtier import etcdserver, membership


@pytest.fixture
async def store(
    etcd: etcdserver.EtcdServer, etcd_prefix: str
) -> AsyncIterator[membership.EtcdMembership]:
    """A membership client on the session etcd, under this test's prefix."""
    client = membership.EtcdMembership((etcd.endpoint,), etcd_prefix)
    await client.connect(wait_s=5)
    yield client
    await client.close()
