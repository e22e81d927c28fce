"""The durable tier behind a kvcache node's DRAM: spill, write-through, read-through, probes.

An operator gives a namespace (tenant, name) a `Durability` (`SetNamespacePolicy`, or the
`durable_namespaces` setting at start; kept in memory, default NONE):

- NONE: DRAM only, as before: a capacity victim is gone.
- WRITE_BACK: a capacity victim is copied into the spill buffer before its extent is freed and
  uploaded from there (`spillqueue`). While the buffer is full, the namespace's victims are
  skipped in place like leased blocks: other blocks go first, and when nothing else is
  evictable the put that needed room gets NO_SPACE (Overloaded). Nothing a durable namespace
  evicts is dropped silently while a durable tier exists.
- WRITE_THROUGH: a put is acknowledged only once its durable copy is committed
  (`write_through`): its bytes, checked, are copied into the spill buffer (waiting for room
  while it is full), uploaded, and only then is the block committed to DRAM, marked durable
  (it later leaves without a spill). A put whose upload does not commit within
  `write_through_timeout_s` (no gateway, gateway unreachable or refusing, no buffer room, a
  newer write or delete of the key meanwhile) is aborted: nothing in DRAM, and the caller gets
  ITEM_STATUS_UNAVAILABLE with the reason. Its upload may still land later (a new version the
  caller was not promised: write again, or delete, to settle it).

In both durable modes a DRAM miss reads through: the block is fetched from the durable tier into
a freshly allocated extent (a put-if-absent the node makes itself), committed (marked durable)
and served; exists and lookup count blocks present in either tier (HEAD, bounded concurrency).
A delete also deletes the durable copy, and an overwrite deletes (write-back) or replaces
(write-through) it, so no older version can come back.

Where a block lives: the internal bucket `.kvtier-kv` (`kvtier.names.KV_DURABLE_BUCKET`: not a
valid S3 name, never recorded at the metadata service; gateways serve it to kvcache nodes only,
so no user can create, read or overwrite it), key `<tenant>/<namespace>/<key>` where namespace
and key are hex (any bytes are safe; over 192 bytes: `h` + their SHA-256). No node id: whichever
node owns the key after a failure finds it. The tenant prefix keeps tenants apart.

With no gateway in the map, write-back namespaces degrade to DRAM only (victims are dropped and
counted; `kvtier_kvcache_durable_available` is 0) and write-through puts fail (UNAVAILABLE).

Never imports grpc: the durable tier is an `ObjectStore` (the gateway link is in
`gatewaylink`). Not thread-safe: the node's event loop owns it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvtier import errors, names
from services.kvcache import integrity, metrics, slab, spillqueue
from services.kvcache import store as block_store

if TYPE_CHECKING:
    from services.kvcache import events as kv_events

log = logging.getLogger(__name__)

BUCKET = names.KV_DURABLE_BUCKET
#: Namespace and key parts longer than this are named by their SHA-256 (object keys <= 1 KiB).
HEX_LIMIT_BYTES = 192
#: Concurrent HEADs of one exists/lookup request; concurrent fetches of one get.
PROBE_CONCURRENCY = 32
FETCH_CONCURRENCY = 8
#: After a durable read fails transiently, DRAM misses skip the durable tier this long.
READ_PAUSE_S = 1.0
NO_GATEWAY = "write-through: no gateway in the cluster map (the durable tier is unavailable)"


_Ident = tuple[str, str, bytes]


class Durability(enum.IntEnum):
    """A namespace's tier policy (the values of `kvtier.kvcache.v1.Durability`)."""

    NONE = 0
    WRITE_BACK = 1
    WRITE_THROUGH = 2


def parse_durability(name: str) -> Durability:
    """'none', 'write_back' or 'write_through' (any case); ValueError otherwise."""
    try:
        return Durability[name.strip().upper()]
    except KeyError:
        raise ValueError(
            f"durability must be none, write_back or write_through: {name!r}"
        ) from None


def object_key(tenant: str, namespace: str, key: bytes) -> str:
    """Where the block of (tenant, namespace, key) lives in `BUCKET`."""
    return f"{tenant}/{_part(namespace.encode())}/{_part(key)}"


def _part(raw: bytes) -> str:
    if len(raw) > HEX_LIMIT_BYTES:
        return "h" + hashlib.sha256(raw).hexdigest()  # 'h' is no hex digit: no clash
    return raw.hex() or "-"


class DurableTier:
    """Policies and the paths between one node's store and the durable tier (see the module).

    Build it, build the store with `spill_sink=tier.spill, spill_admit=tier.admit`, then `bind`
    the store and its arena. `queue.run()` must run in the node's task group.
    """

    def __init__(
        self,
        queue: spillqueue.SpillQueue,
        *,
        read_timeout_s: float = 2.0,
        write_through_timeout_s: float = 3.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self._objects = queue.objects
        self._read_timeout_s = read_timeout_s
        self._write_timeout_s = write_through_timeout_s
        self._reads_off_until = 0.0  # monotonic: durable reads skipped after a failure
        self._wall = wall_clock
        self._store: block_store.BlockStore | None = None
        self._arena: memoryview | None = None
        self._policies: dict[tuple[str, str], Durability] = {}
        self._admitted: dict[_Ident, slab.Extent] = {}  # victims admitted, about to be spilled
        self._fetching: dict[_Ident, asyncio.Future[None]] = {}
        self.backpressure: collections.Counter[str] = collections.Counter()  # tenant -> victims
        #: Told when uploads commit and durable copies are deleted (KV events); None: off.
        self.events: kv_events.EventPublisher | None = None

    def bind(self, store: block_store.BlockStore, arena: memoryview) -> None:
        """Attach the store whose victims come here and the arena its extents index."""
        self._store = store
        self._arena = arena

    @property
    def store(self) -> block_store.BlockStore:
        assert self._store is not None, "bind() the store first"
        return self._store

    def _block(self, extent: slab.Extent) -> memoryview:
        assert self._arena is not None
        return self._arena[extent.offset : extent.offset + extent.requested]

    # Policies.

    def set_policy(self, tenant: str, namespace: str, durability: Durability) -> None:
        """Set a namespace's durability (NONE forgets it). Ops already queued still run."""
        if durability is Durability.NONE:
            self._policies.pop((tenant, namespace), None)
        else:
            self._policies[(tenant, namespace)] = durability
        log.info("namespace %s/%r: durability %s", tenant, namespace, durability.name)

    def policy(self, tenant: str, namespace: str) -> Durability:
        """The namespace's durability (NONE unless set)."""
        return self._policies.get((tenant, namespace), Durability.NONE)

    def writes_through(self, tenant: str, namespace: str) -> bool:
        """Whether the namespace's puts wait for their durable copy (`write_through`)."""
        return self._policies.get((tenant, namespace)) is Durability.WRITE_THROUGH

    def reads_through(self, tenant: str, namespace: str) -> bool:
        """Whether a DRAM miss in the namespace should try the durable tier: a durable
        namespace, a known gateway, and no durable read failed in the last READ_PAUSE_S (a
        slow or dead gateway then costs misses, not callers' deadlines)."""
        return (
            (tenant, namespace) in self._policies
            and self._objects.available()
            and time.monotonic() >= self._reads_off_until
        )

    # Store hooks (synchronous, from the eviction path).

    def admit(self, tenant: str, namespace: str, key: bytes, nbytes: int) -> bool:
        """`BlockStore` spill_admit: reserve spill-buffer room for a durable victim."""
        if (tenant, namespace) not in self._policies or not self._objects.available():
            return True  # not spilled (no durable tier: counted as dropped by spill())
        was_full = self.queue.full
        extent = self.queue.reserve(nbytes)
        if extent is None:
            if not was_full:  # count each time the buffer fills, not each candidate skipped
                self.backpressure[tenant] += 1
                metrics.BACKPRESSURE.inc()
            return False
        self._admitted[(tenant, namespace, key)] = extent
        return True

    def spill(self, tenant: str, namespace: str, key: bytes, extent: slab.Extent) -> None:
        """`BlockStore` spill_sink: copy the victim out of the arena and queue its upload."""
        room = self._admitted.pop((tenant, namespace, key), None)
        if room is None:
            if (tenant, namespace) in self._policies:
                metrics.DROPPED.labels("no_gateway").inc()
            return
        queued = self.queue.latest(object_key(tenant, namespace, key))
        if queued is not None and queued.waiter is not None and not queued.waiter.done():
            self.queue.release(room)  # a write-through put of a newer version is on its way
            return
        try:
            expires = self._expires_ms(self.store.expires_in_s(tenant, namespace, key))
            self.queue.view(room)[:] = self._block(extent)
        except BaseException:
            self.queue.release(room)
            raise
        op = spillqueue.Op(
            object_key(tenant, namespace, key), tenant, spillqueue.Cause.CAPACITY, room, expires,
            checksum=self.store.checksum_of(tenant, namespace, key),
            on_durable=self._announce(tenant, namespace, key, None),
        )  # fmt: skip
        self._enqueue(op)

    def committed(self, ticket: block_store.PutTicket, *, durable: bool = False) -> None:
        """A put was committed: durable (written through first): announce its durable copy;
        else in a durable namespace retire an older durable version it replaced."""
        if durable:
            if self.events is not None:
                self.events.durable_stored(ticket.tenant, ticket.namespace, ticket.key, ticket.tag)
            return
        mode = self.policy(ticket.tenant, ticket.namespace)
        if mode is Durability.NONE or not self._objects.available():
            return
        key = object_key(ticket.tenant, ticket.namespace, ticket.key)
        if ticket.overwrite:  # the durable tier may hold an older version: retire it
            self._enqueue(spillqueue.Op(key, ticket.tenant, spillqueue.Cause.DELETE, None))
            if self.events is not None:
                self.events.durable_removed(ticket.tenant, ticket.namespace, ticket.key)

    async def write_through(
        self, puts: Sequence[tuple[block_store.PutTicket, int | None]]
    ) -> list[str]:
        """Upload the bytes of pending puts (ticket, checksum), all at once (the queue bounds
        the uploads in flight), and wait until each is committed in the durable tier, for at
        most write_through_timeout_s. Per put: "" (commit it now, as durable: nothing else runs
        first) or why its copy is not there (abort it). Tickets must stay pending meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._write_timeout_s
        waits: list[asyncio.Future[str] | str] = []
        for ticket, checksum in puts:
            waits.append(await self._upload(ticket, checksum, deadline))
        pending = [w for w in waits if not isinstance(w, str)]
        if pending:
            await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0.0))
        late = (
            f"write-through: the durable tier did not commit the copy within "
            f"{self._write_timeout_s:g} s"
        )
        outcomes = [w if isinstance(w, str) else (w.result() if w.done() else late) for w in waits]
        for index, (ticket, _) in enumerate(puts):  # a newer op of the key would undo it
            key = object_key(ticket.tenant, ticket.namespace, ticket.key)
            if not outcomes[index] and self.queue.latest(key) is not None:
                outcomes[index] = spillqueue.SUPERSEDED
        return outcomes

    async def _upload(
        self, ticket: block_store.PutTicket, checksum: int | None, deadline: float
    ) -> asyncio.Future[str] | str:
        """Queue the upload of a pending put's bytes: its waiter, or why it cannot be."""
        if not self._objects.available():
            return NO_GATEWAY
        nbytes = ticket.extent.requested
        room = self.queue.reserve(nbytes)
        if room is None:
            try:
                async with asyncio.timeout_at(deadline):
                    room = await self.queue.reserve_wait(nbytes)
            except TimeoutError:
                return "write-through: no room in the spill buffer (the durable tier is slow)"
            if not self.store.is_pending(ticket):
                self.queue.release(room)
                return "write-through: the put expired"
        self.queue.view(room)[:] = self._block(ticket.extent)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        op = spillqueue.Op(
            object_key(ticket.tenant, ticket.namespace, ticket.key), ticket.tenant,
            spillqueue.Cause.WRITE_THROUGH, room, self._expires_ms(ticket.ttl_s),
            checksum=checksum, waiter=waiter,
        )  # fmt: skip
        self.queue.enqueue(op)
        return waiter

    def deleted(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> None:
        """Keys were deleted: delete their durable copies too (queued; reads see it at once).

        Raises Overloaded when too many ops wait already.
        """
        if (tenant, namespace) not in self._policies or not self._objects.available():
            return
        for key in keys:
            op = spillqueue.Op(
                object_key(tenant, namespace, key), tenant, spillqueue.Cause.DELETE, None
            )
            self.queue.enqueue(op)
            if self.events is not None:
                self.events.durable_removed(tenant, namespace, key)

    def _enqueue(self, op: spillqueue.Op) -> None:
        try:
            self.queue.enqueue(op)
        except errors.Overloaded:  # only a delete (of an overwritten version) gets here
            metrics.DROPPED.labels("queue_full").inc()
            log.warning("durable tier: op queue full; the delete of %s is dropped", op.key[:80])

    def _announce(
        self,
        tenant: str,
        namespace: str,
        key: bytes,
        then: Callable[[], object] | None,
        tag: object = None,
    ) -> Callable[[], object] | None:
        """An upload's on_durable: then, and a KV event (the block's engine hashes are read
        now, while it is still in DRAM)."""
        events = self.events
        if events is None:
            return then
        if tag is None:
            tag = self.store.tag_of(tenant, namespace, key)

        def done() -> None:
            if then is not None:
                then()
            events.durable_stored(tenant, namespace, key, tag)

        return done

    def _marker(self, tenant: str, namespace: str, key: bytes, block_id: int) -> Callable[[], bool]:
        return lambda: self.store.mark_durable(tenant, namespace, key, block_id)

    def _expires_ms(self, ttl_s: float | None) -> int:
        return int((self._wall() + ttl_s) * 1000) if ttl_s is not None else 0

    def sweep(self) -> None:
        """Return spill-buffer room admitted for victims that never came (none are expected:
        eviction admits and spills in one synchronous step)."""
        for extent in self._admitted.values():
            self.queue.release(extent)
        self._admitted.clear()
        metrics.AVAILABLE.set(1 if self._objects.available() else 0)

    # Read-through.

    async def read_through(
        self, tenant: str, namespace: str, keys: Sequence[bytes], lease_s: float
    ) -> list[block_store.ReadLease | None]:
        """Fetch keys (DRAM misses) from the durable tier into DRAM and lease them.

        A key not found, expired, or that cannot be fetched now is None (a miss). If this is
        cancelled, the leases it took are ended.
        """
        leases: list[block_store.ReadLease | None] = [None] * len(keys)
        limit = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(index: int) -> None:
            async with limit:
                leases[index] = await self._read_one((tenant, namespace, keys[index]), lease_s)

        try:
            await asyncio.gather(*(one(i) for i in range(len(keys))))
        except BaseException:
            for lease in leases:
                if lease is not None:
                    self.store.end_get(lease)
            raise
        return leases

    async def _read_one(self, ident: _Ident, lease_s: float) -> block_store.ReadLease | None:
        waiting = self._fetching.get(ident)
        if waiting is not None:  # another read is fetching it: share its result
            await asyncio.shield(waiting)
            return self.store.begin_get(*ident, lease_s, count=False)
        done = asyncio.get_running_loop().create_future()
        self._fetching[ident] = done
        try:
            return await self._fetch(ident, lease_s)
        except _NoRoom:
            return None
        finally:
            del self._fetching[ident]
            done.set_result(None)

    async def _fetch(self, ident: _Ident, lease_s: float) -> block_store.ReadLease | None:
        key = object_key(*ident)
        op = self.queue.latest(key)
        if op is not None:  # on its way to the durable tier (or out of it)
            return self._from_buffer(ident, op, lease_s) if op.extent is not None else None
        meta = await self._head(key)
        if meta is None:
            return None
        ticket = self._begin(ident, meta.size)
        if ticket is None:
            return self.store.begin_get(*ident, lease_s, count=False)
        try:
            async with asyncio.timeout(self._read_timeout_s):
                await self._objects.get_into(key, self._block(ticket.extent), meta.etag)
        except (errors.KVTierError, TimeoutError, OSError) as exc:
            self.store.abort(ticket)
            self._failed("fetch", exc)
            return None
        except BaseException:
            self.store.abort(ticket)
            raise
        if self.queue.latest(key) is not None or not self.store.is_pending(ticket):
            self.store.abort(ticket)  # deleted meanwhile, or the put timed out
            return None
        found = integrity.checksum(self._block(ticket.extent))
        if meta.checksum is not None and found != meta.checksum:
            self.store.abort(ticket)
            self._corrupt(ident, key, f"holds {found:016x}, uploaded as {meta.checksum:016x}")
            return None
        self.store.commit(ticket, durable=True, checksum=found)
        return self.store.begin_get(*ident, lease_s, count=False)

    def _corrupt(self, ident: _Ident, key: str, detail: str) -> None:
        """A durable copy whose bytes do not match its checksum: count it, log it and delete
        it (a miss for the reader; the block is put again by whoever computes it next)."""
        self.store.record_corrupt(ident[0])
        integrity.corrupt("durable", *ident, detail)
        self._enqueue(spillqueue.Op(key, ident[0], spillqueue.Cause.DELETE, None))

    def _from_buffer(
        self, ident: _Ident, op: spillqueue.Op, lease_s: float
    ) -> block_store.ReadLease | None:
        """Repopulate DRAM from a queued upload's bytes (no round trip)."""
        assert op.extent is not None
        ticket = self._begin(ident, op.extent.requested)
        if ticket is None:
            return self.store.begin_get(*ident, lease_s, count=False)
        self._block(ticket.extent)[:] = self.queue.view(op.extent)
        self.store.commit(ticket, checksum=op.checksum)
        # The queued upload now also makes this copy durable.
        op.on_durable = self._marker(*ident, ticket.ticket_id)
        return self.store.begin_get(*ident, lease_s, count=False)

    def _begin(self, ident: _Ident, size: int) -> block_store.PutTicket | None:
        """A put-if-absent of the fetched block, or None when DRAM has it now. Raises a
        KVTierError (as a miss for the caller) when there is no room or a put is under way."""
        try:
            # The engine hashes it was spilled with (KV events), so its events name it alike.
            tag = self.events.durable_tag(*ident) if self.events is not None else None
            return self.store.begin_put(*ident, size, tag=tag)
        except errors.KVTierError as exc:
            self._failed("no_room", exc)
            raise _NoRoom from exc

    async def _head(self, key: str) -> spillqueue.ObjectMeta | None:
        """The live durable copy's metadata; None when absent, expired or unreachable."""
        try:
            async with asyncio.timeout(self._read_timeout_s):
                meta = await self._objects.head(key)
        except (errors.KVTierError, TimeoutError, OSError) as exc:
            self._failed("head", exc)
            return None
        if meta is not None and meta.expires_unix_ms and meta.expires_unix_ms <= self._wall() * 1e3:
            return None
        return meta

    # Probes.

    async def present(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key (absent from DRAM) is in the durable tier (or on its way there)."""
        found = [False] * len(keys)
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def one(index: int) -> None:
            key = object_key(tenant, namespace, keys[index])
            op = self.queue.latest(key)
            if op is not None:
                found[index] = op.extent is not None
                return
            async with limit:
                found[index] = await self._head(key) is not None

        await asyncio.gather(*(one(i) for i in range(len(keys))))
        return found

    async def leading(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading keys are in DRAM or the durable tier (probing a window at a time)."""
        count = 0
        while count < len(keys):
            window = keys[count : count + PROBE_CONCURRENCY]
            in_dram = self.store.exists(tenant, namespace, window)
            missing = [k for k, hit in zip(window, in_dram, strict=True) if not hit]
            durable = iter(await self.present(tenant, namespace, missing))
            for hit in in_dram:
                if not (hit or next(durable)):
                    return count
                count += 1
        return count

    def stats(self, tenant: str | None) -> dict[str, int]:
        """Spill counters of one tenant (or the node): spilled, failures, backpressure."""

        def pick(counter: collections.Counter[str]) -> int:
            return counter[tenant] if tenant is not None else sum(counter.values())

        return {
            "spilled": pick(self.queue.spilled),
            "spill_failures": pick(self.queue.failures),
            "spill_backpressure": pick(self.backpressure),
        }

    def _failed(self, reason: str, exc: BaseException) -> None:
        metrics.READ_THROUGH_FAILURES.labels(reason).inc()
        log.debug("durable tier %s failed: %s", reason, exc)
        transient = not isinstance(exc, errors.KVTierError) or exc.retryable
        if reason != "no_room" and transient:
            self._reads_off_until = time.monotonic() + READ_PAUSE_S


class _NoRoom(Exception):
    """A fetched block found no room in DRAM (a miss for the reader)."""
