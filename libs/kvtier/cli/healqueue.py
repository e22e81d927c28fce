"""`kvtier admin heal queue`: what the heal queues of the cluster's gateways hold.

Every gateway heals on its own: objects a read, a write, its scanner or an admin heal found
degraded wait in its heal queue (`AdminService.ListHealQueue`, admins only). This asks every
gateway of the cluster map (or the one --gateway names) at once and merges the answers: the
oldest entries first, at most --limit in all, each with its gateway, bucket, key, version,
reason, age, tries and state, and the totals (queued, waiting, retrying, healing, not shown).
A gateway that does not answer is named, and the exit code is 1; 0 otherwise (an empty
queue too). The console's Heal page shows the same (`collect`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any, TextIO

from kvtier import clustermap, errors, security
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2

#: Entries shown at most when --limit is not given (each gateway's own default too).
DEFAULT_LIMIT = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Gateway:
    """A gateway to ask: its node id and the address to call."""

    node_id: str
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One queued object and the gateway whose queue holds it."""

    gateway: str
    entry: admin_pb2.HealQueueEntry


@dataclasses.dataclass(frozen=True, slots=True)
class Merged:
    """Every gateway's answer merged: rows oldest first, at most limit."""

    rows: list[Row]
    replies: dict[str, admin_pb2.ListHealQueueResponse]
    #: Gateways that did not answer: node id -> the error.
    failed: dict[str, str]

    def total(self, field: str = "total") -> int:
        """A total summed over the gateways that answered (total, waiting, retrying,
        healing, dropped)."""
        return sum(int(getattr(r, field)) for r in self.replies.values())

    @property
    def more(self) -> int:
        """Queued objects not shown (beyond the limit)."""
        return self.total() - len(self.rows)


def gateways_of(cmap: common_pb2.ClusterMap, *, service_port: bool) -> list[Gateway]:
    """The map's gateways: their service port (a certificate holder) or their users' port."""
    found = clustermap.nodes_with_role(cmap, common_pb2.NODE_ROLE_GATEWAY)
    return [
        Gateway(n.node_id, n.grpc_address if service_port else n.client_address or n.grpc_address)
        for n in found
    ]


async def cluster_gateways(
    metadata_address: str,
    sec: security.ClientSecurity,
    tokens: security.TokenSource | None = None,
) -> list[Gateway]:
    """Every gateway of the cluster map (asked of the metadata node). Unavailable when the
    map has none."""
    async with metadata_client.MetadataClient(
        metadata_address, timeout_s=10.0, security=sec, tokens=tokens
    ) as meta:
        cmap = await meta.get_cluster_map()
    found = gateways_of(cmap, service_port=sec.has_cert) if cmap is not None else []
    if not found:
        raise errors.Unavailable("no gateway in the cluster map")
    return found


async def _ask(
    gateway: Gateway,
    limit: int,
    sec: security.ClientSecurity,
    tokens: security.TokenSource | None,
    timeout_s: float,
) -> admin_pb2.ListHealQueueResponse:
    async with gateway_client.AdminServiceClient(
        gateway.address, timeout_s=timeout_s, security=sec, tokens=tokens
    ) as client:
        return await client.list_heal_queue(limit)


async def collect(
    gateways: Sequence[Gateway],
    limit: int,
    sec: security.ClientSecurity,
    *,
    tokens: security.TokenSource | None = None,
    timeout_s: float = 10.0,
) -> Merged:
    """Ask every gateway at once and merge. PermissionDenied (and Unauthenticated) are
    raised: the caller may not list queues at all; other errors name the gateway."""
    limit = limit if limit > 0 else DEFAULT_LIMIT
    answers = await asyncio.gather(
        *(_ask(g, limit, sec, tokens, timeout_s) for g in gateways), return_exceptions=True
    )
    replies: dict[str, admin_pb2.ListHealQueueResponse] = {}
    failed: dict[str, str] = {}
    for gateway, answer in zip(gateways, answers, strict=True):
        if isinstance(answer, errors.PermissionDenied | errors.Unauthenticated):
            raise answer
        if isinstance(answer, errors.KVTierError):
            failed[gateway.node_id] = f"{type(answer).__name__}: {answer}"
        elif isinstance(answer, BaseException):
            raise answer
        else:
            replies[gateway.node_id] = answer
    rows = [Row(g, e) for g, reply in replies.items() for e in reply.entries]
    rows.sort(key=lambda r: (-r.entry.age_s, r.gateway, r.entry.bucket, r.entry.key))
    return Merged(rows=rows[:limit], replies=replies, failed=failed)


def printable(text: str) -> str:
    """text with control characters (a key may hold any) written as escapes: one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def age_text(seconds: float) -> str:
    """'4.2s', '12m05s', '3h07m'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def detail(entry: admin_pb2.HealQueueEntry) -> str:
    """Why it is queued, and what it waits for: 'reason; waiting for d1, d2; last: ...'."""
    parts = [entry.reason or "-"]
    if entry.state == "retrying":
        parts.append(f"next try in {age_text(entry.next_attempt_in_s)}")
    if entry.waiting_on:
        parts.append("waiting for " + ", ".join(entry.waiting_on))
    if entry.last_error:
        parts.append(f"last try: {entry.last_error}")
    return "; ".join(parts)


HEADER = f"{'GATEWAY':16} {'AGE':>8} {'STATE':8} {'TRIES':>5} {'VERSION':32}  OBJECT  REASON"


def summary(merged: Merged) -> str:
    """'queued 3 on 2 gateways (waiting 1, retrying 1, healing 0); 3 shown, 0 more'."""
    n = len(merged.replies)
    text = (
        f"queued {merged.total()} on {n} gateway{'s' if n != 1 else ''} "
        f"(waiting {merged.total('waiting')}, retrying {merged.total('retrying')}, "
        f"healing {merged.total('healing')}); {len(merged.rows)} shown, {merged.more} more"
    )
    dropped = merged.total("dropped")
    return text + (
        f"; {dropped} not queued (queue full: the scanner finds them)" if dropped else ""
    )


def render(merged: Merged) -> str:
    """The table (a header, one line per object, oldest first), the failed gateways and
    the summary line."""
    lines = [HEADER]
    for row in merged.rows:
        e = row.entry
        lines.append(
            f"{printable(row.gateway):16} {age_text(e.age_s):>8} {e.state:8} {e.attempts:>5} "
            f"{printable(e.version_id) or '-':32}  {printable(e.bucket)}/{printable(e.key)}  "
            f"{printable(detail(e))}"
        )
    lines += [
        f"{printable(g)}: failed: {printable(why)}" for g, why in sorted(merged.failed.items())
    ]
    lines.append(summary(merged))
    return "\n".join(lines) + "\n"


def as_dict(merged: Merged) -> dict[str, Any]:
    """The --json document: the entries (with their gateway), per-gateway totals, the
    totals and the failed gateways."""
    fields = ("total", "waiting", "retrying", "healing", "dropped", "more")
    return {
        "entries": [
            {
                "gateway": r.gateway,
                "bucket": r.entry.bucket,
                "key": r.entry.key,
                "version_id": r.entry.version_id,
                "reason": r.entry.reason,
                "age_s": round(r.entry.age_s, 3),
                "attempts": r.entry.attempts,
                "state": r.entry.state,
                "next_attempt_in_s": round(r.entry.next_attempt_in_s, 3),
                "waiting_on": list(r.entry.waiting_on),
                "last_error": r.entry.last_error,
            }
            for r in merged.rows
        ],
        "gateways": {
            g: {f: int(getattr(reply, f)) for f in fields} for g, reply in merged.replies.items()
        },
        "total": merged.total(),
        "shown": len(merged.rows),
        "more": merged.more,
        "failed": merged.failed,
    }


async def run(
    gateways: Sequence[Gateway],
    limit: int,
    out: TextIO,
    sec: security.ClientSecurity,
    *,
    as_json: bool = False,
) -> int:
    """`kvtier admin heal queue`: print the merged queues; 0 when every gateway answered."""
    merged = await collect(gateways, limit, sec)
    out.write(json.dumps(as_dict(merged), indent=2) + "\n" if as_json else render(merged))
    return 1 if merged.failed else 0
