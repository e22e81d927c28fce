"""KV-cache store: kvtier against Redis, Mooncake Store and LMCache, one workload, one run.

For each block size (256 KiB, 2 MiB, 32 MiB) and 1 or 8 clients, every client process puts its
own keys in batches of about BATCH_BYTES, then gets them back into preallocated, pre-faulted
buffers, checking the edges of each block as it goes and the whole content afterwards (untimed).
Throughput is the bytes of all clients over the wall time from a shared start instant to the last
client's end, for put and get separately. Then one client times single-key 64 KiB gets (p50/p99).
Servers are started and stopped here; clients are always separate processes (see kv_peers/).

Usage: python -m bench.kv_bench [--quick] [--no-install] [--no-doc] [--systems redis,mooncake]
Writes bench/results/kv.json and, unless --no-doc, docs/img/kv_*.png and the `kv` section of
docs/benchmarks.md. `make bench` runs it through bench/run.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from bench import ceilings, kv_peers
from bench import common as bench_common
from bench.kv_peers import base

KIB, MIB = 1024, 1024 * 1024
BLOCKS = [256 * KIB, 2 * MIB, 32 * MIB]
CLIENTS = [1, 8]
BATCH_BYTES = 32 * MIB
PHASE_BYTES = 512 * MIB  # per phase, all clients together
QUICK_PHASE_BYTES = 128 * MIB
LATENCY_BLOCK = 64 * KIB
LATENCY_KEYS = 64
LATENCY_SAMPLES = 3000
LATENCY_WARMUP = 300
LATENCY_CLIENTS = [1, 4]  # client processes timing single-key gets at once
LOOKUP_SAMPLES = 1000  # lookups of the LATENCY_KEYS keys as one chain, per client
REPLY_TIMEOUT_S = 300.0
# The targets: kvtier's best transport against each peer at >= 2 MiB, and 64 KiB get p50.
THROUGHPUT_FACTORS = {"redis": 1.5, "mooncake": 2.0, "lmcache": 2.0}
TARGET_MIN_BLOCK = 2 * MIB
# Issue 15: 64 KiB get p50 <= 100 µs and <= 0.7x Redis's, p99 <= 250 µs (1 and 4 clients);
# a 64-block lookup's p50 <= the Redis EXISTS pipeline's.
LATENCY_P50_TARGET_US = 100.0
LATENCY_P99_TARGET_US = 250.0
LATENCY_REDIS_FACTOR = 0.7
HEADING = "KV-cache store against peers (Redis, Mooncake Store, LMCache)"
# Every client process, of every system, runs with glibc keeping freed memory instead of
# returning it (no per-value mmap, no trim). Clients whose API returns a new bytes object per
# value (Redis) otherwise pay fresh page faults on every block: measured 30-80 % slower gets.
# Clients that receive into the caller's buffers are unaffected; the peers get the benefit.
CLIENT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def label(block: int) -> str:
    return f"{block // MIB} MiB" if block >= MIB else f"{block // KIB} KiB"


def clients_label(clients: int) -> str:
    return f"{clients} client{'' if clients == 1 else 's'}"


class WorkerError(RuntimeError):
    """A client process failed; str() is one line, `details` has its traceback and log tail."""

    def __init__(self, summary: str, details: str = "") -> None:
        super().__init__(summary)
        self.details = details


class Worker:
    """A client process (`bench.kv_peers.worker`) under the system's interpreter."""

    def __init__(self, spec: base.ClientSpec, log_path: Path) -> None:
        self.log_path = log_path
        self.conn, child = multiprocessing.Pipe(duplex=True)
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            [spec.python, "-m", "bench.kv_peers.worker", str(child.fileno())],
            cwd=base.ROOT,
            env={**os.environ, **CLIENT_ENV, **spec.env, "PYTHONPATH": str(base.ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=[child.fileno()],
        )
        child.close()

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def recv(self, timeout_s: float = REPLY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            if self.proc.poll() is not None:
                raise WorkerError(f"client exited with {self.proc.returncode}", self.log_tail())
            if time.monotonic() > deadline:
                raise WorkerError(f"client gave no answer in {timeout_s:.0f} s", self.log_tail())
        status, value = self.conn.recv()
        if status != "ok":
            last = value.strip().splitlines()[-1] if value.strip() else "?"
            raise WorkerError(f"client error: {last}", f"{value}\n{self.log_tail()}")
        return value

    def log_tail(self, lines: int = 10) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("close")
                self.recv(30)
            except (WorkerError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()
        self._log.close()


def _call(workers: Sequence[Worker], command: str, args: Sequence[Any]) -> list[Any]:
    """Send each worker its argument, then collect every answer (they run concurrently)."""
    for worker, arg in zip(workers, args, strict=True):
        worker.send(command, arg)
    return [worker.recv() for worker in workers]


def _run_case(workers: Sequence[Worker], name: str, block: int, phase_bytes: int) -> dict[str, Any]:
    clients = len(workers)
    count = max(1, phase_bytes // clients // block)
    batch = min(count, max(1, BATCH_BYTES // block))
    prefix = f"kvbench/{name}/{block}/{clients}"
    _call(
        workers,
        "prepare",
        [
            {
                "block": block,
                "count": count,
                "batch": batch,
                "prefix": f"{prefix}/{i}",
                "seed": zlib.crc32(f"{prefix}/{i}".encode()),
            }
            for i in range(clients)
        ],
    )
    moved = clients * count * block
    result: dict[str, Any] = {"block_bytes": block, "clients": clients, "batch": batch}
    verified = True
    for phase in ("put", "get"):
        start_at = time.perf_counter() + 0.1  # every client waits for this instant
        answers = _call(workers, phase, [start_at] * clients)
        result[f"{phase}_gbps"] = moved / (max(a[1] for a in answers) - start_at) / 1e9
        if phase == "get":
            verified = all(a[2] for a in answers)
    verified = all(_call(workers, "verify", [None] * clients)) and verified
    _call(workers, "delete", [None] * clients)
    _call(workers, "release", [None] * clients)
    result["bytes_per_phase"] = moved
    result["verified"] = verified
    return result


def _measure(system: base.KVSystem, phase_bytes: int, tmp: Path) -> dict[str, Any]:
    spec = system.client_spec()
    workers: list[Worker] = []
    try:
        workers = [Worker(spec, tmp / f"client{i}.log") for i in range(max(CLIENTS))]
        versions = _call(workers, "init", [spec] * len(workers))
        cases = []
        for block in BLOCKS:
            for clients in CLIENTS:
                print(f"  {system.name}: {label(block)}, {clients_label(clients)}", file=sys.stderr)
                cases.append(_run_case(workers[:clients], system.name, block, phase_bytes))
        latency = {
            str(clients): _latency(workers[:clients], system.name) for clients in LATENCY_CLIENTS
        }
        return {
            "client_version": versions[0],
            "cases": cases,
            "latency_us": latency["1"],
            "latency_by_clients": latency,
        }
    finally:
        for worker in workers:
            worker.close()


def _latency(workers: Sequence[Worker], name: str) -> dict[str, Any]:
    """Single-key 64 KiB gets, then 64-key chain lookups, from every worker at once (their own
    keys); percentiles over all their samples."""
    print(f"  {name}: latency, {clients_label(len(workers))}", file=sys.stderr)
    start_at = time.perf_counter() + 2.0  # after every worker's put and warm-up
    answers = _call(
        workers,
        "latency",
        [
            {
                "block": LATENCY_BLOCK,
                "keys": LATENCY_KEYS,
                "samples": LATENCY_SAMPLES,
                "warmup": LATENCY_WARMUP,
                "lookups": LOOKUP_SAMPLES,
                "start_at": start_at,
                "prefix": f"kvbench/{name}/latency/{i}",
            }
            for i in range(len(workers))
        ],
    )
    times = sorted(t for a in answers for t in a["times"])
    result: dict[str, Any] = {
        "p50": statistics.median(times),
        "p99": times[int(len(times) * 0.99)],
        "samples": len(times),
        "verified": all(a["verified"] for a in answers),
    }
    lookups = sorted(t for a in answers for t in a["lookup_times"])
    if lookups:
        result["lookup_p50"] = statistics.median(lookups)
        result["lookup_p99"] = lookups[int(len(lookups) * 0.99)]
    return result


def run_system(system: base.KVSystem, phase_bytes: int) -> dict[str, Any]:
    """Start the system, run the workload, stop it (always); a failure becomes its status."""
    entry: dict[str, Any] = {"kind": system.kind, "describe": system.describe()}
    reason = system.unavailable()
    if reason is not None:
        entry["status"] = f"skipped: {reason}"
        return entry
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"kvbench-{system.name}-clients-"))
    try:
        system.start()
        entry.update(_measure(system, phase_bytes, tmp))
        entry["status"] = "ok"
    except Exception as exc:
        traceback.print_exc()
        if isinstance(exc, WorkerError):
            print(exc.details, file=sys.stderr)
        entry["status"] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    finally:
        system.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    entry["elapsed_s"] = time.perf_counter() - started
    return entry


def install_peers() -> None:
    """scripts/bench_peers.sh: idempotent; a peer it cannot install is reported as skipped."""
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(base.INSTALL_SCRIPT)], env=env, check=False)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_kv_bench(systems: Sequence[base.KVSystem], quick: bool = False) -> dict[str, Any]:
    """Run every system in turn; results for the report, including the issue's targets."""
    phase_bytes = QUICK_PHASE_BYTES if quick else PHASE_BYTES
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": bench_common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "phase_bytes": phase_bytes,
        "batch_bytes": BATCH_BYTES,
        "systems": {},
    }
    # This machine's limits in the same run, to read the peers' numbers against (shared machines
    # are noisy); the targets themselves are kvtier-to-peer ratios.
    p50, p99 = ceilings.raw_round_trip_us(2000)
    result["ceilings"] = {
        "memcpy_gbps": ceilings.memcpy_gbps(2 * MIB),
        "raw_socket_gbps": ceilings.raw_socket_gbps(total_bytes=1024 * MIB),
        "raw_rtt_us": {"p50": p50, "p99": p99},
    }
    # A SIGTERM unwinds like Ctrl-C, so every started system is stopped (run_system's finally).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for system in systems:
            print(f"kv bench: {system.name} ...", file=sys.stderr, flush=True)
            result["systems"][system.name] = run_system(system, phase_bytes)
            status = result["systems"][system.name]["status"]
            print(f"kv bench: {system.name}: {status}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["elapsed_s"] = time.perf_counter() - started
    result["targets"] = kv_targets(result)
    return result


def _ok(result: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in result["systems"].items()
        if s["kind"] == kind and s["status"] == "ok"
    }


def kv_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as ratios within this run: kvtier's best transport against each peer.

    One check per peer, block size >= 2 MiB and client count; its ratio is the smaller of the put
    and get ratios. Plus issue 15's small-operation targets (`_latency_targets`). Empty until a
    kvtier system has results (bench/kv_peers/kvtier.py).
    """
    kvtier, peers = _ok(result, "kvtier"), _ok(result, "peer")
    if not kvtier:
        return []
    best: dict[tuple[int, int, str], tuple[float, str]] = {}
    for name, s in kvtier.items():
        for case in s["cases"]:
            for op in ("put", "get"):
                key = (case["block_bytes"], case["clients"], op)
                if case[f"{op}_gbps"] > best.get(key, (0.0, ""))[0]:
                    best[key] = (case[f"{op}_gbps"], name)
    checks = []
    for peer, factor in THROUGHPUT_FACTORS.items():
        if peer not in peers:
            continue
        for case in peers[peer]["cases"]:
            block, clients = case["block_bytes"], case["clients"]
            if block < TARGET_MIN_BLOCK:
                continue
            put = best[(block, clients, "put")][0] / case["put_gbps"]
            get = best[(block, clients, "get")][0] / case["get_gbps"]
            checks.append(
                {
                    "target": f"kvtier {label(block)}, {clients_label(clients)} ≥ {factor}× {peer} "
                    "(min of put, get)",
                    "ratio": min(put, get),
                    "detail": f"put {put:.2f}×, get {get:.2f}×",
                    "ok": min(put, get) >= factor,
                }
            )
    return checks + _latency_targets(kvtier, peers.get("redis"))


def _latency_targets(
    kvtier: dict[str, dict[str, Any]], redis: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Issue 15's small-operation targets for the kvtier tcp system (the best kvtier system
    when there is none), per client count: get p50 and p99, get p50 against Redis's, and the
    64-key lookup p50 against Redis's EXISTS pipeline."""
    name = "kvtier-tcp" if "kvtier-tcp" in kvtier else min(kvtier)
    mine = kvtier[name].get("latency_by_clients", {})
    theirs = (redis or {}).get("latency_by_clients", {})
    checks = []
    for clients, lat in mine.items():
        who = f"{name}, {clients_label(int(clients))}"
        checks.append(_check(
            f"64 KiB get p50 ≤ {LATENCY_P50_TARGET_US:.0f} µs ({who}; ratio = p50 / target)",
            lat["p50"] / LATENCY_P50_TARGET_US, f"{lat['p50']:.0f} µs",
        ))  # fmt: skip
        checks.append(_check(
            f"64 KiB get p99 ≤ {LATENCY_P99_TARGET_US:.0f} µs ({who}; ratio = p99 / target)",
            lat["p99"] / LATENCY_P99_TARGET_US, f"{lat['p99']:.0f} µs",
        ))  # fmt: skip
        peer = theirs.get(clients)
        if peer is None:
            continue
        checks.append(_check(
            f"64 KiB get p50 ≤ {LATENCY_REDIS_FACTOR}× Redis's ({who}; ratio = kvtier / "
            f"({LATENCY_REDIS_FACTOR} × Redis))",
            lat["p50"] / (LATENCY_REDIS_FACTOR * peer["p50"]),
            f"{lat['p50']:.0f} µs vs Redis {peer['p50']:.0f} µs",
        ))  # fmt: skip
        if "lookup_p50" in lat and "lookup_p50" in peer:
            checks.append(_check(
                f"64-key lookup p50 ≤ Redis EXISTS pipeline's ({who}; ratio = kvtier / Redis)",
                lat["lookup_p50"] / peer["lookup_p50"],
                f"{lat['lookup_p50']:.0f} µs vs Redis {peer['lookup_p50']:.0f} µs",
            ))  # fmt: skip
    return checks


def _check(target: str, ratio: float, detail: str) -> dict[str, Any]:
    """A target whose ratio must be at most 1."""
    return {"target": target, "ratio": ratio, "detail": detail, "ok": ratio <= 1.0}


def _per_transport(result: dict[str, Any]) -> list[str]:
    """Each kvtier transport on its own against each peer: the worst put or get ratio over the
    >= 2 MiB cases (the targets above take the best transport per case)."""
    kvtier, peers = _ok(result, "kvtier"), _ok(result, "peer")
    if not kvtier or not peers:
        return []
    lines = [
        "",
        "Each transport on its own (informational): the smallest put or get ratio over the "
        "≥ 2 MiB cases, and where it occurs.",
        "",
        "| kvtier transport | peer | smallest ratio | case |",
        "|---|---|---:|---|",
    ]
    for name, s in kvtier.items():
        mine = {(c["block_bytes"], c["clients"]): c for c in s["cases"]}
        for peer, ps in peers.items():
            worst = (float("inf"), "")
            for case in ps["cases"]:
                key = (case["block_bytes"], case["clients"])
                if case["block_bytes"] < TARGET_MIN_BLOCK or key not in mine:
                    continue
                for op in ("put", "get"):
                    ratio = mine[key][f"{op}_gbps"] / case[f"{op}_gbps"]
                    where = f"{op} {label(key[0])}, {clients_label(key[1])}"
                    worst = min(worst, (ratio, where))
            if worst[1]:
                lines.append(f"| {name} | {peer} | {worst[0]:.2f}× | {worst[1]} |")
    return lines


def _missing_targets(result: dict[str, Any]) -> list[str]:
    notes = []
    if not _ok(result, "kvtier"):
        notes.append(
            "no kvtier system has results in this run (bench/kv_peers/kvtier.py provides them), "
            "so the ratio targets cannot be computed yet"
        )
    for peer in THROUGHPUT_FACTORS:
        status = result["systems"].get(peer, {}).get("status", "not in this run")
        if status != "ok":
            notes.append(f"{peer}: {status}: no ratio against it")
    return notes


def render_kv(result: dict[str, Any]) -> str:
    """The markdown of the `kv` section of docs/benchmarks.md."""
    c = result["ceilings"]
    lines = [
        f"Measured {result['date']} on {result['machine']}; the kv bench took "
        f"{result['elapsed_s']:.0f} s (one run; ratios are what count). Each phase moves "
        f"{result['phase_bytes'] // MIB} MiB across all clients, in batches of up to "
        f"{result['batch_bytes'] // MIB} MiB per client. Ceilings in the same run: memcpy "
        f"{c['memcpy_gbps']:.2f} GB/s, one raw TCP stream {c['raw_socket_gbps']:.2f} GB/s, "
        f"raw 64 B round trip p50 {c['raw_rtt_us']['p50']:.0f} µs.",
        "",
        "| system | block | clients | put GB/s | get GB/s | content verified |",
        "|---|---|---:|---:|---:|---|",
    ]
    latency = [
        "",
        f"Single-key {label(LATENCY_BLOCK)} gets ({LATENCY_KEYS} keys cycled, {LATENCY_WARMUP} "
        f"warm-up gets per client), then {LOOKUP_SAMPLES} lookups per client of those "
        f"{LATENCY_KEYS} keys as one chain (Redis: one pipeline of EXISTS; peers without a "
        "probe: blank); all client processes at once, percentiles over all their samples:",
        "",
        "| system | clients | get p50 µs | get p99 µs | gets | lookup p50 µs | lookup p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    setups = ["", "| system | status | client | setup |", "|---|---|---|---|"]
    for name, s in result["systems"].items():
        setups.append(
            f"| {name} | {s['status']} | {s.get('client_version', '')} | {s['describe']} |"
        )
        if s["status"] != "ok":
            lines.append(f"| {name} | | | {s['status']} | | |")
            latency.append(f"| {name} | | {s['status']} | | | | |")
            continue
        for case in s["cases"]:
            lines.append(
                f"| {name} | {label(case['block_bytes'])} | {case['clients']} | "
                f"{case['put_gbps']:.2f} | {case['get_gbps']:.2f} | "
                f"{'yes' if case['verified'] else 'NO'} |"
            )
        by_clients = s.get("latency_by_clients") or {"1": s["latency_us"]}
        for clients, lat in by_clients.items():
            lookup = (
                f"{lat['lookup_p50']:.0f} | {lat['lookup_p99']:.0f}"
                if "lookup_p50" in lat
                else " | "
            )
            latency.append(
                f"| {name} | {clients} | {lat['p50']:.0f} | {lat['p99']:.0f} | {lat['samples']} | "
                f"{lookup} |"
            )
    lines += latency + setups
    lines += ["", "| target | ratio in this run | detail | met |", "|---|---:|---|---|"]
    for check in result["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {check['detail']} | "
            f"{'yes' if check['ok'] else 'NO'} |"
        )
    for note in _missing_targets(result):
        lines.append(f"| — | n/a | {note} | |")
    lines += _per_transport(result)
    lines += [
        "",
        "![kv throughput](img/kv_throughput.png)",
        "",
        "![kv latency](img/kv_latency.png)",
    ]
    return "\n".join(lines)


def plot_kv(result: dict[str, Any], img_dir: Path) -> None:
    """docs/img/kv_throughput.png (put/get by 1/8 clients) and docs/img/kv_latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: s for name, s in result["systems"].items() if s["status"] == "ok"}
    img_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, len(CLIENTS), figsize=(11, 7), sharey="row")
    for row, op in enumerate(("put", "get")):
        for col, clients in enumerate(CLIENTS):
            ax = axes[row][col]
            for name, s in ok.items():
                cases = {c["block_bytes"]: c for c in s["cases"] if c["clients"] == clients}
                ys = [cases[b][f"{op}_gbps"] for b in BLOCKS]
                ax.plot([label(b) for b in BLOCKS], ys, marker="o", label=name)
            ax.set_title(f"{op}, {clients_label(clients)}")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("GB/s")
            if row == 1:
                ax.set_xlabel("block size")
    for row_axes in axes:  # each row shares its y axis, from 0 to its highest point
        top = max(max(line.get_ydata()) for ax in row_axes for line in ax.get_lines())
        row_axes[0].set_ylim(0, top * 1.08)
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(img_dir / "kv_throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(ok)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [ok[n]["latency_us"]["p50"] for n in names], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [ok[n]["latency_us"]["p99"] for n in names], 0.4, label="p99")
    ax.axhline(LATENCY_P50_TARGET_US, ls="--", c="grey", label="p50 target")
    ax.set_xticks(list(xs), names)
    ax.set_yscale("log")
    ax.set_ylabel("µs (log scale)")
    ax.set_title(f"single-key {label(LATENCY_BLOCK)} get latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img_dir / "kv_latency.png", dpi=110)
    plt.close(fig)


def run_section(
    quick: bool,
    write_doc: Callable[[str, str, str], None] | None,
    only: Sequence[str] = (),
    install: bool = True,
) -> dict[str, Any]:
    """What `make bench` runs: install peers, measure, write results (and the doc section)."""
    if install:
        install_peers()
    systems = [s for s in kv_peers.all_systems() if not only or s.name in only]
    result = run_kv_bench(systems, quick)
    out = base.ROOT / "bench" / "results" / "kv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot_kv(result, base.ROOT / "docs" / "img")
        write_doc("kv", HEADING, render_kv(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_bench")
    parser.add_argument("--quick", action="store_true", help="less data per phase (smoke test)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--no-install", action="store_true", help="skip scripts/bench_peers.sh")
    parser.add_argument("--systems", default="", help="comma-separated names (default: all)")
    args = parser.parse_args()
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc

        write_doc = update_doc
    only = [n for n in args.systems.split(",") if n]
    result = run_section(args.quick, write_doc, only, install=not args.no_install)
    print(render_kv(result))
    return 0 if all(c["ok"] for c in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
