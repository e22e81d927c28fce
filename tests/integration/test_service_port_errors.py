"""A service whose port is taken (likelier now that the defaults are fixed ports) stops at start
with one line naming the setting and the address, exit 2, never a traceback (issue 17)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import etcdserver
from tests.integration.conftest import service_tls_flags

pytestmark = pytest.mark.integration


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def _start(service: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", f"services.{service}",
            f"--etcd-endpoints=127.0.0.1:{etcdserver.free_port()}", "--etcd-wait-s=1",
            *flags, *service_tls_flags(service),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("setting", ["grpc_port", "client_port", "metrics_port"])
def test_a_taken_port_is_one_line_and_exit_2(taken: int, setting: str, tmp_path: Path) -> None:
    ports = {"grpc_port": 0, "client_port": 0, "metrics_port": 0, setting: taken}
    flags = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
    result = _start("kvcache", *flags, f"--data-dir={tmp_path / 'kv'}", "--arena-bytes=67108864")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    flag = setting.replace("_", "-")
    assert result.stderr.strip().splitlines()[-1] == (
        f"kvtier-kvcache: error: {setting}: cannot listen on 127.0.0.1:{taken} (in use by "
        f"another process?); set --{flag} (0: any free port)"
    )
