"""The fault harness: a secure dev cluster whose every node runs in its own network namespace.

Nodes: etcd, metadata-1, datanode-1..N (each drive a small tmpfs, so a drive can be filled to
ENOSPC), kvcache-1..M and gateway-1, each in a namespace on one bridge (tests/fault/netns.py)
with its own 127.77.S.x address; the test process stays in the root namespace and reaches them
through the bridge. Services are started as `ip netns exec NS python -m services.<role>` with
the flags `kvtier up` passes (libs/kvtier/devcluster.py), bound to the node's address, with
certificates whose IP SANs name it (mutual TLS everywhere, as in a real cluster).

Faults: `partition(a, b)` / `heal`, `impair(node, delay_ms, loss, jitter_ms)` (user-space
netem, tests/fault/netem.py), `signal(node, sig)` (SIGKILL, SIGSTOP, SIGCONT), `restart(node)`,
`fill_drive(node, i)` / `free_drive`; `clock_offsets` skews a node's wall clock from its start
(tests/fault/skewclock.py); `power_nodes` puts a datanode's drives on ext4 over loop devices
whose power can be cut (tests/fault/powercut.py: unsynced writes discarded, a new boot id at
the restart). Ready means visible in the cluster map and SERVING
(devcluster's own check), never a sleep; every wait has a deadline. `close()` undoes
everything and is idempotent; `start()` first removes what a dead run of this harness left.

Data plane: each node plays a host of its own, so its services move bulk bytes over tcp, across
the faulted network, as between hosts (`dataplane_transports`, "tcp" by default). A scenario
whose faults are not network faults may opt out (`SAME_HOST_DATAPLANE`: the services' default,
shm between the processes of this one host, which no partition or netem reaches).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signals
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvtier import devcluster, etcdserver, masterkey, membership, pki, security, users
from kvtier.proto.common.v1 import common_pb2
from tests.fault import netns, powercut

ETCD_CLIENT_PORT = 2379
GRPC_PORT = 7100
CLIENT_PORT = 7101
S3_PORT = 7102
READY_TIMEOUT_S = 150.0
LEASE_TTL_S = 2
#: `FaultCluster(dataplane_transports=SAME_HOST_DATAPLANE)`: no flag, the services' default
#: (rdma,shm,tcp: shm here, every node being on one host), for scenarios whose faults are not
#: network faults (process kills and stops, power loss, clock skew, restarts): they keep the
#: same-host path covered, whose bytes bypass partitions and netem.
SAME_HOST_DATAPLANE = ""


class FaultCluster:
    """One cluster in namespaces; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        base: Path,
        *,
        datanodes: int = 4,
        drives_per_datanode: int = 2,
        kvcache_nodes: int = 1,
        gateways: int = 1,
        drive_bytes: int = 96 << 20,
        tree: Path | None = None,
        clock_offsets: dict[str, float] | None = None,
        power_nodes: tuple[str, ...] = (),
        pool_drives: int = 0,
        kvcache_args: tuple[str, ...] = (),
        dataplane_transports: str = "tcp",
    ) -> None:
        self.base = base
        self.state = base / "state"
        self.datanodes = datanodes
        self.drives_per_datanode = drives_per_datanode
        self.kvcache_nodes = kvcache_nodes
        self.gateways = gateways
        #: The source tree (a checkout with libs/ and services/) each node runs; absent: this
        #: one. The upgrade test points nodes at an older release's tree (set_tree + restart).
        self.trees: dict[str, Path] = (
            {n: tree for n in self.node_names()[1:]} if tree is not None else {}
        )
        self.drive_bytes = drive_bytes
        #: Seconds each named node's wall clock runs off real time (tests/fault/skewclock.py).
        self.clock_offsets = dict(clock_offsets or {})
        #: Datanodes whose drives can lose power (tests/fault/powercut.py): ext4 on loop devices.
        self.power_nodes = set(power_nodes)
        self.power_drives: dict[str, list[powercut.PowerDrive]] = {}
        #: Drives per pool (the metadata's `pool_drives`); 0: every drive in one pool.
        self.pool_drives = pool_drives
        #: Flags added to every kvcache node's command line (arena size, durable-tier timeouts).
        self.kvcache_args = kvcache_args
        #: The data-plane transports datanodes, kvcache nodes and gateways serve. "tcp" (the
        #: default) puts their bulk bytes on the faulted network, so partitions and netem reach
        #: them; SAME_HOST_DATAPLANE (""): the services' default, shm first (a unix socket and
        #: shared memory, in no network namespace), which they bypass.
        self.dataplane_transports = dataplane_transports
        #: node -> a file whose content the node's processes see as the boot id (a "reboot").
        self.boot_ids: dict[str, Path] = {}
        self.fabric = netns.Fabric(subnet=os.getpid() % 200 + 20)
        self.children: dict[str, devcluster.Child] = {}
        self.etcd: devcluster.Child | None = None
        self.impairments: dict[str, subprocess.Popen[bytes]] = {}
        self.mounts: list[Path] = []
        self.info: dict[str, Any] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> FaultCluster:
        try:
            self.start()
        except BaseException:
            sys.stderr.write(self.logs())
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node_names(self) -> list[str]:
        """Every node, in start order."""
        names = ["etcd", "metadata-1"]
        names += [f"datanode-{i}" for i in range(1, self.datanodes + 1)]
        names += [f"kvcache-{i}" for i in range(1, self.kvcache_nodes + 1)]
        return [*names, *(f"gateway-{i}" for i in range(1, self.gateways + 1))]

    def address(self, node: str) -> str:
        """The node's address on the bridge."""
        return self.fabric.endpoints[node].address

    @property
    def etcd_endpoint(self) -> str:
        """etcd's host:port as every node dials it."""
        return f"{self.address('etcd')}:{ETCD_CLIENT_PORT}"

    def start(self) -> None:
        """Build the fabric, certificates and drives; start etcd and every service; wait ready."""
        netns.cleanup_stale()
        _cleanup_stale_mounts()
        powercut.cleanup_stale()
        pki.ensure_private_dir(self.state)
        pki.ensure_private_dir(self.state / "logs")
        (self.base / "owner.pid").write_text(str(os.getpid()))
        self.fabric.open()
        for node in self.node_names():
            self.fabric.add(node)
        self._issue_certificates()
        masterkey.write_new(self.state / devcluster.MASTER_KEY_FILE)
        self._start_etcd()
        for node in self.node_names()[1:]:
            self.children[node] = self._child(node)
            self.children[node].start()
        cmap = asyncio.run(self._wait_ready())
        asyncio.run(self._ensure_admin(cmap))
        self.info = self._cluster_info(cmap)

    def close(self) -> None:
        """Kill every process (SIGKILL), undo faults, remove namespaces, drives."""
        for proc in self.impairments.values():
            _terminate(proc, 5)
        self.impairments.clear()
        # SIGKILL, not an operator's stop: the scenario is over and nothing checks how its nodes
        # exit here (the rolling restart and upgrade tests check drains through stop()), and a
        # drain costs every teardown its lame-duck linger and gRPC grace (about 2 s in CI). A
        # SIGKILL also ends a stopped process; no node leaves anything behind outside the
        # cluster's directory, namespaces and drives, removed below.
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        if self.etcd is not None and self.etcd.proc is not None:
            procs.append(self.etcd.proc)
        _kill_all(procs)
        self.fabric.close()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        self.mounts.clear()
        for drives in self.power_drives.values():
            for drive in drives:
                drive.close()
        self.power_drives.clear()

    # -- faults -------------------------------------------------------------------------------

    def partition(self, a: str, b: str) -> None:
        """Silently drop every packet between nodes a and b (both ways) until heal(a, b)."""
        self.fabric.partition(a, b)

    def heal(self, a: str, b: str) -> None:
        """Undo partition(a, b)."""
        self.fabric.heal(a, b)

    def impair(self, node: str, *, delay_ms: float, loss: float = 0.0, jitter_ms: float = 0.0,
               seed: int = 0) -> None:  # fmt: skip
        """Delay (± jitter: reordering) and drop node's outgoing packets until unimpair(node)."""
        end = self.fabric.endpoints[node]
        ready = self.base / f"netem-{node}.ready"
        ready.unlink(missing_ok=True)
        argv = [
            "ip", "netns", "exec", end.ns, sys.executable, "-m", "tests.fault.netem",
            f"--subnet=127.77.{self.fabric.subnet}.0/24", f"--address={end.address}",
            f"--macs={json.dumps(self.fabric.mac_table())}", f"--delay-ms={delay_ms}",
            f"--jitter-ms={jitter_ms}", f"--loss={loss}", f"--seed={seed}",
            f"--ready-file={ready}",
        ]  # fmt: skip
        with devcluster.open_log(self.state / "logs" / f"netem-{node}.log") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_repo_root())
        self.impairments[node] = proc
        _wait(lambda: ready.exists() or proc.poll() is not None, 20, f"netem on {node}")
        if proc.poll() is not None:
            raise AssertionError(f"netem on {node} exited {proc.returncode}: {self.logs()}")

    def unimpair(self, node: str) -> None:
        """Undo impair(node): the route goes back to eth0."""
        proc = self.impairments.pop(node, None)
        if proc is not None:
            _terminate(proc, 10)

    def signal(self, node: str, sig: signals.Signals) -> None:
        """Send sig to node's process (etcd included); for SIGKILL, SIGSTOP and SIGCONT, return
        once it took effect."""
        child = self.etcd if node == "etcd" else self.children[node]
        assert child is not None
        assert child.proc is not None
        child.proc.send_signal(sig)
        if sig == signals.SIGKILL:
            child.proc.wait(30)
        elif sig == signals.SIGSTOP:  # delivered asynchronously: return once it is stopped
            _wait(lambda: self.process_state(node) == "T", 10, f"{node} stopped")
        elif sig == signals.SIGCONT:
            _wait(lambda: self.process_state(node) != "T", 10, f"{node} running")

    def restart(self, node: str) -> None:
        """Start node again (same identity, data and flags) and wait until the cluster is ready."""
        self.stop(node)
        self.children[node] = self._child(node)  # its tree may have changed (set_tree)
        self.children[node].start()
        asyncio.run(self._wait_ready())

    def restart_all(self, nodes: list[str]) -> None:
        """Start nodes again together (same identities, data and flags), then wait until the
        cluster is ready: for nodes that are all down at once (one node's restart waits for a
        ready cluster, which needs the others)."""
        for node in nodes:
            self.stop(node)
            self.children[node] = self._child(node)
            self.children[node].start()
        asyncio.run(self._wait_ready())

    def stop(self, node: str, grace_s: float = 15) -> int | None:
        """Stop node as an operator does (SIGTERM; SIGKILL after grace_s); its exit code
        (None when it was not running)."""
        child = self.children[node]
        if not child.running():
            return None
        assert child.proc is not None
        _terminate(child.proc, grace_s)
        return child.proc.returncode

    def set_tree(self, node: str, tree: Path | None) -> None:
        """Run node from another source tree (None: this checkout) from its next start."""
        if tree is None:
            self.trees.pop(node, None)
        else:
            self.trees[node] = tree

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Wait until every node is in the map and SERVING; returns the seconds it took."""
        started = time.monotonic()
        asyncio.run(self._wait_ready(timeout_s))
        return time.monotonic() - started

    def drive_path(self, node: str, index: int) -> Path:
        """Drive index of datanode node (a tmpfs of drive_bytes)."""
        return self.state / "nodes" / node / f"kvtft-drive{index}"

    def fill_drive(self, node: str, index: int) -> int:
        """Fill drive index of node until the filesystem says ENOSPC; returns bytes written."""
        filler = self.drive_path(node, index) / "kvtft-filler"
        written = 0
        chunk = b"\0" * (1 << 20)
        with filler.open("ab") as out:
            try:
                while True:
                    out.write(chunk)
                    out.flush()
                    written += len(chunk)
            except OSError:
                pass
        return written

    def free_drive(self, node: str, index: int) -> None:
        """Undo fill_drive."""
        (self.drive_path(node, index) / "kvtft-filler").unlink(missing_ok=True)

    def connect_s(self, src: str, dst: str, port: int, timeout_s: float = 1.5) -> float | None:
        """Seconds a TCP connect from src's namespace to dst:port takes; None when it times out
        (a partition) or is refused. Checks that a fault is in place."""
        code = (
            "import socket, sys, time\n"
            "t = time.monotonic()\n"
            "try:\n"
            f"    socket.create_connection(({self.address(dst)!r}, {port}), timeout={timeout_s})\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
            "print(time.monotonic() - t)\n"
        )
        argv = ["ip", "netns", "exec", self.fabric.endpoints[src].ns, sys.executable, "-c", code]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return float(result.stdout) if result.returncode == 0 else None

    def process_state(self, node: str) -> str:
        """The node's process state letter from /proc (R, S, T for stopped, ...)."""
        child = self.etcd if node == "etcd" else self.children[node]
        assert child is not None
        assert child.proc is not None
        with open(f"/proc/{child.proc.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0]

    def logs(self, tail_chars: int = 4000) -> str:
        """Every node's log tail, for failure reports."""
        parts = []
        for log in sorted((self.state / "logs").glob("*.log")):
            parts.append(f"===== {log.name}\n{log.read_text(errors='replace')[-tail_chars:]}")
        return "\n".join(parts)

    # -- start-up -----------------------------------------------------------------------------

    def _issue_certificates(self) -> None:
        directory = devcluster.pki_dir(self.state)
        authority = pki.new_authority(f"kvtier-fault-{os.urandom(3).hex()}")
        pki.write_authority(directory, authority)
        roles = {"etcd": "etcd", "metadata-1": "metadata", "gateway-1": "gateway"}
        for node in self.node_names():
            role = roles.get(node, node.split("-")[0])
            hosts = [self.address(node), "127.0.0.1", "localhost"]
            pki.write_pair(directory, node, authority.issue(role, node, hosts=hosts))
        pki.write_pair(directory, "operator", authority.issue("operator", "operator"))

    def _etcd_tls(self) -> etcdserver.EtcdTLS:
        certs = devcluster.pki_dir(self.state)
        return etcdserver.EtcdTLS(
            str(certs / pki.CA_CERT), str(certs / "etcd.crt"), str(certs / "etcd.key")
        )

    def _start_etcd(self) -> None:
        end = self.fabric.endpoints["etcd"]
        client = f"https://{end.address}:{ETCD_CLIENT_PORT}"
        peer = "https://127.0.0.1:2380"
        argv = [
            "ip", "netns", "exec", end.ns, etcdserver.find_binary("etcd"), "--name=kvtier",
            f"--data-dir={self.state / 'etcd'}", f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}", f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=kvtier={peer}",
            "--log-level=warn", *self._etcd_tls().args(),
        ]  # fmt: skip
        self.etcd = devcluster.Child("etcd", "etcd", argv, self.state / "logs" / "etcd.log")
        self.etcd.start()
        context = self._etcd_tls().context()

        def healthy() -> bool:
            assert self.etcd is not None
            if not self.etcd.running():
                raise AssertionError(f"etcd exited: {self.etcd.log_tail()}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1, context=context) as r:
                    return bool(json.loads(r.read()).get("health") == "true")
            except (OSError, ValueError):
                return False

        _wait(healthy, 30, "etcd healthy")

    def _child(self, node: str) -> devcluster.Child:
        role = node.split("-")[0]
        end = self.fabric.endpoints[node]
        certs = devcluster.pki_dir(self.state)
        master_key = f"--master-key-file={self.state / devcluster.MASTER_KEY_FILE}"
        data = self.state / "nodes" / node
        extra: list[str] = {
            "metadata": [f"--pool-drives={self._pool_drives()}", master_key],
            "kvcache": [f"--data-dir={data}", "--arena-bytes=67108864", "--page-bytes=4194304"],
            "gateway": [master_key, f"--s3-port={S3_PORT}"],
        }.get(role, [])
        if role == "datanode":
            extra = [f"--data-dir={data}", f"--drives={','.join(map(str, self._drives(node)))}"]
        elif role == "kvcache":
            extra += self.kvcache_args  # later flags win: arena size, durable-tier timeouts
        if self.dataplane_transports and role in ("datanode", "kvcache", "gateway"):
            extra.append(f"--dataplane-transports={self.dataplane_transports}")
        tree = self.trees.get(node)
        reboot = powercut.reboot_argv(self.boot_ids[node]) if node in self.boot_ids else []
        # Another tree: its directory first on the path (`-m services.x` and `import kvtier`
        # resolve there before the venv's editable install of this checkout); env execs.
        python = (
            ["env", "-C", str(tree), f"PYTHONPATH={tree / 'libs'}:{tree}", sys.executable]
            if tree is not None
            else [sys.executable]
        )
        # Fixed ports: each node has an address of its own, and a restarted node must come
        # back where its clients (the KV SDK's metadata address, S3 clients) know it.
        argv = [
            "ip", "netns", "exec", end.ns, *reboot, *python, *self._launch(node, role),
            f"--node-id={node}", f"--etcd-endpoints={self.etcd_endpoint}",
            f"--etcd-prefix={devcluster.ETCD_PREFIX}", f"--host={end.address}",
            f"--grpc-port={GRPC_PORT}", f"--client-port={CLIENT_PORT}", "--metrics-port=-1",
            f"--lease-ttl-s={LEASE_TTL_S}", "--shutdown-grace-s=2",
            f"--tls-ca-file={certs / pki.CA_CERT}", f"--tls-cert-file={certs / f'{node}.crt'}",
            f"--tls-key-file={certs / f'{node}.key'}", *extra,
        ]  # fmt: skip
        return devcluster.Child(node, role, argv, self.state / "logs" / f"{node}.log")

    def _pool_drives(self) -> int:
        return self.pool_drives or self.datanodes * self.drives_per_datanode

    def _launch(self, node: str, role: str) -> list[str]:
        """How python runs the node's service: `-m services.<role>`, through skewclock.py when
        the node's clock is skewed."""
        offset = self.clock_offsets.get(node)
        if not offset:
            return ["-m", f"services.{role}"]
        return [str(Path(__file__).with_name("skewclock.py")), str(offset), f"services.{role}"]

    def _drives(self, node: str) -> list[Path]:
        paths = []
        for index in range(self.drives_per_datanode):
            path = self.drive_path(node, index)
            if node in self.power_nodes and len(self.power_drives.get(node, [])) <= index:
                drive = powercut.PowerDrive(
                    powercut.image_path(node, index), path, self.drive_bytes
                )
                self.power_drives.setdefault(node, []).append(drive)
                drive.create()
            elif not path.exists():
                path.mkdir(parents=True)
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={self.drive_bytes},mode=0700",
                     "kvtft-drive", str(path)],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip
                self.mounts.append(path)
            paths.append(path)
        return paths

    def operator_security(self) -> security.ClientSecurity:
        """Mutual TLS as the operator (etcd, service ports)."""
        return devcluster.operator_security(self.state)

    def user_security(self) -> security.ClientSecurity:
        """The admin user over TLS to the client ports (what SDK users do)."""
        return security.ClientSecurity(
            ca_file=str(devcluster.pki_dir(self.state) / pki.CA_CERT),
            access_key=self.info["s3_access_key"],
            secret_key=self.info["s3_secret_key"],
            token_address=self.info["metadata_client"],
        )

    async def _store(self) -> membership.EtcdMembership:
        store = membership.EtcdMembership(
            (self.etcd_endpoint,), devcluster.ETCD_PREFIX, security=self.operator_security()
        )
        await store.connect(wait_s=10)
        return store

    async def _wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> common_pb2.ClusterMap:
        expected = {"metadata": 1, "datanode": self.datanodes, "kvcache": self.kvcache_nodes,
                    "gateway": self.gateways}  # fmt: skip
        store = await self._store()
        try:
            deadline = time.monotonic() + timeout_s
            last = "no map yet"
            while time.monotonic() < deadline:
                for child in self.children.values():
                    if child.proc is not None and not child.running():
                        raise AssertionError(f"{child.name} exited: {child.log_tail()}")
                try:
                    cmap = (await asyncio.wait_for(store.get_map(), 5)).map
                    ok, last = await asyncio.wait_for(
                        devcluster._ready(cmap, expected, self.operator_security()), 10
                    )
                except Exception as exc:  # a loaded machine: not ready yet
                    ok, last = False, repr(exc)
                if ok:
                    return cmap
                await asyncio.sleep(0.2)
            raise AssertionError(f"cluster not ready after {timeout_s:g}s: {last}")
        finally:
            await store.close()

    async def _ensure_admin(self, cmap: common_pb2.ClusterMap) -> None:
        metadata = next(n for n in cmap.nodes if n.node_id == "metadata-1")
        store = await self._store()
        try:
            key = masterkey.load(str(self.state / devcluster.MASTER_KEY_FILE))
            assert key is not None
            await devcluster.ensure_admin(
                metadata.grpc_address, users.UserStore(store, key),
                devcluster.credentials(self.state), self.operator_security(),
            )  # fmt: skip
        finally:
            await store.close()

    def _cluster_info(self, cmap: common_pb2.ClusterMap) -> dict[str, Any]:
        by_id = {n.node_id: n for n in cmap.nodes}
        creds = devcluster.credentials(self.state)
        metadata, gateway = by_id["metadata-1"], by_id["gateway-1"]
        return {
            "ca_file": str(devcluster.pki_dir(self.state) / pki.CA_CERT),
            "etcd": self.etcd_endpoint,
            "metadata": metadata.grpc_address,
            "metadata_client": metadata.client_address or metadata.grpc_address,
            "gateway_grpc": gateway.client_address or gateway.grpc_address,
            "gateway_s3": f"https://{gateway.s3_address}",
            "gateways_s3": [
                by_id[n].s3_address for n in self.node_names() if n.startswith("gateway-")
            ],
            "s3_access_key": creds["access_key"],
            "s3_secret_key": creds["secret_key"],
            "kvcache_clients": [
                by_id[n].client_address or by_id[n].grpc_address
                for n in self.node_names()
                if n.startswith("kvcache-") and n in by_id
            ],
        }


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(0.05)


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signals.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process at once and reap them."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for proc in procs:
        proc.wait(30)


def _cleanup_stale_mounts() -> None:
    """Unmount drives of earlier runs (the tmpfs device name is the harness's own)."""
    with open("/proc/mounts") as mounts:
        stale = [line.split()[1] for line in mounts if line.startswith("kvtft-drive ")]
    for path in stale:
        owner = _owner_pid(path)
        if owner is None or not netns.pid_alive(owner) or owner == os.getpid():
            subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def _owner_pid(path: str) -> int | None:
    marker = Path(path).parent.parent.parent.parent / "owner.pid"
    try:
        return int(marker.read_text())
    except (OSError, ValueError):
        return None


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])
