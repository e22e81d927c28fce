"""The gateway's heal queue, as an operator sees it: what is queued, why, since when.

Two parts hold it: `HealQueue`, the engine's intake (a read, a write, a metadata update or a
resolve that found an object degraded adds it, with the reason and the version it saw), and the
`Pending` entries of `healing.Healer`, which takes the intake every tick and retries what it
could not heal yet. An object is one entry, by (storage bucket, key): the first report's
reason, version and time stay while later reports of it are folded in.

`listing()` turns both into the `AdminService.ListHealQueue` reply: oldest first, at most a
limit, with the queue's totals. Bucket names are shown as users know them
(`kvtier.names.user_bucket`). Never imports grpc.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Collection, Iterator, Mapping

from kvtier import names
from kvtier.proto.gateway.v1 import admin_pb2

#: (storage bucket, key).
Name = tuple[str, str]

#: ListHealQueue's limit when the request sets none, and the most it returns.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Intake:
    """Why and when the engine queued an object."""

    reason: str
    version_id: str = ""
    queued_at: float = dataclasses.field(default_factory=time.monotonic)


class HealQueue:
    """The engine's intake: objects found degraded and not yet taken by the healer, each
    with the first report's reason, version and time. Unbounded like the reports between two
    ticks of the healer (which bounds its own queue)."""

    def __init__(self) -> None:
        self._items: dict[Name, Intake] = {}

    def add(self, name: Name, reason: str, version_id: str = "") -> None:
        """Queue (bucket, key) for healing; an object already here keeps its first report."""
        if name not in self._items:
            self._items[name] = Intake(reason, version_id)

    def pop(self) -> tuple[Name, Intake]:
        """Take one object out (KeyError when empty)."""
        return self._items.popitem()

    def items(self) -> Iterator[tuple[Name, Intake]]:
        """What is queued, without taking it."""
        return iter(list(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass(slots=True)
class Pending:
    """An object in the healer's queue: its schedule and its history."""

    attempts: int = 0
    due: float = 0.0
    waiting_on: frozenset[str] = frozenset()
    was_offline: bool = False  # a drive it waits for was OFFLINE in the map at the last try
    reason: str = ""
    version_id: str = ""
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    last_error: str = ""


def state_of(item: Pending, *, running: bool, online: Collection[str]) -> str:
    """healing, new, waiting (for drives not online) or retrying (after a failed try)."""
    if running:
        return "healing"
    if item.attempts == 0:
        return "new"
    if item.waiting_on and not all(d in online for d in item.waiting_on):
        return "waiting"
    return "retrying"


def clamp_limit(limit: int) -> int:
    """The request's limit: 0 is DEFAULT_LIMIT, at most MAX_LIMIT."""
    return DEFAULT_LIMIT if limit <= 0 else min(limit, MAX_LIMIT)


def listing(
    pending: Mapping[Name, Pending],
    intake: HealQueue,
    running: Collection[Name],
    online: Collection[str],
    *,
    limit: int,
    dropped: int = 0,
    now: float | None = None,
) -> admin_pb2.ListHealQueueResponse:
    """The ListHealQueue reply: the oldest clamp_limit(limit) entries of pending and intake
    (an object in both is shown once, as pending) and the totals."""
    now = time.monotonic() if now is None else now
    everything: list[tuple[Name, Pending]] = list(pending.items())
    everything += [
        (name, Pending(reason=i.reason, version_id=i.version_id, queued_at=i.queued_at))
        for name, i in intake.items()
        if name not in pending
    ]
    reply = admin_pb2.ListHealQueueResponse(total=len(everything), dropped=dropped)
    states: dict[Name, str] = {}
    for name, item in everything:
        state = states[name] = state_of(item, running=name in running, online=online)
        if state == "waiting":
            reply.waiting += 1
        elif state == "retrying":
            reply.retrying += 1
        elif state == "healing":
            reply.healing += 1
    oldest = heapq.nsmallest(clamp_limit(limit), everything, key=lambda e: e[1].queued_at)
    for (bucket, key), item in oldest:
        state = states[(bucket, key)]
        reply.entries.add(
            bucket=names.user_bucket(bucket), key=key, version_id=item.version_id,
            reason=item.reason, age_s=max(0.0, now - item.queued_at), attempts=item.attempts,
            state=state, next_attempt_in_s=max(0.0, item.due - now) if state == "retrying" else 0,
            waiting_on=sorted(item.waiting_on), last_error=item.last_error,
        )  # fmt: skip
    reply.more = reply.total - len(reply.entries)
    return reply
