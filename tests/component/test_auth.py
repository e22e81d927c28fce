"""Authentication end to end on in-process services: certificates, session tokens, tenants
from credentials, the authorization table, and certificate rotation without a restart.

Every test of a refusal sits next to the call that is accepted with the right credential.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from kvtier import errors, etcdserver, kvsettings, masterkey, membership, pki, rpc, security, users
from kvtier import tokens as session_tokens
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.clients import metadata as metadata_client
from kvtier.clients import node as node_client
from kvtier.kv import AsyncKVClient
from kvtier.proto.auth.v1 import auth_pb2, auth_pb2_grpc
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import servicer as kvcache_servicer
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import pki as test_pki
from tests.component import harness

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    metadata: harness.Running
    kvcache: harness.Running
    users: dict[str, security.ClientSecurity]


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Cluster]:
    """metadata (with a master key) + one kvcache node; users team-a, team-b, a trusted one,
    created by the operator."""
    monkeypatch.delenv(masterkey.ENV_MASTER_KEY, raising=False)
    key_file = tmp_path / "master.key"
    assert masterkey.write_new(key_file)
    common = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store,
            master_key_file=str(key_file), **common,
        ) as meta,
        harness.run(
            kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
            data_dir=str(tmp_path / "kv"), **common,
        ) as kv,
    ):  # fmt: skip
        made: dict[str, security.ClientSecurity] = {}
        async with metadata_client.MetadataClient(meta.address) as operator:
            for name, tenant, trusted in (
                ("a", "team-a", False),
                ("b", "team-b", False),
                ("t", "team-t", True),
            ):
                user = await operator.create_user(tenant=tenant, shm_trusted=trusted)
                made[name] = test_pki.session().user(user.access_key, user.secret.reveal())
        yield Cluster(meta, kv, made)


def _anonymous() -> security.ClientSecurity:
    return security.ClientSecurity(ca_file=test_pki.session().ca_file)


async def test_no_credential_is_unauthenticated_on_the_client_port(cluster: Cluster) -> None:
    address = cluster.metadata.info.client_address
    assert address
    async with metadata_client.MetadataClient(address, security=_anonymous()) as client:
        with pytest.raises(errors.Unauthenticated):
            await client.get_cluster_map()
        with pytest.raises(errors.Unauthenticated):
            await client.create_user(tenant="x")
    async with node_client.NodeClient(address, security=_anonymous()) as client:
        with pytest.raises(errors.Unauthenticated):
            await client.get_node_info()
    # Health is public: it says SERVING and nothing else.
    assert await rpc.check_health(address, security=_anonymous()) == "SERVING"
    # The user's token is accepted on the same port.
    async with metadata_client.MetadataClient(address, security=cluster.users["a"]) as client:
        assert await client.get_cluster_map() is not None


async def test_service_port_needs_a_cluster_certificate(cluster: Cluster) -> None:
    address = cluster.metadata.address
    async with node_client.NodeClient(address, security=_anonymous(), timeout_s=3) as client:
        with pytest.raises(errors.Unavailable):  # the TLS handshake fails
            await client.get_node_info()
    # A certificate of another cluster's CA: refused at the handshake too.
    foreign = pki.new_authority("foreign")
    directory = Path(test_pki.session().directory.parent / f"foreign-{time.time_ns()}")
    pki.write_authority(directory, foreign)
    cert, key = pki.write_pair(directory, "op", foreign.issue("operator", "mallory"))
    try:
        impostor = security.ClientSecurity(
            ca_file=test_pki.session().ca_file, cert_file=str(cert), key_file=str(key)
        )
        async with node_client.NodeClient(address, security=impostor, timeout_s=3) as client:
            with pytest.raises(errors.Unavailable):
                await client.get_node_info()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    async with node_client.NodeClient(address) as client:  # the operator's certificate
        assert (await client.get_node_info()).node.node_id == cluster.metadata.info.node_id


async def test_wrong_secret_and_forged_tokens_are_unauthenticated(cluster: Cluster) -> None:
    address = cluster.metadata.info.client_address
    good = cluster.users["a"]
    bad = good.with_user(good.access_key, "not-the-secret-at-all")
    async with metadata_client.MetadataClient(address, security=bad) as client:
        with pytest.raises(errors.Unauthenticated):
            await client.get_cluster_map()
    unknown = good.with_user("NOSUCHUSER", "whatever-secret")
    async with metadata_client.MetadataClient(address, security=unknown) as client:
        with pytest.raises(errors.Unauthenticated):
            await client.get_cluster_map()
    async with metadata_client.MetadataClient(address, security=_anonymous()) as client:
        for forged in ("kvt1.AAAA", "garbage", "kvt1." + "x" * 100):
            with pytest.raises(errors.Unauthenticated):
                await rpc.invoke(
                    client._stub.GetClusterMap,
                    metadata_pb2.GetClusterMapRequest(),
                    timeout_s=5,
                    token=forged,
                )


async def test_tenant_users_may_not_call_admin_or_service_rpcs(cluster: Cluster) -> None:
    user = cluster.users["a"]
    async with metadata_client.MetadataClient(
        cluster.metadata.info.client_address, security=user
    ) as client:
        with pytest.raises(errors.PermissionDenied):
            await client.create_user(tenant="team-a", is_admin=True)
        with pytest.raises(errors.PermissionDenied):
            await client.list_users()
        with pytest.raises(errors.PermissionDenied):
            await client.delete_user(user.access_key)
        with pytest.raises(errors.PermissionDenied):
            await client.delete_bucket("anything")
    kv_address = cluster.kvcache.info.client_address
    tokens = security.token_source(user, cluster.metadata.info.client_address)
    async with kvcache_client.KVCacheClient(kv_address, security=user, tokens=tokens) as client:
        with pytest.raises(errors.PermissionDenied):
            await client.set_quota("team-a", 1)
        with pytest.raises(errors.PermissionDenied):
            await client.stats("team-b")
        assert (await client.stats()).tenant == "team-a"
    # The operator may do all of it.
    async with kvcache_client.KVCacheClient(cluster.kvcache.address) as client:
        await client.set_quota("team-a", 1 << 30)


@pytest.mark.parametrize("role", ["kvcache", "datanode"])
async def test_a_node_certificate_cannot_make_a_user_an_admin_through_etcd(
    cluster: Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    role: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every node certificate reaches etcd (membership); rewriting a user's record there (admin
    flag, tenant) must not change what its session token grants: a record sealed with its
    privileges bound (`users.BIND_PRIVILEGES`: the next release's default; this one writes the
    previous release's form) no longer opens. Here the record is sealed bound, as by that
    release."""
    monkeypatch.setattr(users, "BIND_PRIVILEGES", True)  # the metadata node runs in process
    async with metadata_client.MetadataClient(cluster.metadata.address) as operator:
        made = await operator.create_user(tenant="team-a")
    user = test_pki.session().user(made.access_key, made.secret.reveal())

    async def session_token() -> auth_pb2.GetSessionTokenResponse:
        request = session_tokens.sign_request(user.access_key, user.secret_key)
        address = cluster.metadata.info.client_address
        async with rpc.open_channel(address, security=_anonymous()) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            reply: auth_pb2.GetSessionTokenResponse = await rpc.invoke(
                stub.GetSessionToken, request, timeout_s=5
            )
        return reply

    before = await session_token()
    assert (before.tenant, before.is_admin) == ("team-a", False)
    node = membership.EtcdMembership(
        (etcd.endpoint,), etcd_prefix, security=test_pki.session().client(role)
    )
    await node.connect(wait_s=5)
    try:
        key = f"{etcd_prefix}/users/{user.access_key}".encode()
        kv = await node.call(lambda client: client.get(key))
        record = metadata_pb2.UserRecord.FromString(bytes(kv.value))
        record.is_admin, record.tenant = True, "team-b"
        await node.call(lambda client: client.put(key, record.SerializeToString()))
    finally:
        await node.close()
    with pytest.raises(errors.Unauthenticated):
        await session_token()


async def test_a_tenant_sets_ttls_on_a_bounded_number_of_namespaces(
    cluster: Cluster, store: membership.EtcdMembership, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: SetNamespaceTTL is a tenant's RPC and stored each namespace's TTL as an etcd
    key that every kvcache node reads again at every change: one user wrote any number of them
    (1,000 in 12 s here; each change then cost every node a read of them all)."""
    monkeypatch.setattr(kvcache_servicer, "MAX_TENANT_NAMESPACE_TTLS", 3, raising=False)
    meta = cluster.metadata.info.client_address
    kv_address = cluster.kvcache.info.client_address
    for who in ("a", "b"):  # each tenant has its own bound
        user = cluster.users[who]
        tokens = security.token_source(user, meta)
        async with kvcache_client.KVCacheClient(kv_address, security=user, tokens=tokens) as c:
            for name in ("n0", "n1", "n2"):
                await c.set_namespace_ttl("", name, 60)
            with pytest.raises(errors.QuotaExceeded):
                await c.set_namespace_ttl("", "n3", 60)
            await c.set_namespace_ttl("", "n1", 0)  # one already set: changed as before
    async with kvcache_client.KVCacheClient(cluster.kvcache.address) as operator:
        await operator.set_namespace_ttl("team-a", "n3", 60)  # admins are not bounded
    stored = await kvsettings.KVSettingsStore(store).load()
    assert sorted(
        (s.namespace.tenant, s.namespace.name, s.ttl_s)
        for s in stored
        if isinstance(s, pb.SetNamespaceTTLRequest)
    ) == [("team-a", "n0", 60), ("team-a", "n1", 0), ("team-a", "n2", 60), ("team-a", "n3", 60),
          ("team-b", "n0", 60), ("team-b", "n1", 0), ("team-b", "n2", 60)]  # fmt: skip


async def _kv(cluster: Cluster, who: str, **kwargs: object) -> AsyncKVClient:
    return await AsyncKVClient.connect(
        namespace="ns",
        metadata=cluster.metadata.info.client_address,
        security=cluster.users[who],
        timeout_s=5,
        **kwargs,
    )


async def test_the_tenant_of_every_kv_operation_is_the_users(cluster: Cluster) -> None:
    block = bytes(range(256)) * 256
    async with await _kv(cluster, "a") as a, await _kv(cluster, "b") as b:
        assert [str(s) for s in await a.put_batch([b"k"], [block])] == ["stored"]
        out = bytearray(len(block))
        assert (await a.get_batch([b"k"], [out]))[0] == len(block)
        assert bytes(out) == block
        # B names the same namespace and key: its own tenant's, which is empty.
        assert await b.exists_batch([b"k"]) == [False]
        assert (await b.get_batch([b"k"], [bytearray(len(block))]))[0] is None
    # B claiming A's tenant: its data-plane session is refused, loudly (a misconfiguration).
    async with await _kv(cluster, "b", tenant="team-a") as impostor:
        with pytest.raises(errors.PermissionDenied):
            await impostor.exists_batch([b"k"])
    # Over gRPC the claim is refused outright.
    user_b = cluster.users["b"]
    tokens = security.token_source(user_b, cluster.metadata.info.client_address)
    async with kvcache_client.KVCacheClient(
        cluster.kvcache.info.client_address, security=user_b, tokens=tokens
    ) as client:
        with pytest.raises(errors.PermissionDenied):
            await client.batch_exists(
                pb.BatchExistsRequest(
                    namespace=pb.Namespace(tenant="team-a", name="ns"), keys=[b"k"]
                )
            )
        reply = await client.batch_exists(
            pb.BatchExistsRequest(namespace=pb.Namespace(name="ns"), keys=[b"k"])
        )
        assert list(reply.present) == [False]


async def test_a_kvcache_certificate_reaches_no_tenants_blocks(cluster: Cluster) -> None:
    """Regression: a kvcache node's certificate, refused KVCacheService over gRPC, opened a
    data-plane session naming a tenant on a kvcache node and read and wrote that tenant's
    blocks with data-plane calls. Only callers of the block API (users, gateways, admins) open
    sessions on a kvcache node, and no service but a gateway opens one for a tenant anywhere."""
    block = b"team-a's block " * 64
    async with await _kv(cluster, "a") as a:
        assert [str(s) for s in await a.put_batch([b"k"], [block])] == ["stored"]
    pki_ = test_pki.session()
    for role in ("gateway", "kvcache"):
        async with await AsyncKVClient.connect(
            namespace="ns", metadata=cluster.metadata.address, security=pki_.client(role),
            tenant="team-a", timeout_s=5,
        ) as node:  # fmt: skip
            out = bytearray(len(block))
            if role == "gateway":  # acting for the tenant whose request it serves: allowed
                assert await node.get_batch([b"k"], [out]) == [len(block)]
                assert bytes(out) == block
                continue
            with pytest.raises(errors.PermissionDenied):
                await node.get_batch([b"k"], [out])
            with pytest.raises(errors.PermissionDenied):
                await node.put_batch([b"forged"], [b"x" * 64])
            assert bytes(out) == bytes(len(block))
    async with dataplane_client.DataPlaneClient(
        cluster.kvcache.address, security=pki_.client("kvcache")
    ) as negotiator:
        for tenant in ("team-a", ""):
            with pytest.raises(errors.PermissionDenied):
                await negotiator.negotiate("c", tenant=tenant)
    async with kvcache_client.KVCacheClient(
        cluster.kvcache.address, security=pki_.client("kvcache")
    ) as client:  # as over gRPC
        with pytest.raises(errors.PermissionDenied):
            await client.batch_exists(
                pb.BatchExistsRequest(
                    namespace=pb.Namespace(tenant="team-a", name="ns"), keys=[b"k"]
                )
            )
    async with await _kv(cluster, "a") as a:  # nothing forged landed
        assert await a.exists_batch([b"k", b"forged"]) == [True, False]


async def test_shared_memory_only_for_trusted_users(cluster: Cluster) -> None:
    address = cluster.kvcache.info.client_address
    meta = cluster.metadata.info.client_address
    for who, expected in (("a", "tcp"), ("t", "shm")):
        user = cluster.users[who]
        tokens = security.token_source(user, meta)
        async with dataplane_client.DataPlaneClient(
            address, security=user, tokens=tokens
        ) as client:
            reply = await client.negotiate("c")
            assert reply.transport == expected, who
            if who == "a":
                with pytest.raises((errors.PermissionDenied, errors.Unavailable)):
                    await client.negotiate("c", ["shm"])


def _served_serial(address: str, ca_file: str) -> int:
    """The serial number of the certificate a TLS handshake with address presents."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_certificate_rotation_without_restart(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    session = test_pki.session()
    directory = tmp_path / "pki"
    pki.ensure_private_dir(directory)
    shutil.copy(session.ca_file, directory / pki.CA_CERT)
    for suffix in ("crt", "key"):
        shutil.copy(getattr(session, "cert" if suffix == "crt" else "key")("metadata"),
                    directory / f"metadata.{suffix}")  # fmt: skip
    settings = {
        "tls_ca_file": str(directory / pki.CA_CERT),
        "tls_cert_file": str(directory / "metadata.crt"),
        "tls_key_file": str(directory / "metadata.key"),
    }
    async with harness.run(
        metadata_config.MetadataConfig, "metadata", metadata_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, insecure=False, **settings,
    ) as meta:  # fmt: skip
        address = meta.info.client_address
        before = await asyncio.to_thread(_served_serial, address, session.ca_file)
        authority = pki.load_authority(session.directory)
        pki.write_pair(
            directory, "metadata", authority.issue("metadata", "rotated", hosts=pki.local_hosts())
        )
        replaced = time.monotonic()
        after = before
        while after == before and time.monotonic() - replaced < 10:
            after = await asyncio.to_thread(_served_serial, address, session.ca_file)
        took_ms = (time.monotonic() - replaced) * 1000
        log.info("a rotated certificate was served %.1f ms after it was written", took_ms)
        assert after != before, "the new certificate was never served"
        # Clients keep working over new connections, no restart.
        async with node_client.NodeClient(meta.address) as client:
            assert (await client.get_node_info()).node.node_id == meta.info.node_id
        assert not meta.task.done()


async def test_secrets_are_never_logged(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user = cluster.users["a"]
    async with await _kv(cluster, "a") as a:
        await a.exists_batch([b"k"])
    text = caplog.text
    assert user.secret_key not in text
    assert "kvt1." not in text  # nor a session token
    assert repr(user).find(user.secret_key) == -1
    assert users.Secret(user.secret_key).__repr__() == "Secret('***')"


async def test_forged_datanode_commits_and_deletes_are_refused(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    """Regression: ShardService was open to anyone reaching the port (forge a ShardMeta, commit
    it, delete shards). Now only gateways (and operators) may call it, and a user cannot even
    complete the TLS handshake with a datanode."""
    from kvtier.clients import datanode as datanode_client
    from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
    from services.datanode import __main__ as datanode_main
    from services.datanode import config as datanode_config

    async with harness.run(
        datanode_config.DatanodeConfig, "datanode", datanode_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "dn"),
    ) as dn:  # fmt: skip
        assert not dn.info.client_address  # no users' port at all
        drive = dn.info.drives[0].drive_id
        forged = shards_pb2.CommitWriteRequest(
            drive_id=drive,
            write_id="w" * 32,
            meta=datanode_pb2.ShardMeta(
                bucket="victim", key="k", mtime_unix_ns=2**62, data_shards=1
            ),
        )
        session = test_pki.session()
        for role in ("kvcache", "metadata"):
            async with datanode_client.ShardClient(dn.address, security=session.client(role)) as c:
                with pytest.raises(errors.PermissionDenied):
                    await c.commit_write(forged)
                with pytest.raises(errors.PermissionDenied):
                    await c.delete_shard(drive, "victim", "k")
                with pytest.raises(errors.PermissionDenied):  # tags and ACLs in place
                    await c.update_meta(drive, "victim", "k", "d" * 32, tags={"x": "1"})
        async with datanode_client.ShardClient(dn.address, security=_anonymous(), timeout_s=3) as c:
            with pytest.raises(errors.Unavailable):
                await c.delete_shard(drive, "victim", "k")
        # The gateway's certificate is let in; the forged far-future version is still refused.
        async with datanode_client.ShardClient(dn.address, security=session.client("gateway")) as c:
            with pytest.raises((errors.NotFound, errors.InvalidArgument)):
                await c.commit_write(forged)


async def test_reflection_is_authenticated_like_every_rpc(cluster: Cluster) -> None:
    """A bidirectional stream (server reflection) goes through the same interceptor."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address = cluster.metadata.info.client_address

    async def list_services(sec: security.ClientSecurity, token: str | None) -> list[str]:
        async with rpc.open_channel(address, security=sec) as channel:
            stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
            call = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=rpc.call_metadata(token=token),
            )
            replies = [reply async for reply in call]
            return [s.name for s in replies[0].list_services_response.service]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await list_services(_anonymous(), None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    user = cluster.users["a"]
    token = await security.token_source(user, address).token()
    names = await list_services(user, token)
    assert "kvtier.metadata.v1.MetadataService" in names


async def test_tcp_data_plane_over_tls(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    """dataplane_tls: the tcp data plane's endpoint is tls://; the SDK verifies it against the
    cluster CA and the bytes round-trip."""
    async with harness.run(
        kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "kv"),
        dataplane_tls=True,
    ) as kv:  # fmt: skip
        tcp = [e for e in kv.info.dataplane.endpoints if e.name == "tcp"]
        assert tcp[0].address.startswith("tls://")
        block = bytes(range(256)) * 1024
        async with await AsyncKVClient.connect(
            namespace="ns", nodes=[kv.address], transports=["tcp"], timeout_s=10
        ) as client:
            assert [str(s) for s in await client.put_batch([b"k"], [block])] == ["stored"]
            out = bytearray(len(block))
            assert (await client.get_batch([b"k"], [out]))[0] == len(block)
            assert bytes(out) == block
