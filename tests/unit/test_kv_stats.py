"""`kvtier.kv_stats`: the typed record of a kvcache node's statistics and its text form."""

from __future__ import annotations

import dataclasses
import json

from kvtier import kv_stats
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb

MIB = 1 << 20


def test_every_stats_field_of_the_proto_is_typed() -> None:
    typed = {f.name for f in dataclasses.fields(kv_stats.KVStats)}
    assert typed == set(pb.StatsResponse.DESCRIPTOR.fields_by_name)


def _reply() -> pb.StatsResponse:
    return pb.StatsResponse(
        tenant="team-a", arena_bytes=256 * MIB, fill=0.375, blocks=12, pending_puts=1,
        used_bytes=3 * MIB, requested_bytes=3 * MIB - 100, hits=90, misses=5, durable_hits=5,
        hit_rate=0.95, dram_hit_rate=0.9, puts=13, put_conflicts=2, quota_rejections=1,
        evictions={"capacity": 4, "ttl": 1}, max_block_bytes=64 * MIB, spilled=7,
        spill_queue_bytes=2048, durable_available=True, internal_fragmentation=0.125,
    )  # fmt: skip


def test_from_proto_is_plain_python() -> None:
    stats = kv_stats.KVStats.from_proto(_reply())
    assert (stats.tenant, stats.blocks, stats.hit_rate) == ("team-a", 12, 0.95)
    assert stats.evictions == {"capacity": 4, "ttl": 1}
    assert type(stats.evictions) is dict
    as_json = json.loads(json.dumps(stats.as_dict()))
    assert as_json["evictions"] == {"capacity": 4, "ttl": 1}
    assert as_json["durable_available"] is True
    assert str(stats).startswith("KVStats(tenant='team-a', arena_bytes=268435456")


def test_render() -> None:
    stats = kv_stats.KVStats.from_proto(_reply())
    whole = dataclasses.replace(stats, tenant="", tenant_bytes={"a": 1024, "b": 5})
    assert kv_stats.render({"kv-2": whole, "kv-1": stats}).splitlines() == [
        "kv-1 (tenant team-a)",
        "  blocks          12 (pending puts 1)",
        "  memory          used 3.0 MiB, requested 3.0 MiB; node: arena 256.0 MiB, fill 37.5%",
        "  reads           hit rate 95.0% (DRAM 90.0%): 90 hits, 5 durable hits, 5 misses",
        "  puts            13 stored; conflicts 2, pending conflicts 0, quota rejections 1, "
        "overloads 0, lease waits 0",
        "  evictions       capacity 4, ttl 1",
        "  durable tier    reachable; spilled 7, failures 0, backpressure 0, queued 2.0 KiB",
        "  corrupt blocks  0",
        "  fragmentation   internal 12.5%, external 0.0%",
        "  max block       64.0 MiB",
        "",
        "kv-2 (whole node)",
        "  blocks          12 (pending puts 1)",
        "  memory          used 3.0 MiB, requested 3.0 MiB; node: arena 256.0 MiB, fill 37.5%",
        "  reads           hit rate 95.0% (DRAM 90.0%): 90 hits, 5 durable hits, 5 misses",
        "  puts            13 stored; conflicts 2, pending conflicts 0, quota rejections 1, "
        "overloads 0, lease waits 0",
        "  evictions       capacity 4, ttl 1",
        "  durable tier    reachable; spilled 7, failures 0, backpressure 0, queued 2.0 KiB",
        "  corrupt blocks  0",
        "  fragmentation   internal 12.5%, external 0.0%",
        "  max block       64.0 MiB",
        "  by tenant       a 1.0 KiB, b 5 B",
    ]
    assert kv_stats.render({}) == "no kvcache node answered"


def test_human_bytes() -> None:
    assert [kv_stats.human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * MIB, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
