"""`python -m kvtier.healthprobe`, the containers' health check, against a gRPC server that
requires client certificates of the session's CA (as every kvtier node does)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvtier import healthprobe
from tests import pki as test_pki


@pytest.fixture
def node() -> Iterator[tuple[str, health.HealthServicer]]:
    """A mutual-TLS gRPC server with the health service (SERVING), as a datanode's."""
    tls = test_pki.session()
    credentials = grpc.ssl_server_credentials(
        [(Path(tls.key("datanode")).read_bytes(), Path(tls.cert("datanode")).read_bytes())],
        root_certificates=Path(tls.ca_file).read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def _datanode_env(role: str = "datanode") -> dict[str, str]:
    """A datanode container's environment: its TLS settings, among others."""
    tls = test_pki.session()
    return {
        "KVTIER_DATANODE_GRPC_PORT": "7000",
        "KVTIER_DATANODE_TLS_CA_FILE": tls.ca_file,
        "KVTIER_DATANODE_TLS_CERT_FILE": tls.cert(role),
        "KVTIER_DATANODE_TLS_KEY_FILE": tls.key(role),
        "PATH": "/usr/bin:/bin",
    }


def test_serving_node_with_its_own_certificate_exits_0(
    node: tuple[str, health.HealthServicer],
) -> None:
    address, _ = node
    done = subprocess.run(
        [sys.executable, "-m", "kvtier.healthprobe", address],
        env=_datanode_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_not_serving_exits_1(node: tuple[str, health.HealthServicer]) -> None:
    address, servicer = node
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthprobe.main([address], _datanode_env()) == 1


def test_a_certificate_of_another_ca_is_refused(
    node: tuple[str, health.HealthServicer], tmp_path: Path
) -> None:
    """Mutual TLS: without a certificate the node trusts, the node is not SERVING to it."""
    from kvtier import pki

    authority = pki.new_authority("other-cluster")
    cert, key = pki.write_pair(tmp_path, "intruder", authority.issue("datanode", "intruder"))
    env = _datanode_env() | {
        "KVTIER_DATANODE_TLS_CERT_FILE": str(cert),
        "KVTIER_DATANODE_TLS_KEY_FILE": str(key),
    }
    address, _ = node
    assert healthprobe.check(address, healthprobe.service_tls(env), 5.0) == "UNREACHABLE"


def test_no_single_service_in_the_environment_exits_2(
    node: tuple[str, health.HealthServicer],
) -> None:
    address, _ = node
    assert healthprobe.main([address], {"PATH": "/usr/bin"}) == 2
    two = _datanode_env() | {"KVTIER_GATEWAY_TLS_CERT_FILE": "/x.crt"}
    assert healthprobe.main([address], two) == 2
    assert healthprobe.main(["--bogus"], _datanode_env()) == 2


def test_insecure_service_is_probed_in_plain_text() -> None:
    assert healthprobe.service_tls({"KVTIER_KVCACHE_INSECURE": "true"}) is None
    tls = healthprobe.service_tls(_datanode_env())
    assert tls is not None
    assert tls["CERT_FILE"] == test_pki.session().cert("datanode")
