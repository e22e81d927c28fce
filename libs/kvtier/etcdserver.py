"""Start and stop a local etcd server (the dev cluster and the test fixtures use it).

etcd is a real server process: Debian's `etcd-server` package or any `etcd` binary on PATH.
With `EtcdTLS` it serves clients and peers over TLS and requires a client certificate signed by
the cluster CA (`--client-cert-auth`): only kvtier nodes and operators reach it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

#: etcd keeps one hour of history (the dev cluster, compose and the Kubernetes manifests alike).
AUTO_COMPACTION = ("--auto-compaction-mode=periodic", "--auto-compaction-retention=1h")


class EtcdError(Exception):
    """etcd could not be found or started; the message is one line."""


#: Ports free_port handed out lately: a port released after its check can come back from the
#: next bind, and two servers told the same port collide.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=256)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0, like etcd),
    and not one this process was given lately."""
    port = 0
    for _ in range(32):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.append(port)
    return port


def find_binary(name: str = "etcd") -> str:
    """The path of the etcd binary; EtcdError with an install hint when absent."""
    path = shutil.which(name) or (name if Path(name).is_file() else None)
    if path is None:
        raise EtcdError(
            f"{name!r} not found on PATH; install it (Debian: apt-get install etcd-server) "
            "or run scripts/bootstrap.sh"
        )
    return path


@dataclasses.dataclass(frozen=True, slots=True)
class EtcdTLS:
    """The etcd server's certificate (role etcd) and the cluster CA its clients must chain to."""

    ca_file: str
    cert_file: str
    key_file: str

    def args(self) -> list[str]:
        """etcd's flags for TLS on the client and peer URLs, client certificates required."""
        return [
            f"--cert-file={self.cert_file}",
            f"--key-file={self.key_file}",
            f"--trusted-ca-file={self.ca_file}",
            "--client-cert-auth",
            f"--peer-cert-file={self.cert_file}",
            f"--peer-key-file={self.key_file}",
            f"--peer-trusted-ca-file={self.ca_file}",
            "--peer-client-cert-auth",
        ]

    def context(self) -> ssl.SSLContext:
        """A client context for the health check (etcd's own certificate as the client's)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class EtcdServer:
    """One single-member etcd on 127.0.0.1 with its data under data_dir (TLS with `tls`)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int,
        peer_port: int,
        log_path: Path,
        binary: str = "etcd",
        tls: EtcdTLS | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = log_path
        self._binary = binary
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        """http, or https with TLS."""
        return "https" if self.tls is not None else "http"

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
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = f"{self.scheme}://127.0.0.1:{self.peer_port}"
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
            # Every membership change rewrites the map key: without compaction etcd's history
            # grows until its quota stops all writes (docs/scaling.md). Watches never resume
            # from an old revision (kvtier.membership), so compaction cannot break them.
            *AUTO_COMPACTION,
            *(self.tls.args() if self.tls is not None else ()),
        ]
        # Readable by its owner only, like every log of a dev cluster.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until etcd reports healthy; EtcdError when it exits or times out."""
        deadline = time.monotonic() + timeout_s
        url = f"{self.scheme}://{self.endpoint}/health"
        context = self.tls.context() if self.tls is not None else None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EtcdError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as reply:
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
