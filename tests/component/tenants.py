"""Acting as a tenant's user inside the gateway's process: bind a `kvtier.principal` around calls
to the object front or the servicers (what the gRPC interceptor and the S3 front do per call),
and PUT/GET through the front as that caller."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from kvtier import principal, rpc
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import front as front_mod

ALICE = principal.user("AKALICE", "team-a", is_admin=False, shm_trusted=False)
BOB = principal.user("AKBOB", "team-b", is_admin=False, shm_trusted=False)
#: The servicers never look at their context.
NO_CONTEXT: rpc.ServicerContext = None  # type: ignore[assignment]


@contextlib.contextmanager
def acting(who: principal.Principal) -> Iterator[None]:
    """Calls in the block are who's."""
    token = principal.bind(who)
    try:
        yield
    finally:
        principal.unbind(token)


def session(who: principal.Principal) -> str:
    """A data-plane session principal of who (as `kvtier.transport.dataplane` mints them)."""
    return f"{who.tenant}/{who.name}/0123456789abcdef"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(front: front_mod.ObjectFront, bucket: str, key: str, data: bytes) -> pb.ObjectInfo:
    """PUT through the front as the bound caller (BeginPut, the body a call at a time,
    CommitPut)."""
    begun = await front.begin_put(pb.BeginPutRequest(bucket=bucket, key=key, size=len(data)))
    stripe, most = front.engine.upload_limits(begun.upload_id)
    chunk = most - most % stripe
    for at in range(0, len(data), chunk):
        piece = data[at : at + chunk]

        async def fill(view: memoryview, piece: bytes = piece) -> None:
            view[:] = piece

        await front.engine.write_call(begun.upload_id, len(piece), fill)
    reply = await front.commit_put(pb.CommitPutRequest(upload_id=begun.upload_id))
    return reply.object


async def get(front: front_mod.ObjectFront, bucket: str, key: str) -> bytes:
    """GET through the front as the bound caller (NotFound, PermissionDenied)."""
    found = await front.resolve(bucket, key)
    out = bytearray()

    async def sink(view: memoryview) -> None:
        out.extend(view)

    if found.meta.size:
        await front.engine.stream(found, 0, found.meta.size, sink)
    return bytes(out)
