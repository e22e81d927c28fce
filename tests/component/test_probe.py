"""Issue 13's acceptance probe suite: every entry point of a secure cluster, called as nobody,
as a tenant user where a service or an admin is required, and as tenant B on tenant A's
buckets, objects, uploads and blocks; 0 accepted, and nothing of the cluster's state changed.

One in-process cluster for the module (`probe_cluster`: metadata with a master key, 6 datanodes
x 2 drives, a kvcache node, a gateway with S3 over HTTPS). The RPCs come from the protos
(`kvtier.authz.methods()`) and the nodes that serve each are asked (their health service), the
data-plane calls from the `*CallMethod` enums, the S3 operations from the gateway's route table:
a new RPC, call or route is probed without a change here (and a service no node serves fails).

- (a) no credential: every RPC on every node, with an empty request and one naming A's
  resources: on the client port without a token: UNAUTHENTICATED (health is public and says
  only SERVING); on the service port without a client certificate: the handshake is refused
  (UNAVAILABLE); with the CA's etcd certificate (a valid certificate of no kvtier role):
  UNAUTHENTICATED. Every data-plane endpoint refuses a missing or forged token.
- (b) tenant user A on every RPC only services or admins may call: PERMISSION_DENIED; on the
  datanodes (no client port) A has no way in: the handshake is refused for every RPC.
- (c) tenant B on every RPC tenant users may call, naming A's resources, naming nothing (B's own
  namespace: it must find nothing of A's) and copying A's objects into B's own bucket and upload;
  every data-plane call of the kvcache node and the gateway on B's own session, naming A; A's
  descriptor stolen, B's descriptor aimed at A's block, B's tokens on other nodes' endpoints.
  Refused, or answered with nothing of A's. A makes the same read requests and is answered
  (they are well-formed).
- (d) every S3 route on A's object bucket and KV bucket (and copies of A's objects into B's
  bucket and upload): unsigned, with a wrong secret, and signed by B (SigV4 header, SigV4 and
  SigV2 presigned URLs): never a 2xx (B's ListBuckets lists only B's).

Then the digest of every object, upload, KV block, drive file and etcd key/value
(`probe_state`) must equal the one taken before the first probe.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from google.protobuf import message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from kvtier import authz, etcdserver
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2
from tests import pki as test_pki
from tests.component import (
    harness,
    probe_cluster,
    probe_dataplane,
    probe_rpc,
    probe_s3,
    probe_state,
    probe_tally,
)

log = logging.getLogger(__name__)
pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Read-only RPCs tenant A makes with the very requests B is refused: they must succeed.
A_CONTROLS = frozenset(
    {
        "HeadBucket",
        "HeadObject",
        "ListObjects",
        "ListParts",
        "ListMultipartUploads",
        "BatchExists",
        "Lookup",
        "Score",
        "ListKeys",
        "Stats",
        "OpenDataPlane",
        "GetClusterMap",
    }
)


#: S3 errors that say a signature was not accepted: a probe signed by B must never get one.
_SIGNATURE_REFUSED = {
    "SignatureDoesNotMatch", "InvalidAccessKeyId", "AuthorizationQueryParametersError",
    "AuthorizationHeaderMalformed",
}  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def probing(
    etcd: etcdserver.EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[probe_tally.Probing]:
    """The cluster, tenant A's resources, and the snapshot before any probe."""
    tmp = tmp_path_factory.mktemp("probe")
    prefix = f"/kvtier-probe-{uuid.uuid4().hex[:10]}"
    async with (
        probe_cluster.running(etcd, prefix, tmp) as cluster,
        probe_cluster.world(cluster) as world,
    ):
        served = {node.info.node_id: await probe_rpc.served(node.address) for node in cluster.nodes}
        # The assumption behind hashing every etcd value: an idle cluster writes none.
        moving = await probe_state.etcd_is_stable(cluster.store, 1.0)
        assert not moving, f"etcd values change on an idle cluster: {moving}"
        before = await probe_state.snapshot(world)
        yield probe_tally.Probing(world, before, served)


def _variants(
    probing: probe_tally.Probing, method: probe_rpc.Method
) -> list[tuple[str, message.Message]]:
    """An empty request and one naming A's resources."""
    return [
        ("empty", probe_rpc.empty(method)),
        ("naming A", probe_rpc.naming_a(method, probing.targets)),
    ]


@pytest.mark.timeout(150)
async def test_a_every_entry_point_refuses_a_caller_without_credentials(
    probing: probe_tally.Probing,
) -> None:
    world = probing.world
    everything = set(probe_rpc.services())
    served = set().union(*probing.served.values())
    missing = everything - served
    assert not missing, f"no node of the probe cluster serves {missing}: add one"
    anonymous, etcd_cert = probe_rpc.anonymous(), test_pki.session().client("etcd")
    forged = probe_rpc.user_metadata(probe_rpc.FORGED_TOKEN)
    unauthenticated, refused = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE
    jobs: list[Coroutine[Any, Any, None]] = []
    async with contextlib.AsyncExitStack() as stack:
        for node in world.cluster.nodes:
            foreign = await stack.enter_async_context(probe_rpc.channel(node.address, etcd_cert))
            entries = [
                probe_tally.Entry(probe_rpc.Door.SERVICE_NO_CERT, refused, fresh=anonymous),
                probe_tally.Entry(probe_rpc.Door.SERVICE_ETCD_CERT, unauthenticated, chan=foreign),
            ]
            if node.info.client_address:
                chan = await stack.enter_async_context(
                    probe_rpc.channel(node.info.client_address, anonymous)
                )
                entries += [
                    probe_tally.Entry(probe_rpc.Door.CLIENT_ANONYMOUS, unauthenticated, chan=chan),
                    probe_tally.Entry(
                        probe_rpc.Door.CLIENT_FORGED_TOKEN, unauthenticated, chan, None, forged
                    ),
                ]
                jobs.append(_builtins(probing, node, chan))
            for method in probing.methods_of(node):
                for variant, request in _variants(probing, method):
                    for entry in entries:
                        jobs.append(
                            probe_tally.expect(
                                probing,
                                probe_tally.A_NO_CREDENTIAL,
                                node,
                                entry,
                                method,
                                variant,
                                request,
                            )
                        )
            jobs.append(probe_dataplane.without_token(probing, node))
        await probe_tally.bounded(jobs)
    problems = probing.tally.problems(probe_tally.A_NO_CREDENTIAL)
    assert not problems, "\n".join(problems)


async def _builtins(
    probing: probe_tally.Probing, node: harness.Running, chan: grpc.aio.Channel
) -> None:
    """Health is public and says only whether the node serves; reflection needs a caller."""
    door = probe_rpc.Door.CLIENT_ANONYMOUS.value
    health: Any = health_pb2.DESCRIPTOR.services_by_name["Health"].methods
    for method in health:
        code, replies = await probe_rpc.invoke(chan, method, health_pb2.HealthCheckRequest())
        problem = ""
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED):
            problem = "health is public"
        for reply in replies:
            fields = {f.name for f, _ in reply.ListFields()}
            if fields - {"status", "statuses"}:
                problem = f"ACCEPTED: health answered {sorted(fields)}"
        probing.tally.record(
            probe_tally.A_NO_CREDENTIAL,
            f"{node.info.node_id} {authz.path(method)}",
            door,
            "public",
            code.name,
            problem,
        )
    reflection: Any = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods
    for method in reflection:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        entry = probe_tally.Entry(
            probe_rpc.Door.CLIENT_ANONYMOUS, grpc.StatusCode.UNAUTHENTICATED, chan
        )
        await probe_tally.expect(
            probing, probe_tally.A_NO_CREDENTIAL, node, entry, method, "list services", request
        )


@pytest.mark.timeout(120)
async def test_b_tenant_users_may_not_call_service_or_admin_rpcs(
    probing: probe_tally.Probing,
) -> None:
    world = probing.world
    token = probe_rpc.user_metadata(await probe_tally.token_of(world.a, world))
    jobs: list[Coroutine[Any, Any, None]] = []
    async with contextlib.AsyncExitStack() as stack:
        for node in world.cluster.nodes:
            if node.info.client_address:
                chan = await stack.enter_async_context(
                    probe_rpc.channel(node.info.client_address, probe_rpc.anonymous())
                )
                entry = probe_tally.Entry(
                    probe_rpc.Door.CLIENT_USER, grpc.StatusCode.PERMISSION_DENIED, chan
                )
            else:  # no client port (datanodes): the service port is the only door, and shut
                entry = probe_tally.Entry(
                    probe_rpc.Door.SERVICE_USER, grpc.StatusCode.UNAVAILABLE,
                    fresh=probe_rpc.anonymous(),
                )  # fmt: skip
            for method in probing.methods_of(node):
                rule = authz.rule_of(method)
                assert rule is not None, authz.path(method)
                if entry.chan is not None and (rule.tenant or rule.public):
                    continue  # tenant users may call it: see (c)
                for variant, request in _variants(probing, method):
                    tagged = dataclasses.replace(entry, metadata=token)
                    jobs.append(
                        probe_tally.expect(
                            probing,
                            probe_tally.B_TENANT_ON_PRIVILEGED,
                            node,
                            tagged,
                            method,
                            variant,
                            request,
                        )
                    )
        await probe_tally.bounded(jobs)
    problems = probing.tally.problems(probe_tally.B_TENANT_ON_PRIVILEGED)
    assert not problems, "\n".join(problems)
    # The gateway's admin RPCs were among them, ListHealQueue (every tenant's queued keys) too.
    probed = {
        r.target.split(" ")[1]
        for r in probing.tally.results
        if r.category == probe_tally.B_TENANT_ON_PRIVILEGED
        and r.door == probe_rpc.Door.CLIENT_USER.value
        and not r.problem
    }
    for name in ("Heal", "DrainPool", "RemovePool", "ListHealQueue"):
        assert f"/kvtier.gateway.v1.AdminService/{name}" in probed, name


def _b_variants(
    probing: probe_tally.Probing, method: probe_rpc.Method, b_principal: str
) -> list[tuple[str, message.Message]]:
    """Empty, naming A's resources (descriptors for A's session), naming nothing (every tenant
    cleared; descriptors for B's own session), and for copies: A's object into B's own bucket
    or upload."""
    named = probe_rpc.naming_a(method, probing.targets)
    out = [("empty", probe_rpc.empty(method)), ("naming A", named)]
    bare: Any = probe_rpc.untenanted(named)
    if bare is not None:
        if "principal" in bare.DESCRIPTOR.fields_by_name:
            bare.principal = b_principal
        out.append(("naming nothing", bare))
    if "src_bucket" in method.input_type.fields_by_name:
        w = probing.world
        into_b = dataclasses.replace(
            probing.targets, bucket=w.b_bucket, upload_key=w.b_upload_key, upload_id=w.b_upload_id
        )
        request: Any = probe_rpc.fill(probe_rpc.empty(method), into_b)
        request.src_bucket, request.src_key = w.bucket, probing.targets.key
        out.append(("A's object into B's own", request))
    return out


async def _as_b(
    probing: probe_tally.Probing,
    node: harness.Running,
    chan: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    method: probe_rpc.Method,
    variant: str,
    request: message.Message,
) -> None:
    code, replies = await probe_rpc.invoke(chan, method, request, metadata)
    problem = probe_tally.judge_b(probing, method, request, code, replies)
    for reply in replies:  # B's own puts (naming nothing): B aborts them after the probes
        if isinstance(reply, kvcache_pb2.BatchPutResponse):
            probing.b_pending_puts.extend(i.put_id for i in reply.items if i.put_id)
    probing.tally.record(
        probe_tally.C_B_ON_A,
        f"{node.info.node_id} {authz.path(method)}",
        probe_rpc.Door.CLIENT_USER.value,
        variant,
        code.name,
        problem,
    )


async def _as_a_control(
    probing: probe_tally.Probing,
    node: harness.Running,
    chan: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    method: probe_rpc.Method,
    request: message.Message,
) -> None:
    code, _ = await probe_rpc.invoke(chan, method, request, metadata)
    problem = "" if code == grpc.StatusCode.OK else "A's own request was refused: a bad probe"
    probing.tally.record(
        probe_tally.CONTROL,
        f"{node.info.node_id} {authz.path(method)}",
        probe_rpc.Door.CLIENT_USER.value,
        "naming A",
        code.name,
        problem,
    )


async def _b_aborts_its_puts(probing: probe_tally.Probing) -> None:
    """B's own pending gRPC puts (B's namespace, A's key names) would hold those keys in B's
    namespace for the node's put timeout: B aborts them."""
    world = probing.world
    address = world.cluster.kvcache.info.client_address
    async with kvcache_client.KVCacheClient(address, security=world.b.security) as client:
        reply = await client.commit_puts(
            kvcache_pb2.CommitPutsRequest(
                namespace=kvcache_pb2.Namespace(name=world.namespace),
                put_ids=probing.b_pending_puts,
                abort=True,
            )
        )
    assert set(reply.statuses) <= {kvcache_pb2.ITEM_STATUS_OK}, reply


async def _b_session_principal(world: probe_cluster.World) -> str:
    """B's data-plane session principal on the kvcache node."""
    address = world.cluster.kvcache.info.client_address
    async with dataplane_client.DataPlaneClient(address, security=world.b.security) as client:
        return (await client.negotiate("probe-b", ["tcp"])).principal


@pytest.mark.timeout(120)
async def test_c_tenant_b_gets_nothing_of_tenant_a_over_grpc(probing: probe_tally.Probing) -> None:
    world, start = probing.world, len(probing.tally.results)
    b_token = await probe_tally.token_of(world.b, world)
    b_meta = probe_rpc.user_metadata(b_token)
    a_meta = probe_rpc.user_metadata(await probe_tally.token_of(world.a, world))
    edited = probe_rpc.user_metadata(probe_rpc.tampered(b_token, world.a.tenant))
    b_principal = await _b_session_principal(world)
    jobs: list[Coroutine[Any, Any, None]] = []
    async with contextlib.AsyncExitStack() as stack:
        for node in world.cluster.nodes:
            if not node.info.client_address:
                continue  # datanodes: no door for users at all, see (b)
            chan = await stack.enter_async_context(
                probe_rpc.channel(node.info.client_address, probe_rpc.anonymous())
            )
            for method in probing.methods_of(node):
                rule = authz.rule_of(method)
                assert rule is not None
                if not (rule.tenant or rule.public):
                    continue  # tenant users are refused outright, see (b)
                for variant, request in _b_variants(probing, method, b_principal):
                    jobs.append(_as_b(probing, node, chan, b_meta, method, variant, request))
                request = probe_rpc.naming_a(method, probing.targets)
                entry = probe_tally.Entry(
                    probe_rpc.Door.CLIENT_TAMPERED_TOKEN, grpc.StatusCode.UNAUTHENTICATED, chan,
                    metadata=edited,
                )  # fmt: skip
                jobs.append(
                    probe_tally.expect(
                        probing, probe_tally.C_B_ON_A, node, entry, method, "naming A", request
                    )
                )
                if method.name in A_CONTROLS:
                    request = probe_rpc.naming_a(method, probing.targets)
                    jobs.append(_as_a_control(probing, node, chan, a_meta, method, request))
        await probe_tally.bounded(jobs)
    await _b_aborts_its_puts(probing)
    problems = probing.tally.problems(probe_tally.C_B_ON_A, probe_tally.CONTROL, since=start)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
async def test_c_tenant_b_gets_nothing_of_tenant_a_over_the_data_plane(
    probing: probe_tally.Probing,
) -> None:
    world, start = probing.world, len(probing.tally.results)
    async with contextlib.AsyncExitStack() as stack:
        # B's own session on every node B may reach (those with a client port).
        users_may_reach = [n for n in world.cluster.nodes if n.info.client_address]
        opened = {
            node.info.node_id: await probe_dataplane.open_as_b(world, node, stack)
            for node in users_may_reach
            if "kvtier.common.v1.DataPlaneService" in probing.served[node.info.node_id]
        }
        jobs: list[Coroutine[Any, Any, None]] = []
        puts_of_b: list[Coroutine[Any, Any, None]] = []
        for call in probe_dataplane.call_methods():
            for node in world.cluster.nodes:
                if node.spec.label != call.role:
                    continue
                if node.info.node_id not in opened:
                    # No door for B (see (b)); B's tokens of other nodes: tokens_elsewhere.
                    assert not node.info.client_address, node.info.node_id
                    continue
                transport = opened[node.info.node_id][0]
                for variant, request in probe_dataplane.call_variants(probing, call):
                    job = probe_dataplane.call_as_b(
                        probing, node, transport, call, variant, request
                    )
                    # B's puts into its own namespace land after every read of it.
                    mine = variant == "naming nothing" and call.name == "BatchPut"
                    (puts_of_b if mine else jobs).append(job)
        kv_transport, kv_reply = opened[world.cluster.kvcache.info.node_id]
        jobs.append(probe_dataplane.descriptors_as_b(probing, kv_transport, kv_reply))
        replies = {node_id: reply for node_id, (_, reply) in opened.items()}
        jobs.append(probe_dataplane.tokens_elsewhere(probing, replies))
        await probe_tally.bounded(jobs)
        await probe_tally.bounded(puts_of_b)
        await probe_dataplane.b_cleans_up(probing, kv_transport)
    problems = probing.tally.problems(probe_tally.C_B_ON_A, probe_tally.CONTROL, since=start)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
async def test_d_every_s3_operation_refuses_no_signature_a_wrong_secret_and_tenant_b(
    probing: probe_tally.Probing,
) -> None:
    world = probing.world
    requests = probe_s3.requests(world)
    probed = {r.op for r in requests}
    assert {op for *_, op in probe_s3.routes()} <= probed
    jobs: list[Coroutine[Any, Any, None]] = []
    async with aiohttp.ClientSession() as http:
        for request in requests:
            for mode in probe_s3.Mode:
                jobs.append(_s3_probe(probing, http, request, mode))
        await probe_tally.bounded(jobs)
    problems = probing.tally.problems(probe_tally.D_S3)
    assert not problems, "\n".join(problems)


async def _s3_probe(
    probing: probe_tally.Probing,
    http: aiohttp.ClientSession,
    request: probe_s3.Request,
    mode: probe_s3.Mode,
) -> None:
    status, body = await probe_s3.send(http, probing.world, request, mode)
    code = body.partition(b"<Code>")[2].partition(b"</Code>")[0].decode(errors="replace")
    problem = ""
    if status >= 500:
        problem = "server error"
    elif mode in (probe_s3.Mode.UNSIGNED, probe_s3.Mode.WRONG_SECRET):
        if status != 403:
            problem = "expected 403" + (" (ACCEPTED)" if status < 300 else "")
    elif code in _SIGNATURE_REFUSED:
        problem = "a bad probe: B's signature was refused"
    elif status < 300:
        leaked = probing.leaked(body)
        if leaked:
            problem = f"ACCEPTED: the reply holds A's {leaked[0]!r}"
        elif request.op != "ListBuckets":
            problem = "ACCEPTED: B's request on A's resource succeeded"
    query = "&".join(f"{k}={v}" if v else k for k, v in request.query if k != "uploadId")
    target = f"{request.op} {request.method} {request.path}" + (f"?{query}" if query else "")
    outcome = f"{status} {code}".strip()
    probing.tally.record(probe_tally.D_S3, target, mode.value, "", outcome, problem)


@pytest.mark.timeout(120)
async def test_e_anonymous_gets_exactly_what_a_public_read_acl_grants(
    probing: probe_tally.Probing,
) -> None:
    """A's public-read bucket (a public-read object, a private one): every route, unsigned,
    answers 2xx exactly where S3's public-read grants it (listing, HeadBucket, reading the
    public object, bytes compared) and 403 everywhere else; the private object's bytes are
    never in a reply (and test_z: nothing changed)."""
    world = probing.world
    closed = list(world.public_closed.values())
    problems: list[str] = []
    async with aiohttp.ClientSession() as http:
        for request, granted in probe_s3.public_requests(world):
            status, body = await probe_s3.send(http, world, request, probe_s3.Mode.UNSIGNED)
            target = f"{request.op} {request.method} {request.path} {request.query}"
            key = request.path.rpartition("/")[2]
            if any(blob in body for blob in closed if blob):
                problems.append(f"{target}: LEAKED the private object")
            if not granted and status != 403:
                problems.append(f"{target}: {status}, expected 403")
            elif granted and status != 200:
                problems.append(f"{target}: {status}, expected 200 (granted by the ACL)")
            elif granted and request.op == "GetObject" and body != world.public_open[key]:
                problems.append(f"{target}: the public object's bytes differ")
            elif granted and request.op == "ListObjects":
                listed = all(k.encode() in body for k in (*world.public_open, *world.public_closed))
                if not listed:
                    problems.append(f"{target}: the listing misses keys")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
async def test_z_nothing_changed_and_nothing_was_accepted(probing: probe_tally.Probing) -> None:
    """Runs last: the state digest is unchanged; A's open PUT and upload are still A's."""
    world = probing.world
    after = await probe_state.snapshot(world)
    changed = probe_state.diff(probing.before, after)
    assert not changed, "state changed by the probes:\n" + "\n".join(changed)
    assert await world.a_objects.list_parts(world.bucket, world.upload_key, world.upload_id)
    await world.a_objects._rpc.abort_put(world.open_put_id)  # still open: B never touched it
    lines = probing.tally.summary()
    lines.append(
        f"state digest: {len(after)} entries unchanged "
        f"({dict(collections.Counter(n.split(':')[0] for n in after))})"
    )
    for line in lines:
        log.info("probe suite: %s", line)
    print("\n".join(["", *lines]), file=sys.stderr)  # noqa: T201  (the counts, in CI logs)
    accepted = [r.line() for r in probing.tally.results if r.problem]
    assert not accepted, "\n".join(accepted)
