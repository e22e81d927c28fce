"""The heal queue's listing without a cluster (`services.gateway.healqueue`): oldest first, the
limit and its default, states and totals, user-facing bucket names, the engine's intake keeping
an object's first report; and `kvtier admin heal queue`'s merge and text (one line per object,
control characters escaped)."""

from __future__ import annotations

from typing import Any

from kvtier.cli import healqueue as healqueue_cli
from kvtier.proto.gateway.v1 import admin_pb2
from services.gateway import healqueue

STORED = "photos@0123456789abcdef"


def _pending(queued_at: float, **fields: Any) -> healqueue.Pending:
    return healqueue.Pending(queued_at=queued_at, **fields)


def test_listing_oldest_first_with_states_totals_and_the_limit() -> None:
    pending = {
        (STORED, "new"): _pending(90.0, reason="read rebuilt 1 damaged or missing blocks"),
        (STORED, "waits"): _pending(
            10.0, attempts=2, waiting_on=frozenset({"d2", "d1"}), version_id="null",
            reason="write committed on 10 of 12 drives", last_error="not every drive",
        ),
        (STORED, "retries"): _pending(50.0, attempts=1, due=130.0, last_error="Unavailable: x"),
        (STORED, "runs"): _pending(70.0, attempts=1),
    }  # fmt: skip
    intake = healqueue.HealQueue()
    intake.add(("kvtier-kv", "blk"), "read found the version on 11 of 12 drives", "v1")
    intake.add((STORED, "waits"), "a later report")  # pending already: shown once
    reply = healqueue.listing(
        pending, intake, {(STORED, "runs")}, {"d1"}, limit=0, dropped=3, now=100.0
    )
    assert (reply.total, reply.more, reply.dropped) == (5, 0, 3)
    assert (reply.waiting, reply.retrying, reply.healing) == (1, 1, 1)
    keys = [(e.bucket, e.key, e.state) for e in reply.entries]
    assert keys[:4] == [
        ("photos", "waits", "waiting"),  # d2 is not online
        ("photos", "retries", "retrying"),
        ("photos", "runs", "healing"),
        ("photos", "new", "new"),
    ]
    assert keys[4][1:] == ("blk", "new")  # the intake's (queued now: the youngest)
    waits, retries = reply.entries[0], reply.entries[1]
    assert (waits.age_s, waits.attempts, list(waits.waiting_on)) == (90.0, 2, ["d1", "d2"])
    assert (waits.version_id, waits.reason, waits.last_error) == (
        "null", "write committed on 10 of 12 drives", "not every drive"
    )  # fmt: skip
    assert (retries.next_attempt_in_s, waits.next_attempt_in_s) == (30.0, 0.0)
    two = healqueue.listing(pending, intake, (), {"d1", "d2"}, limit=2, now=100.0)
    assert ([e.key for e in two.entries], two.total, two.more) == (["waits", "retries"], 5, 3)
    assert two.entries[0].state == "retrying"  # its drives are back: tried again soon
    assert healqueue.clamp_limit(0) == healqueue.DEFAULT_LIMIT == 1000
    assert healqueue.clamp_limit(10**9) == healqueue.MAX_LIMIT


def test_intake_keeps_the_first_report_until_taken() -> None:
    intake = healqueue.HealQueue()
    intake.add(("b", "k"), "first", "v1")
    intake.add(("b", "k"), "second", "v2")
    assert len(intake) == 1
    assert ("b", "k") in intake
    name, first = intake.pop()
    assert (name, first.reason, first.version_id) == (("b", "k"), "first", "v1")
    assert not intake


def _reply(*entries: admin_pb2.HealQueueEntry, total: int = 0) -> admin_pb2.ListHealQueueResponse:
    return admin_pb2.ListHealQueueResponse(
        entries=entries, total=total or len(entries), waiting=len(entries)
    )


def test_cli_merges_gateways_oldest_first_and_escapes_keys() -> None:
    old = admin_pb2.HealQueueEntry(
        bucket="b", key="evil\n\x1b[31mkey", age_s=3725.0, attempts=3, state="retrying",
        version_id="null", reason="scanner: not every drive", next_attempt_in_s=4.0,
        last_error="Unavailable: down",
    )  # fmt: skip
    young = admin_pb2.HealQueueEntry(bucket="b", key="k", age_s=1.5, state="new", reason="r")
    merged = healqueue_cli.Merged(
        rows=[healqueue_cli.Row("gw-2", old), healqueue_cli.Row("gw-1", young)],
        replies={"gw-1": _reply(young, total=4), "gw-2": _reply(old)},
        failed={"gw-3": "Unavailable: no answer"},
    )
    text = healqueue_cli.render(merged).splitlines()
    assert text[0] == healqueue_cli.HEADER
    assert len(text) == 5  # header, 2 objects, 1 failed gateway, summary: one line each
    assert text[1].startswith("gw-2")
    assert "1h02m" in text[1]
    assert (
        "b/evil\\n\\x1b[31mkey  scanner: not every drive; next try in 4.0s; last try: " in text[1]
    )
    assert "\x1b" not in "".join(text)
    assert text[3] == "gw-3: failed: Unavailable: no answer"
    assert text[4] == ("queued 5 on 2 gateways (waiting 2, retrying 0, healing 0); 2 shown, 3 more")
    shown = healqueue_cli.as_dict(merged)
    assert (shown["total"], shown["shown"], shown["more"]) == (5, 2, 3)
    assert shown["entries"][0]["key"] == "evil\n\x1b[31mkey"  # JSON: the key as it is
    assert shown["failed"] == {"gw-3": "Unavailable: no answer"}
