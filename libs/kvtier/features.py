"""Features a node advertises in its NodeInfo (`features`, carried in the cluster map).

In a mixed-version rolling upgrade (docs/upgrades.md) a newer node may send a request that an
older build of its peer's role misreads: protobuf drops the fields that build does not know,
so the request means something else there. A feature names what a build does; an older node
advertises none of them, so a peer checks `advertised` before it relies on one and does the
safe thing otherwise. Pure functions: nothing here does I/O.
"""

from __future__ import annotations

from kvtier.proto.common.v1 import common_pb2

#: A datanode whose DeleteShard honours its conditions: `if_data_id` and `version_id` (only
#: that version of the key, only while it is the one named) and `restore_previous` (a failed
#: overwrite's undo makes the newest superseded version current again, or drops the undone
#: version from the stack it keeps: services/datanode/supersede.py). An older datanode reads
#: such a request as "remove the key": every version of it, a newer write that landed
#: meanwhile included (services/gateway/commits.py sends it no undo).
DATANODE_CONDITIONAL_UNDO = "datanode.conditional-undo"
#: A datanode whose commits (CommitWrite, WriteSmall) honour a conditional write's
#: `ShardMeta.commit_if_absent` / `commit_if_data_id`, checked under the key's lock (S3
#: If-None-Match: * and If-Match made atomic: services/gateway/conditional.py). An older
#: datanode keeps the unknown fields and commits unconditionally; a gateway then checks the
#: condition before the write, as it did (not atomic against a concurrent writer).
DATANODE_CONDITIONAL_COMMIT = "datanode.conditional-commit"
#: A datanode whose WRITE_SMALL takes shards of up to 512 KiB (services.datanode.shardmeta.
#: SMALL_WRITE_MAX_BYTES: a 2 MiB object on RS 8+4 or 4+2 in one call per datanode, stored inline
#: through the journal) and whose READ_METAS honours `without_data` and `data_drive_ids`. An
#: older datanode refuses a shard over 128 KiB (InvalidArgument), so a gateway sends larger ones
#: to a set only when every node of it advertises this, and otherwise stages and commits them
#: (services.gateway.objectwrites).
DATANODE_SMALL_WRITES_512K = "datanode.small-writes-512k"
#: A kvcache node whose BatchPut honours `if_checksums` (compare-and-swap: replace a block only
#: while its xxh3-64 is the one named, else ITEM_STATUS_MISMATCH; S3 If-Match on KV buckets made
#: atomic). An older node drops the field and overwrites unconditionally, so the KV SDK sends a
#: compare-and-swap put only to nodes that advertise this (`kv.AsyncKVClient.compare_and_swap`).
KVCACHE_COMPARE_AND_SWAP = "kvcache.compare-and-swap"


def advertised(cmap: common_pb2.ClusterMap, node_id: str, feature: str) -> bool:
    """Whether node_id's NodeInfo in cmap advertises feature (False for a node not in it)."""
    return any(n.node_id == node_id and feature in n.features for n in cmap.nodes)
