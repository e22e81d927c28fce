"""The control-plane load of a kvtier cluster: etcd writes, watch fan-out and map polling.

Pure arithmetic over the code's real parameters (`Params.from_code` reads them from the
modules that use them) and the map sizes `bench.scale_model` measures; no I/O. Who does what,
as the code stands (ARCHITECTURE.md, "The cluster map"):

- every node holds a lease (`lease_ttl_s`) and refreshes it every TTL/3
  (`kvtier.membership.EtcdMembership.keep_alive`): lease renewals go to the etcd leader;
- every node of every role watches `<prefix>/map` (`ServiceSpec.watches_map` defaults to True)
  and, on each event, reads the whole map again (`EtcdMembership.watch_changes` calls `read()`
  after every event): a map change costs each watcher the event (which carries the value) plus a
  range read, 2 x map bytes;
- each metadata replica watches `<prefix>/nodes/` and on each event lists every node record
  (`list_nodes`), reads the map and writes the whole new map with compare-and-swap
  (`services.metadata.reconciler.apply`): one winning write, the other replicas' transactions
  fail their compare and retry from the winner's map, which then needs no change;
- KV clients do not watch etcd: each one asks the metadata service for the map every
  `refresh_s` (`kvtier.kvnodes.NodeSet.fresh`), with `known_epoch` 0, so the whole map every time;
- gateways watch `<prefix>/buckets/` and `<prefix>/users/` and re-read the whole prefix after
  every event (`kvtier.buckets.BucketStore.watch`, `kvtier.users`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024

#: etcd's documented limits (https://etcd.io/docs/v3.6/dev-guide/limit/): the largest request
#: by default (--max-request-bytes), the default backend quota and the suggested maximum.
ETCD_MAX_REQUEST_BYTES = int(1.5 * MIB)
ETCD_DEFAULT_QUOTA_BYTES = 2 * GIB
ETCD_MAX_QUOTA_BYTES = 8 * GIB
#: https://etcd.io/docs/v3.6/op-guide/performance/: "more than 30,000 requests per second under
#: heavy load" for small requests on a three-member cluster of common cloud machines.
ETCD_SMALL_WRITES_PER_S = 30_000
#: The gRPC message limit of kvtier's own servers and channels (`max_message_bytes`), and the
#: receive limit of grpc's Python channels that aetcd opens without options (4 MiB).
GRPC_MAX_MESSAGE_BYTES = 4 * MIB
#: Fraction of the TTL between keepalives (`EtcdMembership.keep_alive` sleeps TTL/3).
KEEPALIVE_FRACTION = 1 / 3


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Params:
    """The code's parameters that set the control-plane load."""

    lease_ttl_s: float
    client_refresh_s: float
    metadata_replicas: int = 3
    etcd_members: int = 3

    @property
    def keepalive_period_s(self) -> float:
        """Seconds between two lease refreshes of one node."""
        return self.lease_ttl_s * KEEPALIVE_FRACTION

    @classmethod
    def from_code(cls) -> Params:
        """The defaults of `ServiceConfig.lease_ttl_s` and `AsyncKVClient(refresh_s=...)`."""
        from kvtier import config, kv

        ttl = inspect.signature(config.ServiceConfig).parameters["lease_ttl_s"].default
        refresh = inspect.signature(kv.AsyncKVClient).parameters["refresh_s"].default
        return cls(lease_ttl_s=float(ttl), client_refresh_s=float(refresh))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChangeCost:
    """What one membership change (a node joins or leaves) costs, as the code stands."""

    etcd_writes: float  # Raft proposals: lease grant/revoke, the node key, the map transactions
    watch_events: int  # events etcd sends (node prefix to metadata, map key to every node)
    etcd_read_bytes: int  # range reads after events: node lists, map re-reads
    watch_bytes: int  # bytes carried by the watch events
    history_bytes: int  # what the change adds to etcd's MVCC history (until compaction)

    @property
    def egress_bytes(self) -> int:
        """Bytes etcd sends because of the change (events + reads)."""
        return self.watch_bytes + self.etcd_read_bytes


def change_cost(nodes: int, map_bytes: int, record_bytes: int, p: Params) -> ChangeCost:
    """One join or leave in an N-node cluster whose map has map_bytes, node records record_bytes.

    Writes: a join grants a lease and puts the node key (2 proposals), a leave revokes the lease
    (1; the key goes with it), 1.5 on average; then up to one compare-and-swap transaction per
    metadata replica (M), one of which writes the map (a transaction whose compare fails is still
    a Raft proposal). Events: the node key to each replica, then the map key to every node: M + N.
    Reads: each replica lists the N records and reads the map, the M - 1 losers read it again
    (their next reconcile finds nothing to change); each node re-reads the map after its event.
    """
    m = p.metadata_replicas
    return ChangeCost(
        etcd_writes=1.5 + m,
        watch_events=m + nodes,
        etcd_read_bytes=m * nodes * record_bytes + (2 * m - 1) * map_bytes + nodes * map_bytes,
        watch_bytes=m * record_bytes + nodes * map_bytes,
        history_bytes=map_bytes + record_bytes,
    )


def delta_change_bytes(watchers: int, record_bytes: int) -> int:
    """The next design (docs/scaling.md): liveness stays in the node keys, out of the map, and
    watchers apply each event's record instead of re-reading: a join or leave sends one record
    to each watcher, and writes nothing else."""
    return watchers * record_bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SteadyLoad:
    """The load with no membership change."""

    lease_renewals_per_s: float
    etcd_writes_per_s: float
    client_map_rpcs_per_s: float
    client_map_bytes_per_s: float


def steady_load(nodes: int, clients: int, map_bytes: int, p: Params) -> SteadyLoad:
    """Keepalives (N / (TTL/3) per second, served by the etcd leader, no Raft write), no periodic
    etcd write (nothing re-puts its record), and every KV client fetching the whole map from the
    metadata service every refresh_s: C / refresh_s calls of map_bytes each."""
    rpcs = clients / p.client_refresh_s
    return SteadyLoad(
        lease_renewals_per_s=nodes / p.keepalive_period_s,
        etcd_writes_per_s=0.0,
        client_map_rpcs_per_s=rpcs,
        client_map_bytes_per_s=rpcs * map_bytes,
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Churn:
    """A churn scenario: how many membership changes, over how long."""

    name: str
    changes: int
    duration_s: float


def rolling_restart(nodes: int, seconds_per_node: float) -> Churn:
    """Every node restarted once, one at a time: each restart is a leave (the lease revoked at
    shutdown) and a join (a new lease): 2N changes over N x seconds_per_node."""
    return Churn(
        name=f"rolling restart, {seconds_per_node:g} s per node",
        changes=2 * nodes,
        duration_s=nodes * seconds_per_node,
    )


def flapping(nodes: int, fraction: float, flap_period_s: float, p: Params) -> Churn:
    """fraction of the nodes losing their lease (a stall past the TTL) and registering again,
    each once per flap_period_s (at least one TTL): 2 changes per flap, per hour."""
    flappers = max(1, round(nodes * fraction))
    period = max(flap_period_s, p.lease_ttl_s)
    hour = 3600.0
    return Churn(
        name=f"{fraction:.0%} of nodes flapping every {period:g} s",
        changes=int(2 * flappers * hour / period),
        duration_s=hour,
    )


def burst(nodes_lost: int, p: Params) -> Churn:
    """nodes_lost nodes (a rack, a switch) gone at once: their leases expire within one TTL,
    and each expiry is a change of its own (the reconciler handles events one by one)."""
    return Churn(
        name=f"{nodes_lost} nodes lost at once (one rack)",
        changes=nodes_lost,
        duration_s=p.lease_ttl_s,
    )


def seconds_to_send(total_bytes: float, members: int, link_bytes_per_s: float) -> float:
    """How long etcd's members, each with one link of link_bytes_per_s, take to send it all."""
    return total_bytes / (members * link_bytes_per_s)


#: One 10 Gb/s link per etcd member.
LINK_BYTES_PER_S = 10e9 / 8


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChurnLoad:
    """A churn scenario's totals and rates."""

    churn: Churn
    etcd_writes_per_s: float
    watch_events_per_s: float
    egress_bytes_per_s: float
    total_egress_bytes: float
    history_bytes: float  # etcd DB growth without compaction

    @property
    def quota_fraction(self) -> float:
        """Share of etcd's default 2 GiB quota the scenario's history takes (no compaction)."""
        return self.history_bytes / ETCD_DEFAULT_QUOTA_BYTES


def churn_load(churn: Churn, cost: ChangeCost) -> ChurnLoad:
    """Rates and totals of a scenario from the cost of one change."""
    rate = churn.changes / churn.duration_s
    return ChurnLoad(
        churn=churn,
        etcd_writes_per_s=rate * cost.etcd_writes,
        watch_events_per_s=rate * cost.watch_events,
        egress_bytes_per_s=rate * cost.egress_bytes,
        total_egress_bytes=churn.changes * cost.egress_bytes,
        history_bytes=churn.changes * cost.history_bytes,
    )


def prefix_change_bytes(gateways: int, records: int, record_bytes: int) -> int:
    """One bucket (or user) created, deleted or configured: every gateway's watch fires and
    re-reads every record of the prefix (`BucketStore.watch`, `UserStore.watch`):
    G x (R x record + the event)."""
    return gateways * (records * record_bytes + record_bytes)


def max_records_in_one_read(record_bytes: int) -> int:
    """Records whose prefix fits in one range reply under the 4 MiB receive limit of the etcd
    client's channel: past it the watch's full re-read fails, every time."""
    return GRPC_MAX_MESSAGE_BYTES // max(1, record_bytes)


def quota_nodes(bytes_per_node: float, changes_per_node: float = 2.0) -> int:
    """The N at which one rolling restart (2N map writes of bytes_per_node x N each) fills
    etcd's default 2 GiB quota without compaction: 2 N^2 b = quota."""
    return math.floor(math.sqrt(ETCD_DEFAULT_QUOTA_BYTES / (changes_per_node * bytes_per_node)))
