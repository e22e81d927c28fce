"""Prometheus metrics of a kvcache node (block API, store gauges, the durable tier).

Counters by tenant and namespace are looked up once per (tenant, namespace) by the block API
(`labels()` costs microseconds); the store's own counters are copied into gauges by the sweep.

Tenant and namespace labels go through `LABELS` (a `LabelBound`): namespaces are names clients
choose, and tenants come from whoever opens a session, so each label's distinct values are
capped and the rest are counted under `OTHER`. No client can grow the number of series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import prometheus_client
from prometheus_client.core import CounterMetricFamily

#: The label value of tenants and namespaces past the caps.
OTHER = "_other"
#: Distinct tenant label values per process (then OTHER).
MAX_TENANT_LABELS = 1024
#: Distinct namespace label values per tenant (then OTHER).
MAX_NAMESPACE_LABELS = 64
#: Distinct (tenant, namespace) label pairs per process, all tenants together (then OTHER).
MAX_NAMESPACE_PAIRS = 4096


class LabelBound:
    """Maps tenants and namespaces to label values, at most `max_tenants` tenants,
    `max_namespaces` namespaces per tenant and `max_pairs` namespaces in all; the first ones
    seen keep their own value, later ones read as OTHER. Cheap enough for the hot path (two
    dict/set lookups)."""

    def __init__(
        self,
        max_tenants: int = MAX_TENANT_LABELS,
        max_namespaces: int = MAX_NAMESPACE_LABELS,
        max_pairs: int = MAX_NAMESPACE_PAIRS,
    ) -> None:
        self._max_tenants = max_tenants
        self._max_namespaces = max_namespaces
        self._max_pairs = max_pairs
        self._pairs = 0
        self._namespaces: dict[str, set[str]] = {}  # tenant label -> its namespace labels

    def tenant(self, tenant: str) -> str:
        """The label value of tenant."""
        if tenant in self._namespaces:
            return tenant
        if len(self._namespaces) >= self._max_tenants:
            return OTHER
        self._namespaces[tenant] = set()
        return tenant

    def namespace(self, tenant: str, namespace: str) -> tuple[str, str]:
        """The (tenant, namespace) label values."""
        label = self.tenant(tenant)
        seen = self._namespaces.get(label)
        if seen is None:  # a tenant past the cap
            return OTHER, OTHER
        if namespace in seen:
            return label, namespace
        if len(seen) >= self._max_namespaces or self._pairs >= self._max_pairs:
            return label, OTHER
        seen.add(namespace)
        self._pairs += 1
        return label, namespace


#: The bound every kvcache metric labelled by tenant or namespace goes through.
LABELS = LabelBound()

_LABELS = ("tenant", "namespace")
HITS = prometheus_client.Counter("kvtier_kvcache_hits_total", "Blocks found in DRAM", _LABELS)
MISSES = prometheus_client.Counter(
    "kvtier_kvcache_misses_total", "Gets of keys found in neither tier", _LABELS
)
DURABLE_HITS = prometheus_client.Counter(
    "kvtier_kvcache_durable_hits_total", "DRAM misses read through from the durable tier", _LABELS
)
BYTES_IN = prometheus_client.Counter(
    "kvtier_kvcache_bytes_in_total", "Block bytes committed by puts", _LABELS
)
BYTES_OUT = prometheus_client.Counter(
    "kvtier_kvcache_bytes_out_total", "Block bytes handed to readers", _LABELS
)
PUT_OUTCOMES = prometheus_client.Counter(
    "kvtier_kvcache_put_items_total", "Put items by outcome", (*_LABELS, "status")
)


class StoreCounters:
    """Counts the block store keeps since start (evictions, quota rejections, lease waits),
    exported at scrape time as Prometheus counters (`_total`): the store owns the counting, and
    prometheus_client's own counters can only be incremented, not set from a count."""

    _FAMILIES: Final = {
        "evictions": ("Blocks evicted since start, by tenant and cause", ("tenant", "cause")),
        "quota_rejections": ("Puts refused by the tenant quota since start", ("tenant",)),
        "lease_waits": ("Puts that had to evict first, since start", ("tenant",)),
    }

    def __init__(self) -> None:
        self._values: dict[tuple[str, tuple[str, ...]], float] = {}

    def set(self, family: str, labels: tuple[str, ...], value: float) -> None:
        """The current count of one series (family: a key of _FAMILIES)."""
        self._values[(family, labels)] = value

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The families, as prometheus_client's registry asks at each scrape."""
        families = {
            name: CounterMetricFamily(f"kvtier_kvcache_{name}", text, labels=list(labels))
            for name, (text, labels) in self._FAMILIES.items()
        }
        for (family, labels), value in sorted(self._values.items()):
            families[family].add_metric(list(labels), value)
        yield from families.values()


STORE_COUNTERS = StoreCounters()
prometheus_client.REGISTRY.register(STORE_COUNTERS)
FILL = prometheus_client.Gauge("kvtier_kvcache_fill_ratio", "Allocated share of the arena")
ARENA = prometheus_client.Gauge("kvtier_kvcache_arena_bytes", "Size of the DRAM arena")
TENANT_BYTES = prometheus_client.Gauge(
    "kvtier_kvcache_tenant_bytes", "Bytes a tenant holds (the quota measure)", ("tenant",)
)
FRAGMENTATION = prometheus_client.Gauge(
    "kvtier_kvcache_fragmentation_ratio", "Arena fragmentation", ("kind",)
)
CORRUPT_BLOCKS = prometheus_client.Counter(
    "kvtier_kvcache_corrupt_blocks_total",
    "Blocks dropped because their bytes did not match their xxh3-64 checksum, by where it was"
    " found (put, delete, durable)",
    ("where",),
)

# The durable tier (durable.py, spillqueue.py).
SPILLED = prometheus_client.Counter(
    "kvtier_kvcache_spilled_total",
    "Blocks uploaded to the durable tier, by tenant and cause (capacity, write_through)",
    ("tenant", "cause"),
)
SPILL_FAILURES = prometheus_client.Counter(
    "kvtier_kvcache_spill_failures_total",
    "Durable-tier uploads and deletes given up after their retries",
    ("op",),
)
SPILL_QUEUE_BYTES = prometheus_client.Gauge(
    "kvtier_kvcache_spill_queue_bytes", "Block bytes in the spill buffer, not yet durable"
)
BACKPRESSURE = prometheus_client.Counter(
    "kvtier_kvcache_spill_backpressure_total",
    "Times eviction found the spill buffer full and kept durable namespaces' victims in DRAM",
)
DROPPED = prometheus_client.Counter(
    "kvtier_kvcache_spill_dropped_total",
    "Blocks of durable namespaces that left DRAM without reaching the durable tier",
    ("reason",),
)
READ_THROUGH_FAILURES = prometheus_client.Counter(
    "kvtier_kvcache_read_through_failures_total",
    "Read-throughs and probes that could not use the durable tier",
    ("reason",),
)
AVAILABLE = prometheus_client.Gauge(
    "kvtier_kvcache_durable_available", "1 while a durable tier (a gateway) is known"
)
# KV events (services/kvcache/events.py).
EVENT_BATCHES = prometheus_client.Counter(
    "kvtier_kvcache_event_batches_total",
    "KV-event batches by outcome: published, or dropped because the publisher's queue was "
    "full (a dropped batch is a gap in the sequence numbers subscribers see)",
    ("outcome",),
)
EVENT_SOCKET_ROTATIONS = prometheus_client.Counter(
    "kvtier_kvcache_event_socket_rotations_total",
    "KV-event PUB socket rebinds that cut subscribers whose registration lapsed "
    "(services/kvcache/eventspub.py)",
)
