"""Unit tests of services.kvcache.eviction: the policy contract, S3-FIFO's queues, and the trace."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest

from bench import eviction_trace
from services.kvcache import eviction

log = logging.getLogger(__name__)

PolicyFactory = Callable[[int], eviction.EvictionPolicy[str]]
POLICIES: list[PolicyFactory] = [eviction.LRUPolicy[str], eviction.S3FIFOPolicy[str]]
POLICY_IDS = ["lru", "s3fifo"]


@pytest.fixture(params=POLICIES, ids=POLICY_IDS)
def make_policy(request: pytest.FixtureRequest) -> PolicyFactory:
    """Each policy's constructor, so every contract test runs against both."""
    factory: PolicyFactory = request.param
    return factory


def _filled(make_policy: PolicyFactory, count: int, size: int = 10) -> eviction.EvictionPolicy[str]:
    policy = make_policy(count * size)
    for i in range(count):
        policy.insert(f"k{i}", size)
    return policy


def test_used_bytes_tracks_insert_and_remove(make_policy: PolicyFactory) -> None:
    policy = make_policy(1000)
    policy.insert("a", 100)
    policy.insert("b", 250)
    assert (len(policy), policy.used_bytes) == (2, 350)
    policy.remove("a")
    assert (len(policy), policy.used_bytes) == (1, 250)
    assert "a" not in policy
    assert "b" in policy


def test_errors_on_misuse(make_policy: PolicyFactory) -> None:
    policy = make_policy(1000)
    policy.insert("a", 1)
    with pytest.raises(ValueError, match="already resident"):
        policy.insert("a", 1)
    with pytest.raises(ValueError, match="size"):
        policy.insert("b", -1)
    with pytest.raises(KeyError):
        policy.hit("missing")
    with pytest.raises(KeyError):
        policy.remove("missing")
    with pytest.raises(ValueError, match="capacity"):
        make_policy(0)


def test_removed_key_is_never_a_victim(make_policy: PolicyFactory) -> None:
    policy = _filled(make_policy, 5)
    policy.remove("k0")
    victims = policy.victims(40, lambda _k: True)
    assert "k0" not in victims
    assert sorted(victims) == ["k1", "k2", "k3", "k4"]
    assert (len(policy), policy.used_bytes) == (0, 0)


def test_victims_cover_need_and_leave_policy(make_policy: PolicyFactory) -> None:
    policy = _filled(make_policy, 10)
    victims = policy.victims(25, lambda _k: True)
    assert len(victims) == 3
    assert len(set(victims)) == 3
    assert all(k not in policy for k in victims)
    assert policy.used_bytes == 70
    assert policy.victims(0, lambda _k: True) == []


def test_victims_skip_pinned_keys(make_policy: PolicyFactory) -> None:
    policy = _filled(make_policy, 10)
    pinned = {"k0", "k1", "k5"}
    victims = policy.victims(50, lambda k: k not in pinned)
    assert not pinned & set(victims)
    assert sum(10 for _ in victims) >= 50
    assert all(k in policy for k in pinned)


def test_victims_return_fewer_when_not_enough_evictable(make_policy: PolicyFactory) -> None:
    policy = _filled(make_policy, 6)
    pinned = {"k0", "k2", "k4"}
    victims = policy.victims(1000, lambda k: k not in pinned)
    assert sorted(victims) == ["k1", "k3", "k5"]
    assert policy.used_bytes == 30
    assert policy.victims(10, lambda _k: False) == []
    assert len(policy) == 3


def test_skipped_keys_keep_their_position(make_policy: PolicyFactory) -> None:
    """A pin released later: the key is the next victim again, not moved behind newer keys."""
    policy = _filled(make_policy, 4)
    assert policy.victims(10, lambda k: k != "k0") == ["k1"]
    assert policy.victims(10, lambda _k: True) == ["k0"]


def test_lru_evicts_least_recently_used() -> None:
    policy = eviction.LRUPolicy[str](100)
    for key in "abcd":
        policy.insert(key, 10)
    policy.hit("a")
    assert policy.victims(20, lambda _k: True) == ["b", "c"]


def test_s3fifo_one_off_keys_leave_through_small_and_ghost() -> None:
    policy = eviction.S3FIFOPolicy[str](1000, small_fraction=0.005)
    for key in "abc":
        policy.insert(key, 10)
    policy.hit("b")
    # Small is over its 5 bytes: "a" (never hit) goes, "b" (hit) is promoted, then "c" goes.
    assert policy.victims(20, lambda _k: True) == ["a", "c"]
    assert policy.in_main("b")
    assert policy.in_ghost("c")
    # The ghost queue holds no more keys than main (one here), so "a" was forgotten.
    assert not policy.in_ghost("a")


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    policy = eviction.S3FIFOPolicy[str](100)
    policy.insert("a", 10)
    policy.insert("b", 10)
    assert policy.victims(10, lambda _k: True) == ["a"]
    assert policy.in_ghost("a")
    policy.insert("a", 10)
    assert policy.in_main("a")
    assert not policy.in_ghost("a")
    assert not policy.in_main("b")


def test_s3fifo_remove_does_not_make_a_ghost() -> None:
    policy = eviction.S3FIFOPolicy[str](100)
    policy.insert("a", 10)
    policy.remove("a")
    assert not policy.in_ghost("a")
    policy.insert("a", 10)
    assert not policy.in_main("a")


def test_s3fifo_main_reinserts_with_capped_frequency() -> None:
    """Main is CLOCK-like: a hit key is reinserted with one less frequency, capped at 3."""
    # Small's share below one key: evictions come from small whenever it holds any key.
    policy = eviction.S3FIFOPolicy[str](100, small_fraction=0.05)
    for key in "abcd":
        # Through small and the ghost queue into main.
        policy.insert(key, 10)
        assert policy.victims(10, lambda _k: True) == [key]
        policy.insert(key, 10)
        assert policy.in_main(key)
    for _ in range(5):
        policy.hit("a")
    policy.hit("b")
    assert policy.victims(20, lambda _k: True) == ["c", "d"]
    # "a" has frequency 2 left (3, not 5): it survives one more pass than "b", then goes.
    assert policy.victims(20, lambda _k: True) == ["b", "a"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_keep_used_bytes_within_capacity(make_policy: PolicyFactory, seed: int) -> None:
    """Insert/hit/remove at random, always evicting first; pinned keys are never victims."""
    log.info("seed %d", seed)
    rng = random.Random(seed)
    capacity = 10_000
    policy = make_policy(capacity)
    resident: dict[str, int] = {}
    pinned: set[str] = set()
    for step in range(4000):
        key = f"k{rng.randrange(400)}"
        op = rng.random()
        if key in resident and op < 0.5:
            policy.hit(key)
        elif key in resident and op < 0.6:
            policy.remove(key)
            del resident[key]
            pinned.discard(key)
        elif key in resident and op < 0.7:
            pinned.symmetric_difference_update({key})
        elif key not in resident:
            size = rng.randint(1, 600)
            need = policy.used_bytes + size - capacity
            victims = policy.victims(need, lambda k: k not in pinned) if need > 0 else []
            assert not pinned & set(victims), f"seed {seed} step {step}"
            for victim in victims:
                del resident[victim]
            if policy.used_bytes + size <= capacity:
                policy.insert(key, size)
                resident[key] = size
        assert policy.used_bytes == sum(resident.values()), f"seed {seed} step {step}"
        assert policy.used_bytes <= capacity, f"seed {seed} step {step}"
        assert len(policy) == len(resident)


@pytest.mark.timeout(10)
def test_s3fifo_beats_lru_on_scan_heavy_prefix_trace() -> None:
    seed = 1
    trace = eviction_trace.generate(eviction_trace.TraceConfig(requests=1500), seed)
    rows = eviction_trace.compare(trace, (0.10, 0.20))
    log.info("seed %d\n%s", seed, eviction_trace.table(rows))
    (_, lru_10, s3_10), (_, lru_20, s3_20) = rows
    assert (round(lru_10, 3), round(s3_10, 3)) == (0.285, 0.321)
    assert (round(lru_20, 3), round(s3_20, 3)) == (0.328, 0.346)
    assert s3_10 >= lru_10
    assert s3_20 >= lru_20
