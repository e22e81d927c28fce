"""What every system in the KV-cache benchmark provides, and the helpers their drivers share.

A `KVSystem` lives in the benchmark process: it starts its servers (127.0.0.1, free ports, ready
when a probe answers) and stops them. Its `client_spec()` is a small picklable object that a
*separate* client process turns into a `KVClient` with `make_client()`. Client processes run
`spec.python` (the system's own virtualenv where it has one), so this module and every
`ClientSpec` module import only the standard library and numpy at module level.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".bench-venvs"
INSTALL_SCRIPT = ROOT / "scripts" / "bench_peers.sh"

Buffer = npt.NDArray[np.uint8]


class KVClient(Protocol):
    """One connection to a system, used from one client process.

    `bufs` are 1-D uint8 views into pools that the caller registered first; `get_batch` fills
    them in place (a system that returns new bytes objects copies them in: that copy is part of
    what its users pay). Any failure (a missing key, a short read, an error code) raises.
    """

    def register(self, pool: Buffer) -> None:
        """Announce a pool that later bufs are views of (zero-copy APIs need it)."""

    def unregister(self, pool: Buffer) -> None:
        """Forget a pool registered before; it is freed afterwards."""

    def put_batch(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        """Store bufs[i] under keys[i]."""

    def get_batch(self, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> None:
        """Read the value of keys[i] into bufs[i] (same length as what was put)."""

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        """Remove keys, to keep the server's memory bounded between cases."""

    def lookup(self, chain: Sequence[bytes]) -> int:
        """How many leading keys of chain are present (one prefix probe, as an engine asks on
        every request); NotImplementedError when the system's client has no such probe."""

    def close(self) -> None:
        """Close the connection."""


class ClientSpec(Protocol):
    """Picklable recipe for a client; `make_client` and `version` run in the client process."""

    @property
    def python(self) -> str:
        """Interpreter for the client processes."""

    @property
    def env(self) -> Mapping[str, str]:
        """Environment added to the client processes'."""

    def make_client(self) -> KVClient:
        """Connect (called once per client process)."""

    def version(self) -> str:
        """Version of the client library, as installed in the client process."""


class KVSystem(Protocol):
    """A system under test: kvtier over one transport, or a peer."""

    @property
    def name(self) -> str:
        """Short name used in tables and plots."""

    @property
    def kind(self) -> str:
        """'kvtier' or 'peer' (targets compare the best kvtier row against each peer)."""

    def unavailable(self) -> str | None:
        """Why it cannot run here (not installed, ...), or None."""

    def start(self) -> None:
        """Start its servers and return once a probe shows they are ready."""

    def stop(self) -> None:
        """Stop its servers and remove their temp dirs; idempotent; safe after a failed start."""

    def client_spec(self) -> ClientSpec:
        """What client processes need to connect (valid after start)."""

    def describe(self) -> str:
        """One line for the report: version and how it is run."""


class BaseClient:
    """No-op defaults for the optional parts of `KVClient`."""

    def register(self, pool: Buffer) -> None:
        del pool

    def unregister(self, pool: Buffer) -> None:
        del pool

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        del keys

    def lookup(self, chain: Sequence[bytes]) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def venv_python(venv: str) -> Path:
    return VENVS / venv / "bin" / "python"


def install_status(venv: str) -> str | None:
    """None when scripts/bench_peers.sh installed `venv`, else the reason it did not."""
    status = VENVS / f"{venv}.status"
    if not status.exists():
        return f"not installed (run {INSTALL_SCRIPT.relative_to(ROOT)})"
    text = status.read_text().strip()
    if text.startswith("ok"):
        return None if venv_python(venv).exists() else f"{venv_python(venv)} is missing"
    return text


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """A server subprocess whose output goes to a log file; stop() terminates, then kills."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C of the benchmark reaches it through stop()
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, probe: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        """Poll `probe` until it holds; raise with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout_s
        while not probe():
            if not self.alive():
                raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)  # poll interval between probes, not a guess at readiness

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace_s)
        self._log.close()
