"""NIXL's OBJ backend (what vLLM's object tier, Dynamo KVBM's G4 tier and LMCache's nixl store
use) against the S3 gateway of a dev cluster, as the engines drive it: 16 objects of 2 MiB per
transfer, WRITE then READ, into a KV bucket and an ordinary (erasure-coded) bucket, next to
`kvtier.KVClient` over the tcp data plane putting and getting the same 16 x 2 MiB batches, all
rounds interleaved in one run (the ratios are what count: the machine is shared).

Usage: python -m bench.nixl_bench [--quick] [--no-doc] [--rounds N]
Writes bench/results/nixl.json and, unless --no-doc, the `nixl` section of docs/benchmarks.md.
NIXL runs in worker processes of its own (`--worker`: its C++ agent keeps threads), one per
bucket, driven over stdin/stdout.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import object_bench

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
OBJECT_BYTES = 2 * MIB
BATCH = 16
HEADING = "NIXL OBJ against the S3 gateway (KV and ordinary buckets)"
#: Acceptance (issue 14): NIXL OBJ on a KV bucket ≥ this share of KVClient's tcp throughput.
TARGET_RATIO = 0.5
_REPLY = "@nixl-bench "


@functools.cache
def _data(round_: int) -> np.ndarray:
    """The batch of a round: BATCH x OBJECT_BYTES, different every round (made once)."""
    rng = np.random.default_rng(round_)
    return np.frombuffer(rng.bytes(BATCH * OBJECT_BYTES), np.uint8)


# The NIXL worker (its own process).


def _wait(agent: Any, handle: Any) -> str:
    state = agent.transfer(handle)
    deadline = time.monotonic() + 120
    while state == "PROC" and time.monotonic() < deadline:
        time.sleep(0.002)
        state = agent.check_xfer_state(handle)
    return str(state)


def worker(params: dict[str, str]) -> None:
    """Serve "write R" / "read R" lines on stdin: one transfer of BATCH objects each, answered
    with a JSON line {"state", "seconds", "cpu_s" (this process's, NIXL's threads included),
    "md5" (of what was read or written)}."""
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"nixl-bench-{params['bucket']}", nixl_agent_config(backends=[]))
    agent.create_backend("OBJ", params)
    buffer = np.zeros(BATCH * OBJECT_BYTES, np.uint8)
    base = buffer.ctypes.data
    agent.register_memory([(base, buffer.nbytes, 0, "")], "DRAM", backends=["OBJ"])
    objs = [(0, OBJECT_BYTES, i, f"kv/bench/block-{i}") for i in range(BATCH)]
    agent.register_memory(objs, "OBJ", backends=["OBJ"])
    local = agent.get_xfer_descs(
        [(base + i * OBJECT_BYTES, OBJECT_BYTES, 0) for i in range(BATCH)], "DRAM"
    )
    remote = agent.get_xfer_descs([(0, OBJECT_BYTES, i) for i in range(BATCH)], "OBJ")
    handles = {op: agent.initialize_xfer(op, local, remote, agent.name) for op in ("WRITE", "READ")}
    for line in sys.stdin:
        op, round_ = line.split()
        if op == "write":
            buffer[:] = _data(int(round_))
        else:
            buffer[:] = 0
        started, cpu = time.perf_counter(), time.process_time()
        state = _wait(agent, handles[op.upper()])
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        md5 = hashlib.md5(buffer.data).hexdigest()
        reply = json.dumps({"state": state, "seconds": seconds, "cpu_s": cpu, "md5": md5})
        sys.stdout.write(_REPLY + reply + "\n")  # NIXL logs to stdout too
        sys.stdout.flush()


class NixlWorker:
    """A worker process for one bucket."""

    def __init__(self, params: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.nixl_bench", "--worker", json.dumps(params)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip

    def run(self, op: str, round_: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{op} {round_}\n")
        self.proc.stdin.flush()
        line = ""
        while not line.startswith(_REPLY):
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the NIXL worker died (exit {self.proc.wait()})")
        out: dict[str, Any] = json.loads(line[len(_REPLY) :])
        if out["state"] != "DONE":
            raise RuntimeError(f"NIXL {op} ended {out['state']}")
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# The bare HTTP stack: what NIXL gets from an HTTPS server that stores nothing.


def null_server(cert_file: str, key_file: str) -> None:
    """An aiohttp HTTPS server on uvloop (as the gateway's) that copies each PUT body into a
    preallocated buffer and discards it, and answers GETs with OBJECT_BYTES from memory; prints
    its port, serves until killed. With the gateway's malloc thresholds (`heap.tune`): glibc's
    initial ones cost a bare server ~20 ms more per 32 MiB written (docs/benchmarks.md)."""
    import asyncio
    import ssl

    import uvloop
    from aiohttp import web

    from services.gateway import heap

    heap.tune()
    body, sink = bytes(OBJECT_BYTES), bytearray(OBJECT_BYTES)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "PUT":
            got = 0
            while chunk := await request.content.readany():
                sink[got : got + len(chunk)] = chunk[: OBJECT_BYTES - got]
                got += len(chunk)
            return web.Response(headers={"ETag": '"0"'})
        return web.Response(body=body)

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sys.stdout.write(f"{port}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()

    uvloop.run(main())


class NullServer:
    """`null_server` in a process of its own, with a certificate of a throwaway CA."""

    def __init__(self, directory: Path) -> None:
        from bench import secure

        self.pki = secure.StandalonePKI(directory)
        argv = ["--null-server", self.pki.cert("kvcache"), self.pki.key("kvcache")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.nixl_bench", *argv],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def params(self) -> dict[str, str]:
        return {
            "bucket": "null", "endpoint_override": f"https://127.0.0.1:{self.port}",
            "scheme": "https", "region": "us-east-1", "use_virtual_addressing": "false",
            "access_key": "AK", "secret_key": "SK", "ca_bundle": self.pki.ca_file,
        }  # fmt: skip

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The run.


def _params(info: dict[str, Any], bucket: str) -> dict[str, str]:
    """The OBJ backend's parameters (as tests/integration/s3_cluster.py nixl_params)."""
    url = urllib.parse.urlparse(info["gateway_s3"])
    params = {
        "bucket": bucket, "endpoint_override": info["gateway_s3"], "scheme": url.scheme,
        "region": "us-east-1", "use_virtual_addressing": "false",
        "access_key": info["s3_access_key"], "secret_key": info["s3_secret_key"],
    }  # fmt: skip
    if url.scheme == "https":
        params["ca_bundle"] = info["ca_file"]
    return params


def _create_buckets(info: dict[str, Any]) -> None:
    from bench import s3_bench

    s3 = s3_bench._client(
        info["gateway_s3"], info["s3_access_key"], info["s3_secret_key"], info.get("ca_file", "")
    )

    def kind_header(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.create_bucket(Bucket="nixl-objects")
    s3.meta.events.register("before-sign.s3.CreateBucket", kind_header)
    s3.create_bucket(Bucket="nixl-kv")


def _kv_round(client: Any, round_: int) -> dict[str, float]:
    """KVClient over tcp: put then get one batch (seconds each), the get checked."""
    data = _data(round_)
    blocks = [data[i * OBJECT_BYTES : (i + 1) * OBJECT_BYTES] for i in range(BATCH)]
    keys = [b"nixl-bench/%d" % i for i in range(BATCH)]
    started = time.perf_counter()
    client.put_batch(keys, blocks, overwrite=True)
    put = time.perf_counter() - started
    out = np.zeros_like(data)
    views = [out[i * OBJECT_BYTES : (i + 1) * OBJECT_BYTES] for i in range(BATCH)]
    started = time.perf_counter()
    sizes = client.get_batch(keys, views)
    get = time.perf_counter() - started
    assert sizes == [OBJECT_BYTES] * BATCH, sizes
    assert hashlib.md5(out.data).digest() == hashlib.md5(data.data).digest()
    return {"put": put, "get": get}


def _nixl_round(
    worker_: NixlWorker, round_: int, *, server: int = 0, check_read: bool = True
) -> dict[str, float]:
    """One NIXL write and read of a batch (seconds; with `server`, that process's CPU seconds
    for each as put_cpu and get_cpu)."""
    digest = hashlib.md5(_data(round_).data).hexdigest()
    out: dict[str, float] = {}
    for op, name in (("write", "put"), ("read", "get")):
        before = cpu_s(server) if server else 0.0
        reply = worker_.run(op, round_)
        if server:
            out[f"{name}_cpu"] = cpu_s(server) - before
        out[name] = reply["seconds"]
        if op == "write" or check_read:
            assert reply["md5"] == digest, f"NIXL {op} moved other bytes"
    return out


def run_nixl_bench(quick: bool, rounds: int | None = None) -> dict[str, Any]:
    """Measure everything (see the module docstring)."""
    import kvtier

    rounds = rounds or (4 if quick else 12)
    state = Path(tempfile.mkdtemp(prefix="kvtier-nixl-bench-"))
    cluster = object_bench.DevCluster(state)
    seconds: dict[str, dict[str, list[float]]] = {
        name: {"put": [], "get": []} for name in ("kv_tcp", "nixl_kv", "nixl_objects")
    }
    seconds["nixl_null"] = {"put": [], "get": []}
    server_cpu: dict[str, dict[str, list[float]]] = {
        name: {"put": [], "get": []} for name in ("nixl_kv", "nixl_null")
    }
    workers: dict[str, NixlWorker] = {}
    null = NullServer(state / "null-pki")
    try:
        info = cluster.start()
        gateway = next(pid for name, pid in cluster.pids().items() if "gateway" in name)
        servers = {"nixl_kv": gateway, "nixl_null": null.proc.pid}
        _create_buckets(info)
        client = kvtier.KVClient.connect(
            metadata=info["metadata_client"], namespace="nixl-bench", transports=["tcp"],
            timeout_s=30.0, security=cluster.user.security(),
        )  # fmt: skip
        workers = {
            "nixl_kv": NixlWorker(_params(info, "nixl-kv")),
            "nixl_objects": NixlWorker(_params(info, "nixl-objects")),
            "nixl_null": NixlWorker(null.params()),
        }
        steps: dict[str, Callable[[int], dict[str, float]]] = {
            "kv_tcp": lambda r: _kv_round(client, r),
            "nixl_kv": lambda r: _nixl_round(workers["nixl_kv"], r, server=servers["nixl_kv"]),
            "nixl_objects": lambda r: _nixl_round(workers["nixl_objects"], r),
            "nixl_null": lambda r: _nixl_round(
                workers["nixl_null"], r, server=servers["nixl_null"], check_read=False
            ),
        }
        order = list(steps)
        for r in range(-1, rounds):  # round -1 warms up (connections, first allocations)
            print(f"  round {r}", file=sys.stderr, flush=True)
            for name in order[r % len(order) :] + order[: r % len(order)]:
                got = steps[name](r + 1)
                if r >= 0:
                    for op, s in got.items():
                        if op.endswith("_cpu"):
                            server_cpu[name][op[: -len("_cpu")]].append(s)
                        else:
                            seconds[name][op].append(s)
        client.close()
    finally:
        for w in workers.values():
            w.close()
        null.close()
        cluster.stop()
    result = _summarize(seconds, rounds)
    result["server_cpu_ms"] = {
        name: {op: statistics.median(s) * 1e3 for op, s in ops.items()}
        for name, ops in server_cpu.items()
    }
    return result


def _summarize(seconds: dict[str, dict[str, list[float]]], rounds: int) -> dict[str, Any]:
    batch_bytes = BATCH * OBJECT_BYTES
    gbps = {
        name: {op: batch_bytes * len(s) / sum(s) / 1e9 for op, s in ops.items()}
        for name, ops in seconds.items()
    }
    median_ms = {
        name: {op: statistics.median(s) * 1e3 for op, s in ops.items()}
        for name, ops in seconds.items()
    }
    # Per round, the same batch through both: the median of those ratios (load that comes and
    # goes on a shared machine hits both sides of a round alike).
    paired = {
        name: {
            op: statistics.median(k / t for k, t in zip(seconds["kv_tcp"][op], s, strict=True))
            for op, s in ops.items()
        }
        for name, ops in seconds.items()
        if name != "kv_tcp"
    }
    targets = []
    for op, what in (("put", "write"), ("get", "read")):
        ratio = paired["nixl_kv"][op]
        targets.append(
            {
                "target": f"NIXL OBJ KV-bucket {what}, 2 MiB × 16 ≥ {TARGET_RATIO:.0%} of "
                f"KVClient tcp {op}",
                "ratio": ratio,
                "ok": ratio >= TARGET_RATIO,
            }
        )
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "object_bytes": OBJECT_BYTES,
        "batch": BATCH,
        "rounds": rounds,
        "gbps": gbps,
        "median_ms": median_ms,
        "ratio_to_kv_tcp": paired,
        "seconds": seconds,
        "targets": targets,
    }


def render(r: dict[str, Any]) -> str:
    """The markdown section."""
    names = {
        "kv_tcp": "KVClient, tcp data plane",
        "nixl_kv": "NIXL OBJ → KV bucket",
        "nixl_objects": "NIXL OBJ → ordinary bucket",
        "nixl_null": "NIXL OBJ → bare HTTPS server (stores nothing)",
    }
    g, m, p = r["gbps"], r["median_ms"], r["ratio_to_kv_tcp"]
    cpu = r.get("server_cpu_ms", {})
    lines = [
        f"Run {r['when']} on {r['machine']}: {r['rounds']} rounds, each one transfer of "
        f"{r['batch']} × {r['object_bytes'] // MIB} MiB per client, write then read, the "
        "clients' order rotating every round; reads checked byte for byte. NIXL (the `nixl` "
        "package's OBJ backend, AWS SDK for C++) over HTTPS with the cluster's CA, one agent "
        "process per bucket; `kvtier.KVClient` as the bench tenant's user (TLS). The bare "
        "HTTPS server is aiohttp on uvloop, as the gateway's, copying PUT bodies into one "
        "buffer and serving GETs from memory: the HTTP stack's floor. GB/s: all rounds' bytes "
        "over their time; ratio: the median over rounds of KVClient's time / this client's "
        "time for the same batch; server CPU: the gateway's (or the bare server's) CPU per "
        "transfer, median.",
        "",
        "| client | write GB/s | read GB/s | write p50 ms | read p50 ms "
        "| write / read vs KVClient | server CPU ms write / read |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in names.items():
        ratio = f"{p[name]['put']:.2f} / {p[name]['get']:.2f}" if name in p else "1"
        server = cpu.get(name)
        cpu_cell = f"{server['put']:.0f} / {server['get']:.0f}" if server else ""
        lines.append(
            f"| {label} | {g[name]['put']:.2f} | {g[name]['get']:.2f} | "
            f"{m[name]['put']:.0f} | {m[name]['get']:.0f} | {ratio} | {cpu_cell} |"
        )
    lines += ["", "| target | ratio in this run | met |", "|---|---|---|"]
    for check in r["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {'yes' if check['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def run_section(
    quick: bool, write_doc: Callable[[str, str, str], None] | None, rounds: int | None = None
) -> dict[str, Any]:
    """What `make bench` runs."""
    result = run_nixl_bench(quick, rounds)
    out = ROOT / "bench" / "results" / "nixl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot(result, ROOT / "docs" / "img" / "nixl.png")
        write_doc("nixl", HEADING, render(result))
    return result


#: What each client of the run is, on the plot.
_LABELS = {
    "kv_tcp": "KVClient, tcp",
    "nixl_kv": "NIXL OBJ → KV bucket",
    "nixl_objects": "NIXL OBJ → ordinary bucket",
    "nixl_null": "NIXL OBJ → bare HTTPS server",
}


def plot(r: dict[str, Any], path: Path) -> None:
    """docs/img/nixl.png: GB/s of every client, write and read, with the 50% target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in _LABELS if n in r["gbps"]]
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for shift, op in ((-0.2, "put"), (0.2, "get")):
        values = [r["gbps"][n][op] for n in names]
        ax.bar(xs + shift, values, 0.4, label="write" if op == "put" else "read")
        ax.axhline(0.5 * r["gbps"]["kv_tcp"][op], ls="--", lw=1, color="grey")
    ax.set_xticks(xs, [_LABELS[n] for n in names], fontsize=8)
    ax.set_ylabel("GB/s (16 × 2 MiB per transfer)")
    ax.set_title(f"NIXL OBJ against KVClient ({r['when'][:10]}; dashed: 50% of KVClient)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nixl_bench")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 12, quick 4)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--null-server", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.null_server:
        null_server(*args.null_server)
        return 0
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc

        write_doc = update_doc
    result = run_section(args.quick, write_doc, args.rounds or None)
    print(render(result))
    for check in result["targets"]:
        print(f"{'ok  ' if check['ok'] else 'MISS'} {check['target']}: {check['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
