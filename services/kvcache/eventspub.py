"""The PUB side of a kvcache node's KV events: cutting subscribers whose registration lapsed.

ZAP (`eventsauth`) runs only at a connection's handshake, and libzmq cannot drop one peer of
a PUB socket, so a SUB connection opened while its key was registered would outlive the
registration. What was weighed (pyzmq 27, libzmq 4.3):

- A per-peer disconnect: libzmq has none for PUB/XPUB (ZMQ_ROUTER could, but a SUB cannot talk
  to one, and vLLM-format routers are SUBs). Shutting the peer's fd down from outside, found
  with a socket monitor, is no better: the monitor gives an fd but not the peer's key, the ZAP
  request gives the key and only the peer's IP (every router on one host looks the same), and
  the fd belongs to libzmq's I/O thread (it may be closed and reused under us).
- Per-subscriber session keys: every subscriber would need its own encryption of each batch,
  which vLLM's wire format has no place for.
- Re-handshaking everyone (what this does): the socket is an XPUB (the same wire protocol as a
  PUB for SUB peers) with ZMQ_XPUB_VERBOSE, so each subscription a peer sends reaches us with
  the ZAP handler's User-Id (the peer's public key) in its metadata. When a key that subscribed
  on the socket is no longer registered (expired, or pushed out by `eventsauth.MAX_KEYS`), the
  socket is closed and a new one bound on the same endpoint. Every SUB reconnects by itself
  (its reconnect interval, 100-200 ms by default) through ZAP: registered keys get back in,
  lapsed ones are refused. Events are held (queued, not dropped) until every key that was
  subscribed and is still registered has subscribed again, or `REJOIN_TIMEOUT_S` passed, so a
  registered subscriber that keeps reading sees no gap (one slower than that sees a sequence
  gap, which the replay socket fills).

So a lapsed subscriber receives nothing more within `CHECK_INTERVAL_S` plus a rebind (a few
ms) of its registration's end; registered subscribers see their events up to
`REJOIN_TIMEOUT_S` late at that moment. Without keys (`kv_events_auth = none`) the socket is
never rotated. Not thread-safe: the publisher's sender thread is its only user.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable, Sequence

import zmq

from services.kvcache import eventsauth, metrics

log = logging.getLogger(__name__)

#: How often the subscribed keys are checked against the registrations (the bound on how long
#: a lapsed subscriber still receives, give or take a rebind).
CHECK_INTERVAL_S = 0.1
#: Longest hold of the events after a rotation while registered subscribers rejoin.
REJOIN_TIMEOUT_S = 1.0
#: After this long without its port back (another process took it), a rebind failure is logged.
REBIND_WARN_S = 5.0
#: A subscription message starts with this byte (an unsubscription with 0).
_SUBSCRIBE = 1


class PubSocket:
    """The node's event socket (an XPUB): `send`, and `service()` in every turn of the sender
    loop (drains subscriptions, rotates the socket when a subscribed key's registration lapsed,
    says whether events may be sent now). keys None: unauthenticated, never rotated."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        hwm: int,
        keys: eventsauth.SubscriberKeys | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx, self._hwm, self._keys, self._clock = ctx, hwm, keys, clock
        self._ipv6 = False
        self._sock: zmq.Socket[bytes] | None = self._socket()
        self._bound = False
        self.endpoint = ""
        #: Keys that subscribed on the current socket (some may have gone since).
        self._subscribed: set[bytes] = set()
        #: Keys still registered that were subscribed before a rotation and have not rejoined.
        self._rejoining: set[bytes] = set()
        self._hold_until = 0.0
        self._unbound_since = 0.0
        self._next_check = 0.0
        #: Rotations so far (each one cut every lapsed subscriber).
        self.rotations = 0

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every peer's subscriptions, with their User-Id
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self._keys is not None:
            self._keys.serve(sock)
        return sock

    def bind(self, host: str, port: int) -> str:
        """Bind tcp://host:port (port 0: any free one) and return the endpoint; later
        rotations bind the same one. Raises zmq.ZMQError when it cannot be bound."""
        assert self._sock is not None
        if ":" in host:  # IPv6
            self._ipv6 = True
            self._sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host.strip('[]')}]"
        self._sock.bind(f"tcp://{host}:{port or '*'}")
        bound = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]
        self.endpoint = f"tcp://{host}:{bound}"
        self._bound = True
        return self.endpoint

    def send(self, message: Sequence[bytes]) -> None:
        """Publish message to the subscribed peers (never blocks: past a peer's HWM it is
        dropped for that peer, as a PUB does)."""
        if self._sock is None or not self._bound:
            return
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart(message, flags=zmq.NOBLOCK)

    def service(self) -> bool:
        """Drain the peers' subscriptions, rotate when a subscribed key lapsed; whether events
        may be sent now (False while registered subscribers rejoin after a rotation)."""
        if self._sock is None:
            return False
        if not self._bound and not self._rebind():
            return False
        while self._sock.poll(0):
            self._subscription(self._sock.recv(flags=zmq.NOBLOCK, copy=False))
        now = self._clock()
        if self._keys is not None and now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL_S
            lapsed = {key for key in self._subscribed if not self._keys.admitted(key)}
            if lapsed:
                self._rotate(lapsed, now)
                return False
        if self._rejoining and now >= self._hold_until:
            log.info(
                "KV events: %d registered subscribers did not rejoin within %.1f s; they see a "
                "sequence gap (replay fills it)", len(self._rejoining), REJOIN_TIMEOUT_S,
            )  # fmt: skip
            self._rejoining.clear()
        return not self._rejoining

    def wait(self, timeout_s: float) -> None:
        """Sleep until a peer sends a subscription or timeout_s passed (while holding)."""
        if self._sock is not None and self._bound:
            self._sock.poll(int(timeout_s * 1000))
        else:
            time.sleep(timeout_s)

    def close(self) -> None:
        """Close the socket (pending messages go with it). Idempotent."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _subscription(self, frame: zmq.Frame) -> None:
        if self._keys is None or frame.bytes[:1] != bytes([_SUBSCRIBE]):
            return  # unauthenticated, or an unsubscription (libzmq makes some, without a peer)
        try:
            key = str(frame.get("User-Id")).encode()  # the ZAP handler's: the Z85 public key
        except zmq.ZMQError:
            return
        self._subscribed.add(key)
        self._rejoining.discard(key)

    def _rotate(self, lapsed: set[bytes], now: float) -> None:
        """Close the socket (cutting every peer) and bind a new one on the same endpoint."""
        assert self._sock is not None
        assert self._keys is not None
        stay = (self._subscribed | self._rejoining) - lapsed
        self._rejoining = {key for key in stay if self._keys.admitted(key)}
        self._subscribed = set()
        self._hold_until = now + REJOIN_TIMEOUT_S
        self._sock.close(linger=0)
        self._sock = self._socket()
        self._bound = False
        self._unbound_since = now
        self.rotations += 1
        metrics.EVENT_SOCKET_ROTATIONS.inc()
        log.info(
            "KV events: cut %d subscribers whose registration lapsed (%d registered ones "
            "reconnect)", len(lapsed), len(self._rejoining),
        )  # fmt: skip
        self._rebind()

    def _rebind(self) -> bool:
        """Bind the new socket to the old endpoint; False while the port is not free yet (the
        old listener closes in libzmq's I/O thread)."""
        assert self._sock is not None
        try:
            self._sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if self._clock() - self._unbound_since > REBIND_WARN_S:
                log.error("KV events: %s still in use; nobody receives events", self.endpoint)
                self._unbound_since = self._clock()
            return False
        self._bound = True
        self._hold_until = max(self._hold_until, self._clock() + REJOIN_TIMEOUT_S / 2)
        return True
