"""Dynamo KVBM's G4 object tier and NIXL OBJ on a kvtier KV bucket, no plugin: issue 7's
acceptance. NIXL's OBJ backend (what KVBM's G4 tier drives), unmodified and CPU-only, with the
parameters KVBM's config gives it for an S3-compatible endpoint (`NixlS3Config::with_endpoint`
plus credentials: bucket, endpoint_override, scheme, region, path style, access and secret key)
against a KV bucket of a dev cluster (`kvtier up`, one kvcache node with a 1 GiB arena):

- over HTTPS, trusting the cluster's CA through the backend's `ca_bundle` parameter (NIXL's
  AWS SDK reads neither AWS_CA_BUNDLE nor SSL_CERT_FILE nor CURL_CA_BUNDLE);
- WRITE, a ranged READ byte-exact, existence queries (HEAD) for present and absent objects;
- writing past the arena evicts blocks: `kvtier.KVClient.stats()` and `kvtier status` count
  capacity evictions, and NIXL's queries see the evicted objects gone;
- a namespace TTL (`SetNamespaceTTL` on the bucket's namespace, `s3:<bucket>@<storage id>`)
  makes an object disappear: NIXL's query reports it absent, and the nodes count a TTL eviction.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier import names
from kvtier.clients import kvcache as kvcache_client
from kvtier.clients import metadata as metadata_client
from tests.integration import s3_cluster
from tests.integration.conftest import cluster_security, kvtier_cmd, user_security
from tests.integration.s3_cluster import own_s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).with_name("nixl_kv_client.py")
MIB = 1024 * 1024
#: 8 MiB blocks written past the shared S3 cluster's 1 GiB kvcache arena (1120 MiB).
FILL_BLOCKS = 140
ADMIN_TENANT = "default"  # the dev cluster's admin user: buckets it makes are this tenant's


def dynamo_obj_params(info: dict[str, Any], bucket: str) -> dict[str, str]:
    """The OBJ backend parameters Dynamo KVBM's G4 tier passes NIXL for an S3-compatible
    endpoint (`NixlS3Config::to_nixl_params`): what docs/integrations.md tells users to set,
    with `scheme=https` and the cluster's CA as `ca_bundle`."""
    params = s3_cluster.nixl_params(info, bucket)
    assert (params["scheme"], params["ca_bundle"]) == ("https", info["ca_file"])
    return params


def nixl(params: dict[str, str], plan: list[dict[str, Any]]) -> list[Any]:
    """Run a plan through NIXL's OBJ backend in a process of its own."""
    run = subprocess.run(
        [sys.executable, str(CLIENT), json.dumps(params)],
        input=json.dumps(plan), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result: list[Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def kv_bucket(info: dict[str, Any], bucket: str) -> None:
    s3 = s3_cluster.client(info)

    def kind_header(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kind_header)
    s3.create_bucket(Bucket=bucket)


def namespace_stats(info: dict[str, Any], bucket: str) -> dict[str, Any]:
    """The bucket's tenant's counters on every kvcache node, through the SDK."""
    with kvtier.KVClient.connect(
        metadata=info["metadata_client"], namespace=bucket_namespace(info, bucket),
        tenant=ADMIN_TENANT,
        security=user_security(info["state"]),
    ) as client:  # fmt: skip
        stats = client.stats()
    evictions: dict[str, int] = {}
    for reply in stats.values():
        for cause, count in reply.evictions.items():
            evictions[cause] = evictions.get(cause, 0) + count
    return {"evictions": evictions, "fill": max(r.fill for r in stats.values())}


def bucket_namespace(info: dict[str, Any], bucket: str) -> str:
    """The KV namespace of a KV bucket: `s3:<bucket>@<storage id>` (this incarnation)."""

    async def get() -> str:
        operator = cluster_security(info["state"])
        async with metadata_client.MetadataClient(info["metadata"], security=operator) as meta:
            found = await meta.get_bucket(bucket)
        return f"s3:{names.storage_name(bucket, found.storage_id)}"

    return asyncio.run(get())


def set_namespace_ttl(info: dict[str, Any], bucket: str, ttl_s: float) -> None:
    """SetNamespaceTTL on every kvcache node (operators' gRPC; 0 removes it)."""
    operator = cluster_security(info["state"])
    namespace = bucket_namespace(info, bucket)

    async def apply() -> None:
        for node in info["nodes"]:
            if node["role"] == "kvcache":
                async with kvcache_client.KVCacheClient(
                    node["grpc_address"], security=operator
                ) as client:
                    await client.set_namespace_ttl(ADMIN_TENANT, namespace, ttl_s)

    asyncio.run(apply())


@pytest.fixture(autouse=True)
def _nixl_installed() -> None:
    try:
        import nixl_cu12  # noqa: F401
    except ImportError:
        pytest.fail("nixl-cu12 is not installed: scripts/bootstrap.sh test installs it")


@pytest.mark.timeout(600)
def test_nixl_obj_on_a_kv_bucket_writes_reads_queries_evicts_and_expires(
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
) -> None:
    info, bucket = s3_cluster_fixture, "kvbm-blocks"  # KVBM's default G4 bucket name
    kv_bucket(info, bucket)
    params = dynamo_obj_params(info, bucket)
    size = 3 * MIB + 17

    # WRITE, ranged READ byte-exact, existence query.
    seen = nixl(params, [
        {"op": "write", "keys": ["g4/seq-0", "g4/seq-1"], "size": size, "seed": 1},
        {"op": "read", "key": "g4/seq-1", "index": 1, "size": size, "seed": 1,
         "offset": 123_457, "length": 1_000_003},
        {"op": "query", "keys": ["g4/seq-0", "g4/seq-1", "g4/absent"]},
    ])  # fmt: skip
    assert seen == ["DONE", {"state": "DONE", "exact": True}, [True, True, False]]
    before = namespace_stats(info, bucket)["evictions"].get("capacity", 0)

    # Past the arena (1 GiB: tests/integration/conftest.py's running_s3_cluster): capacity
    # evictions, visible in the stats and to NIXL.
    fill = [f"g4/fill-{i:03d}" for i in range(FILL_BLOCKS)]
    started = time.monotonic()
    seen = nixl(params, [
        {"op": "write", "keys": fill, "size": 8 * MIB, "seed": 2},
        {"op": "query", "keys": fill},
        {"op": "read", "key": fill[-1], "index": FILL_BLOCKS - 1, "size": 8 * MIB, "seed": 2,
         "offset": 5 * MIB, "length": 3 * MIB},
    ])  # fmt: skip
    fill_s = time.monotonic() - started
    assert seen[0] == "DONE"
    present = seen[1]
    assert not all(present), "nothing was evicted"
    assert present[-1] is True  # the newest object is still there...
    assert seen[2] == {"state": "DONE", "exact": True}  # ...and reads back byte-exact
    stats = namespace_stats(info, bucket)
    assert stats["evictions"].get("capacity", 0) > before, stats
    status = kvtier_cmd("status", "--state-dir", str(info["state"]), "--json")
    assert status.returncode == 0, status.stderr
    nodes = [n for n in json.loads(status.stdout)["nodes"] if n["role"] == "kvcache"]
    assert sum(n["kvcache"]["evictions"].get("capacity", 0) for n in nodes) > before
    sys.stderr.write(
        f"NIXL wrote {8 * FILL_BLOCKS} MiB into the KV bucket in {fill_s:.1f} s (with queries "
        f"and a read); {present.count(False)} of {FILL_BLOCKS} objects evicted; stats {stats}\n"
    )

    # A namespace TTL: objects written after it expire, and NIXL sees them gone.
    set_namespace_ttl(info, bucket, 1.0)
    try:
        seen = nixl(params, [
            {"op": "write", "keys": ["g4/ttl-0"], "size": MIB, "seed": 3},
            {"op": "query", "keys": ["g4/ttl-0"]},
        ])  # fmt: skip
        assert seen == ["DONE", [True]]
        deadline = time.monotonic() + 15
        gone = False
        while not gone and time.monotonic() < deadline:
            time.sleep(0.5)
            gone = nixl(params, [{"op": "query", "keys": ["g4/ttl-0"]}]) == [[False]]
        assert gone, "the object outlived its namespace TTL"
        assert namespace_stats(info, bucket)["evictions"].get("ttl", 0) > 0
    finally:
        set_namespace_ttl(info, bucket, 0)
