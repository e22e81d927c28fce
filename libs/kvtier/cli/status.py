"""`kvtier status` and `kvtier health` (no address): every node of a cluster with its role,
addresses, health and epoch, and whether the cluster is degraded (`problems`)."""

from __future__ import annotations

import asyncio
from typing import Any

from kvtier import clustermap, errors, membership, rpc, security
from kvtier.clients import kvcache, node
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import registry

#: The health of a node a user cannot probe (no users' port) that holds its lease.
LEASED = "LEASED"


async def _node_epoch(
    address: str | None,
    timeout_s: float,
    sec: security.ClientSecurity | None,
    tokens: security.TokenSource | None = None,
) -> int | None:
    if address is None:
        return None
    async with node.NodeClient(address, timeout_s=timeout_s, security=sec, tokens=tokens) as client:
        try:
            return int((await client.get_node_info()).map_epoch)
        except errors.KVTierError:
            return None


async def _kv_stats(
    info: common_pb2.NodeInfo,
    address: str | None,
    timeout_s: float,
    sec: security.ClientSecurity | None,
    tokens: security.TokenSource | None = None,
) -> dict[str, Any] | None:
    """A kvcache node's fill and hit rate (None for other roles or when it does not answer)."""
    if info.role != common_pb2.NODE_ROLE_KVCACHE or address is None:
        return None
    async with kvcache.KVCacheClient(
        address, timeout_s=timeout_s, security=sec, tokens=tokens
    ) as client:
        try:
            stats = await client.stats()
        except errors.KVTierError:
            return None
    return {
        "arena_bytes": stats.arena_bytes,
        "fill": stats.fill,
        "blocks": stats.blocks,
        "hit_rate": stats.hit_rate,
        "hits": stats.hits,
        "durable_hits": stats.durable_hits,
        "misses": stats.misses,
        "evictions": dict(stats.evictions),
        "spilled": stats.spilled,
        "spill_queue_bytes": stats.spill_queue_bytes,
        "spill_failures": stats.spill_failures,
        "durable_available": stats.durable_available,
    }


def _chosen(
    offered: common_pb2.DataPlaneCapabilities, local: common_pb2.DataPlaneCapabilities
) -> str | None:
    """The transport this client would use with the node (None: the node has no data plane)."""
    if not offered.endpoints:
        return None
    try:
        return registry.choose(offered, local).name
    except errors.Unavailable:
        return "none in common"


async def collect(
    endpoints: tuple[str, ...],
    prefix: str,
    timeout_s: float,
    sec: security.ClientSecurity | None = None,
) -> dict[str, Any]:
    """The cluster's state: the map from etcd, plus each live node's health and epoch (as an
    operator: sec holds the operator certificate)."""
    store = membership.EtcdMembership(endpoints, prefix, security=sec)
    await store.connect(wait_s=timeout_s)
    try:
        cmap = (await store.get_map()).map
    finally:
        await store.close()
    return await describe(cmap, timeout_s, sec)


async def describe(
    cmap: common_pb2.ClusterMap,
    timeout_s: float,
    sec: security.ClientSecurity | None = None,
    tokens: security.TokenSource | None = None,
) -> dict[str, Any]:
    """collect()'s result for a map in hand. With tokens (a user's session, the console) each
    node is asked on its users' port; a node without one (datanodes) is not probed: its
    health is LEASED (it holds its etcd lease, or it would not be in the map)."""

    def address(n: common_pb2.NodeInfo) -> str | None:
        if tokens is None:
            return str(n.grpc_address)
        return str(n.client_address) or None

    async def health_of(n: common_pb2.NodeInfo) -> str:
        where = address(n)
        if where is None:
            return LEASED
        return await rpc.check_health(where, timeout_s=timeout_s, security=sec)

    health = await asyncio.gather(*(health_of(n) for n in cmap.nodes))
    epochs = await asyncio.gather(
        *(_node_epoch(address(n), timeout_s, sec, tokens) for n in cmap.nodes)
    )
    kv_stats = await asyncio.gather(
        *(_kv_stats(n, address(n), timeout_s, sec, tokens) for n in cmap.nodes)
    )
    local = registry.client_capabilities()
    nodes = [
        {
            "node_id": n.node_id,
            "role": clustermap.role_name(n.role),
            "address": n.grpc_address,
            "metrics": n.metrics_address,
            "s3": f"{'https' if n.tls else 'http'}://{n.s3_address}" if n.s3_address else None,
            "health": h,
            "epoch": e,
            "pid": n.pid,
            "drives": [d.drive_id for d in n.drives],
            "dataplane_offered": [e.name for e in n.dataplane.endpoints],
            "dataplane": _chosen(n.dataplane, local),
            "kvcache": kv,
        }
        for n, h, e, kv in zip(cmap.nodes, health, epochs, kv_stats, strict=True)
    ]
    live = {n.node_id for n in cmap.nodes}
    # A retired pool is a tombstone (ARCHITECTURE.md, "Pool states"): its drives may be gone.
    in_use = [p for p in cmap.pools if p.state != common_pb2.POOL_STATE_RETIRED]
    absent = sorted(
        {
            slot.node_id
            for pool in in_use
            for es in pool.sets
            for slot in es.slots
            if slot.node_id not in live
        }
    )
    pools = [
        {
            "index": pool.index,
            "sets": [
                {
                    "index": es.index,
                    "layout": f"EC:{es.data_shards}+{es.parity_shards}",
                    "online": sum(s.state == common_pb2.DRIVE_STATE_ONLINE for s in es.slots),
                    "drives": len(es.slots),
                }
                for es in pool.sets
            ],
        }
        for pool in in_use
    ]
    state: dict[str, Any] = {
        "epoch": cmap.epoch,
        "deployment_id": cmap.deployment_id,
        "nodes": nodes,
        "down": absent,
        "pools": pools,
        "pending_drives": len(cmap.pending_drives),
    }
    state["problems"] = problems(state)
    state["healthy"] = not state["problems"]
    return state


def problems(state: dict[str, Any]) -> list[str]:
    """What makes the cluster degraded, one phrase each: a node not SERVING, a datanode DOWN
    (in a set but not in the map), a set with drives offline, a role with no node, no pool."""
    found = [
        f"{n['node_id']} is {n['health']}"
        for n in state["nodes"]
        if n["health"] not in ("SERVING", LEASED)
    ]
    found += [f"{node_id} is DOWN" for node_id in state["down"]]
    for pool in state["pools"]:
        found += [
            f"pool {pool['index']} set {s['index']}: {s['online']}/{s['drives']} drives online"
            for s in pool["sets"]
            if s["online"] < s["drives"]
        ]
    roles = {n["role"] for n in state["nodes"]}
    found += [
        f"no {role} in the cluster map" for role in ("metadata", "gateway") if role not in roles
    ]
    if not state["pools"]:
        found.append(f"no pool formed ({state['pending_drives']} drives pending)")
    return found


def render_health(state: dict[str, Any]) -> str:
    """`kvtier health`'s cluster-wide lines: each node's health, then the verdict."""
    lines = [
        f"{n['node_id']:14} {n['role']:9} {n['address']:22} {n['health']}" for n in state["nodes"]
    ]
    lines += [f"{node_id:14} {'datanode':9} {'-':22} DOWN" for node_id in state["down"]]
    return "\n".join([*lines, _verdict(state)])


def _verdict(state: dict[str, Any]) -> str:
    if state["problems"]:
        return "cluster DEGRADED: " + "; ".join(state["problems"])
    return "cluster healthy"


def render(state: dict[str, Any]) -> str:
    """A human-readable table of collect()'s result."""
    rows = [
        (
            "NODE", "ROLE", "ADDRESS", "METRICS", "HEALTH", "EPOCH", "DATA PLANE (offered)",
            "KV FILL / HITS",
        )
    ]  # fmt: skip
    rows += [
        (
            n["node_id"],
            n["role"],
            n["address"],
            n.get("metrics") or "-",
            n["health"],
            str(n["epoch"] or "-"),
            f"{n['dataplane']} ({','.join(n['dataplane_offered'])})" if n["dataplane"] else "-",
            _kv_cell(n.get("kvcache")),
        )
        for n in state["nodes"]
    ]
    rows += [(node_id, "datanode", "-", "-", "DOWN", "-", "-", "-") for node_id in state["down"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"cluster map epoch {state['epoch']}  deployment {state['deployment_id']}"]
    endpoints = [n["s3"] for n in state["nodes"] if n.get("s3")]
    lines.append(f"S3 endpoint: {', '.join(endpoints) or '(none: no gateway serves S3)'}")
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    for pool in state["pools"]:
        sets = ", ".join(
            f"set {s['index']} {s['layout']} {s['online']}/{s['drives']} online"
            for s in pool["sets"]
        )
        lines.append(f"pool {pool['index']}: {sets}")
    if state["pending_drives"]:
        lines.append(f"{state['pending_drives']} drives pending (not yet in a pool)")
    lines.append(_verdict(state))
    return "\n".join(lines)


def _kv_cell(kv: dict[str, Any] | None) -> str:
    if not kv:
        return "-"
    durable_hits = kv.get("durable_hits", 0)
    reads = kv["hits"] + durable_hits + kv["misses"]
    hits = f"{kv['hit_rate']:.1%} of {reads}" if reads else "no reads"
    if durable_hits:  # by tier: DRAM / read through from the durable tier
        hits += f" (dram {kv['hits'] / reads:.1%}, durable {durable_hits / reads:.1%})"
    cell = f"{kv['fill']:.1%} of {kv['arena_bytes'] >> 20} MiB, {kv['blocks']} blocks / {hits}"
    if kv.get("spilled") or kv.get("spill_queue_bytes"):
        cell += f" / spilled {kv['spilled']}, {kv['spill_queue_bytes'] >> 10} KiB queued"
    return cell
