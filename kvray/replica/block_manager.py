"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

Pure Python, on the per-step hot path: every call costs O(blocks it touches), never a scan
over the pool (``check_invariants`` and ``reset_prefix_cache`` are the exceptions).

Prefix caching. Once every token of a full block is computed, ``cache_blocks`` registers the
block under the sequence's chained block hash. A later sequence whose leading blocks have the
same hashes takes those blocks (reference count + 1) instead of recomputing them.

A hash is only a hint. A hit also checks the block's stored token ids *and* the identity of
the prefix the block was computed after: every computed full block carries a *prefix id* that
stands for the exact token sequence up to its end (two blocks share a prefix id only when that
was verified token by token, link by link). So a hash collision, at any depth of the chain,
never yields a false hit.

Freed blocks. A block whose count drops to 0 goes to one of two pools:
* ``_free``: blocks holding nothing reusable (never registered); allocated first;
* ``_evictable``: registered blocks, kept as a cache in LRU order (least recently freed
  first). Allocating one evicts it: its hash entry is dropped.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from kvray.replica import block_hash as _block_hash

if TYPE_CHECKING:
    from collections.abc import Iterable

    from kvray.replica.sequence import Sequence

_NO_PREFIX = 0  # prefix id of the empty prefix (the "parent" of block 0)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

        self._ref = [0] * num_blocks
        # Prefix id of each block's content (0: not yet a computed full block of its holder).
        self._prefix_id = [0] * num_blocks
        self._next_prefix_id = 1
        # Registration of cached blocks (None where unregistered).
        self._hash: list[int | None] = [None] * num_blocks
        self._parent_hash: list[int | None] = [None] * num_blocks
        self._parent_prefix: list[int] = [0] * num_blocks
        self._tokens: list[list[int] | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}

        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()

        self._queried_tokens = 0
        self._hit_tokens = 0
        self._num_queries = 0
        self._num_hit_queries = 0
        self._evictions = 0

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used/unregistered plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix lookup -----------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """The longest run of cached blocks equal to ``seq``'s leading full blocks.

        For a sequence holding no blocks. At least one token is always left to compute (a fully
        cached sequence recomputes its last block). Changes no reference count or statistic.
        """
        if seq.block_table:
            raise ValueError(f"get_computed_blocks: {seq.request_id!r} already holds blocks")
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        if max_blocks <= 0:
            return [], 0
        hashes = seq.block_hashes()
        token_ids = seq.token_ids
        lookup = self._hash_to_block
        blocks: list[int] = []
        prefix = _NO_PREFIX
        for i in range(min(max_blocks, len(hashes))):
            b = lookup.get(hashes[i])
            if (b is None or self._parent_prefix[b] != prefix
                    or self._tokens[b] != token_ids[i * bs:(i + 1) * bs]):
                break
            blocks.append(b)
            prefix = self._prefix_id[b]
        return blocks, len(blocks) * bs

    # ---- allocation --------------------------------------------------------------------------
    def _num_missing(self, seq: Sequence, num_new_tokens: int, computed: list[int]) -> int:
        """How many more blocks the allocation needs than the pools can give (<= 0: it fits)."""
        bs = self.block_size
        total = seq.num_computed_tokens + len(computed) * bs + num_new_tokens
        need_fresh = -(-total // bs) - len(seq.block_table) - len(computed)
        if need_fresh <= 0:
            return need_fresh
        ref = self._ref
        reviving = sum(1 for b in computed if ref[b] == 0)  # cached blocks taken out of the pool
        return need_fresh - (len(self._free) + len(self._evictable) - reviving)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: Iterable[int] = ()) -> bool:
        """Grow ``seq.block_table`` to cover its computed tokens, the cached ``computed_blocks``
        and ``num_new_tokens`` more. All or nothing: on a shortage nothing changes and the
        result is False. ``computed_blocks`` (from ``get_computed_blocks``) only for a
        sequence that holds no blocks yet; the caller then advances ``num_computed_tokens``.
        """
        table = seq.block_table
        if table and not computed_blocks:  # the per-step path of a running sequence
            need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(table)
            if need <= 0:
                return True
            if need > len(self._free) + len(self._evictable):
                return False
            ref = self._ref
            for _ in range(need):
                b = self._take_fresh()
                ref[b] = 1
                table.append(b)
            return True
        computed = list(computed_blocks)
        admission = not table
        if computed:
            if not admission or seq.num_computed_tokens:
                raise ValueError(f"allocate_slots: cached blocks given for {seq.request_id!r}, which already has state")
            for b in computed:
                if self._hash[b] is None:
                    raise ValueError(f"allocate_slots: block {b} is no longer cached (evicted since the lookup)")
        if self._num_missing(seq, num_new_tokens, computed) > 0:
            return False
        ref = self._ref
        for b in computed:
            if ref[b] == 0:
                del self._evictable[b]
            ref[b] += 1
            table.append(b)
        need = self.num_blocks_for(seq.num_computed_tokens + len(computed) * self.block_size + num_new_tokens) - len(table)
        for _ in range(need):
            b = self._take_fresh()
            ref[b] = 1
            table.append(b)
        if admission and self.enable_prefix_caching:
            self._num_queries += 1
            self._queried_tokens += seq.num_tokens
            if computed:
                self._num_hit_queries += 1
                self._hit_tokens += len(computed) * self.block_size
        return True

    def _take_fresh(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently freed
            self._evictions += 1
        if self._hash[b] is not None:
            self._unregister(b)
        self._prefix_id[b] = 0
        return b

    def _unregister(self, b: int) -> None:
        h = self._hash[b]
        if self._hash_to_block.get(h) == b:
            del self._hash_to_block[h]
        self._hash[b] = self._parent_hash[b] = self._tokens[b] = None
        self._parent_prefix[b] = 0

    # ---- registration ------------------------------------------------------------------------
    def cache_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s full blocks whose tokens became computed since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = seq.block_table
        n_full = min(seq.num_computed_tokens // bs, len(table))
        pid = self._prefix_id
        # Blocks are processed in order, so the unprocessed ones form a tail of the full run.
        first = n_full
        while first > 0 and pid[table[first - 1]] == 0:
            first -= 1
        if first == n_full:
            return
        hashes = seq.block_hashes()
        token_ids = seq.token_ids
        parent = pid[table[first - 1]] if first else _NO_PREFIX
        for i in range(first, n_full):
            b = table[i]
            h = hashes[i]
            tokens = token_ids[i * bs:(i + 1) * bs]
            other = self._hash_to_block.get(h)
            if other is None:
                self._hash[b] = h
                self._parent_hash[b] = hashes[i - 1] if i else None
                self._parent_prefix[b] = parent
                self._tokens[b] = tokens
                self._hash_to_block[h] = b
                pid[b] = self._new_prefix_id()
            elif self._parent_prefix[other] == parent and self._tokens[other] == tokens:
                pid[b] = pid[other]  # same content as the registered copy: keep that one
            else:
                pid[b] = self._new_prefix_id()  # a hash collision: leave this block unregistered
            parent = pid[b]

    def _new_prefix_id(self) -> int:
        p = self._next_prefix_id
        self._next_prefix_id = p + 1
        return p

    # ---- release -----------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references, tail first (so its tail is evicted before a shared head)."""
        ref = self._ref
        table = seq.block_table
        for b in reversed(table):
            r = ref[b]
            if r <= 0:
                raise AssertionError(f"block {b} freed with reference count {r} (seq {seq.request_id!r})")
            ref[b] = r - 1
            if r == 1:
                if self._hash[b] is not None:
                    self._evictable[b] = None  # most recently freed: at the end
                else:
                    self._free.append(b)
        seq.block_table = []  # a new list, so views of the old table (the runner's numpy mirror) go stale visibly

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (blocks in use stay allocated but are no longer shared)."""
        for b in list(self._hash_to_block.values()):
            self._unregister(b)
        self._free.extend(self._evictable)
        self._evictable.clear()
        return True

    # ---- statistics --------------------------------------------------------------------------
    def stats(self) -> dict:
        q = self._queried_tokens
        return {
            "num_total_blocks": self.num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_used_blocks": self.num_blocks - self.num_free_blocks,
            "num_cached_blocks": len(self._hash_to_block),
            "num_evictable_blocks": len(self._evictable),
            "usage": self.usage,
            "prefix_queries": self._num_queries,
            "prefix_hit_queries": self._num_hit_queries,
            "prefix_queried_tokens": q,
            "prefix_hit_tokens": self._hit_tokens,
            "prefix_hit_rate": self._hit_tokens / q if q else 0.0,
            "evictions": self._evictions,
        }

    # ---- checks (tests; O(num_blocks)) -------------------------------------------------------
    def check_invariants(self) -> None:
        def fail(msg: str) -> None:
            raise AssertionError(f"BlockManager invariant: {msg}")

        n = self.num_blocks
        free = list(self._free)
        free_set = set(free)
        evictable = set(self._evictable)
        if len(free_set) != len(free):
            fail("a block appears twice in the free pool")
        if free_set & evictable:
            fail(f"blocks both free and evictable: {sorted(free_set & evictable)}")
        for b in range(n):
            r = self._ref[b]
            if r < 0:
                fail(f"block {b} has reference count {r}")
            pooled = b in free_set or b in evictable
            if (r == 0) != pooled:
                fail(f"block {b} has reference count {r} but is {'' if pooled else 'not '}in a free pool")
            if b in evictable and self._hash[b] is None:
                fail(f"evictable block {b} is not registered")
            if b in free_set and self._hash[b] is not None:
                fail(f"free block {b} is still registered")
            h = self._hash[b]
            if h is not None and self._hash_to_block.get(h) != b:
                fail(f"block {b} carries hash {h:#x} that maps elsewhere")
            if self._prefix_id[b] == 0 and h is not None:
                fail(f"registered block {b} has no prefix id")
        for h, b in self._hash_to_block.items():
            if self._hash[b] != h:
                fail(f"hash {h:#x} maps to block {b}, which carries {self._hash[b]}")
            tokens = self._tokens[b]
            if tokens is None or len(tokens) != self.block_size:
                fail(f"registered block {b} stores {tokens!r}")
            if _block_hash.hash_block(self._parent_hash[b], tokens) != h:
                fail(f"block {b}'s stored tokens do not hash to its key {h:#x}")
        if self.num_free_blocks + sum(1 for r in self._ref if r > 0) != n:
            fail("blocks are not conserved")
