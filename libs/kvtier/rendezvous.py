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

#: node id -> BLAKE2b keyed with it, nothing hashed yet: a copy of it hashes a key in half the
#: time a fresh keyed hash takes (keying costs a compression), the same digest. Bounded: node ids
#: come and go over a long life; past the bound the memory starts over.
_KEYED: dict[str, hashlib.blake2b] = {}
_KEYED_MAX = 4096


def _score(node_id: str, key: bytes) -> int:
    keyed = _KEYED.get(node_id)
    if keyed is None:
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        keyed = _KEYED[node_id] = hashlib.blake2b(digest_size=8, key=node_id.encode()[:64])
    hasher = keyed.copy()
    hasher.update(key)
    return int.from_bytes(hasher.digest(), "little")


def owners(node_ids: Sequence[str], key: bytes, count: int = 1) -> list[str]:
    """The `count` nodes (fewer if there are fewer nodes) that own key, best first."""
    if count == 1:
        return [max(node_ids, key=lambda node: _score(node, key))] if node_ids else []
    ranked = sorted(node_ids, key=lambda node: _score(node, key), reverse=True)
    return ranked[:count]
