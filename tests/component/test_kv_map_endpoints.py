"""`KVClient.connect(metadata=[...])` with several endpoints (kvtier.kv_mapsource), on in-process
services: endpoints that do not answer, or serve neither the metadata nor the gateway API, are
skipped for the map and for users' session tokens; when none answers, the error names each.
(Started during a real metadata outage through a gateway: tests/integration/
test_metadata_outage.py.)"""

from __future__ import annotations

import socket

import pytest

from kvtier import errors, kv_mapsource, security
from kvtier.kv import AsyncKVClient
from tests.component.test_auth import Cluster
from tests.component.test_auth import cluster as cluster

BLOCK = bytes(range(256)) * 64


def _dead_address() -> str:
    """An address nothing listens on (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_endpoints_and_token_issuers_keep_order_without_repeats() -> None:
    assert kv_mapsource.endpoints(" a:1, b:2,,a:1 ") == ["a:1", "b:2"]
    assert kv_mapsource.endpoints(["a:1", "b:2", "a:1"]) == ["a:1", "b:2"]
    assert kv_mapsource.token_issuers("t:1", ["a:1", "t:1"]) == "t:1,a:1"
    assert kv_mapsource.token_issuers("", ["a:1"]) == "a:1"


async def test_a_user_skips_endpoints_that_cannot_serve_the_map_or_a_token(
    cluster: Cluster,
) -> None:
    # A dead port, then a kvcache node (neither API, no tokens), then the metadata node.
    endpoints = [
        _dead_address(),
        cluster.kvcache.info.client_address,
        cluster.metadata.info.client_address,
    ]
    async with await AsyncKVClient.connect(
        namespace="ns", metadata=endpoints, security=cluster.users["a"], timeout_s=5
    ) as client:
        assert client.node_ids == [cluster.kvcache.info.node_id]
        assert [str(s) for s in await client.put_batch([b"k"], [BLOCK])] == ["stored"]
        out = bytearray(len(BLOCK))
        assert await client.get_batch([b"k"], [out]) == [len(BLOCK)]
        assert bytes(out) == BLOCK


async def test_no_endpoint_answers_names_each(cluster: Cluster) -> None:
    dead = _dead_address()
    kvcache = cluster.kvcache.address
    with pytest.raises(errors.Unavailable) as failed:
        await AsyncKVClient.connect(namespace="ns", metadata=[dead, kvcache], timeout_s=5)
    assert f"{dead}: Unavailable" in failed.value.message
    assert f"{kvcache}: serves neither" in failed.value.message


async def test_a_user_whose_token_issuers_are_all_down_is_told_why(cluster: Cluster) -> None:
    user = cluster.users["a"]
    alone = security.ClientSecurity(
        ca_file=user.ca_file, access_key=user.access_key, secret_key=user.secret_key
    )
    dead = [_dead_address(), _dead_address()]
    with pytest.raises(errors.Unavailable) as failed:
        await AsyncKVClient.connect(namespace="ns", metadata=dead, security=alone, timeout_s=5)
    assert "no session token" in failed.value.message
    assert "use a certificate" in failed.value.message
    assert all(address in failed.value.message for address in dead)


async def test_a_refresh_of_a_known_epoch_carries_no_map(cluster: Cluster) -> None:
    # docs/scaling.md: clients refreshing every refresh_s used to receive the whole map each
    # time; with the epoch they know, an endpoint sends a map only when it changed.
    sources = kv_mapsource.MapSources(
        [cluster.metadata.info.client_address],
        timeout_s=5,
        security=cluster.users["a"],
        tokens=kv_mapsource.user_tokens(cluster.users["a"], [cluster.metadata.info.client_address]),
    )
    try:
        cmap = await sources.cluster_map()
        assert cmap is not None
        assert cmap.epoch > 0
        assert await sources.cluster_map(cmap.epoch) is None
        newer = await sources.cluster_map(cmap.epoch - 1)
        assert newer is not None
        assert newer.epoch == cmap.epoch
    finally:
        await sources.close()
    async with await AsyncKVClient.connect(
        namespace="ns", metadata=cluster.metadata.info.client_address,
        security=cluster.users["a"], timeout_s=5,
    ) as client:  # fmt: skip
        nodes = client.node_ids
        await client._set.refresh()  # the map is unchanged: the client keeps what it has
        assert client.node_ids == nodes
        assert [str(s) for s in await client.put_batch([b"e"], [BLOCK])] == ["stored"]
