"""Erasure sets of any shape take large objects: 2 datanodes x 2 drives (RS 2+2).

With k = 2 one gateway call carries 15 stripes, so 15 MiB for each shard, while a datanode
takes at most one staging slot (8 MiB here, its default) per WRITE_SHARD call: the gateway
splits a shard's bytes into calls that fit (`Datanodes.write_shard`). Before, a 64 MiB PUT
failed on this shape. Over S3 (in-process, a header authenticator as in test_s3_tenancy) and
the object SDK, byte-exact, whole and ranged; and a shard rebuilt after its drive lost it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import test_utils, web

from kvtier import etcdserver, membership, objects
from services.datanode import shards
from services.gateway.s3 import auth, body
from services.gateway.s3 import server as s3_server
from tests.component import objects_cluster


def _files(where: Path) -> dict[Path, bytes]:
    """Every file below where, its bytes; a meta without the drive's store stamp (a rebuilt
    copy is stamped when its drive stored it: all else is as it was)."""
    found = {}
    for f in sorted(where.rglob("*")):
        if f.is_file():
            found[f] = f.read_bytes()
            if f.name == "meta":
                meta = shards.decode_meta(found[f], str(f))
                meta.stored_unix_ns = 0
                found[f] = meta.SerializeToString(deterministic=True)
    return found


MIB = objects_cluster.MIB
SIZE = 64 * MIB
ADMIN = auth.Principal("AKROOT", "ops", "root", is_admin=True)


class _AdminAuth(auth.Authenticator):
    """Every request is the admin's (SigV4 is tested elsewhere)."""

    def __init__(self) -> None:
        super().__init__(self._none)

    @staticmethod
    async def _none(access_key: str) -> tuple[auth.Principal, str] | None:
        return None

    async def authenticate(self, http: web.Request) -> tuple[auth.Principal, body.Payload]:
        size = http.content_length if http.content_length is not None else -1
        return ADMIN, body.Payload(http.content, size=size)


@pytest.fixture
async def small(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[objects_cluster.Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, datanodes=2, drives_per_node=2
    ) as cluster:
        es = cluster.gateway.ctx.map_view.current.pools[0].sets[0]
        assert (es.data_shards, es.parity_shards, len(es.slots)) == (2, 2, 4)
        yield cluster


@pytest.mark.timeout(180)
async def test_64_mib_over_s3_on_a_2_plus_2_set_is_byte_exact(
    small: objects_cluster.Cluster,
) -> None:
    data = objects_cluster.data(64, SIZE)
    server = s3_server.S3Server(small.front, _AdminAuth())
    test_server = test_utils.TestServer(server.app())
    await test_server.start_server()
    url = str(test_server.make_url("/")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{url}/small") as made:
                assert made.status == 200, await made.text()
            async with session.put(f"{url}/small/big", data=data) as put:
                assert put.status == 200, await put.text()
                assert put.headers["ETag"].strip('"') == hashlib.md5(data).hexdigest()
            async with session.get(f"{url}/small/big") as got:
                assert got.status == 200
                assert hashlib.sha256(await got.read()).digest() == hashlib.sha256(data).digest()
            first, last = 15 * MIB - 3, 47 * MIB + 5  # across calls and shard-call splits
            headers = {"Range": f"bytes={first}-{last}"}
            async with session.get(f"{url}/small/big", headers=headers) as ranged:
                assert ranged.status == 206
                assert await ranged.read() == data[first : last + 1]
    finally:
        await server.close()
        await test_server.close()


@pytest.mark.timeout(180)
async def test_64_mib_over_the_sdk_on_a_2_plus_2_set_survives_a_rebuild(
    small: objects_cluster.Cluster,
) -> None:
    data = objects_cluster.data(65, SIZE)
    async with await objects.AsyncObjectClient.connect(small.gateway.address) as client:
        await client.create_bucket("sdk")
        info = await client.put_object("sdk", "big", data)
        assert info.etag == hashlib.md5(data).hexdigest()
        assert await client.get_object("sdk", "big") == data
        # Lose one drive's shard: the heal rebuilds it with WRITE_SHARD calls as large as a
        # PUT's, which must fit the datanode's slot too; the rebuilt files are the lost ones.
        digest = hashlib.sha256(b"big").hexdigest()
        where = Path("objects") / small.stored("sdk") / digest[:2] / digest
        dirs = [d / where for d in sorted(small.tmp.glob("dn*/drive*")) if (d / where).is_dir()]
        assert len(dirs) == 4, dirs
        lost = _files(dirs[0])
        shutil.rmtree(dirs[0])
        result = await small.healer.heal_object(small.stored("sdk"), "big")
        assert result.shards == 1, result
        assert _files(dirs[0]) == lost
        assert await client.get_object("sdk", "big") == data
