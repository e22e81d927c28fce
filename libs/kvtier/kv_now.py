"""The sync `KVClient`'s short path for small operations: no task, no loop iteration per call.

`kvtier.kv_sync.KVClient` owns its event loop and runs it only inside its own operations. Between
them the data-plane connections are idle, so a get, exists or lookup whose owners all have an
open tcp session is sent straight from the calling thread (`tcp.Client.begin_call_now`), and its
reply is received on the socket in the same thread: a short spin, then a sleep in `select` until
the reply or the deadline (`tcp.Client.wait_now`; with several owner nodes only the last reply
is spun for). Only what needs the loop goes to it: a send that waits for the socket, a failed
node (marked down as `kvnodes.NodeSet.run` does), corrupt blocks to delete.

Puts never take this path: a put into a write-through namespace is answered only once the
node's upload committed (up to its write_through_timeout_s), which no spin should wait for; they
run on the loop. A reply that comes after the spin is waited for in `select` until the call's
deadline (the transport's timeout_s), never a shorter one.

Each function returns None when the short path does not apply (map to refresh, no session yet,
not tcp, bytes in flight, a connection lost); nothing was then changed, and the caller runs the
full asynchronous operation of `kvtier.kv.AsyncKVClient`, which behaves the same (the operations
here are idempotent reads). Errors the node raises (InvalidArgument, PermissionDenied, ...) are
raised as the asynchronous client raises them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import prometheus_client

from kvtier import blocksums, errors, kv, kv_routing, kvnodes
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base, tcp, tcp_client

#: How long a caller spins on its socket for a reply before it sleeps in select (as the loop
#: path does): loopback and same-rack replies to small calls come within it, and a sleep costs a
#: wake-up (25-40 µs here). After repeated misses spinning pauses (`tcp.Client._poll`): on a
#: busy host the spin would take the CPU the server needs.
SPIN_S = 300e-6

SHORT_OPS = prometheus_client.Counter(
    "kvtier_kv_client_short_path_total",
    "Sync KV client operations served on the short path (no event loop)",
    ["op"],
)
_SHORT_GET, _SHORT_EXISTS, _SHORT_LOOKUP, _SHORT_SCORE = (
    SHORT_OPS.labels(op) for op in ("get", "exists", "lookup", "score")
)


@dataclass(slots=True)
class _Job:
    """One node's call of an operation."""

    plan: kvnodes.Plan
    transport: tcp.Client
    request: bytes
    intos: Sequence[memoryview] = ()
    op: tcp_client.CallOp | None = None


class _Fallback(Exception):
    """The short path cannot finish this operation: run the full one."""


def get_batch(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, keys: Sequence[bytes],
    buffers: Sequence[Any],
) -> list[int | None] | None:  # fmt: skip
    """`AsyncKVClient.get_batch` (one rank of owners), or None when it must run in full."""
    if len(keys) != len(buffers) or not keys:
        return None
    started = time.perf_counter()
    views = [base.as_buffer(b, writable=True) for b in buffers]
    if blocksums.parallel(views):
        return None  # a large batch: hashed on threads by the full path
    jobs = _jobs(client, keys, 0, views)
    if jobs is None:
        return None
    for job in jobs:
        job.request = pb.BatchGetRequest(
            namespace=client._ns, keys=[keys[i] for i in job.plan.indices]
        ).SerializeToString()
    replies = _run(client, loop, jobs, pb.CALL_METHOD_BATCH_GET, "get")
    if replies is None:
        return None
    sizes: list[int | None] = [None] * len(keys)
    for job, reply in zip(jobs, replies, strict=True):
        if reply is not None:
            _got(client, loop, keys, job, pb.BatchGetResponse.FromString(reply), sizes)
    if client.replicas > 1 and None in sizes:
        return None  # misses may be on further replicas: the full path asks them
    kv._OPS_GET.observe(time.perf_counter() - started)
    _SHORT_GET.inc()
    return sizes


def _got(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, keys: Sequence[bytes], job: _Job,
    reply: pb.BatchGetResponse, sizes: list[int | None],
) -> None:  # fmt: skip
    """Take one node's get reply: sizes of the hits, verified against their checksums."""
    client._set.saw_epoch(reply.epoch)
    verify = client.verify_checksums
    wrong: list[tuple[int, memoryview, int]] = []  # (position, bytes read, expected checksum)
    found: list[int] = []
    for index, view, item in zip(job.plan.indices, job.intos, reply.items, strict=True):
        status = item.status
        if status == pb.ITEM_STATUS_OK:
            size = sizes[index] = item.size
            # Checked as the hits are taken (`kv.checksummed`, without a list per reply).
            if verify and item.HasField("checksum"):
                got = blocksums.checksum(view[:size])
                if got != item.checksum:
                    wrong.append((index, view[:size], item.checksum))
                    found.append(got)
        elif status == pb.ITEM_STATUS_BUFFER_TOO_SMALL:
            raise errors.InvalidArgument(
                f"buffer {index} holds {view.nbytes} bytes; its block has {item.size}"
            )
    if wrong:
        bad = client.mismatches(job.plan, keys, wrong, found, sizes)
        loop.run_until_complete(client._drop_corrupt(job.plan.node, bad))


def exists_batch(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, keys: Sequence[bytes]
) -> list[bool] | None:
    """`AsyncKVClient.exists_batch` (one rank of owners), or None when it must run in full."""
    if not keys:
        return None
    started = time.perf_counter()
    jobs = _jobs(client, keys, 0, None)
    if jobs is None:
        return None
    for job in jobs:
        job.request = pb.BatchExistsRequest(
            namespace=client._ns, keys=[keys[i] for i in job.plan.indices]
        ).SerializeToString()
    replies = _run(client, loop, jobs, pb.CALL_METHOD_BATCH_EXISTS, "exists")
    if replies is None:
        return None
    present = [False] * len(keys)
    for job, reply in zip(jobs, replies, strict=True):
        if reply is not None:
            answer = pb.BatchExistsResponse.FromString(reply)
            client._set.saw_epoch(answer.epoch)
            for index, flag in zip(job.plan.indices, answer.present, strict=True):
                present[index] = flag
    if client.replicas > 1 and not all(present):
        return None
    kv._OPS_EXISTS.observe(time.perf_counter() - started)
    _SHORT_EXISTS.inc()
    return present


def lookup(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, chain: Sequence[bytes]
) -> int | None:
    """`AsyncKVClient.lookup` (see `kvnodes.ChainProbe`), or None when it must run in full."""
    started = time.perf_counter()
    if not client._set.current():
        return None
    probe = kvnodes.ChainProbe(chain, client.replicas)
    while (plans := probe.next_plans(client._set)) is not None:
        jobs = _sessions(client, plans, None)
        if jobs is None:
            return None
        for job in jobs:
            job.request = pb.LookupRequest(
                namespace=client._ns, keys=probe.keys_of(job.plan)
            ).SerializeToString()
        replies = _run(client, loop, jobs, pb.CALL_METHOD_LOOKUP, "lookup")
        if replies is None:
            return None
        counts: list[int | None] = []
        for reply in replies:
            if reply is None:
                counts.append(None)
                continue
            answer = pb.LookupResponse.FromString(reply)
            client._set.saw_epoch(answer.epoch)
            counts.append(int(answer.count))
        probe.answered(plans, counts)
    kv._OPS_LOOKUP.observe(time.perf_counter() - started)
    _SHORT_LOOKUP.inc()
    return probe.run


def score(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, chain: Sequence[bytes]
) -> kv_routing.ChainScore | None:
    """`AsyncKVClient.score`, or None when it must run in full."""
    if not client._set.current():
        return None
    # Each node's ScoreRequest comes serialized with its plan: no message built per call.
    planned = client._set.probe_plans(chain, client._ns_head)
    if planned is None:
        return None
    plans = [plan for plan, _ in planned]
    jobs = _sessions(client, plans, None)
    if jobs is None:
        return None
    for job, (_, request) in zip(jobs, planned, strict=True):
        job.request = request
    replies = _run(client, loop, jobs, pb.CALL_METHOD_SCORE, "score")
    if replies is None:
        return None
    answers: list[pb.ScoreResponse | None] = []
    for reply in replies:
        answer = pb.ScoreResponse.FromString(reply) if reply is not None else None
        if answer is not None:
            client._set.saw_epoch(answer.epoch)
        answers.append(answer)
    _SHORT_SCORE.inc()
    return kv_routing.leading_runs(len(chain), [p.indices for p in plans], answers)


def _jobs(
    client: kv.AsyncKVClient, keys: Sequence[bytes], rank: int, views: list[memoryview] | None
) -> list[_Job] | None:
    """One job per owner node of the keys, or None when the map or a session is not ready."""
    if not client._set.current():
        return None
    return _sessions(client, client._set.plans(keys, rank), views)


def _sessions(
    client: kv.AsyncKVClient, plans: Sequence[kvnodes.Plan], views: list[memoryview] | None
) -> list[_Job] | None:
    """One job per plan; views: the receive buffers of the keys (each job takes its plan's)."""
    if not client._use_calls:
        return None
    jobs = []
    for plan in plans:
        session = client._set.open_session(plan.node)
        if session is None or not isinstance(session.transport, tcp.Client):
            return None
        if views is None:
            intos: Sequence[memoryview] = ()
        elif len(plans) == 1 and len(plan.indices) == len(views):
            intos = views  # one node owns them all, in order
        else:
            intos = [views[i] for i in plan.indices]
        jobs.append(_Job(plan, session.transport, b"", intos))
    return jobs


def _run(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, jobs: Sequence[_Job], method: int,
    op: str,
) -> list[bytes | None] | None:  # fmt: skip
    """Send every job's call, then take the replies in turn: each reply message, None for a
    node that could not answer (marked down), or None for all when a call could not be sent
    (the connection is lost or busy; what was sent is still waited for)."""
    if len(jobs) == 1:
        return _run_one(client, loop, jobs[0], method, op)
    sent: list[_Job] = []
    try:
        for job in jobs:
            job.op = job.transport.begin_call_now(method, job.request, job.intos)
            if job.op is None:
                raise _Fallback
            sent.append(job)
    except (_Fallback, errors.KVTierError) as exc:
        for job in sent:  # what went out is still waited for (its bytes leave the budget)
            _reply(client, loop, job, op, quiet=True)
        if isinstance(exc, _Fallback | base.PeerLost):
            return None
        raise
    replies: list[object] = []
    try:
        for job in jobs:
            # Only the last reply is spun for: while earlier ones are awaited the caller sleeps,
            # and the nodes still working have the CPUs (on a small host a spinning caller
            # would leave one node waiting for a core until the other is done).
            spin_s = SPIN_S if job is jobs[-1] else 0.0
            replies.append(_reply(client, loop, job, op, spin_s))
    except errors.KVTierError:
        for job in jobs[len(replies) + 1 :]:  # the node's error is raised: the rest still end
            _reply(client, loop, job, op, quiet=True)
        raise
    if any(reply is _LOST for reply in replies):
        return None  # the full path retries on a fresh connection
    return [reply if isinstance(reply, bytes) else None for reply in replies]


def _run_one(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, job: _Job, method: int, op: str
) -> list[bytes | None] | None:
    """`_run` of a single job (one owner node: every single-key operation)."""
    try:
        job.op = job.transport.begin_call_now(method, job.request, job.intos)
    except base.PeerLost:
        return None
    if job.op is None:
        return None
    reply = _reply(client, loop, job, op, SPIN_S)
    if reply is _LOST:
        return None
    return [reply if isinstance(reply, bytes) else None]


_LOST = object()


def _reply(
    client: kv.AsyncKVClient, loop: asyncio.AbstractEventLoop, job: _Job, op: str,
    spin_s: float = SPIN_S, *, quiet: bool = False,
) -> object:  # fmt: skip
    """job's reply message; None when its node failed (marked down); _LOST when the connection
    was lost (the caller retries). quiet: the result is dropped, errors included. spin_s: how
    long to spin for it before sleeping."""
    call = job.op
    assert call is not None
    transport = job.transport
    try:
        if transport.wait_now(call, spin_s):
            result = transport.end_call_now(call)
        else:
            result = loop.run_until_complete(transport.finish_call(call))
    except base.PeerLost:
        return _LOST
    except kvnodes.NODE_ERRORS as exc:
        if not quiet:
            loop.run_until_complete(client._set.failed(job.plan.node, op, exc))
        return None
    except errors.KVTierError:
        if quiet:
            return None
        raise
    client._set.succeeded(job.plan.node)
    return result.reply
