"""The metadata service down (issue 16), the quick version: what must go on without it.

A dev cluster's only metadata node is SIGKILLed; then, with it down:

- a KV client *started* now (`KVClient.connect(metadata=[metadata, gateway])`) reads the map
  from the gateway and puts and gets byte-exact: as a user (its session token from the
  gateway, the metadata node named first) and with a certificate; a user whose only endpoint
  is the metadata node gets Unavailable naming it;
- a heal of every bucket (`AdminService.Heal`, what `kvtier admin heal` runs) completes, and
  the heal scanner's cycles (every second here) list the buckets from the gateway's watched
  records instead of failing;
- S3 ListBuckets lists the buckets, and a KV bucket first used now works (the gateway's KV
  clients place keys by the gateway's own map).

Before, `metadata` took one metadata address only (a client could not start), and the heal
and the scanner listed buckets through the metadata service (Unavailable until it was back),
as did ListBuckets, and the gateway's KV clients read the map from the metadata service.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kvtier
from kvtier import errors, security
from kvtier.clients import gateway as gateway_client
from tests.integration import s3_cluster
from tests.integration.conftest import (
    cluster_security,
    running_cluster,
    user_security,
)

# Behind `slow`: its dev cluster costs ~30 s of CI, where tests/fault/test_metadata_down.py (short)
# checks the same during its outage (a KV client started through the gateway, a heal of every
# bucket, ListBuckets) and tests/component/test_kv_map_endpoints.py the client's errors.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

BLOCK = 16 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """cluster.json of a dev cluster whose gateway scans for healing every second."""
    state = tmp_path_factory.mktemp("mdo") / "state"
    with running_cluster(state, KVTIER_GATEWAY_SCAN_INTERVAL_S="1") as info:
        yield info


def _block(key: bytes) -> np.ndarray:
    seed = hashlib.sha256(key).digest()
    return np.frombuffer((seed * (BLOCK // len(seed)))[:BLOCK], np.uint8).copy()


async def _put_get(client: kvtier.AsyncKVClient, prefix: bytes) -> None:
    keys = [prefix + b"%d" % i for i in range(8)]
    statuses = await client.put_batch(keys, [_block(k) for k in keys])
    assert statuses == [kvtier.PutStatus.STORED] * len(keys)
    outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
    assert await client.get_batch(keys, outs) == [BLOCK] * len(keys)
    for key, out in zip(keys, outs, strict=True):
        assert out.tobytes() == _block(key).tobytes(), key


def _kv_bucket(s3: Any, name: str) -> None:
    """Create a KV bucket (CreateBucket with x-kvtier-bucket-kind: kv)."""

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket=name)
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)


def _kill_metadata(info: dict[str, Any]) -> None:
    (node,) = [n for n in info["nodes"] if n["role"] == "metadata"]
    os.kill(int(node["pid"]), signal.SIGKILL)


def _log(info: dict[str, Any], name: str) -> str:
    return (Path(info["state"]) / "logs" / f"{name}.log").read_text(errors="replace")


async def test_clients_start_and_heal_completes_while_metadata_is_down(
    cluster: dict[str, Any],
) -> None:
    info = cluster
    s3 = s3_cluster.client(info)
    s3.create_bucket(Bucket="mdo")
    _kv_bucket(s3, "mdo-kv")
    bodies = {f"k{i}": hashlib.sha256(b"%d" % i).digest() * (1000 * (i + 1)) for i in range(3)}
    for key, body in bodies.items():
        s3.put_object(Bucket="mdo", Key=key, Body=body)
    user = user_security(info["state"])  # token_address: the metadata node's client port
    operator = cluster_security(info["state"])

    _kill_metadata(info)
    started = time.monotonic()

    # A user's client, the metadata node named first: map and token from the gateway.
    async with await kvtier.AsyncKVClient.connect(
        namespace="mdo", metadata=[info["metadata_client"], info["gateway_grpc"]],
        security=user, timeout_s=3.0,
    ) as client:  # fmt: skip
        await _put_get(client, b"user-")
    # With a certificate, the endpoints as one comma-separated string (service ports).
    async with await kvtier.AsyncKVClient.connect(
        namespace="mdo", metadata=f"{info['metadata']},{info['gateway_grpc_service']}",
        security=operator, timeout_s=3.0,
    ) as client:  # fmt: skip
        await _put_get(client, b"cert-")
    # Only the metadata node: a clear error naming it.
    alone = security.ClientSecurity(
        ca_file=user.ca_file, access_key=user.access_key, secret_key=user.secret_key
    )
    with pytest.raises(errors.Unavailable) as refused:
        await kvtier.AsyncKVClient.connect(
            namespace="mdo", metadata=info["metadata_client"], security=alone, timeout_s=3.0
        )
    assert info["metadata_client"] in str(refused.value)

    # A heal of every bucket completes and finds the objects healthy.
    async with gateway_client.AdminServiceClient(
        info["gateway_grpc_service"], security=operator
    ) as admin:
        last = None
        async for progress in admin.heal(dry_run=True):
            last = progress
    assert last is not None
    assert last.done
    assert last.healthy >= len(bodies)
    assert last.unrecoverable == 0

    # ListBuckets answers from the watched records.
    assert "mdo" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for key, body in bodies.items():
        assert s3.get_object(Bucket="mdo", Key=key)["Body"].read() == body
    # A KV bucket first used now: the gateway's KV client places keys by its own map.
    s3.put_object(Bucket="mdo-kv", Key="block", Body=bodies["k1"])
    assert s3.get_object(Bucket="mdo-kv", Key="block")["Body"].read() == bodies["k1"]

    # The scanner (every second) went on: it lists from the watched records, never failed.
    deadline = started + 15
    while "bucket lists come from the watched records" not in _log(info, "gateway-1"):
        assert time.monotonic() < deadline, _log(info, "gateway-1")[-3000:]
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # one more cycle
    assert "heal scanner cycle failed" not in _log(info, "gateway-1")
