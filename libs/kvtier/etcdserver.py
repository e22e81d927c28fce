"""Start and stop a local etcd server (the dev cluster and the test fixtures use it).

etcd is a real server process: Debian's `etcd-server` package or any `etcd` binary on PATH.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class EtcdError(Exception):
    """etcd could not be found or started; the message is one line."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0, like etcd)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str = "etcd") -> str:
    """The path of the etcd binary; EtcdError with an install hint when absent."""
    path = shutil.which(name) or (name if Path(name).is_file() else None)
    if path is None:
        raise EtcdError(
            f"{name!r} not found on PATH; install it (Debian: apt-get install etcd-server) "
            "or run scripts/bootstrap.sh"
        )
    return path


class EtcdServer:
    """One single-member etcd on 127.0.0.1 with its data under data_dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int,
        peer_port: int,
        log_path: Path,
        binary: str = "etcd",
    ) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = log_path
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port for clients."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Launch the process (returns at once; see wait_ready)."""
        binary = find_binary(self._binary)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            binary,
            "--name=kvtier",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kvtier={peer}",
            "--log-level=warn",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until etcd reports healthy; EtcdError when it exits or times out."""
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.endpoint}/health"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EtcdError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if json.loads(reply.read()).get("health") == "true":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.1)
        raise EtcdError(f"etcd not healthy at {self.endpoint} after {timeout_s:g}s")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit code. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 5) -> str:
        """The last lines etcd wrote, joined on one line."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])
