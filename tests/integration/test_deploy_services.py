"""Every kvtier service starts from the environment the Kubernetes manifests give it.

No cluster is available here, so this is the closest check: each container of the rendered
`dev` overlay (deploy/kustomize) runs as a real process with its manifest environment, with
only what a pod would provide replaced by local equivalents (the files the init container
installs, the etcd address, free ports instead of the pod's fixed ones, the pod's name), and
the container's own readiness probe command must report SERVING.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import config, etcdserver
from tests import pki as test_pki
from tests.unit import test_deploy_manifests as manifests

pytestmark = pytest.mark.integration

COMPONENTS = ("metadata", "datanode", "kvcache", "gateway")
_FIXED_PORTS = ("7000", "7100", "7443", "9000", "9100")


def _local_environment(
    component: str, tmp_path: Path, etcd: etcdserver.EtcdServer
) -> tuple[dict[str, str], list[str]]:
    """The container's environment for a local process, and its readiness probe command."""
    container = manifests._main_container(manifests._workload("dev", component))
    env = manifests._environment("dev", container)
    master_key = tmp_path / "master.key"
    master_key.write_text(secrets.token_hex(32) + "\n")
    master_key.chmod(0o600)
    pki = test_pki.session()
    replaced = {
        "/run/kvtier/ca.crt": pki.ca_file,
        "/run/kvtier/tls.crt": pki.cert(component),
        "/run/kvtier/tls.key": pki.key(component),
        "/run/kvtier/master.key": str(master_key),
        "/data": str(tmp_path / component / "data"),
        **{port: str(etcdserver.free_port()) for port in _FIXED_PORTS},
    }
    env = {name: replaced.get(value, value) for name, value in env.items()}
    drives = config.env_name(component, "drives")
    if drives in env:
        env[drives] = ",".join(
            str(tmp_path / component / d.strip("/")) for d in env[drives].split(",")
        )
    env[config.env_name(component, "etcd_endpoints")] = f"127.0.0.1:{etcd.client_port}"
    env[config.env_name(component, "advertise_host")] = "127.0.0.1"
    env[config.env_name(component, "node_id")] = f"{component}-0"
    probe = list(container["readinessProbe"]["exec"]["command"])
    probe[-1] = f"127.0.0.1:{env[config.env_name(component, 'grpc_port')]}"
    return env, probe


@pytest.fixture
def started(
    tmp_path: Path, etcd: etcdserver.EtcdServer, etcd_prefix: str
) -> Iterator[list[tuple[str, dict[str, str], list[str], Path]]]:
    procs: list[subprocess.Popen[bytes]] = []
    nodes = []
    try:
        for component in COMPONENTS:
            env, probe = _local_environment(component, tmp_path, etcd)
            env[config.env_name(component, "etcd_prefix")] = etcd_prefix
            log = tmp_path / f"{component}.log"
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", f"services.{component}"],
                        env={**os.environ, **env},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            nodes.append((component, env, probe, log))
        yield nodes
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_each_service_serves_with_its_manifest_environment(
    started: list[tuple[str, dict[str, str], list[str], Path]],
) -> None:
    for component, env, probe, log in started:
        probe[0] = str(Path(sys.executable).parent / probe[0])  # the venv's kvtier
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(
                probe, env={**os.environ, **env}, capture_output=True, text=True, timeout=30
            )
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert result.stdout.strip() == "SERVING", (component, log.read_text()[-2000:])
