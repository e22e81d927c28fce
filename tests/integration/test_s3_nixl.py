"""NIXL's OBJ backend (what vLLM's object tier, Dynamo KVBM's G4 tier and LMCache's nixl store
use), unmodified and CPU-only, against an ordinary bucket and a KV bucket of a secure dev cluster
(HTTPS: `scheme=https` and the cluster's CA as `ca_bundle`): WRITE a buffer, READ a range of it
back byte-exact, query_memory for present and absent keys."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).with_name("nixl_obj_client.py")


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_nixl_obj_write_ranged_read_and_query(
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
    kind: str,
) -> None:
    try:
        import nixl_cu12  # noqa: F401
    except ImportError:
        pytest.fail("nixl-cu12 is not installed: scripts/bootstrap.sh test installs it")
    info = s3_cluster_fixture
    s3 = s3_cluster.client(info)
    bucket = f"nixl-{kind}"

    def kind_header(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = kind

    s3.meta.events.register("before-sign.s3.CreateBucket", kind_header)
    s3.create_bucket(Bucket=bucket)
    params = s3_cluster.nixl_params(info, bucket)
    assert (params["scheme"], params["ca_bundle"]) == ("https", info["ca_file"])
    run = subprocess.run(
        [sys.executable, str(CLIENT), json.dumps(params)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {
        "write": "DONE", "read": "DONE", "exact": True, "present": [True, False],
        "sha256_len": 3 * 1024 * 1024 + 17,
    }  # fmt: skip
    # What NIXL wrote is what an S3 client reads, byte for byte.
    block = np.random.default_rng(7).integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8)
    got = s3.get_object(Bucket=bucket, Key="kv/layer0/block-1")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(block.tobytes()).digest()
    # NIXL's AWS SDK vouches for the body with a trailing x-amz-checksum-crc64nvme: a KV bucket
    # then stores no MD5 and the ETag is the version's (docs/s3.md); elsewhere it is the MD5.
    etag = s3.head_object(Bucket=bucket, Key="kv/layer0/block-1")["ETag"]
    md5 = f'"{hashlib.md5(block.tobytes()).hexdigest()}"'
    assert bool(re.fullmatch(r'"[0-9a-f]{32}-1"', etag)) == (kind == "kv")
    assert (etag == md5) == (kind == "objects")
