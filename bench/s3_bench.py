"""The S3 API on a dev cluster through boto3: PUT/GET throughput of 4 MiB and 64 MiB objects at
concurrency 1 and 8, 4 KiB PUT/GET ops/s with p50/p99, next to the same objects through the
gRPC API (`kvtier.ObjectClient`), the HTTP stack alone (an aiohttp server on uvloop that keeps
nothing, driven by the same boto3 client) and the loopback TCP ceiling, all in one run.

Usage: python -m bench.s3_bench [--quick] [--no-doc]
Writes bench/results/s3.json and, unless --no-doc, docs/img/s3.png and the `s3` section of
docs/benchmarks.md. `make bench` runs it through bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from botocore.config import Config

from bench import ceilings, object_bench

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024
SIZES = (4 * MIB, 64 * MIB)
CONCURRENCY = (1, 8)
HEADING = "S3 API: boto3 against the dev cluster"


def _client(
    endpoint: str, access_key: str, secret_key: str, ca_file: str = "", *,
    unsigned_payload: bool = False,
) -> Any:  # fmt: skip
    """boto3 as a user configures it: path style, the cluster's CA for an https endpoint.
    `unsigned_payload`: send `x-amz-content-sha256: UNSIGNED-PAYLOAD` (no SHA-256 of bodies in
    the client, over HTTP too) and validate response checksums only when required."""
    s3: dict[str, Any] = {"addressing_style": "path"}
    if unsigned_payload:
        s3["payload_signing_enabled"] = False
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, region_name="us-east-1", verify=ca_file or None,
        config=Config(
            s3=s3, max_pool_connections=16, retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required" if unsigned_payload else None,
        ),
    )  # fmt: skip


def _throughput(
    client: Any, bucket: str, size: int, concurrency: int, total: int, data: bytes
) -> dict[str, float]:
    """GB/s of PUTs then GETs of `size` objects, `concurrency` at a time, `total` bytes each."""
    count = max(concurrency, total // size)
    keys = [f"t/{size}/{concurrency}/{i}" for i in range(count)]
    digest = hashlib.md5(data).hexdigest()

    def put(key: str) -> None:
        etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        assert etag.strip('"') == digest

    def get(key: str) -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(body) == size
        assert hashlib.md5(body).hexdigest() == digest

    result = {}
    for name, op in (("put", put), ("get", get)):
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            list(pool.map(op, keys))
            result[name] = count * size / (time.perf_counter() - started) / 1e9
    return result


def _small_ops(client: Any, bucket: str, count: int) -> dict[str, float]:
    """4 KiB PUT and GET one at a time: ops/s, p50 and p99 in ms."""
    data = os.urandom(4 * KIB)
    out: dict[str, float] = {}
    for name in ("put", "get"):
        latencies = []
        started = time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            if name == "put":
                client.put_object(Bucket=bucket, Key=f"small/{i}", Body=data)
            else:
                assert client.get_object(Bucket=bucket, Key=f"small/{i}")["Body"].read() == data
            latencies.append(time.perf_counter() - t0)
        out[f"{name}_ops"] = count / (time.perf_counter() - started)
        out[f"{name}_p50_ms"] = float(np.percentile(latencies, 50) * 1e3)
        out[f"{name}_p99_ms"] = float(np.percentile(latencies, 99) * 1e3)
    return out


def _grpc_throughput(
    cluster: object_bench.DevCluster, size: int, total: int, data: bytes
) -> dict[str, float]:
    from kvtier import errors, objects

    gateway, sec = cluster.info["gateway_grpc"], cluster.user.security()
    with objects.ObjectClient.connect(gateway, security=sec) as client:
        with contextlib.suppress(errors.AlreadyExists):
            client.create_bucket("grpc-bench")
        count = max(1, total // size)
        started = time.perf_counter()
        for i in range(count):
            client.put_object("grpc-bench", f"g/{size}/{i}", data)
        put = count * size / (time.perf_counter() - started) / 1e9
        buffer = bytearray(size)
        started = time.perf_counter()
        for i in range(count):
            client.get_object_into("grpc-bench", f"g/{size}/{i}", buffer)
        get = count * size / (time.perf_counter() - started) / 1e9
        assert hashlib.md5(buffer).digest() == hashlib.md5(data).digest()
    return {"put": put, "get": get}


class _NullS3:
    """An aiohttp server on uvloop that reads PUT bodies and discards them, and answers GETs
    with preallocated bytes: the HTTP stack's own cost, with no storage behind it."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.bodies = {size: os.urandom(size) for size in sizes}
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        import uvloop
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method == "PUT":
                while await request.content.readany():
                    pass
                return web.Response(headers={"ETag": '"0"'})
            size = int(request.path.rsplit("/", 1)[1])
            return web.Response(body=self.bodies[size])

        async def main() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await asyncio.Event().wait()

        uvloop.run(main())


def _null_throughput(port: int, size: int, total: int, data: bytes) -> dict[str, float]:
    client = _client(f"http://127.0.0.1:{port}", "AK", "SECRETSECRET")
    count = max(1, total // size)
    result = {}
    started = time.perf_counter()
    for i in range(count):
        client.put_object(Bucket="null", Key=f"{i}/{size}", Body=data)
    result["put"] = count * size / (time.perf_counter() - started) / 1e9
    started = time.perf_counter()
    for _ in range(count):
        client.get_object(Bucket="null", Key=f"x/{size}")["Body"].read()
    result["get"] = count * size / (time.perf_counter() - started) / 1e9
    return result


def run_s3_bench(quick: bool) -> dict[str, Any]:
    """Measure everything (see the module docstring)."""
    total = 256 * MIB if quick else 1024 * MIB
    small = 100 if quick else 400
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "ceilings": {"loopback_tcp_gbps": ceilings.raw_socket_gbps(total_bytes=total * 2)},
    }
    null = _NullS3(SIZES)
    null.start()
    data = {size: np.random.default_rng(size).bytes(size) for size in SIZES}
    result["http_stack"] = {
        str(size): _null_throughput(null.port, size, total, data[size]) for size in SIZES
    }
    state = Path(tempfile.mkdtemp(prefix="kvtier-s3-bench-"))
    cluster = object_bench.DevCluster(state)
    try:
        info = cluster.start()
        client = _client(
            info["gateway_s3"],
            info["s3_access_key"],
            info["s3_secret_key"],
            info.get("ca_file", ""),
        )
        client.create_bucket(Bucket="s3-bench")
        result["scheme"] = str(info["gateway_s3"]).split("://", 1)[0]
        result["s3"] = {
            f"{size}/{c}": _throughput(client, "s3-bench", size, c, total, data[size])
            for size in SIZES
            for c in CONCURRENCY
        }
        result["small"] = _small_ops(client, "s3-bench", small)
        result["grpc"] = {
            str(size): _grpc_throughput(cluster, size, total, data[size]) for size in SIZES
        }
    finally:
        cluster.stop()
    result["targets"] = []
    return result


def render(r: dict[str, Any]) -> str:
    """The markdown section."""
    loop = r["ceilings"]["loopback_tcp_gbps"]
    lines = [
        f"Run {r['when']} on {r['machine']}. boto3 {boto3.__version__} over "
        f"{r.get('scheme', 'http').upper()} (SigV4, signed payloads: "
        "the client hashes every body with SHA-256), path style, one client process with "
        "threads; the gRPC API as a tenant user (TLS, session token). Loopback TCP ceiling "
        f"(one stream, two processes) in the same run: {loop:.2f} GB/s. *HTTP stack* is an "
        "aiohttp server on uvloop (plain HTTP) that discards PUT bodies and serves GETs from "
        "memory, driven by the same boto3 client: what is left for storage (and TLS) is the "
        "difference; what HTTPS costs alone: the security section.",
        "",
        "| object | conc. | S3 PUT GB/s | S3 GET GB/s | HTTP stack PUT / GET "
        "| gRPC API PUT / GET (conc. 1) | S3 GET / gRPC GET | S3 GET / loopback |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, v in r["s3"].items():
        size, conc = (int(x) for x in key.split("/"))
        http = r["http_stack"][str(size)]
        grpc = r["grpc"][str(size)]
        lines.append(
            f"| {size // MIB} MiB | {conc} | {v['put']:.2f} | {v['get']:.2f} | "
            f"{http['put']:.2f} / {http['get']:.2f} | {grpc['put']:.2f} / {grpc['get']:.2f} | "
            f"{v['get'] / grpc['get']:.2f} | {v['get'] / loop:.2f} |"
        )
    s = r["small"]
    lines += [
        "",
        f"4 KiB objects, one at a time: PUT {s['put_ops']:.0f}/s (p50 {s['put_p50_ms']:.1f} ms, "
        f"p99 {s['put_p99_ms']:.1f} ms), GET {s['get_ops']:.0f}/s (p50 {s['get_p50_ms']:.1f} ms, "
        f"p99 {s['get_p99_ms']:.1f} ms).",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Bars of S3 and gRPC throughput by object size (concurrency 1 and 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, op in zip(axes, ("put", "get"), strict=True):
        labels, values = [], []
        for key, v in r["s3"].items():
            size, conc = (int(x) for x in key.split("/"))
            labels.append(f"S3 {size // MIB}M c{conc}")
            values.append(v[op])
        for size, v in r["grpc"].items():
            labels.append(f"gRPC {int(size) // MIB}M c1")
            values.append(v[op])
        for size, v in r["http_stack"].items():
            labels.append(f"HTTP {int(size) // MIB}M")
            values.append(v[op])
        ax.barh(labels, values)
        ax.axvline(
            r["ceilings"]["loopback_tcp_gbps"], color="red", linestyle="--", label="loopback"
        )
        ax.set_title(op.upper())
        ax.set_xlabel("GB/s")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_section(quick: bool, write_doc: Callable[[str, str, str], None] | None) -> dict[str, Any]:
    """What `make bench` runs."""
    result = run_s3_bench(quick)
    out = ROOT / "bench" / "results" / "s3.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot(result, ROOT / "docs" / "img" / "s3.png")
        write_doc("s3", HEADING, render(result) + "\n\n![S3 throughput](img/s3.png)")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_bench")
    parser.add_argument("--quick", action="store_true", help="less data (smoke test)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc

        write_doc = update_doc
    print(render(run_section(args.quick, write_doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
