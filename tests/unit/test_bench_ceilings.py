"""This host's floors in bench/ceilings.py, and how bench/kv_events_bench.py reports Score
against the fan-out floor (a short run: two forked echo processes, ~0.1 s)."""

from __future__ import annotations

import multiprocessing

from bench import ceilings, kv_events_bench


def test_fanout_floor_waits_for_every_echo_and_leaves_no_process() -> None:
    p50, p99 = ceilings.raw_fanout_us(100, peers=2)
    assert 0 < p50 <= p99
    assert not multiprocessing.active_children()  # both echo processes ended


def test_score_is_read_against_the_floor_when_it_was_measured() -> None:
    result = {"score_p50_us": 300.0, "ceilings": {"raw_fanout2_us": {"p50": 60.0, "p99": 90.0}}}
    assert "5.0\N{MULTIPLICATION SIGN} this host's floor" in kv_events_bench._floor(result)
    assert "p50 60.0 µs (p99 90.0 µs)" in kv_events_bench._floor(result)
    assert kv_events_bench._floor({"score_p50_us": 300.0}) == ""  # older results: no floor
