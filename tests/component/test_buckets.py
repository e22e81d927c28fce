"""Buckets: kept by the metadata service in etcd, served over gRPC, shared by every replica."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from kvtier import buckets, errors, etcdserver, membership, rpc
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness

BAD_NAMES = [
    "",
    "ab",
    "x" * 64,
    "Upper",
    "under_score",
    "-leading",
    "trailing-",
    "a..b",
    "192.168.1.1",
    "a/b",
    "../etc",
    "xn--bucket",
]


@contextlib.asynccontextmanager
async def _metadata(
    etcd: etcdserver.EtcdServer, prefix: str, store: membership.EtcdMembership
) -> AsyncIterator[metadata_client.MetadataClient]:
    """A metadata service in-process, and a client of it."""
    async with (
        harness.run(
            metadata_config.MetadataConfig,
            "metadata",
            metadata_main.build,
            store,
            etcd_endpoints=(etcd.endpoint,),
            etcd_prefix=prefix,
        ) as running,
        metadata_client.MetadataClient(running.address) as client,
    ):
        yield client


async def _stored(store: membership.EtcdMembership, name: str) -> metadata_pb2.BucketInfo | None:
    """The record under `<prefix>/buckets/<name>`, read from etcd directly."""
    key = f"{store.prefix}/buckets/{name}".encode()
    kv = await store.call(lambda client: client.get(key))
    if kv is None:
        return None
    info = metadata_pb2.BucketInfo()
    info.ParseFromString(kv.value)
    assert info.generation == 0  # the generation is etcd's revision, never stored
    info.generation = kv.create_revision
    return info


async def _stored_names(store: membership.EtcdMembership) -> list[bytes]:
    prefix = f"{store.prefix}/buckets/".encode()
    result = await store.call(lambda client: client.get_prefix(prefix))
    return [kv.key for kv in result]


async def test_create_get_list_delete_round_trip(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        assert await client.list_buckets() == []
        before_ms = int(time.time() * 1000)
        alpha = await client.create_bucket("alpha")
        after_ms = int(time.time() * 1000)
        assert alpha.name == "alpha"
        assert alpha.tenant == "default"
        assert before_ms <= alpha.created_at_unix_ms <= after_ms
        assert alpha.generation > 0
        assert await _stored(store, "alpha") == alpha
        assert await client.get_bucket("alpha") == alpha

        gamma = await client.create_bucket("gamma.logs-2", tenant="team-a")
        beta = await client.create_bucket("beta", tenant="team-a")
        assert beta.tenant == "team-a"
        assert beta.generation > gamma.generation > alpha.generation

        assert await client.list_buckets() == [alpha, beta, gamma]  # by name, not by creation
        assert await client.list_buckets(tenant="team-a") == [beta, gamma]
        assert await client.list_buckets(tenant="default") == [alpha]
        assert await client.list_buckets(tenant="nobody") == []

        await client.delete_bucket("alpha")
        assert await _stored(store, "alpha") is None
        with pytest.raises(errors.NotFound):
            await client.get_bucket("alpha")
        assert await client.list_buckets() == [beta, gamma]
        # Deleting with the generation that was read deletes that bucket.
        await client.delete_bucket("beta", expected_generation=beta.generation)
        assert await client.list_buckets() == [gamma]


async def test_duplicate_create_is_already_exists(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        first = await client.create_bucket("shared", tenant="owner")
        for tenant in ("owner", "someone-else", ""):
            with pytest.raises(errors.AlreadyExists):
                await client.create_bucket("shared", tenant=tenant)
        assert await client.get_bucket("shared") == first  # the owner is unchanged


async def test_concurrent_creates_of_one_name_have_one_winner(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        outcomes = await asyncio.gather(
            *(client.create_bucket("contended", tenant=f"t{i}") for i in range(10)),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, metadata_pb2.BucketInfo)]
        lost = [o for o in outcomes if isinstance(o, errors.AlreadyExists)]
        assert (len(won), len(lost)) == (1, 9), outcomes
        assert await client.get_bucket("contended") == won[0]
        assert await _stored(store, "contended") == won[0]


async def test_absent_buckets_are_not_found(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        with pytest.raises(errors.NotFound):
            await client.get_bucket("missing")
        with pytest.raises(errors.NotFound):
            await client.delete_bucket("missing")
        with pytest.raises(errors.NotFound):
            await client.delete_bucket("missing", expected_generation=12345)
        await client.create_bucket("once")
        await client.delete_bucket("once")
        with pytest.raises(errors.NotFound):
            await client.delete_bucket("once")


async def test_delete_with_a_stale_generation_is_refused(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        old = await client.create_bucket("reborn")
        await client.delete_bucket("reborn")
        new = await client.create_bucket("reborn", tenant="next")
        assert new.generation > old.generation
        # A gateway that checked the old incarnation for emptiness must not delete the new one.
        with pytest.raises(errors.PreconditionFailed):
            await client.delete_bucket("reborn", expected_generation=old.generation)
        assert await client.get_bucket("reborn") == new
        await client.delete_bucket("reborn", expected_generation=new.generation)
        assert await _stored(store, "reborn") is None


async def test_invalid_names_and_tenants_are_invalid_argument(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        for name in BAD_NAMES:
            with pytest.raises(errors.InvalidArgument):
                await client.create_bucket(name)
            with pytest.raises(errors.InvalidArgument):
                await client.get_bucket(name)
            with pytest.raises(errors.InvalidArgument):
                await client.delete_bucket(name)
        for tenant in ("has space", "slash/ed", "t" * 65):
            with pytest.raises(errors.InvalidArgument):
                await client.create_bucket("fine-name", tenant=tenant)
            with pytest.raises(errors.InvalidArgument):
                await client.list_buckets(tenant=tenant)
        # The status on the wire, as any gRPC caller sees it.
        async with rpc.open_channel(client.address) as channel:
            stub: Any = metadata_pb2_grpc.MetadataServiceStub(channel)
            for request, named in (
                (metadata_pb2.CreateBucketRequest(name="Bad_Name"), "Bad_Name"),
                (metadata_pb2.CreateBucketRequest(name="good", tenant="bad tenant"), "tenant"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.CreateBucket(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert named in (caught.value.details() or "")
        assert await _stored_names(store) == []  # nothing reached etcd


async def test_buckets_survive_a_metadata_restart(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store) as client:
        kept = [await client.create_bucket(f"kept-{i}", tenant="t") for i in range(3)]
        await client.delete_bucket("kept-1")
        del kept[1]
    async with _metadata(etcd, etcd_prefix, store) as client:
        assert await client.list_buckets() == kept
        assert await client.get_bucket("kept-2") == kept[1]
        with pytest.raises(errors.AlreadyExists):
            await client.create_bucket("kept-0")


async def test_two_replicas_see_the_same_buckets(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with (
        _metadata(etcd, etcd_prefix, store) as a,
        _metadata(etcd, etcd_prefix, store) as b,
    ):
        made = await a.create_bucket("seen-by-both", tenant="t")
        assert await b.get_bucket("seen-by-both") == made
        assert await b.list_buckets() == [made]
        with pytest.raises(errors.AlreadyExists):
            await b.create_bucket("seen-by-both")
        # Concurrent creates through both replicas still have one winner.
        outcomes = await asyncio.gather(
            *(c.create_bucket("raced") for c in (a, b) * 5), return_exceptions=True
        )
        won = [o for o in outcomes if isinstance(o, metadata_pb2.BucketInfo)]
        assert len(won) == 1
        assert sum(isinstance(o, errors.AlreadyExists) for o in outcomes) == 9
        await b.delete_bucket("seen-by-both")
        with pytest.raises(errors.NotFound):
            await a.get_bucket("seen-by-both")
        assert await a.list_buckets() == won


async def test_store_watch_follows_creates_and_deletes(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    """What a gateway's bucket cache does: watch the keys in etcd, no metadata RPC."""
    bucket_store = buckets.BucketStore(store)
    watch = bucket_store.watch()
    try:
        assert await asyncio.wait_for(anext(watch), 10) == {}
        async with _metadata(etcd, etcd_prefix, store) as client:
            made = await client.create_bucket("watched")
            seen = await asyncio.wait_for(anext(watch), 10)
            while "watched" not in seen:
                seen = await asyncio.wait_for(anext(watch), 10)
            assert seen == {"watched": made}
            await client.delete_bucket("watched")
            while seen:
                seen = await asyncio.wait_for(anext(watch), 10)
    finally:
        await watch.aclose()


async def test_configuration_updates_keep_the_incarnation(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    """ACL, CORS and lifecycle are set part by part, concurrently, and never change the bucket's
    generation (a gateway that listed it empty may still delete it)."""
    async with _metadata(etcd, etcd_prefix, store) as client:
        made = await client.create_bucket("configured", tenant="t")
        acl = metadata_pb2.SetBucketConfigRequest(name="configured")
        grant = acl.acl.grants.add()
        grant.grantee_type = acl_pb2.GRANTEE_TYPE_ALL_USERS
        grant.permission = acl_pb2.ACL_PERMISSION_READ
        cors = metadata_pb2.SetBucketConfigRequest(name="configured")
        cors.cors.rules.add(allowed_origins=["*"], allowed_methods=["GET"])
        lifecycle = metadata_pb2.SetBucketConfigRequest(
            name="configured", expected_generation=made.generation
        )
        lifecycle.lifecycle.rules.add(id="old", enabled=True, prefix="tmp/", expiration_days=1)
        await asyncio.gather(*(client.set_bucket_config(r) for r in (acl, cors, lifecycle) * 3))
        got = await client.get_bucket("configured")
        assert got.generation == made.generation
        assert (got.name, got.tenant, got.storage_id) == (made.name, made.tenant, made.storage_id)
        assert got.acl == acl.acl
        assert got.cors == cors.cors
        assert got.lifecycle == lifecycle.lifecycle
        # An empty part removes it; the rest stays.
        await client.set_bucket_config(
            metadata_pb2.SetBucketConfigRequest(
                name="configured", cors=metadata_pb2.CorsConfiguration()
            )
        )
        got = await client.get_bucket("configured")
        assert not got.cors.rules
        assert got.lifecycle == lifecycle.lifecycle
        with pytest.raises(errors.InvalidArgument):
            await client.set_bucket_config(metadata_pb2.SetBucketConfigRequest(name="configured"))
        with pytest.raises(errors.NotFound):
            await client.set_bucket_config(
                metadata_pb2.SetBucketConfigRequest(name="missing", acl=acl.acl)
            )
        await client.delete_bucket("configured", expected_generation=made.generation)
        reborn = await client.create_bucket("configured", tenant="t")
        assert not reborn.HasField("acl")  # a new incarnation starts with S3's defaults
        with pytest.raises(errors.PreconditionFailed):
            await client.set_bucket_config(lifecycle)  # the old incarnation's generation
