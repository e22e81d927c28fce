"""PutObject with a plain HTTP chunked body (no Content-Length): stored whole when it ends within
the single-PUT bound, EntityTooLarge and nothing stored (the write aborted) when it runs past it.
The bound is lowered to a few MiB here so that a test can cross it; the server runs in-process
over the component cluster's gateway front (test_s3_tenancy's fixture)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.gateway.s3 import object_ops
from tests.component import objects_cluster
from tests.component.test_s3_tenancy import s3 as s3_fixture  # noqa: F401

MIB = objects_cluster.MIB
BOUND = 3 * MIB + 5

S3 = tuple[objects_cluster.Cluster, aiohttp.ClientSession, str]


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def _put_chunked(s3: S3, path: str, data: bytes) -> tuple[int, bytes]:
    """PUT data as alice with Transfer-Encoding: chunked (aiohttp's for a generator body)."""
    _cluster, session, url = s3
    headers = {"x-test-user": "alice"}
    async with session.put(url + path, data=_pieces(data, 700 * 1024), headers=headers) as reply:
        assert reply.request_info.headers.get("Transfer-Encoding") == "chunked"
        return reply.status, await reply.read()


async def _get(s3: S3, path: str) -> tuple[int, bytes]:
    _cluster, session, url = s3
    async with session.get(url + path, headers={"x-test-user": "alice"}) as reply:
        return reply.status, await reply.read()


async def test_chunked_put_is_bounded_like_a_single_put(
    s3_fixture: S3,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(object_ops, "MAX_PUT_BYTES", BOUND)
    cluster, session, url = s3_fixture
    async with session.put(url + "/chunky", headers={"x-test-user": "alice"}) as created:
        assert created.status == 200
    exact = objects_cluster.data(1, BOUND)
    assert (await _put_chunked(s3_fixture, "/chunky/exact", exact))[0] == 200
    status, got = await _get(s3_fixture, "/chunky/exact")
    assert (status, hashlib.sha256(got).digest()) == (200, hashlib.sha256(exact).digest())

    status, text = await _put_chunked(s3_fixture, "/chunky/over", exact + b"!")
    assert status == 400
    assert b"<Code>EntityTooLarge</Code>" in text
    status, text = await _get(s3_fixture, "/chunky/over")
    assert (status, b"<Code>NoSuchKey</Code>" in text) == (404, True)
    assert cluster.front.engine.staged_writes("team-a") == 0  # the write was aborted

    short = objects_cluster.data(2, MIB + 3)
    assert (await _put_chunked(s3_fixture, "/chunky/short", short))[0] == 200
    status, got = await _get(s3_fixture, "/chunky/short")
    assert (status, hashlib.sha256(got).digest()) == (200, hashlib.sha256(short).digest())
