"""S3 users: kept by the metadata service in etcd (secrets sealed), read by gateways' caches,
managed with `kvtier admin user`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kvtier import devcluster, errors, etcdserver, masterkey, membership, users
from kvtier.cli import main as cli_main
from kvtier.clients import metadata as metadata_client
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import auth as s3_auth
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness

SECRET = "s3cret-Of-Forty-Chars/abcdefghijklmnopqr"


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their master key; one in the environment would be a silent fallback."""
    monkeypatch.delenv(masterkey.ENV_MASTER_KEY, raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    assert masterkey.write_new(path)
    return path


def _key(path: Path) -> masterkey.MasterKey:
    key = masterkey.load(str(path))
    assert key is not None
    return key


@contextlib.asynccontextmanager
async def _metadata(
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    key_file: Path | None,
) -> AsyncIterator[tuple[str, metadata_client.MetadataClient]]:
    """A metadata service in-process (with the master key of key_file), its address and a
    client of it."""
    async with (
        harness.run(
            metadata_config.MetadataConfig,
            "metadata",
            metadata_main.build,
            store,
            etcd_endpoints=(etcd.endpoint,),
            etcd_prefix=prefix,
            master_key_file=str(key_file) if key_file else "",
        ) as running,
        metadata_client.MetadataClient(running.address) as client,
    ):
        yield running.address, client


async def _raw(store: membership.EtcdMembership, access_key: str) -> bytes | None:
    key = f"{store.prefix}/users/{access_key}".encode()
    kv = await store.call(lambda client: client.get(key))
    return None if kv is None else bytes(kv.value)


async def _put_raw(store: membership.EtcdMembership, access_key: str, value: bytes) -> None:
    key = f"{store.prefix}/users/{access_key}".encode()
    await store.call(lambda client: client.put(key, value))


async def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll check until it holds (the watch delivers in moments; never a fixed sleep)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def test_create_get_list_delete_round_trip(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    key_file: Path,
) -> None:
    user_store = users.UserStore(store, _key(key_file))
    async with _metadata(etcd, etcd_prefix, store, key_file) as (_address, client):
        assert await client.list_users() == []
        generated = await client.create_user(tenant="team-a", display_name="Ann")
        assert len(generated.access_key) == 20
        assert len(generated.secret.reveal()) == 40
        assert (generated.tenant, generated.display_name, generated.is_admin) == (
            "team-a",
            "Ann",
            False,
        )
        chosen = await client.create_user(
            is_admin=True, access_key="admin.key", secret=users.Secret(SECRET)
        )
        assert chosen.tenant == "default"
        assert chosen.secret.reveal() == SECRET

        # etcd holds the record, never the secret in plaintext.
        for user in (generated, chosen):
            raw = await _raw(store, user.access_key)
            assert raw is not None
            assert user.secret.reveal().encode() not in raw
            record = metadata_pb2.UserRecord.FromString(raw)
            assert record.master_key_id == _key(key_file).key_id
            assert (await user_store.get(user.access_key)).secret.reveal() == (user.secret.reveal())
            assert (await user_store.get(user.access_key)).info == user.info

        everyone = await client.list_users()
        assert everyone == sorted([generated.info, chosen.info], key=lambda u: u.access_key)
        assert await client.list_users(tenant="team-a") == [generated.info]
        assert await client.list_users(tenant="nobody") == []

        await client.delete_user("admin.key")
        assert await _raw(store, "admin.key") is None
        with pytest.raises(errors.NotFound):
            await user_store.get("admin.key")
        with pytest.raises(errors.NotFound):
            await client.delete_user("admin.key")
        assert await client.list_users() == [generated.info]


async def test_duplicate_and_bad_requests(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    key_file: Path,
) -> None:
    async with _metadata(etcd, etcd_prefix, store, key_file) as (_address, client):
        first = await client.create_user(access_key="taken", secret=users.Secret(SECRET))
        with pytest.raises(errors.AlreadyExists):
            await client.create_user(access_key="taken", secret=users.Secret("other-secret"))
        stored = await users.UserStore(store, _key(key_file)).get("taken")
        assert stored.secret.reveal() == first.secret.reveal()  # the first one stays

        bad = [
            {"access_key": "a/b", "secret": users.Secret(SECRET)},
            {"access_key": "ab", "secret": users.Secret(SECRET)},
            {"access_key": "only-the-key"},
            {"secret": users.Secret(SECRET)},
            {"access_key": "weak", "secret": users.Secret("short")},
            {"tenant": "bad tenant"},
        ]
        for kwargs in bad:
            with pytest.raises(errors.InvalidArgument) as caught:
                await client.create_user(**kwargs)  # type: ignore[arg-type]
            assert SECRET not in caught.value.message
        with pytest.raises(errors.InvalidArgument):
            await client.delete_user("../buckets/x")
        assert [u.access_key for u in await client.list_users()] == ["taken"]


async def test_without_a_master_key_users_are_refused_but_the_service_runs(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership
) -> None:
    async with _metadata(etcd, etcd_prefix, store, None) as (_address, client):
        with pytest.raises(errors.PreconditionFailed, match="master key"):
            await client.create_user(tenant="team-a")
        assert await client.list_users() == []
        assert await client.list_buckets() == []  # everything else works
    cache = users.UserCache(store, None)
    await cache.run()  # returns at once
    assert await cache.get("anything") is None


async def test_cache_sees_creates_and_deletes_through_the_watch(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    key_file: Path,
) -> None:
    user_store = users.UserStore(store, _key(key_file))
    before = await user_store.create(
        tenant="early", access_key="early", secret=users.Secret(SECRET)
    )
    cache = users.UserCache(store, _key(key_file))
    watching = asyncio.create_task(cache.run())
    try:
        async with asyncio.timeout(10):
            await cache.wait_synced()
        cached = cache.cached("early")
        assert cached is not None
        assert cached.secret.reveal() == before.secret.reveal()

        created = await user_store.create(tenant="team-b", is_admin=True)
        # The watch delivers it: memory holds it without anyone asking etcd for it.
        await _until(lambda: cache.cached(created.access_key) is not None)
        seen = await cache.get(created.access_key)
        assert seen is not None
        assert seen.secret.reveal() == created.secret.reveal()
        assert seen.info == created.info

        await user_store.delete(created.access_key)
        await _until(lambda: cache.cached(created.access_key) is None)
        assert await cache.get(created.access_key) is None
        assert await cache.get("early") is not None
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def test_cache_without_a_watch_reads_etcd_and_forgets_after_the_ttl(
    store: membership.EtcdMembership, key_file: Path
) -> None:
    now = [1000.0]
    user_store = users.UserStore(store, _key(key_file))
    cache = users.UserCache(store, _key(key_file), ttl_s=5.0, miss_ttl_s=1.0, clock=lambda: now[0])
    assert await cache.get("late-user") is None
    created = await user_store.create(access_key="late-user", secret=users.Secret(SECRET))
    assert await cache.get("late-user") is None  # the miss is remembered for miss_ttl_s
    now[0] += 1.5
    found = await cache.get("late-user")
    assert found is not None
    assert found.secret.reveal() == created.secret.reveal()
    await user_store.delete("late-user")
    assert await cache.get("late-user") is not None  # remembered for ttl_s
    now[0] += 5.5
    assert await cache.get("late-user") is None
    assert await cache.get("not/valid") is None  # never reaches etcd


async def test_records_that_do_not_open_are_skipped(
    store: membership.EtcdMembership, key_file: Path
) -> None:
    key = _key(key_file)
    user_store = users.UserStore(store, key)
    good = await user_store.create(access_key="good-user", secret=users.Secret(SECRET))
    victim = await _raw(store, "good-user")
    assert victim is not None
    await _put_raw(store, "garbage", b"\xff\x00 not a record")
    await _put_raw(store, "copied", victim)  # another user's record under a new key
    foreign = masterkey.MasterKey.generate()
    await users.UserStore(store, foreign).create(access_key="foreign", secret=users.Secret(SECRET))

    for use_watch in (True, False):
        cache = users.UserCache(store, key)
        watching = asyncio.create_task(cache.run()) if use_watch else None
        try:
            if watching is not None:
                async with asyncio.timeout(10):
                    await cache.wait_synced()
            for unusable in ("garbage", "copied", "foreign"):
                assert await cache.get(unusable) is None, unusable
            found = await cache.get("good-user")
            assert found is not None
            assert found.secret.reveal() == good.secret.reveal()
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
    with pytest.raises(errors.PreconditionFailed):
        await user_store.get("foreign")
    with pytest.raises(errors.Corrupt):
        await user_store.get("copied")
    listed = [u.access_key for u in await user_store.list_all()]
    assert listed == ["foreign", "good-user"]  # the unparsable records are left out


async def _cli(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    """Run `kvtier ...` in a thread (it runs its own event loop); (exit code, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO(stdin)
        try:
            code = cli_main.main(list(argv))
        finally:
            sys.stdout, sys.stderr, sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


async def test_cli_add_list_remove(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    key_file: Path,
    tmp_path: Path,
) -> None:
    user_store = users.UserStore(store, _key(key_file))
    async with _metadata(etcd, etcd_prefix, store, key_file) as (address, _client):
        # --json: the keys as JSON, the secret in it this once.
        code, out, err = await _cli(
            "admin", "user", "add", "--tenant", "team-c", "--name", "Cy", "--json",
            "--metadata", address,
        )  # fmt: skip
        assert code == 0, err
        added = json.loads(out)
        stored = await user_store.get(added["access_key"])
        assert added["secret_key"] == stored.secret.reveal()
        assert (added["tenant"], added["display_name"], added["is_admin"]) == (
            "team-c",
            "Cy",
            False,
        )

        # Through the dev cluster's cluster.json; the secret from stdin; text output.
        state = tmp_path / "state"
        state.mkdir()
        (state / "cluster.json").write_text(json.dumps({"metadata": address}))
        code, out, err = await _cli(
            "admin", "user", "add", "--admin", "--access-key", "chosen-key", "--secret", "-",
            "--trust-shm", "--state-dir", str(state), stdin=SECRET + "\n",
        )  # fmt: skip
        assert code == 0, err
        assert "access key  chosen-key" in out
        assert f"secret key  {SECRET}" in out
        assert "(trusted for shared memory)" in out
        chosen = await user_store.get("chosen-key")
        assert (chosen.is_admin, chosen.shm_trusted) == (True, True)
        assert not (await user_store.get(added["access_key"])).shm_trusted

        code, out, err = await _cli("admin", "user", "list", "--json", "--metadata", address)
        assert code == 0, err
        listed = json.loads(out)
        assert sorted(u["access_key"] for u in listed) == sorted(
            [added["access_key"], "chosen-key"]
        )
        assert not [u for u in listed if "secret_key" in u]
        assert {u["access_key"]: u["shm_trusted"] for u in listed} == {
            added["access_key"]: False,
            "chosen-key": True,
        }
        assert SECRET not in out
        assert added["secret_key"] not in out
        code, out, err = await _cli(
            "admin", "user", "list", "--tenant", "team-c", "--state-dir", str(state)
        )
        assert code == 0, err
        header, row = out.splitlines()
        assert header.split() == ["ACCESS", "KEY", "TENANT", "NAME", "RIGHTS"]
        assert row.split() == [added["access_key"], "team-c", "Cy", "-"]

        code, out, err = await _cli("admin", "user", "remove", "chosen-key", "--metadata", address)
        assert (code, out) == (0, "removed chosen-key\n"), err
        code, out, err = await _cli("admin", "user", "remove", "chosen-key", "--metadata", address)
        assert code == 1
        assert "does not exist" in err
        code, out, err = await _cli(
            "admin", "user", "add", "--access-key", added["access_key"], "--secret", SECRET,
            "--metadata", address,
        )  # fmt: skip
        assert code == 1
        assert "already exists" in err
        assert [u.access_key for u in await user_store.list_all()] == [added["access_key"]]

    code, _out, err = await _cli("admin", "user", "list", "--state-dir", str(tmp_path / "none"))
    assert code == 1
    assert "--metadata" in err


async def test_dev_cluster_admin_is_created_once_and_replaced_when_stale(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    creds = devcluster.credentials(state)

    async def ensure(key_file: Path) -> users.User:
        async with _metadata(etcd, etcd_prefix, store, key_file) as (address, _client):
            user_store = users.UserStore(store, _key(key_file))
            first = await devcluster.ensure_admin(address, user_store, creds)
            again = await devcluster.ensure_admin(address, user_store, creds)  # a restart
            assert again.info == first.info  # the same user, not created anew
            return first

    first_key = tmp_path / "first.key"
    masterkey.write_new(first_key)
    admin = await ensure(first_key)
    assert (admin.access_key, admin.secret.reveal()) == (creds["access_key"], creds["secret_key"])
    assert admin.is_admin
    assert admin.tenant == "default"

    # A new master key: the stored admin no longer opens, so it is replaced.
    second_key = tmp_path / "second.key"
    masterkey.write_new(second_key)
    await ensure(second_key)
    replaced = await users.UserStore(store, _key(second_key)).get(creds["access_key"])
    assert replaced.secret.reveal() == creds["secret_key"]


async def test_the_gateways_secret_lookup_opens_users_of_the_metadata_service(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    key_file: Path,
) -> None:
    lookup = s3_auth.user_lookup(s3_auth.user_cache(store, str(key_file)))
    async with _metadata(etcd, etcd_prefix, store, key_file) as (_address, client):
        user = await client.create_user(tenant="team-d", display_name="Di", is_admin=True)
        found = await lookup(user.access_key)
        assert found is not None
        principal, secret = found
        assert secret == user.secret.reveal()
        assert (principal.access_key, principal.tenant, principal.is_admin) == (
            user.access_key,
            "team-d",
            True,
        )
    assert await lookup("NOSUCHKEY0000") is None
    no_key = s3_auth.user_lookup(s3_auth.user_cache(store, ""))
    assert await no_key(user.access_key) is None  # no master key
