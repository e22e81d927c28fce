"""LMCache 0.5.6's own code loading and driving the kvtier plugin against real kvcache nodes.

LMCache pins protobuf < 7 and numpy <= 2.2.6, so it lives in its own virtualenv
(`.bench-venvs/lmcache`, made by `scripts/bench_peers.sh lmcache`); `lmcache_driver.py` runs
there, builds LMCache's `RemoteBackend` for `remote_storage_plugins: [kvtier]` (LMCache's
`ConnectorManager` imports the plugin and wraps it in its `InstrumentedRemoteConnector`), and
talks over TCP to the kvcache nodes this test runs (TLS: as the operator, whose certificate the
driver inherits through KVTIER_* variables, and as tenant users whose access key, CA and 0600
secret file are in LMCache's extra_config). Skipped where that virtualenv is missing;
test_lmcache.py covers the same plugin in-process without LMCache.
"""

from __future__ import annotations

import asyncio
import json
import site
import sys
from pathlib import Path

import pytest

from kvtier import etcdserver, membership
from tests.integrations.conftest import secure_cluster

ROOT = Path(__file__).resolve().parents[2]
LMCACHE_PYTHON = ROOT / ".bench-venvs" / "lmcache" / "bin" / "python"
DRIVER = Path(__file__).with_name("lmcache_driver.py")

pytestmark = pytest.mark.skipif(
    not LMCACHE_PYTHON.exists(),
    reason="LMCache's virtualenv is missing: scripts/bench_peers.sh lmcache makes it",
)


def _site_packages() -> str:
    """Where this interpreter's packages (protobuf 7, grpc: kvtier's SDK) live."""
    return next(p for p in site.getsitepackages() if p.endswith("site-packages"))


@pytest.mark.timeout(300)
async def test_lmcache_remote_backend_drives_the_plugin_against_real_nodes(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with secure_cluster(2, etcd, etcd_prefix, store, tmp_path) as cluster:
        addresses = ",".join(n.address for n in cluster.nodes)
        alice, bob = await cluster.user("team-a"), await cluster.user("team-b")
        users = {
            "alice": cluster.credentials(alice),
            "bob": cluster.credentials(bob),
            "wrong": cluster.credentials(alice, secret="not-the-secret-of-alice"),
        }
        proc = await asyncio.create_subprocess_exec(
            str(LMCACHE_PYTHON), str(DRIVER), str(ROOT / "libs"), _site_packages(), addresses,
            json.dumps(users), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-4000:]
    for secret in (alice.secret.reveal(), bob.secret.reveal(), "not-the-secret-of-alice"):
        assert secret not in out.decode() + err.decode()
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-4000:]
    seen = json.loads(lines[-1])
    sys.stderr.write(f"lmcache driver saw: {seen}\n")
    assert seen["connector"] == "kvtier.integrations.lmcache.KVTierConnector"
    assert seen["is_remote_connector"] is True
    assert seen["contains"] == [True] * 6 + [False]
    assert seen["batched_contains"] == 4  # stops at the absent key
    assert seen["async_contains"] == 6
    assert seen["batched_get_exact"] == [True] * 6
    assert seen["partial_tokens"] == 100  # the partial chunk comes back with its own length
    assert seen["get_exact"] is True
    assert seen["non_blocking"] == [True, True]  # the leading run, up to the missing key
    assert seen["tenant_b"] == 0
    assert seen["salt_s2"] == 0
    assert seen["same"] == 6  # another plugin name, loaded as a bare RemoteConnector
    assert seen["mha_rank1_sees_rank0"] == 0
    assert seen["mla_shared"] == [True, True]
    dead = seen["dead"]
    assert dead["contains"] is False
    assert dead["batched_contains"] == 0
    assert dead["get"] is None
    assert dead["batched_get"] == [None, None]
    assert dead["seconds"] < 10
    as_users = seen["users"]
    assert as_users["alice_exact"] == [True] * 4
    assert as_users["bob"] == 0
    assert as_users["alice_naming_team_b"] == 0
    assert as_users["operator_default"] == 0
    assert as_users["operator_team_a"] == 4  # alice's chunks landed in her own tenant
    assert as_users["wrong_secret"] == {"contains": False, "batched_contains": 0, "get": None}
