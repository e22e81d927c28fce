"""Who may read a kvcache node's KV events: ZMQ CURVE on both event sockets (docs/routing.md).

The events of every tenant go to one PUB socket (a ZMQ topic filter is no security boundary),
so with `kv_events_auth = curve` (the default of a secure cluster):

- The node makes a CURVE key pair at start, in memory only (a restart makes a new one), and
  both sockets (PUB and replay ROUTER) are CURVE servers with it: traffic is encrypted and a
  peer must prove it holds the secret key of its public key. The public key is announced in
  the node's NodeInfo (`kv_events_server_key`), which only authenticated callers can read.
- A subscriber makes its own key pair and sends only the public key to
  `KVCacheService.AuthorizeEventsSubscriber` (operators and admins: the authorization table);
  the node admits it for `kv_events_key_ttl_s`.
- ZMQ's ZAP handler (`zmq.auth.thread.ThreadAuthenticator`, its own thread) asks
  `SubscriberKeys.callback` at every handshake: registered and unexpired keys pass, every
  other one (and every peer not speaking CURVE) is refused before it sees a byte. Replay
  requests are checked again each (`events.EventPublisher`: the ZAP handler's User-Id is the
  key). ZAP runs only at a handshake, so an established PUB connection whose key's
  registration expires is cut by rebinding the PUB socket (`eventspub`: every subscriber goes
  through ZAP again; the registered ones rejoin without a gap).
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from collections.abc import Callable

import zmq
import zmq.auth.thread
from zmq.utils import z85

from kvtier import errors

log = logging.getLogger(__name__)

#: Most keys registered at once; past it the oldest registration goes (and its SUB is cut).
MAX_KEYS = 4096
#: A Z85 CURVE key: 40 characters for 32 bytes.
Z85_KEY_CHARS = 40


def check_public_key(key: str) -> bytes:
    """The Z85 text of a CURVE public key as bytes; InvalidArgument when it is none."""
    if len(key) != Z85_KEY_CHARS or not key.isascii():
        raise errors.InvalidArgument(
            f"client_public_key: a CURVE public key is {Z85_KEY_CHARS} Z85 characters"
        )
    raw = key.encode("ascii")
    try:
        z85.decode(raw)
    except (KeyError, ValueError, struct.error):  # a character outside Z85, a value past 2**32
        raise errors.InvalidArgument("client_public_key: not Z85 text") from None
    return raw


class SubscriberKeys:
    """This node's CURVE key pair and the subscriber keys admitted for now (thread-safe: the
    gRPC servicer registers on the event loop, the ZAP thread asks)."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        public, secret = zmq.curve_keypair()
        self.public_key = public.decode("ascii")
        self._secret = secret
        self._ttl_s, self._max_keys, self._clock = ttl_s, max_keys, clock
        self._lock = threading.Lock()
        #: key (Z85 bytes) -> monotonic expiry, oldest registration first.
        self._expiry: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._zap: zmq.auth.thread.ThreadAuthenticator | None = None

    def authorize(self, client_public_key: str) -> float:
        """Admit client_public_key for new connections for ttl_s (again from now when it is
        already admitted); returns ttl_s. Raises InvalidArgument for a malformed key."""
        key = check_public_key(client_public_key)
        with self._lock:
            self._expiry[key] = self._clock() + self._ttl_s
            self._expiry.move_to_end(key)
            while len(self._expiry) > self._max_keys:
                self._expiry.popitem(last=False)
        return self._ttl_s

    def admitted(self, key: bytes) -> bool:
        """Whether key (Z85 bytes) may open a connection now."""
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if expiry <= self._clock():
                del self._expiry[key]
                return False
            return True

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler's question at a CURVE handshake (pyzmq's credentials provider)."""
        allowed = self.admitted(key)
        if not allowed:  # debug: a refused peer retries every ZMQ reconnect interval (100 ms)
            log.debug("KV events: refused an unknown or expired CURVE key %s", key.decode())
        return allowed

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Answer ctx's ZAP requests (before any socket of ctx binds)."""
        zap = zmq.auth.thread.ThreadAuthenticator(ctx, log=log.getChild("zap"))
        zap.start()
        zap.configure_curve_callback("*", credentials_provider=self)
        self._zap = zap

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        """Make sock a CURVE server with this node's key pair (before it binds)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key.encode("ascii"))

    def stop(self) -> None:
        """Stop the ZAP thread (before ctx terminates). Idempotent."""
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
