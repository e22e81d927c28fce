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


def _serving(probe: list[str], env: dict[str, str]) -> bool:
    result = subprocess.run(
        probe, env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
    return result.returncode == 0 and result.stdout.strip() == "SERVING"


def _start(
    component: str, tmp_path: Path, etcd: etcdserver.EtcdServer, etcd_prefix: str
) -> tuple[subprocess.Popen[bytes], tuple[str, dict[str, str], list[str], Path]]:
    """Start one component and wait until its probe answers SERVING or it exits.

    Free ports are picked before the process binds them, so another process (any client's
    ephemeral port) can take one in between; a start that fails with EADDRINUSE is retried
    on fresh ports — what a pod would never meet, as its ports are its own.
    """
    for attempt in range(3):
        env, probe = _local_environment(component, tmp_path, etcd)
        env[config.env_name(component, "etcd_prefix")] = etcd_prefix
        probe[0] = sys.executable  # the container's `python`: the image's venv
        log = tmp_path / f"{component}.{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{component}"],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if _serving(probe, env):
                break
            time.sleep(0.5)
        if proc.poll() is not None and "Address already in use" in log.read_text():
            continue
        return proc, (component, env, probe, log)
    raise AssertionError(f"{component} found no free ports in 3 tries: {log.read_text()[-2000:]}")


@pytest.fixture
def started(
    tmp_path: Path, etcd: etcdserver.EtcdServer, etcd_prefix: str
) -> Iterator[list[tuple[str, dict[str, str], list[str], Path]]]:
    procs: list[subprocess.Popen[bytes]] = []
    nodes = []
    try:
        for component in COMPONENTS:
            proc, node = _start(component, tmp_path, etcd, etcd_prefix)
            procs.append(proc)
            nodes.append(node)
        yield nodes
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


@pytest.mark.timeout(400)
def test_each_service_serves_with_its_manifest_environment(
    started: list[tuple[str, dict[str, str], list[str], Path]],
) -> None:
    for component, env, probe, log in started:
        result = subprocess.run(
            probe, env={**os.environ, **env}, capture_output=True, text=True, timeout=30
        )
        assert result.stdout.strip() == "SERVING", (component, log.read_text()[-2000:])
