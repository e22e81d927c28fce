"""The lifecycle expirer over the in-process object tier (metadata, 6 datanodes x 2 drives,
gateway), with the test's clock: objects expire exactly when their rules say (days rounded up
to midnight UTC), others stay byte for byte, stale multipart uploads are aborted. The
gateway's own expirer is off (lifecycle_interval_s=0); the test runs one over the gateway's
real object front."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects, principal
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import lifecycle
from tests.component import objects_cluster

Cluster = objects_cluster.Cluster


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, lifecycle_interval_s=0.0
    ) as c:
        yield c


def _rule(**fields: object) -> metadata_pb2.LifecycleRule:
    return metadata_pb2.LifecycleRule(enabled=True, **fields)  # type: ignore[arg-type]


async def _set_rules(cluster: Cluster, bucket: str, *rules: metadata_pb2.LifecycleRule) -> None:
    bound = principal.bind(principal.INSECURE)
    try:
        await cluster.front.set_bucket_config(
            bucket,
            metadata_pb2.SetBucketConfigRequest(
                lifecycle=metadata_pb2.LifecycleConfiguration(rules=rules)
            ),
        )
    finally:
        principal.unbind(bound)


async def _keys(client: objects.AsyncObjectClient, bucket: str) -> set[str]:
    return {o if isinstance(o, str) else o.key async for o in client.iter_objects(bucket)}


async def test_expirer_deletes_what_rules_expire_at_the_injected_time(cluster: Cluster) -> None:
    bodies = {
        "logs/small": objects_cluster.data(1, 100),
        "logs/large": objects_cluster.data(2, 5000),
        "keep/c": objects_cluster.data(3, 300),
        "dated/d": objects_cluster.data(4, 10),
        "off/e": objects_cluster.data(5, 10),
        "tagged/t": objects_cluster.data(6, 10),
    }
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("lc-rules")
        await client.create_bucket("lc-norules")
        infos = {}
        for key, body in bodies.items():
            headers = pb.ObjectHeaders(tags={"class": "tmp"}) if key == "tagged/t" else None
            infos[key] = await client.put_object("lc-rules", key, body, headers=headers)
        await client.put_object("lc-norules", "logs/small", bodies["logs/small"])
        upload = await client.create_multipart_upload("lc-rules", "up/big")
        young = await client.create_multipart_upload("lc-rules", "other/big")
        await _set_rules(
            cluster, "lc-rules",
            _rule(id="logs", prefix="logs/", object_size_less_than=1000, expiration_days=3),
            _rule(id="dated", prefix="dated/", expiration_date_unix_s=86400),  # 1970-01-02
            metadata_pb2.LifecycleRule(id="off", enabled=False, prefix="off/", expiration_days=1),
            _rule(id="tags", prefix="tagged/", tags={"class": "tmp"}, expiration_days=1),
            _rule(id="uploads", prefix="up/", abort_incomplete_multipart_days=2),
        )  # fmt: skip
        tags_stored = bool((await client.head_object("lc-rules", "tagged/t")).headers.tags)

        now = time.time()
        clock = [now]
        expirer = lifecycle.Expirer(cluster.front, clock=lambda: clock[0])
        stats = await expirer.run_pass()
        assert (stats.buckets, stats.expired, stats.aborted, stats.failures) == (1, 1, 0, 0)
        assert "dated/d" not in await _keys(client, "lc-rules")  # its Date is long past

        mtime_s = infos["logs/small"].mtime_unix_ms / 1000
        due = lifecycle.after_days(mtime_s, 3)
        assert due - mtime_s > 3 * 86400 - 1  # rounded up, never down
        clock[0] = due - 1  # a second before the midnight it is due at
        await expirer.run_pass()
        assert "logs/small" in await _keys(client, "lc-rules")

        clock[0] = due + 86400  # past every Days rule (the upload's 2 days too)
        stats = await expirer.run_pass()
        left = await _keys(client, "lc-rules")
        expired = {"logs/small", "dated/d"} | ({"tagged/t"} if tags_stored else set())
        assert left == set(bodies) - expired
        for key in left:  # the kept objects are intact
            data = await client.get_object("lc-rules", key)
            assert hashlib.sha256(data).digest() == hashlib.sha256(bodies[key]).digest(), key
        uploads = {u.upload_id for u in await client.list_multipart_uploads("lc-rules")}
        assert uploads == {young}
        assert upload not in uploads
        # A bucket without rules is left alone.
        assert await _keys(client, "lc-norules") == {"logs/small"}
        assert await client.get_object("lc-norules", "logs/small") == bodies["logs/small"]

        # A second pass finds nothing more to do (deletes and aborts are idempotent).
        stats = await expirer.run_pass()
        assert (stats.expired, stats.aborted, stats.failures) == (0, 0, 0)
        with pytest.raises(errors.NotFound):
            await client.head_object("lc-rules", "logs/small")
