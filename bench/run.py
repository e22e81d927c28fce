"""`make bench`: measure, check the targets as ratios of this run's ceilings, write the report.

Usage: python -m bench.run [--quick] [--no-doc] [--skip-kv] [--skip-objects] [--skip-s3]
                           [--skip-rgw] [--skip-security] [--skip-e2e] [--skip-nixl]
                           [--skip-tracing] [--skip-kv-events] [--skip-scale]
Writes bench/results/<name>.json, docs/img/<name>.png and the matching section of
docs/benchmarks.md (between `<!-- <name>:begin -->` and `<!-- <name>:end -->`).
The KV-cache section (bench/kv_bench.py) installs its peers with scripts/bench_peers.sh first;
the object-tier section (bench/object_bench.py) starts and stops a dev cluster of its own; the
security section (bench/security_bench.py) an insecure and a secure one, and reports what
authentication and TLS cost as ratios between them; the S3-against-RGW section
(bench/s3_rgw_bench.py) installs Ceph from Debian when it is missing and starts and stops a
one-OSD Ceph cluster with radosgw (bench/rgw.py) beside two dev clusters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

from bench import common as bench_common

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import (
    ceilings,
    eviction_trace,
    kv_bench,
    kv_events_bench,
    nixl_bench,
    object_bench,
    s3_bench,
    s3_rgw_bench,
    scale_model,
    security_bench,
    tracing_bench,
    transport_bench,
)
from bench.e2e import sweep as e2e_sweep
from kvtier.transport import registry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
KIB, MIB = 1024, 1024 * 1024


def _label(block: int) -> str:
    return f"{block // MIB} MiB" if block >= MIB else f"{block // KIB} KiB"


def run_transport(quick: bool) -> dict[str, Any]:
    seconds = 0.25 if quick else 0.6
    result: dict[str, Any] = {
        "machine": bench_common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ceilings": {
            "memcpy_gbps": {str(b): ceilings.memcpy_gbps(b) for b in (2 * MIB, 32 * MIB)},
            "raw_socket_gbps": ceilings.raw_socket_gbps(
                total_bytes=(1024 if quick else 4096) * MIB
            ),
            "erasure_gbps": ceilings.erasure_gbps(seconds=0.2 if quick else 0.4),
        },
        "transports": {},
    }
    p50, p99 = ceilings.raw_round_trip_us(2000 if quick else 5000)
    result["ceilings"]["raw_rtt_us"] = {"p50": p50, "p99": p99}
    for name in ("tcp", "shm", "rdma"):
        if name not in registry.available():
            result["transports"][name] = None
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        result["transports"][name] = transport_bench.measure(name, seconds)
    result["targets"] = _targets(result)
    return result


def _targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    c = r["ceilings"]
    memcpy = max(c["memcpy_gbps"].values())
    checks = []
    for name, ceiling, floor, what in (
        ("tcp", c["raw_socket_gbps"], 0.8, "raw-socket throughput"),
        ("shm", memcpy, 0.7, "memcpy throughput"),
    ):
        t = r["transports"].get(name)
        if not t:
            continue
        for block in (2 * MIB, 32 * MIB):
            best = max(t["throughput_gbps"][f"{block}x{b}"] for b in transport_bench.BATCHES)
            ratio = best / ceiling
            checks.append(
                {
                    "target": f"{name} {_label(block)} reads ≥ {floor:.0%} of {what}",
                    "ratio": ratio,
                    "ok": ratio >= floor,
                }
            )
    for name, t in r["transports"].items():
        if t:
            ratio = t["latency_us"]["p50"] / c["raw_rtt_us"]["p50"]
            checks.append(
                {
                    "target": f"{name} 64 KiB read p50 ≤ 5× raw 64 B round trip",
                    "ratio": ratio,
                    "ok": ratio <= 5.0,
                }
            )
    return checks


def plot_transport(r: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, batch in zip(axes, transport_bench.BATCHES, strict=True):
        for name, t in r["transports"].items():
            if not t:
                continue
            ys = [t["throughput_gbps"][f"{b}x{batch}"] for b in transport_bench.BLOCKS]
            ax.plot([_label(b) for b in transport_bench.BLOCKS], ys, marker="o", label=name)
        ax.axhline(r["ceilings"]["raw_socket_gbps"], ls="--", c="grey", label="raw socket")
        ax.axhline(max(r["ceilings"]["memcpy_gbps"].values()), ls=":", c="black", label="memcpy")
        ax.set_title(f"read throughput, batch {batch}")
        ax.set_xlabel("block size")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_transport(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    lines = [
        f"Measured {r['date']} on {r['machine']} (one run; ratios are what count).",
        "",
        "| ceiling | value |",
        "|---|---|",
        f"| memcpy, preallocated (2 MiB / 32 MiB) | {c['memcpy_gbps'][str(2 * MIB)]:.2f} / "
        f"{c['memcpy_gbps'][str(32 * MIB)]:.2f} GB/s |",
        f"| raw TCP socket, one stream, recv_into | {c['raw_socket_gbps']:.2f} GB/s |",
        f"| raw 64 B round trip p50 / p99 | {c['raw_rtt_us']['p50']:.1f} / "
        f"{c['raw_rtt_us']['p99']:.1f} µs |",
        f"| RS 8+4 (ISA-L), 1 MiB blocks: encode / rebuild 2 / rebuild 4 data shards | "
        f"{_erasure_cell(c['erasure_gbps'])} |",
        "",
        "Read throughput (GB/s) by block size × batch, and 64 KiB read latency:",
        "",
        "| transport | "
        + " | ".join(
            f"{_label(b)}×{n}" for b in transport_bench.BLOCKS for n in transport_bench.BATCHES
        )
        + " | 64 KiB p50 / p99 |",
        "|---|" + "---|" * (len(transport_bench.BLOCKS) * len(transport_bench.BATCHES) + 1),
    ]
    for name, t in r["transports"].items():
        if not t:
            lines.append(f"| {name} | not available on this machine |")
            continue
        cells = [
            f"{t['throughput_gbps'][f'{b}x{n}']:.2f}"
            for b in transport_bench.BLOCKS
            for n in transport_bench.BATCHES
        ]
        lat = t["latency_us"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {lat['p50']:.0f} / {lat['p99']:.0f} µs |"
        )
    lines += ["", "| target | ratio in this run | met |", "|---|---|---|"]
    for check in r["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {'yes' if check['ok'] else 'NO'} |"
        )
    lines += ["", "![transport throughput](img/transport.png)"]
    return "\n".join(lines)


def _erasure_cell(gbps: dict[str, float] | None) -> str:
    if gbps is None:
        return "libisal2 not installed"
    rates = (gbps["encode"], gbps["reconstruct_2"], gbps["reconstruct_4"])
    return " / ".join(f"{r:.2f}" for r in rates) + " GB/s of data"


def update_doc(section: str, heading: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    DOC.write_text(text)


def run_eviction(seed: int = 1) -> None:
    """KV-cache eviction: LRU against S3-FIFO on a prefix trace with one-off long prompts."""
    trace = eviction_trace.generate(eviction_trace.TraceConfig(), seed)
    rows = eviction_trace.compare(trace)
    eviction_trace.plot(rows, ROOT / "docs" / "img" / "eviction.png")
    lookups = sum(len(chain) for chain in trace.requests)
    body = "\n".join(
        [
            f"Trace: seed {seed}, {len(trace.requests)} requests, {lookups} block lookups, "
            f"{trace.unique_bytes // trace.block_bytes} unique 2 MiB blocks "
            "(`python -m bench.eviction_trace`; a simulation of the policies, no I/O).",
            "",
            eviction_trace.table(rows),
            "",
            "![eviction hit rates](img/eviction.png)",
        ]
    )
    update_doc("eviction", "KV-cache eviction policy (hit rates)", body)
    print(eviction_trace.table(rows))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--skip-kv", action="store_true", help="skip the KV-cache peer benchmark")
    parser.add_argument(
        "--skip-objects", action="store_true", help="skip the object-tier (dev cluster) benchmark"
    )
    parser.add_argument(
        "--skip-s3", action="store_true", help="skip the S3 API (boto3, dev cluster) benchmark"
    )
    parser.add_argument(
        "--skip-rgw",
        action="store_true",
        help="skip kvtier's S3 against Ceph RGW (installs Ceph from Debian when missing)",
    )
    parser.add_argument(
        "--skip-security",
        action="store_true",
        help="skip the cost of security (an insecure and a secure dev cluster)",
    )
    parser.add_argument(
        "--skip-e2e", action="store_true", help="skip the end-to-end restore-vs-recompute sweep"
    )
    parser.add_argument(
        "--skip-tracing",
        action="store_true",
        help="skip the cost of tracing when sampled out (one dev cluster)",
    )
    parser.add_argument(
        "--skip-kv-events",
        action="store_true",
        help="skip what KV events cost and Score's latency (two dev clusters)",
    )
    parser.add_argument(
        "--skip-nixl", action="store_true", help="skip NIXL OBJ against the S3 gateway"
    )
    parser.add_argument(
        "--skip-scale", action="store_true", help="skip the scale model (a simulation, no cluster)"
    )
    args = parser.parse_args()
    result = run_transport(args.quick)
    print(f"erasure coding ceiling: {_erasure_cell(result['ceilings']['erasure_gbps'])}")
    out = ROOT / "bench" / "results" / "transport.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not args.no_doc:
        plot_transport(result, ROOT / "docs" / "img" / "transport.png")
        update_doc("transport", "Data-plane transports", render_transport(result))
        run_eviction()
    if not args.skip_kv:
        kv = kv_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += kv["targets"]
    if not args.skip_objects:
        objs = object_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += objs["targets"]
    if not args.skip_s3:
        s3 = s3_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += s3["targets"]
    if not args.skip_nixl:
        nixl = nixl_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += nixl["targets"]
    if not args.skip_rgw:
        rgw = s3_rgw_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += rgw["targets"]
    if not args.skip_security:
        sec = security_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += sec["targets"]
    if not args.skip_tracing:
        traced = tracing_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += traced["targets"]
    if not args.skip_scale:
        scale = scale_model.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += scale["targets"]
    if not args.skip_kv_events:
        events = kv_events_bench.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += events["targets"]
    if not args.skip_e2e:
        e2e = e2e_sweep.run_section(args.quick, None if args.no_doc else update_doc)
        result["targets"] += e2e["targets"]
    for check in result["targets"]:
        print(f"{'ok  ' if check['ok'] else 'MISS'} {check['target']}: {check['ratio']:.2f}")
    return 0 if all(c["ok"] for c in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
