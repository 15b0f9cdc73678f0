"""Chained hashes of full KV blocks, shared by the block manager and the router.

The hash of block i covers its own tokens and, through the parent hash, every token before
it, so equal hashes mean equal prefixes (the block manager still checks the token ids on a
hit). The hash is stable across processes and machines (no Python ``hash()`` randomisation),
which lets the router predict cache hits on a replica.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_NO_PARENT = 0


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash or _NO_PARENT))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every *full* block of ``token_ids``, in order."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
