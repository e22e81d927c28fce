"""The durable object tier on a dev cluster: 64 MiB PUT/GET through the gRPC API, a 1 GiB round
trip through files with the servers' peak memory, and this machine's ceilings in the same run.

A dev cluster (`kvtier up --detach`: etcd, metadata, 6 datanodes x 2 drives = one EC set, a
gateway, one kvcache node; secure, as `kvtier up` runs by default) is started in a temporary
state directory and stopped at the end, failure or not. Client processes (1, then 4 at once)
connect `kvtier.ObjectClient` to the gateway's client port as a user of tenant `bench` made by
the operator with `kvtier admin user add --trust-shm` (TLS, session tokens; trusted for shared
memory), over the shm and tcp data planes: each PUTs its own 64 MiB objects from pre-faulted
memory, then GETs them back into pre-faulted buffers, first with the shards in the page cache
(just written), then again after evicting every shard file from it (cold: the disk serves).
Throughput is the bytes of all clients over the wall time from one shared start instant to the
last client's end; every object is compared whole after each timed phase. Then one client PUTs a
1 GiB file and downloads it to another file: sha256 of both (streamed), and the peak RSS (VmHWM,
reset before) of the gateway, the datanodes and the client during it.

Usage: python -m bench.object_bench [--quick] [--no-doc]
Writes bench/results/objects.json and, unless --no-doc, docs/img/objects.png and the `objects`
section of docs/benchmarks.md. `make bench` runs it through bench/run.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench import ceilings
from bench import common as bench_common

# Re-exported: the other bench modules use object_bench.DevCluster.
from bench.devcluster import DevCluster as DevCluster
from bench.devcluster import evict_shards as evict_shards
from bench.devcluster import memory as memory
from bench.devcluster import reset_peak as reset_peak

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
OBJECT_BYTES = 64 * MIB
CLIENTS = (1, 4)
TRANSPORTS = ("shm", "tcp")
PHASE_BYTES = 1 * GIB  # per phase, all clients together
QUICK_PHASE_BYTES = 256 * MIB
BIG_BYTES = 1 * GIB
QUICK_BIG_BYTES = 256 * MIB
FILE_CHUNK = 64 * MIB
BUCKET = "bench"
REPLY_TIMEOUT_S = 600.0
HEADING = "Object tier: PUT/GET through the gRPC API on the dev cluster"
#: How much a server process's RSS may grow during the big round trip (it holds one call's
#: stripes at a time, in staging pools allocated at start, never the object).
GROWTH_LIMIT = 64 * MIB


def _label(size: int) -> str:
    return f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"


# Client processes.


class _ClientState:
    """What one client process holds: its SDK client, its objects and receive buffers."""

    def __init__(self, gateway: str, transport: str, credentials: dict[str, Any]) -> None:
        from kvtier import objects, security

        self.client = objects.ObjectClient.connect(
            gateway, transports=[transport], security=security.ClientSecurity(**credentials)
        )
        self.keys: list[str] = []
        self.sources: list[np.ndarray] = []
        self.dests: list[np.ndarray] = []

    def transport(self) -> str:
        # Which transport the session negotiated (informational; private to the SDK).
        session = getattr(getattr(self.client, "_inner", None), "_session", None)
        return str(getattr(session, "name", "?"))

    def prepare(self, arg: dict[str, Any]) -> str:
        rng = np.random.default_rng(arg["seed"])
        words = arg["size"] // 8
        self.keys = [f"{arg['prefix']}/{i}" for i in range(arg["count"])]
        self.sources = [
            rng.integers(0, 2**63, words, dtype=np.uint64).view(np.uint8) for _ in self.keys
        ]
        self.dests = [np.ones(arg["size"], dtype=np.uint8) for _ in self.keys]  # pre-faulted
        warm = np.ones(MIB, dtype=np.uint8)  # the connections and the gateway's pools
        self.client.put_object(BUCKET, f"{arg['prefix']}/warmup", warm)
        self.client.get_object_into(BUCKET, f"{arg['prefix']}/warmup", warm)
        self.client.delete_object(BUCKET, f"{arg['prefix']}/warmup")
        return self.transport()

    @staticmethod
    def _wait(start_at: float) -> None:
        while time.perf_counter() < start_at:
            time.sleep(max(0.0, min(0.01, start_at - time.perf_counter())))

    def put(self, start_at: float) -> float:
        self._wait(start_at)
        for key, source in zip(self.keys, self.sources, strict=True):
            self.client.put_object(BUCKET, key, source)
        return time.perf_counter()

    def get(self, start_at: float) -> float:
        self._wait(start_at)
        for key, dest in zip(self.keys, self.dests, strict=True):
            info = self.client.get_object_into(BUCKET, key, dest)
            if info.size != dest.nbytes:
                raise AssertionError(f"{key}: size {info.size}, expected {dest.nbytes}")
        return time.perf_counter()

    def verify(self, _arg: Any) -> bool:
        """Whether every received object equals its source; then scribbles over the buffers,
        so the next GET phase has to write every byte again."""
        ok = all(np.array_equal(s, d) for s, d in zip(self.sources, self.dests, strict=True))
        for dest in self.dests:
            dest.fill(0xA5)
        return ok

    def delete(self, _arg: Any) -> None:
        for key in self.keys:
            self.client.delete_object(BUCKET, key)
        self.keys, self.sources, self.dests = [], [], []

    def big(self, arg: dict[str, str]) -> dict[str, Any]:
        """PUT a file, download it to another; the times and this process's peak RSS."""
        reset_peak(os.getpid())
        start = time.perf_counter()
        self.client.put_object(BUCKET, arg["key"], arg["source"])
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        self.client.download(BUCKET, arg["key"], arg["dest"])
        get_s = time.perf_counter() - start
        self.client.delete_object(BUCKET, arg["key"])
        return {"put_s": put_s, "get_s": get_s, "memory": memory(os.getpid())}


def _client_main(
    conn: Connection, gateway: str, transport: str, credentials: dict[str, Any]
) -> None:
    """A client process: answers (command, arg) messages with ("ok", value) or ("error", tb)."""
    state: _ClientState | None = None
    while True:
        command, arg = conn.recv()
        try:
            if command == "close":
                if state is not None:
                    state.client.close()
                conn.send(("ok", None))
                return
            if state is None:
                state = _ClientState(gateway, transport, credentials)
            conn.send(("ok", getattr(state, command)(arg)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Client:
    """The parent's handle on one client process (spawned: no inherited gRPC state)."""

    def __init__(self, gateway: str, transport: str, credentials: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_main, args=(child, gateway, transport, credentials))
        self.proc.start()
        child.close()

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def recv(self, timeout_s: float = REPLY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"client process exited with {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"client process gave no answer in {timeout_s:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"client error:\n{value}")
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, RuntimeError, EOFError):
                self.send("close")
                self.recv(30)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


def _call(clients: Sequence[Client], command: str, args: Sequence[Any]) -> list[Any]:
    """Send each client its argument, then collect every answer (they run concurrently)."""
    for client, arg in zip(clients, args, strict=True):
        client.send(command, arg)
    return [client.recv() for client in clients]


@contextlib.contextmanager
def _clients(cluster: DevCluster, transport: str, count: int) -> Iterator[list[Client]]:
    clients: list[Client] = []
    gateway, credentials = cluster.info["gateway_grpc"], cluster.user.kwargs()
    try:
        clients = [Client(gateway, transport, credentials) for _ in range(count)]
        yield clients
    finally:
        for client in clients:
            client.close()


# The measurements.


def _timed_phase(clients: Sequence[Client], phase: str, moved: int) -> float:
    start_at = time.perf_counter() + 0.2  # every client waits for this instant
    ends: list[float] = _call(clients, phase, [start_at] * len(clients))
    return moved / (max(ends) - start_at) / 1e9


def run_case(cluster: DevCluster, transport: str, clients: int, phase_bytes: int) -> dict[str, Any]:
    """One transport and client count: PUT, GET warm, GET cold, each verified."""
    count = max(1, phase_bytes // clients // OBJECT_BYTES)
    moved = clients * count * OBJECT_BYTES
    with _clients(cluster, transport, clients) as procs:
        prefix = f"{transport}/{clients}"
        args = [
            {"prefix": f"{prefix}/{i}", "count": count, "size": OBJECT_BYTES, "seed": i}
            for i in range(clients)
        ]
        negotiated = _call(procs, "prepare", args)
        result: dict[str, Any] = {
            "transport": transport,
            "negotiated": sorted(set(negotiated)),
            "clients": clients,
            "objects_per_client": count,
            "bytes_per_phase": moved,
            "put_gbps": _timed_phase(procs, "put", moved),
            "get_warm_gbps": _timed_phase(procs, "get", moved),
        }
        verified = all(_call(procs, "verify", [None] * clients))
        result["evicted_files"] = evict_shards(cluster.state)
        result["get_cold_gbps"] = _timed_phase(procs, "get", moved)
        result["verified"] = verified and all(_call(procs, "verify", [None] * clients))
        _call(procs, "delete", [None] * clients)
    return result


def _write_random_file(path: Path, size: int, seed: int) -> str:
    """A file of size random bytes, written a chunk at a time; its sha256."""
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            n = min(FILE_CHUNK, left)
            chunk = rng.integers(0, 2**63, -(-n // 8), dtype=np.uint64).view(np.uint8)[:n]
            digest.update(chunk.data)
            out.write(chunk.data)
            left -= n
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(FILE_CHUNK))
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def run_big(cluster: DevCluster, size: int, work: Path) -> dict[str, Any]:
    """PUT a file of size bytes from a client process, download it to a file, compare sha256;
    the peak RSS of each server process during it (and before it, since its start)."""
    source, dest = work / "big.src", work / "big.dst"
    try:
        want = _write_random_file(source, size, seed=2026)
        pids = cluster.pids()
        before = {name: memory(pid) for name, pid in pids.items()}
        for pid in pids.values():
            reset_peak(pid)
        with _clients(cluster, "shm", 1) as (proc,):
            proc.send("big", {"key": "big/1", "source": str(source), "dest": str(dest)})
            answer = proc.recv()
        during = {name: memory(pid) for name, pid in pids.items()}
        got = _sha256_file(dest)
    finally:
        source.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
    return {
        "bytes": size,
        "sha256": want,
        "byte_exact": got == want,
        "put_gbps": size / answer["put_s"] / 1e9,
        "get_gbps": size / answer["get_s"] / 1e9,
        "client_memory": answer["memory"],
        "servers_before": before,
        "servers_during": during,
    }


def measure_ceilings(state: Path, k: int, m: int, quick: bool) -> dict[str, Any]:
    """This machine's limits, in the same run (the cluster idles meanwhile)."""
    return {
        "erasure_gbps": ceilings.erasure_gbps(
            data_shards=k, parity_shards=m, seconds=0.2 if quick else 0.4
        ),
        "disk": ceilings.disk_gbps(state, total_bytes=(256 if quick else 512) * MIB),
        "md5_gbps": ceilings.md5_gbps(),
        "raw_socket_gbps": ceilings.raw_socket_gbps(total_bytes=(1024 if quick else 2048) * MIB),
    }


def put_ceiling(result: dict[str, Any]) -> tuple[float, str]:
    """The most a PUT can do on this machine, and which limit it is (see the doc section)."""
    c, k, m = result["ceilings"], result["data_shards"], result["parity_shards"]
    disk = c["disk"]["write_fsync"] * k / (k + m)
    encode = c["erasure_gbps"]["encode"] if c["erasure_gbps"] else float("inf")
    if encode < disk:
        return encode, f"RS {k}+{m} encode"
    return disk, f"disk write (fsync) × {k}/{k + m}"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_objects_bench(quick: bool = False, keep_dir: bool = False) -> dict[str, Any]:
    """Start a dev cluster, measure, stop it (always); the results."""
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kvtier-objbench-"))
    cluster = DevCluster(work / "state")
    result: dict[str, Any] = {
        "machine": bench_common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "object_bytes": OBJECT_BYTES,
        "phase_bytes": QUICK_PHASE_BYTES if quick else PHASE_BYTES,
        "load_average_start": os.getloadavg()[0],
        "cases": [],
    }
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        print("objects bench: starting a dev cluster ...", file=sys.stderr, flush=True)
        cluster.start()
        k, m, drives = cluster.layout()
        result.update(data_shards=k, parity_shards=m, drives=drives)
        _create_bucket(cluster)
        print("objects bench: ceilings ...", file=sys.stderr, flush=True)
        result["ceilings"] = measure_ceilings(cluster.state, k, m, quick)
        for transport in TRANSPORTS:
            for clients in CLIENTS:
                print(f"  {transport}, {clients} client(s)", file=sys.stderr, flush=True)
                result["cases"].append(run_case(cluster, transport, clients, result["phase_bytes"]))
        size = QUICK_BIG_BYTES if quick else BIG_BYTES
        print(f"  {_label(size)} round trip", file=sys.stderr, flush=True)
        result["big"] = run_big(cluster, size, work)
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()
        if not keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = time.perf_counter() - started
    result["load_average_end"] = os.getloadavg()[0]
    result["targets"] = object_targets(result)
    return result


def _create_bucket(cluster: DevCluster) -> None:
    from kvtier import objects

    gateway, sec = cluster.info["gateway_grpc"], cluster.user.security()
    with objects.ObjectClient.connect(gateway, security=sec) as client:
        client.create_bucket(BUCKET)


def _growth(big: dict[str, Any]) -> dict[str, int]:
    """Per server process: peak RSS during the round trip minus its RSS just before it."""
    return {
        name: during["VmHWM"] - big["servers_before"][name]["VmRSS"]
        for name, during in big["servers_during"].items()
    }


def object_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks that fail `make bench`: every object byte-exact, and the big object never held
    whole: no server process grows by more than GROWTH_LIMIT during its round trip, and (for
    a 1 GiB object) none reaches the object's size at all. Throughput is reported as ratios to
    the ceilings, with no pass mark: the issue sets none."""
    verified = all(c["verified"] for c in result["cases"])
    checks = [
        {
            "target": f"every {_label(OBJECT_BYTES)} GET byte-exact",
            "ratio": float(verified),
            "ok": verified,
        }
    ]
    big = result.get("big")
    if not big:
        return checks
    size = _label(big["bytes"])
    checks.append(
        {
            "target": f"{size} round trip through files byte-exact (sha256)",
            "ratio": float(big["byte_exact"]),
            "ok": big["byte_exact"],
        }
    )
    name, growth = max(_growth(big).items(), key=lambda item: item[1])
    checks.append(
        {
            "target": f"RSS growth of every gateway/datanode process during the {size} round "
            f"trip < {GROWTH_LIMIT // MIB} MiB (ratio = growth / limit; largest: {name}, "
            f"{growth / MIB:.0f} MiB)",
            "ratio": growth / GROWTH_LIMIT,
            "ok": growth < GROWTH_LIMIT,
        }
    )
    if big["bytes"] >= GIB:
        peaks = {n: m["VmHWM"] for n, m in big["servers_during"].items()}
        peaks["client"] = big["client_memory"]["VmHWM"]
        name, peak = max(peaks.items(), key=lambda item: item[1])
        checks.append(
            {
                "target": f"peak RSS of every process (servers, client) during the {size} round "
                f"trip < the object's size (ratio = peak / size; highest: {name})",
                "ratio": peak / big["bytes"],
                "ok": peak < big["bytes"],
            }
        )
    return checks


# The report.


def _gb(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def render_objects(result: dict[str, Any]) -> str:
    """The markdown of the `objects` section of docs/benchmarks.md."""
    c, k, m = result["ceilings"], result["data_shards"], result["parity_shards"]
    ceiling, which = put_ceiling(result)
    disk, ec = c["disk"], c["erasure_gbps"]
    lines = [
        f"Measured {result['date']} on {result['machine']}; the objects bench took "
        f"{result['elapsed_s']:.0f} s (one run; ratios are what count; 1-minute load average "
        f"{result['load_average_start']:.1f} before, {result['load_average_end']:.1f} after: "
        "other jobs on the machine move every number). Dev cluster: "
        f"{result['drives']} drives on 6 datanodes, one erasure set RS {k}+{m}, all on this "
        f"machine's one disk. Each phase moves {_gb(result['phase_bytes'])} across all clients "
        f"in {_label(result['object_bytes'])} objects.",
        "",
        "| ceiling (same run) | value |",
        "|---|---|",
        f"| RS {k}+{m} (ISA-L), 1 MiB blocks: encode / rebuild 2 / rebuild 4 data shards | "
        + (
            f"{ec['encode']:.2f} / {ec['reconstruct_2']:.2f} / {ec['reconstruct_4']:.2f} GB/s"
            if ec
            else "libisal2 not installed"
        )
        + " |",
        "| disk, sequential write + fsync, in the state dir's filesystem (best of 2) | "
        f"{disk['write_fsync']:.2f} GB/s |",
        f"| disk, sequential read ({disk['read_method']}, best of 2) | {disk['read']:.2f} GB/s |",
        f"| → PUT ceiling = min(encode, disk write × {k}/{k + m}) | {ceiling:.2f} GB/s ({which}) |",
        f"| → cold GET ceiling = disk read (a GET reads the {k} data shards only) | "
        f"{disk['read']:.2f} GB/s |",
        f"| MD5 (the ETag), one core | {c['md5_gbps']:.2f} GB/s |",
        f"| raw TCP socket, one stream, recv_into | {c['raw_socket_gbps']:.2f} GB/s |",
        "",
        "| data plane | clients | PUT GB/s | PUT / ceiling | GET warm GB/s | GET cold GB/s | "
        "cold GET / disk read | content verified |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in result["cases"]:
        lines.append(
            f"| {case['transport']} | {case['clients']} | {case['put_gbps']:.2f} | "
            f"{case['put_gbps'] / ceiling:.2f} | {case['get_warm_gbps']:.2f} | "
            f"{case['get_cold_gbps']:.2f} | {case['get_cold_gbps'] / disk['read']:.2f} | "
            f"{'yes' if case['verified'] else 'NO'} |"
        )
    big = result.get("big")
    if big:
        lines += _render_big(big)
    lines += ["", "| check | value | met |", "|---|---:|---|"]
    for check in result["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {'yes' if check['ok'] else 'NO'} |"
        )
    lines += ["", "![object tier throughput](img/objects.png)"]
    return "\n".join(lines)


def _render_big(big: dict[str, Any]) -> list[str]:
    size = _label(big["bytes"])
    lines = [
        "",
        f"{size} round trip (one client over shm: `put_object(path)`, then `download(path)`): "
        f"PUT {big['put_gbps']:.2f} GB/s, GET {big['get_gbps']:.2f} GB/s, sha256 "
        f"{'equal' if big['byte_exact'] else 'DIFFERENT'}. Memory of each process, MiB: "
        "peak RSS since its start (through the 64 MiB phases); peak RSS during the round "
        "trip (VmHWM reset through /proc/PID/clear_refs just before) and its growth over the "
        "RSS at that moment; and at the end, private memory (RssAnon) and shared memory "
        "(RssShmem: staging pools of fixed size mapped at start, the process's own and "
        "those of the peers it writes into, so the same pages count in several processes).",
        "",
        "| process | peak before | peak during | growth during | private | shared |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    growth = _growth(big)
    for name, during in sorted(big["servers_during"].items()):
        before = big["servers_before"][name]
        lines.append(
            f"| {name} | {before['VmHWM'] / MIB:.0f} | {during['VmHWM'] / MIB:.0f} | "
            f"{max(0, growth[name]) / MIB:.0f} | {during['RssAnon'] / MIB:.0f} | "
            f"{during['RssShmem'] / MIB:.0f} |"
        )
    client = big["client_memory"]
    lines.append(
        f"| client (SDK, its own process) | | {client['VmHWM'] / MIB:.0f} | | "
        f"{client['RssAnon'] / MIB:.0f} | {client['RssShmem'] / MIB:.0f} |"
    )
    return lines


def plot_objects(result: dict[str, Any], path: Path) -> None:
    """docs/img/objects.png: PUT and GET (warm, cold) per case, with the ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    names = [
        f"{c['transport']}\n{c['clients']} client{'s' if c['clients'] > 1 else ''}" for c in cases
    ]
    xs = np.arange(len(cases))
    ceiling, which = put_ceiling(result)
    disk = result["ceilings"]["disk"]
    fig, (put_ax, get_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    put_ax.bar(xs, [c["put_gbps"] for c in cases], 0.6, label="PUT")
    put_ax.axhline(ceiling, ls="--", c="grey", label=f"ceiling: {which}")
    put_ax.set_title(f"PUT of {_label(result['object_bytes'])} objects")
    get_ax.bar(xs - 0.2, [c["get_warm_gbps"] for c in cases], 0.4, label="GET, page cache warm")
    get_ax.bar(xs + 0.2, [c["get_cold_gbps"] for c in cases], 0.4, label="GET, cold")
    get_ax.axhline(disk["read"], ls="--", c="grey", label=f"disk read ({disk['read_method']})")
    get_ax.set_title(f"GET of {_label(result['object_bytes'])} objects")
    for ax in (put_ax, get_ax):
        ax.axhline(result["ceilings"]["raw_socket_gbps"], ls=":", c="black", label="raw TCP stream")
        ax.set_xticks(xs, names)
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_section(quick: bool, write_doc: Callable[[str, str, str], None] | None) -> dict[str, Any]:
    """What `make bench` runs: measure, write results (and the doc section)."""
    result = run_objects_bench(quick)
    out = ROOT / "bench" / "results" / "objects.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot_objects(result, ROOT / "docs" / "img" / "objects.png")
        write_doc("objects", HEADING, render_objects(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.object_bench")
    parser.add_argument("--quick", action="store_true", help="less data (smoke test)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc

        write_doc = update_doc
    result = run_section(args.quick, write_doc)
    print(render_objects(result))
    return 0 if all(c["ok"] for c in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
