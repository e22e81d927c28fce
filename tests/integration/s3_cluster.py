"""A detached dev cluster (`kvtier up`, secure: HTTPS with the cluster CA's certificate) shared
by the S3 acceptance tests of tests/integration, and helpers to build real S3 clients against
it, each configured to trust the cluster's CA the way that client expects."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

import boto3
import botocore
import pytest
from botocore.config import Config

from tests.integration.conftest import kvtier_cmd, running_s3_cluster


@pytest.fixture(scope="module")
def s3_cluster(s3_shared_cluster: dict[str, Any]) -> dict[str, Any]:
    """cluster.json of a running dev cluster (6 datanodes, 1 kvcache node): the one the S3
    modules share (tests/integration/conftest.py), which they keep apart by their own tenant
    and bucket names."""
    return s3_shared_cluster


@pytest.fixture(scope="module")
def own_s3_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The same kind of cluster, the module's own: for a module that stops part of it or starts
    it with other settings (and for modules outside tests/integration)."""
    with running_s3_cluster(tmp_path_factory.mktemp("s3") / "state") as info:
        yield info


def client(info: dict[str, Any], access_key: str = "", secret_key: str = "", **config: Any) -> Any:
    """A boto3 S3 client (path style, us-east-1) for the admin or the given user, trusting the
    cluster's CA (`verify=`: the S3 API serves HTTPS with the gateway's cluster certificate)."""
    return boto3.client(
        "s3",
        endpoint_url=info["gateway_s3"],
        aws_access_key_id=access_key or info["s3_access_key"],
        aws_secret_access_key=secret_key or info["s3_secret_key"],
        region_name="us-east-1",
        verify=info["ca_file"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
    )


def anonymous(info: dict[str, Any]) -> Any:
    """A boto3 S3 client with no credentials at all (unsigned requests), as `client`."""
    return client(info, signature_version=botocore.UNSIGNED)


def tls_context(info: dict[str, Any]) -> ssl.SSLContext:
    """A client TLS context that trusts the cluster's CA (for urllib and http.client)."""
    return ssl.create_default_context(cafile=info["ca_file"])


def nixl_params(info: dict[str, Any], bucket: str) -> dict[str, str]:
    """The OBJ backend parameters NIXL needs for the cluster's S3 API (what Dynamo KVBM's G4
    tier passes, `NixlS3Config::to_nixl_params`, and docs/integrations.md tells users to set):
    `scheme=https` and `ca_bundle`, the CA file its AWS SDK trusts (NIXL reads no
    environment variable for it)."""
    url = urllib.parse.urlparse(info["gateway_s3"])
    params = {
        "bucket": bucket,
        "endpoint_override": info["gateway_s3"],
        "scheme": url.scheme,
        "region": "us-east-1",
        "use_virtual_addressing": "false",
        "access_key": info["s3_access_key"],
        "secret_key": info["s3_secret_key"],
    }
    if url.scheme == "https":
        params["ca_bundle"] = info["ca_file"]
    return params


def add_user(info: dict[str, Any], tenant: str, *, admin: bool = False) -> tuple[str, str]:
    """A new user of tenant through `kvtier admin user add`: (access key, secret)."""
    args = ["admin", "user", "add", "--tenant", tenant, "--json", "--state-dir", str(info["state"])]
    result = kvtier_cmd(*args, *(["--admin"] if admin else []))
    assert result.returncode == 0, result.stdout + result.stderr
    user = json.loads(result.stdout)
    return user["access_key"], user["secret_key"]


def aws_cli(
    info: dict[str, Any], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real awscli against the cluster as the admin (trusting the cluster's CA through
    AWS_CA_BUNDLE, as `--ca-bundle` would)."""
    aws = shutil.which("aws", path=os.path.dirname(sys.executable)) or "aws"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": info["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": info["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CA_BUNDLE": info["ca_file"],
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    result = subprocess.run(
        [aws, "--endpoint-url", info["gateway_s3"], *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, f"aws {' '.join(args)}: {result.stdout}{result.stderr}"
    return result
