"""The gateway's data-plane calls (`kvtier.transport.base.CallHandler`), authorized per session:
WRITE_STRIPES into an upload the session's tenant began, READ_RANGE of a bucket its tenant owns
(the KV tier's internal bucket: KV nodes only, and nothing else for them). A mixin of
`front.ObjectFront`, which supplies the engine, the insecure flag and the bucket records.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from kvtier import errors, names, tracing
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from kvtier.transport import base, calls, dataplane
from services.gateway import access, objects


class DataPlaneCalls:
    """The data-plane side of the object front (see the module docstring)."""

    engine: objects.ObjectEngine
    _insecure: bool

    async def bucket_info(self, name: str, *, fresh: bool = False) -> metadata_pb2.BucketInfo:
        """A bucket's record (`front.ObjectFront.bucket_info`)."""
        raise NotImplementedError

    def _session_may_use(self, session: str, tenant: str) -> bool:
        """Whether a data-plane session may use a resource of tenant ("": of no tenant). A
        kvcache node's (`@kvcache/...`) only those of no tenant: its own writes into the
        durable KV bucket (`access.may_use`)."""
        if self._insecure:
            return True
        role = dataplane.role_of(session)
        if role == access.KV_ROLE:
            return not tenant
        if role:
            return True
        return bool(tenant) and dataplane.tenant_of(session) == tenant

    def handle_call(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> Awaitable[base.CallPlan]:
        """The gateway's `kvtier.transport.base.CallHandler` (principal: the session's, a
        string, named as the protocol names it)."""
        tracing.name_call("gateway", pb.ObjectCallMethod, method)
        if method == pb.OBJECT_CALL_METHOD_WRITE_STRIPES:
            write = calls.parse_request(pb.WriteStripesRequest, request)
            if not self._session_may_use(principal, self.engine.upload_owner(write.upload_id)):
                raise access.denied(f"session {principal} may not write upload {write.upload_id}")
            return self.engine.write_plan(write, segments)
        if method == pb.OBJECT_CALL_METHOD_READ_RANGE:
            read = calls.parse_request(pb.ReadRangeRequest, request)
            if segments:
                raise errors.InvalidArgument("READ_RANGE carries no segments")
            return self._read(principal, read, capacities)
        raise errors.InvalidArgument(f"unknown gateway call method {method}")

    async def _read(
        self, session: str, req: pb.ReadRangeRequest, capacities: Sequence[int]
    ) -> base.CallPlan:
        if req.bucket == names.KV_DURABLE_BUCKET:
            if not (self._insecure or dataplane.role_of(session) == access.KV_ROLE):
                raise access.denied(f"{req.bucket} is internal to the KV tier")
            stored = req.bucket
        elif not self._insecure and dataplane.role_of(session) == access.KV_ROLE:
            raise access.denied(f"a kvcache node reads the KV tier's bucket only, not {req.bucket}")
        else:
            info = await self.bucket_info(req.bucket)
            if not self._session_may_use(session, info.tenant):  # deny on a fresh record only
                info = await self.bucket_info(req.bucket, fresh=True)
            if not self._session_may_use(session, info.tenant):
                raise access.denied(f"session {session} may not read bucket {req.bucket}")
            stored = names.storage_name(info.name, info.storage_id)
        mapped = pb.ReadRangeRequest()
        mapped.CopyFrom(req)
        mapped.bucket = stored
        return await self.engine.read_plan(mapped, capacities)
