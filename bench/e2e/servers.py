"""The servers of an end-to-end run: a kvtier dev cluster and a redis-server, on 127.0.0.1.

The dev cluster is the real one (`kvtier up --detach`: etcd, metadata, datanodes, kvcache nodes,
gateway) in a temporary state directory, ready when `kvtier up` says so, secure as `kvtier up` runs
by default. The "GPU server" processes reach it as a user would: a user of tenant `e2e` made by the
operator with `kvtier admin user add --trust-shm` (same-host shared memory is only negotiated for
credentials trusted for it), configured through KVTIER_CA_FILE, KVTIER_ACCESS_KEY and
KVTIER_SECRET_KEY, calling the metadata service's client port. Redis is started the way the KV-cache
benchmark starts it (`bench.kv_peers.redis_server`: no persistence, noeviction, ready on PING); its
client here is redis-py from the project's environment (the `e2e` extra).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import secure
from bench.kv_peers import redis_server
from kvtier import security

ROOT = Path(__file__).resolve().parents[2]


class DevCluster:
    """`kvtier up --detach` in `state`; `stop()` is idempotent and safe after a failed start.

    Small on purpose (2 datanodes x 2 drives, 1 gateway): the run uses the kvcache nodes, and
    fewer idle services leave the two vCPUs to the model. Each kvcache node has the dev cluster's
    256 MiB arena.
    """

    def __init__(self, state: Path, kvcache_nodes: int = 2) -> None:
        self.state = state
        self.kvcache_nodes = kvcache_nodes
        self.info: dict[str, Any] = {}
        self.user = secure.BenchUser(insecure=True)

    def _kvtier(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvtier.cli.main", *args, "--state-dir", str(self.state)],
            capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT,
            env=secure.cli_env(),
        )  # fmt: skip

    def start(self) -> dict[str, Any]:
        """Start it; cluster.json's content. RuntimeError with the logs' tails on failure."""
        up = self._kvtier(
            "up", "--detach", "--ports", "auto", "--datanodes", "2", "--drives-per-datanode", "2",
            "--kvcache-nodes", str(self.kvcache_nodes), "--lease-ttl-s", "3",
            "--shutdown-grace-s", "2", timeout_s=180,
        )  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"kvtier up failed: {up.stdout}{up.stderr}\n{self.log_tails()}")
        self.info = json.loads((self.state / "cluster.json").read_text())
        self.user = secure.add_user(self.state, "e2e", trusted=True)
        return self.info

    @property
    def metadata(self) -> str:
        """The metadata service's port for users (TLS + session tokens)."""
        return str(self.info.get("metadata_client") or self.info["metadata"])

    def client_env(self) -> dict[str, str]:
        """The environment of a process that uses kvtier as the e2e user (see the module)."""
        return secure.cli_env(self.user.env())

    def security(self) -> security.ClientSecurity:
        """The e2e user's credentials, for a client in this process."""
        return self.user.security()

    def stop(self) -> None:
        self._kvtier("down", timeout_s=120)

    def log_tails(self, lines: int = 20) -> str:
        """The end of every service log, for failure reports."""
        parts = []
        for log in sorted((self.state / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def redis_unavailable() -> str | None:
    """Why Redis cannot be part of the run, or None."""
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH (Debian: apt-get install redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "redis-py is not installed (pip install -e '.[e2e]')"
    return None


class Redis:
    """A redis-server on a free port (see the module docstring)."""

    def __init__(self) -> None:
        self._system = redis_server.RedisSystem()
        self.port = 0

    def start(self) -> int:
        self._system.start()
        self.port = self._system.client_spec().port
        return self.port

    def stop(self) -> None:
        self._system.stop()

    def describe(self) -> str:
        return self._system.describe().split(";")[0]
