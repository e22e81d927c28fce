"""Network namespaces, a bridge and veth pairs for the fault harness (root; iproute2's `ip`).

Topology: the bridge lives in the root namespace with the address 127.77.N.1/24 (so the test
process reaches every node directly); each node gets a namespace `kvtft-<pid>-<node>` whose
`eth0` (a veth whose peer is a bridge port) has 127.77.N.<k>/24 and a fixed MAC address.

127.0.0.0/8 addresses on a non-loopback interface are martians unless `route_localnet` is set
on it: it is set in each node namespace (`all` and `eth0`) and on the bridge only (an interface
the harness owns, removed with it). The route 127.77.N.0/24 via the bridge wins over the local
127.0.0.0/8 route because the kernel merges the local and main tables into one longest-prefix
trie while no policy rules are added.

Neighbours are static (permanent entries for every peer, no ARP), so a partition is a neighbour
entry pointing at a MAC address nobody has: frames are flooded by the bridge and dropped by
every receiver as not theirs. That is a silent DROP, in both directions when set on both sides,
and needs neither iptables nor nft (absent from this machine's image; the kernel has no netem
either, see tests/fault/netem.py). One exception: where br_netfilter is loaded (Docker loads it
and sets iptables' FORWARD policy to DROP), frames between bridge ports traverse iptables, so the
fabric accepts its own bridge's in FORWARD while it exists (`Fabric._forwarding`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

PREFIX = "kvtft-"
BLACKHOLE_MAC = "02:00:00:00:00:00"
NETNS_DIR = Path("/run/netns")
_SERIALS = itertools.count(1)


class NetError(Exception):
    """An `ip` command failed; the message has its output."""


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run `ip [-n ns] ARGS`; NetError with its output when it fails (and check)."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def sysctl(ns: str | None, *settings: str) -> None:
    """Set sysctls (`key=value`) in namespace ns (None: the root namespace)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    argv = [*prefix, "sysctl", "-q", "-w", *settings]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {result.stderr.strip()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_pids(ns: str) -> None:
    """SIGKILL every process left in ns (only the harness starts processes there)."""
    for line in ip("netns", "pids", ns, check=False).split():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(line), 9)


def cleanup_stale() -> list[str]:
    """Remove the namespaces and bridges of harness runs whose process is gone; returns them."""
    removed = []
    names = [p.name for p in NETNS_DIR.glob(f"{PREFIX}*")] if NETNS_DIR.exists() else []
    # Only our bridges (kvtft-<pid>b): a line of another run's veth port names its namespace
    # (link-netns kvtft-...) too, and its own name is no pid.
    links = [
        name
        for line in ip("-o", "link", "show").splitlines()
        if (name := line.split(":")[1].strip().split("@")[0]).startswith(PREFIX)
    ]
    for name in [*names, *links]:
        try:
            owner = int(name[len(PREFIX) :].split("-")[0].split("b")[0])
        except ValueError:
            continue
        if pid_alive(owner) and owner != os.getpid():
            continue
        if name in names:
            kill_namespace_pids(name)
            ip("netns", "delete", name, check=False)
        else:
            ip("link", "delete", name, check=False)
        removed.append(name)
    return removed


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """One node's place on the bridge."""

    node: str
    ns: str
    address: str
    mac: str
    port: str  # the bridge-side veth


class Fabric:
    """The bridge and one namespace per node; `close()` removes all of it (idempotent)."""

    def __init__(self, subnet: int) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.subnet = subnet
        self.bridge = f"{self.tag}b"  # 15 characters at most: an interface name
        self.gateway_address = f"127.77.{subnet}.1"
        self.endpoints: dict[str, Endpoint] = {}
        self._blocked: set[frozenset[str]] = set()
        self.serial = next(_SERIALS)

    def open(self) -> None:
        """Create the bridge with the root namespace's address on it."""
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "address", "02:77:00:00:00:01")
        sysctl(None, f"net.ipv4.conf.{self.bridge}.route_localnet=1")
        ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self._forwarding("-I")

    def _forwarding(self, action: str) -> None:
        """With br_netfilter loaded (Docker loads it and sets iptables' FORWARD policy to DROP),
        frames between two ports of a bridge pass the FORWARD chain: accept those of our bridge,
        as Docker does for its own (`-I`: insert, `-D`: delete). Nothing to do without it."""
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if shutil.which("iptables") is None or not nf.exists() or nf.read_text().strip() != "1":
            return
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        subprocess.run(["iptables", action, *rule], check=action == "-I", capture_output=True,
                       timeout=30)  # fmt: skip

    def add(self, node: str) -> Endpoint:
        """A namespace for node on the bridge, with the next address; static neighbours."""
        index = len(self.endpoints) + 2
        ns = f"{self.tag}-{node}"
        # 15 characters at most; unique per fabric, as a deleted namespace's veth may linger.
        port = f"kv{os.getpid():x}{self.serial:x}{index:02x}"
        end = Endpoint(
            node, ns, f"127.77.{self.subnet}.{index}", f"02:77:00:00:00:{index:02x}", port
        )
        ip("netns", "add", ns)
        ip("link", "add", end.port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", end.port, "master", self.bridge, "up")
        ip("link", "set", "lo", "up", ns=ns)
        ip("link", "set", "eth0", "address", end.mac, ns=ns)
        sysctl(ns, "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.eth0.route_localnet=1")
        ip("addr", "add", f"{end.address}/24", "dev", "eth0", ns=ns)
        ip("link", "set", "eth0", "up", ns=ns)
        ip("neigh", "replace", self.gateway_address, "lladdr", "02:77:00:00:00:01",
           "nud", "permanent", "dev", "eth0", ns=ns)  # fmt: skip
        for other in self.endpoints.values():
            self._neigh(end, other, other.mac)
            self._neigh(other, end, end.mac)
        ip("neigh", "replace", end.address, "lladdr", end.mac, "nud", "permanent",
           "dev", self.bridge)  # fmt: skip
        self.endpoints[node] = end
        return end

    def _neigh(self, at: Endpoint, peer: Endpoint, mac: str) -> None:
        ip("neigh", "replace", peer.address, "lladdr", mac, "nud", "permanent", "dev", "eth0",
           ns=at.ns)  # fmt: skip

    def partition(self, a: str, b: str) -> None:
        """Drop every frame between nodes a and b, both ways (see the module docstring)."""
        ea, eb = self.endpoints[a], self.endpoints[b]
        self._neigh(ea, eb, BLACKHOLE_MAC)
        self._neigh(eb, ea, BLACKHOLE_MAC)
        self._blocked.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        """Undo partition(a, b)."""
        ea, eb = self.endpoints[a], self.endpoints[b]
        self._neigh(ea, eb, eb.mac)
        self._neigh(eb, ea, ea.mac)
        self._blocked.discard(frozenset((a, b)))

    def heal_all(self) -> None:
        """Undo every partition."""
        for pair in list(self._blocked):
            self.heal(*sorted(pair))

    def mac_table(self) -> dict[str, str]:
        """address -> MAC of every node and of the root namespace's bridge."""
        table = {e.address: e.mac for e in self.endpoints.values()}
        table[self.gateway_address] = "02:77:00:00:00:01"
        return table

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them and the bridge. Idempotent."""
        for end in self.endpoints.values():
            if (NETNS_DIR / end.ns).exists():
                kill_namespace_pids(end.ns)
                deadline = time.monotonic() + 10
                while ip("netns", "pids", end.ns, check=False).strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                # The root side first: a deleted namespace's devices go away asynchronously.
                ip("link", "delete", end.port, check=False)
                ip("netns", "delete", end.ns, check=False)
        self.endpoints.clear()
        ip("link", "delete", self.bridge, check=False)
        self._forwarding("-D")
