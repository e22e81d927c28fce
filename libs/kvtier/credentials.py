"""S3 users: access keys and their secrets, kept in etcd encrypted under the cluster's master key.

A gateway must know a user's secret to check an AWS Signature V4 (an HMAC keyed by it), so the
secret cannot be hashed; it is sealed with AES-256-GCM (`cryptography`) under a 32-byte master
key that only metadata nodes and gateways hold (a file of mode 0600, or KVTIER_MASTER_KEY), with
the access key as associated data so a record cannot be moved to another key. etcd and its
backups never see a secret in plaintext.

Records live at `<prefix>/users/<access_key>` (`kvtier.metadata.v1.UserRecord`). The metadata
service creates and deletes them (`UserStore`); gateways read them (`UserCache`: a few seconds
of cache, so a deleted user is refused within `ttl_s`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvtier import errors, membership
from kvtier.proto.metadata.v1 import metadata_pb2

ENV_MASTER_KEY = "KVTIER_MASTER_KEY"
MASTER_KEY_BYTES = 32
_ACCESS_KEY = re.compile(r"[A-Za-z0-9._-]{3,128}")
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class Secret:
    """A secret key that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself (for signing checks only)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """A user with its (decrypted) secret."""

    info: metadata_pb2.UserInfo
    secret: Secret


def load_master_key(path: str = "") -> bytes | None:
    """The master key from a file (hex or 32 raw bytes; refused when group- or
    world-readable) or, without a path, from KVTIER_MASTER_KEY (hex); None when neither."""
    if path:
        file = Path(path)
        try:
            mode = file.stat().st_mode
            raw = file.read_bytes()
        except OSError as exc:
            raise errors.InvalidArgument(f"master key file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise errors.InvalidArgument(
                f"master key file {path} is readable by others: chmod 600 it"
            )
        return _decode_key(raw, f"master key file {path}")
    text = os.environ.get(ENV_MASTER_KEY, "")
    return _decode_key(text.encode(), ENV_MASTER_KEY) if text else None


def _decode_key(raw: bytes, where: str) -> bytes:
    if len(raw) == MASTER_KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise errors.InvalidArgument(f"{where}: not a {MASTER_KEY_BYTES}-byte key (or its hex)")
    return key


def write_master_key(path: Path) -> None:
    """Create a new random master key file (hex, mode 0600) unless one exists."""
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_bytes(MASTER_KEY_BYTES).hex() + "\n")


def key_id(master_key: bytes) -> str:
    """A short public name of a master key."""
    return hashlib.sha256(master_key).hexdigest()[:8]


def seal(master_key: bytes, access_key: str, secret: str) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) of a secret, bound to its access key."""
    nonce = secrets.token_bytes(12)
    return nonce, AESGCM(master_key).encrypt(nonce, secret.encode(), access_key.encode())


def unseal(master_key: bytes, record: metadata_pb2.UserRecord) -> Secret:
    """The record's secret; Unauthenticated when it was not sealed by this key for this user."""
    try:
        plain = AESGCM(master_key).decrypt(
            record.secret_nonce, record.secret_ciphertext, record.access_key.encode()
        )
    except (InvalidTag, ValueError):
        raise errors.Unauthenticated(
            f"the secret of {record.access_key} does not open with master key {key_id(master_key)}"
        ) from None
    return Secret(plain.decode())


def users_prefix(prefix: str) -> bytes:
    """Key prefix of the user records."""
    return f"{prefix}/users/".encode()


def _info(record: metadata_pb2.UserRecord) -> metadata_pb2.UserInfo:
    return metadata_pb2.UserInfo(
        access_key=record.access_key, tenant=record.tenant, display_name=record.display_name,
        is_admin=record.is_admin, created_at_unix_ms=record.created_at_unix_ms,
    )  # fmt: skip


class UserStore:
    """User records over an EtcdMembership session (the metadata service's side)."""

    def __init__(self, etcd: membership.EtcdMembership, master_key: bytes | None) -> None:
        self._etcd = etcd
        self._master_key = master_key

    def _key(self, access_key: str) -> bytes:
        if not _ACCESS_KEY.fullmatch(access_key):
            raise errors.InvalidArgument("access key: 3-128 characters of [A-Za-z0-9._-]")
        return users_prefix(self._etcd.prefix) + access_key.encode()

    def _need_key(self) -> bytes:
        if self._master_key is None:
            raise errors.PreconditionFailed(
                "no master key is configured (master_key_file or KVTIER_MASTER_KEY): "
                "users cannot be stored"
            )
        return self._master_key

    async def create(
        self,
        *,
        tenant: str = "",
        display_name: str = "",
        is_admin: bool = False,
        access_key: str = "",
        secret_key: str = "",
    ) -> tuple[metadata_pb2.UserInfo, str]:
        """A new user and its secret (shown this once). AlreadyExists when the access key is
        taken; InvalidArgument for bad names or a weak secret."""
        master = self._need_key()
        tenant = tenant or "default"
        if not _TENANT.fullmatch(tenant):
            raise errors.InvalidArgument("tenant: 1-64 characters of [A-Za-z0-9._-]")
        if bool(access_key) != bool(secret_key):
            raise errors.InvalidArgument("give both an access key and a secret, or neither")
        access_key = access_key or "".join(secrets.choice(_ALPHABET) for _ in range(20))
        secret_key = secret_key or secrets.token_urlsafe(30)
        if not 8 <= len(secret_key) <= 128 or not secret_key.isprintable():
            raise errors.InvalidArgument("secret: 8-128 printable characters")
        nonce, sealed = seal(master, access_key, secret_key)
        record = metadata_pb2.UserRecord(
            access_key=access_key, tenant=tenant, display_name=display_name or access_key,
            is_admin=is_admin, created_at_unix_ms=int(time.time() * 1000),
            secret_nonce=nonce, secret_ciphertext=sealed, master_key_id=key_id(master),
        )  # fmt: skip
        key, value = self._key(access_key), record.SerializeToString()

        def create_only(client: Any) -> Any:
            tx = client.transactions
            return client.transaction(
                compare=[tx.create(key) == 0], success=[tx.put(key, value)], failure=[]
            )

        ok, _ = await self._etcd.call(create_only)
        if not ok:
            raise errors.AlreadyExists(f"user {access_key} exists")
        return _info(record), secret_key

    async def record(self, access_key: str) -> metadata_pb2.UserRecord | None:
        """The stored record (secret sealed), or None."""
        key = self._key(access_key)
        kv = await self._etcd.call(lambda client: client.get(key))
        return None if kv is None else metadata_pb2.UserRecord.FromString(kv.value)

    async def list(self, tenant: str = "") -> list[metadata_pb2.UserInfo]:
        """Users (of a tenant), by access key; no secrets."""
        prefix = users_prefix(self._etcd.prefix)
        found = await self._etcd.call(lambda client: client.get_prefix(prefix))
        records = (metadata_pb2.UserRecord.FromString(kv.value) for kv in found)
        return sorted(
            (_info(r) for r in records if not tenant or r.tenant == tenant),
            key=lambda u: u.access_key,
        )

    async def delete(self, access_key: str) -> None:
        """Remove a user (NotFound when absent)."""
        key = self._key(access_key)
        deleted = await self._etcd.call(lambda client: client.delete(key))
        if not deleted:
            raise errors.NotFound(f"user {access_key} does not exist")


class UserCache:
    """Gateways' view of the users: records read from etcd and decrypted, cached for ttl_s
    (absent keys for a second, so a flood of bad keys does not hammer etcd)."""

    def __init__(
        self,
        etcd: membership.EtcdMembership,
        master_key: bytes | None,
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = UserStore(etcd, master_key)
        self._master_key = master_key
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, User | None]] = {}

    async def get(self, access_key: str) -> User | None:
        """The user (with its secret), or None when there is none (or no master key)."""
        if self._master_key is None or not _ACCESS_KEY.fullmatch(access_key):
            return None
        now = self._clock()
        cached = self._cache.get(access_key)
        if cached is not None and now < cached[0]:
            return cached[1]
        record = await self._store.record(access_key)
        user = None
        if record is not None:
            user = User(_info(record), unseal(self._master_key, record))
        ttl = self._ttl_s if user is not None else min(1.0, self._ttl_s)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[access_key] = (now + ttl, user)
        return user
