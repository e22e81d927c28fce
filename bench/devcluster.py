"""A dev cluster for the benchmarks, and memory of processes (split out of bench/object_bench.py).

`DevCluster` runs `kvtier up --detach` in a state directory (secure, as `kvtier up` runs by
default) and makes the benchmark's user; `stop()` is idempotent. `evict_shards` drops the
datanodes' files from the page cache; `memory` and `reset_peak` read and reset a process's RSS.
bench/object_bench.py re-exports every name here, so `object_bench.DevCluster` keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import secure

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


# The cluster.


class DevCluster:
    """`kvtier up --detach` in a state directory; `stop()` is idempotent."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.args = args or ("--kvcache-nodes", "1")  # `kvtier up` shape options
        self.info: dict[str, Any] = {}
        self.user = secure.BenchUser(insecure=True)

    def _kvtier(
        self, *args: str, timeout_s: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvtier.cli.main", *args, "--state-dir", str(self.state)],
            capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT,
            env=secure.cli_env(env),
        )  # fmt: skip

    def start(self, service_env: dict[str, str] | None = None) -> dict[str, Any]:
        """Start it, make the benchmark's user (tenant `bench`, trusted for shared memory) and
        return cluster.json; RuntimeError with the logs' tails on failure. service_env: extra
        variables of `up` (the services inherit them; the later CLI calls do not see them)."""
        up = self._kvtier(
            "up", "--detach", "--ports", "auto", *self.args, timeout_s=240, env=service_env
        )
        if up.returncode != 0:
            raise RuntimeError(f"kvtier up failed: {up.stdout}{up.stderr}\n{self.log_tails()}")
        self.info = json.loads((self.state / "cluster.json").read_text())
        self.user = secure.add_user(self.state, "bench", trusted=True)
        return self.info

    def stop(self) -> None:
        """`kvtier down` (nothing when it is not running)."""
        self._kvtier("down", timeout_s=120)

    def pids(self) -> dict[str, int]:
        """Name -> pid of the gateway and the datanodes (as started)."""
        return {
            n["name"]: int(n["pid"])
            for n in self.info.get("nodes", [])
            if n["role"] in ("gateway", "datanode")
        }

    def layout(self) -> tuple[int, int, int]:
        """(data shards, parity shards, drives) of the pool's first erasure set."""
        from kvtier import membership

        async def read() -> tuple[int, int, int]:
            store = membership.EtcdMembership(
                (self.info["etcd"],),
                self.info["etcd_prefix"],
                security=secure.operator_security(self.state),
            )
            await store.connect(wait_s=10)
            try:
                es = (await store.get_map()).map.pools[0].sets[0]
                return es.data_shards, es.parity_shards, len(es.slots)
            finally:
                await store.close()

        return asyncio.run(read())

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.state / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"===== {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def evict_shards(state: Path) -> int:
    """Drop every file of the datanodes' drives from the page cache (posix_fadvise DONTNEED:
    they are fsynced, hence clean, so the kernel discards them); returns the file count."""
    count = 0
    for path in (state / "nodes").glob("datanode-*/**/*"):
        if not path.is_file():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


# Memory of processes.


def memory(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssShmem of a process, in bytes."""
    wanted = {"VmHWM", "VmRSS", "RssAnon", "RssShmem"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            found[name] = int(value.split()[0]) * KIB
    return found


def reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (/proc/PID/clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
