"""Datanodes this gateway suspects of silence: a call of theirs was left behind (services.gateway.
fanout.until_decided: a quorum decided without it and the grace passed) and none has answered
since.

A suspect gets no grace at all: once the answers in hand decide a call, its calls are left
behind at once. Without this state a silent node (a partition drops its packets: no RST, no
ICMP) would cost every operation through its sets the grace again whenever it had no call left
behind at that instant (its left-behind calls end at the data plane's deadline, or never
existed for this kind of call). A node stops being suspect on the first reply of any call to
it (`heard`; a service error counts: the node answered). Operations still send it their calls,
but one may not come for long (a GET of its sets, a listing), and some never tell (a staged
write's shard sends are cancelled when left behind): so while a node is suspect it is probed
every PROBE_INTERVAL_S with the cheapest call it answers (the owner's `probe`, given up after
PROBE_TIMEOUT_S), and the first answer clears it: a recovered node gets its grace, its shards
and its say in quorums back within about a second, with no client traffic. The probe ends when
the node is cleared, when it has left the cluster map (`probe` says so: it is forgotten), or
at `close`.

Shard reads have a suspicion of their own (`reads=True`): a node whose shard reads were left
behind while it was not suspect (it had the grace, and its other calls, a GET's metadata read
among them, may well answer) gets no grace for shard reads for READ_SUSPECT_S, unless a shard
read of its answers first. Without it, a node that answers metadata reads but hangs on data
(a hung data disk, a path that drops large frames) was cleared by every GET's metadata read
and its probe, and every GET paid the grace again. After READ_SUSPECT_S the next GET gives its
shard reads the grace once more (and marks it again if they still hang): one grace per
READ_SUSPECT_S instead of one per GET, and a node whose reads were only slow once is not
rebuilt around for long.

Never imports grpc.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import prometheus_client

from kvtier import errors

log = logging.getLogger(__name__)

SUSPECTS = prometheus_client.Gauge(
    "kvtier_gateway_suspect_datanodes",
    "Datanodes with calls left behind and no answer since (they get no straggler grace)",
)
SUSPECTED = prometheus_client.Counter(
    "kvtier_gateway_datanodes_suspected_total",
    "Times a datanode became suspect (a call of its was left behind while it had none)",
)
PROBES = prometheus_client.Counter(
    "kvtier_gateway_suspect_probes_total",
    "Probes of suspect datanodes that got an answer (answered: no longer suspect) or none in "
    "PROBE_TIMEOUT_S or a lost connection (silent)",
    ["outcome"],
)

#: A suspect datanode is probed this often (the first probe this long after it became one)...
PROBE_INTERVAL_S = 0.5
#: ... and a probe that got no answer in this long is given up (silent).
PROBE_TIMEOUT_S = 0.5
#: A node whose shard reads were left behind gets no grace for shard reads this long, unless
#: one of its shard reads answers first (module docstring).
READ_SUSPECT_S = 10.0
READS_SUSPECTED = prometheus_client.Counter(
    "kvtier_gateway_datanode_reads_suspected_total",
    "Times a datanode's shard reads were left behind while it was not suspect (no grace for its "
    "shard reads for READ_SUSPECT_S, whatever its other calls answer)",
)

#: The owner's probe of a node (Suspects): returns once the node answered a cheap call (an
#: error of its service counts), False when the node has left the cluster map (no call goes
#: there any more); raises when it did not answer (a deadline, a lost connection).
Probe = Callable[[str], Awaitable[bool]]


def is_silence(exc: BaseException) -> bool:
    """Whether a call's error says the node did not answer (deadline, lost connection, no
    route): a service's own error (NotFound, a refusal) is an answer."""
    return isinstance(exc, errors.DeadlineExceeded | errors.Unavailable)


class Suspects:
    """Per datanode: calls left behind still running, since when it is suspect, and its probe
    (with a `probe`: module docstring; without, a suspect waits for a call to clear it)."""

    def __init__(self, probe: Probe | None = None) -> None:
        self._since: dict[str, float] = {}
        #: Nodes whose shard reads get no grace, since when (module docstring).
        self._reads: dict[str, float] = {}
        self._left: dict[str, int] = {}
        self._probe = probe
        #: The probe task of each suspect (with a probe).
        self._probes: dict[str, asyncio.Task[None]] = {}

    def suspect(self, node_id: str, *, reads: bool = False) -> bool:
        """Whether node_id gets no grace (module docstring); reads: for shard reads."""
        return node_id in self._since or (reads and self._reads_suspect(node_id))

    def _reads_suspect(self, node_id: str) -> bool:
        since = self._reads.get(node_id)
        if since is None:
            return False
        if time.monotonic() - since < READ_SUSPECT_S:
            return True
        del self._reads[node_id]  # its shard reads get the grace again (module docstring)
        return False

    def left_behind(
        self, node_id: str, task: asyncio.Future[None] | None = None, *, reads: bool = False
    ) -> None:
        """A call of node_id was left behind (task: still running, counted until it ends);
        reads: a shard read left behind while node_id was not suspect (module docstring)."""
        if reads and not self._reads_suspect(node_id):  # (not renewed while it has no grace)
            self._reads[node_id] = time.monotonic()
            READS_SUSPECTED.inc()
            log.warning(
                "datanode %s: shard reads did not answer in time, no grace for them for %.0f s",
                node_id, READ_SUSPECT_S,
            )  # fmt: skip
        if node_id not in self._since:
            self._since[node_id] = time.monotonic()
            SUSPECTS.set(len(self._since))
            SUSPECTED.inc()
            log.warning(
                "datanode %s did not answer in time: suspect, no grace until it does", node_id
            )
            if self._probe is not None and node_id not in self._probes:
                self._probes[node_id] = asyncio.get_running_loop().create_task(
                    self._probing(node_id, self._probe), name=f"probe of datanode {node_id}"
                )
        if task is not None and not task.done():
            self._left[node_id] = self._left.get(node_id, 0) + 1
            task.add_done_callback(functools.partial(self._ended, node_id))

    def heard(self, node_id: str, *, reads: bool = False) -> None:
        """node_id answered a call (reads: a shard read): no longer suspect (its probe ends;
        for shard reads too when reads)."""
        if reads and self._reads.pop(node_id, None) is not None:
            log.info("datanode %s: shard reads answer again", node_id)
        since = self._since.pop(node_id, None)
        if since is not None:
            SUSPECTS.set(len(self._since))
            self._end_probe(node_id)
            log.info(
                "datanode %s answers again after %.1f s suspect", node_id, time.monotonic() - since
            )

    def forget(self, node_id: str) -> None:
        """node_id left the cluster map: no longer suspect, nor probed."""
        self._reads.pop(node_id, None)
        if self._since.pop(node_id, None) is not None:
            SUSPECTS.set(len(self._since))
            self._end_probe(node_id)
            log.info("datanode %s left the cluster map: no longer suspect", node_id)

    def probing(self) -> list[str]:
        """The nodes being probed now (tests, status)."""
        return sorted(node for node, task in self._probes.items() if not task.done())

    async def close(self) -> None:
        """End every probe (no new one starts): the owner closes."""
        self._probe = None
        probes, self._probes = self._probes, {}
        for task in probes.values():
            task.cancel()
        await asyncio.gather(*probes.values(), return_exceptions=True)

    def _end_probe(self, node_id: str) -> None:
        task = self._probes.pop(node_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # (a probe that got the answer ends on its own)

    async def _probing(self, node_id: str, probe: Probe) -> None:
        """Probe node_id until it is no longer suspect (it answered, or left the map): while
        it is and this is its probe (a probe that got the answer is no longer, even if the
        node is suspect again by then: a new probe started)."""
        me = asyncio.current_task()
        try:
            while node_id in self._since and self._probes.get(node_id) is me:
                await asyncio.sleep(PROBE_INTERVAL_S)
                try:
                    async with asyncio.timeout(PROBE_TIMEOUT_S):
                        named = await probe(node_id)
                except Exception as exc:  # TimeoutError, a lost connection: still silent
                    PROBES.labels("silent").inc()
                    log.debug("probe of suspect datanode %s: no answer (%r)", node_id, exc)
                    continue
                if not named:
                    self.forget(node_id)
                    continue
                PROBES.labels("answered").inc()
                if self._probes.get(node_id) is me:  # (not suspect again since the answer)
                    self.heard(node_id)  # (the call marked it heard already where it arrived)
        finally:
            if self._probes.get(node_id) is me:
                del self._probes[node_id]

    def left(self, node_id: str) -> int:
        """node_id's calls left behind and still running."""
        return self._left.get(node_id, 0)

    def _ended(self, node_id: str, task: asyncio.Future[None]) -> None:
        """A left-behind call ended: uncount it, retrieve its outcome (its errors were logged
        where raised; a reply marked the node heard where it arrived)."""
        left = self._left.get(node_id, 1) - 1
        if left > 0:
            self._left[node_id] = left
        else:
            self._left.pop(node_id, None)
        if not task.cancelled():
            task.exception()
