"""Datanodes this gateway suspects of silence: a call of theirs was left behind (services.gateway.
fanout.until_decided: a quorum decided without it and the grace passed) and none has answered
since.

A suspect gets no grace at all: once the answers in hand decide a call, its calls are left
behind at once. Without this state a silent node (a partition drops its packets: no RST, no
ICMP) would cost every operation through its sets the grace again whenever it had no call left
behind at that instant (its left-behind calls end at the data plane's deadline, or never
existed for this kind of call). A node stops being suspect on the first reply of any call to
it (`heard`; a service error counts: the node answered): every operation still sends it its
calls, so the next one that gets through clears it, with no probe of its own.

Never imports grpc.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

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


def is_silence(exc: BaseException) -> bool:
    """Whether a call's error says the node did not answer (deadline, lost connection, no
    route): a service's own error (NotFound, a refusal) is an answer."""
    return isinstance(exc, errors.DeadlineExceeded | errors.Unavailable)


class Suspects:
    """Per datanode: calls left behind still running, and since when it is suspect."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._left: dict[str, int] = {}

    def suspect(self, node_id: str) -> bool:
        """Whether node_id gets no grace (module docstring)."""
        return node_id in self._since

    def left_behind(self, node_id: str, task: asyncio.Future[None] | None = None) -> None:
        """A call of node_id was left behind (task: still running, counted until it ends)."""
        if node_id not in self._since:
            self._since[node_id] = time.monotonic()
            SUSPECTS.set(len(self._since))
            SUSPECTED.inc()
            log.warning(
                "datanode %s did not answer in time: suspect, no grace until it does", node_id
            )
        if task is not None and not task.done():
            self._left[node_id] = self._left.get(node_id, 0) + 1
            task.add_done_callback(functools.partial(self._ended, node_id))

    def heard(self, node_id: str) -> None:
        """node_id answered a call: no longer suspect."""
        since = self._since.pop(node_id, None)
        if since is not None:
            SUSPECTS.set(len(self._since))
            log.info(
                "datanode %s answers again after %.1f s suspect", node_id, time.monotonic() - since
            )

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
