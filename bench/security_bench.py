"""What security costs (issue 13): the same workloads against an insecure dev cluster
(`kvtier up --insecure`) and a secure one of the same shape, in one run, as ratios.

Both clusters (6 datanodes x 2 drives, 1 kvcache node, metadata, gateway; all on 127.0.0.1) run
at once, and every workload alternates between them in short rounds (A B B A ...), so that what
other jobs on the machine do falls on both sides alike. Clients are kvtier's SDK and boto3 in
this process, configured as users configure them:

- KV 64 KiB get p50 (one key per call, into a preallocated buffer) and 2 MiB throughput (put,
  then get, batches of 16 blocks): secure = a tenant user (TLS + session token on the control
  plane, data-plane session minted from the token) over tcp, and a user trusted for shared
  memory (`--trust-shm`) over shm; insecure = no TLS, no credential, the same transport.
- S3 64 MiB PUT and GET with boto3 (SigV4): HTTPS with the cluster CA vs plain HTTP.
- A tiny gRPC RPC (NodeService.GetNodeInfo on the kvcache node) p50: plaintext vs TLS + a
  user's session token (client port) vs mutual TLS with the operator certificate (service port).
- The session-token exchange (`TokenSource`: a new TLS channel, a signed request, the HMAC check
  and an ECDSA-signed token) p50, which a client pays once per token lifetime (15 min, renewed
  at 80 %) and the first time it connects.

Usage: python -m bench.security_bench [--quick] [--no-doc]
Writes bench/results/security.json and, unless --no-doc, docs/img/security.png and the
`security` section of docs/benchmarks.md. `make bench` runs it through bench/run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common as bench_common
from bench import object_bench, s3_bench, secure

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024
#: The object bench's shape (one RS 8+4 set).
SHAPE = ("--datanodes", "6", "--drives-per-datanode", "2", "--kvcache-nodes", "1")
SIDES = ("insecure", "secure")
HEADING = "Security: what authentication and TLS cost"
LATENCY_BLOCK = 64 * KIB
THROUGHPUT_BLOCK = 2 * MIB
BATCH = 16  # 2 MiB blocks per batch (32 MiB)
S3_OBJECT = 64 * MIB
#: The issue's targets, as ratios secure / insecure within the run.
LATENCY_RATIO_MAX = 1.1
THROUGHPUT_RATIO_MIN = 0.95


@dataclass(frozen=True)
class Settings:
    rounds: int  # KV and RPC rounds (short: many pairs make the median ratio steady)
    latency_samples: int  # per side and transport, over all rounds
    kv_batches: int  # 2 MiB batches put and got per side, transport and round
    s3_rounds: int
    s3_objects: int  # 64 MiB objects per side and S3 round
    rpc_samples: int
    token_samples: int


QUICK = Settings(
    rounds=30, latency_samples=3000, kv_batches=1, s3_rounds=6, s3_objects=1, rpc_samples=1500,
    token_samples=40,
)  # fmt: skip
FULL = Settings(
    rounds=60, latency_samples=6000, kv_batches=1, s3_rounds=12, s3_objects=1, rpc_samples=3000,
    token_samples=100,
)  # fmt: skip


@dataclass
class Side:
    """One cluster and the clients of the run against it."""

    name: str
    cluster: object_bench.DevCluster
    users: dict[str, secure.BenchUser] = field(default_factory=dict)
    kv: dict[str, Any] = field(default_factory=dict)  # transport -> kvtier.KVClient
    s3: Any = None
    kvcache: Any = None  # the kvcache node's NodeInfo

    @property
    def info(self) -> dict[str, Any]:
        return self.cluster.info


def _order(rounds: int) -> Iterator[tuple[int, str]]:
    """A B B A A B ...: each side goes first every other round."""
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            yield r, side


# Set-up.


def _start(side: str, work: Path) -> Side:
    args = (*SHAPE, "--insecure") if side == "insecure" else SHAPE
    cluster = object_bench.DevCluster(work / side, *args)
    made = Side(side, cluster)
    cluster.start()
    made.users = {
        "tcp": secure.add_user(cluster.state, "bench-tcp"),
        "shm": secure.add_user(cluster.state, "bench-shm", trusted=True),
    }
    made.kvcache = asyncio.run(_kvcache_node(cluster))
    return made


async def _kvcache_node(cluster: object_bench.DevCluster) -> Any:
    from kvtier.clients import metadata as metadata_client
    from kvtier.proto.common.v1 import common_pb2

    operator = secure.operator_security(cluster.state)
    async with metadata_client.MetadataClient(cluster.info["metadata"], security=operator) as c:
        cmap = await c.get_cluster_map()
    assert cmap is not None
    return next(n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_KVCACHE)


def _connect(side: Side) -> None:
    import kvtier

    for transport, user in side.users.items():
        side.kv[transport] = kvtier.KVClient.connect(
            metadata=side.info["metadata_client"], namespace="security-bench",
            transports=[transport], timeout_s=30.0, security=user.security(),
        )  # fmt: skip
    info = side.info
    side.s3 = s3_bench._client(
        info["gateway_s3"], info["s3_access_key"], info["s3_secret_key"], info.get("ca_file", "")
    )
    side.s3.create_bucket(Bucket="security-bench")


def _close(side: Side) -> None:
    for client in side.kv.values():
        with contextlib.suppress(Exception):
            client.close()


# Workloads.


def kv_latency(sides: dict[str, Side], transport: str, s: Settings) -> dict[str, Any]:
    """64 KiB single-key get latency (µs) per side, rounds interleaved; the ratio is the median
    over rounds of secure p50 / insecure p50."""
    samples: dict[str, list[list[float]]] = {name: [] for name in SIDES}
    block = np.random.default_rng(64).integers(0, 256, LATENCY_BLOCK, dtype=np.uint8)
    out = np.empty(LATENCY_BLOCK, np.uint8)
    keys = [b"lat-%d" % i for i in range(32)]
    for side in sides.values():
        side.kv[transport].put_batch(keys, [block] * len(keys), overwrite=True)
    per_round = max(1, s.latency_samples // s.rounds)
    for _, name in _order(s.rounds):
        client, got = sides[name].kv[transport], []
        for i in range(per_round + 20):
            key = keys[i % len(keys)]
            started = time.perf_counter()
            sizes = client.get_batch([key], [out])
            elapsed = time.perf_counter() - started
            if sizes[0] != LATENCY_BLOCK:
                raise RuntimeError(f"{name}: get {key!r}: {sizes[0]} bytes")
            if i >= 20:  # the first gets of a round warm the path
                got.append(elapsed * 1e6)
        samples[name].append(got)
    if not np.array_equal(out, block):
        raise RuntimeError("64 KiB gets returned other bytes")
    result: dict[str, Any] = {name: _percentiles(rounds) for name, rounds in samples.items()}
    result["ratio"] = {"p50": _median_ratio(result, "rounds_p50")}
    return result


def kv_throughput(sides: dict[str, Side], transport: str, s: Settings) -> dict[str, Any]:
    """2 MiB put / get GB/s per side (batches of BATCH blocks), rounds interleaved; every get
    compared. The ratio is the median over rounds of secure / insecure."""
    rng = np.random.default_rng(2)
    blocks = [rng.integers(0, 256, THROUGHPUT_BLOCK, dtype=np.uint8) for _ in range(BATCH)]
    outs = [np.empty(THROUGHPUT_BLOCK, np.uint8) for _ in range(BATCH)]

    def one_round(name: str, r: int) -> dict[str, float]:
        client, seconds = sides[name].kv[transport], {"put": 0.0, "get": 0.0}
        for b in range(s.kv_batches):
            keys = [b"tp-%d-%d-%d" % (r, b, i) for i in range(BATCH)]
            started = time.perf_counter()
            statuses = client.put_batch(keys, blocks)
            seconds["put"] += time.perf_counter() - started
            if any(str(st) != "stored" for st in statuses):
                raise RuntimeError(f"{name}: put: {sorted({str(st) for st in statuses})}")
            started = time.perf_counter()
            sizes = client.get_batch(keys, outs)
            seconds["get"] += time.perf_counter() - started
            if sizes != [THROUGHPUT_BLOCK] * BATCH or not all(
                np.array_equal(o, k) for o, k in zip(outs, blocks, strict=True)
            ):
                raise RuntimeError(f"{name}: 2 MiB gets returned other bytes")
            client.delete(keys)
        moved = s.kv_batches * BATCH * THROUGHPUT_BLOCK
        return {op: moved / t / 1e9 for op, t in seconds.items()}

    for name in SIDES:  # untimed: the first batch pays for connections and page faults
        one_round(name, -1)
    return _rates(one_round, s.rounds)


def s3_throughput(sides: dict[str, Side], s: Settings) -> dict[str, Any]:
    """64 MiB PUT / GET GB/s per side with boto3, rounds interleaved; every GET compared."""
    data = np.random.default_rng(64).bytes(S3_OBJECT)
    digest = hashlib.md5(data).hexdigest()

    def one_round(name: str, r: int) -> dict[str, float]:
        client, seconds = sides[name].s3, {"put": 0.0, "get": 0.0}
        for i in range(s.s3_objects):
            key = f"o/{r}/{i}"
            started = time.perf_counter()
            etag = client.put_object(Bucket="security-bench", Key=key, Body=data)["ETag"]
            seconds["put"] += time.perf_counter() - started
            started = time.perf_counter()
            body = client.get_object(Bucket="security-bench", Key=key)["Body"].read()
            seconds["get"] += time.perf_counter() - started
            if etag.strip('"') != digest or hashlib.md5(body).hexdigest() != digest:
                raise RuntimeError(f"{name}: S3 object {key} came back different")
            client.delete_object(Bucket="security-bench", Key=key)
        return {op: s.s3_objects * S3_OBJECT / t / 1e9 for op, t in seconds.items()}

    for name in SIDES:  # untimed: connections (the TLS handshake) and the gateway's pools
        sides[name].s3.put_object(Bucket="security-bench", Key="warm", Body=data[: 4 * MIB])
        sides[name].s3.get_object(Bucket="security-bench", Key="warm")["Body"].read()
    return _rates(one_round, s.s3_rounds)


def _rates(one_round: Callable[[str, int], dict[str, float]], rounds: int) -> dict[str, Any]:
    """Throughput rounds, interleaved: per side the median of each op's rounds, and per op the
    median over rounds of secure / insecure."""
    got: dict[str, list[dict[str, float]]] = {name: [] for name in SIDES}
    for r, name in _order(rounds):
        got[name].append(one_round(name, r))
    result: dict[str, Any] = {}
    for name, per_round in got.items():
        result[name] = {op: float(np.median([g[op] for g in per_round])) for op in ("put", "get")}
        result[name]["rounds"] = per_round
    result["ratio"] = {
        op: float(np.median([s[op] / i[op] for s, i in zip(got["secure"], got["insecure"],
                                                          strict=True)]))
        for op in ("put", "get")
    }  # fmt: skip
    return result


async def _rpc_samples(address: str, count: int, **client: Any) -> list[float]:
    from kvtier.clients import node as node_client

    async with node_client.NodeClient(address, **client) as probe:
        for _ in range(20):
            await probe.get_node_info()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await probe.get_node_info()
            samples.append((time.perf_counter() - started) * 1e6)
    return samples


def tiny_rpc(sides: dict[str, Side], s: Settings) -> dict[str, Any]:
    """GetNodeInfo latency (µs): plaintext, TLS + session token, mutual TLS; rounds
    interleaved; each way's ratio to plaintext is the median over rounds of the p50s."""
    from kvtier import security

    insecure, safe = sides["insecure"], sides["secure"]
    user = safe.users["tcp"].security()
    tokens = security.token_source(user, safe.info["metadata_client"])
    plain = insecure.users["tcp"].security()
    ways: dict[str, tuple[str, dict[str, Any]]] = {
        "plaintext": (insecure.kvcache.grpc_address, {"security": plain}),
        "TLS + session token (user)": (
            safe.kvcache.client_address, {"security": user, "tokens": tokens}
        ),
        "mutual TLS (operator)": (
            safe.kvcache.grpc_address, {"security": secure.operator_security(safe.cluster.state)}
        ),
    }  # fmt: skip
    samples: dict[str, list[list[float]]] = {name: [] for name in ways}
    per_round = max(1, s.rpc_samples // s.rounds)
    for r in range(s.rounds):
        for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
            address, client = ways[name]
            samples[name].append(asyncio.run(_rpc_samples(address, per_round, **client)))
    result: dict[str, Any] = {name: _percentiles(rounds) for name, rounds in samples.items()}
    base = result["plaintext"]["rounds_p50"]
    result["ratio"] = {
        name: float(np.median([v / b for v, b in zip(result[name]["rounds_p50"], base,
                                                     strict=True)]))
        for name in ways
    }  # fmt: skip
    return result


def token_exchange(sides: dict[str, Side], s: Settings) -> dict[str, Any]:
    """A fresh session token, as `TokenSource` fetches one: p50 / p99 (ms); and the cached
    path (a token still valid) p50 (µs)."""
    from kvtier import security

    safe = sides["secure"]
    source = security.TokenSource(safe.users["tcp"].security(), safe.info["metadata_client"])

    async def fetch() -> tuple[list[float], list[float]]:
        fresh, cached = [], []
        for i in range(s.token_samples + 3):
            source.invalidate()
            started = time.perf_counter()
            await source.token()
            if i >= 3:
                fresh.append((time.perf_counter() - started) * 1e3)
        for _ in range(1000):
            started = time.perf_counter()
            await source.token()
            cached.append((time.perf_counter() - started) * 1e6)
        return fresh, cached

    fresh, cached = asyncio.run(fetch())
    return {"fresh_ms": _percentiles([fresh]), "cached_us": _percentiles([cached])}


def _percentiles(rounds: list[list[float]]) -> dict[str, Any]:
    """p50 / p99 of every sample, and the p50 of each round."""
    values = [v for r in rounds for v in r]
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "n": len(values),
        "rounds_p50": [float(np.percentile(r, 50)) for r in rounds],
    }


def _median_ratio(result: dict[str, Any], key: str) -> float:
    """The median over rounds of secure / insecure (each round's pair ran back to back)."""
    pairs = zip(result["secure"][key], result["insecure"][key], strict=True)
    return float(np.median([s / i for s, i in pairs]))


# The run.


def run_security_bench(quick: bool) -> dict[str, Any]:
    """Start both clusters, measure, stop them (always)."""
    s = QUICK if quick else FULL
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kvtier-secbench-"))
    result: dict[str, Any] = {
        "machine": bench_common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": s.__dict__,
        "shape": " ".join(SHAPE),
        "load_average_start": os.getloadavg()[0],
    }
    sides: dict[str, Side] = {}
    try:
        for name in SIDES:
            print(f"security bench: starting the {name} cluster ...", file=sys.stderr, flush=True)
            sides[name] = _start(name, work)
            _connect(sides[name])
        result["s3_scheme"] = {n: str(sides[n].info["gateway_s3"]).split(":")[0] for n in SIDES}
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("kv_latency_tcp", lambda: kv_latency(sides, "tcp", s)),
            ("kv_latency_shm", lambda: kv_latency(sides, "shm", s)),
            ("kv_throughput_tcp", lambda: kv_throughput(sides, "tcp", s)),
            ("kv_throughput_shm", lambda: kv_throughput(sides, "shm", s)),
            ("s3", lambda: s3_throughput(sides, s)),
            ("rpc", lambda: tiny_rpc(sides, s)),
            ("token", lambda: token_exchange(sides, s)),
        ]
        for name, step in steps:
            print(f"  {name}", file=sys.stderr, flush=True)
            result[name] = step()
    finally:
        for side in sides.values():
            _close(side)
            side.cluster.stop()
        for name in SIDES:
            if name not in sides:  # a start that failed half-way
                object_bench.DevCluster(work / name).stop()
        shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = time.perf_counter() - started
    result["load_average_end"] = os.getloadavg()[0]
    result["targets"] = targets(result)
    return result


def _ratio(r: dict[str, Any], step: str, key: str) -> float:
    return float(r[step]["ratio"][key])


def _spread(r: dict[str, Any], step: str, key: str) -> str:
    """The middle half (25th-75th percentile) of the per-round ratios behind _ratio: how much
    the machine moved the pairs."""
    result = r[step]
    if step.startswith("kv_latency"):
        pairs = zip(result["secure"]["rounds_p50"], result["insecure"]["rounds_p50"], strict=True)
        ratios = [a / b for a, b in pairs]
    elif step == "rpc":
        pairs = zip(result[key]["rounds_p50"], result["plaintext"]["rounds_p50"], strict=True)
        ratios = [a / b for a, b in pairs]
    else:
        pairs = zip(result["secure"]["rounds"], result["insecure"]["rounds"], strict=True)
        ratios = [a[key] / b[key] for a, b in pairs]
    low, high = np.percentile(ratios, [25, 75])
    return f"{low:.2f}–{high:.2f}"


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's cost targets as ratios secure / insecure in this run."""
    checks = []
    for transport in ("tcp", "shm"):
        ratio = _ratio(r, f"kv_latency_{transport}", "p50")
        what = f"64 KiB KV get p50 with auth ≤ {LATENCY_RATIO_MAX}× without ({transport})"
        checks.append(_check(what, ratio, ratio <= LATENCY_RATIO_MAX))
        for op in ("put", "get"):
            ratio = _ratio(r, f"kv_throughput_{transport}", op)
            what = f"2 MiB KV {op} with auth ≥ {THROUGHPUT_RATIO_MIN}× without ({transport})"
            checks.append(_check(what, ratio, ratio >= THROUGHPUT_RATIO_MIN))
    scheme = r["s3_scheme"]["secure"].upper()
    for op in ("put", "get"):
        ratio = _ratio(r, "s3", op)
        what = f"S3 64 MiB {op.upper()} over {scheme} ≥ {THROUGHPUT_RATIO_MIN}× plain HTTP"
        checks.append(_check(what, ratio, ratio >= THROUGHPUT_RATIO_MIN))
    return checks


def _check(what: str, ratio: float, ok: bool) -> dict[str, Any]:
    return {"target": f"security: {what}", "ratio": ratio, "ok": ok}


# The report.


def render(r: dict[str, Any]) -> str:
    """The markdown of the `security` section of docs/benchmarks.md."""
    s = r["settings"]
    lines = [
        f"Measured {r['date']} on {r['machine']}; the run took {r['elapsed_s']:.0f} s "
        f"(1-minute load average {r['load_average_start']:.1f} before, "
        f"{r['load_average_end']:.1f} after: other jobs share these cores, which is why both "
        "sides run at once and alternate round by round). Two dev clusters of one shape "
        f"(`kvtier up {r['shape']}`), one `--insecure`, both up during the whole run; "
        f"{s['rounds']} rounds of each KV and RPC workload ({s['kv_batches']} batch of 16 × "
        f"2 MiB, {s['latency_samples'] // s['rounds']} gets a round), {s['s3_rounds']} of S3 "
        f"({s['s3_objects']} object), each side first in every other round. Clients in the "
        "benchmark's process: on the secure side tenant users made with `kvtier admin user "
        "add` (TLS and a session token; `--trust-shm` for the shm rows), on the insecure side "
        "no credential. Each ratio is secure / insecure: the median over rounds of the two "
        "sides' back-to-back values (p50s for latency, GB/s for throughput), which cancels slow "
        "drift in the machine's load; the absolute latencies are p50s of all samples, "
        "throughputs medians over rounds. `python -m bench.security_bench` reruns it.",
        "",
        "| workload | insecure | secure | ratio | rounds' middle half | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for transport in ("tcp", "shm"):
        lat = r[f"kv_latency_{transport}"]
        lines.append(
            f"| KV 64 KiB get p50 ({transport}, {int(lat['insecure']['n'])} gets a side) | "
            f"{lat['insecure']['p50']:.0f} µs | {lat['secure']['p50']:.0f} µs | "
            f"{_ratio(r, f'kv_latency_{transport}', 'p50'):.2f} | "
            f"{_spread(r, f'kv_latency_{transport}', 'p50')} | ≤ {LATENCY_RATIO_MAX} |"
        )
    for transport in ("tcp", "shm"):
        tp = r[f"kv_throughput_{transport}"]
        for op in ("put", "get"):
            lines.append(
                f"| KV 2 MiB {op}, batches of {BATCH} ({transport}) | "
                f"{tp['insecure'][op]:.2f} GB/s | {tp['secure'][op]:.2f} GB/s | "
                f"{_ratio(r, f'kv_throughput_{transport}', op):.2f} | "
                f"{_spread(r, f'kv_throughput_{transport}', op)} | ≥ {THROUGHPUT_RATIO_MIN} |"
            )
    schemes = r["s3_scheme"]
    for op in ("put", "get"):
        lines.append(
            f"| S3 64 MiB {op.upper()}, boto3 ({schemes['insecure']} → {schemes['secure']}) | "
            f"{r['s3']['insecure'][op]:.2f} GB/s | {r['s3']['secure'][op]:.2f} GB/s | "
            f"{_ratio(r, 's3', op):.2f} | {_spread(r, 's3', op)} | ≥ {THROUGHPUT_RATIO_MIN} |"
        )
    rpc = r["rpc"]
    base = rpc["plaintext"]["p50"]
    for name, ratio in rpc["ratio"].items():
        if name != "plaintext":
            lines.append(
                f"| tiny gRPC RPC p50 (GetNodeInfo), {name} | {base:.0f} µs | "
                f"{rpc[name]['p50']:.0f} µs | {ratio:.2f} | {_spread(r, 'rpc', name)} | "
                "(informative) |"
            )
    tok = r["token"]
    lines += [
        "",
        f"Session-token exchange (a new TLS channel, the signed request, the HMAC check, an "
        f"ECDSA-signed token; `TokenSource` pays it when a client first connects and once per "
        f"token lifetime, 15 minutes, renewed at 80 %): p50 {tok['fresh_ms']['p50']:.1f} ms, "
        f"p99 {tok['fresh_ms']['p99']:.1f} ms; a valid token from the cache: p50 "
        f"{tok['cached_us']['p50']:.1f} µs.",
        "",
        "| target | ratio in this run | met |",
        "|---|---:|---|",
    ]
    for check in r["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {'yes' if check['ok'] else 'NO'} |"
        )
    lines += ["", "![security cost ratios](img/security.png)"]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """docs/img/security.png: every ratio of the run against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, limits = [], [], []
    for transport in ("tcp", "shm"):
        labels.append(f"KV 64 KiB get p50\n{transport}")
        ratios.append(_ratio(r, f"kv_latency_{transport}", "p50"))
        limits.append(LATENCY_RATIO_MAX)
    for transport in ("tcp", "shm"):
        for op in ("put", "get"):
            labels.append(f"KV 2 MiB {op}\n{transport}")
            ratios.append(1 / _ratio(r, f"kv_throughput_{transport}", op))
            limits.append(1 / THROUGHPUT_RATIO_MIN)
    for op in ("put", "get"):
        labels.append(f"S3 64 MiB {op.upper()}\nHTTPS vs HTTP")
        ratios.append(1 / _ratio(r, "s3", op))
        limits.append(1 / THROUGHPUT_RATIO_MIN)
    for name, ratio in r["rpc"]["ratio"].items():
        if name != "plaintext":
            labels.append(f"tiny RPC p50\n{name.split(' (')[0]}")
            ratios.append(ratio)
            limits.append(float("nan"))
    fig, ax = plt.subplots(figsize=(12, 4.4))
    xs = np.arange(len(labels))
    colors = [
        "tab:grey" if np.isnan(lim) else ("tab:green" if ratio <= lim else "tab:red")
        for ratio, lim in zip(ratios, limits, strict=True)
    ]
    ax.bar(xs, ratios, 0.6, color=colors)
    for x, lim in zip(xs, limits, strict=True):
        if not np.isnan(lim):
            ax.hlines(lim, x - 0.35, x + 0.35, colors="black", linestyles="--")
    ax.axhline(1.0, c="grey", lw=0.8)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("cost: secure / insecure (time per op)")
    ax.set_title("What security costs (dashed: the issue's target; grey: informative)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_section(quick: bool, write_doc: Callable[[str, str, str], None] | None) -> dict[str, Any]:
    """What `make bench` runs: measure, write results (and the doc section)."""
    result = run_security_bench(quick)
    out = ROOT / "bench" / "results" / "security.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot(result, ROOT / "docs" / "img" / "security.png")
        write_doc("security", HEADING, render(result))
    return result


def main() -> int:
    return bench_common.section_main(
        "python -m bench.security_bench", "fewer samples (smoke test)", run_section, render
    )


if __name__ == "__main__":
    sys.exit(main())
