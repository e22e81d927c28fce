"""A suspect datanode is probed until it answers (services.gateway.suspects, issue 16): at the
interval while it is silent, cleared by the first answer, forgotten once it left the map, and
no probe outlives its suspicion or the owner's close."""

from __future__ import annotations

import asyncio

import pytest

from kvtier import errors
from services.gateway import suspects

INTERVAL_S = 0.05


@pytest.fixture(autouse=True)
def _quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suspects, "PROBE_INTERVAL_S", INTERVAL_S)
    monkeypatch.setattr(suspects, "PROBE_TIMEOUT_S", INTERVAL_S)


class Node:
    """A datanode's probe: hangs (silent), fails as a lost connection, answers, or says the
    node left the map."""

    def __init__(self) -> None:
        self.mode = "silent"
        self.probes = 0

    async def probe(self, node_id: str) -> bool:
        self.probes += 1
        if self.mode == "silent":
            await asyncio.Event().wait()
        if self.mode == "lost":
            raise errors.Unavailable(f"{node_id}: connection lost")
        return self.mode == "answers"


def _probe_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("probe of") and not t.done()]


async def test_a_silent_suspect_is_probed_at_the_interval_and_stays_suspect() -> None:
    node = Node()
    book = suspects.Suspects(node.probe)
    silent = suspects.PROBES.labels("silent")._value.get()
    book.left_behind("dn-1")
    book.left_behind("dn-1")  # (one probe per suspect)
    await asyncio.sleep(10.5 * INTERVAL_S)  # sleep + timeout per probe: 5 of them
    assert book.suspect("dn-1")
    assert 3 <= node.probes <= 6, node.probes  # (fewer on a busy machine, never more)
    node.mode, before = "lost", node.probes
    await asyncio.sleep(4.5 * INTERVAL_S)  # no wait for a timeout: a probe per interval
    assert book.suspect("dn-1")
    assert before + 2 <= node.probes <= before + 5, (before, node.probes)
    counted = suspects.PROBES.labels("silent")._value.get() - silent
    assert node.probes - 1 <= counted <= node.probes  # (one may be under way)
    assert book.probing() == ["dn-1"]
    await book.close()
    assert book.probing() == [] == _probe_tasks()
    book.left_behind("dn-2")  # closed: no new probe
    assert book.suspect("dn-2")
    assert _probe_tasks() == []


async def test_a_suspect_that_answers_its_probe_is_cleared_and_its_probe_ends() -> None:
    node = Node()
    book = suspects.Suspects(node.probe)
    answered = suspects.PROBES.labels("answered")._value.get()
    book.left_behind("dn-1")
    await asyncio.sleep(2.5 * INTERVAL_S)
    assert book.suspect("dn-1")
    node.mode = "answers"
    await asyncio.sleep(3 * INTERVAL_S)
    assert not book.suspect("dn-1")
    assert suspects.PROBES.labels("answered")._value.get() == answered + 1
    assert book.probing() == [] == _probe_tasks()

    book.left_behind("dn-1")  # suspect again: probed again; a reply to a call ends the probe
    assert book.probing() == ["dn-1"]
    book.heard("dn-1")
    await asyncio.sleep(0)
    assert book.probing() == [] == _probe_tasks()


async def test_a_suspect_that_left_the_map_is_forgotten() -> None:
    node = Node()
    node.mode = "gone"
    book = suspects.Suspects(node.probe)
    book.left_behind("dn-1")
    await asyncio.sleep(3 * INTERVAL_S)
    assert not book.suspect("dn-1")
    assert node.probes == 1
    assert book.probing() == [] == _probe_tasks()


async def test_without_a_probe_a_suspect_waits_for_a_call() -> None:
    book = suspects.Suspects()
    book.left_behind("dn-1")
    await asyncio.sleep(3 * INTERVAL_S)
    assert book.suspect("dn-1")
    assert book.probing() == [] == _probe_tasks()


async def test_a_suspect_again_while_its_probe_ends_has_one_probe() -> None:
    """The probe's answer clears the node and a call is left behind at once (suspect again):
    the new suspicion has its own probe, the old one ends, close leaves none."""
    answers = [0]

    async def probe(node_id: str) -> bool:
        answers[0] += 1
        if answers[0] == 1:
            book.heard(node_id)  # (as Datanodes.call does on the reply)
            book.left_behind(node_id)
        else:
            await asyncio.Event().wait()
        return True

    book = suspects.Suspects(probe)
    book.left_behind("dn-1")
    await asyncio.sleep(2.5 * INTERVAL_S)
    assert book.suspect("dn-1")
    assert book.probing() == ["dn-1"]
    assert len(_probe_tasks()) == 1
    await book.close()
    assert _probe_tasks() == []
