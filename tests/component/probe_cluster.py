"""The acceptance probe suite's world (tests/component/test_probe.py): one in-process secure
cluster (metadata with a master key, 6 datanodes x 2 drives, one kvcache node, one gateway with
S3 over HTTPS) and what tenant A owns in it, made through the public doors as A.

Tenant A (a plain user) owns: an object bucket with objects of several sizes, a multipart upload
in progress with one part, a PUT begun and not committed (its upload id stays open while the
probes run), an S3 KV bucket with objects, KV blocks in a namespace (some pinned), a pending KV
put and a read lease taken over gRPC (their ids are what B guesses). Tenant B (a plain user) owns
a bucket and a multipart upload of its own (the destinations of its copy attempts). An admin user
and the operator certificate read everything back for the snapshots (`probe_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import numpy as np

from kvtier import etcdserver, masterkey, membership, names, security
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.clients import metadata as metadata_client
from kvtier.kv import AsyncKVClient
from kvtier.objects import AsyncObjectClient
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as obj_pb
from kvtier.proto.kvcache.v1 import kvcache_pb2 as kv_pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.datanode import __main__ as datanode_main
from services.datanode import config as datanode_config
from services.gateway import __main__ as gateway_main
from services.gateway import config as gateway_config
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import pki as test_pki
from tests.component import harness

KIB, MIB = 1024, 1024 * 1024
DATANODES = 6
DRIVES_PER_NODE = 2
#: metadata + datanodes + kvcache + gateway
NODES = DATANODES + 3
REGION = "us-east-1"


@dataclasses.dataclass
class Cluster:
    """The running services and an etcd session as the operator."""

    metadata: harness.Running
    datanodes: list[harness.Running]
    kvcache: harness.Running
    gateway: harness.Running
    store: membership.EtcdMembership
    tmp: Path

    @property
    def nodes(self) -> list[harness.Running]:
        return [self.metadata, *self.datanodes, self.kvcache, self.gateway]

    @property
    def s3_url(self) -> str:
        return f"https://{self.gateway.info.s3_address}"

    def drive_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("dn*/drive*"))


@dataclasses.dataclass
class User:
    """A user's credentials (the secret only in memory)."""

    access_key: str
    secret_key: str
    tenant: str
    security: security.ClientSecurity

    def credentials(self) -> botocore.credentials.Credentials:
        return botocore.credentials.Credentials(self.access_key, self.secret_key)


@dataclasses.dataclass
class World:
    """Everything the probes aim at (all of it tenant A's unless named b_*)."""

    cluster: Cluster
    a: User
    b: User
    admin: User
    bucket: str
    storage: str  # the bucket's storage name on the drives (`bucket@storage_id`)
    objects: dict[str, bytes]
    kv_bucket: str
    kv_bucket_objects: dict[str, bytes]
    upload_key: str
    upload_id: str
    part_etag: str
    open_put_id: str
    namespace: str
    blocks: dict[bytes, bytes]
    pinned: list[bytes]
    kv_put_ids: list[int]
    kv_lease_ids: list[int]
    kv_descriptor: common_pb2.Descriptor
    #: A's data-plane session principal on the kvcache node (its descriptor is bound to it).
    a_principal: str
    drive_id: str
    b_bucket: str
    b_upload_key: str
    b_upload_id: str
    #: Clients A keeps open while the probes run (its open PUT lives on A's session).
    a_objects: AsyncObjectClient
    a_kv: AsyncKVClient
    #: A's public-read bucket (x-amz-acl), its public-read objects and its private ones:
    #: anonymous requests may list it and read the open ones, nothing else (probe (e)).
    public_bucket: str = ""
    public_open: dict[str, bytes] = dataclasses.field(default_factory=dict)
    public_closed: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def canaries(self) -> list[bytes]:
        """Byte strings that only a response leaking something of tenant A's would hold."""
        found = [
            self.a.tenant,
            self.a.access_key,
            self.bucket,
            self.storage,
            self.kv_bucket,
            self.upload_id,
            self.open_put_id,
            *self.objects,
            *self.kv_bucket_objects,
        ]
        out = [s.encode() for s in found if s]
        out += [k for k in self.blocks if k]
        out += [data[:16] for data in (*self.objects.values(), *self.blocks.values()) if data]
        out += [data[:16] for data in self.kv_bucket_objects.values() if data]
        return out


def data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _datanode(
    store: membership.EtcdMembership, tmp: Path, i: int, common: dict[str, Any]
) -> contextlib.AbstractAsyncContextManager[harness.Running]:
    return harness.run(
        datanode_config.DatanodeConfig,
        "datanode",
        datanode_main.build,
        store,
        data_dir=str(tmp / f"dn{i}"),
        drive_count=DRIVES_PER_NODE,
        staging_bytes=32 * MIB,
        staging_slot_bytes=8 * MIB,
        **common,
    )


@contextlib.asynccontextmanager
async def running(etcd: etcdserver.EtcdServer, prefix: str, tmp: Path) -> AsyncIterator[Cluster]:
    """Start the cluster (ready once every node is in the map and the gateway sees the pool)."""
    key_file = tmp / "master.key"
    assert masterkey.write_new(key_file)
    # Leases of 10 s: a keepalive late on a loaded machine must not re-register a node (that
    # would rewrite the map in etcd, which the probes' state digest covers).
    common: dict[str, Any] = {
        "etcd_endpoints": (etcd.endpoint,),
        "etcd_prefix": prefix,
        "lease_ttl_s": 10,
    }
    store = membership.EtcdMembership(
        (etcd.endpoint,), prefix, security=test_pki.session().client()
    )
    await store.connect(wait_s=5)
    try:
        async with contextlib.AsyncExitStack() as stack:
            meta = await stack.enter_async_context(
                harness.run(
                    metadata_config.MetadataConfig,
                    "metadata",
                    metadata_main.build,
                    store,
                    pool_drives=DATANODES * DRIVES_PER_NODE,
                    master_key_file=str(key_file),
                    **common,
                )
            )
            nodes = [
                await stack.enter_async_context(_datanode(store, tmp, i, common))
                for i in range(DATANODES)
            ]
            gateway = await stack.enter_async_context(
                harness.run(
                    gateway_config.GatewayConfig,
                    "gateway",
                    gateway_main.build,
                    store,
                    staging_bytes=128 * MIB,
                    staging_slot_bytes=64 * MIB,
                    scan_interval_s=0.0,
                    master_key_file=str(key_file),
                    **common,
                )
            )
            kv = await stack.enter_async_context(
                harness.run(
                    kvcache_config.KVCacheConfig,
                    "kvcache",
                    kvcache_main.build,
                    store,
                    data_dir=str(tmp / "kv"),
                    put_timeout_s=600.0,
                    read_lease_s=600.0,
                    **common,
                )
            )
            await harness.wait_map(store, lambda m: len(m.pools) == 1 and len(m.nodes) == NODES)
            await gateway.ctx.map_view.wait_for(lambda m: len(m.pools) == 1, timeout_s=10)
            await kv.ctx.map_view.wait_for(lambda m: len(m.nodes) == NODES, timeout_s=10)
            yield Cluster(meta, nodes, kv, gateway, store, tmp)
    finally:
        await store.close()


async def _users(cluster: Cluster) -> tuple[User, User, User]:
    pki = test_pki.session()
    made = []
    async with metadata_client.MetadataClient(cluster.metadata.address) as operator:
        for tenant, admin in (
            ("probe-tenant-a", False),
            ("probe-tenant-b", False),
            ("probe-ops", True),
        ):
            user = await operator.create_user(tenant=tenant, is_admin=admin)
            secret = user.secret.reveal()
            sec = dataclasses.replace(
                pki.user(user.access_key, secret),
                token_address=cluster.metadata.info.client_address,
            )
            made.append(User(user.access_key, secret, tenant, sec))
    return made[0], made[1], made[2]


def tls_context() -> ssl.SSLContext:
    """Trusts the test CA (the S3 API serves HTTPS with the gateway's cluster certificate)."""
    return ssl.create_default_context(cafile=test_pki.session().ca_file)


def sign(
    user: User | None,
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> botocore.awsrequest.AWSPreparedRequest:
    """An S3 request signed with SigV4 by user (None: unsigned)."""
    request = botocore.awsrequest.AWSRequest(method=method, url=url, data=body, headers=headers)
    request.headers["x-amz-content-sha256"] = sha(body)
    if user is not None:
        botocore.auth.S3SigV4Auth(user.credentials(), "s3", REGION).add_auth(request)
    return request.prepare()


async def _s3(
    session: Any,
    user: User,
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """An S3 request as user that must succeed; its body."""
    prepared = sign(user, method, url, body, headers)
    async with session.request(
        method, prepared.url, data=body, headers=dict(prepared.headers), ssl=tls_context()
    ) as response:
        payload: bytes = await response.read()
        assert response.status == 200, (method, url, response.status, payload)
        return payload


PUBLIC_BUCKET = "probe-a-public"
PUBLIC_OPEN = {"public-open": data(90, 700)}
PUBLIC_CLOSED = {"public-closed": data(91, 900)}


@contextlib.asynccontextmanager
async def world(cluster: Cluster) -> AsyncIterator[World]:
    """Make tenant A's (and B's own) resources as those users; yields the world."""
    a, b, admin = await _users(cluster)
    gateway = cluster.gateway.info.client_address
    metadata = cluster.metadata.info.client_address
    bucket, kv_bucket, b_bucket = "probe-a-objects", "probe-a-kvbucket", "probe-b-own"
    objects = {
        f"a-secret-{i}": data(i, size) for i, size in enumerate([0, 100, 200 * KIB, MIB + 7])
    }
    async with contextlib.AsyncExitStack() as stack:
        a_objects = await AsyncObjectClient.connect(
            gateway, security=a.security, transports=["tcp"]
        )
        stack.push_async_callback(a_objects.close)
        await a_objects.create_bucket(bucket)
        for key, blob in objects.items():
            await a_objects.put_object(bucket, key, blob)
        upload_key = "a-secret-multipart"
        upload_id = await a_objects.create_multipart_upload(bucket, upload_key)
        part = await a_objects.upload_part(bucket, upload_key, upload_id, 1, data(50, 64 * KIB))
        # A PUT begun and never committed: its upload id stays open on A's session.
        begun = await a_objects._rpc.begin_put(
            obj_pb.BeginPutRequest(bucket=bucket, key="a-secret-open-put", size=3 * KIB)
        )
        async with AsyncObjectClient(gateway, security=b.security) as b_objects:
            await b_objects.create_bucket(b_bucket)
            b_upload_key = "b-own-multipart"
            b_upload_id = await b_objects.create_multipart_upload(b_bucket, b_upload_key)
        # A's S3 KV bucket (objects kept in the KV tier), made over S3 as A.
        kv_objects = {f"a-kvobj-{i}": data(70 + i, 300 + i) for i in range(3)}
        async with aiohttp.ClientSession() as http:
            url = f"{cluster.s3_url}/{kv_bucket}"
            await _s3(http, a, "PUT", url, headers={"x-kvtier-bucket-kind": "kv"})
            for key, blob in kv_objects.items():
                await _s3(http, a, "PUT", f"{url}/{key}", blob)
            public = f"{cluster.s3_url}/{PUBLIC_BUCKET}"
            await _s3(http, a, "PUT", public, headers={"x-amz-acl": "public-read"})
            for key, blob in PUBLIC_OPEN.items():
                await _s3(http, a, "PUT", f"{public}/{key}", blob, {"x-amz-acl": "public-read"})
            for key, blob in PUBLIC_CLOSED.items():
                await _s3(http, a, "PUT", f"{public}/{key}", blob)
        # KV blocks in A's namespace, some pinned; a pending put and a read lease over gRPC.
        namespace = "probe-a-ns"
        blocks = {f"a-block-{i}".encode(): data(100 + i, 4 * KIB + i) for i in range(6)}
        a_kv = await AsyncKVClient.connect(
            namespace=namespace, metadata=metadata, security=a.security, transports=["tcp"]
        )
        stack.push_async_callback(a_kv.close)
        statuses = await a_kv.put_batch(list(blocks), list(blocks.values()))
        assert [str(s) for s in statuses] == ["stored"] * len(blocks)
        pinned = list(blocks)[:3]
        await a_kv.pin(pinned, pin_s=1800)
        put_ids, lease_ids, descriptor, a_principal = await _kv_grants(
            cluster, a, namespace, list(blocks)
        )
        drive_id = cluster.gateway.ctx.map_view.current.pools[0].sets[0].slots[0].drive_id
        info = await _bucket_info(cluster, bucket)
        yield World(
            cluster=cluster,
            a=a,
            b=b,
            admin=admin,
            bucket=bucket,
            storage=names.storage_name(info.name, info.storage_id),
            objects=objects,
            kv_bucket=kv_bucket,
            kv_bucket_objects=kv_objects,
            upload_key=upload_key,
            upload_id=upload_id,
            part_etag=part.etag,
            open_put_id=begun.upload_id,
            namespace=namespace,
            blocks=blocks,
            pinned=pinned,
            kv_put_ids=put_ids,
            kv_lease_ids=lease_ids,
            kv_descriptor=descriptor,
            a_principal=a_principal,
            drive_id=drive_id,
            b_bucket=b_bucket,
            b_upload_key=b_upload_key,
            b_upload_id=b_upload_id,
            a_objects=a_objects,
            a_kv=a_kv,
            public_bucket=PUBLIC_BUCKET,
            public_open=PUBLIC_OPEN,
            public_closed=PUBLIC_CLOSED,
        )


async def _bucket_info(cluster: Cluster, bucket: str) -> metadata_pb2.BucketInfo:
    async with metadata_client.MetadataClient(cluster.metadata.address) as operator:
        return await operator.get_bucket(bucket)


async def _kv_grants(
    cluster: Cluster, a: User, namespace: str, keys: list[bytes]
) -> tuple[list[int], list[int], common_pb2.Descriptor, str]:
    """A put A begins and never commits, and a read lease A holds, over gRPC on A's own
    data-plane session (their ids and A's descriptor are what B tries to use)."""
    address = cluster.kvcache.info.client_address
    ns = kv_pb.Namespace(name=namespace)
    async with (
        dataplane_client.DataPlaneClient(address, security=a.security) as negotiator,
        kvcache_client.KVCacheClient(address, security=a.security) as client,
    ):
        opened = await negotiator.negotiate("probe-a", ["tcp"])
        put = await client.batch_put(
            kv_pb.BatchPutRequest(
                namespace=ns, keys=[b"a-pending-put"], sizes=[2 * KIB], principal=opened.principal
            )
        )
        got = await client.batch_get(
            kv_pb.BatchGetRequest(
                namespace=ns, keys=keys[-1:], principal=opened.principal, lease_s=600
            )
        )
    assert put.items[0].status == kv_pb.ITEM_STATUS_OK, put
    assert got.items[0].status == kv_pb.ITEM_STATUS_OK, got
    item = got.items[0]
    return [put.items[0].put_id], [item.lease_id], item.descriptor, opened.principal
