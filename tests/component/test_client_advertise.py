"""`advertise_client_host` (issue 17, docker-compose from the host): a node reached by SDK users
another way than by the other nodes (published ports on 127.0.0.1 in docker-compose.yml, while
nodes dial `kvcache-1`) announces that host for its client port and hands users' data-plane
sessions a tcp endpoint on it; services and operators keep the advertised host.

Here the advertised host is a name nobody can resolve (the compose network's names from the
host), the client host 127.0.0.1: a user's SDK, which finds the node in the cluster map, still
puts and gets byte-exact, and an operator's session is told the in-network name."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from kvtier import config, etcdserver, kv, membership
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import dataplane
from services.kvcache import config as kvcache_config
from tests import pki as test_pki
from tests.integrations.conftest import secure_cluster

IN_NETWORK = "kvcache-in-network.invalid"


async def test_users_dial_the_client_host_and_nodes_the_advertised_one(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with secure_cluster(
        1, etcd, etcd_prefix, store, tmp_path,
        advertise_host=IN_NETWORK, advertise_client_host="127.0.0.1",
        dataplane_transports=("tcp",),
    ) as cluster:  # fmt: skip
        (node,) = cluster.nodes
        grpc_port = node.info.grpc_address.rpartition(":")[2]
        assert node.info.grpc_address == f"{IN_NETWORK}:{grpc_port}"
        assert node.info.client_address.startswith("127.0.0.1:")
        user = await cluster.user("team-a")
        security = dataclasses.replace(
            test_pki.session().user(user.access_key, user.secret.reveal()),
            token_address=cluster.metadata_client,
        )
        keys = [b"host-chain-0", b"host-chain-1"]
        blocks = [hashlib.shake_256(k).digest(64 * 1024) for k in keys]
        async with await kv.AsyncKVClient.connect(
            metadata=cluster.metadata_client, namespace="host-ns", security=security,
            transports=["tcp"], timeout_s=2.0,
        ) as client:  # fmt: skip
            assert [str(s) for s in await client.put_batch(keys, blocks)] == ["stored"] * 2
            outs = [bytearray(64 * 1024) for _ in keys]
            assert await client.get_batch(keys, outs) == [64 * 1024] * 2
            assert [bytes(o) for o in outs] == blocks
        # The node's own users' door, asked directly: a tcp endpoint on the client host.
        async with dataplane_client.DataPlaneClient(
            node.info.client_address, security=security
        ) as users_door:
            opened = await users_door.negotiate("probe-user", ["tcp"])
        assert opened.endpoint.address.startswith("127.0.0.1:"), opened.endpoint
        # An operator (a certificate, the service port) is told the in-network host.
        async with dataplane_client.DataPlaneClient(f"127.0.0.1:{grpc_port}") as operator:
            opened = await operator.negotiate("probe-operator", ["tcp"])
        assert opened.endpoint.address.startswith(f"{IN_NETWORK}:"), opened.endpoint


def test_for_users_swaps_only_the_tcp_host() -> None:
    tcp = common_pb2.TransportEndpoint(name="tcp", address="tls://kvcache-1:7461")
    assert dataplane.for_users(tcp, "127.0.0.1").address == "tls://127.0.0.1:7461"
    assert tcp.address == "tls://kvcache-1:7461"  # a copy: the node's capabilities stay
    plain = common_pb2.TransportEndpoint(name="tcp", address="kvcache-1:7461")
    assert dataplane.for_users(plain, "127.0.0.1").address == "127.0.0.1:7461"
    assert dataplane.for_users(plain, "") is plain
    shm = common_pb2.TransportEndpoint(name="shm", address="/run/kv.sock")
    assert dataplane.for_users(shm, "127.0.0.1") is shm


def test_advertise_client_host_defaults_to_the_advertised_host_and_is_checked() -> None:
    cfg = kvcache_config.KVCacheConfig(advertise_host="kvcache-1", insecure=True)
    assert cfg.advertised_client_host() == "kvcache-1"
    cfg = kvcache_config.KVCacheConfig(
        advertise_host="kvcache-1", advertise_client_host="127.0.0.1", insecure=True
    )
    assert (cfg.advertised_host(), cfg.advertised_client_host()) == ("kvcache-1", "127.0.0.1")
    for bad in ("127.0.0.1:7443", "a b", "tcp://x"):
        with pytest.raises(config.ConfigError, match="advertise_client_host"):
            kvcache_config.KVCacheConfig(advertise_client_host=bad, insecure=True)
