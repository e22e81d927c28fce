"""kvtier's S3 gateway against Ceph RGW (issue 14): the same boto3 workload on both, in one run.

Systems, all up during the whole run on this machine:
- `rgw`: Ceph RGW from Debian's packages, one monitor, one OSD (BlueStore on a sparse file),
  size-1 pools, beast on 127.0.0.1 over plain HTTP (bench/rgw.py starts and stops it);
- `kvtier-https`: a dev cluster as users run it (`kvtier up --detach --kvcache-nodes 1`, secure:
  S3 over HTTPS with the cluster's CA), started as bench/object_bench.py's `DevCluster` does;
- `kvtier-http`: the same shape with `--insecure` (S3 over plain HTTP, like RGW here), unless
  `--no-plain-http`.

One boto3 client per system, configured alike (bench/s3_bench.py's `_client`): SigV4 with
`UNSIGNED-PAYLOAD` (no SHA-256 of bodies, over HTTP too), checksums only when required, path
style, 16 pooled connections, no retries. Workloads, per round and system: 64 MiB PUT then GET,
8 at a time (each PUT's ETag is the body's MD5, each GET is compared whole); 4 MiB GET one at a
time (objects put before the rounds); 4 KiB PUT then GET, 8 at a time (every body compared).
Within a round each workload runs on every system back to back, the order alternating from
one workload to the next (A B C, C B A, ...), so what else runs on the machine hits all of them
alike; each ratio kvtier / RGW is the median over rounds of the round's pair, with the lowest
and highest round. Target (the issue's): every ratio ≥ 1.5 for kvtier as users run it (HTTPS).

Usage: python -m bench.s3_rgw_bench [--quick] [--no-doc] [--no-plain-http]
Writes bench/results/s3_rgw.json and, unless --no-doc, docs/img/s3_rgw.png and the `s3-rgw`
section of docs/benchmarks.md. `make bench` runs it through bench/run.py (--skip-rgw skips it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import boto3
import numpy as np

from bench import object_bench, rgw, s3_bench

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024
HEADING = "S3 API: kvtier against Ceph RGW (boto3)"
BUCKET = "rgw-bench"
TARGET = 1.5
PEER = "rgw"
#: name -> (object bytes, concurrency, op, unit)
WORKLOADS: dict[str, tuple[int, int, str, str]] = {
    "64 MiB c8 PUT": (64 * MIB, 8, "put", "GB/s"),
    "64 MiB c8 GET": (64 * MIB, 8, "get", "GB/s"),
    "4 MiB c1 GET": (4 * MIB, 1, "get", "GB/s"),
    "4 KiB c8 PUT": (4 * KIB, 8, "put", "ops/s"),
    "4 KiB c8 GET": (4 * KIB, 8, "get", "ops/s"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    big_objects: int  # 64 MiB objects per system and round
    medium_objects: int  # 4 MiB objects read per system and round
    small_objects: int  # 4 KiB objects per system and round


QUICK = Settings(rounds=2, big_objects=8, medium_objects=16, small_objects=200)
FULL = Settings(rounds=6, big_objects=16, medium_objects=32, small_objects=600)


@dataclasses.dataclass
class System:
    name: str
    scheme: str
    client: Any


def _order(names: Sequence[str], step: int) -> list[str]:
    """A B C, then C B A, then A B C ...: each system goes first and last in turn."""
    return list(names) if step % 2 == 0 else list(reversed(names))


def _timed(op: Callable[[str], None], keys: Sequence[str], concurrency: int) -> float:
    """Seconds to run op on every key, `concurrency` at a time."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(op, keys))
        return time.perf_counter() - started


class Workload:
    """The objects and the operations of one system's rounds."""

    def __init__(self, system: System, s: Settings) -> None:
        self.name, self.client, self.s = system.name, system.client, s
        self.big = np.random.default_rng(64).bytes(64 * MIB)
        self.medium, self.small = self.big[: 4 * MIB], self.big[: 4 * KIB]
        sizes = (self.big, self.medium, self.small)
        self.digest = {len(b): hashlib.md5(b).hexdigest() for b in sizes}

    def _put(self, data: bytes) -> Callable[[str], None]:
        def put(key: str) -> None:
            etag = self.client.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"]
            if etag.strip('"') != self.digest[len(data)]:
                raise RuntimeError(f"{self.name}: PUT {key}: ETag {etag} is not the body's MD5")

        return put

    def _get(self, data: bytes) -> Callable[[str], None]:
        def get(key: str) -> None:
            if self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() != data:
                raise RuntimeError(f"{self.name}: GET {key} came back different")

        return get

    def prepare(self) -> None:
        """The bucket, the 4 MiB objects, and one untimed PUT/GET (connections, TLS)."""
        self.client.create_bucket(Bucket=BUCKET)
        _timed(self._put(self.medium), self._medium_keys(), 4)
        self._put(self.small)("warm")
        self._get(self.small)("warm")

    def _medium_keys(self) -> list[str]:
        return [f"medium/{i}" for i in range(self.s.medium_objects)]

    def measure(self, workload: str, r: int) -> float:
        """One workload of round r: its rate (GB/s, or ops/s for 4 KiB objects). A round's GETs
        read what its PUTs wrote."""
        size, concurrency, op, _ = WORKLOADS[workload]
        data = {len(b): b for b in (self.big, self.medium, self.small)}[size]
        if size == 4 * MIB:
            keys = self._medium_keys()
        else:
            count = self.s.big_objects if size == 64 * MIB else self.s.small_objects
            keys = [f"{size}/{r}/{i}" for i in range(count)]
        seconds = _timed((self._put if op == "put" else self._get)(data), keys, concurrency)
        return len(keys) / seconds * (size / 1e9 if size > 4 * KIB else 1.0)

    def clean(self, r: int) -> None:
        """Untimed: delete round r's 64 MiB objects (the stores' disk use stays bounded; the
        4 KiB objects stay, a few MB)."""
        keys = [f"{64 * MIB}/{r}/{i}" for i in range(self.s.big_objects)]
        _timed(lambda key: self.client.delete_object(Bucket=BUCKET, Key=key), keys, 8)


def _start_kvtier(stack: contextlib.ExitStack, work: Path, name: str) -> System:
    args = ("--kvcache-nodes", "1", *(("--insecure",) if name == "kvtier-http" else ()))
    cluster = object_bench.DevCluster(work / name, *args)
    stack.callback(cluster.stop)  # also after a start that failed half-way
    info = cluster.start()
    client = s3_bench._client(
        info["gateway_s3"], info["s3_access_key"], info["s3_secret_key"],
        info.get("ca_file", ""), unsigned_payload=True,
    )  # fmt: skip
    return System(name, str(info["gateway_s3"]).split("://", 1)[0], client)


def run_rgw_bench(quick: bool, plain_http: bool = True) -> dict[str, Any]:
    """Start every system, run the interleaved rounds, stop them all (always)."""
    s = QUICK if quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": list(os.getloadavg()),
        "settings": dataclasses.asdict(s),
        "boto3": boto3.__version__,
    }
    systems: dict[str, System] = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-rgw-bench-")))
        print("rgw bench: starting Ceph RGW ...", file=sys.stderr, flush=True)
        ceph = stack.enter_context(rgw.RGWCluster())
        result["rgw"] = ceph.describe()
        result["rgw_packages"] = rgw.package_versions()
        systems[PEER] = System(PEER, "http", s3_bench._client(
            ceph.endpoint, ceph.access_key, ceph.secret_key, unsigned_payload=True))  # fmt: skip
        for name in ("kvtier-https", *(("kvtier-http",) if plain_http else ())):
            print(f"rgw bench: starting {name} ...", file=sys.stderr, flush=True)
            systems[name] = _start_kvtier(stack, work, name)
        result["schemes"] = {n: sys_.scheme for n, sys_ in systems.items()}
        loads = {n: Workload(sys_, s) for n, sys_ in systems.items()}
        for load in loads.values():
            load.prepare()
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in systems}
        for r in range(s.rounds):
            print(f"  round {r}", file=sys.stderr, flush=True)
            got: dict[str, dict[str, float]] = {n: {"load": os.getloadavg()[0]} for n in systems}
            for i, workload in enumerate(WORKLOADS):
                for name in _order(list(systems), r * len(WORKLOADS) + i):
                    got[name][workload] = loads[name].measure(workload, r)
            for name, load in loads.items():
                load.clean(r)
                rounds[name].append(got[name])
        result["rounds"] = rounds
    result["elapsed_s"] = time.perf_counter() - started
    result["load_average_end"] = list(os.getloadavg())
    result["ratios"] = ratios(rounds)
    result["targets"] = targets(result)
    return result


def ratios(rounds: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """kvtier system -> workload -> median, lowest and highest over rounds of kvtier / RGW."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, got in rounds.items():
        if name == PEER:
            continue
        out[name] = {}
        for w in WORKLOADS:
            per_round = [k[w] / p[w] for k, p in zip(got, rounds[PEER], strict=True)]
            out[name][w] = {"median": float(np.median(per_round)), "low": min(per_round),
                            "high": max(per_round)}  # fmt: skip
    return out


def median_rate(r: dict[str, Any], name: str, workload: str) -> float:
    return float(np.median([g[workload] for g in r["rounds"][name]]))


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: kvtier as users run it (HTTPS) at least 1.5 x RGW on every workload."""
    checks = []
    for w, v in r["ratios"]["kvtier-https"].items():
        checks.append({
            "target": f"S3 vs RGW: kvtier (HTTPS) {w} ≥ {TARGET}× Ceph RGW (HTTP)",
            "ratio": v["median"], "ok": v["median"] >= TARGET,
        })  # fmt: skip
    return checks


def render(r: dict[str, Any]) -> str:
    """The markdown of the `s3-rgw` section of docs/benchmarks.md."""
    s, names = r["settings"], [n for n in r["rounds"] if n != PEER]
    load0, load1 = r["load_average_start"], r["load_average_end"]
    round_loads = [g["load"] for got in r["rounds"].values() for g in got]
    lines = [
        f"Run {r['when']} on {r['machine']}, {s['rounds']} rounds in {r['elapsed_s']:.0f} s; "
        f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, "
        f"{min(round_loads):.1f}–{max(round_loads):.1f} during the rounds (other work shared "
        "the machine: single rounds are noisy; each ratio pairs runs made back to back). "
        f"Peer: {r['rgw']}. kvtier: a dev cluster (`kvtier up --kvcache-nodes 1`) over "
        + ", ".join(f"{r['schemes'][n].upper()} ({n})" for n in names)
        + f"; RGW over {r['schemes'][PEER].upper()}. boto3 {r['boto3']}, one client per system "
        "configured alike: SigV4 with UNSIGNED-PAYLOAD, checksums only when required, path "
        "style, threads for concurrency. Per round and system: "
        f"{s['big_objects']} × 64 MiB PUT then GET, {s['medium_objects']} × 4 MiB GET, "
        f"{s['small_objects']} × 4 KiB PUT then GET; every GET compared whole, every PUT's ETag "
        "checked. Each workload runs on the systems back to back, in an order that alternates "
        "(A B C, C B A, ...); a ratio is the median over rounds of kvtier / RGW in the same "
        "round (lowest–highest round in brackets).",
        "",
        "| workload | RGW | " + " | ".join(names) + " | "
        + " | ".join(f"{n} / RGW" for n in names) + f" | target ≥ {TARGET}× (HTTPS) |",
        "|---|---|" + "---|" * (2 * len(names) + 1),
    ]  # fmt: skip
    for w, (_, _, _, unit) in WORKLOADS.items():
        fmt = "{:.2f}" if unit == "GB/s" else "{:.0f}"
        rates = [fmt.format(median_rate(r, n, w)) + f" {unit}" for n in (PEER, *names)]
        cells = [
            f"{v['median']:.2f}× ({v['low']:.2f}–{v['high']:.2f})"
            for v in (r["ratios"][n][w] for n in names)
        ]
        met = r["ratios"]["kvtier-https"][w]["median"] >= TARGET
        lines.append(f"| {w} | " + " | ".join(rates + cells) + f" | {'met' if met else 'NO'} |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Bars of kvtier / RGW per workload (median, lowest to highest round), the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in r["rounds"] if n != PEER]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    xs = np.arange(len(WORKLOADS))
    for i, name in enumerate(names):
        v = [r["ratios"][name][w] for w in WORKLOADS]
        med = np.array([x["median"] for x in v])
        err = [med - [x["low"] for x in v], [x["high"] for x in v] - med]
        ax.bar(xs + i * width, med, width, yerr=err, capsize=3, label=f"{name} / RGW")
    ax.axhline(TARGET, color="red", linestyle="--", label=f"target {TARGET}×")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs + width * (len(names) - 1) / 2, list(WORKLOADS))
    ax.set_ylabel("kvtier / Ceph RGW (same round)")
    ax.set_title("S3 with boto3: kvtier against Ceph RGW")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_section(
    quick: bool, write_doc: Callable[[str, str, str], None] | None, plain_http: bool = True
) -> dict[str, Any]:
    """What `make bench` runs."""
    result = run_rgw_bench(quick, plain_http)
    out = ROOT / "bench" / "results" / "s3_rgw.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write_doc is not None:
        plot(result, ROOT / "docs" / "img" / "s3_rgw.png")
        body = render(result) + "\n\n![kvtier against Ceph RGW](img/s3_rgw.png)"
        write_doc("s3-rgw", HEADING, body)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_rgw_bench")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and objects")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--only", default="", metavar="TEXT",
        help="run only the workloads whose name contains TEXT (e.g. '4 KiB'); nothing is saved",
    )  # fmt: skip
    parser.add_argument(
        "--no-plain-http", action="store_true", help="skip kvtier over plain HTTP (--insecure)"
    )
    args = parser.parse_args()
    for name in [w for w in WORKLOADS if args.only not in w]:
        del WORKLOADS[name]
    if not WORKLOADS:
        parser.error(f"no workload's name contains {args.only!r}")
    write_doc = None
    if not args.no_doc and not args.only:
        from bench.run import update_doc

        write_doc = update_doc
    if args.only:  # a partial run: neither the results file nor the doc is rewritten
        result = run_rgw_bench(args.quick, plain_http=not args.no_plain_http)
    else:
        result = run_section(args.quick, write_doc, plain_http=not args.no_plain_http)
    print(render(result))
    for check in result["targets"]:
        print(f"{'ok  ' if check['ok'] else 'MISS'} {check['target']}: {check['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
