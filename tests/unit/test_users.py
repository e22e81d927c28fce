"""S3 users without etcd: sealing secrets, the master key and its file, names and secrets."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from pathlib import Path

import pytest

from kvtier import config, devcluster, errors, identity, masterkey, users
from kvtier.proto.metadata.v1 import metadata_pb2
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import seeds

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
_RNG = random.Random(seeds.RUN_SEED)  # random key bytes, the same in every xdist worker


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their master key; one in the environment would be a silent fallback."""
    monkeypatch.delenv(masterkey.ENV_MASTER_KEY, raising=False)


def _info(access_key: str = "AKIAEXAMPLE") -> metadata_pb2.UserInfo:
    return metadata_pb2.UserInfo(
        access_key=access_key, tenant="team-a", display_name="Ann", created_at_unix_ms=1234
    )


def _key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_seal_round_trip_keeps_every_field() -> None:
    key = masterkey.MasterKey.generate()
    record = users.seal(key, _info(), users.Secret(SECRET))
    assert record.master_key_id == key.key_id
    assert len(record.secret_nonce) == masterkey.NONCE_BYTES
    assert SECRET.encode() not in record.SerializeToString()
    user = users.unseal(key, metadata_pb2.UserRecord.FromString(record.SerializeToString()))
    assert user.secret.reveal() == SECRET
    assert user.info == _info()
    assert users.info_of(record) == _info()


def test_the_shared_memory_trust_flag_survives_sealing() -> None:
    key = masterkey.MasterKey.generate()
    trusted = _info()
    trusted.shm_trusted = True
    record = users.seal(key, trusted, users.Secret(SECRET))
    assert record.shm_trusted
    user = users.unseal(key, metadata_pb2.UserRecord.FromString(record.SerializeToString()))
    assert user.shm_trusted
    assert user.info == trusted
    assert users.info_of(record) == trusted
    assert not users.unseal(key, users.seal(key, _info(), users.Secret(SECRET))).shm_trusted


def test_every_seal_takes_a_fresh_nonce() -> None:
    key = masterkey.MasterKey.generate()
    first = users.seal(key, _info(), users.Secret(SECRET))
    second = users.seal(key, _info(), users.Secret(SECRET))
    assert first.secret_nonce != second.secret_nonce
    assert first.secret_ciphertext != second.secret_ciphertext


@pytest.mark.parametrize("field", ["secret_ciphertext", "secret_nonce"])
def test_tampered_sealed_bytes_are_corrupt(field: str) -> None:
    key = masterkey.MasterKey.generate()
    record = users.seal(key, _info(), users.Secret(SECRET))
    raw = bytearray(getattr(record, field))
    raw[len(raw) // 2] ^= 0x01
    setattr(record, field, bytes(raw))
    with pytest.raises(errors.Corrupt) as caught:
        users.unseal(key, record)
    assert SECRET not in str(caught.value)


def test_a_sealed_secret_does_not_open_under_another_access_key() -> None:
    key = masterkey.MasterKey.generate()
    victim = users.seal(key, _info("VICTIM"), users.Secret(SECRET))
    attacker = users.seal(key, _info("ATTACKER"), users.Secret("attacker-secret"))
    # Swap the sealed secret into the other record: the associated data no longer matches.
    attacker.secret_nonce, attacker.secret_ciphertext = (
        victim.secret_nonce,
        victim.secret_ciphertext,
    )
    with pytest.raises(errors.Corrupt):
        users.unseal(key, attacker)
    renamed = metadata_pb2.UserRecord()
    renamed.CopyFrom(victim)
    renamed.access_key = "ATTACKER"
    with pytest.raises(errors.Corrupt):
        users.unseal(key, renamed)


@pytest.mark.parametrize(
    ("field", "value"), [("is_admin", True), ("tenant", "team-b"), ("shm_trusted", True)]
)
def test_a_record_whose_privileges_were_altered_does_not_open(field: str, value: object) -> None:
    """Any node certificate can write etcd: without the master key it must not be able to make
    a user an admin, move it to another tenant or trust it with shared memory."""
    key = masterkey.MasterKey.generate()
    record = users.seal(key, _info(), users.Secret(SECRET), bind_privileges=True)
    setattr(record, field, value)
    with pytest.raises(errors.Corrupt):
        users.unseal(key, record)
    setattr(record, field, getattr(_info(), field))
    assert users.unseal(key, record).secret.reveal() == SECRET


def test_records_are_written_as_the_previous_release_reads_them_and_both_forms_open() -> None:
    """This release still seals under the access key alone (v0.1.0's form: gateways and
    metadata nodes can be rolled back to it, docs/upgrades.md); it opens both forms, so the
    next one can write the bound form. An unbound record stays alterable through etcd."""
    key = masterkey.MasterKey.generate()
    assert users.BIND_PRIVILEGES is False
    record = users.seal(key, _info(), users.Secret(SECRET))
    opened = key.open(record.secret_nonce, record.secret_ciphertext, b"AKIAEXAMPLE")
    assert opened == SECRET.encode()
    assert users.unseal(key, record).info == _info()
    bound = users.seal(key, _info(), users.Secret(SECRET), bind_privileges=True)
    assert users.unseal(key, bound).info == _info()
    with pytest.raises(errors.Corrupt):  # the bound form is not v0.1.0's
        key.open(bound.secret_nonce, bound.secret_ciphertext, b"AKIAEXAMPLE")


def test_another_master_key_is_refused() -> None:
    record = users.seal(masterkey.MasterKey.generate(), _info(), users.Secret(SECRET))
    other = masterkey.MasterKey.generate()
    with pytest.raises(errors.PreconditionFailed, match=other.key_id):
        users.unseal(other, record)
    record.master_key_id = ""  # without the id, the tag still catches it
    with pytest.raises(errors.Corrupt):
        users.unseal(other, record)


def test_secrets_never_show_in_repr_str_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    secret = users.Secret(SECRET)
    user = users.User(
        access_key="AK1",
        tenant="t",
        display_name="n",
        is_admin=False,
        created_at_unix_ms=0,
        secret=secret,
    )
    key = masterkey.MasterKey.generate()
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("%s %r %s", secret, secret, user)
    shown = [repr(secret), str(secret), f"{secret}", repr(user), str(user), caplog.text]
    assert not [text for text in shown if SECRET in text]
    assert repr(secret) == "Secret('***')"
    assert key.key.hex() not in repr(key)
    assert key.key_id in repr(key)


def test_load_hex_raw_and_environment(tmp_path: Path) -> None:
    key = os.urandom(masterkey.MASTER_KEY_BYTES)
    hex_file = _key_file(tmp_path, key.hex().encode() + b"\n")
    assert masterkey.load(str(hex_file)) == masterkey.MasterKey(key)
    raw_file = _key_file(tmp_path, key, mode=0o400)
    assert masterkey.load(str(raw_file)) == masterkey.MasterKey(key)
    env = {masterkey.ENV_MASTER_KEY: key.hex()}
    assert masterkey.load("", env) == masterkey.MasterKey(key)
    assert masterkey.load("", {}) is None
    assert masterkey.load("", {masterkey.ENV_MASTER_KEY: "  "}) is None
    other = os.urandom(masterkey.MASTER_KEY_BYTES).hex()
    # The file wins over the environment.
    assert masterkey.load(str(raw_file), {masterkey.ENV_MASTER_KEY: other}).key == key  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_key_file_others_may_touch_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, os.urandom(32).hex().encode(), mode=mode)
    with pytest.raises(errors.InvalidArgument, match="chmod 600") as caught:
        masterkey.load(str(path))
    assert str(path) in caught.value.message


@pytest.mark.parametrize(
    "content",
    [b"", b"abc", _RNG.randbytes(31), _RNG.randbytes(33), b"zz" * 32, b"00" * 31, b"00" * 33],
)
def test_a_key_that_is_not_32_bytes_is_refused(tmp_path: Path, content: bytes) -> None:
    path = _key_file(tmp_path, content)
    with pytest.raises(errors.InvalidArgument, match="32-byte"):
        masterkey.load(str(path))
    with pytest.raises(errors.InvalidArgument, match=masterkey.ENV_MASTER_KEY):
        masterkey.load("", {masterkey.ENV_MASTER_KEY: "00" * 31})


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"missing\.key"):
        masterkey.load(str(tmp_path / "missing.key"))


def test_write_new_creates_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    assert masterkey.write_new(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = masterkey.load(str(path))
    assert first is not None
    assert not masterkey.write_new(path)
    assert masterkey.load(str(path)) == first


def test_metadata_refuses_to_start_with_a_readable_key_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, os.urandom(32).hex().encode(), mode=0o644)
    cfg = metadata_config.MetadataConfig(master_key_file=str(path), insecure=True)
    with pytest.raises(config.ConfigError, match="chmod 600"):
        metadata_main.build(cfg)
    path.chmod(0o600)
    assert metadata_main.build(cfg).label == "metadata"
    no_key = metadata_config.MetadataConfig(insecure=True)
    assert metadata_main.build(no_key).label == "metadata"


@pytest.mark.parametrize("access_key", ["AKIA1234567890ABCDEF", "abc", "a.b_c-d", "x" * 128])
def test_good_access_keys(access_key: str) -> None:
    assert users.check_access_key(access_key) == access_key
    assert users.user_key("/p", access_key) == f"/p/users/{access_key}".encode()


@pytest.mark.parametrize("access_key", ["", "ab", "x" * 129, "a/b", "..", "a b", "ä" * 4, "a\n"])
def test_bad_access_keys(access_key: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        users.user_key("/p", access_key)


@pytest.mark.parametrize(
    "secret", ["", "short", "x" * 129, "has space in it", "tab\there!", "é" * 8]
)
def test_bad_secrets_are_refused_without_echoing_them(secret: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        users.check_secret(secret)
    assert not secret or secret not in caught.value.message


def test_generated_keys_look_like_aws() -> None:
    access_keys = {users.new_access_key() for _ in range(50)}
    assert len(access_keys) == 50
    for access_key in access_keys:
        assert len(access_key) == 20
        assert set(access_key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    secret = users.new_secret().reveal()
    assert len(secret) == 40
    assert users.check_secret(secret) == secret


def test_write_atomic_with_a_mode_never_exposes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    old_umask = os.umask(0)  # the worst case: nothing masked
    try:
        identity.write_atomic(path, b"{}", mode=0o600)
        plain = tmp_path / "plain.json"
        identity.write_atomic(plain, b"{}")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plain.stat().st_mode) == 0o666


def test_dev_cluster_credentials_are_private_and_kept(tmp_path: Path) -> None:
    creds = devcluster.credentials(tmp_path)
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == creds
    assert users.check_access_key(creds["access_key"])
    assert len(creds["access_key"]) == 20
    assert users.check_secret(creds["secret_key"])
    assert devcluster.credentials(tmp_path) == creds


def test_dev_cluster_summary_shows_the_access_key_but_never_the_secret() -> None:
    info = {
        "state_dir": "/s",
        "etcd": "e",
        "metadata": "m",
        "gateway_grpc": "g",
        "gateway_s3": "http://s3",
        "s3_access_key": "AK",
        "s3_secret_key": "SK",
        "map_epoch": 3,
    }
    text = devcluster.render_summary(info)
    assert "access key    AK" in text
    assert "SK" not in text  # the output of a detached `kvtier up` goes to a log file
    assert "secret key    in the cluster file" in text


async def test_the_user_cache_knows_which_tenants_have_users() -> None:
    """What S3 ACL grants are checked against (`Authenticator.known_tenant`): None until the
    watch's first snapshot, then its users' tenants; a miss reads etcd, at most once per
    miss_ttl_s (a user created an instant ago is found; a flood of unknown ones costs one read)."""
    key = masterkey.MasterKey.generate()
    now = [0.0]
    cache = users.UserCache(None, key, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await cache.has_tenant("team-a") is None
    reads: list[str] = []
    stored: users.Records = {}

    async def records() -> users.Records:
        reads.append("read")
        return dict(stored)

    cache._store.records = records  # type: ignore[method-assign]
    record = users.seal(key, _info("AKIAEXAMPLE1"), users.Secret(SECRET))
    cache._apply({"AKIAEXAMPLE1": (1, record)})
    assert await cache.has_tenant("team-a") is True
    assert reads == []
    late = metadata_pb2.UserInfo(access_key="AKIAEXAMPLE2", tenant="team-b", display_name="B")
    stored["AKIAEXAMPLE2"] = (2, users.seal(key, late, users.Secret(SECRET)))
    assert await cache.has_tenant("team-b") is True  # not watched yet: read from etcd
    assert await cache.has_tenant("team-c") is False
    assert await cache.has_tenant("team-d") is False
    assert reads == ["read"]  # one read per miss_ttl_s
    now[0] += 2.0
    assert await cache.has_tenant("team-c") is False
    assert reads == ["read", "read"]
