"""Rendezvous placement: balanced, deterministic, and minimal movement on membership change."""

from __future__ import annotations

import collections
import hashlib

from kvtier import rendezvous

KEYS = [f"key-{i}".encode() for i in range(20000)]


def test_owners_are_deterministic_distinct_and_ranked() -> None:
    nodes = ["a", "b", "c", "d"]
    for key in KEYS[:200]:
        three = rendezvous.owners(nodes, key, 3)
        assert len(set(three)) == 3
        assert rendezvous.owners(list(reversed(nodes)), key, 3) == three  # order-independent
        assert rendezvous.owners(nodes, key, 1) == three[:1]
    assert rendezvous.owners(["a"], b"k", 3) == ["a"]
    assert rendezvous.owners([], b"k") == []


def test_keys_spread_evenly() -> None:
    nodes = [f"kvcache-{i}" for i in range(5)]
    counts = collections.Counter(rendezvous.owners(nodes, k)[0] for k in KEYS)
    expected = len(KEYS) / len(nodes)
    assert all(abs(c - expected) < 0.08 * expected for c in counts.values()), counts


def test_a_join_moves_about_one_nth_of_the_keys_and_only_to_the_new_node() -> None:
    before = [f"kvcache-{i}" for i in range(4)]
    after = [*before, "kvcache-new"]
    moved = [k for k in KEYS if rendezvous.owners(before, k)[0] != rendezvous.owners(after, k)[0]]
    assert abs(len(moved) / len(KEYS) - 1 / 5) < 0.02
    assert all(rendezvous.owners(after, k)[0] == "kvcache-new" for k in moved)


def test_a_leave_moves_only_the_leavers_keys_to_their_second_choice() -> None:
    nodes = [f"kvcache-{i}" for i in range(4)]
    left = nodes[:2] + nodes[3:]
    for key in KEYS[:5000]:
        first, second = rendezvous.owners(nodes, key, 2)
        now = rendezvous.owners(left, key)[0]
        assert now == (second if first == nodes[2] else first)


def test_owners_follow_keyed_blake2b_so_every_client_agrees() -> None:
    """Placement is a contract between every client, gateway and node: a node's weight for a
    key is BLAKE2b-64 of the key keyed with the node id (its first 64 bytes), little-endian.
    Remembered hashers must not change it, first use or later, for any id or key length."""

    def weight(node: str, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8, key=node.encode()[:64]).digest()
        return int.from_bytes(digest, "little")

    nodes = ["kvcache-1", "kvcache-2", "n" * 80, "nœud-é", "kvcache-3"]
    for key in [*KEYS[:300], b"x" * 1040, b"\0"]:
        weights = {node: weight(node, key) for node in nodes}
        for _ in range(2):
            ranked = sorted(nodes, key=weights.__getitem__, reverse=True)
            assert rendezvous.owners(nodes, key, 5) == ranked
            assert rendezvous.owners(nodes, key) == ranked[:1]
