"""The S3 front binds its authenticated user as the request's `kvtier.principal`, so the object
front's checks hold for S3 as for gRPC: another tenant's bucket is AccessDenied for every
operation, the KV tier's internal bucket is nobody's, and a bucket deleted at the metadata
service and created again by someone else shows none of the earlier objects.

The S3 server runs in-process over the component cluster's gateway front, with an
authenticator that takes the user from a test header (SigV4 itself is tested elsewhere)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import test_utils, web

from kvtier import buckets, etcdserver, membership, names
from services.gateway.s3 import auth, body
from services.gateway.s3 import server as s3_server
from tests.component import objects_cluster

KIB = objects_cluster.KIB
USERS = {
    "alice": auth.Principal("AKALICE", "team-a", "alice"),
    "bob": auth.Principal("AKBOB", "team-b", "bob"),
    "root": auth.Principal("AKROOT", "ops", "root", is_admin=True),
}


class _HeaderAuth(auth.Authenticator):
    """The user named by x-test-user (the signature is not what these tests are about)."""

    def __init__(self) -> None:
        super().__init__(self._none)

    @staticmethod
    async def _none(access_key: str) -> tuple[auth.Principal, str] | None:
        return None

    async def authenticate(self, http: web.Request) -> tuple[auth.Principal, body.Payload]:
        size = http.content_length if http.content_length is not None else -1
        return USERS[http.headers["x-test-user"]], body.Payload(http.content, size=size)


@pytest.fixture
async def s3(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[tuple[objects_cluster.Cluster, aiohttp.ClientSession, str]]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as cluster:
        server = s3_server.S3Server(cluster.front, _HeaderAuth())
        test_server = test_utils.TestServer(server.app())
        await test_server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                yield cluster, session, str(test_server.make_url("/")).rstrip("/")
        finally:
            await server.close()
            await test_server.close()


async def _call(
    session: aiohttp.ClientSession,
    url: str,
    user: str,
    method: str,
    path: str,
    data: bytes = b"",
    **headers: str,
) -> tuple[int, bytes]:
    sent = {"x-test-user": user, **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with session.request(method, url + path, data=data, headers=sent) as response:
        return response.status, await response.read()


async def test_s3_users_reach_only_their_tenants_buckets_and_never_the_kv_tiers(
    s3: tuple[objects_cluster.Cluster, aiohttp.ClientSession, str],
    store: membership.EtcdMembership,
) -> None:
    _cluster, session, url = s3
    data = objects_cluster.data(3, 300 * KIB)
    assert (await _call(session, url, "alice", "PUT", "/alice-bkt"))[0] == 200
    assert (await _call(session, url, "alice", "PUT", "/alice-bkt/k", data))[0] == 200
    assert (await _call(session, url, "bob", "PUT", "/bob-bkt"))[0] == 200
    refused = [
        ("GET", "/alice-bkt/k", {}),
        ("HEAD", "/alice-bkt/k", {}),
        ("PUT", "/alice-bkt/k", {}),
        ("DELETE", "/alice-bkt/k", {}),
        ("GET", "/alice-bkt", {}),
        ("HEAD", "/alice-bkt", {}),
        ("DELETE", "/alice-bkt", {}),
        ("GET", "/alice-bkt?uploads", {}),
        ("POST", "/alice-bkt/mp?uploads", {}),
        ("PUT", "/bob-bkt/copy", {"x_amz_copy_source": "alice-bkt/k"}),
    ]
    for method, path, headers in refused:
        status, text = await _call(session, url, "bob", method, path, b"x", **headers)
        assert status == 403, (method, path, status, text)
        assert method == "HEAD" or b"<Code>AccessDenied</Code>" in text, (method, path, text)
    status, text = await _call(session, url, "bob", "GET", "/")
    assert b"<Name>bob-bkt</Name>" in text
    assert b"alice-bkt" not in text
    # The admin uses every tenant's buckets, and reads Alice's bytes.
    status, got = await _call(session, url, "root", "GET", "/alice-bkt/k")
    assert (status, hashlib.sha256(got).digest()) == (200, hashlib.sha256(data).digest())
    # The KV tier's internal bucket is nobody's, admins included.
    durable = "/" + names.KV_DURABLE_BUCKET
    for user in ("alice", "root"):
        status, text = await _call(session, url, user, "PUT", durable)
        assert (status, b"InvalidBucketName" in text) == (400, True), text
        for method, path in (("GET", durable), ("GET", f"{durable}/k"), ("PUT", f"{durable}/k")):
            status, text = await _call(session, url, user, method, path, b"forged")
            assert (status, b"<Code>AccessDenied</Code>" in text) == (403, True), (path, text)
        status, text = await _call(session, url, user, "GET", "/")
        assert names.KV_DURABLE_BUCKET.encode() not in text

    # Deleted at the metadata service with the object in it, created again by Bob: empty.
    await buckets.BucketStore(store).delete("alice-bkt")
    assert (await _call(session, url, "bob", "PUT", "/alice-bkt"))[0] == 200
    status, text = await _call(session, url, "bob", "GET", "/alice-bkt/k")
    assert (status, b"<Code>NoSuchKey</Code>" in text) == (404, True)
    status, text = await _call(session, url, "bob", "GET", "/alice-bkt?list-type=2")
    assert status == 200
    assert b"<Key>" not in text
    assert (await _call(session, url, "alice", "GET", "/alice-bkt/k"))[0] == 403
