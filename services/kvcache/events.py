"""KV events of a kvcache node, in vLLM's wire format, for cache-aware routers.

What routers (llm-d, Dynamo, a custom one) already consume from vLLM
(`vllm/distributed/kv_events.py`, 0.33): a ZMQ PUB socket sending multipart messages
`[topic, seq (8 bytes, big-endian), msgpack(EventBatch)]`, `EventBatch` an array
`[ts, events, data_parallel_rank]`, each event a map tagged by `type`: `BlockStored`
(`block_hashes`, `parent_block_hash`, `token_ids`, `block_size`, `lora_id`, `medium`,
`lora_name`, ...), `BlockRemoved` (`block_hashes`, `medium`), `AllBlocksCleared`; and a ROUTER
socket that replays the buffered batches from a sequence number: the request is
`[b"", start_seq (8 bytes big-endian)]` from a DEALER (a REQ adds the empty frame itself), the
answer one `[b"", topic, seq, payload]` per batch with `seq >= start_seq`, then
`[b"", b"", seq -1 (8 bytes, signed), b""]`. We publish the same shapes from our own structs
(no vLLM import), so vLLM's decoders and everyone who decodes vLLM's events read ours.

What a node publishes (docs/routing.md):

- `medium`: `"CPU"` for the node's DRAM, `"STORAGE"` for the durable tier (vLLM's own
  `MEDIUM_CPU` / `MEDIUM_STORAGE`); `ownership` `"kvtier"` (vLLM: the offloading tier that
  generated the event); `tenant_id` and `namespace` name the block's scope (extra map keys:
  msgspec and msgpack map decoders skip keys they do not know). `block_hashes` holds the
  engine's hash of the block when the put carried one (`BatchPutRequest.engine_hashes`), else
  the kvtier key; `parent_block_hash` the engine's parent hash or nil; `token_ids` is empty and
  `block_size` 0 (the tier never sees tokens).
- DRAM: `BlockStored` when a put commits (or a read-back from the durable tier does),
  `BlockRemoved` when a block leaves (capacity eviction, TTL expiry, delete, overwrite: the
  old block's removal comes before the new one's store).
- Durable tier: `BlockStored` when a spill or write-through upload has committed,
  `BlockRemoved` when its delete is queued (reads see it gone from then on). Durable copies that
  expire by TTL are not announced (they expire lazily, when read).
- `AllBlocksCleared` once at start (on topic `kv@<node id>`): whatever a restarted node held
  in DRAM is gone.
- Topic `kv@<node id>@<tenant>@<namespace>`: subscribe to `kv@<node id>@<tenant>@` for one
  tenant's blocks, to `b""` for everything.

The data path never waits for a subscriber: the store calls `linked` / `unlinked`
synchronously (an append), the events of one event-loop iteration are cut into batches per
topic at its end, each batch gets the next sequence number and goes into a bounded queue; a
full queue drops the batch (`kvtier_kvcache_event_batches_total{outcome="dropped"}`, a gap in
the sequence subscribers see). A thread encodes and sends (a PUB socket drops messages for a
subscriber past its high-water mark; it never blocks) and serves replays. Sockets bind to the
node's advertised host only. With `keys` (kv_events_auth = curve) both sockets are CURVE servers
that admit only the subscriber keys an admin registered (`eventsauth`), and a subscriber whose
registration lapses is cut within about 0.1 s (`eventspub`: the PUB socket is an XPUB that is
rebound, registered subscribers rejoin with no gap); without, anyone who reaches the ports
reads every tenant's events (trusted networks only, docs/security.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TypeAlias

import msgspec
import zmq

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import eventsauth, eventspub, metrics
from services.kvcache import store as block_store

log = logging.getLogger(__name__)

#: `medium` of blocks in a node's DRAM and in the durable tier (vLLM's MEDIUM_CPU / _STORAGE).
MEDIUM_DRAM = "CPU"
MEDIUM_DURABLE = "STORAGE"
#: `ownership` of every event: the tier that generated it.
OWNERSHIP = "kvtier"
#: The replay answer's last message carries this sequence number (-1, 8 bytes, signed).
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Most events in one batch.
MAX_BATCH_EVENTS = 1024
#: Engine hashes of blocks now only in the durable tier, kept for their read-back (most).
MAX_DURABLE_TAGS = 65536

BlockHash: TypeAlias = bytes | int
#: The tag a put leaves on its block: (engine block hash, engine parent hash or None).
EngineTag: TypeAlias = tuple[bytes, bytes | None]


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """One event; encoded as a map with its class name under `type`, like vLLM's."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    ownership: str | None = None
    tenant_id: str | None = None
    namespace: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    ownership: str | None = None
    tenant_id: str | None = None
    namespace: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


Event: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """`[ts, events, data_parallel_rank]`, like vLLM's KVEventBatch."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def engine_tags(req: pb.BatchPutRequest) -> list[EngineTag | None] | None:
    """The engine hashes of a put, one tag per key (None: the request carries none).

    Raises InvalidArgument when they are not one per key, or a hash is empty or over 1 KiB.
    """
    hashes, parents = req.engine_hashes, req.engine_parent_hashes
    if not hashes and not parents:
        return None
    if len(hashes) != len(req.keys) or (parents and len(parents) != len(req.keys)):
        raise errors.InvalidArgument(
            f"{len(req.keys)} keys but {len(hashes)} engine hashes and {len(parents)} parent "
            "hashes (give one per key; parents may be left out)"
        )
    if any(not 0 < len(h) <= 1024 for h in hashes) or any(len(p) > 1024 for p in parents):
        raise errors.InvalidArgument("engine hashes must be 1..1024 bytes (parents 0..1024)")
    if not parents:
        return [(h, None) for h in hashes]
    return [(h, p or None) for h, p in zip(hashes, parents, strict=True)]


def topic(node_id: str, tenant: str, namespace: str) -> bytes:
    """The topic of a namespace's events on node_id."""
    return f"kv@{node_id}@{tenant}@{namespace}".encode()


_Item = tuple[bytes, int, EventBatch]


class EventPublisher:
    """One node's KV events (see the module docstring): a `store.BlockListener`, plus the
    durable tier's hooks. `start()` binds and starts the sender thread; `close()` stops it.
    keys: admit only registered CURVE subscribers (None: anyone who reaches the ports)."""

    def __init__(
        self,
        node_id: str,
        *,
        host: str,
        port: int = 0,
        replay_port: int = 0,
        queue_batches: int = 4096,
        replay_batches: int = 10_000,
        hwm: int = 100_000,
        keys: eventsauth.SubscriberKeys | None = None,
    ) -> None:
        self.node_id = node_id
        self.keys = keys
        self._host, self._port, self._replay_port = host, port, replay_port
        self._hwm = hwm
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_batches)
        self._buffer: collections.deque[tuple[bytes, bytes, bytes]] = collections.deque(
            maxlen=replay_batches
        )
        self._pending: dict[tuple[str, str], list[Event]] = {}
        self._flush_scheduled = False
        self._next_seq = 0
        self._durable_tags: collections.OrderedDict[tuple[str, str, bytes], EngineTag] = (
            collections.OrderedDict()
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: eventspub.PubSocket | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self.endpoint = ""
        self.replay_endpoint = ""
        #: Batches dropped because the queue was full (each one a sequence gap).
        self.dropped_batches = 0
        self._published = metrics.EVENT_BATCHES.labels("published")
        self._dropped = metrics.EVENT_BATCHES.labels("dropped")
        # Sequence 0: whatever this node held before (a restart) is gone.
        self._enqueue(f"kv@{node_id}".encode(), [AllBlocksCleared()])

    # Lifecycle.

    def start(self) -> None:
        """Bind the PUB and ROUTER sockets on the host and start the sender. Raises
        zmq.ZMQError when a port cannot be bound."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx = ctx
        if self.keys is not None:
            self.keys.start(ctx)  # the ZAP handler must answer before the first handshake
        self._pub = eventspub.PubSocket(ctx, hwm=self._hwm, keys=self.keys)
        self._replay = ctx.socket(zmq.ROUTER)
        if self.keys is not None:
            self.keys.serve(self._replay)
        # A full replay plus its end marker fits however slowly the subscriber reads (as vLLM).
        self._replay.setsockopt(zmq.SNDHWM, 2 * ((self._buffer.maxlen or 0) + 1))
        self.endpoint = self._pub.bind(self._host, self._port)
        self.replay_endpoint = _bind(self._replay, self._host, self._replay_port)
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        log.info(
            "KV events on %s (replay %s), %s", self.endpoint, self.replay_endpoint,
            "CURVE: registered subscribers only" if self.keys else "unauthenticated",
        )  # fmt: skip

    def close(self) -> None:
        """Send what is queued (up to 1 s), stop the thread, close the sockets. Idempotent."""
        self.flush()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._pub is not None:
            self._pub.close()
        if self._replay is not None:
            self._replay.close(linger=0)
        self._pub = self._replay = None
        if self.keys is not None:
            self.keys.stop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def rotations(self) -> int:
        """How often the PUB socket was rebound to cut subscribers whose registration lapsed."""
        return 0 if self._pub is None else self._pub.rotations

    # store.BlockListener and the durable tier's hooks (event loop; never raise, never wait).

    def durable_tag(self, tenant: str, namespace: str, key: bytes) -> EngineTag | None:
        """The engine hashes a block in the durable tier was spilled with (for its read-back;
        the most recent MAX_DURABLE_TAGS are kept, older ones are named by their key)."""
        return self._durable_tags.get((tenant, namespace, key))

    def linked(self, tenant: str, namespace: str, key: bytes, tag: object) -> None:
        """A block became visible in DRAM."""
        self._add(tenant, namespace, _stored(tenant, namespace, key, tag, MEDIUM_DRAM))

    def unlinked(
        self,
        tenant: str,
        namespace: str,
        key: bytes,
        tag: object,
        cause: block_store.EvictionCause | None,
    ) -> None:
        """A block left DRAM (evicted, expired, deleted, or replaced by an overwrite)."""
        self._add(tenant, namespace, _removed(tenant, namespace, key, tag, MEDIUM_DRAM))

    def durable_stored(self, tenant: str, namespace: str, key: bytes, tag: object) -> None:
        """A block's upload to the durable tier committed."""
        if tag is not None:
            ident = (tenant, namespace, key)
            self._durable_tags[ident] = tag  # type: ignore[assignment]
            self._durable_tags.move_to_end(ident)
            if len(self._durable_tags) > MAX_DURABLE_TAGS:
                self._durable_tags.popitem(last=False)
        self._add(tenant, namespace, _stored(tenant, namespace, key, tag, MEDIUM_DURABLE))

    def durable_removed(self, tenant: str, namespace: str, key: bytes) -> None:
        """A block's durable copy is being deleted (readers already miss it)."""
        tag = self._durable_tags.pop((tenant, namespace, key), None)
        self._add(tenant, namespace, _removed(tenant, namespace, key, tag, MEDIUM_DURABLE))

    # Batching.

    def _add(self, tenant: str, namespace: str, event: Event) -> None:
        events = self._pending.setdefault((tenant, namespace), [])
        events.append(event)
        if len(events) >= MAX_BATCH_EVENTS:
            self._enqueue(topic(self.node_id, tenant, namespace), events)
            del self._pending[(tenant, namespace)]
        if self._flush_scheduled or not self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tests, tools): publish at once
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Cut the events gathered so far into one batch per topic and queue them."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for (tenant, namespace), events in pending.items():
            self._enqueue(topic(self.node_id, tenant, namespace), events)

    def _enqueue(self, name: bytes, events: Sequence[Event]) -> None:
        seq = self._next_seq
        self._next_seq += 1  # taken even when the batch is dropped: subscribers see the gap
        try:
            self._queue.put_nowait((name, seq, EventBatch(ts=time.time(), events=list(events))))
        except queue.Full:
            self.dropped_batches += 1
            self._dropped.inc()

    # The sender thread: the only user of the sockets once started.

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        pub, replay = self._pub, self._replay
        assert pub is not None
        assert replay is not None
        stop_at: float | None = None
        while True:
            if self._stop.is_set() and stop_at is None:
                stop_at = time.monotonic() + 1.0
            if stop_at is not None and (self._queue.empty() or time.monotonic() > stop_at):
                return
            try:
                while replay.poll(0):
                    self._serve_replay(replay)
                if not pub.service():  # registered subscribers rejoin after a rotation
                    pub.wait(0.02)
                    continue
                name, seq, batch = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            except Exception:  # the thread's boundary: log, keep serving
                log.exception("KV events: replay or subscription handling failed")
                continue
            message = (name, seq.to_bytes(8, "big"), encoder.encode(batch))
            try:
                pub.send(message)
            except Exception:
                log.exception("KV events: send failed")
            self._buffer.append(message)
            self._published.inc()

    def _serve_replay(self, replay: zmq.Socket[bytes]) -> None:
        message = replay.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        if self.keys is not None and not self.keys.admitted(
            str(message[-1].get("User-Id")).encode()  # the ZAP handler's: the Z85 public key
        ):
            # Each replay is authorized again: a connection whose key's registration expired
            # gets no more history (a DEALER may stay connected; eventspub cuts lapsed SUBs).
            log.debug("KV events: replay refused, the subscriber's registration expired")
            return
        frames = [frame.bytes for frame in message]
        if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
            log.warning("KV events: malformed replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for name, seq, payload in list(self._buffer):
            if int.from_bytes(seq, "big") >= start_seq:
                replay.send_multipart((client, b"", name, seq, payload), flags=zmq.NOBLOCK)
        replay.send_multipart((client, b"", b"", END_SEQ, b""), flags=zmq.NOBLOCK)


def _hashes(key: bytes, tag: object) -> tuple[list[BlockHash], BlockHash | None]:
    if tag is None:
        return [key], None
    block_hash: bytes = tag[0]  # type: ignore[index]
    parent: bytes | None = tag[1]  # type: ignore[index]
    return [block_hash], parent


def _stored(tenant: str, namespace: str, key: bytes, tag: object, medium: str) -> BlockStored:
    hashes, parent = _hashes(key, tag)
    return BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=[], block_size=0,
        lora_id=None, medium=medium, lora_name=None, ownership=OWNERSHIP,
        tenant_id=tenant, namespace=namespace,
    )  # fmt: skip


def _removed(tenant: str, namespace: str, key: bytes, tag: object, medium: str) -> BlockRemoved:
    hashes, _ = _hashes(key, tag)
    return BlockRemoved(
        block_hashes=hashes, medium=medium, ownership=OWNERSHIP, tenant_id=tenant,
        namespace=namespace,
    )  # fmt: skip


def _bind(sock: zmq.Socket[bytes], host: str, port: int) -> str:
    """Bind sock to tcp://host:port (port 0: any free one); return the endpoint bound."""
    if ":" in host:  # IPv6
        sock.setsockopt(zmq.IPV6, 1)
        host = f"[{host.strip('[]')}]"
    sock.bind(f"tcp://{host}:{port or '*'}")
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]
    return f"tcp://{host}:{bound}"
