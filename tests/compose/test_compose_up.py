"""docker-compose.yml run for real: build, start, use from the host, stop a datanode, tear down.

On a Docker engine of this machine (started here as root when none runs) and the registry-free
base image (scripts/compose_base_image.sh), `up --build` must bring every service to healthy;
then, over the published ports on 127.0.0.1 with the cluster's own PKI: the operator CLI adds a
user, boto3 does PUT / GET / LIST over HTTPS, the KV SDK on the host stores and reads blocks (the
kvcache nodes publish their users' port and data plane on 127.0.0.1 and announce it to users),
the gateway still reaches the kvcache nodes by name on the compose network (an S3 KV bucket),
`kvtier status` sees every node, and reads stay byte-exact with a datanode container stopped.
`down --volumes` runs whatever happens. Skips, saying why, only where Docker cannot run.
The file runs with one override, tests/compose/fast-health.yml: etcd and the metadata service
(what every other service waits for) are probed every second or two, not every 5 s and 10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.compose import docker_env

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1500)]

PROJECT = "kvtier-composetest"
BUCKET = "compose-bucket"
OBJECT_BYTES = 3 * 1024 * 1024 + 17  # several stripes of the 8+4 set, and a ragged tail
KV_NAMESPACE = "compose-test"
KV_BLOCK_BYTES = 256 * 1024
KV_KEYS = [b"compose-chain-0", b"compose-chain-1", b"compose-chain-2"]
STOPPED_DATANODE = "datanode-3"

# Run on the host (a new process each) with KVTIER_CA_FILE / KVTIER_ACCESS_KEY /
# KVTIER_SECRET_KEY set: put (argv[1] == "put") or only get the blocks, print what was read.
KV_SCRIPT = """
import hashlib, json, sys
import kvtier
keys = [k.encode() for k in sys.argv[2].split(",")]
size = int(sys.argv[3])
kv = kvtier.KVClient.connect(metadata=sys.argv[5], namespace=sys.argv[4], transports=["tcp"])
put = []
if sys.argv[1] == "put":
    blocks = [hashlib.shake_256(k).digest(size) for k in keys]
    put = [str(s) for s in kv.put_batch(keys, blocks)]
outs = [bytearray(size) for _ in keys]
got = kv.get_batch(keys, outs)
print(json.dumps({"put": put, "got": got, "sha256": [hashlib.sha256(o).hexdigest() for o in outs],
                  "nodes": kv.node_ids}))
kv.close()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The compose cluster, healthy, with the operator's PKI copied out and an admin user."""
    work = tmp_path_factory.mktemp("compose")
    try:
        engine = docker_env.engine(work)
        compose = docker_env.compose_command()
    except docker_env.DockerUnavailable as exc:
        print(f"compose test skipped: {exc}", file=sys.stderr)  # noqa: T201 - the reason, in CI logs
        pytest.skip(f"Docker cannot run here: {exc}")
    timings: dict[str, float] = {}
    started = time.monotonic()
    project = docker_env.Project(
        name=PROJECT,
        compose=compose,
        base_image=docker_env.base_image(),
        master_key_file=work / "kvtier-master.key",
        overrides=(docker_env.FAST_HEALTH_FILE,),
    )
    timings["base_image_s"] = time.monotonic() - started
    try:
        if project.leftovers():  # what a killed earlier run may have left
            project.down()
        project.write_master_key()
        project.up(timeout_s=1200)
        timings["up_s"] = time.monotonic() - started - timings["base_image_s"]
        yield _connect(project, work, timings)
    finally:
        down = project.down()
        project.master_key_file.unlink(missing_ok=True)
        engine.stop()
        print(f"compose timings: {timings}", file=sys.stderr)  # noqa: T201
        assert down.returncode == 0, down.stdout + down.stderr


def _connect(project: docker_env.Project, work: Path, timings: dict[str, float]) -> dict[str, Any]:
    pki = work / "pki"
    pki.mkdir(mode=0o700)
    for name in ("ca.crt", "operator.crt", "operator.key"):
        (pki / name).write_bytes(project.volume_file("pki", name))
        (pki / name).chmod(0o600)
    operator_env = {
        "KVTIER_CA_FILE": str(pki / "ca.crt"),
        "KVTIER_CERT_FILE": str(pki / "operator.crt"),
        "KVTIER_KEY_FILE": str(pki / "operator.key"),
    }
    metadata = f"127.0.0.1:{project.ports['METADATA_PORT']}"
    added = _kvtier("admin", "user", "add", "--admin", "--json", "--metadata", metadata,
                    env=operator_env)  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr + project.logs()
    user = json.loads(added.stdout)
    return {
        "project": project,
        "ca_file": str(pki / "ca.crt"),
        "operator_env": operator_env,
        "access_key": user["access_key"],
        "secret_key": user["secret_key"],
        "s3": f"https://127.0.0.1:{project.ports['S3_PORT']}",
        "timings": timings,
    }


def _kvtier(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The host's `kvtier` CLI, with only the given credentials (not the test session's)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")} | env
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", *args],
        env=full, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _s3(cluster: dict[str, Any]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=cluster["s3"],
        aws_access_key_id=cluster["access_key"],
        aws_secret_access_key=cluster["secret_key"],
        region_name="us-east-1",
        verify=cluster["ca_file"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def _payload() -> bytes:
    return hashlib.shake_256(b"compose object").digest(OBJECT_BYTES)


def _host_python(script: str, *args: str, env: dict[str, str]) -> Any:
    """Run a Python script on the host with only the given kvtier settings; stdout as JSON."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")} | env
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=full, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _exec(cluster: dict[str, Any], service: str, *command: str, **env: str) -> Any:
    """Run a command in a running service's container; its stdout as JSON."""
    project: docker_env.Project = cluster["project"]
    flags = [f"--env={k}={v}" for k, v in env.items()]
    done = project.run("exec", "-T", *flags, service, *command, timeout_s=180)
    assert done.returncode == 0, done.stdout + done.stderr + project.logs()
    text = done.stdout.strip()
    return json.loads(text if text.startswith("{") else text.splitlines()[-1])


def test_s3_put_get_list_over_https(cluster: dict[str, Any]) -> None:
    s3 = _s3(cluster)
    s3.create_bucket(Bucket=BUCKET)
    data = _payload()
    s3.put_object(Bucket=BUCKET, Key="models/blob.bin", Body=data)
    got = s3.get_object(Bucket=BUCKET, Key="models/blob.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="models/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("models/blob.bin", len(data))]


def test_kv_blocks_round_trip_through_the_sdk(cluster: dict[str, Any]) -> None:
    """Blocks put by one SDK client on the host are read back byte-exact by another (a new
    process), over the ports the kvcache nodes publish on 127.0.0.1."""
    project: docker_env.Project = cluster["project"]
    user = {
        "KVTIER_CA_FILE": cluster["ca_file"],
        "KVTIER_ACCESS_KEY": cluster["access_key"],
        "KVTIER_SECRET_KEY": cluster["secret_key"],
    }
    keys = ",".join(k.decode() for k in KV_KEYS)
    metadata = f"127.0.0.1:{project.ports['METADATA_CLIENT_PORT']}"
    args = (keys, str(KV_BLOCK_BYTES), KV_NAMESPACE, metadata)
    put = _host_python(KV_SCRIPT, "put", *args, env=user)
    assert put["put"] == ["stored"] * len(KV_KEYS), put
    assert sorted(put["nodes"]) == ["kvcache-1", "kvcache-2"], put
    read = _host_python(KV_SCRIPT, "get", *args, env=user)
    expected = [hashlib.sha256(hashlib.shake_256(k).digest(KV_BLOCK_BYTES)).hexdigest()
                for k in KV_KEYS]  # fmt: skip
    assert read["got"] == [KV_BLOCK_BYTES] * len(KV_KEYS), read
    assert read["sha256"] == expected


def test_kv_bucket_through_the_gateway_on_the_compose_network(cluster: dict[str, Any]) -> None:
    """The gateway still reaches the kvcache nodes by their service names (a KV bucket's
    objects live in the KV tier): what the nodes announce to users changed nothing for it."""
    s3 = _s3(cluster)

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    s3.create_bucket(Bucket="compose-kv-bucket")
    data = hashlib.shake_256(b"compose kv object").digest(300 * 1024)
    s3.put_object(Bucket="compose-kv-bucket", Key="block.bin", Body=data)
    got = s3.get_object(Bucket="compose-kv-bucket", Key="block.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_status_sees_every_node(cluster: dict[str, Any]) -> None:
    operator = {
        "KVTIER_CA_FILE": "/pki/ca.crt",
        "KVTIER_CERT_FILE": "/pki/operator.crt",
        "KVTIER_KEY_FILE": "/pki/operator.key",
    }
    state = _exec(
        cluster, "gateway", "kvtier", "status", "--json", "--etcd-endpoints", "etcd:2379",
        **operator,
    )  # fmt: skip
    assert state["healthy"] is True, state
    nodes = json.dumps(state)
    for name in ("metadata", "gateway", "kvcache-1", "kvcache-2",
                 *(f"datanode-{i}" for i in range(1, 7))):  # fmt: skip
        assert f'"{name}"' in nodes, f"{name} missing from {state}"


def test_reads_stay_byte_exact_with_a_datanode_stopped(cluster: dict[str, Any]) -> None:
    project: docker_env.Project = cluster["project"]
    s3 = _s3(cluster)
    data = _payload()
    s3.put_object(Bucket=BUCKET, Key="before-stop.bin", Body=data)
    stopped = project.run("stop", STOPPED_DATANODE, timeout_s=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert project.states()[STOPPED_DATANODE] != "healthy"
    for key in ("models/blob.bin", "before-stop.bin"):
        got = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), key
