"""Probing gRPC: every RPC of every kvtier service, found in the protos (`kvtier.authz.methods`),
called on every node that serves it with its real request type, through a given door (port and
credential), by path (no typed client: a new RPC is probed without a line here).

Requests are built from their descriptors: `empty(method)` and `naming_a(method, targets)`, which
fills every field it knows by name with tenant A's resources (bucket, key, upload, namespace,
tenant, access key, drive, KV put and lease ids) and the values that would hurt most if accepted
(admin flag, 1-byte quota, a forged shard meta dated far in the future, pins of 30 minutes).
`untenanted` clears every `tenant` field (the request then names nothing: B's own namespace).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import importlib
import pkgutil
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier import authz, rpc, security, tokens
from kvtier.proto.auth.v1 import auth_pb2
from kvtier.transport import registry
from tests import pki as test_pki

Method = descriptor.MethodDescriptor
#: A gRPC status, or OK with the replies read.
Outcome = tuple[grpc.StatusCode, list[message.Message]]
TIMEOUT_S = 5.0
#: One reply is enough from a server stream (WatchClusterMap sends the map first, then waits).
STREAM_REPLY_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a request names (tenant A's resources, or B's own for copy destinations)."""

    tenant: str
    bucket: str
    storage: str
    key: str
    upload_key: str
    upload_id: str
    part_etag: str
    open_put_id: str
    namespace: str
    kv_keys: tuple[bytes, ...]
    kv_put_ids: tuple[int, ...]
    kv_lease_ids: tuple[int, ...]
    access_key: str
    drive_id: str
    #: The data-plane session principal gRPC puts and gets grant descriptors to.
    principal: str


class Door(enum.Enum):
    """How a probe reaches a node."""

    CLIENT_ANONYMOUS = "client port, TLS, no token"
    CLIENT_FORGED_TOKEN = "client port, a forged session token"
    CLIENT_TAMPERED_TOKEN = "client port, B's token with its claims edited (tenant A, admin)"
    SERVICE_NO_CERT = "service port, TLS without a client certificate"
    SERVICE_ETCD_CERT = "service port, the CA's etcd certificate (no kvtier role)"
    CLIENT_USER = "client port, a user's session token"
    SERVICE_USER = "service port, a user's session token, no client certificate"


def proto_modules() -> list[Any]:
    """Every generated *_pb2 module of kvtier."""
    import kvtier.proto

    found = pkgutil.walk_packages(kvtier.proto.__path__, "kvtier.proto.")
    return [importlib.import_module(i.name) for i in found if i.name.endswith("_pb2")]


def methods() -> list[Method]:
    """Every RPC of every kvtier service."""
    return list(authz.methods())


def services() -> dict[str, list[Method]]:
    """Service full name -> its methods."""
    out: dict[str, list[Method]] = {}
    for method in methods():
        out.setdefault(method.containing_service.full_name, []).append(method)
    return out


def request_class(desc: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(desc)


def empty(method: Method) -> message.Message:
    return request_class(method.input_type)()


def _is_shard(msg: message.Message) -> bool:
    return msg.DESCRIPTOR.file.package.startswith("kvtier.datanode.")


def _scalar(name: str, field: Any, msg: message.Message, t: Targets) -> Any:
    """The value naming A's resource for a scalar field, or None to leave it."""
    fields = msg.DESCRIPTOR.fields_by_name
    multipart = "upload_id" in fields and "key" in fields
    shard = _is_shard(msg)
    strings: dict[str, str] = {
        "tenant": t.tenant,
        "bucket": t.storage if shard else t.bucket,
        "src_bucket": t.bucket,
        "dst_bucket": t.bucket,
        "key": t.upload_key if multipart else t.key,
        "src_key": t.key,
        "dst_key": t.key + "-copy",
        "upload_id": t.upload_id if multipart else t.open_put_id,
        "write_id": t.open_put_id,
        "access_key": t.access_key,
        "drive_id": t.drive_id,
        "client_id": "probe",
        "etag": t.part_etag,
        "display_name": "probe",
        "secret_key": "probe-secret-0123456789",
        "nonce": secrets.token_urlsafe(24),
        "data_id": "probe-data-id",
        "principal": t.principal,
    }
    if msg.DESCRIPTOR.full_name == "kvtier.metadata.v1.CreateBucketRequest" and name == "name":
        return t.bucket + "-new"  # a new bucket for tenant A, made by someone else
    if name == "name" and msg.DESCRIPTOR.full_name.startswith("kvtier.metadata.v1."):
        return t.bucket
    if name == "name" and msg.DESCRIPTOR.name == "Namespace":
        return t.namespace
    numbers: dict[str, Any] = {
        "size": 1,
        "part_number": 1,
        "pin_s": 1800.0,
        "ttl_s": 1.0,
        "lease_s": 600.0,
        "quota_bytes": 1,
        "limit": 10,
        "max_keys": 10,
        "max_parts": 10,
        "max_uploads": 10,
        "timestamp_unix_ms": tokens.now_ms(),
        "mtime_unix_ns": 2**62,
        "data_shards": 8,
        "parity_shards": 4,
        "block_bytes": 65536,
    }
    bools = {"is_admin", "shm_trusted", "overwrite", "abort", "replace_headers", "is_pointer"}
    if field.type == descriptor.FieldDescriptor.TYPE_STRING:
        return strings.get(name)
    if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
        return {"signature": b"\x00" * 32, "token": b"forged-token" * 4}.get(name)
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        return True if name in bools else None
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        values = field.enum_type.values  # the last: e.g. write-through, an admin's choice
        return values[-1].number if len(values) > 1 else None
    return numbers.get(name)


#: Messages filled as a real client fills them (not field by field).
_WHOLE_MESSAGES: dict[str, Callable[[], message.Message]] = {
    "kvtier.common.v1.DataPlaneCapabilities": lambda: registry.client_capabilities(["tcp"]),
}


def fill(msg: message.Message, t: Targets, depth: int = 0) -> message.Message:
    """Fill msg (in place) with the values naming t; returns it."""
    for field in msg.DESCRIPTOR.fields:
        name = field.name
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth > 3:
                continue
            whole = _WHOLE_MESSAGES.get(field.message_type.full_name)
            if whole is not None:
                getattr(msg, name).CopyFrom(whole())
                continue
            if field.is_repeated:
                fill(getattr(msg, name).add(), t, depth + 1)
            else:
                fill(getattr(msg, name), t, depth + 1)
            continue
        if field.is_repeated:
            values: Sequence[Any] = {
                "keys": t.kv_keys,
                "sizes": [1024] * len(t.kv_keys),
                "put_ids": t.kv_put_ids,
                "lease_ids": t.kv_lease_ids,
                "allowed": ["tcp"],
                "distribution": list(range(1, 13)),
                "checksum_algorithms": ["SHA256"],
            }.get(name, ())
            getattr(msg, name).extend(values)
            continue
        value = _scalar(name, field, msg, t)
        if value is not None:
            setattr(msg, name, value)
    return msg


def naming_a(method: Method, t: Targets) -> message.Message:
    """The method's request naming tenant A's resources."""
    return fill(empty(method), t)


def untenanted(msg: message.Message) -> message.Message | None:
    """A copy with every `tenant` field cleared; None when msg has none set."""
    out = type(msg)()
    out.CopyFrom(msg)
    found = False
    for sub in _walk(out):
        field = sub.DESCRIPTOR.fields_by_name.get("tenant")
        if field is not None and any(f is field for f, _ in sub.ListFields()):
            sub.ClearField("tenant")
            found = True
    return out if found else None


def _walk(msg: message.Message) -> Iterator[message.Message]:
    yield msg
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for item in value if field.is_repeated else [value]:
            yield from _walk(item)


# --- calling ------------------------------------------------------------------------------


def anonymous() -> security.ClientSecurity:
    """TLS trusting the cluster CA, no certificate, no user."""
    return security.ClientSecurity(ca_file=test_pki.session().ca_file)


def channel(address: str, sec: security.ClientSecurity) -> grpc.aio.Channel:
    return rpc.open_channel(address, security=sec)


async def invoke(
    chan: grpc.aio.Channel,
    method: Method,
    request: message.Message,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Outcome:
    """Call method by path with request; the status and the replies (one, for a stream)."""
    path = authz.path(method)
    reply_cls = request_class(method.output_type)
    serialize: Callable[[Any], bytes] = type(request).SerializeToString
    try:
        if method.client_streaming:
            if method.server_streaming:
                bidi = chan.stream_stream(path, serialize, reply_cls.FromString)
                return await _first(bidi(iter([request]), timeout=TIMEOUT_S, metadata=metadata))
            unary_in = chan.stream_unary(path, serialize, reply_cls.FromString)
            reply = await unary_in(iter([request]), timeout=TIMEOUT_S, metadata=metadata)
            return grpc.StatusCode.OK, [reply]
        if method.server_streaming:
            stream = chan.unary_stream(path, serialize, reply_cls.FromString)
            return await _first(stream(request, timeout=TIMEOUT_S, metadata=metadata))
        unary = chan.unary_unary(path, serialize, reply_cls.FromString)
        reply = await unary(request, timeout=TIMEOUT_S, metadata=metadata)
        return grpc.StatusCode.OK, [reply]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), []


async def _first(call: Any) -> Outcome:
    """The first reply of a server stream (OK with none when it sends nothing in time)."""
    try:
        async with asyncio.timeout(STREAM_REPLY_TIMEOUT_S):
            async for reply in call:
                return grpc.StatusCode.OK, [reply]
    except TimeoutError:
        pass
    finally:
        call.cancel()
    code = await call.code()
    if code == grpc.StatusCode.CANCELLED:
        return grpc.StatusCode.OK, []  # it waited for more: accepted, nothing sent yet
    return code, []


async def served(address: str) -> set[str]:
    """The kvtier services a node serves (its health service knows each by name), asked as
    the operator on its service port."""
    names = set(services())
    out = set()
    async with channel(address, test_pki.session().client()) as chan:
        stub: Any = health_pb2_grpc.HealthStub(chan)
        for name in sorted(names):
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                continue
            out.add(name)
    return out


def user_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return rpc.call_metadata(token=token)


#: A token of the right shape that no node issued.
FORGED_TOKEN = tokens.TOKEN_PREFIX + base64.urlsafe_b64encode(b"\x0a\x04kvt1" * 16).decode()


def tampered(token: str, tenant: str) -> str:
    """token with its claims rewritten to act for tenant as an admin (the issuer's signature
    no longer matches them)."""
    body = token[len(tokens.TOKEN_PREFIX) :]
    signed = auth_pb2.SignedToken.FromString(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    )
    claims = auth_pb2.TokenClaims.FromString(signed.claims)
    claims.tenant, claims.is_admin = tenant, True
    signed.claims = claims.SerializeToString()
    raw = base64.urlsafe_b64encode(signed.SerializeToString()).rstrip(b"=")
    return tokens.TOKEN_PREFIX + raw.decode()
