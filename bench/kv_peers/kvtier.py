"""kvtier itself in the KV-cache benchmark: two kvcache nodes, driven by `kvtier.KVClient`.

Server: a real etcd and NODES kvcache nodes (`python -m services.kvcache`, 2 GiB arena each) on
127.0.0.1 (issue 15's setup: keys spread over the nodes by rendezvous hashing), secure as a
cluster runs by default: a cluster CA made for the run (`bench.secure.StandalonePKI`), etcd over
TLS with client certificates, the nodes' gRPC ports mutual TLS; ready when every node's gRPC
health says SERVING. One system per data-plane transport (`kvtier-tcp`, `kvtier-shm`): the
client narrows negotiation to it. Client: the SDK's sync `KVClient` in the project's
interpreter with the run's operator certificate (kvcache nodes without a metadata service
issue no session tokens; operators are trusted for shared memory); gets land straight in the
caller's buffers and puts leave straight from them (no copies in Python). What the security
costs is measured on its own: bench/security_bench.py.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.kv_peers import base

ARENA_BYTES = 2 * 1024**3
NODES = 2


class KVTierClient(base.BaseClient):
    def __init__(self, nodes: Sequence[str], transport: str, security: Mapping[str, Any]) -> None:
        import kvtier  # the project's interpreter only (client processes of this system)
        from kvtier import security as security_mod

        self._kvtier: Any = kvtier
        self.client = kvtier.KVClient.connect(
            nodes=list(nodes), namespace="bench", transports=[transport], timeout_s=60.0,
            security=security_mod.ClientSecurity(**security),
        )  # fmt: skip

    def put_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        statuses = self.client.put_batch(keys, bufs)
        stored = self._kvtier.PutStatus.STORED
        if any(s is not stored for s in statuses):
            raise RuntimeError(f"put failed: {sorted({str(s) for s in statuses})}")

    def get_batch(self, keys: Sequence[bytes], bufs: Sequence[base.Buffer]) -> None:
        sizes = self.client.get_batch(keys, bufs)
        for key, buf, size in zip(keys, bufs, sizes, strict=True):
            if size != len(buf):
                raise KeyError(f"get {key!r}: {size} bytes")

    def lookup(self, chain: Sequence[bytes]) -> int:
        return int(self.client.lookup(chain))

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        self.client.delete(keys)

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class KVTierSpec:
    nodes: tuple[str, ...]
    transport: str
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)
    #: `kvtier.security.ClientSecurity` arguments (the run's operator certificate).
    security: Mapping[str, Any] = field(default_factory=dict)

    def make_client(self) -> base.KVClient:
        return KVTierClient(self.nodes, self.transport, self.security)

    def version(self) -> str:
        import kvtier

        return kvtier.__version__


class KVTierSystem:
    """etcd + one kvcache node; clients use one transport."""

    kind = "kvtier"

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.name = f"kvtier-{transport}"
        self._tmp: Path | None = None
        self._etcd: Any = None
        self._nodes: list[base.ServerProcess] = []
        self._addresses: list[str] = []
        self._pki: Any = None

    def unavailable(self) -> str | None:
        if shutil.which("etcd") is None:
            return "etcd is not installed (scripts/bootstrap.sh installs it)"
        return None

    def start(self) -> None:
        from bench import secure
        from kvtier import etcdserver, rpc, security

        self._tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self._pki = made = secure.StandalonePKI(self._tmp / "pki")
        self._etcd = etcdserver.EtcdServer(
            self._tmp / "etcd",
            client_port=etcdserver.free_port(),
            peer_port=etcdserver.free_port(),
            log_path=self._tmp / "etcd.log",
            tls=etcdserver.EtcdTLS(made.ca_file, made.cert("etcd"), made.key("etcd")),
        )
        self._etcd.start()
        self._etcd.wait_ready()
        operator = security.ClientSecurity(**made.operator_kwargs())
        for index in range(NODES):
            port = base.free_port()
            address = f"127.0.0.1:{port}"
            node = base.ServerProcess(
                [
                    sys.executable, "-m", "services.kvcache", f"--grpc-port={port}",
                    f"--etcd-endpoints={self._etcd.endpoint}",
                    f"--data-dir={self._tmp / f'kv{index}'}", f"--arena-bytes={ARENA_BYTES}",
                    "--metrics-port=-1", "--client-port=0", "--log-level=warning",
                    *made.service_flags("kvcache"),
                ],
                self._tmp / f"kvcache{index}.log",
                env={"PYTHONPATH": str(base.ROOT)},
            )  # fmt: skip
            self._nodes.append(node)
            self._addresses.append(address)

            def serving(address: str = address) -> bool:
                health = rpc.check_health(address, timeout_s=1.0, security=operator)
                return asyncio.run(health) == "SERVING"

            node.wait_ready(serving, f"kvcache node {index}")

    def stop(self) -> None:
        for node in self._nodes:
            node.stop()
        self._nodes, self._addresses = [], []
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def client_spec(self) -> KVTierSpec:
        assert self._pki is not None
        return KVTierSpec(
            nodes=tuple(self._addresses),
            transport=self.transport,
            security=self._pki.operator_kwargs(),
        )

    def describe(self) -> str:
        import kvtier

        return (
            f"kvtier {kvtier.__version__}: {NODES} kvcache nodes ({ARENA_BYTES >> 30} GiB arena "
            "each, "
            f"mutual TLS, operator certificate), SDK KVClient over {self.transport} data-plane "
            "calls"
        )


def systems() -> list[base.KVSystem]:
    return [KVTierSystem("tcp"), KVTierSystem("shm")]
