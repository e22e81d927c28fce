"""Buckets, objects and uploads belong to tenants, end to end (issue 13): the gateway's gRPC
object API and data-plane calls refuse tenant B everything of tenant A's, and a bucket deleted
and created again never shows the earlier incarnation's objects. Callers are bound in-process
(`tenants.acting`), as the gRPC interceptor binds them per call; every read compares bytes."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from kvtier import buckets, errors, etcdserver, membership, names, objects
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base
from services.gateway import servicer
from tests import pki as test_pki
from tests.component import objects_cluster
from tests.component.tenants import ALICE, BOB, NO_CONTEXT, acting, get, put, session, sha

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, max_staged_writes_per_tenant=3
    ) as c:
        yield c


SIZES = [0, 100, 200 * KIB, 3 * MIB + 5]
BLOBS = {f"k{i}": objects_cluster.data(i, size) for i, size in enumerate(SIZES)}


async def test_a_bucket_deleted_and_created_again_shows_nothing_of_the_earlier_one(
    cluster: Cluster, store: membership.EtcdMembership
) -> None:
    front = cluster.front
    with acting(ALICE):
        await front.create_bucket("victim")
        for key, data in BLOBS.items():
            await put(front, "victim", key, data)
        upload = await front.create_multipart(
            pb.CreateMultipartUploadRequest(bucket="victim", key="mp")
        )
    earlier = cluster.stored("victim")
    assert earlier.startswith("victim@")
    # An attacker holding DeleteBucket deletes it at the metadata service: no emptiness check.
    await buckets.BucketStore(store).delete("victim")
    svc = servicer.ObjectServicer(front)
    with acting(BOB):
        await front.create_bucket("victim")
        listed = await svc.ListObjects(pb.ListObjectsRequest(bucket="victim"), NO_CONTEXT)
        assert list(listed.objects) == []
        for key in BLOBS:
            with pytest.raises(errors.NotFound):
                await svc.HeadObject(pb.HeadObjectRequest(bucket="victim", key=key), NO_CONTEXT)
            with pytest.raises(errors.NotFound):
                await get(front, "victim", key)
        uploads = await front.list_uploads(pb.ListMultipartUploadsRequest(bucket="victim"))
        assert list(uploads.uploads) == []
        with pytest.raises(errors.NotFound):
            await front.list_parts(
                pb.ListPartsRequest(bucket="victim", key="mp", upload_id=upload.upload_id)
            )
        # Bob's own object at one of Alice's keys: Bob reads Bob's bytes.
        mine = objects_cluster.data(99, 300 * KIB)
        info = await put(front, "victim", "k2", mine)
        assert (info.bucket, info.etag) == ("victim", hashlib.md5(mine).hexdigest())
        assert sha(await get(front, "victim", "k2")) == sha(mine)
        listed = await svc.ListObjects(pb.ListObjectsRequest(bucket="victim"), NO_CONTEXT)
        assert [(o.bucket, o.key, o.etag) for o in listed.objects] == [("victim", "k2", info.etag)]
    # Alice's objects are unreachable garbage of the deleted incarnation, untouched.
    assert cluster.front.engine is front.engine
    for key, data in BLOBS.items():
        found = await front.engine.resolve(earlier, key)
        assert found.meta.etag == hashlib.md5(data).hexdigest()


async def test_tenant_b_gets_nothing_of_tenant_as_buckets_objects_and_uploads(
    cluster: Cluster,
) -> None:
    front = cluster.front
    svc = servicer.ObjectServicer(front)
    data = objects_cluster.data(7, 2 * MIB + 3)
    with acting(ALICE):
        await svc.CreateBucket(pb.CreateBucketRequest(bucket="alice-data"), NO_CONTEXT)
        await put(front, "alice-data", "secret", data)
        begun = await svc.BeginPut(
            pb.BeginPutRequest(bucket="alice-data", key="pending", size=10), NO_CONTEXT
        )
        multi = await svc.CreateMultipartUpload(
            pb.CreateMultipartUploadRequest(bucket="alice-data", key="big"), NO_CONTEXT
        )
    with acting(BOB):
        await svc.CreateBucket(pb.CreateBucketRequest(bucket="bob-data"), NO_CONTEXT)
        listed = await svc.ListBuckets(pb.ListBucketsRequest(), NO_CONTEXT)
        assert [b.name for b in listed.buckets] == ["bob-data"]
        refused: list[Awaitable[Any]] = [
            svc.HeadBucket(pb.HeadBucketRequest(bucket="alice-data"), NO_CONTEXT),
            svc.DeleteBucket(pb.DeleteBucketRequest(bucket="alice-data"), NO_CONTEXT),
            svc.ListObjects(pb.ListObjectsRequest(bucket="alice-data"), NO_CONTEXT),
            svc.HeadObject(pb.HeadObjectRequest(bucket="alice-data", key="secret"), NO_CONTEXT),
            svc.DeleteObject(pb.DeleteObjectRequest(bucket="alice-data", key="secret"), NO_CONTEXT),
            svc.BeginPut(pb.BeginPutRequest(bucket="alice-data", key="secret", size=1), NO_CONTEXT),
            svc.CopyObject(
                pb.CopyObjectRequest(
                    src_bucket="alice-data",
                    src_key="secret",
                    dst_bucket="bob-data",
                    dst_key="stolen",
                ),
                NO_CONTEXT,
            ),
            svc.CopyObject(
                pb.CopyObjectRequest(
                    src_bucket="bob-data",
                    src_key="victim",
                    dst_bucket="alice-data",
                    dst_key="secret",
                ),
                NO_CONTEXT,
            ),
            svc.CommitPut(pb.CommitPutRequest(upload_id=begun.upload_id), NO_CONTEXT),
            svc.AbortPut(pb.AbortPutRequest(upload_id=begun.upload_id), NO_CONTEXT),
            svc.CreateMultipartUpload(
                pb.CreateMultipartUploadRequest(bucket="alice-data", key="k"), NO_CONTEXT
            ),
            svc.ListMultipartUploads(
                pb.ListMultipartUploadsRequest(bucket="alice-data"), NO_CONTEXT
            ),
            svc.BeginUploadPart(
                pb.BeginUploadPartRequest(
                    bucket="alice-data",
                    key="big",
                    upload_id=multi.upload_id,
                    part_number=1,
                    size=1,
                ),
                NO_CONTEXT,
            ),
            svc.UploadPartCopy(
                pb.UploadPartCopyRequest(
                    bucket="bob-data",
                    key="k",
                    upload_id=multi.upload_id,
                    part_number=1,
                    src_bucket="alice-data",
                    src_key="secret",
                ),
                NO_CONTEXT,
            ),
            svc.ListParts(
                pb.ListPartsRequest(bucket="alice-data", key="big", upload_id=multi.upload_id),
                NO_CONTEXT,
            ),
            svc.CompleteMultipartUpload(
                pb.CompleteMultipartUploadRequest(
                    bucket="alice-data", key="big", upload_id=multi.upload_id
                ),
                NO_CONTEXT,
            ),
            svc.AbortMultipartUpload(
                pb.AbortMultipartUploadRequest(
                    bucket="alice-data", key="big", upload_id=multi.upload_id
                ),
                NO_CONTEXT,
            ),
        ]
        for call in refused:
            with pytest.raises(errors.PermissionDenied, check=lambda e: e.reason == "AccessDenied"):
                await call
        # Alice's upload id named under Bob's own bucket: there is no such upload there.
        with pytest.raises(errors.NotFound, check=lambda e: e.reason == "NoSuchUpload"):
            await svc.AbortMultipartUpload(
                pb.AbortMultipartUploadRequest(
                    bucket="bob-data", key="big", upload_id=multi.upload_id
                ),
                NO_CONTEXT,
            )
        # Storage names and internal buckets are not bucket names anyone can use.
        for bucket in (cluster.stored("alice-data"), names.MULTIPART_BUCKET):
            with pytest.raises(errors.InvalidArgument):
                await svc.ListObjects(pb.ListObjectsRequest(bucket=bucket), NO_CONTEXT)

    # The data plane: Bob's session may neither write stripes into Alice's upload nor read.
    write = pb.WriteStripesRequest(upload_id=begun.upload_id).SerializeToString()
    with pytest.raises(errors.PermissionDenied):
        front.handle_call(session(BOB), pb.OBJECT_CALL_METHOD_WRITE_STRIPES, write, [10], [])
    read = pb.ReadRangeRequest(bucket="alice-data", key="secret").SerializeToString()
    with pytest.raises(errors.PermissionDenied):
        await front.handle_call(session(BOB), pb.OBJECT_CALL_METHOD_READ_RANGE, read, [], [MIB])
    plan = await front.handle_call(
        session(ALICE), pb.OBJECT_CALL_METHOD_READ_RANGE, read, [], [MIB]
    )
    _release(plan)
    writing = front.handle_call(
        session(ALICE), pb.OBJECT_CALL_METHOD_WRITE_STRIPES, write, [10], []
    )
    assert inspect.iscoroutine(writing)  # allowed; not run further
    writing.close()

    # Everything of Alice's is as she left it.
    with acting(ALICE):
        assert sha(await get(front, "alice-data", "secret")) == sha(data)
        listed_a = await svc.ListObjects(pb.ListObjectsRequest(bucket="alice-data"), NO_CONTEXT)
        assert [o.key for o in listed_a.objects] == ["secret"]
        parts = await svc.ListParts(
            pb.ListPartsRequest(bucket="alice-data", key="big", upload_id=multi.upload_id),
            NO_CONTEXT,
        )
        assert list(parts.parts) == []
        await svc.AbortPut(pb.AbortPutRequest(upload_id=begun.upload_id), NO_CONTEXT)
        await svc.AbortMultipartUpload(
            pb.AbortMultipartUploadRequest(
                bucket="alice-data", key="big", upload_id=multi.upload_id
            ),
            NO_CONTEXT,
        )


async def test_a_kvcache_certificate_reaches_the_durable_bucket_only(cluster: Cluster) -> None:
    """Regression: a kvcache node's certificate (ObjectService admits kvcache nodes for the
    durable KV bucket) listed every tenant's buckets and read, overwrote and deleted any
    tenant's objects over gRPC and the gateway's data plane, and could open a data-plane session
    acting for a tenant. Real requests to the gateway's mutual-TLS port and data plane."""
    data = objects_cluster.data(11, 300 * KIB)
    with acting(ALICE):
        await cluster.front.create_bucket("alice-kv-victim")
        await put(cluster.front, "alice-kv-victim", "secret", data)
    node = test_pki.session().client("kvcache")
    address = cluster.gateway.address
    async with await objects.AsyncObjectClient.connect(address, security=node, timeout_s=5) as kv:
        # What it is for: the durable KV bucket (its own session acts for no tenant).
        await kv.put_object(names.KV_DURABLE_BUCKET, "t/6e73/6b", b"spilled block")
        assert await kv.get_object(names.KV_DURABLE_BUCKET, "t/6e73/6b") == b"spilled block"
        assert [b.name for b in await kv.list_buckets()] == []
        refused: list[Awaitable[Any]] = [
            kv.get_object_into("alice-kv-victim", "secret", bytearray(len(data))),  # data plane
            kv.head_object("alice-kv-victim", "secret"),
            kv.head_bucket("alice-kv-victim"),
            kv.list_objects("alice-kv-victim"),
            kv.put_object("alice-kv-victim", "secret", b"forged"),
            kv.delete_object("alice-kv-victim", "secret"),
            kv.create_bucket("kv-made-bucket"),
        ]
        for call in refused:
            with pytest.raises(errors.PermissionDenied):
                await call
    async with dataplane_client.DataPlaneClient(address, security=node) as negotiator:
        with pytest.raises(errors.PermissionDenied):  # no session acting for a tenant either
            await negotiator.negotiate("c", tenant=ALICE.tenant)
    with acting(ALICE):
        assert sha(await get(cluster.front, "alice-kv-victim", "secret")) == sha(data)


def _release(plan: base.CallPlan) -> None:
    if plan.on_done is not None:
        plan.on_done(True)


async def test_a_tenant_has_a_bounded_number_of_writes_in_flight(cluster: Cluster) -> None:
    front = cluster.front
    with acting(ALICE):
        await front.create_bucket("bounded")
        begun = [
            await front.begin_put(pb.BeginPutRequest(bucket="bounded", key=f"k{i}", size=5))
            for i in range(3)
        ]
        with pytest.raises(errors.Overloaded):
            await front.begin_put(pb.BeginPutRequest(bucket="bounded", key="more", size=5))
        upload = await front.create_multipart(
            pb.CreateMultipartUploadRequest(bucket="bounded", key="mp")
        )
        with pytest.raises(errors.Overloaded):  # parts count too
            await front.begin_part(
                pb.BeginUploadPartRequest(
                    bucket="bounded", key="mp", upload_id=upload.upload_id, part_number=1,
                    size=5,
                )
            )  # fmt: skip
        await front.abort_put(pb.AbortPutRequest(upload_id=begun[0].upload_id))
        assert sha(await _put_again(cluster)) == sha(b"hello")
    with acting(BOB):  # another tenant is not held up
        await front.create_bucket("bob-bounded")
        await put(front, "bob-bounded", "k", b"bob")
    for b in begun[1:]:
        await front.engine.abort_put(pb.AbortPutRequest(upload_id=b.upload_id))
    assert front.engine.staged_writes(ALICE.tenant) == 0


async def _put_again(cluster: Cluster) -> bytes:
    await put(cluster.front, "bounded", "again", b"hello")
    return await get(cluster.front, "bounded", "again")
