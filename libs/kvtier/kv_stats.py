"""`KVStats`: one kvcache node's statistics as a typed record (what `AsyncKVClient.stats()` and
`kvtier admin kv stats` return per node), and its text rendering.

The fields are those of `kvtier.kvcache.v1.StatsResponse`, with the same names and meanings
(a unit test keeps the two in step); counters count since the node started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KVStats:
    """One kvcache node's statistics, for one tenant (`tenant`) or the whole node (`tenant`
    empty). Whole-node figures whatever the tenant: `arena_bytes`, `fill`, `max_block_bytes`,
    the fragmentation ratios, `spill_queue_bytes` and `durable_available`."""

    tenant: str = ""  # empty: the whole node
    arena_bytes: int = 0  # the node's DRAM pool
    fill: float = 0.0  # allocated capacity / arena (0..1)
    blocks: int = 0  # committed blocks
    pending_puts: int = 0  # puts whose bytes are still arriving
    used_bytes: int = 0  # slot capacity held (pending, linked, leased)
    requested_bytes: int = 0  # bytes callers asked for: what quotas count
    hits: int = 0  # blocks read from DRAM
    misses: int = 0  # keys found in neither tier
    hit_rate: float = 0.0  # (hits + durable_hits) / reads; 0 before any read
    dram_hit_rate: float = 0.0  # hits / reads
    puts: int = 0  # blocks stored
    put_conflicts: int = 0  # put-if-absent found the key present
    pending_conflicts: int = 0  # raced another pending put of the key
    quota_rejections: int = 0  # puts refused: the tenant's quota was full
    lease_waits: int = 0  # puts that had to evict first
    overloads: int = 0  # puts refused: nothing evictable
    evictions: dict[str, int] = dataclasses.field(default_factory=dict)  # by cause
    tenant_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # requested, by tenant
    internal_fragmentation: float = 0.0
    external_fragmentation: float = 0.0
    max_block_bytes: int = 0  # the largest block the node takes
    durable_hits: int = 0  # DRAM misses read through from the durable tier
    spilled: int = 0  # blocks uploaded to the durable tier
    spill_failures: int = 0  # uploads and deletes given up after their retries
    spill_backpressure: int = 0  # times eviction kept victims: spill buffer full
    spill_queue_bytes: int = 0  # block bytes waiting in the spill buffer
    durable_available: bool = False  # a gateway is known and reachable
    corrupt_blocks: int = 0  # blocks dropped: their bytes did not match their checksum

    @classmethod
    def from_proto(cls, reply: pb.StatsResponse) -> KVStats:
        """The record of a node's StatsResponse."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = getattr(reply, field.name)
            values[field.name] = dict(value) if field.name in _MAPS else value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-ready)."""
        return dataclasses.asdict(self)


_MAPS = frozenset({"evictions", "tenant_bytes"})


def human_bytes(count: float) -> str:
    """'512 B', '1.5 KiB', '64.0 MiB'..."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"


def render(stats: Mapping[str, KVStats]) -> str:
    """Text for people: a block of labelled lines per node, in node order."""
    blocks = [_render_one(node_id, s) for node_id, s in sorted(stats.items())]
    return "\n\n".join(blocks) if blocks else "no kvcache node answered"


def _render_one(node_id: str, s: KVStats) -> str:
    evictions = ", ".join(f"{k} {v}" for k, v in sorted(s.evictions.items())) or "none"
    rows = [
        ("blocks", f"{s.blocks} (pending puts {s.pending_puts})"),
        (
            "memory",
            f"used {human_bytes(s.used_bytes)}, requested {human_bytes(s.requested_bytes)}; "
            f"node: arena {human_bytes(s.arena_bytes)}, fill {s.fill:.1%}",
        ),
        (
            "reads",
            f"hit rate {s.hit_rate:.1%} (DRAM {s.dram_hit_rate:.1%}): {s.hits} hits, "
            f"{s.durable_hits} durable hits, {s.misses} misses",
        ),
        (
            "puts",
            f"{s.puts} stored; conflicts {s.put_conflicts}, pending conflicts "
            f"{s.pending_conflicts}, quota rejections {s.quota_rejections}, overloads "
            f"{s.overloads}, lease waits {s.lease_waits}",
        ),
        ("evictions", evictions),
        (
            "durable tier",
            f"{'reachable' if s.durable_available else 'NOT reachable'}; spilled {s.spilled}, "
            f"failures {s.spill_failures}, backpressure {s.spill_backpressure}, "
            f"queued {human_bytes(s.spill_queue_bytes)}",
        ),
        ("corrupt blocks", str(s.corrupt_blocks)),
        (
            "fragmentation",
            f"internal {s.internal_fragmentation:.1%}, external {s.external_fragmentation:.1%}",
        ),
        ("max block", human_bytes(s.max_block_bytes)),
    ]
    if s.tenant_bytes and not s.tenant:
        by_tenant = ", ".join(f"{t} {human_bytes(b)}" for t, b in sorted(s.tenant_bytes.items()))
        rows.append(("by tenant", by_tenant))
    head = f"{node_id} (tenant {s.tenant})" if s.tenant else f"{node_id} (whole node)"
    return "\n".join([head, *(f"  {label:15} {text}" for label, text in rows)])
