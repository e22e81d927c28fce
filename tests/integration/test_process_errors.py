"""Services as processes: bad config and unreachable etcd give one clear line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier import etcdserver
from tests.integration.conftest import EPHEMERAL_PORTS, service_tls_flags

pytestmark = pytest.mark.integration


def _run(
    service: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line]
    assert lines, "no error printed"
    return lines[-1]


@pytest.mark.parametrize("service", ["metadata", "datanode", "kvcache", "gateway"])
def test_unknown_flag_is_a_one_line_error(service: str) -> None:
    result = _run(service, "--no-such-setting", "1")
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert line.startswith(f"kvtier-{service}: error:")
    assert "--no-such-setting" in line
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_env_setting_is_a_one_line_error() -> None:
    result = _run("datanode", env={"KVTIER_DATANODE_GRCP_PORT": "1"})
    assert result.returncode == 2
    assert "KVTIER_DATANODE_GRCP_PORT" in _one_line_error(result.stderr)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_bad_port_is_a_one_line_error(port: str) -> None:
    result = _run("gateway", f"--grpc-port={port}")
    assert result.returncode == 2
    assert "grpc_port" in _one_line_error(result.stderr) or "grpc-port" in result.stderr


def test_bad_env_value_is_a_one_line_error() -> None:
    result = _run("metadata", env={"KVTIER_METADATA_LEASE_TTL_S": "soon"})
    assert result.returncode == 2
    assert "KVTIER_METADATA_LEASE_TTL_S" in _one_line_error(result.stderr)


def test_unreachable_etcd_retries_then_fails_with_one_line(tmp_path: Path) -> None:
    port = etcdserver.free_port()
    start = time.monotonic()
    result = _run(
        "kvcache",
        f"--etcd-endpoints=127.0.0.1:{port}",
        "--etcd-wait-s=2",
        f"--data-dir={tmp_path / 'kv'}",
        "--arena-bytes=67108864",
        *EPHEMERAL_PORTS,
        *service_tls_flags("kvcache"),
    )
    assert result.returncode == 1
    line = _one_line_error(result.stderr)
    assert line == (
        f"kvtier-kvcache: error: etcd unreachable at 127.0.0.1:{port} after 2s: connection refused"
    )
    assert "retry" in result.stderr  # it said what it was doing while it waited
    assert time.monotonic() - start < 20


def test_sigterm_stops_a_service_with_exit_zero(
    private_etcd: etcdserver.EtcdServer, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.datanode",
            f"--etcd-endpoints={private_etcd.endpoint}",
            f"--data-dir={tmp_path / 'dn'}",
            "--shutdown-grace-s=2",
            *EPHEMERAL_PORTS,
            *service_tls_flags("datanode"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    assert proc.stderr is not None
    seen = ""
    while "ready" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert "ready" in seen, seen
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=15)[1]
    assert proc.returncode == 0, rest
    order = [m for m in ("lease", "stopped") if m in rest]
    assert order == ["lease", "stopped"], rest
    assert rest.index("revoked") < rest.index("stopped")


def test_sigterm_during_startup_stops_at_once(tmp_path: Path) -> None:
    """etcd never answers and the service would retry forever: SIGTERM still ends it, exit 0."""
    port = etcdserver.free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.gateway",
            f"--etcd-endpoints=127.0.0.1:{port}",
            "--etcd-wait-s=0",
            *EPHEMERAL_PORTS,
            "--s3-port=0",
            *service_tls_flags("gateway"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 30
    while "retry" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert "retry" in seen, seen
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=15)[1]
    assert proc.returncode == 0, rest
    assert "stop requested during start-up" in rest
    assert time.monotonic() - start < 5
