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


def _race(s3: Any, key: str, size: int, **condition: str) -> tuple[list[int], list[Any]]:
    """WRITERS concurrent PUTs of key (writer i's own bytes) with condition: the writers that
    succeeded, and every refusal's (code, status)."""

    def put(writer: int) -> tuple[int, Any]:
        try:
            s3.put_object(Bucket="cond-race", Key=key, Body=_body(writer, size), **condition)
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
