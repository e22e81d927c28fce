"""`kvtier admin pool status|add|drain|remove`: the pools of the object tier (ARCHITECTURE.md,
"Pool states"; docs/operations.md, "Growing and shrinking the object tier").

- status: every pool with its state, sets, layout, drives (online) and capacity (the drives'
  own figures), and the pending drives; from the cluster map (metadata service).
- add: pools form by themselves once `pool_drives` drives are pending (the metadata service's
  setting, shown in the map): says how many are pending and how many more a new pool needs.
- drain INDEX: moves every object of the pool to the other active pools through a gateway, with
  progress on stderr (a bar with bytes and the time left on a terminal, a line every few
  seconds otherwise); exit 0 when the pool is DRAINED. Run it again after an error.
- remove INDEX: retires a DRAINED pool (it stays in the map as a tombstone); refused otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from kvtier import kv_stats, security
from kvtier.cli import admin as admin_cmd
from kvtier.cli import progress as progress_mod
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2


def add_parser(admin_sub: Any, default_state_dir: str) -> None:
    """`kvtier admin pool ...` under `kvtier admin`."""
    pool = admin_sub.add_parser("pool", help="pools of the object tier: status, add, drain, remove")
    sub = pool.add_subparsers(dest="pool_command", required=True)
    status = sub.add_parser("status", help="every pool: state, sets, drives, capacity")
    add = sub.add_parser(
        "add",
        help="how a new pool forms (from pending drives) and how many drives it still needs",
    )
    drain = sub.add_parser(
        "drain",
        help="move every object of a pool to the other pools (progress; run again to resume)",
    )
    drain.add_argument("index", type=int, help="the pool's index (not 0)")
    remove = sub.add_parser("remove", help="retire a drained pool (refused unless drained)")
    remove.add_argument("index", type=int, help="the pool's index")
    for parser in (status, add, drain, remove):
        parser.add_argument("--state-dir", default=default_state_dir, help="dev cluster to use")
    for parser in (status, add):
        parser.add_argument("--metadata", default="", help="metadata gRPC host:port")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    for parser in (drain, remove):
        parser.add_argument("--gateway", default="", help="gateway gRPC host:port")


async def run(
    args: argparse.Namespace, out: TextIO, err: TextIO, sec: security.ClientSecurity
) -> int:
    """Run `kvtier admin pool <command>`; the exit code."""
    if args.pool_command in ("status", "add"):
        address = admin_cmd.metadata_address(args.metadata, args.state_dir, sec)
        async with metadata_client.MetadataClient(address, timeout_s=10.0, security=sec) as meta:
            cmap = await meta.get_cluster_map()
        assert cmap is not None
        if args.pool_command == "status":
            out.write(_json(pools(cmap)) if args.json else render_status(cmap))
        else:
            out.write(_json(pending(cmap)) if args.json else render_add(cmap))
        return 0
    address = admin_cmd.gateway_address(args.gateway, args.state_dir, sec)
    async with gateway_client.AdminServiceClient(address, security=sec) as admin:
        if args.pool_command == "remove":
            epoch = await admin.remove_pool(args.index)
            out.write(
                f"pool {args.index} retired (map epoch {epoch}): nothing is placed in or read "
                "from it again; its drives may be wiped and announced again as new drives\n"
            )
            return 0
        last = await drain(admin, args.index, err)
    out.write(drain_summary(last) + "\n")
    return 0 if last.drained else 1


async def drain(
    admin: gateway_client.AdminServiceClient, index: int, err: TextIO, tty: bool | None = None
) -> admin_pb2.DrainProgress:
    """Drain pool index, showing progress on err; the last message."""
    display = DrainDisplay(err, tty=tty)
    last = admin_pb2.DrainProgress()
    try:
        async for progress in admin.drain_pool(index):
            last = progress
            if not progress.done:
                display.show(progress)
    finally:
        display.clear()
    return last


def pools(cmap: common_pb2.ClusterMap) -> list[dict[str, Any]]:
    """Every pool as a dict: index, state, sets, layout, drives, online, total/free bytes."""
    drives = {d.drive_id: d for n in cmap.nodes for d in n.drives}
    rows = []
    for pool in cmap.pools:
        slots = [s for es in pool.sets for s in es.slots]
        first = pool.sets[0] if pool.sets else common_pb2.ErasureSet()
        rows.append(
            {
                "index": pool.index,
                "state": common_pb2.PoolState.Name(pool.state).removeprefix("POOL_STATE_"),
                "sets": len(pool.sets),
                "layout": f"{first.data_shards}+{first.parity_shards}",
                "drives": len(slots),
                "online": sum(s.state == common_pb2.DRIVE_STATE_ONLINE for s in slots),
                "total_bytes": sum(
                    drives[s.drive_id].total_bytes for s in slots if s.drive_id in drives
                ),
                "free_bytes": sum(
                    drives[s.drive_id].free_bytes for s in slots if s.drive_id in drives
                ),
                "formed_at_epoch": pool.formed_at_epoch,
            }
        )
    return rows


def pending(cmap: common_pb2.ClusterMap) -> dict[str, Any]:
    """The pending drives and how many a new pool needs."""
    count = len(cmap.pending_drives)
    return {
        "pending_drives": [
            {"drive_id": d.drive_id, "node_id": d.node_id} for d in cmap.pending_drives
        ],
        "pool_drives": cmap.pool_drives,
        "needed": max(0, cmap.pool_drives - count) if cmap.pool_drives else None,
    }


def render_status(cmap: common_pb2.ClusterMap) -> str:
    """A table of the pools, then the pending drives."""
    lines = [
        f"{'POOL':5} {'STATE':9} {'SETS':>4} {'LAYOUT':>6} {'DRIVES':>9} {'SIZE':>10} {'FREE':>10}"
    ]
    for row in pools(cmap):
        online = f"{row['online']}/{row['drives']}"
        size, free = (kv_stats.human_bytes(row[k]) for k in ("total_bytes", "free_bytes"))
        lines.append(
            f"{row['index']:<5} {row['state']:9} {row['sets']:>4} {row['layout']:>6} {online:>9} "
            f"{size:>10} {free:>10}"
        )
    lines.append(_pending_line(cmap))
    return "\n".join(lines) + "\n"


def render_add(cmap: common_pb2.ClusterMap) -> str:
    """What `pool add` says: pools form from pending drives by themselves."""
    text = [_pending_line(cmap)]
    for drive in cmap.pending_drives:
        text.append(f"  {drive.drive_id} on {drive.node_id}")
    if cmap.pool_drives:
        text.append(
            f"A new pool forms by itself as soon as {cmap.pool_drives} drives are pending (the "
            "metadata service's pool_drives): start datanodes with new drives; each announces "
            "its drives and the metadata service adds the pool to the map. Existing objects "
            "stay where they are; new ones spread over every active pool by free space."
        )
    else:
        text.append("The metadata service's pool_drives is 0: no pool forms by itself.")
    return "\n".join(text) + "\n"


def _pending_line(cmap: common_pb2.ClusterMap) -> str:
    count = len(cmap.pending_drives)
    if not cmap.pool_drives:
        return f"pending drives: {count}"
    need = max(0, cmap.pool_drives - count)
    return f"pending drives: {count} (a new pool forms at {cmap.pool_drives}: {need} more needed)"


class DrainDisplay:
    """Drain progress on a stream (`progress.Line`, as `kvtier admin heal` shows its
    progress)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._line = progress_mod.Line(stream, tty=tty, clock=clock)
        self.meter = progress_mod.Meter(clock)

    def show(self, progress: admin_pb2.DrainProgress) -> None:
        """Progress so far."""
        self._line.show(
            lambda: render_bar(progress, self.meter),
            lambda: f"drain: {render_bar(progress, self.meter, bar=False)}",
        )

    def clear(self) -> None:
        """Remove the bar (at the end)."""
        self._line.clear()


def render_bar(
    progress: admin_pb2.DrainProgress, meter: progress_mod.Meter, *, bar: bool = True
) -> str:
    """'[####....]  50% 1.0 MiB of 2.0 MiB, 1.0 MiB/s, ETA 1s; moved 3 of 6, ...  bucket/key'."""
    totals = progress_mod.Totals(objects=progress.objects_total, bytes=progress.bytes_total)
    done = progress.objects_moved + progress.objects_dropped
    rate = meter.text(done, progress.bytes_moved, totals)
    head = ""
    if bar:
        head = progress_mod.bar_text(meter.fraction(done, progress.bytes_moved, totals) or 0.0)
    return f"{head}{rate}; {render_counts(progress)}  {progress.current_key}"


def render_counts(progress: admin_pb2.DrainProgress) -> str:
    """'moved 3 of 6, dropped 0, errors 0' (+ pass and uploads when they matter)."""
    text = (
        f"moved {progress.objects_moved} of {progress.objects_total}, "
        f"dropped {progress.objects_dropped}, errors {progress.errors}"
    )
    if progress.passes > 1:
        text += f", pass {progress.passes}"
    if progress.uploads_pending:
        text += f", uploads in progress {progress.uploads_pending}"
    return text


def drain_summary(progress: admin_pb2.DrainProgress) -> str:
    """The last line: the counts, then whether the pool is drained and what to do if not."""
    moved = kv_stats.human_bytes(progress.bytes_moved)
    text = f"{render_counts(progress)}; {moved} moved"
    if progress.drained:
        return text + "; the pool is DRAINED (kvtier admin pool remove retires it)"
    why = []
    if progress.uploads_pending:
        why.append(f"{progress.uploads_pending} multipart uploads still have parts in it")
    if progress.last_error:
        why.append(f"last error: {progress.last_error}")
    return text + "; NOT drained (" + "; ".join(why or ["objects are left"]) + "): run it again"


def _json(value: Any) -> str:
    return json.dumps(value) + "\n"
