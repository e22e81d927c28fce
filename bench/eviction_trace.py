"""LRU against S3-FIFO on a seeded trace of KV-cache block requests shaped like prefix workloads.

Usage: python -m bench.eviction_trace [--seed N] [--requests N]
Prints a markdown table of block hit rates at several cache sizes (as a share of the trace's
unique bytes) and writes docs/img/eviction.png.

The trace mixes what a serving engine sends to the tier:
- shared prefixes: a few system prompts and a larger set of documents (RAG, few-shot), chosen
  with Zipf popularity and reused across many requests;
- multi-turn conversations: each turn re-requests the conversation's whole chain (system prompt,
  earlier turns) and appends a few new blocks;
- one-off long prompts: scans of unique blocks that are never requested again.
Keys are chained: a block's key names its whole prefix, so equal keys mean equal KV.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from services.kvcache import eviction

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "img" / "eviction.png"
MIB = 1024 * 1024
CACHE_FRACTIONS = (0.05, 0.10, 0.20, 0.40)
DEFAULT_REQUESTS = 4000


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TraceConfig:
    """Shape of a generated trace; every request is a chain of fixed-size blocks."""

    requests: int = DEFAULT_REQUESTS
    block_bytes: int = 2 * MIB
    system_prompts: int = 4
    system_blocks: tuple[int, int] = (4, 16)
    documents: int = 300
    document_blocks: tuple[int, int] = (8, 48)
    zipf_alpha: float = 0.8
    # Shares of requests; the rest continue or start conversations.
    document_share: float = 0.35
    scan_share: float = 0.25
    scan_blocks: tuple[int, int] = (32, 128)
    live_conversations: int = 64
    turns: tuple[int, int] = (2, 8)
    turn_blocks: tuple[int, int] = (1, 4)


@dataclasses.dataclass(frozen=True, slots=True)
class Trace:
    """Requests (each a chain of block keys, prefix first) over blocks of block_bytes."""

    requests: list[tuple[str, ...]]
    block_bytes: int

    @property
    def unique_bytes(self) -> int:
        """Bytes of all distinct blocks the trace touches: what an infinite cache would hold."""
        return len({key for chain in self.requests for key in chain}) * self.block_bytes


@dataclasses.dataclass(slots=True)
class _Conversation:
    chain: list[str]
    turns_left: int


def _chain(prefix: str, length: int) -> list[str]:
    return [f"{prefix}/{i}" for i in range(length)]


def _zipf_weights(n: int, alpha: float) -> list[float]:
    return [1.0 / (rank + 1) ** alpha for rank in range(n)]


def generate(cfg: TraceConfig, seed: int) -> Trace:
    """A deterministic trace for (cfg, seed)."""
    rng = random.Random(seed)
    systems = [
        _chain(f"sys{i}", rng.randint(*cfg.system_blocks)) for i in range(cfg.system_prompts)
    ]
    docs = [_chain(f"doc{i}", rng.randint(*cfg.document_blocks)) for i in range(cfg.documents)]
    sys_w = _zipf_weights(len(systems), cfg.zipf_alpha)
    doc_w = _zipf_weights(len(docs), cfg.zipf_alpha)
    live: list[_Conversation] = []
    requests: list[tuple[str, ...]] = []
    for n in range(cfg.requests):
        roll = rng.random()
        if roll < cfg.scan_share:
            requests.append(tuple(_chain(f"scan{n}", rng.randint(*cfg.scan_blocks))))
        elif roll < cfg.scan_share + cfg.document_share:
            system = rng.choices(systems, sys_w)[0]
            doc = rng.choices(docs, doc_w)[0]
            # The question after the shared document is unique to this request.
            requests.append((*system, *doc, *_chain(f"q{n}", rng.randint(1, 2))))
        else:
            requests.append(_conversation_turn(cfg, rng, live, systems, sys_w, n))
    return Trace(requests=requests, block_bytes=cfg.block_bytes)


def _conversation_turn(
    cfg: TraceConfig,
    rng: random.Random,
    live: list[_Conversation],
    systems: Sequence[list[str]],
    sys_w: Sequence[float],
    n: int,
) -> tuple[str, ...]:
    """Continue a live conversation (or start one): its whole chain plus this turn's blocks."""
    if len(live) < cfg.live_conversations:
        system = rng.choices(systems, sys_w)[0]
        live.append(_Conversation(chain=list(system), turns_left=rng.randint(*cfg.turns)))
    conv = rng.choice(live)
    conv.chain.extend(_chain(f"c{n}", rng.randint(*cfg.turn_blocks)))
    conv.turns_left -= 1
    if conv.turns_left <= 0:
        live.remove(conv)
    return tuple(conv.chain)


def simulate(policy: eviction.EvictionPolicy[str], trace: Trace) -> float:
    """Replay trace against policy; return the block hit rate.

    Each key of a request is a hit (recorded with `hit`) or a miss, which inserts the block after
    evicting enough victims to stay within the policy's capacity.
    """
    hits = total = 0
    size = trace.block_bytes
    for chain in trace.requests:
        for key in chain:
            total += 1
            if key in policy:
                hits += 1
                policy.hit(key)
                continue
            need = policy.used_bytes + size - policy.capacity_bytes
            if need > 0:
                policy.victims(need, _always)
            if policy.used_bytes + size <= policy.capacity_bytes:
                policy.insert(key, size)
    return hits / total if total else 0.0


def _always(_key: str) -> bool:
    return True


def compare(
    trace: Trace, fractions: Sequence[float] = CACHE_FRACTIONS
) -> list[tuple[float, float, float]]:
    """(cache fraction of unique bytes, LRU hit rate, S3-FIFO hit rate) for each fraction."""
    unique = trace.unique_bytes
    rows = []
    for fraction in fractions:
        capacity = max(trace.block_bytes, int(unique * fraction))
        lru = simulate(eviction.LRUPolicy[str](capacity), trace)
        s3 = simulate(eviction.S3FIFOPolicy[str](capacity), trace)
        rows.append((fraction, lru, s3))
    return rows


def table(rows: Sequence[tuple[float, float, float]]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| cache size (of unique bytes) | LRU hit rate | S3-FIFO hit rate | S3-FIFO − LRU |",
        "|---:|---:|---:|---:|",
    ]
    for fraction, lru, s3 in rows:
        lines.append(f"| {fraction:.0%} | {lru:.1%} | {s3:.1%} | {(s3 - lru) * 100:+.1f} pts |")
    return "\n".join(lines)


def plot(rows: Sequence[tuple[float, float, float]], path: Path) -> None:
    """Hit rate against cache size for both policies, as a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [fraction * 100 for fraction, _, _ in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [lru * 100 for _, lru, _ in rows], marker="o", label="LRU")
    ax.plot(xs, [s3 * 100 for _, _, s3 in rows], marker="s", label="S3-FIFO")
    ax.set_xlabel("cache size (% of the trace's unique bytes)")
    ax.set_ylabel("block hit rate (%)")
    ax.set_title("Eviction on a prefix workload with one-off long prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Generate the trace, compare the policies, print the table and write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    args = parser.parse_args()
    trace = generate(TraceConfig(requests=args.requests), args.seed)
    blocks = sum(len(chain) for chain in trace.requests)
    print(
        f"trace: seed {args.seed}, {len(trace.requests)} requests, {blocks} block lookups, "
        f"{trace.unique_bytes // trace.block_bytes} unique blocks"
    )
    rows = compare(trace)
    print(table(rows))
    plot(rows, PLOT)
    print(f"wrote {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
