"""Issue 5's acceptance on a real dev cluster (`kvtier up --detach`: etcd, metadata, 6 datanodes x
2 drives = one RS 8+4 set, a gateway and a kvcache node, all subprocesses), through the SDK:

- with m = 2 datanodes (4 of 12 drives) stopped every read is byte-exact; one more stopped and
  every read fails with Unavailable, never with wrong bytes; revived, reads work again;
- a datanode SIGKILLed amid 50 PUTs of one key: every GET returns a whole written version;
- listings of many keys (prefixes, delimiters, start-after, pages of odd sizes) equal a model;
- a wiped drive (SIGKILLed node, objects and index gone) is rebuilt whole by `kvtier admin heal`;
- flipped bytes in a data shard: the GET is exact and the shard file is rewritten.
Every test logs its seed (KVTIER_TEST_SEED replays it) and compares the bytes it reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import numpy as np
import pytest

from kvtier import errors, membership, objects
from kvtier.proto.common.v1 import common_pb2
from services.datanode import shards
from tests.integration import s3_cluster
from tests.integration.conftest import (
    cluster_security,
    dump_logs,
    kvtier_cmd,
    pid_alive,
    user_security,
)

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024 * 1024
LEASE_TTL_S = 2
DATANODES = [f"datanode-{i}" for i in range(1, 7)]
ONLINE = common_pb2.DRIVE_STATE_ONLINE


def _seed(test: str) -> int:
    seed = int(os.environ.get("KVTIER_TEST_SEED") or random.randrange(2**32))
    log.info("%s: seed=%d (rerun with KVTIER_TEST_SEED=%d)", test, seed, seed)
    return seed


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def module_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The state dir of the module's detached dev cluster (one kvcache node), stopped after the
    module: every test leaves it whole (it revives what it stops, and each keeps to its own
    bucket), and a cluster's start and stop cost 15-25 s each on a 2-core machine."""
    state = tmp_path_factory.mktemp("objects") / "state"
    up = kvtier_cmd(
        "up", "--state-dir", str(state), "--detach", "--kvcache-nodes", "1",
        "--lease-ttl-s", str(LEASE_TTL_S), "--shutdown-grace-s", "2", timeout_s=150,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr + dump_logs(state)
    try:
        yield state
    finally:
        kvtier_cmd("down", "--state-dir", str(state), timeout_s=90)


@pytest.fixture
def state_dir(module_state: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The module cluster's state dir; its logs are printed when the test fails."""
    yield module_state
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(dump_logs(module_state))


@pytest.fixture
def cluster(state_dir: Path) -> dict[str, Any]:
    """cluster.json's content as of this test (a revive records new pids), with "user" and
    "operator": how to connect as the admin user and as the operator. Every drive is online
    when the test starts (what a test that failed half-way left down is revived first)."""

    def read() -> dict[str, Any]:
        info: dict[str, Any] = json.loads((state_dir / "cluster.json").read_text())
        # Users reach the gateway's client port with the admin's keys, the operator etcd.
        info["user"], info["operator"] = user_security(state_dir), cluster_security(state_dir)
        return info

    info = read()
    if any(s.state != ONLINE for s in _slots(info)):
        _revive(info, state_dir)
        info = read()
    return info


# The cluster map and processes.


def _slots(info: dict[str, Any]) -> list[common_pb2.DriveSlot]:
    async def read() -> list[common_pb2.DriveSlot]:
        store = membership.EtcdMembership(
            (info["etcd"],), info["etcd_prefix"], security=info["operator"]
        )
        await store.connect(wait_s=5)
        try:
            cmap = (await store.get_map()).map
            return [s for pool in cmap.pools for es in pool.sets for s in es.slots]
        finally:
            await store.close()

    return asyncio.run(read())


def _wait_down(info: dict[str, Any], nodes: set[str], timeout_s: float = 30) -> None:
    """Until exactly the drives of `nodes` are offline in the map (and every other online)."""
    deadline = time.monotonic() + timeout_s
    while True:
        slots = _slots(info)
        down = {s.node_id for s in slots if s.state != ONLINE}
        if down == nodes and len([s for s in slots if s.state != ONLINE]) == 2 * len(nodes):
            return
        assert time.monotonic() < deadline, f"offline in the map: {down}, want {nodes}"
        time.sleep(0.1)


def _pid(info: dict[str, Any], name: str) -> int:
    return int(next(n["pid"] for n in info["nodes"] if n["name"] == name))


def _signal(info: dict[str, Any], name: str, signum: signal.Signals) -> None:
    """Send a signal to a datanode (as started by `up`) and wait for it to be gone."""
    pid = _pid(info, name)
    os.kill(pid, signum)
    deadline = time.monotonic() + 20
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"{name} (pid {pid}) still runs after {signum!r}"
        time.sleep(0.05)


def _revive(info: dict[str, Any], state_dir: Path) -> None:
    result = kvtier_cmd("revive", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    _wait_down(info, set())


def _eventually(check: Callable[[], None], timeout_s: float = 20) -> None:
    """Run check until it passes; only Unavailable may be raised meanwhile (the gateway may not
    see a revived node's new address at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# 1. Reads through m lost drives, a clean failure beyond, recovery.

SIZES = [0, 1, 4 * KIB, 128 * KIB - 1, 128 * KIB, 128 * KIB + 1, MIB, 9 * MIB + 3]


def _read_all(
    client: objects.ObjectClient, bucket: str, objs: dict[str, bytes], rng: random.Random
) -> None:
    """Every object whole and in two random ranges, compared byte for byte."""
    for key, data in objs.items():
        got = client.get_object(bucket, key)
        assert _sha(got) == _sha(data), f"{key}: {len(got)} bytes differ from {len(data)} written"
        for _ in range(2 if data else 0):
            start = rng.randrange(len(data))
            length = rng.randrange(1, len(data) - start + 1)
            part = client.get_object(bucket, key, offset=start, length=length)
            assert part == data[start : start + length], (key, start, length)


@pytest.mark.timeout(240)
def test_reads_survive_m_stopped_datanodes_fail_cleanly_beyond_and_recover(
    cluster: dict[str, Any], state_dir: Path
) -> None:
    seed = _seed("quorum")
    rng = random.Random(seed)
    objs = {
        f"sizes/{rng.getrandbits(32):08x}/{size}": _data(seed + i, size)
        for i, size in enumerate(SIZES)
    }
    victims = rng.sample(DATANODES, 3)
    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as client:
        client.create_bucket("quorum")
        for key, data in objs.items():
            info = client.put_object("quorum", key, data)
            assert info.etag == hashlib.md5(data).hexdigest()
        _read_all(client, "quorum", objs, rng)

        for name in victims[:2]:  # m = 2 datanodes: 4 of the 12 drives
            _signal(cluster, name, signal.SIGTERM)
        _wait_down(cluster, set(victims[:2]))
        _read_all(client, "quorum", objs, rng)

        _signal(cluster, victims[2], signal.SIGTERM)  # 6 drives left, 8 needed
        _wait_down(cluster, set(victims))
        for key, data in objs.items():
            with pytest.raises(errors.Unavailable):
                client.get_object("quorum", key)
            if data:
                with pytest.raises(errors.Unavailable):
                    client.get_object_into("quorum", key, bytearray(len(data)))

        _revive(cluster, state_dir)
        _eventually(lambda: _read_all(client, "quorum", objs, rng))
        _read_all(client, "quorum", objs, rng)


# 2. SIGKILL amid PUTs of one key.

PUTS = 50
KILL_AFTER = 20
PUT_CONCURRENCY = 4


class _Writer(threading.Thread):
    """PUTs every version of one key from its own event loop, PUT_CONCURRENCY at a time;
    records (version, error or None) as each finishes and sets `halfway` after KILL_AFTER."""

    def __init__(
        self, cluster: dict[str, Any], bucket: str, key: str, versions: list[bytes]
    ) -> None:
        super().__init__(daemon=True)
        self.gateway, self.security = cluster["gateway_grpc"], cluster["user"]
        self.bucket, self.key, self.versions = bucket, key, versions
        self.done: list[tuple[int, BaseException | None]] = []
        self.halfway = threading.Event()
        self.crash: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.crash = exc
        finally:
            self.halfway.set()

    async def _main(self) -> None:
        gate = asyncio.Semaphore(PUT_CONCURRENCY)
        async with await objects.AsyncObjectClient.connect(
            self.gateway, security=self.security
        ) as client:

            async def put(i: int) -> None:
                async with gate:
                    try:
                        await client.put_object(self.bucket, self.key, self.versions[i])
                        self.done.append((i, None))
                    except errors.KVTierError as exc:
                        self.done.append((i, exc))
                    if len(self.done) >= KILL_AFTER:
                        self.halfway.set()

            await asyncio.gather(*(put(i) for i in range(len(self.versions))))


@pytest.mark.timeout(240)
def test_sigkill_amid_puts_of_one_key_leaves_only_whole_versions(
    cluster: dict[str, Any], state_dir: Path
) -> None:
    seed = _seed("sigkill")
    rng = random.Random(seed)
    # Inline objects (<= 128 KiB, in the meta file) and erasure-coded ones, one or more stripes.
    sizes = [
        rng.randrange(1, 128 * KIB) if rng.random() < 0.3 else rng.randrange(MIB, 10 * MIB)
        for _ in range(PUTS)
    ]
    versions = [_data(seed + 1000 + i, size) for i, size in enumerate(sizes)]
    written = {_sha(v): i for i, v in enumerate(versions)}
    assert len(written) == PUTS
    victim = rng.choice(DATANODES)
    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as setup:
        setup.create_bucket("race")
    writer = _Writer(cluster, "race", "same", versions)
    writer.start()
    assert writer.halfway.wait(150), "the PUTs did not get halfway"
    assert writer.crash is None, writer.crash
    completed_before_kill = len(writer.done)
    _signal(cluster, victim, signal.SIGKILL)
    assert completed_before_kill < PUTS - PUT_CONCURRENCY, "the kill came after the PUTs"
    writer.join(150)
    assert not writer.is_alive(), f"PUTs still running: {len(writer.done)} of {PUTS} done"
    assert writer.crash is None, writer.crash
    log.info("killed %s after %d PUTs completed", victim, completed_before_kill)
    assert len(writer.done) == PUTS
    # 10 of 12 drives stay up: above the write quorum (8), so every PUT succeeds.
    failed = [(i, e) for i, e in writer.done if e is not None]
    assert not failed, failed

    def whole_version() -> bytes:
        got: bytes = client.get_object("race", "same")
        assert _sha(got) in written, f"GET returned {len(got)} bytes that no PUT wrote"
        head = client.head_object("race", "same")
        assert head.etag == hashlib.md5(got).hexdigest()
        assert head.size == len(got)
        start = rng.randrange(len(got))
        assert client.get_object("race", "same", offset=start, length=4096) == got[start:][:4096]
        return got

    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as client:
        current = whole_version()
        for _ in range(3):
            assert whole_version() == current
        # The killed node's drives come back with older versions (or staged leftovers): the
        # version a read quorum agrees on still wins.
        _revive(cluster, state_dir)
        _eventually(lambda: None if whole_version() == current else pytest.fail("changed"))
        assert whole_version() == current
        log.info("the key holds version %d of %d", written[_sha(current)], PUTS)


# 3. Listing many keys against a sorted model.

TOPS = ["a", "a-b", "a.b", "a0", "b", "logs", "m", "models", "z~", "ü", "日本"]
MIDS = [f"d{i:02d}" for i in range(24)] + ["d1-x", "d1.x", ""]


def _key_set(rng: random.Random, count: int) -> list[str]:
    """Distinct keys over a few levels of '/' (with empty segments, keys ending in '/', no '/'
    at all, non-ASCII), so delimiters fold them in many ways."""
    keys: set[str] = set()
    while len(keys) < count:
        r, name = rng.random(), f"{rng.randrange(10**6):06d}"
        if r < 0.04:
            keys.add(f"{rng.choice(TOPS)}{name}")
        elif r < 0.06:
            keys.add(f"{rng.choice(TOPS)}/{rng.choice(MIDS)}/")
        else:
            keys.add(f"{rng.choice(TOPS)}/{rng.choice(MIDS)}/{name}.bin")
    return sorted(keys, key=str.encode)


def _model(
    keys: list[str], prefix: str = "", delimiter: str = "", start_after: str = ""
) -> list[tuple[str, bool]]:
    """S3 ListObjectsV2 over sorted keys: (key or common prefix, is_prefix) in order."""
    entries: list[tuple[str, bool]] = []
    for key in keys:
        if not key.startswith(prefix) or key.encode() <= start_after.encode():
            continue
        at = key.find(delimiter, len(prefix)) if delimiter else -1
        if at < 0:
            entries.append((key, False))
            continue
        folded = key[: at + len(delimiter)]
        if not entries or entries[-1] != (folded, True):
            entries.append((folded, True))
    return entries


def _listed(
    client: objects.ObjectClient,
    bucket: str,
    contents: dict[str, bytes],
    max_keys: int,
    prefix: str = "",
    delimiter: str = "",
    start_after: str = "",
) -> list[tuple[str, bool]]:
    """Every page, each checked for its size and every object's size and ETag."""
    entries: list[tuple[str, bool]] = []
    token = ""
    while True:
        page = client.list_objects(
            bucket, prefix=prefix, delimiter=delimiter, start_after=start_after,
            continuation_token=token, max_keys=max_keys,
        )  # fmt: skip
        got = [(o.key, False) for o in page.objects] + [(p, True) for p in page.common_prefixes]
        got.sort(key=lambda e: e[0].encode())
        assert len(got) == max_keys if page.is_truncated else len(got) <= max_keys
        for o in page.objects:
            assert (o.size, o.etag) == (len(contents[o.key]), _md5(contents[o.key])), o.key
        entries += got
        if not page.is_truncated:
            return entries
        token = page.next_continuation_token


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def _put_all(cluster: dict[str, Any], bucket: str, contents: dict[str, bytes]) -> None:
    async with await objects.AsyncObjectClient.connect(
        cluster["gateway_grpc"], security=cluster["user"]
    ) as client:
        await client.create_bucket(bucket)
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in contents.items():
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                key, data = queue.get_nowait()
                await client.put_object(bucket, key, data)

        await asyncio.gather(*(worker() for _ in range(24)))


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(1_200, id="1200-keys", marks=pytest.mark.timeout(240)),
        pytest.param(20_000, id="20k-keys", marks=[pytest.mark.slow, pytest.mark.timeout(1200)]),
    ],
)
def test_listing_matches_a_sorted_model_page_by_page(cluster: dict[str, Any], count: int) -> None:
    seed = _seed(f"listing-{count}")
    rng = random.Random(seed)
    keys = _key_set(rng, count)
    contents = {k: k.encode()[: rng.randrange(0, 12)] for k in keys}
    started = time.monotonic()
    asyncio.run(_put_all(cluster, "listing", contents))
    log.info("%d PUTs in %.1f s", count, time.monotonic() - started)
    started = time.monotonic()

    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as client:
        for key in rng.sample(keys, 20):
            assert client.get_object("listing", key) == contents[key]

        def check(max_keys: int, prefix: str = "", delimiter: str = "", after: str = "") -> None:
            want = _model(keys, prefix, delimiter, after)
            got = _listed(client, "listing", contents, max_keys, prefix, delimiter, after)
            where = f"max_keys={max_keys} prefix={prefix!r} delimiter={delimiter!r} after={after!r}"
            assert len(got) == len(want), where
            assert got == want, where

        check(1000)
        check(137)
        check(1000, delimiter="/")
        check(3, delimiter="/")
        check(137, delimiter="-")
        for top in rng.sample(TOPS, 4):
            check(rng.choice([1, 7, 137, 1000]), prefix=f"{top}/", delimiter="/")
            check(137, prefix=f"{top}/")
            mid = rng.choice(MIDS)
            check(rng.choice([5, 137]), prefix=f"{top}/{mid}")
        check(137, prefix="a")
        check(1000, prefix="no-such-prefix/")
        check(137, after=rng.choice(keys))
        check(137, after=f"{rng.choice(TOPS)}/{rng.choice(MIDS)}/5")  # between keys
        check(1000, after=keys[-1])
        # Deleted keys leave the listing.
        for key in rng.sample(keys, 10):
            client.delete_object("listing", key)
            keys.remove(key)
        check(137)
        check(1000, delimiter="/")
    log.info("listings checked in %.1f s", time.monotonic() - started)


# 4. A wiped drive, rebuilt whole by `kvtier admin heal`.


@pytest.mark.timeout(300)
def test_a_wiped_drive_is_rebuilt_by_admin_heal(cluster: dict[str, Any], state_dir: Path) -> None:
    seed = _seed("wiped")
    rng = random.Random(seed)
    sizes = [0, 1, 100 * KIB, MIB + 1, 9 * MIB + 7, *(rng.randrange(2 * MIB) for _ in range(5))]
    objs = {f"w/{i:02d}": _data(seed + i, size) for i, size in enumerate(sizes)}
    victim = rng.choice(DATANODES)
    drive = state_dir / "nodes" / victim / "drive0"
    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as client:
        client.create_bucket("wipe")
        for key, data in objs.items():
            client.put_object("wipe", key, data)
        # And a multipart object (its parts hard-linked into place on every drive).
        upload = client.create_multipart_upload("wipe", "w/multi")
        parts = [_data(seed + 99, 5 * MIB), _data(seed + 98, 3 * MIB + 5)]
        infos = [
            client.upload_part("wipe", "w/multi", upload, n, p) for n, p in enumerate(parts, 1)
        ]
        client.complete_multipart_upload("wipe", "w/multi", upload, infos)
        objs["w/multi"] = b"".join(parts)
        before = {p.relative_to(drive): p.read_bytes() for p in drive.glob("objects/wipe@*/**/*")
                  if p.is_file()}  # fmt: skip
        assert len([p for p in before if p.name == "meta"]) == len(objs)
        _signal(cluster, victim, signal.SIGKILL)
        shutil.rmtree(drive / "objects")
        for index_file in (drive / ".kvtier").glob("index*.sqlite*"):
            index_file.unlink()
        _revive(cluster, state_dir)
        # The gateway may not reach the revived node at once: its objects are then skipped
        # and queued (its heal queue may mend some meanwhile); a later run heals the rest.
        deadline = time.monotonic() + 120
        while True:
            heal = kvtier_cmd("admin", "heal", "wipe", "--state-dir", str(state_dir), timeout_s=240)
            found = re.search(r"scanned (\d+), healed (\d+), unrecoverable (\d+)", heal.stdout)
            assert found, heal.stdout + heal.stderr
            assert (int(found[1]), int(found[3])) == (len(objs), 0), heal.stdout
            if "skipped" not in heal.stdout:
                assert heal.returncode == 0, heal.stdout + heal.stderr
                break
            assert time.monotonic() < deadline, heal.stdout + dump_logs(state_dir)
            time.sleep(1)
        after = {p.relative_to(drive): p.read_bytes() for p in drive.glob("objects/wipe@*/**/*")
                 if p.is_file()}  # fmt: skip
        # Every shard file is back with the same bytes (metas carry the same version).
        assert {p for p in after if p.name != "meta"} == {p for p in before if p.name != "meta"}
        for path, raw in before.items():
            if path.name != "meta":
                assert after[path] == raw, path
        assert {p for p in after if p.name == "meta"} == {p for p in before if p.name == "meta"}
        again = kvtier_cmd("admin", "heal", "wipe", "--state-dir", str(state_dir), timeout_s=120)
        assert f"scanned {len(objs)}, healed 0, unrecoverable 0" in again.stdout, again.stdout
        _read_all(client, "wipe", objs, rng)


# 5. Flipped bytes in a shard file: the read is still exact and the shard is rewritten.


@pytest.mark.timeout(180)
def test_flipped_bytes_are_read_exactly_and_the_shard_rewritten(
    cluster: dict[str, Any], state_dir: Path
) -> None:
    seed = _seed("flip")
    rng = random.Random(seed)
    data = _data(seed, 5 * MIB + 3)
    with objects.ObjectClient.connect(cluster["gateway_grpc"], security=cluster["user"]) as client:
        client.create_bucket("flip")
        client.put_object("flip", "obj", data)
        files = sorted(state_dir.glob("nodes/*/drive*/objects/flip@*/*/*/*/part.1"))
        assert len(files) == 12
        # A data shard (parity is not read by a healthy GET).
        data_files = [
            f
            for f in files
            if shards.decode_meta((f.parent.parent / "meta").read_bytes(), str(f)).shard_index < 8
        ]
        victim = rng.choice(data_files)
        original = victim.read_bytes()
        damaged = bytearray(original)
        at = rng.randrange(len(damaged) - 16)
        damaged[at : at + 16] = bytes(b ^ 0xFF for b in damaged[at : at + 16])
        victim.write_bytes(bytes(damaged))
        assert _sha(client.get_object("flip", "obj")) == _sha(data)
        deadline = time.monotonic() + 60
        while victim.read_bytes() != original:  # the gateway's heal queue rewrites it
            assert time.monotonic() < deadline, f"{victim} was not rewritten"
            time.sleep(0.2)
        assert _sha(client.get_object("flip", "obj")) == _sha(data)
    # Bytes flipped in more shards than parity covers: the S3 GET answers a typed 503 before
    # any byte (SDKs retry it), never a 200 whose body stops short.
    for victim in files[:5]:
        damaged = bytearray(victim.read_bytes())
        damaged[:16] = bytes(b ^ 0xFF for b in damaged[:16])
        victim.write_bytes(bytes(damaged))
    s3 = s3_cluster.client(cluster)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3.get_object(Bucket="flip", Key="obj")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert refused.value.response["Error"]["Code"] == "ServiceUnavailable"
