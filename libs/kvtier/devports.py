"""The ports of a dev cluster (`kvtier up`): fixed by default, so that S3 profiles, engines'
`metadata` settings and Prometheus scrape targets stay right across restarts.

The plan (docs/operations.md), each port shifted by `offset` (`--port-offset`, for a second
cluster on the same host):

    etcd           7379 client, 7380 peer   (not 2379: a system etcd, e.g. Debian's etcd-server
                                             package, listens there)
    gateway-1      7000 gRPC (mutual TLS), 7443 users (TLS + tokens), 9000 S3, 7050 metrics
    metadata-1     7001 gRPC (mutual TLS), 7444 users (TLS + tokens), 7051 metrics
    datanode-N     7100+N gRPC, 7150+N metrics          (N = 1..49)
    kvcache-N      7200+N gRPC, 7300+N users, 7250+N metrics

Every node's metrics port is its gRPC port + 50. Gateway and metadata use the host ports of
docker-compose.yml (7000/7443/9000 and 7001/7444), so a profile works against either. Data-plane
(tcp, shm) ports stay ephemeral: clients find them in the cluster map. `auto=True`
(`--ports auto`) binds every port to 0 as before: what tests use, many clusters at once.
"""

from __future__ import annotations

import dataclasses
import socket

#: Nodes of one role that the fixed plan has room for (gRPC and metrics ports 50 apart).
MAX_NODES_PER_ROLE = 49
METRICS_DELTA = 50


class PortError(Exception):
    """A port setting that cannot work (taken, out of range, clashing); one line, exit 2."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PortPlan:
    """Which port each process of a dev cluster binds (0 everywhere when auto)."""

    auto: bool = False
    offset: int = 0
    s3: int = 9000
    gateway: int = 7000
    gateway_client: int = 7443
    metadata: int = 7001
    metadata_client: int = 7444
    etcd: int = 7379
    datanode_base: int = 7100
    kvcache_base: int = 7200
    kvcache_client_base: int = 7300

    def _at(self, port: int) -> int:
        return 0 if self.auto else port + self.offset

    def etcd_ports(self) -> tuple[int, int]:
        """(client, peer) of etcd; (0, 0) when auto."""
        return self._at(self.etcd), self._at(self.etcd + 1)

    def node_ports(self, role: str, index: int) -> dict[str, int]:
        """The service flags of node `index` (1-based) of role: grpc_port, client_port,
        metrics_port and, for the gateway, s3_port."""
        if role == "gateway":
            grpc, client = self.gateway, self.gateway_client
        elif role == "metadata":
            grpc, client = self.metadata, self.metadata_client
        elif role == "datanode":
            grpc, client = self.datanode_base + index, 0
        else:
            grpc, client = self.kvcache_base + index, self.kvcache_client_base + index
        ports = {
            "grpc_port": self._at(grpc),
            "client_port": self._at(client) if client else 0,
            "metrics_port": self._at(grpc + METRICS_DELTA),
        }
        if role == "gateway":
            ports["s3_port"] = self._at(self.s3)
        return ports

    def every_port(self, counts: dict[str, int]) -> list[tuple[str, int]]:
        """(what, port) of every fixed port of a cluster of counts ({role: nodes}); empty when
        auto."""
        if self.auto:
            return []
        client, peer = self.etcd_ports()
        found = [("etcd client", client), ("etcd peer", peer)]
        for role, count in counts.items():
            for index in range(1, count + 1):
                name = f"{role}-{index}"
                for flag, port in self.node_ports(role, index).items():
                    if port:
                        found.append((f"{name} {flag.removesuffix('_port')}", port))
        return found

    def check(self, counts: dict[str, int]) -> None:
        """Raise PortError unless every fixed port is a port, used once, and free on 127.0.0.1."""
        if self.auto:
            return
        crowded = [r for r in ("datanode", "kvcache") if counts.get(r, 0) > MAX_NODES_PER_ROLE]
        if crowded:
            raise PortError(
                f"the fixed port plan has room for {MAX_NODES_PER_ROLE} nodes per role "
                f"({crowded[0]}: {counts[crowded[0]]}); use --ports auto"
            )
        seen: dict[int, str] = {}
        for what, port in self.every_port(counts):
            if not 0 < port <= 65535:
                raise PortError(f"{what} port {port} is not in 1..65535 (check --port-offset)")
            if port in seen:
                raise PortError(f"{what} and {seen[port]} would both use port {port}")
            seen[port] = what
        for what, port in self.every_port(counts):
            if not port_free(port):
                raise PortError(
                    f"port {port} ({what}) is in use on 127.0.0.1: stop what holds it, or "
                    "move the cluster (--port-offset N, --s3-port, --gateway-port, "
                    "--metadata-port, --etcd-port) or use --ports auto"
                )


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (as servers bind: SO_REUSEADDR, so a
    closed connection's TIME_WAIT does not count as taken)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True
