"""A datanode that never answers (a silent partition) costs a GET's metadata read or a small
commit the straggler grace, not the data plane's 30 s deadline, once the others decide it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.gateway import fanout, placement

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
        self.straggling: dict[str, int] = {}
        self.released = asyncio.Event()  # ends the silent nodes' calls (as their deadline)

    async def _answer(self, node_id: str) -> None:
        self.asked.append(node_id)
        if node_id in self.silent:
            await self.released.wait()
            raise errors.Unavailable(f"{node_id}: call deadline")
        if node_id in self.slow:
            await asyncio.sleep(0.2)

    async def read_metas(
        self, node_id: str, drive_ids: Sequence[str], *_: Any
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
    assert took < 0.3, took  # dn-3 is still straggling: no grace again
    assert done.drives == 10  # the write quorum (8) and more: committed
    assert nodes.straggling == {"dn-3": 2}
    nodes.released.set()  # its calls end (their deadline): waited for with a grace again
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert nodes.straggling == {}
    nodes.released = asyncio.Event()
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
