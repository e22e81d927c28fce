"""Probing the data plane (tests/component/test_probe.py): every data-plane call of the nodes
tenant users may open sessions on, from the protos' `*CallMethod` enums (a new call is probed
without a line here), made on tenant B's own session; A's descriptor stolen and B's descriptor
moved onto A's block; every endpoint given no token, a forged one, or B's token of another node.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from google.protobuf import descriptor_pool, message

from kvtier import errors, names
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2
from kvtier.transport import base, registry
from tests.component import harness, probe_cluster, probe_rpc, probe_state, probe_tally

#: Which nodes serve the calls of a proto package's `*CallMethod` enum.
_CALL_SERVERS = {
    "kvtier.kvcache.v1": "kvcache",
    "kvtier.gateway.v1": "gateway",
    "kvtier.datanode.v1": "datanode",
}


@dataclasses.dataclass(frozen=True)
class CallMethod:
    """One data-plane call method, from a `*CallMethod` enum of the protos."""

    number: int
    name: str  # e.g. BatchPut
    request: type[message.Message]
    reply: type[message.Message]
    role: str


def call_methods() -> list[CallMethod]:
    """Every data-plane call of every node: the values of every `*CallMethod` enum in the
    protos, with their messages found by name (BATCH_PUT -> BatchPutRequest / BatchPutResponse,
    as the protos document). A package missing from _CALL_SERVERS fails here."""
    pool = descriptor_pool.Default()
    out = []
    for module in probe_rpc.proto_modules():
        package = module.DESCRIPTOR.package
        for enum_name, enum_desc in module.DESCRIPTOR.enum_types_by_name.items():
            if not enum_name.endswith("CallMethod"):
                continue
            role = _CALL_SERVERS[package]
            for value in enum_desc.values:
                if value.number == 0:
                    continue
                words = value.name.split("CALL_METHOD_", 1)[1].split("_")
                name = "".join(w.capitalize() for w in words)
                request = pool.FindMessageTypeByName(f"{package}.{name}Request")
                reply = pool.FindMessageTypeByName(f"{package}.{name}Response")
                out.append(
                    CallMethod(
                        value.number, name, probe_rpc.request_class(request),
                        probe_rpc.request_class(reply), role,
                    )
                )  # fmt: skip
    assert out, "no data-plane call methods found in the protos"
    return out


def _buffers(call: CallMethod, request: Any) -> tuple[list[bytes], list[bytearray]]:
    """The segments and receive buffers a call carries."""
    fields = request.DESCRIPTOR.fields_by_name
    keys = len(request.keys) if "keys" in fields else 1
    if call.name.endswith("Put") or call.name.startswith("Write"):
        sizes = list(request.sizes) if "sizes" in fields else [4096]
        return [b"B" * size for size in sizes], []
    if call.name.endswith("Get") or call.name.startswith("Read"):
        return [], [bytearray(256 * 1024) for _ in range(keys)]
    return [], []


async def call_as_b(
    probing: probe_tally.Probing,
    node: harness.Running,
    transport: base.Transport,
    call: CallMethod,
    variant: str,
    request: message.Message,
) -> None:
    segments, intos = _buffers(call, request)
    raw = request.SerializeToString()
    try:
        result = await transport.call(call.number, raw, segments, intos)
    except errors.Internal as exc:
        outcome, problem = type(exc).__name__, "server error"
    except errors.KVTierError as exc:
        outcome, problem = type(exc).__name__, ""
    else:
        outcome = "OK"
        reply = call.reply.FromString(result.reply)
        landed = b"".join(bytes(buf[:n]) for buf, n in zip(intos, result.lengths, strict=False))
        leaked = probing.leaked(landed)
        if leaked:
            problem = f"ACCEPTED: A's {leaked[0]!r} landed in B's buffer"
        else:
            problem = probe_tally.judge_reply(probing, call.name, raw, reply)
    target = f"{node.info.node_id} call {call.name}"
    probing.tally.record(
        probe_tally.C_B_ON_A, target, "data plane, B's own session", variant, outcome, problem
    )


def call_variants(
    probing: probe_tally.Probing, call: CallMethod
) -> list[tuple[str, message.Message]]:
    """Naming A's resources, naming nothing, and for reads the KV tier's internal bucket and
    A's buckets under their storage names."""
    named: Any = probe_rpc.fill(call.request(), probing.targets)
    out: list[tuple[str, message.Message]] = [("naming A", named)]
    bare: Any = probe_rpc.untenanted(named)
    if bare is not None:
        if "principal" in bare.DESCRIPTOR.fields_by_name:
            bare.ClearField("principal")  # gRPC only: a call's is its session's
        out.append(("naming nothing", bare))
    if call.name == "ReadRange":
        w = probing.world
        for label, bucket in (
            ("the KV tier's internal bucket", names.KV_DURABLE_BUCKET),
            ("A's storage name", w.storage),
            ("A's KV bucket", w.kv_bucket),
        ):
            read: Any = call.request()
            read.bucket, read.key = bucket, probing.targets.key
            out.append((label, read))
    return out


async def open_as_b(
    world: probe_cluster.World, node: harness.Running, stack: contextlib.AsyncExitStack
) -> tuple[base.Transport, common_pb2.OpenDataPlaneResponse]:
    """B's own data-plane session on node (tcp)."""
    client = await stack.enter_async_context(
        dataplane_client.DataPlaneClient(node.info.client_address, security=world.b.security)
    )
    reply = await client.negotiate("probe-b", ["tcp"])
    transport = await registry.connect(
        reply.endpoint, reply.token, registry.ClientSettings(timeout_s=5.0)
    )
    stack.push_async_callback(transport.close)
    return transport, reply


async def without_token(probing: probe_tally.Probing, node: harness.Running) -> None:
    """Every data-plane endpoint of the node refuses a missing or forged token."""
    for endpoint in node.info.dataplane.endpoints:
        for variant, token in (("no token", b""), ("forged token", b"\x01" * 64)):
            outcome, problem = await connect(endpoint, token)
            probing.tally.record(
                probe_tally.A_NO_CREDENTIAL,
                f"{node.info.node_id} data plane {endpoint.name}",
                endpoint.address,
                variant,
                outcome,
                problem,
            )


async def connect(endpoint: common_pb2.TransportEndpoint, token: bytes) -> tuple[str, str]:
    """(outcome, problem) of connecting to a data-plane endpoint with token (refusal expected)."""
    settings = registry.ClientSettings(timeout_s=5.0)
    try:
        transport = await registry.connect(endpoint, token, settings)
    except errors.PermissionDenied as exc:
        return type(exc).__name__, ""
    except errors.KVTierError as exc:
        return type(exc).__name__, "expected PermissionDenied"
    await transport.close()
    return "connected", "ACCEPTED: the endpoint took the token"


async def b_cleans_up(probing: probe_tally.Probing, transport: base.Transport) -> None:
    """B's puts naming nothing landed in B's own namespace (a control), and B deletes them."""
    keys = list(probing.world.blocks)
    request = kvcache_pb2.BatchExistsRequest(
        namespace=kvcache_pb2.Namespace(name=probing.world.namespace), keys=keys
    )
    result = await transport.call(kvcache_pb2.CALL_METHOD_BATCH_EXISTS, request.SerializeToString())
    present = list(kvcache_pb2.BatchExistsResponse.FromString(result.reply).present)
    problem = "" if all(present) else "B's own puts are not in B's namespace"
    probing.tally.record(
        probe_tally.CONTROL,
        "kvcache call BatchExists",
        "data plane, B's own session",
        "B's own namespace after B's puts",
        str(present),
        problem,
    )
    delete = kvcache_pb2.DeleteRequest(namespace=request.namespace, keys=keys)
    await transport.call(kvcache_pb2.CALL_METHOD_DELETE, delete.SerializeToString())


async def descriptors_as_b(
    probing: probe_tally.Probing,
    transport: base.Transport,
    session: common_pb2.OpenDataPlaneResponse,
) -> None:
    """A's descriptor used on B's session, and B's own descriptor moved onto A's block: both
    refused (the MAC binds a descriptor to its session and range). B's unmoved descriptor works
    (a control: the path is real)."""
    world = probing.world
    stolen = base.Descriptor.from_proto(world.kv_descriptor)
    address = world.cluster.kvcache.info.client_address
    async with kvcache_client.KVCacheClient(address, security=world.b.security) as client:
        grant = await client.batch_put(
            kvcache_pb2.BatchPutRequest(
                namespace=kvcache_pb2.Namespace(name="probe-b-own"),
                keys=[b"b-own"],
                sizes=[4096],
                principal=session.principal,
            )
        )
        own = base.Descriptor.from_proto(grant.items[0].descriptor)
        store = probe_state.block_service_of(world.cluster).store
        victim = store._index[(world.a.tenant, world.namespace, next(iter(world.blocks)))].extent
        aimed = dataclasses.replace(
            own, offset=victim.offset, length=min(own.length, victim.requested)
        )
        for variant, desc in (
            ("A's descriptor on B's session", stolen),
            ("B's descriptor moved onto A's block", aimed),
        ):
            for op in ("read", "write"):
                try:
                    if op == "read":
                        await transport.read(desc, bytearray(desc.length))
                    else:
                        await transport.write(desc, b"B" * desc.length)
                except errors.PermissionDenied as exc:
                    outcome, problem = type(exc).__name__, ""
                except errors.KVTierError as exc:
                    outcome, problem = type(exc).__name__, "expected PermissionDenied"
                else:
                    outcome, problem = "OK", f"ACCEPTED: a {op} through a descriptor not B's"
                probing.tally.record(
                    probe_tally.C_B_ON_A,
                    f"kvcache one-sided {op}",
                    "data plane, B's own session",
                    variant,
                    outcome,
                    problem,
                )
        await transport.write(own, b"B" * own.length)  # B's own: fine
        probing.tally.record(
            probe_tally.CONTROL,
            "kvcache one-sided write",
            "data plane, B's own session",
            "B's own descriptor",
            "OK",
        )
        await client.commit_puts(
            kvcache_pb2.CommitPutsRequest(
                namespace=kvcache_pb2.Namespace(name="probe-b-own"),
                put_ids=[grant.items[0].put_id],
                abort=True,
            )
        )


async def tokens_elsewhere(
    probing: probe_tally.Probing, replies: dict[str, common_pb2.OpenDataPlaneResponse]
) -> None:
    """B's data-plane tokens of one node, presented to every other endpoint of every node (the
    datanodes' included: B has no other way to their shard calls): refused."""
    for issuer, reply in replies.items():
        for node in probing.world.cluster.nodes:
            for endpoint in node.info.dataplane.endpoints:
                if node.info.node_id == issuer and endpoint.name == reply.transport:
                    continue  # where the token is valid
                outcome, problem = await connect(endpoint, reply.token)
                probing.tally.record(
                    probe_tally.C_B_ON_A,
                    f"{node.info.node_id} data plane {endpoint.name}",
                    f"B's {reply.transport} token of {issuer}",
                    "token elsewhere",
                    outcome,
                    problem,
                )
