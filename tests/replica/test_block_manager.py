"""BlockManager: allocation, reference counts, prefix caching, LRU eviction, statistics."""
from __future__ import annotations

import itertools

import pytest

from kvray.replica import block_hash, sequence
from kvray.replica.block_manager import BlockManager
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.sequence import Sequence

_ids = itertools.count()


def make_seq(tokens, block_size=4) -> Sequence:
    return Sequence(f"r{next(_ids)}", list(tokens), SamplingParams(), block_size)


def admit_and_compute(bm: BlockManager, seq: Sequence) -> int:
    """Admit ``seq`` with its prefix hits, compute its whole prompt; return the hit tokens."""
    blocks, hit = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - hit, blocks)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_blocks(seq)
    bm.check_invariants()
    return hit


def test_allocate_grows_table_and_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(10))
    assert bm.allocate_slots(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.usage == pytest.approx(0.75)
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2)          # tokens 10..11 still fit block 2
    assert len(a.block_table) == 3
    b = make_seq(range(100, 109))
    assert not bm.allocate_slots(b, 9)      # needs 3 blocks, 1 free: nothing changes
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.stats()["prefix_queries"] == 1  # a's; b's failed admission is not counted
    assert bm.allocate_slots(b, 4)
    assert bm.stats()["prefix_queries"] == 2
    assert sorted(a.block_table + b.block_table) == [0, 1, 2, 3]
    bm.check_invariants()
    bm.free(a)
    bm.free(b)
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.check_invariants()


def test_ref_counts_shared_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)) + [50, 51])
    assert admit_and_compute(bm, a) == 0
    b = make_seq(list(range(8)) + [60, 61, 62])
    assert admit_and_compute(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.stats()["num_cached_blocks"] == 2  # the shared full blocks; third blocks aren't full
    bm.check_invariants()
    bogus = make_seq(range(4))
    bogus.block_table = [0]  # block 0 has reference count 0: freeing it must fail loudly
    with pytest.raises(AssertionError):
        bm.free(bogus)


def test_prefix_hit_after_free_reuses_cached_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(12))
    admit_and_compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    b = make_seq(list(range(12)) + [7])
    blocks, hit = bm.get_computed_blocks(b)
    assert blocks == table and hit == 12
    assert all(bm.ref_count(x) == 0 for x in blocks)  # lookup changes nothing
    assert bm.allocate_slots(b, 1, blocks)
    assert b.block_table[:3] == table and len(b.block_table) == 4
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_fully_cached_prompt_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit_and_compute(bm, make_seq(range(8)))
    assert bm.get_computed_blocks(make_seq(range(8)))[1] == 4   # (8-1)//4 = 1 block
    assert bm.get_computed_blocks(make_seq(range(9)))[1] == 8   # (9-1)//4 = 2 blocks
    assert bm.get_computed_blocks(make_seq(range(3)))[1] == 0
    assert bm.get_computed_blocks(make_seq([0]))[1] == 0


def test_token_check_rejects_forced_hash_collision(monkeypatch):
    def constant_hash(parent, tokens):
        return 42

    monkeypatch.setattr(block_hash, "hash_block", constant_hash)
    monkeypatch.setattr(sequence, "hash_block", constant_hash)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit_and_compute(bm, a)
    assert bm.stats()["num_cached_blocks"] == 1   # block 1 collides with block 0: left unregistered
    assert bm.get_computed_blocks(make_seq([9, 9, 9, 9, 1]))[1] == 0  # same hash, other tokens
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))[1] == 4
    bm.check_invariants()


def test_chained_collision_is_no_false_hit(monkeypatch):
    """A hash that ignores the parent makes [A, C] and [B, C] collide at block 1."""
    def parentless_hash(parent, tokens):
        return hash(tuple(tokens)) & 0xFFFF_FFFF

    monkeypatch.setattr(block_hash, "hash_block", parentless_hash)
    monkeypatch.setattr(sequence, "hash_block", parentless_hash)
    bm = BlockManager(num_blocks=16, block_size=4)
    A, B, C = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    admit_and_compute(bm, make_seq(A + C + [0]))
    admit_and_compute(bm, make_seq(B + [0]))         # registers block B
    blocks, hit = bm.get_computed_blocks(make_seq(B + C + [0]))
    assert hit == 4                                  # B hits; C's cached KV followed A, not B
    blocks, hit = bm.get_computed_blocks(make_seq(A + C + [0]))
    assert hit == 8


def test_duplicate_blocks_keep_first_registration_and_children_still_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    # Two sequences with the same prefix computed concurrently: neither hit the other.
    a = make_seq(list(range(8)) + [1])
    b = make_seq(list(range(8)) + [2, 3, 4, 5, 6])
    for s in (a, b):
        assert bm.allocate_slots(s, s.num_tokens)
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_blocks(s)
    bm.check_invariants()
    cached_before = bm.stats()["num_cached_blocks"]
    assert cached_before == 3   # a's 2 blocks + b's unique third block
    # b's third block follows b's duplicate copy of the prefix; it still matches a's prefix.
    c = make_seq(list(range(8)) + [2, 3, 4, 5, 9])
    blocks, hit = bm.get_computed_blocks(c)
    assert hit == 12 and blocks[:2] == a.block_table[:2] and blocks[2] == b.block_table[2]
    bm.cache_blocks(a)
    bm.cache_blocks(b)   # idempotent
    assert bm.stats()["num_cached_blocks"] == cached_before
    bm.free(a)
    bm.free(b)
    bm.check_invariants()


def test_cache_blocks_only_registers_computed_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = make_seq(range(10))
    assert bm.allocate_slots(s, 6)
    s.num_computed_tokens = 6
    bm.cache_blocks(s)
    assert bm.stats()["num_cached_blocks"] == 1
    bm.cache_blocks(s)
    assert bm.stats()["num_cached_blocks"] == 1
    assert bm.allocate_slots(s, 4)
    s.num_computed_tokens = 10
    bm.cache_blocks(s)
    assert bm.stats()["num_cached_blocks"] == 2
    s.token_ids += [10, 11]          # decode up to a full third block
    assert bm.allocate_slots(s, 2)
    s.num_computed_tokens = 12
    bm.cache_blocks(s)
    assert bm.stats()["num_cached_blocks"] == 3
    bm.check_invariants()


def test_lru_eviction_order_tail_first_and_fresh_blocks_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(range(0, 8))
    b = make_seq(range(100, 108))
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.free(a)   # evictable order: a[1], a[0]
    bm.free(b)   #                  b[1], b[0]
    assert bm.num_free_blocks == 6
    # Never-used blocks go first: no eviction yet.
    c = make_seq(range(200, 208))
    assert bm.allocate_slots(c, 8)
    assert set(c.block_table).isdisjoint(a_table + b_table)
    assert bm.stats()["evictions"] == 0
    # Next allocation evicts the least recently freed: a's tail, then a's head.
    d = make_seq(range(300, 304))
    assert bm.allocate_slots(d, 4)
    assert d.block_table == [a_table[1]]
    assert bm.stats()["evictions"] == 1
    assert bm.get_computed_blocks(make_seq(list(range(8)) + [0]))[1] == 4
    assert bm.get_computed_blocks(make_seq(list(range(100, 108)) + [0]))[1] == 8
    e = make_seq(range(400, 404))
    assert bm.allocate_slots(e, 4)
    assert e.block_table == [a_table[0]]
    assert bm.get_computed_blocks(make_seq(list(range(8)) + [0]))[1] == 0
    bm.check_invariants()


def test_taking_cached_blocks_counts_against_free_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(range(8))
    admit_and_compute(bm, a)
    bm.free(a)                              # 2 evictable + 1 never used
    b = make_seq(list(range(8)) + [1, 2, 3, 4, 5])   # hits 2 blocks, needs 2 fresh: 4 > 3
    blocks, hit = bm.get_computed_blocks(b)
    assert hit == 8
    assert not bm.allocate_slots(b, 5, blocks)
    assert bm.num_free_blocks == 3 and b.block_table == []
    assert bm.allocate_slots(b, 4, blocks)    # 2 cached + 1 fresh
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_stats_and_hit_rate():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit_and_compute(bm, make_seq(range(16)))
    admit_and_compute(bm, make_seq(list(range(16)) + [99]))
    st = bm.stats()
    assert st["prefix_queried_tokens"] == 16 + 17
    assert st["prefix_hit_tokens"] == 16
    assert st["prefix_hit_rate"] == pytest.approx(16 / 33)
    assert st["prefix_queries"] == 2 and st["prefix_hit_queries"] == 1
    assert st["num_total_blocks"] == 16


def test_reset_prefix_cache_and_disabled_caching():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(9))
    admit_and_compute(bm, a)
    b = make_seq(range(9))
    admit_and_compute(bm, b)
    assert bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.stats()["num_cached_blocks"] == 0
    assert bm.get_computed_blocks(make_seq(range(9)))[1] == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()

    off = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit_and_compute(off, make_seq(range(9)))
    assert off.get_computed_blocks(make_seq(range(9))) == ([], 0)
    assert off.stats()["num_cached_blocks"] == 0 and off.stats()["prefix_hit_rate"] == 0.0
