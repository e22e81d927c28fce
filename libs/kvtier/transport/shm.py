"""The same-host data plane: peers map the owner's memfd regions and copy with memcpy.

Protocol, over a Unix SOCK_SEQPACKET socket (one message per send, fds travel with it):

    client                                       server
    HELLO token                        ->        check_token (an shm token), connections of the
                                                 identity < max, SO_PEERCRED uid == ours or 0
                                       <-        WELCOME ok | error code + message
    LEASE need, [descriptor...]        ->        issuer.check each; leases.acquire the good ones
                                       <-        ACK per-item status, first error, fds of regions
                                                 this connection has not been handed yet
    (memcpy between the caller's buffer and the mapping, no intermediate bytes)
    RELEASE [request...]  (reads)      ->        leases of those requests end (no reply)
    COMMIT request        (writes)     ->        leases end
                                       <-        COMMITTED: write() returns only after this

Calls (`base.Transport.call`; one round trip without payload segments, two with):

    CALL method, releases riding along,  ->      the node's call handler makes a plan
         message, segment lengths, capacities
                                       <-        SINKS a span per segment (region, offset,
                                                 length; 0: dropped), fds as for ACK, writable
    (the client copies each segment into its sink; skipped when no sink takes bytes)
    CALL_DONE request                  ->        on_received gives the reply
                                       <-        CALL_REPLY status, reply message (or error
                                                 text), a span per capacity, fds
    (the client copies each source into its buffer)
    RELEASE [request...]               ->        on_done(True): piggy-backed like a read's
                                                 (only sent when a source had bytes; without one
                                                 the server ends the plan when it replies)

A CALL, SINKS or CALL_REPLY longer than one message (MAX_MESSAGE) is cut into pieces: the first
carries LONG (body bytes and fds in all), MOREs the rest, at most MAX_REGIONS fds each. While a
plan is open its sinks and sources are leased (owner: the connection), so the pool never reuses
them under the client's copy; a RELEASE of a call still filling its sinks aborts it
(on_done(False)), as does the loss of the connection. A handler or on_received that returns an
awaitable is awaited in a task before SINKS or CALL_REPLY; other requests go on meanwhile.

Control messages are small fixed structs. A region's fd is passed once per connection (SCM_RIGHTS)
and mapped once; a client that has only leased for reading gets a read-only fd (reopened through
/proc/self/fd) and a read-only mapping, so a stray write by a buggy reader faults instead of
corrupting the pool; a writable fd follows on its first write lease.

Trust model: shm peers are same-host processes of the same uid (or root), and principals trusted
with whole regions (only they get shm tokens: `registry.choose`). Leases and descriptors (grant ids
included: a revoked grant is refused at LEASE) are enforced by this protocol, but a malicious local
process holding a mapping could touch other ranges of a region it was handed (or reopen a read-only
memfd writable through /proc; same-uid processes can ptrace each other anyway). The fd is only given
to a peer that presented a valid token over a socket in a 0700 directory, and whose uid the kernel
vouches for (SO_PEERCRED).

Performance (measured on the 2-vCPU VMs we run on; numbers in the constants' comments, which live
in shm_client and shm_copy):
- Batches are leased in windows (<= 16 MiB, <= the client's byte budget), up to _DEPTH ahead.
- Copies of windows of at least OFFLOAD_MIN_BYTES run in worker threads (ctypes.memmove releases
  the GIL), split across COPY_THREADS, so the loop stays free; two threads beat one by ~10-20%
  there. Smaller copies are memoryview slice assignments on the loop: a hand-off to an idle worker
  costs more than it saves.
- Pending RELEASEs ride on the next LEASE; a client polls briefly for its reply (_POLL_S).
- Mappings are not prefaulted (MAP_POPULATE costs ~140 ms/GiB on the loop); pages fault in once.
- Deadlines ride on the awaited replies (one sweep timer per connection), not a timer per op.

Modules: this one is the transport's interface (registry.load imports it by name); `shm_wire` holds
the message formats, status codes and the fd-passing channel, `shm_server` the serving side,
`shm_client` the client side, and `shm_copy` the mappings and the threaded copies.
"""

from __future__ import annotations

import os
import socket
import sys

from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry, shm_client, shm_server, shm_wire

NAME = shm_wire.NAME

#: What make_server() and connect() return.
Server = shm_server.Server
Client = shm_client.Client


def available() -> bool:
    """Linux with memfd regions and fd passing over Unix sockets."""
    return (
        sys.platform == "linux"
        and hasattr(os, "memfd_create")
        and hasattr(socket, "SCM_RIGHTS")
        and hasattr(socket, "SOCK_SEQPACKET")
    )


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> shm_server.Server:
    """The shm server of a node (not yet listening)."""
    return shm_server.Server(ctx, settings)


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> shm_client.Client:
    """Connect to a same-host peer's shm endpoint and authenticate.

    Raises PermissionDenied (token or uid refused), Unavailable (no server there),
    DeadlineExceeded (no answer within settings.timeout_s).
    """
    return await shm_client.connect(endpoint, token, settings)
