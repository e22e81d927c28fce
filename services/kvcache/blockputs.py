"""Puts of the block API: the BatchPut call, and BatchPut/CommitPuts over gRPC.

A call's bytes land straight in freshly allocated extents and are committed when the last one is
in; over gRPC the caller gets write descriptors, writes, then commits or aborts. Every commit
checks the bytes against the checksum their writer sent (`integrity`; a mismatch:
ITEM_STATUS_CORRUPT, nothing stored). A compare-and-swap put (`if_checksums`: S3 If-Match on
KV buckets) replaces a key's block only while it is the one its writer read: checked when the
put begins and again, in the same step as the replacement, at its commit (ITEM_STATUS_MISMATCH,
nothing stored, otherwise). Part of `blocks.BlockService`; see the `blocks` module docstring.
Never imports grpc.

In a write-through namespace (`durable.DurableTier.write_through`) a commit first uploads the
checked bytes and waits for the durable copy (the reply is deferred: an awaitable); a put whose
copy did not commit is aborted and answers ITEM_STATUS_UNAVAILABLE with the reason. Other
namespaces commit and reply inline, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from kvtier import blocksums, errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blockbase, events, integrity, metrics, slab
from services.kvcache import store as block_store

_PUT_ERRORS: tuple[tuple[type[errors.KVTierError], pb.ItemStatus.ValueType], ...] = (
    (errors.AlreadyExists, pb.ITEM_STATUS_BUSY),
    (errors.QuotaExceeded, pb.ITEM_STATUS_QUOTA_EXCEEDED),
    (errors.Overloaded, pb.ITEM_STATUS_NO_SPACE),
    (errors.InvalidArgument, pb.ITEM_STATUS_INVALID),
    (errors.PreconditionFailed, pb.ITEM_STATUS_MISMATCH),  # compare-and-swap: another block
)
#: PutGrant.reason of a CORRUPT put.
CORRUPT_REASON = "the bytes received do not match the checksum sent with them (nothing stored)"
#: PutGrant.reason of a compare-and-swap put refused at its commit.
MISMATCH_REASON = "compare-and-swap: the key's block changed or went meanwhile (nothing stored)"


class PutCalls(blockbase.BlockServiceBase):
    """Puts of `blocks.BlockService` (see the module docstring)."""

    # Data-plane calls.

    def _call_put(
        self, tenant: str, req: pb.BatchPutRequest, segments: Sequence[int]
    ) -> base.CallPlan:
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        if len(segments) != len(req.keys):
            raise errors.InvalidArgument(f"{len(req.keys)} keys but {len(segments)} segments")
        sizes = list(req.sizes) or list(segments)
        if list(segments) != sizes:
            raise errors.InvalidArgument("each segment must be as long as its key's size")
        items, tickets, error = self._begin_puts(tenant, namespace, req, sizes)
        sent = list(req.checksums)
        # A local writer (shm) copied its bytes into the arena itself, after checksumming them:
        # nothing crossed a network, so its checksums are kept as sent (readers verify them);
        # bytes that came over a network are checksummed again here.
        trusted = bool(sent) and base.LOCAL_WRITER.get()
        sinks = [
            base.Span(self._arena, t.extent.offset, t.extent.requested) if t else None
            for t in tickets
        ]
        pending = {i: t for i, t in enumerate(tickets) if t is not None}

        def commit(received: Sequence[int]) -> bytes | Awaitable[bytes]:
            nonlocal error
            if self.tier is not None and self.tier.writes_through(tenant, namespace):
                return through(received)
            for (index, ticket), found in zip(list(pending.items()), received, strict=True):
                items[index].status = self._commit(ticket, sent[index] if sent else None, found)
                if items[index].status == pb.ITEM_STATUS_CORRUPT:
                    items[index].reason = CORRUPT_REASON
                    error = error or _corrupt_error(ticket.key)
                elif items[index].status == pb.ITEM_STATUS_MISMATCH:
                    items[index].reason = MISMATCH_REASON
                del pending[index]
            reply = pb.BatchPutResponse(items=items, error=error, epoch=self._epoch())
            return reply.SerializeToString()

        async def through(received: Sequence[int]) -> bytes:
            nonlocal error
            entries = list(pending.items())
            checks = zip(entries, received, strict=True)
            outcomes = await self._commit_through(
                [(t, sent[i] if sent else None, r) for (i, t), r in checks]
            )
            for (index, ticket), (status, reason) in zip(entries, outcomes, strict=True):
                items[index].status = status
                if reason:
                    items[index].reason = reason
                    error = error or f"key {ticket.key[:32].hex()}: {reason}"
                del pending[index]
            reply = pb.BatchPutResponse(items=items, error=error, epoch=self._epoch())
            return reply.SerializeToString()

        def on_received() -> bytes | Awaitable[bytes]:
            if trusted:
                return commit([sent[index] for index in pending])
            extents = [self._bytes(t.extent) for t in pending.values()]
            if not blocksums.parallel(extents):
                return commit([integrity.checksum(e) for e in extents])

            async def later() -> bytes:  # a large batch: hashed on a few threads
                reply = commit(await blocksums.checksums(extents))
                return reply if isinstance(reply, bytes) else await reply

            return later()

        def on_done(ok: bool) -> None:
            for ticket in pending.values():  # never received in full, or the call failed
                self.store.abort(ticket)
            pending.clear()

        return base.CallPlan(sinks=sinks, on_received=on_received, on_done=on_done)

    # gRPC: puts with descriptors.

    def grant_puts(self, req: pb.BatchPutRequest) -> pb.BatchPutResponse:
        """BatchPut over gRPC: reserve room and grant write descriptors to req.principal."""
        tenant, namespace = self._grpc_scope(req.namespace, req.principal)
        if len(req.sizes) != len(req.keys):
            raise errors.InvalidArgument(f"{len(req.keys)} keys but {len(req.sizes)} sizes")
        items, tickets, error = self._begin_puts(tenant, namespace, req, list(req.sizes))
        ttl_s = self.store.put_timeout_s * 0.9  # the grant must die before the ticket does
        for index, (item, ticket) in enumerate(zip(items, tickets, strict=True)):
            if ticket is None:
                continue
            if req.checksums:
                self._sent_checksums[ticket.ticket_id] = req.checksums[index]
            desc = self._grant(
                self._arena, ticket.extent.offset, ticket.extent.requested,
                base.Rights.WRITE, req.principal, ttl_s,
            )  # fmt: skip
            item.descriptor.CopyFrom(desc.to_proto())
            item.put_id = ticket.ticket_id
            self._puts[ticket.ticket_id] = ticket
            self._grant_ids[ticket.ticket_id] = desc.grant_id
        return pb.BatchPutResponse(items=items, error=error, epoch=self._epoch())

    def commit_puts(
        self, req: pb.CommitPutsRequest
    ) -> pb.CommitPutsResponse | Awaitable[pb.CommitPutsResponse]:
        """CommitPuts: make written blocks visible (or abort them); an awaitable when a
        write-through namespace's puts wait for their durable copies."""
        tenant = blockbase.checked_tenant(req.namespace.tenant)
        statuses: list[pb.ItemStatus.ValueType] = []
        through: list[tuple[int, block_store.PutTicket, int | None]] = []
        for put_id in req.put_ids:
            ticket = self._puts.get(put_id)
            if ticket is None or ticket.tenant != tenant:
                statuses.append(pb.ITEM_STATUS_EXPIRED)
                continue
            del self._puts[put_id]
            sent = self._sent_checksums.pop(put_id, None)
            self._end_grant(put_id)  # before the extent can be freed: no write lands later
            if req.abort:
                self.store.abort(ticket)
                statuses.append(pb.ITEM_STATUS_OK)
            elif self.tier is not None and self.tier.writes_through(tenant, ticket.namespace):
                through.append((len(statuses), ticket, sent))
                statuses.append(pb.ITEM_STATUS_UNAVAILABLE)  # until its copy is committed
            else:
                statuses.append(self._commit(ticket, sent))
        if through:
            return self._commit_puts_through(statuses, through)
        return pb.CommitPutsResponse(statuses=statuses)

    async def _commit_puts_through(
        self,
        statuses: list[pb.ItemStatus.ValueType],
        through: Sequence[tuple[int, block_store.PutTicket, int | None]],
    ) -> pb.CommitPutsResponse:
        outcomes = await self._commit_through([(t, s, None) for _, t, s in through])
        for (position, _, _), (status, _reason) in zip(through, outcomes, strict=True):
            statuses[position] = status
        return pb.CommitPutsResponse(statuses=statuses)

    # Internals.

    def _begin_puts(
        self, tenant: str, namespace: str, req: pb.BatchPutRequest, sizes: Sequence[int]
    ) -> tuple[list[pb.PutGrant], list[block_store.PutTicket | None], str]:
        blockbase.check_batch(req.keys)
        if req.ttl_s < 0:
            raise errors.InvalidArgument("ttl_s must be >= 0")
        if req.checksums and len(req.checksums) != len(req.keys):
            raise errors.InvalidArgument(
                f"{len(req.keys)} keys but {len(req.checksums)} checksums (give one per key)"
            )
        if req.if_checksums and len(req.if_checksums) != len(req.keys):
            raise errors.InvalidArgument(
                f"{len(req.keys)} keys but {len(req.if_checksums)} if_checksums (one per key)"
            )
        swaps: Sequence[int | None] = list(req.if_checksums) or [None] * len(req.keys)
        tags = events.engine_tags(req) or [None] * len(req.keys)  # raises InvalidArgument
        items: list[pb.PutGrant] = []
        tickets: list[block_store.PutTicket | None] = []
        error = ""
        for key, size, tag, swap in zip(req.keys, sizes, tags, swaps, strict=True):
            ticket: block_store.PutTicket | None = None
            reason = ""
            try:
                ticket = self.store.begin_put(
                    tenant, namespace, key, size, overwrite=req.overwrite,
                    ttl_s=req.ttl_s or None, tag=tag, if_checksum=swap,
                )  # fmt: skip
                status = pb.ITEM_STATUS_OK if ticket else pb.ITEM_STATUS_EXISTS
            except errors.KVTierError as exc:
                found = [s for cls, s in _PUT_ERRORS if isinstance(exc, cls)]
                if not found:
                    raise
                status = found[0]
                reason = exc.message
                error = error or f"key {bytes(key)[:32].hex()}: {exc}"
            items.append(pb.PutGrant(status=status, reason=reason))
            tickets.append(ticket)
            if status != pb.ITEM_STATUS_OK:
                labels = metrics.LABELS.namespace(tenant, namespace)
                metrics.PUT_OUTCOMES.labels(*labels, blockbase.STATUS_NAMES[status]).inc()
        return items, tickets, error

    async def _commit_through(
        self, entries: Sequence[tuple[block_store.PutTicket, int | None, int | None]]
    ) -> list[tuple[pb.ItemStatus.ValueType, str]]:
        """Commit write-through puts (ticket, checksum sent, checksum received or None) once
        their durable copies are committed: (status, reason) each. Checked bytes are uploaded
        together; a put whose copy did not commit is aborted: UNAVAILABLE, with the reason."""
        assert self.tier is not None
        outcomes: list[tuple[pb.ItemStatus.ValueType, str]] = []
        uploads: list[tuple[int, block_store.PutTicket, int]] = []
        for ticket, sent, received in entries:
            # A compare-and-swap put whose block changed is refused before its upload (`_commit`
            # answers MISMATCH): its copy must not replace the durable one.
            if self.store.is_pending(ticket) and self.store.swap_holds(ticket):
                if received is None:
                    received = integrity.checksum(self._bytes(ticket.extent))
                if sent is None or received == sent:
                    uploads.append((len(outcomes), ticket, received))
                    outcomes.append((pb.ITEM_STATUS_UNAVAILABLE, ""))
                    continue
            # CORRUPT, EXPIRED or MISMATCH: nothing stored
            status = self._commit(ticket, sent, received)
            outcomes.append((status, CORRUPT_REASON if status == pb.ITEM_STATUS_CORRUPT else ""))
        try:
            reasons = await self.tier.write_through([(t, c) for _, t, c in uploads])
        except BaseException:  # cancelled (the caller is gone): nothing is committed
            for _, ticket, _ in uploads:
                self.store.abort(ticket)
            raise
        for (position, ticket, checksum), reason in zip(uploads, reasons, strict=True):
            if reason:
                self.store.abort(ticket)
                labels = metrics.LABELS.namespace(ticket.tenant, ticket.namespace)
                metrics.PUT_OUTCOMES.labels(*labels, "unavailable").inc()
                outcomes[position] = (pb.ITEM_STATUS_UNAVAILABLE, reason)
            else:
                outcomes[position] = (self._commit(ticket, None, checksum, durable=True), "")
        return outcomes

    def _commit(
        self,
        ticket: block_store.PutTicket,
        sent: int | None,
        received: int | None = None,
        *,
        durable: bool = False,
    ) -> pb.ItemStatus.ValueType:
        """Commit a put whose bytes are in: the checksum of what was received (computed here
        unless given) is checked against the one its writer sent (a mismatch: CORRUPT, nothing
        stored) and kept with the block. durable: its durable copy is committed already."""
        labels = metrics.LABELS.namespace(ticket.tenant, ticket.namespace)
        if not self.store.is_pending(ticket):  # expired: its extent may hold others' bytes
            received = None
        elif received is None:
            received = integrity.checksum(self._bytes(ticket.extent))
        if received is not None and sent is not None and received != sent:
            self.store.abort(ticket)
            self.store.record_corrupt(ticket.tenant)
            integrity.corrupt(
                "put", ticket.tenant, ticket.namespace, ticket.key,
                f"received {received:016x}, the writer sent {sent:016x}",
            )  # fmt: skip
            status = pb.ITEM_STATUS_CORRUPT
        elif received is None:
            status = pb.ITEM_STATUS_EXPIRED
        elif not self.store.swap_holds(ticket):  # compare-and-swap: the block changed or went
            self.store.abort(ticket)
            status = pb.ITEM_STATUS_MISMATCH
        else:
            self.store.commit(ticket, checksum=received, durable=durable)
            status = pb.ITEM_STATUS_OK
            metrics.BYTES_IN.labels(*labels).inc(ticket.extent.requested)
            if self.tier is not None:
                self.tier.committed(ticket, durable=durable)
        metrics.PUT_OUTCOMES.labels(*labels, blockbase.STATUS_NAMES[status]).inc()
        return status

    def _bytes(self, extent: slab.Extent) -> memoryview:
        return self._arena.view[extent.offset : extent.offset + extent.requested]


def _corrupt_error(key: bytes) -> str:
    return f"key {key[:32].hex()}: {CORRUPT_REASON}"
