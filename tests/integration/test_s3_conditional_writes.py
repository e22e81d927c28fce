"""Conditional writes against concurrent writers (issue 14): If-None-Match: * and If-Match on
PutObject of an erasure-coded bucket hold atomically, each drive checking the condition under
the key's lock (services/gateway/conditional.py). Before, the gateway checked and then wrote, and
8 of 8 concurrent If-None-Match: * PUTs of one key succeeded, each overwriting the one before.
Now at most one of the racing writers succeeds, every other one gets 412 PreconditionFailed (or
409 ConditionalRequestConflict when racing writes split the drives and none stands), and the
object is the winner's bytes (or what it was, when none won)."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

KIB, MIB = 1024, 1024 * 1024
WRITERS = 8
ROUNDS = 3
REFUSED = {("PreconditionFailed", 412), ("ConditionalRequestConflict", 409)}


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: dict[str, Any]) -> Any:  # noqa: F811
    user = s3_cluster.add_user(s3_cluster_fixture, "cond-race")
    client = s3_cluster.client(s3_cluster_fixture, *user, max_pool_connections=2 * WRITERS)
    client.create_bucket(Bucket="cond-race")
    return client


def _body(writer: int, size: int) -> bytes:
    return np.random.default_rng(writer).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def kv_bucket(s3: Any) -> str:
    """A KV bucket (CreateBucket with x-kvtier-bucket-kind: kv) of the module's user."""

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket="cond-race-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    return "cond-race-kv"


def _race(
    s3: Any, key: str, size: int, bucket: str = "cond-race", **condition: str
) -> tuple[list[int], list[Any]]:
    """WRITERS concurrent PUTs of key (writer i's own bytes) with condition: the writers that
    succeeded, and every refusal's (code, status)."""

    def put(writer: int) -> tuple[int, Any]:
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=_body(writer, size), **condition)
        except ClientError as exc:
            error = exc.response
            return writer, (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"])
        return writer, None

    with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        results = list(pool.map(put, range(WRITERS)))
    return [w for w, refusal in results if refusal is None], [r for _, r in results if r]


@pytest.mark.parametrize("size", [4 * KIB, MIB + 3], ids=["small", "staged"])
def test_racing_if_none_match_writers_store_one(s3: Any, size: int) -> None:
    won = 0
    for round_ in range(ROUNDS):
        key = f"absent-{size}-{round_}"
        winners, refusals = _race(s3, key, size, IfNoneMatch="*")
        assert len(winners) <= 1, f"{len(winners)} If-None-Match: * writers all succeeded"
        assert set(refusals) <= REFUSED
        assert len(refusals) == WRITERS - len(winners)
        if winners:
            won += 1
            got = s3.get_object(Bucket="cond-race", Key=key)["Body"].read()
            assert got == _body(winners[0], size)
        else:  # racing writes split the drives: none stands
            with pytest.raises(ClientError) as absent:
                s3.head_object(Bucket="cond-race", Key=key)
            assert absent.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert won, "no round had a winner"
    # Afterwards the key is taken for every conditional writer, sequentially too.
    with pytest.raises(ClientError) as taken:
        s3.put_object(Bucket="cond-race", Key=f"absent-{size}-0", Body=b"x", IfNoneMatch="*")
    assert taken.value.response["Error"]["Code"] == "PreconditionFailed"


@pytest.mark.parametrize("size", [4 * KIB, MIB + 3], ids=["small", "staged"])
def test_racing_if_match_writers_replace_once(s3: Any, size: int) -> None:
    won = 0
    for round_ in range(ROUNDS):
        key = f"matched-{size}-{round_}"
        base = b"base version"
        etag = s3.put_object(Bucket="cond-race", Key=key, Body=base)["ETag"]
        winners, refusals = _race(s3, key, size, IfMatch=etag)
        assert len(winners) <= 1, f"{len(winners)} writers replaced version {etag}"
        assert set(refusals) <= REFUSED
        assert len(refusals) == WRITERS - len(winners)
        got = s3.get_object(Bucket="cond-race", Key=key)["Body"].read()
        assert got == (_body(winners[0], size) if winners else base)
        won += bool(winners)
    assert won, "no round had a winner"


@pytest.mark.parametrize("size", [4 * KIB, MIB + 3], ids=["small", "large"])
def test_racing_if_match_writers_replace_a_kv_object_once(
    s3: Any, kv_bucket: str, size: int
) -> None:
    """KV buckets: the metadata block is swapped on its kvcache node only while it is the one
    whose ETag matched (compare-and-swap), before the data block is committed; before, the
    writers that matched overwrote the object one after another."""
    key, base = f"kv-matched-{size}", b"base version"
    etag = s3.put_object(Bucket=kv_bucket, Key=key, Body=base)["ETag"]
    winners, refusals = _race(s3, key, size, kv_bucket, IfMatch=etag)
    assert len(winners) <= 1, f"{len(winners)} writers replaced version {etag}"
    assert set(refusals) <= REFUSED
    assert len(refusals) == WRITERS - len(winners)
    got = s3.get_object(Bucket=kv_bucket, Key=key)["Body"].read()
    assert got == (_body(winners[0], size) if winners else base)


def test_racing_if_match_completes_replace_a_kv_object_once(s3: Any, kv_bucket: str) -> None:
    """CompleteMultipartUpload with If-Match on a KV bucket: one of WRITERS uploads at most
    becomes the object; the others keep their parts (412 or 409)."""
    key, base = "kv-completed", b"base version"
    etag = s3.put_object(Bucket=kv_bucket, Key=key, Body=base)["ETag"]
    uploads = []
    for writer in range(WRITERS):
        upload_id = s3.create_multipart_upload(Bucket=kv_bucket, Key=key)["UploadId"]
        part = s3.upload_part(
            Bucket=kv_bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=_body(writer, KIB)
        )
        uploads.append((upload_id, part["ETag"]))

    def complete(writer: int) -> Any:
        upload_id, part_etag = uploads[writer]
        try:
            s3.complete_multipart_upload(
                Bucket=kv_bucket, Key=key, UploadId=upload_id, IfMatch=etag,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part_etag}]},
            )  # fmt: skip
        except ClientError as exc:
            error = exc.response
            return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]
        return None

    with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        outcomes = list(pool.map(complete, range(WRITERS)))
    winners = [w for w, refusal in enumerate(outcomes) if refusal is None]
    assert len(winners) <= 1, f"{len(winners)} uploads replaced version {etag}"
    assert {r for r in outcomes if r is not None} <= REFUSED
    got = s3.get_object(Bucket=kv_bucket, Key=key)["Body"].read()
    assert got == (_body(winners[0], KIB) if winners else base)
