"""A dev cluster's supervisor seen from outside (the CLI): find it, wait for a detached one to be
ready, stop it; and the summary `kvtier up` prints. `kvtier.devcluster` re-exports these names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from kvtier import devstate


def supervisor_pid(state: Path) -> int | None:
    """The pid of the supervisor running from state, or None.

    The supervisor holds `supervisor.lock` while it runs: when the lock is free, the pid file is
    stale (its pid may belong to another process by now) and is ignored.
    """
    try:
        with (state / "supervisor.lock").open("ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return None
    except BlockingIOError:
        pass  # held: a supervisor runs
    except OSError:
        return None
    try:
        pid = int((state / "supervisor.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def render_summary(info: dict[str, Any]) -> str:
    """The endpoints and credentials block printed by `kvtier up`."""
    lines = [
        "kvtier dev cluster is up",
        f"  state dir     {info['state_dir']}",
        f"  etcd          {info['etcd']}",
        f"  metadata      {info['metadata']}",
        f"  gateway gRPC  {info['gateway_grpc']}",
        f"  gateway S3    {info['gateway_s3'] or '(not yet available)'}",
        f"  access key    {info['s3_access_key']}   (S3 admin, tenant {devstate.ADMIN_TENANT})",
        "  secret key    in the cluster file (never printed: this output may be logged)",
        f"  CA            {info.get('ca_file') or '(insecure: no TLS, no authentication)'}",
        f"  map epoch     {info['map_epoch']}",
        f"  cluster file  {Path(info['state_dir']) / 'cluster.json'} (mode 0600)",
        "Ctrl-C (or kvtier down --state-dir DIR) stops it.",
    ]
    return "\n".join(lines)


def wait_detached(state: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """Wait for a detached supervisor to write cluster.json; ClusterError if it dies first."""
    deadline = time.monotonic() + timeout_s
    path = state / "cluster.json"
    while time.monotonic() < deadline:
        info = devstate.load_json(path)
        if info.get("supervisor_pid") == proc.pid:
            return info
        if proc.poll() is not None:
            tail = (state / "logs" / "supervisor.log").read_text(errors="replace").strip()
            raise devstate.ClusterError(
                f"the cluster did not start: {tail.splitlines()[-1] if tail else ''}"
            )
        time.sleep(0.2)
    raise devstate.ClusterError(f"the cluster was not ready after {timeout_s:g}s")


def stop_detached(state: Path, timeout_s: float) -> bool:
    """SIGTERM the supervisor of state and wait for it to exit; False when none ran."""
    pid = supervisor_pid(state)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        # The lock is released a moment before the process is gone: wait for both, so that
        # a caller may start again (or check the pid) as soon as this returns.
        if supervisor_pid(state) is None and not _process_alive(pid):
            return True
        time.sleep(0.1)
    raise devstate.ClusterError(f"the supervisor (pid {pid}) did not stop within {timeout_s:g}s")


def _process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
