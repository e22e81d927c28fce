"""Score over HTTP/JSON (issue 18; `services.gateway.s3.kv_score`): `POST /_kvtier/score` on the
gateway's HTTPS S3 port, signed with SigV4 by real users of a secure in-process cluster (the
probe suite's: tenant A's blocks in A's namespace), answers the chain's leading run per tier as
the SDK's `score` does; unsigned, wrongly signed or another tenant's requests are refused, and a
user naming nothing scores its own tenant (A's keys there: 0)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from kvtier import etcdserver
from services.gateway.s3 import kv_clients, kv_score
from tests import pki as test_pki
from tests.component import probe_cluster, probe_s3

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    etcd: etcdserver.EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[probe_cluster.World]:
    tmp = tmp_path_factory.mktemp("score")
    prefix = f"/kvtier-score-{uuid.uuid4().hex[:10]}"
    async with (
        probe_cluster.running(etcd, prefix, tmp) as cluster,
        probe_cluster.world(cluster) as made,
    ):
        yield made


def _body(world: probe_cluster.World, keys: list[bytes], **fields: Any) -> bytes:
    doc = {"namespace": world.namespace, **fields}
    return json.dumps({**doc, "keys": [base64.b64encode(k).decode() for k in keys]}).encode()


async def _post(
    world: probe_cluster.World,
    user: probe_cluster.User | None,
    body: bytes,
    *,
    method: str = "POST",
    sent: bytes | None = None,
) -> tuple[int, bytes]:
    """Status and body of a request to the score path signed by user (None: unsigned); sent:
    other bytes than the signed ones."""
    url = f"{world.cluster.s3_url}{kv_score.PATH}"
    prepared = probe_cluster.sign(user, method, url, body)
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            prepared.url,
            data=body if sent is None else sent,
            headers=dict(prepared.headers),
            ssl=probe_cluster.tls_context(),
        ) as response,
    ):
        return response.status, await response.read()


def _code(payload: bytes) -> str:
    return payload.partition(b"<Code>")[2].partition(b"</Code>")[0].decode()


@pytest.mark.timeout(120)
async def test_score_over_https_counts_the_signed_users_chain(
    world: probe_cluster.World,
) -> None:
    chain = list(world.blocks)
    status, payload = await _post(world, world.a, _body(world, chain))
    assert status == 200, payload
    assert json.loads(payload) == {"dram": len(chain), "durable": 0, "blocks": len(chain)}
    # The same answer as the SDK's Score; the run ends at the first absent key.
    assert (await world.a_kv.score(chain)).dram == len(chain)
    gap = [*chain[:2], b"absent-key", *chain[2:]]
    status, payload = await _post(world, world.a, _body(world, gap, tenant=world.a.tenant))
    assert (status, json.loads(payload)["dram"]) == (200, 2)
    status, payload = await _post(world, world.a, _body(world, []))
    assert (status, json.loads(payload)) == (200, {"dram": 0, "durable": 0, "blocks": 0})
    # An admin scores the tenant it names.
    status, payload = await _post(world, world.admin, _body(world, chain, tenant=world.a.tenant))
    assert (status, json.loads(payload)["blocks"]) == (200, len(chain))


@pytest.mark.timeout(120)
async def test_score_over_https_refuses_other_tenants_and_unsigned_callers(
    world: probe_cluster.World,
) -> None:
    chain = list(world.blocks)
    naming_a = probe_s3.score_body(world)
    status, payload = await _post(world, world.b, naming_a)
    assert (status, _code(payload)) == (403, "AccessDenied")
    assert b"dram" not in payload
    status, payload = await _post(world, None, naming_a)
    assert (status, _code(payload)) == (403, "AccessDenied")
    wrong = probe_cluster.User(
        world.a.access_key, "not-the-secret", world.a.tenant, world.a.security
    )
    status, payload = await _post(world, wrong, naming_a)
    assert (status, _code(payload)) == (403, "SignatureDoesNotMatch")
    # B naming nothing scores its own tenant: A's namespace and keys hold nothing there.
    status, payload = await _post(world, world.b, _body(world, chain))
    assert (status, json.loads(payload)["blocks"]) == (200, 0)
    # A body other than the signed one (B's own request turned into one naming A).
    own = probe_s3.score_body(world, tenant=world.b.tenant)
    forged = own.replace(world.b.tenant.encode(), world.a.tenant.encode())
    status, payload = await _post(world, world.b, own, sent=forged)
    assert (status, _code(payload)) == (400, "XAmzContentSHA256Mismatch")


@pytest.mark.timeout(120)
async def test_score_over_https_answers_bad_requests_with_s3_errors(
    world: probe_cluster.World,
) -> None:
    chain = list(world.blocks)
    cases = [
        (b"not json", "InvalidRequest"),
        (b"[1, 2]", "InvalidRequest"),
        (json.dumps({"namespace": world.namespace, "keys": ["***"]}).encode(), "InvalidArgument"),
        (json.dumps({"namespace": "", "keys": []}).encode(), "InvalidArgument"),
        (_body(world, [b"k" * (kv_score.MAX_KEY_BYTES + 1)]), "InvalidArgument"),
        (_body(world, chain, tenant="bad tenant!"), "InvalidArgument"),
        (_body(world, chain, bucket="x"), "InvalidArgument"),
    ]
    for body, code in cases:
        status, payload = await _post(world, world.a, body)
        assert (status, _code(payload)) == (400, code), body
    status, payload = await _post(world, world.a, b"", method="GET")
    assert (status, _code(payload)) == (405, "MethodNotAllowed")


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
@pytest.mark.timeout(120)
async def test_the_documented_curl_command_scores_a_chain(world: probe_cluster.World) -> None:
    """docs/routing.md's curl example (curl's own SigV4, `--aws-sigv4`)."""
    body = _body(world, list(world.blocks)[:4])
    user = f"{world.a.access_key}:{world.a.secret_key}"
    command = [
        "curl", "-sS", "--fail-with-body", "--cacert", test_pki.session().ca_file,
        "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", user,
        "-H", "Content-Type: application/json",
        "-H", f"x-amz-content-sha256: {hashlib.sha256(body).hexdigest()}",
        "--data-binary", body.decode(), f"{world.cluster.s3_url}{kv_score.PATH}",
    ]  # fmt: skip
    curl = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await curl.communicate()
    assert curl.returncode == 0, out + err
    assert json.loads(out) == {"dram": 4, "durable": 0, "blocks": 4}


@pytest.mark.timeout(120)
async def test_score_clients_are_bounded_and_never_closed_under_a_request(
    world: probe_cluster.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway keeps MAX_SCORING_CLIENTS scoring clients: the least recently used one is
    closed once no request holds it (here the operator's certificate acts for tenant A, as the
    gateway's does)."""
    monkeypatch.setattr(kv_clients, "MAX_SCORING_CLIENTS", 1)
    buckets = kv_clients.KVBuckets(world.cluster.metadata.address)
    chain = list(world.blocks)
    try:
        async with buckets.scoring(world.a.tenant, world.namespace) as first:
            async with buckets.scoring(world.a.tenant, "another-ns") as second:
                assert (await second.score(chain)).blocks == 0
                # Evicted by the second, but held: still answers.
                assert (await first.score(chain)).dram == len(chain)
            assert first._set._closed is False
        assert first._set._closed is True  # released by its last user
        async with buckets.scoring(world.a.tenant, "another-ns") as again:
            assert again is second  # the most recent one stays open
    finally:
        await buckets.close()
    assert second._set._closed is True
