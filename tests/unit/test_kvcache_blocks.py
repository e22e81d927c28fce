"""The kvcache block API (services/kvcache/blocks.py) driven directly, without a network."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import prometheus_client
import pytest

from kvtier import blocksums, errors, principal
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks, metrics, servicer
from services.kvcache import store as block_store

MIB = 1024 * 1024
ALICE = "alice/engine-1/abcd"
BOB = "bob/engine-2/ef01"


def _now(plan: object) -> base.CallPlan:
    """A plan the block API made at once (no durable tier is asked here)."""
    assert isinstance(plan, base.CallPlan)
    return plan


@pytest.fixture
def service() -> blocks.BlockService:
    region = base.Region(1, 4 * MIB)
    issuer = base.Issuer("n1")
    store = block_store.BlockStore(4 * MIB, page_bytes=1 * MIB)
    return blocks.BlockService(store, region, issuer.grant, epoch=lambda: 7)


def _put(
    svc: blocks.BlockService, principal: str, keys: list[bytes], datas: list[bytes]
) -> pb.BatchPutResponse:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=keys)
    plan = _now(
        svc.handle_call(
            principal,
            pb.CALL_METHOD_BATCH_PUT,
            request.SerializeToString(),
            [len(d) for d in datas],
            [],
        )
    )
    for sink, data in zip(plan.sinks, datas, strict=True):
        if sink is not None:
            sink.view()[:] = data
    assert plan.on_received is not None
    assert plan.on_done is not None
    received = plan.on_received()
    assert isinstance(received, bytes)  # the kvcache completes puts synchronously
    reply = pb.BatchPutResponse.FromString(received)
    plan.on_done(True)
    return reply


def _get(
    svc: blocks.BlockService, principal: str, keys: list[bytes], cap: int
) -> tuple[pb.BatchGetResponse, list[bytes | None]]:
    request = pb.BatchGetRequest(namespace=pb.Namespace(name="m"), keys=keys)
    plan = _now(
        svc.handle_call(
            principal, pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), [], [cap] * len(keys)
        )
    )
    datas = [bytes(s.view()) if s is not None else None for s in plan.sources]
    assert plan.on_done is not None
    plan.on_done(True)
    return pb.BatchGetResponse.FromString(plan.reply), datas


def test_a_call_put_is_visible_only_after_its_bytes_are_in(service: blocks.BlockService) -> None:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"k"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), [5], [])
    )
    assert service.store.exists("alice", "m", [b"k"]) == [False]
    assert plan.sinks[0] is not None
    plan.sinks[0].view()[:] = b"hello"
    assert plan.on_received is not None
    received = plan.on_received()
    assert isinstance(received, bytes)  # the kvcache completes puts synchronously
    reply = pb.BatchPutResponse.FromString(received)
    assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK]
    assert reply.epoch == 7
    got, datas = _get(service, ALICE, [b"k", b"nope"], 16)
    assert [i.status for i in got.items] == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_MISS]
    assert datas == [b"hello", None]


def test_a_put_whose_connection_died_is_aborted(service: blocks.BlockService) -> None:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"k"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), [5], [])
    )
    assert plan.on_done is not None
    plan.on_done(False)
    stats = service.stats("alice")
    assert stats.pending_puts == 0
    assert stats.blocks == 0
    assert stats.requested_bytes == 0
    assert _put(service, ALICE, [b"k"], [b"again"]).items[0].status == pb.ITEM_STATUS_OK


def test_the_session_tenant_scopes_every_call(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"alice"])
    reply, datas = _get(service, BOB, [b"k"], 16)
    assert reply.items[0].status == pb.ITEM_STATUS_MISS
    assert datas == [None]
    spoof = pb.BatchGetRequest(namespace=pb.Namespace(tenant="alice", name="m"), keys=[b"k"])
    with pytest.raises(errors.PermissionDenied):
        service.handle_call(BOB, pb.CALL_METHOD_BATCH_GET, spoof.SerializeToString(), [], [16])


def test_a_small_buffer_is_reported_with_the_block_size(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"x" * 100])
    reply, datas = _get(service, ALICE, [b"k"], 10)
    assert reply.items[0].status == pb.ITEM_STATUS_BUFFER_TOO_SMALL
    assert reply.items[0].size == 100
    assert datas == [None]
    assert service.stats("alice").hits == 1  # the lease was taken and ended


def test_malformed_calls_are_invalid(service: blocks.BlockService) -> None:
    good = pb.BatchPutRequest(
        namespace=pb.Namespace(name="m"), keys=[b"a", b"b"]
    ).SerializeToString()
    with pytest.raises(errors.InvalidArgument, match="segments"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, good, [1], [])
    sized = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"a"], sizes=[3])
    with pytest.raises(errors.InvalidArgument, match="as long"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, sized.SerializeToString(), [4], [])
    with pytest.raises(errors.InvalidArgument, match="malformed"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_GET, b"\xff\xff", [], [])
    with pytest.raises(errors.InvalidArgument, match="unknown"):
        service.handle_call(ALICE, 77, b"", [], [])
    with pytest.raises(errors.InvalidArgument, match="segments"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_EXISTS, b"", [3], [])
    assert service.stats(None).pending_puts == 0


def test_grpc_grants_commit_and_release(service: blocks.BlockService) -> None:
    ns = pb.Namespace(tenant="alice", name="m")
    with pytest.raises(errors.PermissionDenied):
        service.grant_puts(pb.BatchPutRequest(namespace=ns, keys=[b"k"], sizes=[4], principal=BOB))
    reply = service.grant_puts(
        pb.BatchPutRequest(namespace=ns, keys=[b"k"], sizes=[4], principal=ALICE)
    )
    item = reply.items[0]
    assert item.status == pb.ITEM_STATUS_OK
    assert item.descriptor.length == 4
    assert item.descriptor.rights == int(base.Rights.WRITE)
    done = service.commit_puts(pb.CommitPutsRequest(namespace=ns, put_ids=[item.put_id, 999]))
    assert isinstance(done, pb.CommitPutsResponse)  # not write-through: answered at once
    assert list(done.statuses) == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_EXPIRED]
    got = service.grant_reads(pb.BatchGetRequest(namespace=ns, keys=[b"k"], principal=ALICE))
    assert isinstance(got, pb.BatchGetResponse)
    assert got.items[0].status == pb.ITEM_STATUS_OK
    assert got.items[0].lease_id
    assert service.store.stats().blocks == 1
    service.delete("alice", pb.DeleteRequest(namespace=ns, keys=[b"k"]))
    # Deleted but still leased: the extent is held until the read is released.
    assert service.store.stats().used_bytes > 0
    service.release_reads(pb.ReleaseReadsRequest(namespace=ns, lease_ids=[got.items[0].lease_id]))
    assert service.store.stats().used_bytes == 0


def test_simple_calls_and_stats(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"a", b"b", b"c"], [b"1", b"2", b"3"])
    ns = pb.Namespace(name="m")
    lookup = pb.LookupRequest(namespace=ns, keys=[b"a", b"b", b"x", b"c"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_LOOKUP, lookup.SerializeToString(), [], [])
    )
    assert pb.LookupResponse.FromString(plan.reply).count == 2
    pin = pb.PinRequest(namespace=ns, keys=[b"a", b"x"], pin_s=10)
    plan = _now(service.handle_call(ALICE, pb.CALL_METHOD_PIN, pin.SerializeToString(), [], []))
    assert pb.PinResponse.FromString(plan.reply).pinned == 1
    plan = _now(service.handle_call(ALICE, pb.CALL_METHOD_STATS, b"", [], []))
    stats = pb.StatsResponse.FromString(plan.reply)
    assert stats.tenant == "alice"
    assert stats.blocks == 3
    assert stats.puts == 3
    service.sweep()


def _swap_plan(svc: blocks.BlockService, key: bytes, data: bytes, if_checksum: int) -> Any:
    """A compare-and-swap put's call of key, begun: its plan (the bytes not yet in)."""
    request = pb.BatchPutRequest(
        namespace=pb.Namespace(name="m"), keys=[key], if_checksums=[if_checksum]
    )
    plan = _now(
        svc.handle_call(
            ALICE, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), [len(data)], []
        )
    )
    if plan.sinks[0] is not None:
        plan.sinks[0].view()[:] = data
    return plan


def _finish(plan: Any) -> pb.PutGrant:
    received = plan.on_received()
    assert isinstance(received, bytes)
    plan.on_done(True)
    (item,) = pb.BatchPutResponse.FromString(received).items
    return item


def test_a_compare_and_swap_put_replaces_only_the_block_it_names(
    service: blocks.BlockService,
) -> None:
    """if_checksums (S3 If-Match on KV buckets): the block is replaced only while it is the one
    whose xxh3-64 the writer names; another block, or none, is MISMATCH and nothing is stored
    (an older node would drop the field and overwrite)."""
    _put(service, ALICE, [b"k"], [b"first"])
    first = blocksums.checksum(b"first")
    assert _finish(_swap_plan(service, b"k", b"second", first)).status == pb.ITEM_STATUS_OK
    assert _get(service, ALICE, [b"k"], 16)[1] == [b"second"]
    # A second writer that read "first" too loses: refused before any byte is taken.
    stale = _swap_plan(service, b"k", b"third", first)
    assert stale.sinks[0] is None
    assert _finish(stale).status == pb.ITEM_STATUS_MISMATCH
    assert _get(service, ALICE, [b"k"], 16)[1] == [b"second"]
    # No block: refused, nothing stored.
    assert _finish(_swap_plan(service, b"gone", b"x", first)).status == pb.ITEM_STATUS_MISMATCH
    assert service.store.exists("alice", "m", [b"gone"]) == [False]
    # Checked again at the commit: the block deleted meanwhile refuses the put there.
    late = _swap_plan(service, b"k", b"fourth", blocksums.checksum(b"second"))
    service.store.delete("alice", "m", [b"k"])
    item = _finish(late)
    assert item.status == pb.ITEM_STATUS_MISMATCH
    assert "compare-and-swap" in item.reason
    assert service.store.exists("alice", "m", [b"k"]) == [False]
    assert service.stats("alice").pending_puts == 0
    # Over gRPC: refused at the grant (no descriptor), or granted and committed.
    _put(service, ALICE, [b"g"], [b"one"])
    ns = pb.Namespace(tenant="alice", name="m")

    def grant(checksum: int) -> pb.PutGrant:
        request = pb.BatchPutRequest(
            namespace=ns, keys=[b"g"], sizes=[3], principal=ALICE, if_checksums=[checksum]
        )
        return service.grant_puts(request).items[0]

    assert grant(first).status == pb.ITEM_STATUS_MISMATCH
    granted = grant(blocksums.checksum(b"one"))
    assert granted.status == pb.ITEM_STATUS_OK
    done = service.commit_puts(pb.CommitPutsRequest(namespace=ns, put_ids=[granted.put_id]))
    assert isinstance(done, pb.CommitPutsResponse)
    assert list(done.statuses) == [pb.ITEM_STATUS_OK]
    with pytest.raises(errors.InvalidArgument, match="if_checksums"):
        service.grant_puts(
            pb.BatchPutRequest(
                namespace=ns, keys=[b"g"], sizes=[3], principal=ALICE, if_checksums=[1, 2]
            )
        )


# Tenant scoping (issue 13): the tenant comes from the caller, never from the request.

GATEWAY_SESSION = "@gateway/gw-1/abcd"
CTX: Any = None  # the servicer never looks at its context


@contextlib.contextmanager
def _as(who: principal.Principal) -> Iterator[None]:
    """Serve the calls inside as if the interceptor had authenticated who."""
    token = principal.bind(who)
    try:
        yield
    finally:
        principal.unbind(token)


def _user(tenant: str, *, is_admin: bool = False) -> principal.Principal:
    return principal.user(f"AK-{tenant}", tenant, is_admin=is_admin, shm_trusted=False)


def _call(svc: blocks.BlockService, session: str, method: int, request: Any) -> Any:
    plan = _now(svc.handle_call(session, method, request.SerializeToString(), [], []))
    return plan.reply


@pytest.mark.parametrize("pin_s", [float("inf"), 1e12])
async def test_an_endless_pin_is_refused_over_a_call_and_grpc(
    service: blocks.BlockService, pin_s: float
) -> None:
    """Regression (issue 13): pin_s=inf was accepted, so one tenant could pin the arena forever."""
    _put(service, ALICE, [b"k"], [b"data"])
    pin = pb.PinRequest(namespace=pb.Namespace(name="m"), keys=[b"k"], pin_s=pin_s)
    with pytest.raises(errors.InvalidArgument, match="pin_s"):
        _call(service, ALICE, pb.CALL_METHOD_PIN, pin)
    with _as(_user("alice")), pytest.raises(errors.InvalidArgument, match="pin_s"):
        await servicer.KVCacheServicer(service).Pin(pin, CTX)
    assert service.store.pinned_bytes("alice") == 0


def test_a_session_acting_for_no_tenant_reaches_no_blocks(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"alice"])
    ns = pb.Namespace(name="m")
    denied = [
        (pb.CALL_METHOD_BATCH_EXISTS, pb.BatchExistsRequest(namespace=ns, keys=[b"k"])),
        (pb.CALL_METHOD_LOOKUP, pb.LookupRequest(namespace=ns, keys=[b"k"])),
        (pb.CALL_METHOD_DELETE, pb.DeleteRequest(namespace=ns, keys=[b"k"])),
        (pb.CALL_METHOD_PIN, pb.PinRequest(namespace=ns, keys=[b"k"], pin_s=1)),
        (pb.CALL_METHOD_UNPIN, pb.UnpinRequest(namespace=ns, keys=[b"k"])),
        (pb.CALL_METHOD_TOUCH, pb.TouchRequest(namespace=ns, keys=[b"k"])),
        (pb.CALL_METHOD_STATS, pb.StatsRequest()),
        (pb.CALL_METHOD_LIST_KEYS, pb.ListKeysRequest(namespace=ns)),
        (pb.CALL_METHOD_BATCH_EXISTS, pb.BatchExistsRequest(
            namespace=pb.Namespace(tenant="alice", name="m"), keys=[b"k"]
        )),
    ]  # fmt: skip
    for method, request in denied:
        with pytest.raises(errors.PermissionDenied, match="no tenant"):
            _call(service, GATEWAY_SESSION, method, request)
    put = pb.BatchPutRequest(namespace=ns, keys=[b"new"]).SerializeToString()
    with pytest.raises(errors.PermissionDenied):
        service.handle_call(GATEWAY_SESSION, pb.CALL_METHOD_BATCH_PUT, put, [4], [])
    get = pb.BatchGetRequest(namespace=ns, keys=[b"k"]).SerializeToString()
    with pytest.raises(errors.PermissionDenied):
        service.handle_call(GATEWAY_SESSION, pb.CALL_METHOD_BATCH_GET, get, [], [16])
    node = service.store.stats()
    assert set(node.tenant_bytes) == {"alice"}  # no tenant "@gateway" was created
    assert node.blocks == 1
    assert _get(service, ALICE, [b"k"], 16)[1] == [b"alice"]
    # Nor may such a session take descriptors over gRPC.
    with _as(principal.INSECURE), pytest.raises(errors.PermissionDenied):
        service.grant_reads(
            pb.BatchGetRequest(
                namespace=pb.Namespace(tenant="alice", name="m"), keys=[b"k"],
                principal=GATEWAY_SESSION,
            )
        )  # fmt: skip


async def test_grpc_methods_act_for_the_callers_tenant(service: blocks.BlockService) -> None:
    """Tenant B, a user, cannot read, write, delete, pin, touch, list or stat tenant A's
    namespace by naming it; naming none acts on its own."""
    _put(service, ALICE, [b"k"], [b"alice"])
    svc = servicer.KVCacheServicer(service)
    theirs = pb.Namespace(tenant="alice", name="m")
    calls: list[tuple[Callable[[Any, Any], Awaitable[Any]], Any]] = [
        (svc.BatchExists, pb.BatchExistsRequest(namespace=theirs, keys=[b"k"])),
        (svc.Lookup, pb.LookupRequest(namespace=theirs, keys=[b"k"])),
        (svc.Delete, pb.DeleteRequest(namespace=theirs, keys=[b"k"])),
        (svc.ListKeys, pb.ListKeysRequest(namespace=theirs)),
        (svc.Pin, pb.PinRequest(namespace=theirs, keys=[b"k"], pin_s=60)),
        (svc.Unpin, pb.UnpinRequest(namespace=theirs, keys=[b"k"])),
        (svc.Touch, pb.TouchRequest(namespace=theirs, keys=[b"k"])),
        (svc.BatchGet, pb.BatchGetRequest(namespace=theirs, keys=[b"k"], principal=BOB)),
        (svc.BatchPut, pb.BatchPutRequest(
            namespace=theirs, keys=[b"x"], sizes=[4], principal=BOB
        )),
        (svc.BatchPut, pb.BatchPutRequest(
            namespace=theirs, keys=[b"x"], sizes=[4], principal=ALICE
        )),
        (svc.CommitPuts, pb.CommitPutsRequest(namespace=theirs, put_ids=[1])),
        (svc.ReleaseReads, pb.ReleaseReadsRequest(namespace=theirs, lease_ids=[1])),
        (svc.SetNamespaceTTL, pb.SetNamespaceTTLRequest(namespace=theirs, ttl_s=0.001)),
        (svc.Stats, pb.StatsRequest(tenant="alice")),
    ]  # fmt: skip
    with _as(_user("bob")):
        for method, request in calls:
            with pytest.raises(errors.PermissionDenied):
                await method(request, CTX)
        # Naming no tenant (or its own) acts for bob: alice's block is not there.
        mine = pb.Namespace(name="m")
        exists = await svc.BatchExists(pb.BatchExistsRequest(namespace=mine, keys=[b"k"]), CTX)
        assert list(exists.present) == [False]
        assert (await svc.Delete(pb.DeleteRequest(namespace=mine, keys=[b"k"]), CTX)).deleted == 0
        listed = await svc.ListKeys(pb.ListKeysRequest(namespace=mine), CTX)
        assert list(listed.entries) == []
        stats = await svc.Stats(pb.StatsRequest(), CTX)
        assert (stats.tenant, stats.blocks) == ("bob", 0)  # its own, not the node's
        # A put through bob's session lands in bob's tenant; alice's session is refused.
        with pytest.raises(errors.PermissionDenied):
            await svc.BatchPut(
                pb.BatchPutRequest(namespace=mine, keys=[b"k"], sizes=[3], principal=ALICE), CTX
            )
        reply = await svc.BatchPut(
            pb.BatchPutRequest(namespace=mine, keys=[b"k"], sizes=[3], principal=BOB), CTX
        )
        assert reply.items[0].status == pb.ITEM_STATUS_OK
    assert service.store.stats("bob").pending_puts == 1
    assert _get(service, ALICE, [b"k"], 16)[1] == [b"alice"]  # untouched
    assert service.store.stats("alice").evictions["delete"] == 0


async def test_put_ids_and_leases_are_the_granted_tenants(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"alice"])
    svc = servicer.KVCacheServicer(service)
    ns = pb.Namespace(name="m")
    with _as(_user("alice")):
        put = await svc.BatchPut(
            pb.BatchPutRequest(namespace=ns, keys=[b"p"], sizes=[4], principal=ALICE), CTX
        )
        got = await svc.BatchGet(
            pb.BatchGetRequest(namespace=ns, keys=[b"k"], principal=ALICE), CTX
        )
    put_id, lease_id = put.items[0].put_id, got.items[0].lease_id
    with _as(_user("bob")):  # bob guesses alice's ids
        done = await svc.CommitPuts(pb.CommitPutsRequest(namespace=ns, put_ids=[put_id]), CTX)
        assert list(done.statuses) == [pb.ITEM_STATUS_EXPIRED]
        await svc.ReleaseReads(pb.ReleaseReadsRequest(namespace=ns, lease_ids=[lease_id]), CTX)
    assert service.store.stats("alice").pending_puts == 1
    assert service.delete("alice", pb.DeleteRequest(namespace=ns, keys=[b"k"])).deleted == 1
    assert service.store.stats().used_bytes > 0  # alice's lease still holds the block
    with _as(_user("alice")):
        done = await svc.CommitPuts(pb.CommitPutsRequest(namespace=ns, put_ids=[put_id]), CTX)
        assert list(done.statuses) == [pb.ITEM_STATUS_OK]
        await svc.ReleaseReads(pb.ReleaseReadsRequest(namespace=ns, lease_ids=[lease_id]), CTX)
    assert service.store.stats().blocks == 1  # p, committed


async def test_privileged_callers_name_the_tenant_and_see_the_node(
    service: blocks.BlockService,
) -> None:
    _put(service, ALICE, [b"k"], [b"alice"])
    _put(service, BOB, [b"k"], [b"bob"])
    svc = servicer.KVCacheServicer(service)
    theirs = pb.Namespace(tenant="alice", name="m")
    for who in (_user("bob", is_admin=True), principal.service("gateway", "gw-1")):
        with _as(who):
            exists = await svc.BatchExists(
                pb.BatchExistsRequest(namespace=theirs, keys=[b"k"]), CTX
            )
            assert list(exists.present) == [True]
            node = await svc.Stats(pb.StatsRequest(), CTX)
            assert (node.tenant, node.blocks) == ("", 2)
            alice = await svc.Stats(pb.StatsRequest(tenant="alice"), CTX)
            assert (alice.tenant, alice.blocks) == ("alice", 1)
    with _as(principal.ANONYMOUS), pytest.raises(errors.Unauthenticated):
        await svc.Stats(pb.StatsRequest(), CTX)


async def test_operator_settings_are_for_admins(service: blocks.BlockService) -> None:
    svc = servicer.KVCacheServicer(service)
    quota = pb.SetQuotaRequest(tenant="bob", quota_bytes=1)
    policy = pb.SetNamespacePolicyRequest(namespace=pb.Namespace(tenant="bob", name="m"))
    for who in (_user("bob"), principal.service("gateway", "gw-1")):
        with _as(who):
            with pytest.raises(errors.PermissionDenied):
                await svc.SetQuota(quota, CTX)
            with pytest.raises(errors.PermissionDenied):
                await svc.SetNamespacePolicy(policy, CTX)
    assert _put(service, BOB, [b"k"], [b"bob"]).items[0].status == pb.ITEM_STATUS_OK
    with _as(_user("admin", is_admin=True)):
        await svc.SetQuota(quota, CTX)
        with pytest.raises(errors.InvalidArgument):
            await svc.SetQuota(pb.SetQuotaRequest(tenant="bad/name", quota_bytes=1), CTX)
    reply = _put(service, BOB, [b"k2"], [b"bob"])
    assert reply.items[0].status == pb.ITEM_STATUS_QUOTA_EXCEEDED


def test_label_bound_caps_tenants_and_namespaces() -> None:
    bound = metrics.LabelBound(max_tenants=2, max_namespaces=2)
    assert bound.namespace("a", "x") == ("a", "x")
    assert bound.namespace("a", "y") == ("a", "y")
    assert bound.namespace("a", "z") == ("a", metrics.OTHER)
    assert bound.namespace("a", "x") == ("a", "x")  # the first ones keep their label
    assert bound.tenant("b") == "b"
    assert bound.namespace("c", "x") == (metrics.OTHER, metrics.OTHER)
    assert bound.tenant("c") == metrics.OTHER
    assert bound.namespace(metrics.OTHER, "x") == (metrics.OTHER, metrics.OTHER)
    overall = metrics.LabelBound(max_tenants=8, max_namespaces=8, max_pairs=3)
    assert [overall.namespace(t, "n") for t in "abcd"] == [
        ("a", "n"), ("b", "n"), ("c", "n"), ("d", metrics.OTHER)
    ]  # fmt: skip


def test_client_chosen_namespaces_do_not_grow_the_metric_series(
    service: blocks.BlockService,
) -> None:
    session = "labels-tenant/engine/0001"
    for i in range(metrics.MAX_NAMESPACE_LABELS + 40):
        request = pb.BatchGetRequest(namespace=pb.Namespace(name=f"ns-{i}"), keys=[b"k"])
        plan = _now(
            service.handle_call(
                session, pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), [], [16]
            )
        )
        assert plan.on_done is not None
        plan.on_done(True)
    names = {
        sample.labels["namespace"]
        for family in metrics.MISSES.collect()
        for sample in family.samples
        if sample.labels.get("tenant") == "labels-tenant"
    }
    assert len(names) == metrics.MAX_NAMESPACE_LABELS + 1
    assert metrics.OTHER in names


def test_store_counts_are_exported_as_counters(service: blocks.BlockService) -> None:
    """Evictions, quota rejections and lease waits are cumulative: counters named `_total`
    (they were gauges without the suffix)."""
    svc = service
    svc.store.set_quota("counted", 1 * MIB)
    principal_name = "counted/alice"
    datas = [bytes([i]) * (1 * MIB) for i in range(2)]
    reply = _put(svc, principal_name, [b"a", b"b"], datas)
    assert [i.status for i in reply.items].count(pb.ITEM_STATUS_QUOTA_EXCEEDED) == 1
    svc.export_gauges()
    registry = prometheus_client.REGISTRY
    sample = registry.get_sample_value
    assert sample("kvtier_kvcache_quota_rejections_total", {"tenant": "counted"}) == 1
    assert sample("kvtier_kvcache_lease_waits_total", {"tenant": "counted"}) is not None
    assert sample("kvtier_kvcache_evictions_total", {"tenant": "counted", "cause": "ttl"}) == 0
    kinds = {m.name: m.type for m in registry.collect() if m.name.startswith("kvtier_kvcache_")}
    assert kinds["kvtier_kvcache_evictions"] == "counter"
    assert kinds["kvtier_kvcache_quota_rejections"] == "counter"
