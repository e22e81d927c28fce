"""Which HTTP server for the S3 door: NIXL's OBJ backend (2 MiB x 16 per transfer, HTTPS, as
the engines drive it) against two bare HTTPS servers that store nothing, in one run, rounds
alternating: aiohttp on uvloop (the gateway's server today; `nixl_bench.null_server`) and
granian (a Rust HTTP server with rustls, RSGI interface, one worker on uvloop). The ratio of
their throughputs and their CPU per transfer say what a change of server could buy before any
storage work (issue 14: "the HTTP server chosen by measurement").

Usage: python -m bench.http_servers_bench [--rounds N] [--threads N]
granian is installed on demand into a folder of its own (not a project dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import nixl_bench

GRANIAN_DIR = Path(tempfile.gettempdir()) / "kvtier-bench-granian"
GRANIAN_APP = """
OBJECT_BYTES = {size}
body, sink = bytes(OBJECT_BYTES), bytearray(OBJECT_BYTES)


async def app(scope, proto):
    if scope.method == "PUT":
        got = 0
        async for chunk in proto:
            n = min(len(chunk), OBJECT_BYTES - got)
            sink[got : got + n] = chunk[:n]
            got += len(chunk)
        proto.response_bytes(200, [("etag", '"0"')], b"")
    else:
        proto.response_bytes(200, [("content-length", str(OBJECT_BYTES))], body)
"""


def _install_granian() -> None:
    if (GRANIAN_DIR / "granian").is_dir():
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(GRANIAN_DIR), "granian"],
        check=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Granian:
    """granian serving GRANIAN_APP over HTTPS with the bare server's certificate."""

    def __init__(self, cert: str, key: str, threads: int, directory: Path) -> None:
        (directory / "granian_app.py").write_text(GRANIAN_APP.format(size=nixl_bench.OBJECT_BYTES))
        self.port = _free_port()
        env = dict(os.environ, PYTHONPATH=f"{GRANIAN_DIR}:{directory}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", "rsgi", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--runtime-threads", str(threads),
             "--loop", "uvloop", "--log-level", "warning", "--ssl-certificate", cert,
             "--ssl-keyfile", key, "granian_app:app"],
            env=env, cwd=directory, start_new_session=True,  # its workers die with it (close)
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("granian did not start") from None
                time.sleep(0.1)

    def cpu_s(self) -> float:
        """CPU seconds of granian and its worker processes."""
        children = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return sum(nixl_bench.cpu_s(pid) for pid in [self.proc.pid, *map(int, children)])

    def close(self) -> None:
        """Stop granian and its worker processes (one process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="granian runtime threads")
    args = parser.parse_args()
    _install_granian()
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-http-servers-"))
    null = nixl_bench.NullServer(tmp / "pki")
    granian = Granian(null.pki.cert("kvcache"), null.pki.key("kvcache"), args.threads, tmp)
    servers: dict[str, tuple[nixl_bench.NixlWorker, Callable[[], float]]] = {
        "aiohttp": (nixl_bench.NixlWorker(null.params()), lambda: nixl_bench.cpu_s(null.proc.pid)),
        "granian": (
            nixl_bench.NixlWorker(
                dict(null.params(), endpoint_override=f"https://127.0.0.1:{granian.port}")
            ),
            granian.cpu_s,
        ),
    }
    seconds: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in servers}
    cpu: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in servers}
    try:
        for r in range(-1, args.rounds):  # round -1 warms up
            order = list(servers) if r % 2 else list(reversed(servers))
            for name in order:
                worker, cpu_s = servers[name]
                for op in ("write", "read"):
                    before = cpu_s()
                    reply = worker.run(op, r + 1)
                    if r >= 0:
                        seconds[name][op].append(reply["seconds"])
                        cpu[name][op].append(cpu_s() - before)
    finally:
        for worker, _ in servers.values():
            worker.close()
        null.close()
        granian.close()
    batch = nixl_bench.BATCH * nixl_bench.OBJECT_BYTES
    print(f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f}, granian threads {args.threads}")
    for name in servers:
        gbps = {op: batch * len(s) / sum(s) / 1e9 for op, s in seconds[name].items()}
        ms = {op: statistics.median(c) * 1e3 for op, c in cpu[name].items()}
        print(
            f"{name}: write {gbps['write']:.2f} GB/s, read {gbps['read']:.2f} GB/s; "
            f"server CPU per transfer write {ms['write']:.0f} ms, read {ms['read']:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
