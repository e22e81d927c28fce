"""Rendezvous (highest-random-weight) hashing: which nodes own a key.

Every (node, key) pair gets a pseudo-random score; a key's owners are its highest-scoring nodes.
When a node joins, it takes over only the keys it now outscores everyone on (~1/N of them);
when one leaves, only its keys move, each to its next-ranked node, which is also where replica
R+1 lived. No ring, no virtual nodes, no state but the node list: every client computes the same
answer from the same map. Written here because it is a dozen lines over hashlib's BLAKE2b.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _score(node_id: str, key: bytes) -> int:
    digest = hashlib.blake2b(key, digest_size=8, key=node_id.encode()[:64]).digest()
    return int.from_bytes(digest, "little")


def owners(node_ids: Sequence[str], key: bytes, count: int = 1) -> list[str]:
    """The `count` nodes (fewer if there are fewer nodes) that own key, best first."""
    if count == 1:
        return [max(node_ids, key=lambda node: _score(node, key))] if node_ids else []
    ranked = sorted(node_ids, key=lambda node: _score(node, key), reverse=True)
    return ranked[:count]
