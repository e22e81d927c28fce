"""A datanode that never answers (a silent partition) costs a GET's metadata read or a small
commit the straggler grace, not the data plane's 30 s deadline, once the others decide it; and
only the first one: it is suspect (no grace) until it answers again."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.gateway import fanout, placement, suspects

# 6 datanodes of 2 drives, 8 data + 4 parity shards (the dev cluster's shape).
NODES = [f"dn-{n}" for n in range(6)]


def _where() -> placement.Placement:
    slots = tuple(common_pb2.DriveSlot(node_id=NODES[i // 2], drive_id=f"d{i}") for i in range(12))
    return placement.Placement(0, 0, 8, 4, slots, tuple(range(12)))


class Nodes:
    """Datanodes answering at once, but for those in `silent` (never) and `slow` (after a
    moment, within the grace)."""

    def __init__(self, silent: set[str], slow: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.silent, self.slow = silent, slow
        self.asked: list[str] = []
        self.suspects = suspects.Suspects()
        self.released = asyncio.Event()  # ends the silent nodes' calls (as their deadline)

    async def _answer(self, node_id: str) -> None:
        self.asked.append(node_id)
        if node_id in self.silent:
            await self.released.wait()
            raise errors.Unavailable(f"{node_id}: call deadline")
        if node_id in self.slow:
            await asyncio.sleep(0.2)
        self.suspects.heard(node_id)  # as Datanodes.call does on a reply

    async def read_metas(
        self, node_id: str, drive_ids: Sequence[str], *_: Any, data: Any = True
    ) -> list[datanode_pb2.ShardMeta]:
        await self._answer(node_id)
        return [datanode_pb2.ShardMeta(data_id="v1") for _ in drive_ids]

    async def write_small(self, node_id: str, entries: Sequence[Any]) -> list[Any]:
        await self._answer(node_id)
        return [shards_pb2.ShardResult() for _ in entries]


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 0.5)


async def _timed(coro: Any) -> tuple[Any, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.wait_for(coro, timeout=10)
    return result, loop.time() - started


async def test_a_silent_node_is_left_behind_after_the_grace() -> None:
    where = _where()
    nodes = Nodes(silent={"dn-3"})
    answers, took = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
    assert 0.4 < took < 3, took
    assert [isinstance(a, errors.Unavailable) for a in answers] == [i // 2 == 3 for i in range(12)]
    assert "dn-3 did not answer" in str(answers[6])
    done, took = await _timed(
        fanout.write_small(nodes, where, datanode_pb2.ShardMeta(), range(12), [b"x"] * 12)  # type: ignore[arg-type]
    )
    assert took < 0.3, took  # dn-3 is suspect: no grace again
    assert done.drives == 10  # the write quorum (8) and more: committed
    assert nodes.suspects.suspect("dn-3")
    assert nodes.suspects.left("dn-3") == 2
    nodes.released.set()  # its calls end at their deadline, unanswered: still suspect
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert nodes.suspects.left("dn-3") == 0
    assert nodes.suspects.suspect("dn-3")
    nodes.released = asyncio.Event()
    for _ in range(3):
        _, took = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
        assert took < 0.3, took
    nodes.silent.clear()  # it answers again: no longer suspect, waited for as any node
    await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
    assert not nodes.suspects.suspect("dn-3")
    nodes.silent.add("dn-3")
    _, took = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
    assert 0.4 < took < 3, took


async def test_slow_nodes_within_the_grace_are_waited_for() -> None:
    where = _where()
    nodes = Nodes(silent=set(), slow={"dn-1", "dn-4"})
    answers, _ = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
    assert all(isinstance(a, datanode_pb2.ShardMeta) for a in answers)
    done, _ = await _timed(
        fanout.write_small(nodes, where, datanode_pb2.ShardMeta(), range(12), [b"x"] * 12)  # type: ignore[arg-type]
    )
    assert done.drives == 12


async def test_an_undecided_call_waits_for_every_node() -> None:
    """Three silent nodes hold 6 drives: more than the parity count, so a read is not decided
    without them and a commit has no quorum; the calls wait for them (here: the test's bound)."""
    where = _where()
    nodes = Nodes(silent={"dn-0", "dn-1", "dn-2"})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fanout.read_metas(nodes, where, "b", "k"), timeout=1.5)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            fanout.write_small(nodes, where, datanode_pb2.ShardMeta(), range(12), [b"x"] * 12),  # type: ignore[arg-type]
            timeout=1.5,
        )


async def test_the_grace_ends_once_the_nodes_not_suspect_answered() -> None:
    """A read is decided while a healthy node (slow here) is still out besides the silent one:
    the grace waits for the healthy one only, so reads after the first take its time, not the
    grace each (the fault suite's 60 s partition: every S3 operation through the cut-off
    node's sets took the 2 s grace)."""
    where = _where()
    nodes = Nodes(silent={"dn-3"}, slow={"dn-1"})
    _, took = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
    assert 0.4 < took < 3, took  # the first pays the grace
    for _ in range(4):
        answers, took = await _timed(fanout.read_metas(nodes, where, "b", "k"))  # type: ignore[arg-type]
        assert took < 0.4, took  # dn-1's 0.2 s, not the grace
        assert all(
            isinstance(a, datanode_pb2.ShardMeta) for i, a in enumerate(answers) if i // 2 != 3
        )
    nodes.released.set()


async def test_left_behind_calls_can_be_cancelled() -> None:
    """cancel_left_behind (a staged write's shard sends): the silent node's call is cancelled
    and has ended when until_decided returns; its position is returned; it is suspect."""
    outcome: dict[int, str] = {}

    async def call(position: int, silent: bool) -> None:
        try:
            if silent:
                await asyncio.Event().wait()
            outcome[position] = "done"
        except asyncio.CancelledError:
            outcome[position] = "cancelled"
            raise

    book = suspects.Suspects()
    calls = [(f"dn-{p}", call(p, p == 2)) for p in range(4)]
    behind, took = await _timed(
        fanout.until_decided(
            "write_shard", calls, lambda: len(outcome) >= 3, book, cancel_left_behind=True
        )
    )
    assert behind == [2]
    assert outcome == {0: "done", 1: "done", 2: "cancelled", 3: "done"}
    assert book.suspect("dn-2")
    assert book.left("dn-2") == 0
    assert 0.4 < took < 3, took


class _CountingTask(asyncio.Task):  # type: ignore[type-arg]
    callbacks = 0

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        _CountingTask.callbacks += 1
        super().add_done_callback(fn, context=context)


async def test_the_happy_path_costs_what_a_gather_does() -> None:
    """12 calls answering one after another (a staged commit: a call per drive): one done
    callback per call, as asyncio.gather registers, not one per call per wait (waiting
    FIRST_COMPLETED in a loop registered 42 here)."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(lambda lp, coro, **kw: _CountingTask(coro, loop=lp, **kw))
    try:
        answered = [0]

        async def call(turns: int) -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            answered[0] += 1

        _CountingTask.callbacks = 0
        await asyncio.gather(*(call(t) for t in range(12)))
        gathered = _CountingTask.callbacks
        answered[0] = _CountingTask.callbacks = 0
        calls = [(f"dn-{t // 2}", call(t)) for t in range(12)]
        behind = await fanout.until_decided(
            "commit",
            calls,
            lambda: answered[0] >= 12,
            suspects.Suspects(),
            lacking=lambda: 12 - answered[0],
        )
        assert behind == []
        assert answered[0] == 12
        assert _CountingTask.callbacks <= gathered, (_CountingTask.callbacks, gathered)
    finally:
        loop.set_task_factory(None)


async def _node(outcome: str, took: list[str], node_id: str) -> None:
    """A datanode's commit of its 2 drives: "ok" (both took it), "fail" (a refusal), "hang"."""
    if outcome == "hang":
        await asyncio.Event().wait()
    elif outcome == "ok":
        took.extend([node_id] * 2)


async def _commit(outcomes: dict[str, str], book: suspects.Suspects) -> tuple[list[int], float]:
    """A commit on 6 datanodes of 2 drives each (write quorum 8 drives), as until_decided
    runs it: the calls left behind and how long it took."""
    took: list[str] = []
    calls = [(n, _node(outcomes.get(n, "ok"), took, n)) for n in NODES]
    return await _timed(
        fanout.until_decided(
            "commit",
            calls,
            lambda: len(took) >= 8,
            book,
            lacking=lambda: 8 - len(took),
            weights=[2] * len(calls),
        )
    )


async def test_a_commit_lost_but_for_a_suspect_node_ends_at_once() -> None:
    """Two nodes refuse, a suspect one hangs: only it could still bring the write quorum, and
    a suspect gets no grace: the commit is lost at once (before: it waited for the suspect's
    call, the data plane's 30 s deadline)."""
    book = suspects.Suspects()
    book.left_behind("dn-5")
    behind, took = await _commit({"dn-0": "fail", "dn-1": "fail", "dn-5": "hang"}, book)
    assert behind == [5]
    assert took < 0.3, took


async def test_a_commit_that_cannot_reach_its_quorum_waits_only_the_grace() -> None:
    """Three nodes refuse, so even a hanging node that is not suspect cannot bring the quorum:
    it gets the grace (and is then suspect), a suspect hanging node none."""
    book = suspects.Suspects()
    book.left_behind("dn-5")
    outcomes = {"dn-0": "fail", "dn-1": "fail", "dn-2": "fail", "dn-4": "hang", "dn-5": "hang"}
    behind, took = await _commit(outcomes, book)
    assert behind == [4, 5]
    assert 0.4 < took < 3, took
    assert book.suspect("dn-4")


async def test_a_commit_waits_for_nodes_that_could_still_reach_its_quorum() -> None:
    """Two nodes refuse and one that is not suspect hangs: its drives could still bring the
    quorum, so the commit waits for it (here: until the test's bound), as for every node of
    an undecided call."""
    book = suspects.Suspects()
    outcomes = {"dn-0": "fail", "dn-1": "fail", "dn-4": "hang"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_commit(outcomes, book), timeout=1.5)
    assert not book.suspect("dn-4")


async def test_a_small_write_lost_but_for_a_suspect_node_ends_at_once() -> None:
    """fanout.write_small counts a node's drives: 4 drives full and a suspect node's 2 out
    leave 6, below the write quorum (8) without the suspect: the write ends at once."""
    where = _where()
    nodes = Nodes(silent={"dn-5"})
    nodes.suspects.left_behind("dn-5")
    real = nodes.write_small

    async def full_on_two(node_id: str, entries: Sequence[Any]) -> list[Any]:
        results = await real(node_id, entries)
        if node_id in ("dn-0", "dn-1"):
            return [shards_pb2.ShardResult(error_kind="StorageFull") for _ in entries]
        return results

    nodes.write_small = full_on_two  # type: ignore[method-assign]
    done, took = await _timed(
        fanout.write_small(nodes, where, datanode_pb2.ShardMeta(), range(12), [b"x"] * 12)  # type: ignore[arg-type]
    )
    assert done.drives == 6
    assert done.full
    assert took < 0.3, took
    nodes.released.set()


async def test_shard_reads_left_behind_stay_suspect_while_other_calls_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node whose shard reads hung past the grace: its other answers (a metadata read, its
    probe) clear it for every call but shard reads; a shard read's answer or READ_SUSPECT_S
    clears those too, and a read cancelled without a grace does not renew it."""
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 0.05)
    s = suspects.Suspects()
    hung = asyncio.Event()

    async def read(node_id: str) -> None:
        if node_id == "dn-0":
            await hung.wait()

    calls = [(n, read(n)) for n in NODES]
    behind = await fanout.until_decided(
        fanout.READ_SHARD_OP, calls, lambda: True, s, cancel_left_behind=True
    )
    assert behind == [0]
    assert s.suspect("dn-0", reads=True)
    s.heard("dn-0")  # its metadata read answered
    assert not s.suspect("dn-0")
    assert s.suspect("dn-0", reads=True)
    # The next reads get no grace (well past the test's timeout otherwise) and stay suspect.
    monkeypatch.setattr(fanout, "STRAGGLER_GRACE_S", 30.0)
    calls = [(n, read(n)) for n in NODES]
    decided = fanout.until_decided(
        fanout.READ_SHARD_OP, calls, lambda: True, s, cancel_left_behind=True
    )
    assert await asyncio.wait_for(decided, 5) == [0]
    assert not s.suspect("dn-0")  # (no node-level suspicion again: its other calls answer)
    s.heard("dn-0", reads=True)  # a shard read answered
    assert not s.suspect("dn-0", reads=True)
    s.left_behind("dn-0", reads=True)
    s.heard("dn-0")
    monkeypatch.setattr(suspects, "READ_SUSPECT_S", 0.0)  # expired: the grace again
    assert not s.suspect("dn-0", reads=True)
