"""`kvtier admin kv quota|ttl|durability`: the KV tier's operator settings (kvcache's SetQuota,
SetNamespaceTTL and SetNamespacePolicy RPCs), applied to every kvcache node of the cluster map;
`kvtier admin kv stats`: every kvcache node's statistics (`kvtier.kv_stats`), as text or JSON.

They are run-time settings of each node: a node started later, or restarted, has its start-time
settings (`tenant_quotas`, `default_tenant_quota_bytes`; docs/kvcache.md) until set again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, TextIO

from kvtier import errors, kv_stats, membership, security
from kvtier.clients import kvcache
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2

DURABILITY = {
    "none": kvcache_pb2.DURABILITY_NONE,
    "write-back": kvcache_pb2.DURABILITY_WRITE_BACK,
    "write-through": kvcache_pb2.DURABILITY_WRITE_THROUGH,
}
_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_count(text: str) -> int:
    """A size: bytes, or a number with KiB, MiB, GiB or TiB (e.g. 64GiB); at least 0."""
    raw = text.strip().lower().replace("_", "")
    unit = next((u for u in _UNITS if raw.endswith(u)), "")
    try:
        value = float(raw.removesuffix(unit)) * _UNITS.get(unit, 1) if unit else int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or e.g. 8GiB)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return int(value)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def add_parser(admin_sub: Any, state_dir_default: str, etcd_prefix: str) -> None:
    """Add `kv quota|ttl|durability` to the `admin` subcommands."""
    kv = admin_sub.add_parser("kv", help="KV tier settings on every kvcache node")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True)
    quota = kv_sub.add_parser("quota", help="a tenant's byte quota per kvcache node (0: none)")
    quota.add_argument("tenant", help="the tenant")
    quota.add_argument("bytes", type=byte_count, help="per node: bytes, or e.g. 8GiB")
    ttl = kv_sub.add_parser("ttl", help="a namespace's default block TTL (0: none)")
    ttl.add_argument("tenant", help="the namespace's tenant")
    ttl.add_argument("namespace", help="the namespace (as KVClient.connect's namespace)")
    ttl.add_argument("seconds", type=_seconds, help="seconds; 0: blocks never expire")
    durability = kv_sub.add_parser(
        "durability", help="whether a namespace's blocks also live in the durable tier"
    )
    durability.add_argument("tenant", help="the namespace's tenant")
    durability.add_argument("namespace", help="the namespace")
    durability.add_argument("level", choices=sorted(DURABILITY), help="none: DRAM only")
    stats = kv_sub.add_parser("stats", help="every kvcache node's blocks, bytes, hit rates...")
    stats.add_argument("--tenant", default="", help="one tenant's figures; none: whole nodes")
    stats.add_argument("--json", action="store_true", help="machine-readable: {node id: stats}")
    for parser in (quota, ttl, durability, stats):
        parser.add_argument("--state-dir", default=state_dir_default, help="the dev cluster")
        parser.add_argument(
            "--etcd-endpoints", default="", help="host:port list; default: the state dir's"
        )
        parser.add_argument("--etcd-prefix", default=etcd_prefix, help="the cluster's etcd prefix")
        parser.add_argument("--timeout-s", type=float, default=5.0, help="per node")


async def _apply(
    address: str, args: argparse.Namespace, sec: security.ClientSecurity | None
) -> None:
    async with kvcache.KVCacheClient(address, timeout_s=args.timeout_s, security=sec) as client:
        if args.kv_command == "quota":
            await client.set_quota(args.tenant, args.bytes)
        elif args.kv_command == "ttl":
            await client.set_namespace_ttl(args.tenant, args.namespace, args.seconds)
        else:
            await client.set_namespace_policy(args.tenant, args.namespace, DURABILITY[args.level])


async def run(
    endpoints: tuple[str, ...],
    args: argparse.Namespace,
    out: TextIO,
    sec: security.ClientSecurity | None = None,
) -> int:
    """Apply the setting on every kvcache node of the map; one line per node; 0 when every
    node took it. Raises Unavailable when the map has no kvcache node."""
    store = membership.EtcdMembership(endpoints, args.etcd_prefix, security=sec)
    await store.connect(wait_s=args.timeout_s)
    try:
        cmap = (await store.get_map()).map
    finally:
        await store.close()
    nodes = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_KVCACHE]
    if not nodes:
        raise errors.Unavailable("no kvcache node in the cluster map")
    if args.kv_command == "stats":
        return await _stats(nodes, args, out, sec)
    results = await asyncio.gather(
        *(_apply(n.grpc_address, args, sec) for n in nodes), return_exceptions=True
    )
    failed = 0
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, errors.KVTierError):
            failed += 1
            out.write(f"{node.node_id}: failed: {result}\n")
        elif isinstance(result, BaseException):
            raise result
        else:
            out.write(f"{node.node_id}: set\n")
    return 1 if failed else 0


async def _one_stats(
    address: str, args: argparse.Namespace, sec: security.ClientSecurity | None
) -> kv_stats.KVStats:
    async with kvcache.KVCacheClient(address, timeout_s=args.timeout_s, security=sec) as client:
        return kv_stats.KVStats.from_proto(await client.stats(args.tenant))


async def _stats(
    nodes: list[common_pb2.NodeInfo],
    args: argparse.Namespace,
    out: TextIO,
    sec: security.ClientSecurity | None,
) -> int:
    """`kv stats`: each node's statistics; a node that did not answer is named (and exit 1)."""
    results = await asyncio.gather(
        *(_one_stats(n.grpc_address, args, sec) for n in nodes), return_exceptions=True
    )
    found: dict[str, kv_stats.KVStats] = {}
    failed: dict[str, str] = {}
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, errors.KVTierError):
            failed[node.node_id] = str(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            found[node.node_id] = result
    if args.json:
        shown = {node_id: s.as_dict() for node_id, s in sorted(found.items())}
        out.write(json.dumps({"nodes": shown, "failed": failed}, indent=2) + "\n")
    else:
        out.write(kv_stats.render(found) + "\n")
        for node_id, why in sorted(failed.items()):
            out.write(f"{node_id}: failed: {why}\n")
    return 1 if failed else 0
