"""`kvtier up`: a whole cluster on 127.0.0.1 from one state directory, supervised in the foreground.

Layout of the state directory (mode 0700; everything survives `down`/`up`):
    etcd/                 etcd's data (the cluster map, memberships)
    pki/                  the cluster CA (ca.crt, ca.key) and a certificate + key per node, for
                          etcd and for the operator (the CLI); created once, renewed when close
                          to expiry
    nodes/<name>/         a node's identity and drives
    logs/<name>.log       each process's log (and supervisor.log when detached), mode 0600
    logs/s3-access.log    the gateway's S3 access log (one JSON line per request)
    ports.json            etcd's ports under `--ports auto`, reused on the next `up` when still
                          free (the fixed plan, `kvtier up`'s default, is devports.PortPlan)
    credentials.json      the admin user's access/secret key (mode 0600), created once
    master.key            the key sealing S3 secrets in etcd (hex, mode 0600), created once
    cluster.json          endpoints, the CA file, the operator certificate and the admin keys of
                          the running cluster (mode 0600; removed at stop)
    supervisor.pid        the supervisor's pid while it runs

Secure by default: every process speaks TLS (mutual between nodes, to etcd and for the CLI),
users authenticate with the admin keys of cluster.json; nothing is printed or logged with a
secret in it. `insecure=True` (kvtier up --insecure) runs without TLS or authentication, for
benchmarks that compare the two.

The supervisor is a plain synchronous loop: signal handlers only set flags. SIGTERM/SIGINT stop
the cluster (gateway, kvcache, datanodes, then metadata, then etcd); SIGHUP restarts children that
have exited (`kvtier revive`). A child that dies is reported, never silently restarted, so its
departure from the cluster map can be watched.

Modules: this one holds the options, the children and the supervisor; `kvtier.devstate` the
state directory's files (CA, admin keys, master key, logs), `kvtier.devcontrol` the control of a
supervisor from outside (find, wait for, stop; the summary `kvtier up` prints).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kvtier import (
    clustermap,
    devcontrol,
    devports,
    devstate,
    errors,
    etcdserver,
    identity,
    masterkey,
    membership,
    pki,
    rpc,
    security,
    users,
)
from kvtier.proto.common.v1 import common_pb2

log = logging.getLogger(__name__)

ETCD_PREFIX = "/kvtier"

# Names of the state directory and the supervisor's control (`kvtier.devstate`,
# `kvtier.devcontrol`), importable from here as ever (the CLI, tests).
ClusterError = devstate.ClusterError
MASTER_KEY_FILE = devstate.MASTER_KEY_FILE
ADMIN_TENANT = devstate.ADMIN_TENANT
open_log = devstate.open_log
pki_dir = devstate.pki_dir
ensure_pki = devstate.ensure_pki
operator_security = devstate.operator_security
credentials = devstate.credentials
ensure_admin = devstate.ensure_admin
supervisor_pid = devcontrol.supervisor_pid
render_summary = devcontrol.render_summary
wait_detached = devcontrol.wait_detached
stop_detached = devcontrol.stop_detached


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterOptions:
    """Shape and timing of a dev cluster."""

    state_dir: Path
    datanodes: int = 6
    drives_per_datanode: int = 2
    kvcache_nodes: int = 2
    kvcache_arena_bytes: int = 256 * 1024 * 1024
    lease_ttl_s: int = 5
    shutdown_grace_s: float = 5.0
    ready_timeout_s: float = 90.0
    etcd_binary: str = "etcd"
    #: No TLS, no authentication (benchmarks comparing the cost of security).
    insecure: bool = False
    #: Which ports the processes bind; the library's default is every port ephemeral (tests
    #: run many clusters at once), `kvtier up`'s the fixed plan of devports.
    ports: devports.PortPlan = field(default_factory=lambda: devports.PortPlan(auto=True))

    def expected_roles(self) -> dict[str, int]:
        """How many live nodes of each role a ready cluster has."""
        return {
            "metadata": 1,
            "datanode": self.datanodes,
            "kvcache": self.kvcache_nodes,
            "gateway": 1,
        }


@dataclass(slots=True)
class Child:
    """One supervised service process."""

    name: str
    role: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    reported: bool = False
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        """Launch (or relaunch) the process."""
        pki.ensure_private_dir(self.log_path.parent)
        with open_log(self.log_path) as out:
            # A process group of its own: a Ctrl-C in the terminal reaches the supervisor only,
            # which stops the services in dependency order; in its group, every service got the
            # SIGINT at once and then the supervisor's SIGTERM after its handler was gone (exit
            # -15, reported as a failed stop).
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        self.reported = False

    def running(self) -> bool:
        """Whether the current incarnation is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the child's log on one line."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def _node_names(opts: ClusterOptions) -> list[tuple[str, str]]:
    """(role, name) of every certificate holder of a dev cluster."""
    names = [("etcd", "etcd"), ("operator", "operator"), ("metadata", "metadata-1")]
    names += [("datanode", f"datanode-{i}") for i in range(1, opts.datanodes + 1)]
    names += [("kvcache", f"kvcache-{i}") for i in range(1, opts.kvcache_nodes + 1)]
    return [*names, ("gateway", "gateway-1")]


def _children(opts: ClusterOptions, etcd_endpoint: str) -> list[Child]:
    state = opts.state_dir
    common = [
        f"--etcd-endpoints={etcd_endpoint}",
        f"--etcd-prefix={ETCD_PREFIX}",
        "--host=127.0.0.1",
        f"--lease-ttl-s={opts.lease_ttl_s}",
        f"--shutdown-grace-s={opts.shutdown_grace_s}",
    ]
    if opts.insecure:
        common.append("--insecure=true")
    certs = pki_dir(state)

    def child(role: str, name: str, *extra: str) -> Child:
        index = int(name.rsplit("-", 1)[1])
        ports = [
            f"--{k.replace('_', '-')}={v}" for k, v in opts.ports.node_ports(role, index).items()
        ]
        tls = [] if opts.insecure else [
            f"--tls-ca-file={certs / pki.CA_CERT}",
            f"--tls-cert-file={certs / f'{name}.crt'}",
            f"--tls-key-file={certs / f'{name}.key'}",
        ]  # fmt: skip
        argv = [
            sys.executable, "-m", f"services.{role}", f"--node-id={name}", *common, *ports, *tls,
            *extra,
        ]  # fmt: skip
        return Child(name=name, role=role, argv=argv, log_path=state / "logs" / f"{name}.log")

    pool_drives = opts.datanodes * opts.drives_per_datanode
    master_key = f"--master-key-file={state / MASTER_KEY_FILE}"
    result = [child("metadata", "metadata-1", f"--pool-drives={pool_drives}", master_key)]
    for i in range(1, opts.datanodes + 1):
        data = state / "nodes" / f"datanode-{i}"
        result.append(
            child(
                "datanode",
                f"datanode-{i}",
                f"--data-dir={data}",
                f"--drive-count={opts.drives_per_datanode}",
            )
        )
    for i in range(1, opts.kvcache_nodes + 1):
        data = state / "nodes" / f"kvcache-{i}"
        result.append(
            child(
                "kvcache",
                f"kvcache-{i}",
                f"--data-dir={data}",
                f"--arena-bytes={opts.kvcache_arena_bytes}",
            )
        )
    access = f"--s3-access-log={state / 'logs' / 's3-access.log'}"
    result.append(child("gateway", "gateway-1", master_key, access))
    return result


class Supervisor:
    """Runs etcd and every service of a dev cluster until told to stop."""

    def __init__(self, opts: ClusterOptions, out: IO[str]) -> None:
        self.opts = opts
        self._out = out
        self._stop = False
        self._revive = False
        self._lock: IO[bytes] | None = None
        self.etcd: etcdserver.EtcdServer | None = None
        self.children: list[Child] = []

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def _on_revive(self, signum: int, frame: FrameType | None) -> None:
        self._revive = True

    def _take_lock(self) -> None:
        state = self.opts.state_dir
        state.mkdir(parents=True, exist_ok=True)
        handle = (state / "supervisor.lock").open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = supervisor_pid(state)
            raise ClusterError(
                f"a dev cluster is already running from {state} (pid {pid}); "
                f"stop it with: kvtier down --state-dir {state}"
            ) from None
        self._lock = handle

    def run(self) -> int:
        """Start everything, supervise until SIGTERM/SIGINT, stop; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_revive)
        pki.ensure_private_dir(self.opts.state_dir)  # holds keys, secrets and logs
        self._take_lock()
        state = self.opts.state_dir
        (state / "cluster.json").unlink(missing_ok=True)
        identity.write_atomic(state / "supervisor.pid", str(os.getpid()).encode())
        failed = False
        try:
            info = self._start()
            if info is not None:
                self._say(render_summary(info))
                self._supervise()
        except (ClusterError, etcdserver.EtcdError, errors.KVTierError, OSError) as exc:
            self._say(f"kvtier up: error: {exc}")
            failed = True
        finally:
            code = self._shutdown()  # whatever happened, nothing is left running
        return 1 if failed else code

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def _start(self) -> dict[str, Any] | None:
        state = self.opts.state_dir
        self.opts.ports.check(self.opts.expected_roles())  # again: `up` checked before forking
        client_port, peer_port = devstate.etcd_ports(state, self.opts.ports)
        tls = None
        if not self.opts.insecure:
            ensure_pki(state, _node_names(self.opts))
            certs = pki_dir(state)
            tls = etcdserver.EtcdTLS(
                str(certs / pki.CA_CERT), str(certs / "etcd.crt"), str(certs / "etcd.key")
            )
        pki.ensure_private_dir(state / "logs")
        self.etcd = etcdserver.EtcdServer(
            state / "etcd",
            client_port=client_port,
            peer_port=peer_port,
            log_path=state / "logs" / "etcd.log",
            binary=self.opts.etcd_binary,
            tls=tls,
        )
        self.etcd.start()
        self.etcd.wait_ready()
        self._say(f"etcd ready at {self.etcd.endpoint}; starting services")
        key = devstate.master_key(state)
        self.children = _children(self.opts, self.etcd.endpoint)
        for child in self.children:
            child.start()
        cmap = asyncio.run(self._wait_ready())
        if cmap is None:
            return None
        info = self._cluster_info(cmap)
        asyncio.run(self._ensure_admin(info["metadata"], key))
        # Mode 0600 from the start: it holds the admin's secret.
        identity.write_atomic(
            state / "cluster.json", json.dumps(info, indent=2).encode(), mode=0o600
        )
        return info

    def _security(self) -> security.ClientSecurity:
        if self.opts.insecure:
            return security.ClientSecurity(insecure=True)
        return operator_security(self.opts.state_dir)

    async def _ensure_admin(self, metadata: str, key: masterkey.MasterKey) -> None:
        assert self.etcd is not None
        sec = self._security()
        store = membership.EtcdMembership((self.etcd.endpoint,), ETCD_PREFIX, security=sec)
        await store.connect(wait_s=10)
        try:
            await ensure_admin(
                metadata, users.UserStore(store, key), credentials(self.opts.state_dir), sec
            )
        finally:
            await store.close()

    def _check_children(self) -> None:
        for child in self.children:
            if not child.running():
                code = child.proc.returncode if child.proc is not None else None
                raise ClusterError(f"{child.name} exited with {code}: {child.log_tail()}")

    async def _wait_ready(self) -> common_pb2.ClusterMap | None:
        assert self.etcd is not None
        sec = self._security()
        store = membership.EtcdMembership((self.etcd.endpoint,), ETCD_PREFIX, security=sec)
        await store.connect(wait_s=10)
        try:
            deadline = time.monotonic() + self.opts.ready_timeout_s
            last, shown = "no cluster map yet", ""
            while time.monotonic() < deadline:
                if self._stop:
                    return None
                self._check_children()
                try:
                    cmap = (await store.get_map()).map
                except errors.Unavailable as exc:  # a loaded machine: not ready yet
                    last = str(exc)
                    await asyncio.sleep(0.2)
                    continue
                ok, last = await _ready(cmap, self.opts.expected_roles(), sec)
                if ok:
                    return cmap
                if last != shown:  # progress: say what the cluster is waiting for
                    self._say(f"  waiting: {last}")
                    shown = last
                await asyncio.sleep(0.2)
            raise ClusterError(f"not ready after {self.opts.ready_timeout_s:g}s: {last}")
        finally:
            await store.close()

    def _cluster_info(self, cmap: common_pb2.ClusterMap) -> dict[str, Any]:
        assert self.etcd is not None
        by_id = {node.node_id: node for node in cmap.nodes}
        creds = credentials(self.opts.state_dir)
        nodes = []
        for child in self.children:
            node = by_id[child.name]
            nodes.append(
                {
                    "name": child.name,
                    "role": child.role,
                    "pid": child.proc.pid if child.proc is not None else None,
                    "grpc_address": node.grpc_address,
                    "metrics_address": node.metrics_address,
                    "log": str(child.log_path),
                }
            )
        certs = pki_dir(self.opts.state_dir)
        secure = {} if self.opts.insecure else {
            # The trust anchor for every client, and the operator's certificate (the CLI's).
            "ca_file": str(certs / pki.CA_CERT),
            "operator_cert": str(certs / "operator.crt"),
            "operator_key": str(certs / "operator.key"),
        }  # fmt: skip
        metadata, gateway = by_id["metadata-1"], by_id["gateway-1"]
        return {
            "state_dir": str(self.opts.state_dir),
            "insecure": self.opts.insecure,
            **secure,
            "etcd": self.etcd.endpoint,
            "etcd_prefix": ETCD_PREFIX,
            # Service ports (mutual TLS: the operator certificate) ...
            "metadata": metadata.grpc_address,
            "gateway_grpc_service": gateway.grpc_address,
            # ... and the ports users reach with the admin keys (session tokens over TLS).
            "metadata_client": metadata.client_address or metadata.grpc_address,
            "gateway_grpc": gateway.client_address or gateway.grpc_address,
            "gateway_s3": f"{'https' if gateway.tls else 'http'}://{gateway.s3_address}",
            "s3_access_key": creds["access_key"],
            "s3_secret_key": creds["secret_key"],
            # The former names, still read by older tools and tests.
            "access_key": creds["access_key"],
            "secret_key": creds["secret_key"],
            "supervisor_pid": os.getpid(),
            "etcd_pid": self.etcd.pid,
            "map_epoch": cmap.epoch,
            "deployment_id": cmap.deployment_id,
            "nodes": nodes,
        }

    def _supervise(self) -> None:
        while not self._stop:
            for child in self.children:
                if not child.running() and not child.reported and child.proc is not None:
                    child.reported = True
                    child.exit_codes.append(child.proc.returncode)
                    self._say(
                        f"{child.name} exited with {child.proc.returncode}; "
                        f"`kvtier revive --state-dir {self.opts.state_dir}` restarts it"
                    )
            if self._revive:
                self._revive = False
                for child in self.children:
                    if not child.running():
                        self._say(f"restarting {child.name}")
                        child.start()
                self._record_pids()
            time.sleep(0.1)

    def _record_pids(self) -> None:
        """Rewrite cluster.json with the children's current pids (after a revive)."""
        path = self.opts.state_dir / "cluster.json"
        info = devstate.load_json(path)
        pids = {c.name: c.proc.pid for c in self.children if c.proc is not None}
        for node in info.get("nodes", []):
            node["pid"] = pids.get(node.get("name"), node.get("pid"))
        if info:
            identity.write_atomic(path, json.dumps(info, indent=2).encode(), mode=0o600)

    def _shutdown(self) -> int:
        """Stop children in dependency order, then etcd; 0 when every child exited 0."""
        self._say("stopping the dev cluster")
        failed: list[str] = []
        for role in ("gateway", "kvcache", "datanode", "metadata"):
            group = [c for c in self.children if c.role == role and c.running()]
            for child in group:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
            for child in group:
                assert child.proc is not None
                try:
                    code = child.proc.wait(self.opts.shutdown_grace_s + 10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    code = child.proc.wait()
                if code != 0:
                    failed.append(f"{child.name}={code}")
        if self.etcd is not None:
            self.etcd.stop()
        state = self.opts.state_dir
        (state / "cluster.json").unlink(missing_ok=True)
        (state / "supervisor.pid").unlink(missing_ok=True)
        if failed:
            self._say(f"stopped; non-zero exits: {', '.join(failed)}")
            return 1
        self._say("stopped; every process exited 0")
        return 0


async def _ready(
    cmap: common_pb2.ClusterMap, expected: dict[str, int], sec: security.ClientSecurity
) -> tuple[bool, str]:
    """Whether the map shows the expected nodes, a formed pool and every node SERVING."""
    counts = collections.Counter(clustermap.role_name(n.role) for n in cmap.nodes)
    if dict(counts) != expected:
        return False, f"nodes in the map {dict(counts)}, want {expected}"
    if not cmap.pools:
        return False, f"no pool formed yet ({len(cmap.pending_drives)} drives pending)"
    offline = [
        slot.drive_id
        for pool in cmap.pools
        if pool.state != common_pb2.POOL_STATE_RETIRED  # a tombstone: drives may be gone
        for es in pool.sets
        for slot in es.slots
        if slot.state != common_pb2.DRIVE_STATE_ONLINE
    ]
    if offline:
        return False, f"{len(offline)} drives offline"
    health = await asyncio.gather(
        *(rpc.check_health(n.grpc_address, security=sec) for n in cmap.nodes)
    )
    bad = [n.node_id for n, h in zip(cmap.nodes, health, strict=True) if h != "SERVING"]
    if bad:
        return False, f"not serving yet: {', '.join(bad)}"
    return True, "ready"
