"""The cluster's master key: 32 random bytes that seal S3 secrets (AES-256-GCM) in etcd.

A gateway must know a user's secret to check an AWS Signature V4 (an HMAC keyed by it), so the
secret cannot be hashed; like MinIO, kvtier encrypts it. Only metadata nodes and gateways hold the
key: a file (`master_key_file` setting; hex or 32 raw bytes; refused when its mode lets the group
or others in) or, without a file, the environment variable KVTIER_MASTER_KEY (hex). etcd and its
backups only ever see ciphertext.

Every seal takes a fresh random 96-bit nonce and binds associated data (the user's access key), so
a ciphertext copied into another record does not open. Nothing here logs key material; a
`MasterKey` shows only its `key_id` (8 hex digits of its SHA-256) in repr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvtier import errors

#: Environment variable holding the key as hex, read when no key file is configured.
ENV_MASTER_KEY = "KVTIER_MASTER_KEY"
MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
#: Mode bits a key file may not have: nobody but its owner may read or replace it.
_FORBIDDEN_MODE = stat.S_IRWXG | stat.S_IRWXO


@dataclasses.dataclass(frozen=True, slots=True)
class MasterKey:
    """An AES-256-GCM key; `seal` and `open` bind associated data to every ciphertext."""

    key: bytes = dataclasses.field(repr=False)
    key_id: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != MASTER_KEY_BYTES:
            raise errors.InvalidArgument(f"a master key has {MASTER_KEY_BYTES} bytes")
        object.__setattr__(self, "key_id", hashlib.sha256(self.key).hexdigest()[:8])

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random key."""
        return cls(secrets.token_bytes(MASTER_KEY_BYTES))

    def seal(self, plaintext: bytes, associated_data: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext with its 16-byte tag) of plaintext, bound to associated_data."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce, AESGCM(self.key).encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        """The plaintext; errors.Corrupt when the ciphertext, nonce or associated data was
        altered, or another key sealed it."""
        try:
            return AESGCM(self.key).decrypt(nonce, ciphertext, associated_data)
        except (InvalidTag, ValueError):
            raise errors.Corrupt(
                f"sealed data does not open with master key {self.key_id} "
                "(altered, moved to another record, or sealed under another key)"
            ) from None


def load(path: str = "", environ: Mapping[str, str] | None = None) -> MasterKey | None:
    """The configured master key: the file at path, else KVTIER_MASTER_KEY; None when neither.

    Raises errors.InvalidArgument, naming the file or variable, for an unreadable file, a file
    whose mode lets the group or others in (fix: chmod 600), or content that is not 32 bytes
    (raw) or their 64 hex digits.
    """
    if path:
        return MasterKey(_read_key_file(Path(path)))
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_MASTER_KEY, "").strip()
    return MasterKey(_decode(text.encode(), ENV_MASTER_KEY)) if text else None


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            # The mode of what was opened, not of what the path names a moment later.
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read(4 * MASTER_KEY_BYTES)
    except OSError as exc:
        raise errors.InvalidArgument(f"master key file {path}: {exc.strerror}") from None
    if mode & _FORBIDDEN_MODE:
        raise errors.InvalidArgument(
            f"master key file {path} has mode {stat.S_IMODE(mode):o}: only its owner may have "
            f"access (chmod 600 {path})"
        )
    return _decode(raw, f"master key file {path}")


def _decode(raw: bytes, where: str) -> bytes:
    if len(raw) == MASTER_KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise errors.InvalidArgument(
            f"{where}: not a {MASTER_KEY_BYTES}-byte key ({2 * MASTER_KEY_BYTES} hex digits)"
        )
    return key


def write_new(path: Path) -> bool:
    """Create a key file of a new random key (hex, mode 0600) unless path exists.

    Returns whether it created one. An existing file is left as it is, so every restart of a
    dev cluster keeps opening the secrets sealed before.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(MasterKey.generate().key.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return True
