"""Cluster membership in etcd: leases with keepalive, node registration, watches, the map key.

Every node registers `<prefix>/nodes/<node_id>` (a serialized `NodeInfo`) under a lease that it
keeps alive; a node that dies leaves when its lease expires. The metadata service writes the
cluster map to `<prefix>/map` with compare-and-swap; everyone else watches it. Services see this
module through the `Membership` protocol; `EtcdMembership` is the implementation over aetcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aetcd
import aetcd.rpc
import aetcd.watcher
import grpc

from kvtier import errors, telemetry, tracing
from kvtier import security as security_mod
from kvtier.proto.common.v1 import common_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

_ETCD_ERRORS = (aetcd.ClientError, OSError, asyncio.TimeoutError, grpc.aio.UsageError)
#: The attributes of an etcd call's span.
_DB_ETCD = {"db.system": "etcd"}
#: How long a replaced etcd client stays open for calls still in flight on it.
_RETIRE_GRACE_S = 10.0


def nodes_prefix(prefix: str) -> bytes:
    """Key prefix under which live nodes register."""
    return f"{prefix}/nodes/".encode()


def node_key(prefix: str, node_id: str) -> bytes:
    """The registration key of one node."""
    return nodes_prefix(prefix) + node_id.encode()


def map_key(prefix: str) -> bytes:
    """The key holding the serialized ClusterMap."""
    return f"{prefix}/map".encode()


@dataclass(frozen=True, slots=True)
class VersionedMap:
    """A cluster map with the etcd mod revision it was read at (0: no map yet)."""

    map: common_pb2.ClusterMap
    mod_revision: int


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, first_s: float = 0.1, max_s: float = 2.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self.attempt = 0

    def next_delay(self) -> float:
        """The next delay to sleep, growing up to max_s."""
        self.attempt += 1
        ceiling = min(self._max_s, self._first_s * 2 ** (self.attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from the first delay."""
        self.attempt = 0


class Membership(Protocol):
    """What services need from the membership store."""

    async def register(self, info: common_pb2.NodeInfo, ttl_s: int) -> None: ...
    async def deregister(self) -> None: ...
    async def keep_alive(self) -> None: ...
    async def list_nodes(self) -> tuple[dict[str, common_pb2.NodeInfo], int]: ...
    async def get_map(self) -> VersionedMap: ...
    async def swap_map(self, new: common_pb2.ClusterMap, expected_mod_revision: int) -> bool: ...
    def watch_nodes(self) -> AsyncIterator[dict[str, common_pb2.NodeInfo]]: ...
    def watch_map(self) -> AsyncIterator[VersionedMap]: ...
    async def close(self) -> None: ...


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over TLS with a client certificate.

    aetcd 1.0 only opens plaintext channels (`connect` calls `insecure_channel`): this opens a
    secure one with the node's credentials and then sets the client up exactly as aetcd does.
    Written by hand because no maintained asyncio etcd v3 client for Python offers TLS.
    """

    def __init__(self, security: security_mod.ClientSecurity, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kvtier_security = security

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = aetcd.rpc.secure_channel(
            target, self._kvtier_security.channel_credentials(), options=self._options.items()
        )
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class EtcdMembership:
    """Membership over a real etcd cluster (aetcd client).

    Every etcd call has a deadline (`call_timeout_s`). Connection problems surface as
    `errors.Unavailable`; watches and keepalive survive them by reconnecting with backoff.
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        prefix: str,
        *,
        call_timeout_s: float = 3.0,
        security: security_mod.ClientSecurity | None = None,
    ):
        self._endpoints = endpoints
        self._prefix = prefix
        self._timeout_s = call_timeout_s
        #: TLS to etcd (mutual, with the node's certificate) unless insecure; None: the
        #: process default (`kvtier.security.default()`, from KVTIER_* variables).
        self._security = security
        self._endpoint_index = 0
        self._client: Any = None
        self._info: common_pb2.NodeInfo | None = None
        self._ttl_s = 0
        self._lease: Any = None
        self._last_refresh = 0.0
        self._retiring: set[asyncio.Future[None]] = set()
        self._retire_handles: list[asyncio.TimerHandle] = []

    @property
    def prefix(self) -> str:
        """The key prefix of this cluster (`etcd_prefix`)."""
        return self._prefix

    @property
    def endpoint(self) -> str:
        """The etcd endpoint currently in use."""
        return self._endpoints[self._endpoint_index % len(self._endpoints)]

    def _new_client(self) -> Any:
        host, _, port = self.endpoint.rpartition(":")
        sec = self._security or security_mod.default()
        if not sec.insecure:
            return _TlsClient(sec, host=host, port=int(port), timeout=self._timeout_s)
        return aetcd.Client(host=host, port=int(port), timeout=self._timeout_s)

    async def connect(self, wait_s: float) -> None:
        """Connect, retrying with backoff for up to wait_s (0: forever).

        Raises errors.Unavailable with a one-line reason when etcd stays unreachable.
        """
        deadline = time.monotonic() + wait_s if wait_s > 0 else float("inf")
        backoff = Backoff(first_s=0.2, max_s=3.0)
        while True:
            client = self._new_client()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await client.status()
            except _ETCD_ERRORS as exc:
                await _close_quietly(client)
                reason = _reason(exc)
                if time.monotonic() >= deadline:
                    where = ",".join(self._endpoints)
                    raise errors.Unavailable(
                        f"etcd unreachable at {where} after {wait_s:g}s: {reason}"
                    ) from None
                delay = min(backoff.next_delay(), max(0.0, deadline - time.monotonic()))
                log.warning(
                    "etcd at %s unreachable (%s); retry %d in %.1fs",
                    self.endpoint,
                    reason,
                    backoff.attempt,
                    delay,
                )
                self._endpoint_index += 1
                await asyncio.sleep(delay)
                continue
            self._client = client
            log.info("connected to etcd at %s", self.endpoint)
            return

    async def _reconnect(self, failed: Any) -> None:
        """Replace the client after `failed` broke (no-op when another task already did).

        The new client is installed first and the old one closed only after a grace period:
        closing it at once would cancel calls of other tasks still waiting on it.
        """
        if self._client is not failed:
            return
        self._endpoint_index += 1
        self._client = self._new_client()
        telemetry.ETCD_RECONNECTS.inc()
        retire = asyncio.get_running_loop().call_later(
            _RETIRE_GRACE_S,
            lambda: self._retiring.add(asyncio.ensure_future(_close_quietly(failed))),
        )
        self._retire_handles.append(retire)

    async def close(self) -> None:
        """Close the etcd session (does not revoke the lease: see deregister)."""
        for handle in self._retire_handles:
            handle.cancel()
        self._retire_handles.clear()
        await _close_quietly(self._client)
        self._client = None
        await asyncio.gather(*self._retiring, return_exceptions=True)

    async def call(self, op: Callable[[Any], Awaitable[Any]]) -> Any:
        """op(client) on the live aetcd client, under the call deadline.

        For stores that keep their own keys in this etcd session (`kvtier.buckets`): they share
        its client, deadline and reconnects. op gets the client current at the call, never one
        cached across calls: keepalive and watches replace a broken client. Raises
        errors.Unavailable when etcd fails or the deadline passes.
        """
        return await self._call(op(self._client))

    async def _call(self, coro: Any) -> Any:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # races with the inner call's completion, and a service would then never stop.
        op = f"etcd {getattr(coro, '__name__', 'call')}"
        try:
            # A span only inside a sampled trace (a bucket created for an S3 request, say).
            with tracing.child_span(op, kind=tracing.CLIENT, attributes=_DB_ETCD):
                async with asyncio.timeout(self._timeout_s):
                    return await coro
        except _ETCD_ERRORS as exc:
            _reraise_cancellation(exc)
            raise errors.Unavailable(f"etcd at {self.endpoint}: {_reason(exc)}") from None

    # --- registration -------------------------------------------------------------------------

    async def register(self, info: common_pb2.NodeInfo, ttl_s: int) -> None:
        """Register `info` under a fresh lease; waits while a previous holder's lease lives.

        Raises errors.AlreadyExists when the node id stays held by another live lease for longer
        than two TTLs (two processes configured with the same identity).
        """
        self._info, self._ttl_s = info, ttl_s
        key = node_key(self._prefix, info.node_id)
        deadline = time.monotonic() + max(2 * ttl_s, 10)
        while True:
            # Recorded before the put: if the put is applied but its reply lost (timeout,
            # cancellation at shutdown), deregister() still revokes it.
            lease = self._lease = await self._call(self._client.lease(ttl_s))
            tx = self._client.transactions
            ok, _ = await self._call(
                self._client.transaction(
                    compare=[tx.create(key) == 0],
                    success=[tx.put(key, info.SerializeToString(), lease)],
                    failure=[],
                )
            )
            if ok:
                self._last_refresh = time.monotonic()
                log.info("registered %s under lease %x (ttl %ss)", info.node_id, lease.id, ttl_s)
                return
            self._lease = None
            await self._call(self._client.revoke_lease(lease.id))
            if time.monotonic() > deadline:
                raise errors.AlreadyExists(
                    f"node id {info.node_id} is held by another live process in etcd"
                )
            log.warning(
                "node id %s is still registered (previous instance?); waiting for its lease",
                info.node_id,
            )
            await asyncio.sleep(1.0)

    async def deregister(self) -> None:
        """Revoke the lease: the node leaves the cluster at once. Idempotent."""
        lease, self._lease, self._info = self._lease, None, None
        if lease is not None and self._client is not None:
            with contextlib.suppress(errors.Unavailable):
                await self._call(self._client.revoke_lease(lease.id))
                log.info("lease %x revoked", lease.id)

    async def keep_alive(self) -> None:
        """Refresh the lease every TTL/3 forever; re-register when it was lost."""
        backoff = Backoff(first_s=0.2, max_s=2.0)
        while self._info is not None:
            client = self._client
            await asyncio.sleep(self._ttl_s / 3 if backoff.attempt == 0 else backoff.next_delay())
            if self._info is None:
                return
            try:
                await self._refresh_once()
                backoff.reset()
            except errors.Unavailable as exc:
                _reraise_cancellation(exc)
                if backoff.attempt == 0:
                    backoff.next_delay()
                log.warning("lease keepalive failed (%s); retrying", exc)
                await self._reconnect(client)

    async def _refresh_once(self) -> None:
        info = self._info
        assert info is not None
        lost = self._lease is None or time.monotonic() - self._last_refresh > self._ttl_s
        if not lost:
            # Through the current client: a Lease object stays bound to the client that granted it.
            reply = await self._call(self._client.refresh_lease(self._lease.id))
            lost = reply is None or reply.TTL <= 0
            if not lost:
                self._last_refresh = time.monotonic()
                return
        log.warning("lease of %s expired; registering again", info.node_id)
        await self.register(info, self._ttl_s)

    # --- reads, watches and the map ----------------------------------------------------------

    async def list_nodes(self) -> tuple[dict[str, common_pb2.NodeInfo], int]:
        """Every registered node by id, with the etcd revision of the read."""
        prefix = nodes_prefix(self._prefix)
        result = await self._call(self._client.get_prefix(prefix))
        nodes: dict[str, common_pb2.NodeInfo] = {}
        for kv in result:
            info = common_pb2.NodeInfo()
            info.ParseFromString(kv.value)
            nodes[info.node_id] = info
        revision = int(result.header.revision) if result.header is not None else 0
        return nodes, revision

    async def get_map(self) -> VersionedMap:
        """The current cluster map (epoch 0 and revision 0 when none was written yet)."""
        got = await self._call(self._client.get(map_key(self._prefix)))
        cmap = common_pb2.ClusterMap()
        if got is None:
            return VersionedMap(cmap, 0)
        cmap.ParseFromString(got.value)
        return VersionedMap(cmap, int(got.mod_revision))

    async def swap_map(self, new: common_pb2.ClusterMap, expected_mod_revision: int) -> bool:
        """Write `new` only if the map key is still at expected_mod_revision (0: absent)."""
        key = map_key(self._prefix)
        tx = self._client.transactions
        ok, _ = await self._call(
            self._client.transaction(
                compare=[tx.mod(key) == expected_mod_revision],
                success=[tx.put(key, new.SerializeToString())],
                failure=[],
            )
        )
        return bool(ok)

    async def watch_changes(
        self, key: bytes, prefix: bool, read: Callable[[], Awaitable[T]]
    ) -> AsyncIterator[T]:
        """Yield read() now and after every change of key (or prefix); survives etcd outages.

        The watch is created before the first read, so no change can fall between the two.
        """
        backoff = Backoff(first_s=0.2, max_s=3.0)
        while True:
            client = self._client
            try:
                watch_fn = client.watch_prefix if prefix else client.watch
                # aetcd bounds watch creation with its own timeout (call_timeout_s).
                watch = await watch_fn(key)
                try:
                    yield await read()
                    async for _event in watch:
                        yield await read()
                        backoff.reset()
                finally:
                    with contextlib.suppress(*_ETCD_ERRORS):
                        async with asyncio.timeout(self._timeout_s):
                            await watch.cancel()
            except (errors.Unavailable, *_ETCD_ERRORS) as exc:
                _reraise_cancellation(exc)
                delay = backoff.next_delay()
                log.warning("watch on %s broke (%s); retrying in %.1fs", key, _reason(exc), delay)
                await asyncio.sleep(delay)
                await self._reconnect(client)

    async def watch_nodes(self) -> AsyncIterator[dict[str, common_pb2.NodeInfo]]:
        """The set of registered nodes, now and after every change."""

        async def read() -> dict[str, common_pb2.NodeInfo]:
            nodes, _revision = await self.list_nodes()
            return nodes

        async for nodes in self.watch_changes(nodes_prefix(self._prefix), True, read):
            yield nodes

    async def watch_map(self) -> AsyncIterator[VersionedMap]:
        """The cluster map, now and after every change."""

        async for current in self.watch_changes(map_key(self._prefix), False, self.get_map):
            yield current


def _reraise_cancellation(exc: BaseException) -> None:
    """Raise CancelledError when this task is being cancelled: aetcd and grpc sometimes turn a
    cancellation into one of their errors, and a retry loop would then never stop (a service
    hung at shutdown this way while etcd was unreachable)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "failed to connect" in text.lower() or "connection refused" in text.lower():
        return "connection refused"
    return text[:200]


async def _close_quietly(client: Any) -> None:
    if client is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.close()
