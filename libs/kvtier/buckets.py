"""Buckets in etcd: `<prefix>/buckets/<name>` = a serialized `kvtier.metadata.v1.BucketInfo`.

The metadata service creates buckets with a create-only transaction, changes their
configuration (ACL, CORS, lifecycle) with read-modify-write transactions that compare the key's
mod revision, and deletes them with one that compares the key's create revision; gateways read
and watch the keys directly. A bucket's `generation` is that create revision, filled in on every
read (the stored value has 0): it names one incarnation of the bucket, unchanged by configuration
updates, and a bucket deleted and created again gets a larger one.

`BucketStore` keeps no etcd client of its own: it runs every operation through an
`EtcdMembership` session (`call`, `watch_changes`), so it shares that session's client, call
deadline and reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from kvtier import errors, membership, names
from kvtier.proto.metadata.v1 import metadata_pb2

log = logging.getLogger(__name__)

#: Read-modify-write attempts of a configuration update before it gives up (the record keeps
#: changing under it).
_MAX_UPDATE_ATTEMPTS = 20

#: Compare-and-delete attempts before an unconditional delete gives up (the bucket keeps
#: being replaced under it).
_MAX_DELETE_ATTEMPTS = 20


def buckets_prefix(prefix: str) -> bytes:
    """Key prefix under which buckets live."""
    return f"{prefix}/buckets/".encode()


def bucket_key(prefix: str, name: str) -> bytes:
    """The key of one bucket; raises errors.InvalidArgument for a name that breaks S3's rules.

    Checked here, where keys are built, so that no name (`/`, `..`) can reach another key.
    """
    names.check_bucket(name)
    return buckets_prefix(prefix) + name.encode()


class BucketStore:
    """The bucket records of one cluster, over an EtcdMembership session.

    Every call has the session's deadline; etcd failures raise errors.Unavailable. Names are
    validated (errors.InvalidArgument); tenants are the caller's to check.
    """

    def __init__(self, etcd: membership.EtcdMembership) -> None:
        self._etcd = etcd

    def _key(self, name: str) -> bytes:
        return bucket_key(self._etcd.prefix, name)

    async def create(
        self,
        name: str,
        tenant: str,
        created_at_unix_ms: int,
        kind: metadata_pb2.BucketKind.ValueType = metadata_pb2.BUCKET_KIND_OBJECTS,
    ) -> metadata_pb2.BucketInfo:
        """Create the bucket and return it with its generation and a fresh storage id (the
        objects of this incarnation are stored under `names.storage_name`, so they are never
        visible to a later bucket of the same name).

        Raises errors.AlreadyExists when the name is taken (by any tenant). After an
        errors.Unavailable the create may or may not have been applied: a retry that gets
        AlreadyExists should read the bucket to tell.
        """
        key = self._key(name)
        record = metadata_pb2.BucketInfo(
            name=name, tenant=tenant, created_at_unix_ms=created_at_unix_ms, kind=kind,
            storage_id=names.new_storage_id(),
        )  # fmt: skip
        ok, responses = await self._etcd.call(_create_only(key, record.SerializeToString()))
        if not ok:
            raise errors.AlreadyExists(f"bucket {name} already exists")
        ((_value, kv),) = responses[1]
        return _decode(kv)

    async def get(self, name: str) -> metadata_pb2.BucketInfo:
        """The bucket, with its generation; raises errors.NotFound when there is none."""
        key = self._key(name)
        kv = await self._etcd.call(lambda client: client.get(key))
        if kv is None:
            raise errors.NotFound(f"bucket {name} does not exist")
        return _decode(kv)

    async def delete(self, name: str, expected_generation: int = 0) -> None:
        """Delete the bucket; objects in it are not looked at (the gateway checks emptiness; a
        bucket deleted with objects leaves them unreachable: the next bucket of the name has
        another storage id).

        With expected_generation, only that incarnation is deleted: errors.PreconditionFailed
        when the bucket has another generation. Raises errors.NotFound when there is no bucket.
        """
        key = self._key(name)
        generation = expected_generation or (await self.get(name)).generation
        for _attempt in range(_MAX_DELETE_ATTEMPTS):
            ok, responses = await self._etcd.call(_compare_and_delete(key, generation))
            if ok:
                return
            if not responses[0]:
                raise errors.NotFound(f"bucket {name} does not exist")
            current = int(responses[0][0][1].create_revision)
            if expected_generation:
                raise errors.PreconditionFailed(
                    f"bucket {name} is at generation {current}, not {expected_generation}"
                )
            generation = current  # replaced since our read: delete what is there now
        raise errors.Unavailable(f"bucket {name} kept changing under compare-and-delete")

    async def update(
        self,
        name: str,
        change: Callable[[metadata_pb2.BucketInfo], None],
        expected_generation: int = 0,
    ) -> metadata_pb2.BucketInfo:
        """Apply change to the bucket's record (its configuration; never its name, tenant, kind
        or storage id) and return the stored result.

        Read-modify-write under a mod-revision compare, retried when another update lands in
        between, so concurrent updates of different parts never lose one another. Raises
        errors.NotFound, errors.PreconditionFailed (expected_generation given and the bucket is
        another incarnation) and errors.Unavailable.
        """
        key = self._key(name)
        for _attempt in range(_MAX_UPDATE_ATTEMPTS):
            kv = await self._etcd.call(lambda client: client.get(key))
            if kv is None:
                raise errors.NotFound(f"bucket {name} does not exist")
            record = _decode(kv)
            if expected_generation and record.generation != expected_generation:
                raise errors.PreconditionFailed(
                    f"bucket {name} is at generation {record.generation}, not {expected_generation}"
                )
            identity = (record.name, record.tenant, record.kind, record.storage_id)
            change(record)
            if (record.name, record.tenant, record.kind, record.storage_id) != identity:
                raise errors.InvalidArgument(
                    "a configuration update may not change who owns a bucket"
                )
            record.generation = 0  # never stored
            value = record.SerializeToString()
            ok, responses = await self._etcd.call(
                _compare_and_put(key, int(kv.mod_revision), value)
            )
            if ok:
                ((_value, stored),) = responses[1]
                return _decode(stored)
        raise errors.Unavailable(f"bucket {name} kept changing under its configuration update")

    async def list_all(self, tenant: str | None = None) -> list[metadata_pb2.BucketInfo]:
        """Every bucket (of `tenant`, when given), sorted by name."""
        prefix = buckets_prefix(self._etcd.prefix)
        result = await self._etcd.call(lambda client: client.get_prefix(prefix))
        found = (_decode(kv) for kv in result)
        return sorted(
            (b for b in found if tenant is None or b.tenant == tenant), key=lambda b: b.name
        )

    async def watch(self) -> AsyncGenerator[dict[str, metadata_pb2.BucketInfo], None]:
        """Every bucket by name, now and after every change; survives etcd outages.

        Each change re-reads the whole prefix: buckets change rarely, and a full snapshot
        cannot drift from etcd the way a cache patched event by event can.
        """

        async def read() -> dict[str, metadata_pb2.BucketInfo]:
            return {b.name: b for b in await self.list_all()}

        prefix = buckets_prefix(self._etcd.prefix)
        async for snapshot in self._etcd.watch_changes(prefix, True, read):
            yield snapshot


class BucketCache:
    """Every bucket's record as etcd last said, kept current by a watch (`run`): what a gateway
    serves its object requests from, with no call per request, and what it keeps serving
    while etcd (or the metadata service) is away (issue 16's policy: object reads and writes
    of the buckets known go on; creating, deleting and configuring buckets fail).

    `get` answers only once the first snapshot arrived (`synced`); a name it does not hold may
    have been created a moment ago, so a caller confirms NotFound with a read of its own.
    """

    def __init__(self, store: BucketStore) -> None:
        self._store = store
        self._records: dict[str, metadata_pb2.BucketInfo] | None = None

    @property
    def synced(self) -> bool:
        """Whether a snapshot arrived (get answers)."""
        return self._records is not None

    def get(self, name: str) -> metadata_pb2.BucketInfo | None:
        """The bucket's record in the last snapshot (None: not in it, or no snapshot yet)."""
        return None if self._records is None else self._records.get(name)

    def records(self, tenant: str | None = None) -> list[metadata_pb2.BucketInfo] | None:
        """Every bucket (of tenant, when given) in the last snapshot, sorted by name, as
        `BucketStore.list_all` lists them (None: no snapshot yet)."""
        if self._records is None:
            return None
        found = (b for b in self._records.values() if tenant is None or b.tenant == tenant)
        return sorted(found, key=lambda b: b.name)

    async def run(self) -> None:
        """Follow the buckets until cancelled (etcd outages keep the last snapshot)."""
        async for snapshot in self._store.watch():
            self._records = snapshot


def _create_only(key: bytes, value: bytes) -> Callable[[Any], Awaitable[Any]]:
    """The transaction creating key unless it exists; on success it reads key back."""

    def op(client: Any) -> Any:
        tx = client.transactions
        # The read in the same transaction returns the new key's revision atomically.
        return client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, value), tx.get(key)],
            failure=[],
        )

    return op


def _compare_and_put(
    key: bytes, mod_revision: int, value: bytes
) -> Callable[[Any], Awaitable[Any]]:
    """The transaction replacing key's value at mod revision `mod_revision`; on success it reads
    key back (the new record and its revisions, atomically)."""

    def op(client: Any) -> Any:
        tx = client.transactions
        return client.transaction(
            compare=[tx.mod(key) == mod_revision],
            success=[tx.put(key, value), tx.get(key)],
            failure=[],
        )

    return op


def _compare_and_delete(key: bytes, generation: int) -> Callable[[Any], Awaitable[Any]]:
    """The transaction deleting key of create revision `generation` (that incarnation, whatever
    its configuration); on failure it reads key."""

    def op(client: Any) -> Any:
        tx = client.transactions
        return client.transaction(
            compare=[tx.create(key) == generation],
            success=[tx.delete(key)],
            failure=[tx.get(key)],
        )

    return op


def _decode(kv: Any) -> metadata_pb2.BucketInfo:
    info = metadata_pb2.BucketInfo()
    info.ParseFromString(kv.value)
    info.generation = int(kv.create_revision)
    return info
