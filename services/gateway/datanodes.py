"""The gateway's connections to datanodes: a gRPC shard client and a data-plane session each.

Opened lazily from the cluster map (a datanode's address is in its NodeInfo), kept while the
node stays in the map, reopened after a broken connection. Shard bytes move as data-plane calls
(WRITE_SHARD, READ_SHARD; WRITE_SMALL: small shards and their commit, and READ_METAS: metadata,
for all the node's drives of an object in one call); everything else is gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from kvtier import clustermap, errors, features, tracing
from kvtier import security as security_mod
from kvtier.clients import datanode as datanode_client
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.transport import base
from services.gateway import smallbatch, suspects

log = logging.getLogger(__name__)

#: A WRITE_SMALL call of at most this many shard bytes carries them in its request: over shm a
#: call with segments takes two round trips (the node says where they land, then the reply),
#: which cost more than copying a few KiB through the message.
INLINE_CALL_BYTES = 32 << 10


@dataclasses.dataclass(slots=True)
class _Conn:
    address: str
    #: NodeInfo.started_at_unix_ms of the incarnation these connections reach.
    started_at: int
    shards: datanode_client.ShardClient
    negotiator: dataplane_client.DataPlaneClient
    session: dataplane_client.DataPlaneSession | None = None
    opening: asyncio.Future[dataplane_client.DataPlaneSession] | None = None

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        await self.shards.close()
        await self.negotiator.close()


class Datanodes:
    """Connections to every datanode of the map, by node id."""

    def __init__(
        self,
        view: clustermap.MapView,
        client_id: str,
        *,
        timeout_s: float = 30.0,
        security: security_mod.ClientSecurity | None = None,
        max_write_bytes: int = 8 << 20,
    ) -> None:
        self._view = view
        self._client_id = client_id
        self._timeout_s = timeout_s
        #: The most shard bytes of one WRITE_SHARD call: a datanode lands a call's bytes in
        #: one of its staging slots and refuses a call larger than that.
        self._max_write_bytes = max_write_bytes
        #: Mutual TLS as this gateway (datanodes serve services only).
        self._security = security
        self._conns: dict[str, _Conn] = {}
        self._small: dict[str, smallbatch.SmallWrites] = {}
        #: Nodes whose calls were left behind and that have not answered since
        #: (services.gateway.fanout: no grace for them once a call is decided without them),
        #: each probed until it answers (`_probe`).
        self.suspects = suspects.Suspects(self._probe)
        #: Calls that outlive the request that made them (an undo's retries), cancelled at close.
        self._background: set[asyncio.Task[None]] = set()

    def _conn(self, node_id: str) -> _Conn:
        info = next(
            (
                n
                for n in self._view.current.nodes
                if n.node_id == node_id and n.role == common_pb2.NODE_ROLE_DATANODE
            ),
            None,
        )
        conn = self._conns.get(node_id)
        if info is None:
            # Not among the live nodes (its lease lapsed, e.g. while etcd was stopped, and it
            # has not registered again yet): a node this gateway knows is still tried at its
            # last address. A dead one fails fast there; one that kept serving answers.
            if conn is None:
                raise errors.Unavailable(f"datanode {node_id} is not in the cluster map")
            return conn
        # A new incarnation (the node restarted, maybe at the same address): new channels. The
        # old ones may sit in gRPC's reconnect backoff, failing every call for seconds.
        if conn is not None and (conn.address, conn.started_at) != (
            info.grpc_address, info.started_at_unix_ms,
        ):  # fmt: skip
            asyncio.ensure_future(self._conns.pop(node_id).close())  # noqa: RUF006 - best effort
            conn = None
        if conn is None:
            conn = _Conn(
                address=info.grpc_address,
                started_at=info.started_at_unix_ms,
                shards=datanode_client.ShardClient(
                    info.grpc_address, timeout_s=self._timeout_s, security=self._security
                ),
                negotiator=dataplane_client.DataPlaneClient(
                    info.grpc_address, timeout_s=self._timeout_s, security=self._security
                ),
            )
            self._conns[node_id] = conn
        return conn

    def supports(self, node_id: str, feature: str) -> bool:
        """Whether the map's NodeInfo of node_id advertises feature (kvtier.features): False
        for an older datanode (a rolling upgrade) and for one not in the map."""
        return features.advertised(self._view.current, node_id, feature)

    def shards(self, node_id: str) -> datanode_client.ShardClient:
        """The gRPC shard client of a datanode (Unavailable when it is not in the map)."""
        return self._conn(node_id).shards

    async def call(
        self,
        node_id: str,
        method: int,
        request: Any,
        segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> base.CallResult:
        """A data-plane call to a datanode; a broken connection is reopened once."""
        conn = self._conn(node_id)
        payload = request.SerializeToString()
        # Only a shard read's answer clears the suspicion of its shard reads (suspects).
        reads = method == shards_pb2.SHARD_CALL_METHOD_READ_SHARD
        for retry in (True, False):
            session = await self._session(conn)
            try:
                with tracing.child_span(  # the datanode continues it (the call's header)
                    "datanode.call", kind=tracing.CLIENT, attributes={"kvtier.node_id": node_id}
                ):
                    tracing.name_call("datanode", shards_pb2.ShardCallMethod, method)
                    result = await session.transport.call(method, payload, segments, intos)
            except base.PeerLost:
                await self._drop(conn, session)
                if not retry:
                    raise
                continue
            except errors.KVTierError as exc:
                if not suspects.is_silence(exc):
                    self.suspects.heard(node_id, reads=reads)  # its service answered
                raise
            self.suspects.heard(node_id, reads=reads)
            return result
        raise AssertionError("unreachable")

    async def write_shard(
        self, node_id: str, request: shards_pb2.WriteShardRequest, segments: Sequence[Any]
    ) -> int:
        """Append shard bytes (at request.offset) to a staged write on one of the node's
        drives: one WRITE_SHARD call per `max_write_bytes` of them, in order (a datanode takes
        at most one staging slot per call, whatever the erasure set's shape made of them).
        With request.bucket and key (a write's first call): the stamp of the drive's current
        version of that object, which the first call asks for (0: none, or not asked)."""
        offset, current = request.offset, 0
        for batch in write_batches(segments, self._max_write_bytes):
            call = shards_pb2.WriteShardRequest()
            call.CopyFrom(request)
            call.offset = offset
            if offset != request.offset:
                call.bucket = call.key = ""  # asked once
            result = await self.call(node_id, shards_pb2.SHARD_CALL_METHOD_WRITE_SHARD, call, batch)
            if call.bucket:
                reply = shards_pb2.WriteShardResponse.FromString(result.reply)
                current = reply.current_mtime_unix_ns
            offset += sum(len(s) for s in batch)
        return current

    async def write_small(
        self, node_id: str, shards: Sequence[tuple[str, datanode_pb2.ShardMeta, bytes]]
    ) -> list[shards_pb2.ShardResult]:
        """Stage and commit small one-part shards ((drive_id, meta, shard bytes), at most
        128 KiB each) on drives of the node; each drive's result, in order (its error there,
        or whether a newer version was there already: superseded). One call, or one shared
        with other objects' concurrent small writes to the node (services.gateway.smallbatch)."""
        batcher = self._small.get(node_id)
        if batcher is None:
            batcher = self._small[node_id] = smallbatch.SmallWrites(
                functools.partial(self._write_small_call, node_id), max_bytes=self._max_write_bytes
            )
        return await batcher.write(shards)

    async def _write_small_call(
        self, node_id: str, shards: Sequence[tuple[str, datanode_pb2.ShardMeta, bytes]]
    ) -> list[shards_pb2.ShardResult]:
        """One WRITE_SMALL call (write_small): the shards inline in the request when they are
        at most INLINE_CALL_BYTES in all (one round trip on shm), else as segments."""
        segments: list[bytes] = []
        if sum(len(shard) for _, _, shard in shards) <= INLINE_CALL_BYTES:
            request = shards_pb2.WriteSmallRequest(
                shards=[shards_pb2.SmallShard(drive_id=d, meta=m, data=s) for d, m, s in shards]
            )
        else:
            request = shards_pb2.WriteSmallRequest(
                shards=[shards_pb2.SmallShard(drive_id=d, meta=m) for d, m, _ in shards]
            )
            segments = [shard for _, _, shard in shards if len(shard)]
        result = await self.call(
            node_id, shards_pb2.SHARD_CALL_METHOD_WRITE_SMALL, request, segments
        )
        results = list(shards_pb2.WriteSmallResponse.FromString(result.reply).results)
        if len(results) != len(shards):
            raise errors.Internal(f"datanode {node_id}: {len(results)} results for {len(shards)}")
        return results

    async def read_metas(
        self,
        node_id: str,
        drive_ids: Sequence[str],
        bucket: str,
        key: str,
        version_id: str = "",
        *,
        data: bool | Sequence[str] = True,
    ) -> list[datanode_pb2.ShardMeta | errors.KVTierError]:
        """The object's metadata on drives of the node (one call): per drive, in order, its
        meta or its error (NotFound when the drive has none); version_id: that S3 version's.
        data: the inline shards of every drive (True), of none (False) or of the drives named
        (an older datanode sends them all anyway)."""
        request = shards_pb2.ReadMetasRequest(
            drive_ids=drive_ids, bucket=bucket, key=key, version_id=version_id,
            without_data=data is not True, data_drive_ids=[] if isinstance(data, bool) else data,
        )  # fmt: skip
        result = await self.call(node_id, shards_pb2.SHARD_CALL_METHOD_READ_METAS, request)
        metas = shards_pb2.ReadMetasResponse.FromString(result.reply).metas
        if len(metas) != len(drive_ids):
            raise errors.Internal(f"datanode {node_id}: {len(metas)} metas for {len(drive_ids)}")
        return [m.meta if not m.result.error_kind else error_of(m.result) for m in metas]

    async def read_shard(
        self, node_id: str, request: shards_pb2.ReadShardRequest, into: Any
    ) -> int:
        """Read verified shard blocks into `into`; returns the bytes read."""
        result = await self.call(
            node_id, shards_pb2.SHARD_CALL_METHOD_READ_SHARD, request, intos=[into]
        )
        return int(result.lengths[0]) if result.lengths else 0

    async def read_meta(
        self, node_id: str, drive_id: str, bucket: str, key: str
    ) -> datanode_pb2.ShardMeta:
        """The object's metadata on one of the node's drives (NotFound when absent)."""
        request = shards_pb2.ReadMetaRequest(drive_id=drive_id, bucket=bucket, key=key)
        result = await self.call(node_id, shards_pb2.SHARD_CALL_METHOD_READ_META, request)
        return shards_pb2.ReadMetaResponse.FromString(result.reply).meta

    async def _session(self, conn: _Conn) -> dataplane_client.DataPlaneSession:
        if conn.session is not None:
            return conn.session
        if conn.opening is None:
            conn.opening = asyncio.ensure_future(conn.negotiator.open(self._client_id))
        opening = conn.opening
        try:
            session = await asyncio.shield(opening)
        finally:
            if conn.opening is opening and opening.done():
                conn.opening = None
        if conn.session is None:
            conn.session = session
        return conn.session

    async def _drop(self, conn: _Conn, session: dataplane_client.DataPlaneSession) -> None:
        if conn.session is session:
            conn.session = None
        try:
            await session.close()
        except Exception:  # broken already: closing is best effort
            log.debug("closing a broken datanode session failed", exc_info=True)

    async def _probe(self, node_id: str) -> bool:
        """A suspect's probe (services.gateway.suspects.Probe): a READ_METAS call naming no
        drive, which the node's call handler refuses at once (InvalidArgument: no disk, no pool
        thread), over the data plane that the node went silent on. False when the map names the
        node no more (neither a live node nor a drive's holder)."""
        cmap = self._view.current
        if not any(n.node_id == node_id for n in cmap.nodes) and not any(
            slot.node_id == node_id for pool in cmap.pools for s in pool.sets for slot in s.slots
        ):
            return False
        try:
            await self.call(
                node_id, shards_pb2.SHARD_CALL_METHOD_READ_METAS, shards_pb2.ReadMetasRequest()
            )
        except errors.KVTierError as exc:
            if suspects.is_silence(exc):
                raise
        return True  # (an answer, its refusal included)

    def in_background(self, call: Coroutine[Any, Any, None]) -> None:
        """Run a call past the request that made it (it logs its own errors); cancelled at
        close."""
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def background_idle(self) -> None:
        """Wait for the calls in the background (tests)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        """Close every connection (and end the probes of suspects)."""
        await self.suspects.close()
        background, self._background = self._background, set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        small, self._small = self._small, {}
        for batcher in small.values():
            await batcher.close()
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            await conn.close()


def error_of(result: shards_pb2.ShardResult) -> errors.KVTierError:
    """The error a drive's result reports (Internal for a kind this gateway does not know)."""
    kind = getattr(errors, result.error_kind, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.KVTierError)):
        kind = errors.Internal
    return kind(result.error)


def write_batches(segments: Sequence[Any], most: int) -> list[list[memoryview]]:
    """segments (buffers) cut into consecutive batches of at most `most` bytes each, a segment
    split where a batch ends; one empty batch when there are no bytes (a call is still made)."""
    batches: list[list[memoryview]] = [[]]
    room = most
    for segment in segments:
        view = memoryview(segment).cast("B")
        while view:
            if not room:
                batches.append([])
                room = most
            batches[-1].append(view[:room])
            room -= len(batches[-1][-1])
            view = view[len(batches[-1][-1]) :]
    return batches
