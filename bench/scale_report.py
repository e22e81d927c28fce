"""The report of the scale model (bench/scale_model.py): the `scale` section of
docs/benchmarks.md and docs/img/scale.png, from the model's result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} B"


def plot(r: dict[str, Any], path: Path) -> None:
    """docs/img/scale.png: the map against etcd's limit, and what fans out of etcd per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [m["nodes"] for m in r["maps"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ns, [m["map_bytes"] / MIB for m in r["maps"]], marker="o", label="cluster map")
    left.axhline(1.5, ls="--", c="red", label="etcd request limit (1.5 MiB)")
    left.axhline(4, ls=":", c="black", label="gRPC message limit (4 MiB)")
    left.axvline(r["map_limit_nodes"], ls="--", c="grey")
    left.set_xlabel("nodes")
    left.set_ylabel("MiB")
    left.set_title("serialized ClusterMap (one etcd key)")
    left.legend()
    left.grid(alpha=0.3)
    c = r["curves"]
    right.loglog(ns, [x["change_egress_bytes"] for x in c], marker="o", label="one join/leave")
    right.loglog(ns, [x["rolling_restart_egress_bytes"] for x in c], marker="o",
                 label="rolling restart (2N changes)")  # fmt: skip
    right.loglog(ns, [x["client_map_bytes_per_s"] for x in c], marker="o",
                 label=f"{r['load']['clients']:,} KV clients polling, per second")  # fmt: skip
    right.set_xlabel("nodes")
    right.set_ylabel("bytes")
    right.set_title("map bytes sent: etcd fan-out and client polling")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(r: dict[str, Any]) -> str:
    """The `scale` section of docs/benchmarks.md."""
    load, objs = r["load"], r["objects"]
    lines = [
        f"Computed {r['date']} on {r['machine']}{' (--quick)' if r['quick'] else ''} "
        "(`python -m bench.scale_model`: the project's placement, reconcile and rendezvous code "
        "on simulated nodes; no processes). The model, its assumptions and the next design: "
        "[scaling.md](scaling.md).",
        "",
        "| nodes | pools | map bytes | of which node records | reconcile |",
        "|---|---|---|---|---|",
    ]
    for m in r["maps"]:
        lines.append(
            f"| {m['nodes']:,} | {m['pools']} | {_size(m['map_bytes'])} | "
            f"{_size(m['nodes_part_bytes'])} | {m['reconcile_ms']:.1f} ms |"
        )
    lines += [
        "",
        f"The map passes etcd's 1.5 MiB request limit at **{r['map_limit_nodes']:,} nodes** "
        f"({r['map_fit']['bytes_per_node']:.0f} bytes per node; built there: "
        f"{_size(r['map_at_limit_bytes'])}) and the 4 MiB gRPC message limit at "
        f"{r['grpc_limit_nodes']:,}; one rolling restart fills etcd's default 2 GiB quota "
        f"(no compaction is configured) from {r['load']['quota_nodes']:,} nodes.",
        "",
        "| KV nodes | keys | moved on join | 1/(N+1) | stray moves (direct) |",
        "|---|---|---|---|---|",
    ]
    for row in r["kv"]:
        lines.append(
            f"| {row['kv_nodes']} | {row['keys']:,} | {row['moved_fraction']:.4f} "
            f"± {row['interval']:.4f} | {row['expected']:.4f} | {row['direct']['stray']} of "
            f"{row['direct']['keys']:,} |"
        )
    change, steady = load["change"], load["steady"]
    lines += [
        "",
        f"Objects ({objs['sample']:,} names in the {r['target_nodes']:,}-node map, {objs['pools']} "
        f"pools): moved when a pool is added {objs['moved_on_pool_add']}; largest set "
        f"{objs['set_max_over_mean']:.3f}x the mean; a set count change would move "
        f"{objs['mod_change_moved']:.1%}.",
        "",
        f"At {r['target_nodes']:,} nodes and {load['clients']:,} clients: one membership change = "
        f"{change['etcd_writes']:g} etcd writes, {change['watch_events']:,} watch events, "
        f"{_size(change['egress_bytes'])} out of etcd; KV clients poll "
        f"{steady['client_map_rpcs_per_s']:,.0f} maps/s = "
        f"{_size(steady['client_map_bytes_per_s'])}/s from the metadata service (one 10 Gb/s "
        f"link per replica serves {load['clients_per_link_budget']:,} clients).",
        "",
        "| scenario | changes | etcd writes/s | watch events/s | etcd egress/s | total egress | "
        "MVCC history (no compaction) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in load["churn"]:
        lines.append(
            f"| {c['name']} | {c['changes']:,} | {c['etcd_writes_per_s']:.2f} | "
            f"{c['watch_events_per_s']:,.0f} | {_size(c['egress_bytes_per_s'])}/s | "
            f"{_size(c['total_egress_bytes'])} | {_size(c['history_bytes'])} "
            f"({c['quota_fraction']:.0%} of the 2 GiB quota) |"
        )
    lines += ["", "| model check | value | met |", "|---|---|---|"]
    for check in r["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.3f} | {'yes' if check['ok'] else 'NO'} |"
        )
    lines += ["", "![scale model](img/scale.png)"]
    return "\n".join(lines)
