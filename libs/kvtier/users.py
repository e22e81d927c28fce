"""S3 users: access keys and their secrets, in etcd at `<prefix>/users/<access_key>`.

A record is a serialized `kvtier.metadata.v1.UserRecord`: access key, tenant, display name,
admin flag, creation time, the shared-memory trust flag (`shm_trusted`: the user may map a
node's whole arena over same-host shared memory; an admin decides, see docs/security.md), and
the secret sealed with the cluster's master key (`kvtier.masterkey`: AES-256-GCM, a random nonce
per record, the access key as associated data so that a sealed secret copied into another
user's record does not open) plus the id of the key that sealed it. etcd never holds a secret
in plaintext.

The metadata service creates and deletes records (`UserStore`, create-only transactions, like
`kvtier.buckets`); gateways read them directly from etcd (`UserCache`: every user in memory, kept
current by a watch on the prefix, a direct read on a miss). Both run every operation through an
`EtcdMembership` session, so they share its client, call deadline and reconnects. A secret only
travels as a `Secret`, whose repr and str never show it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from google.protobuf import message

from kvtier import errors, masterkey, membership
from kvtier.proto.metadata.v1 import metadata_pb2
from kvtier.transport import dataplane as transport_dataplane

log = logging.getLogger(__name__)

#: Generated access keys: 20 characters of [A-Z0-9], like AWS's.
GENERATED_ACCESS_KEY_CHARS = 20
_GENERATED_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ACCESS_KEY = re.compile(r"[A-Za-z0-9._-]{3,128}")
#: Given secrets: 8-128 printable ASCII characters, no spaces.
_SECRET = re.compile(r"[\x21-\x7e]{8,128}")

#: (mod revision, record) of every user, by access key.
Records = dict[str, tuple[int, metadata_pb2.UserRecord]]


class Secret:
    """A secret key. Its repr and str are `Secret('***')`, so it cannot leak into a log line;
    `reveal()` is the one way to the text (to sign, or to show once at creation)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class User:
    """A user with its decrypted secret."""

    access_key: str
    tenant: str
    display_name: str
    is_admin: bool
    created_at_unix_ms: int
    secret: Secret
    #: Trusted for same-host shared memory (it can then read every tenant's blocks it maps).
    shm_trusted: bool = False

    @property
    def info(self) -> metadata_pb2.UserInfo:
        """The user without its secret, as the RPCs carry it."""
        return metadata_pb2.UserInfo(
            access_key=self.access_key,
            tenant=self.tenant,
            display_name=self.display_name,
            is_admin=self.is_admin,
            created_at_unix_ms=self.created_at_unix_ms,
            shm_trusted=self.shm_trusted,
        )


def users_prefix(prefix: str) -> bytes:
    """Key prefix under which users live."""
    return f"{prefix}/users/".encode()


def check_access_key(access_key: str) -> str:
    """access_key, if it is 3-128 characters of [A-Za-z0-9._-]; else errors.InvalidArgument.

    Checked wherever keys are built, so that no access key (`/`, `..`) can reach another key.
    """
    if not _ACCESS_KEY.fullmatch(access_key):
        raise errors.InvalidArgument("an access key is 3-128 characters of [A-Za-z0-9._-]")
    return access_key


def check_secret(secret: str) -> str:
    """secret, if it is 8-128 printable ASCII characters without spaces; else
    errors.InvalidArgument (whose message never holds the secret)."""
    if not _SECRET.fullmatch(secret):
        raise errors.InvalidArgument("a secret is 8-128 printable ASCII characters, no spaces")
    return secret


def user_key(prefix: str, access_key: str) -> bytes:
    """The etcd key of one user; errors.InvalidArgument for a bad access key."""
    return users_prefix(prefix) + check_access_key(access_key).encode()


def new_access_key() -> str:
    """A random access key: 20 characters of [A-Z0-9]."""
    return "".join(secrets.choice(_GENERATED_ALPHABET) for _ in range(GENERATED_ACCESS_KEY_CHARS))


def new_secret() -> Secret:
    """A random secret: 40 characters of [A-Za-z0-9_-] (240 bits)."""
    return Secret(secrets.token_urlsafe(30))


#: Whether new records bind their privileges into the seal (`_bound`). Every release from this
#: one reads both forms; this release still writes the form v0.1.0 reads (the secret bound to
#: the access key alone), so that gateways and metadata nodes can be rolled back to it
#: (docs/upgrades.md: a release first learns to read a new form and writes it from the next):
#: the next release sets it True. tests/fault/test_upgrade.py's rollback fails while True.
BIND_PRIVILEGES = False


def seal(
    key: masterkey.MasterKey,
    info: metadata_pb2.UserInfo,
    secret: Secret,
    *,
    bind_privileges: bool | None = None,
) -> metadata_pb2.UserRecord:
    """The record of a user: its info and its secret sealed under key, bound to its access key
    and, with bind_privileges (default BIND_PRIVILEGES), its privileges (`_bound`)."""
    bind = BIND_PRIVILEGES if bind_privileges is None else bind_privileges
    bound = (
        _bound(info.access_key, info.tenant, is_admin=info.is_admin, shm_trusted=info.shm_trusted)
        if bind
        else info.access_key.encode()
    )
    nonce, ciphertext = key.seal(secret.reveal().encode(), bound)
    return metadata_pb2.UserRecord(
        access_key=info.access_key,
        tenant=info.tenant,
        display_name=info.display_name,
        is_admin=info.is_admin,
        created_at_unix_ms=info.created_at_unix_ms,
        shm_trusted=info.shm_trusted,
        secret_nonce=nonce,
        secret_ciphertext=ciphertext,
        master_key_id=key.key_id,
    )


def _bound(access_key: str, tenant: str, *, is_admin: bool, shm_trusted: bool) -> bytes:
    """The associated data a secret is sealed with: the record's access key and everything it
    grants (tenant, admin, shared-memory trust).

    Every node certificate reaches etcd (membership), and etcd has no per-role access control,
    so a datanode or kvcache node could otherwise rewrite a record's tenant or flags and make
    any user an admin; bound here, an altered record no longer opens (errors.Corrupt) without
    the master key, which only metadata nodes and gateways hold. The fields cannot hold a
    newline (`check_access_key`, `principal.check_tenant`), so the encoding is unambiguous.
    """
    flags = f"{int(is_admin)}{int(shm_trusted)}"
    return f"kvtier-user-v2\n{access_key}\n{tenant}\n{flags}".encode()


def unseal(key: masterkey.MasterKey, record: metadata_pb2.UserRecord) -> User:
    """The user of a record, secret decrypted.

    Raises errors.PreconditionFailed when another master key sealed it (this node holds the
    wrong key) and errors.Corrupt when the record was altered or its sealed secret belongs to
    another access key.
    """
    if record.master_key_id and record.master_key_id != key.key_id:
        raise errors.PreconditionFailed(
            f"user {record.access_key} is sealed with master key {record.master_key_id}; "
            f"this node holds {key.key_id}"
        )
    bound = _bound(
        record.access_key, record.tenant, is_admin=record.is_admin, shm_trusted=record.shm_trusted
    )
    try:
        plain = key.open(record.secret_nonce, record.secret_ciphertext, bound)
    except errors.Corrupt:
        # A record sealed with its access key alone (this release still writes them:
        # BIND_PRIVILEGES). A record sealed bound never opens this way (other associated data),
        # so this is no downgrade: only unbound records stay alterable by an etcd writer.
        plain = key.open(record.secret_nonce, record.secret_ciphertext, record.access_key.encode())
    return User(
        access_key=record.access_key,
        tenant=record.tenant,
        display_name=record.display_name,
        is_admin=record.is_admin,
        created_at_unix_ms=record.created_at_unix_ms,
        secret=Secret(plain.decode()),
        shm_trusted=record.shm_trusted,
    )


def info_of(record: metadata_pb2.UserRecord) -> metadata_pb2.UserInfo:
    """A record without its sealed secret."""
    return metadata_pb2.UserInfo(
        access_key=record.access_key,
        tenant=record.tenant,
        display_name=record.display_name,
        is_admin=record.is_admin,
        created_at_unix_ms=record.created_at_unix_ms,
        shm_trusted=record.shm_trusted,
    )


class UserStore:
    """The user records of one cluster, over an EtcdMembership session.

    Without a master key, `create` and `get` raise errors.PreconditionFailed (S3 users are
    disabled on this node); `list_all` and `delete` need no key. Every call has the session's
    deadline; etcd failures raise errors.Unavailable.
    """

    def __init__(
        self,
        etcd: membership.EtcdMembership,
        key: masterkey.MasterKey | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = etcd
        self._key = key
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether this store holds a master key (can create and open users)."""
        return self._key is not None

    def _need_key(self) -> masterkey.MasterKey:
        if self._key is None:
            raise errors.PreconditionFailed(
                "S3 users are disabled on this node: no master key is configured "
                f"(master_key_file setting or {masterkey.ENV_MASTER_KEY})"
            )
        return self._key

    async def create(
        self,
        *,
        tenant: str = "",
        display_name: str = "",
        is_admin: bool = False,
        access_key: str = "",
        secret: Secret | None = None,
        shm_trusted: bool = False,
    ) -> User:
        """A new user of tenant ("default" when empty), with its secret (for showing once);
        shm_trusted marks its credential trusted for same-host shared memory.

        Without access_key and secret both are generated; giving only one is InvalidArgument,
        as is a bad tenant, access key or secret. Raises errors.AlreadyExists when the access
        key is taken. After errors.Unavailable the create may or may not have been applied.
        """
        key = self._need_key()
        if bool(access_key) != (secret is not None):
            raise errors.InvalidArgument("give both an access key and a secret, or neither")
        info = metadata_pb2.UserInfo(
            access_key=check_access_key(access_key) if access_key else new_access_key(),
            tenant=transport_dataplane.check_tenant(tenant or transport_dataplane.DEFAULT_TENANT),
            display_name=display_name,
            is_admin=is_admin,
            created_at_unix_ms=int(self._clock() * 1000),
            shm_trusted=shm_trusted,
        )
        if secret is None:
            secret = new_secret()
        check_secret(secret.reveal())
        record = seal(key, info, secret)
        etcd_key = user_key(self._etcd.prefix, info.access_key)
        ok, _ = await self._etcd.call(_create_only(etcd_key, record.SerializeToString()))
        if not ok:
            raise errors.AlreadyExists(f"user {info.access_key} already exists")
        return unseal(key, record)

    async def read(self, access_key: str) -> tuple[int, metadata_pb2.UserRecord] | None:
        """(mod revision, record) of a user, secret still sealed; None when there is none."""
        etcd_key = user_key(self._etcd.prefix, access_key)
        kv = await self._etcd.call(lambda client: client.get(etcd_key))
        return None if kv is None else _decode(kv)

    async def get(self, access_key: str) -> User:
        """The user with its secret; errors.NotFound when there is none (and what `unseal`
        raises when the record does not open)."""
        key = self._need_key()
        found = await self.read(access_key)
        if found is None:
            raise errors.NotFound(f"user {access_key} does not exist")
        return unseal(key, found[1])

    async def records(self) -> Records:
        """Every record, by access key, with its mod revision."""
        prefix = users_prefix(self._etcd.prefix)
        found = await self._etcd.call(lambda client: client.get_prefix(prefix))
        records: Records = {}
        for kv in found:
            try:
                revision, record = _decode(kv)
            except errors.Corrupt as exc:  # one bad record must not hide every other user
                log.warning("skipping a user record: %s", exc.message)
                continue
            records[record.access_key] = (revision, record)
        return records

    async def list_all(self, tenant: str = "") -> list[metadata_pb2.UserInfo]:
        """Every user (of tenant, when given), sorted by access key; no secrets."""
        records = await self.records()
        return [
            info_of(record)
            for _access_key, (_rev, record) in sorted(records.items())
            if not tenant or record.tenant == tenant
        ]

    async def delete(self, access_key: str) -> None:
        """Remove a user; errors.NotFound when there is none."""
        etcd_key = user_key(self._etcd.prefix, access_key)
        deleted = await self._etcd.call(lambda client: client.delete(etcd_key))
        if deleted is None:
            raise errors.NotFound(f"user {access_key} does not exist")

    async def watch(self) -> AsyncGenerator[Records, None]:
        """Every record, now and after every change under the prefix; survives etcd outages.

        Each change re-reads the whole prefix: users change rarely, and a full snapshot cannot
        drift from etcd the way a cache patched event by event can.
        """
        prefix = users_prefix(self._etcd.prefix)
        async for snapshot in self._etcd.watch_changes(prefix, True, self.records):
            yield snapshot


class UserCache:
    """A gateway's view of the users, to check signatures with.

    `run()` (a background loop of the owner) watches the users' prefix and keeps every user in
    memory, decrypted; `get` answers from there. A miss (a user created an instant ago, or no
    watch running) reads etcd directly and remembers the answer for ttl_s (absent users for
    miss_ttl_s, so that a flood of unknown keys does not hammer etcd) or until the next watch
    snapshot, whichever comes first. A record that does not open under this node's key counts as
    absent (and is logged). Without a master key every user is absent.
    """

    def __init__(
        self,
        etcd: membership.EtcdMembership,
        key: masterkey.MasterKey | None,
        *,
        ttl_s: float = 5.0,
        miss_ttl_s: float = 1.0,
        max_remembered: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = UserStore(etcd, key)
        self._key = key
        self._ttl_s = ttl_s
        self._miss_ttl_s = miss_ttl_s
        self._max_remembered = max_remembered
        self._clock = clock
        self._watched: dict[str, tuple[int, User | None]] = {}
        self._remembered: dict[str, tuple[float, User | None]] = {}
        self._snapshots = 0
        self._synced = asyncio.Event()
        self._tenants: frozenset[str] = frozenset()
        self._tenants_read: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
        self._tenants_lock = asyncio.Lock()

    @property
    def synced(self) -> bool:
        """Whether the watch has delivered its first snapshot."""
        return self._synced.is_set()

    async def has_tenant(self, tenant: str) -> bool | None:
        """Whether tenant has a user: from the watch, else (a user created an instant ago)
        from etcd, read at most once per miss_ttl_s (a flood of unknown tenants costs etcd no
        more); None where it cannot tell (before the watch's first snapshot, etcd down)."""
        if not self.synced:
            return None
        if tenant in self._tenants:
            return True
        async with self._tenants_lock:
            until, read = self._tenants_read
            if self._clock() >= until:
                try:
                    records = await self._store.records()
                except errors.Unavailable:
                    return None
                read = frozenset(record.tenant for _, record in records.values())
                self._tenants_read = (self._clock() + self._miss_ttl_s, read)
        return tenant in read or tenant in self._tenants

    async def wait_synced(self) -> None:
        """Return once the watch has delivered its first snapshot (the caller bounds the wait)."""
        await self._synced.wait()

    async def run(self) -> None:
        """Keep the users current from an etcd watch until cancelled (returns at once without a
        master key: there is nothing to check signatures with)."""
        if self._key is None:
            log.warning("no master key: S3 users are disabled on this node")
            return
        async for snapshot in self._store.watch():
            self._apply(snapshot)

    def _apply(self, snapshot: Records) -> None:
        watched: dict[str, tuple[int, User | None]] = {}
        for access_key, (revision, record) in snapshot.items():
            known = self._watched.get(access_key)
            if known is not None and known[0] == revision:
                watched[access_key] = known  # unchanged: no need to decrypt it again
            else:
                watched[access_key] = (revision, self._open(record))
        self._watched = watched
        self._tenants = frozenset(record.tenant for _, record in snapshot.values())
        self._remembered.clear()
        self._snapshots += 1
        self._synced.set()

    def _open(self, record: metadata_pb2.UserRecord) -> User | None:
        assert self._key is not None
        try:
            return unseal(self._key, record)
        except (errors.Corrupt, errors.PreconditionFailed) as exc:
            log.warning("user %s is unusable: %s", record.access_key, exc.message)
            return None

    def _memory(self, access_key: str, now: float) -> tuple[bool, User | None]:
        """(whether memory answers for access_key, its answer)."""
        watched = self._watched.get(access_key)
        if watched is not None:
            return True, watched[1]
        remembered = self._remembered.get(access_key)
        if remembered is not None and now < remembered[0]:
            return True, remembered[1]
        return False, None

    def cached(self, access_key: str) -> User | None:
        """What memory holds for access_key (the watch's copy, else an unexpired remembered
        read), without asking etcd; None when it holds nothing or an absent user."""
        return self._memory(access_key, self._clock())[1]

    async def get(self, access_key: str) -> User | None:
        """The user with its secret, or None when there is none (or it cannot be opened).

        Raises errors.Unavailable only when etcd must be asked and does not answer.
        """
        if self._key is None or not _ACCESS_KEY.fullmatch(access_key):
            return None
        now = self._clock()
        known, user = self._memory(access_key, now)
        if known:
            return user
        snapshots = self._snapshots
        try:
            found = await self._store.read(access_key)
        except errors.Corrupt as exc:
            log.warning("user %s is unusable: %s", access_key, exc.message)
            found = None
        user = None if found is None else self._open(found[1])
        # A snapshot that arrived during the read is newer than it: do not let the read undo it.
        if snapshots == self._snapshots:
            if len(self._remembered) >= self._max_remembered:
                self._remembered.clear()
            ttl = self._ttl_s if user is not None else self._miss_ttl_s
            self._remembered[access_key] = (now + ttl, user)
        return user


def _create_only(key: bytes, value: bytes) -> Callable[[Any], Awaitable[Any]]:
    """The transaction creating key unless it exists."""

    def op(client: Any) -> Any:
        tx = client.transactions
        return client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, value)], failure=[]
        )

    return op


def _decode(kv: Any) -> tuple[int, metadata_pb2.UserRecord]:
    """(mod revision, record) of an etcd key-value; errors.Corrupt when it does not parse or
    names another access key than its key (a record copied under another key)."""
    try:
        record = metadata_pb2.UserRecord.FromString(kv.value)
    except message.DecodeError:
        raise errors.Corrupt(f"the user record at {kv.key!r} does not parse") from None
    if bytes(kv.key).rpartition(b"/")[2] != record.access_key.encode():
        raise errors.Corrupt(f"the user record at {kv.key!r} names {record.access_key!r}")
    return int(kv.mod_revision), record
