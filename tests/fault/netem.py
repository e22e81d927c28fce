"""Delay, jitter (hence reordering) and loss on a node's egress, in user space.

This machine's kernel is built without `sch_netem` (CONFIG_NET_SCH_NETEM is not set) and has
no loadable modules, so `tc qdisc add ... netem` fails. The same effect on one node's egress
(what `tc netem` on its eth0 would do) comes from a TUN device: run inside the node's namespace,
this process creates `fault0`, points the node's subnet route at it (so every packet the node
sends goes through this process), holds each packet for delay ± jitter, drops a fraction, and
sends the rest out of eth0 with an AF_PACKET socket, addressed to the peer's fixed MAC (the
fabric's neighbours are static, tests/fault/netns.py). Established connections follow the new
route at once (a route change invalidates cached routes). SIGTERM restores the route and exits.

Run: ip netns exec NS python -m tests.fault.netem --subnet 127.77.N.0/24 --address A
         --macs JSON --delay-ms 100 --loss 0.01 [--jitter-ms J] [--seed S]
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
ETH_P_IP = 0x0800
DEVICE = "fault0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _open_tun() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subnet", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--macs", required=True, help="JSON {address: mac}")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-file", default="")
    return parser.parse_args()


def main() -> int:
    args = _parse()
    rng = random.Random(args.seed)
    macs = {a: bytes.fromhex(m.replace(":", "")) for a, m in json.loads(args.macs).items()}
    tun = _open_tun()
    out = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    _ip("link", "set", DEVICE, "up", "mtu", "1500")
    for key in (f"net.ipv4.conf.{DEVICE}.route_localnet=1", f"net.ipv4.conf.{DEVICE}.rp_filter=0"):
        subprocess.run(["sysctl", "-q", "-w", key], check=True, timeout=10)
    _ip("route", "replace", args.subnet, "dev", DEVICE, "src", args.address)
    if args.ready_file:
        with open(args.ready_file, "w") as ready:
            ready.write(str(os.getpid()))
    queue: list[tuple[float, int, bytes]] = []
    seq = sent = dropped = 0
    try:
        while not stopping:
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, packet = heapq.heappop(queue)
                mac = macs.get(socket.inet_ntoa(packet[16:20]))
                if mac is not None:
                    try:
                        out.sendto(packet, ("eth0", ETH_P_IP, 0, 0, mac))
                        sent += 1
                    except OSError:
                        dropped += 1  # a full device queue is loss too
            wait = max(0.0, queue[0][0] - now) if queue else 0.2
            try:
                readable, _, _ = select.select([tun], [], [], wait)
            except InterruptedError:
                continue
            if not readable:
                continue
            packet = os.read(tun, 65535)
            if packet[:1] and packet[0] >> 4 != 4:
                continue  # IPv4 only: the fabric has no IPv6 addresses
            if rng.random() < args.loss:
                dropped += 1
                continue
            hold = args.delay_ms + (rng.uniform(-args.jitter_ms, args.jitter_ms))
            seq += 1
            heapq.heappush(queue, (time.monotonic() + max(0.0, hold) / 1000, seq, packet))
    finally:
        subprocess.run(
            ["ip", "route", "replace", args.subnet, "dev", "eth0", "proto", "kernel",
             "scope", "link", "src", args.address],
            check=False, timeout=10,
        )  # fmt: skip
        os.close(tun)
        sys.stderr.write(f"netem: sent {sent} dropped {dropped}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
