"""Fixtures for the engine-integration tests: real kvcache nodes in this process (port 0, the
session's etcd under a private prefix), as in tests/component, over TLS with the session's PKI
(tests/pki.py). Test clients act as the operator (its certificate, from KVTIER_CERT_FILE) unless a
test gives a plugin a tenant user's credentials: `secure_cluster` adds a metadata service that
issues session tokens and makes users the way `kvtier admin user add` does."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kvtier import etcdserver, masterkey, membership, users
from kvtier.clients import metadata as metadata_client
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import pki as test_pki
from tests.component import harness
from tests.component.conftest import store  # noqa: F401  (the fixture, re-exported)


@contextlib.asynccontextmanager
async def kvcache_nodes(
    count: int,
    etcd: etcdserver.EtcdServer,
    prefix: str,
    etcd_store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[list[harness.Running]]:
    """count kvcache nodes in this process, registered in etcd; stopped on exit."""
    async with contextlib.AsyncExitStack() as stack:
        running = []
        for i in range(count):
            node = await stack.enter_async_context(
                harness.run(
                    kvcache_config.KVCacheConfig,
                    "kvcache",
                    kvcache_main.build,
                    etcd_store,
                    etcd_endpoints=(etcd.endpoint,),
                    etcd_prefix=prefix,
                    data_dir=str(tmp / f"kv{i}"),
                    **settings,
                )
            )
            running.append(node)
        yield running


async def stop_node(node: harness.Running) -> None:
    """Stop one node now (its listener closes: clients see it as dead)."""
    node.stop.set()
    await node.task


@dataclasses.dataclass
class SecureCluster:
    """A metadata service (users, session tokens) and kvcache nodes, all over TLS."""

    metadata: harness.Running
    nodes: list[harness.Running]
    tmp: Path

    @property
    def metadata_client(self) -> str:
        """The metadata's port for users (TLS + session tokens), as in cluster.json."""
        return self.metadata.info.client_address

    async def user(self, tenant: str, *, trusted: bool = False) -> users.User:
        """A user of tenant created by the operator (`kvtier admin user add --tenant T`,
        `--trust-shm` when trusted)."""
        async with metadata_client.MetadataClient(self.metadata.address) as operator:
            return await operator.create_user(tenant=tenant, shm_trusted=trusted)

    def credentials(self, user: users.User, *, secret: str | None = None) -> dict[str, Any]:
        """A plugin's credential settings for user, as its docs tell an operator to write
        them: the metadata's client port, the CA, the access key and a 0600 secret file."""
        path = self.tmp / f"{user.access_key}{'' if secret is None else '-given'}.secret"
        path.write_text((secret if secret is not None else user.secret.reveal()) + "\n")
        os.chmod(path, 0o600)
        return {
            "metadata": self.metadata_client,
            "ca_file": test_pki.session().ca_file,
            "access_key": user.access_key,
            "secret_key_file": str(path),
        }


@contextlib.asynccontextmanager
async def secure_cluster(
    count: int,
    etcd: etcdserver.EtcdServer,
    prefix: str,
    etcd_store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[SecureCluster]:
    """A metadata service with a master key (users enabled) and count kvcache nodes."""
    key_file = tmp / "master.key"
    assert masterkey.write_new(key_file)
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, etcd_store,
            etcd_endpoints=(etcd.endpoint,), etcd_prefix=prefix, master_key_file=str(key_file),
        ) as meta,
        kvcache_nodes(count, etcd, prefix, etcd_store, tmp, **settings) as nodes,
    ):  # fmt: skip
        yield SecureCluster(meta, nodes, tmp)
