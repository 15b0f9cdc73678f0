"""kvray.kernels on CPU: the Triton kernels under Triton's interpreter against the torch reference,
plus dispatch and input checks.

TRITON_INTERPRET=1 is set per test through monkeypatch (the dispatch reads it at call time and
builds interpreter-mode copies of the kernels), so nothing leaks into other test modules.
Unused cache slots and unused block-table entries point at NaN-filled memory, and outputs are
poisoned with NaN, so a read past a sequence's context or an unwritten output element fails.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import kvray.kernels as K
from kvray.kernels import reference as R


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND", raising=False)
    K.set_attention_backend(None)
    yield
    K.set_attention_backend(None)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def make_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, head_dim=32, page=16, seed=0,
               dtype=torch.float32, spare_blocks=3):
    """Random paged batch. Pages are shuffled; slots past each context and unused table entries
    hold NaN, so any read outside a sequence's context shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    assert len(q_lens) == len(seq_lens) and all(q <= s for q, s in zip(q_lens, seq_lens))
    n_pages = [-(-s // page) for s in seq_lens]
    max_blocks = max(n_pages) + 2
    num_blocks = sum(n_pages) + spare_blocks + 1
    k_cache = torch.full((num_blocks, page, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    nan_block = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=g)
    block_tables = torch.full((len(seq_lens), max_blocks), nan_block, dtype=torch.int32)
    used = 0
    for i, (s, n) in enumerate(zip(seq_lens, n_pages)):
        blocks = perm[used:used + n]
        used += n
        block_tables[i, :n] = blocks.to(torch.int32)
        for pos in range(s):
            b, o = blocks[pos // page], pos % page
            k_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, block_tables, qsl, torch.tensor(seq_lens, dtype=torch.int32)


def check_against_reference(batch, scale=None, config=None, out=None, **hints):
    q = batch[0]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        out = torch.full_like(q, float("nan"))
    else:
        out.fill_(float("nan"))
    if config is None:
        res = K.paged_attention(*batch, scale, out=out, **hints)
    else:
        res = K.triton_impl(True).attention.paged_attention_triton(*batch, scale, out, config=config, **hints)
    assert res is out
    ref = R.paged_attention(*batch, scale)
    assert torch.isfinite(out).all(), "unwritten (NaN) or poisoned output elements"
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    return out


# ---------------------------------------------------------------- paged attention vs reference

CASES = {
    "decode": ([1, 1, 1, 1], [1, 15, 16, 77]),
    "prefill": ([9, 33, 16], [9, 33, 16]),
    "mixed": ([1, 20, 1, 5], [40, 20, 3, 5]),
    "prefix_chunks": ([7, 16, 1, 12], [30, 48, 19, 13]),
    "ragged_short": ([2, 1, 3, 1], [2, 5, 3, 9]),
    "empty_seq": ([3, 0, 1], [10, 4, 6]),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page", [16, 32])
def test_paged_attention_cases(case, page):
    q_lens, seq_lens = CASES[case]
    check_against_reference(make_batch(q_lens, seq_lens, page=page, seed=list(CASES).index(case) * 100 + page))


@needs_triton
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_paged_attention_gqa(group):
    num_kv_heads = 2 if group < 8 else 1
    batch = make_batch([1, 6, 1, 13], [21, 6, 50, 40], num_heads=group * num_kv_heads,
                       num_kv_heads=num_kv_heads, seed=group)
    check_against_reference(batch)


@needs_triton
@pytest.mark.parametrize("config", [
    dict(num_splits=1, block_m=16, block_n=16),            # several unmasked tiles, small q tiles
    dict(num_splits=1, block_m=32, block_n=32),
    dict(num_splits=3, block_m=16, block_n=16),            # split-KV, splits of uneven use
    dict(num_splits=5, block_m=16, block_n=16),            # more splits than some sequences need
    dict(num_splits=2, block_m=64, block_n=32),            # split-KV with prefill-sized tiles
], ids=["tiles16", "tiles32", "split3", "split5", "split2-prefill"])
def test_paged_attention_configs(config):
    batch = make_batch([1, 4, 1, 9, 1], [70, 40, 5, 90, 33], seed=7)
    check_against_reference(batch, config=config)


@needs_triton
def test_split_kv_chosen_automatically():
    """Batch 1, long context: the shape heuristic must pick split-KV (interpreter pretends 4 SMs)."""
    attn = K.triton_impl(True).attention
    batch = make_batch([1], [600], num_heads=4, num_kv_heads=2, seed=3)
    cfg = attn.pick_config(1, 1, 2, 2, 32, None, batch[3].shape[1] * 16, attn.INTERPRETER_SMS)
    assert cfg["num_splits"] > 1
    check_against_reference(batch)
    check_against_reference(batch, max_seq_len=600, max_query_len=1)


@needs_triton
def test_hints_do_not_change_results():
    batch = make_batch([1, 12, 1], [50, 30, 9], seed=11)
    for hints in (dict(max_query_len=1, max_seq_len=16), dict(max_query_len=64, max_seq_len=4096)):
        check_against_reference(batch, **hints)


@needs_triton
def test_head_dim_not_power_of_two_and_strided_views():
    batch = list(make_batch([1, 9], [20, 9], head_dim=48, seed=5))
    q = batch[0]
    qkv = torch.randn(q.shape[0], q.shape[1] * 3, q.shape[2])          # q as a view of a fused qkv
    qkv[:, : q.shape[1]] = q
    batch[0] = qkv[:, : q.shape[1]]
    out_buf = torch.empty(q.shape[0], q.shape[1] * 2, q.shape[2])
    check_against_reference(tuple(batch), out=out_buf[:, 1::2], scale=0.2)


def test_pick_config_from_host_ints():
    attn = K.triton_impl(True).attention
    dec = attn.pick_config(64, 64, 8, 2, 128, None, 2048, 132)
    assert dec["block_q"] == 1 and dec["block_m"] == 16 and dec["num_splits"] == 1
    one = attn.pick_config(1, 1, 8, 2, 128, 1, 8192, 132)
    assert one["num_splits"] > 8
    pre = attn.pick_config(4096, 1, 8, 2, 128, None, 4096, 132)
    assert pre["block_m"] >= 64 and pre["block_q"] * 2 <= pre["block_m"] and pre["num_splits"] == 1


# ---------------------------------------------------------------- write_kv_cache

@needs_triton
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("page", [16, 32])
def test_write_kv_cache_skips_negative_slots(slot_dtype, page):
    g = torch.Generator().manual_seed(page)
    num_blocks, kvh, d, n = 5, 3, 24, 20
    k_cache = torch.randn(num_blocks, page, kvh, d, generator=g)
    v_cache = torch.randn(num_blocks, page, kvh, d, generator=g)
    kv = torch.randn(n, 2 * kvh, d, generator=g)
    key, value = kv[:, :kvh], kv[:, kvh:]                              # strided views
    slots = torch.randperm(num_blocks * page, generator=g)[:n]
    slots[::3] = -1
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    R.write_kv_cache(key, value, exp_k, exp_v, slots.to(slot_dtype))
    K.write_kv_cache(key, value, k_cache, v_cache, slots.to(slot_dtype))
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    kept = slots >= 0
    flat_k = k_cache.view(-1, kvh, d)
    assert torch.equal(flat_k[slots[kept]], key[kept])


@needs_triton
def test_write_then_attend_roundtrip():
    """Prefill writes the cache through write_kv_cache, decode reads it back."""
    g = torch.Generator().manual_seed(1)
    page, kvh, h, d, n = 16, 2, 4, 32, 21
    k_cache = torch.full((4, page, kvh, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    key, value = torch.randn(n, kvh, d, generator=g), torch.randn(n, kvh, d, generator=g)
    block_tables = torch.tensor([[2, 0]], dtype=torch.int32)
    slots = torch.tensor([int(block_tables[0, p // page]) * page + p % page for p in range(n)])
    K.write_kv_cache(key, value, k_cache, v_cache, slots)
    q = torch.randn(1, h, d, generator=g)
    batch = (q, k_cache, v_cache, block_tables, torch.tensor([0, 1], dtype=torch.int32),
             torch.tensor([n], dtype=torch.int32))
    out = check_against_reference(batch)
    kk, vv = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    p = torch.softmax(torch.einsum("hd,shd->hs", q[0], kk) / math.sqrt(d), -1)
    torch.testing.assert_close(out[0], torch.einsum("hs,shd->hd", p, vv), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dispatch

def test_dispatch_routes(monkeypatch):
    calls = []
    real = R.paged_attention
    monkeypatch.setattr(R, "paged_attention", lambda *a, **k: calls.append("ref") or real(*a, **k))
    batch = make_batch([1, 3], [10, 3], seed=2)
    monkeypatch.delenv("TRITON_INTERPRET")
    K.paged_attention(*batch, 0.5)
    assert calls == ["ref"]                                  # CPU without the interpreter: reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KVRAY_ATTENTION_BACKEND", "reference")
    K.paged_attention(*batch, 0.5)
    assert calls == ["ref", "ref"]                           # env override forces the reference
    K.set_attention_backend("auto")                          # engine option wins over the env
    if _has_triton():
        K.paged_attention(*batch, 0.5)
        assert calls == ["ref", "ref"]
        monkeypatch.delenv("TRITON_INTERPRET")
        K.set_attention_backend("triton")                    # forced Triton on CPU: interpreter
        K.paged_attention(*batch, 0.5)
        assert calls == ["ref", "ref"]
    K.set_attention_backend("reference")
    K.paged_attention(*batch, 0.5)
    assert calls[-1] == "ref"
    with pytest.raises(ValueError):
        K.set_attention_backend("cuda")
    K.set_attention_backend(None)
    monkeypatch.setenv("KVRAY_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KVRAY_ATTENTION_BACKEND"):
        K.paged_attention(*batch, 0.5)


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------- input checks

def _bad(batch, **changes):
    names = ["q", "k_cache", "v_cache", "block_tables", "query_start_loc", "seq_lens"]
    args = dict(zip(names, batch))
    args.update(changes)
    return args


@pytest.mark.parametrize("change, exc, match", [
    (lambda b: dict(q=torch.randn(b[0].shape[0], 3, b[0].shape[2])), ValueError, "multiple of num_kv_heads"),
    (lambda b: dict(q=torch.randn(b[0].shape[0], 4, 16)), ValueError, "head_dim"),
    (lambda b: dict(block_tables=b[3].long()), TypeError, "block_tables must be int32"),
    (lambda b: dict(query_start_loc=b[4].long()), TypeError, "query_start_loc must be int32"),
    (lambda b: dict(seq_lens=b[5].float()), TypeError, "seq_lens must be int32"),
    (lambda b: dict(q=b[0].half()), TypeError, "dtype"),
    (lambda b: dict(v_cache=b[2].double()), TypeError, "dtype"),
    (lambda b: dict(q=b[0][0]), ValueError, "rank 3"),
    (lambda b: dict(k_cache=b[1][0]), ValueError, "rank 4"),
    (lambda b: dict(seq_lens=b[5][:1]), ValueError, "batch sizes"),
    (lambda b: dict(block_tables=b[3].to("meta")), ValueError, "one device"),
    (lambda b: dict(q=b[0].to("meta")), ValueError, "one device"),
], ids=["heads", "head_dim", "bt_int64", "qsl_int64", "seq_lens_float", "q_fp16", "v_fp64", "q_rank",
        "cache_rank", "batch", "meta_table", "meta_q"])
def test_paged_attention_rejects_bad_inputs(change, exc, match):
    batch = make_batch([1, 2], [5, 9], seed=4)
    with pytest.raises(exc, match=match):
        K.paged_attention(**_bad(batch, **change(batch)), softmax_scale=0.1)


def test_paged_attention_rejects_bad_out_and_scale():
    batch = make_batch([1, 2], [5, 9], seed=4)
    with pytest.raises(ValueError, match="out shape"):
        K.paged_attention(*batch, 0.1, out=torch.empty(2, 4, 32))
    with pytest.raises(TypeError, match="out dtype"):
        K.paged_attention(*batch, 0.1, out=torch.empty_like(batch[0], dtype=torch.float16))
    with pytest.raises(TypeError, match="softmax_scale"):
        K.paged_attention(*batch, torch.tensor(0.1))


@pytest.mark.parametrize("change, exc, match", [
    (dict(slot_mapping=torch.zeros(4, dtype=torch.float32)), TypeError, "int32 or int64"),
    (dict(slot_mapping=torch.zeros(3, dtype=torch.int64)), ValueError, "entries"),
    (dict(key=torch.randn(4, 3, 8)), ValueError, "shapes differ|KV heads"),
    (dict(key=torch.randn(4, 2, 16), value=torch.randn(4, 2, 16)), ValueError, "head_dim"),
    (dict(slot_mapping=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "one device"),
    (dict(v_cache=torch.randn(3, 16, 2, 4)), ValueError, "shapes differ"),
])
def test_write_kv_cache_rejects_bad_inputs(change, exc, match):
    args = dict(key=torch.randn(4, 2, 8), value=torch.randn(4, 2, 8), k_cache=torch.randn(3, 16, 2, 8),
                v_cache=torch.randn(3, 16, 2, 8), slot_mapping=torch.arange(4))
    args.update(change)
    with pytest.raises(exc, match=match):
        K.write_kv_cache(**args)


@needs_triton
@pytest.mark.parametrize("q_lens,seq_lens,pad_tokens,pad_seqs,decode", [
    ([1, 1, 1], [5, 40, 130], 5, 5, True),             # a decode graph bucket of 8: 5 padding sequences
    ([1, 7, 1, 20], [64, 7, 300, 52], 35, 12, False),  # mixed: decodes, a new prompt, a chunk over a prefix
    ([33], [33], 31, 7, False),                         # one prefill, most of the bucket padding
])
def test_attention_on_a_padded_graph_bucket(q_lens, seq_lens, pad_tokens, pad_seqs, decode):
    """A step padded to its CUDA-graph bucket, with the bucket's worst-case hints: padding tokens
    belong to no sequence (the query-start offsets stop at the real tokens), padding sequences
    have no query tokens and length 0. The real rows equal the reference; nothing else is read."""
    q, kc, vc, bt, qsl, sl = make_batch(q_lens, seq_lens, seed=5)
    t, b = q.shape[0], len(q_lens)
    T = t + pad_tokens
    qp = torch.cat([q, torch.full((pad_tokens, *q.shape[1:]), float("nan"))])
    btp = torch.cat([bt, torch.zeros(pad_seqs, bt.shape[1], dtype=bt.dtype)])
    qslp = torch.cat([qsl, torch.full((pad_seqs,), t, dtype=qsl.dtype)])
    slp = torch.cat([sl, torch.zeros(pad_seqs, dtype=sl.dtype)])
    out = torch.full_like(qp, float("nan"))
    K.paged_attention(qp, kc, vc, btp, qslp, slp, 1.0 / math.sqrt(q.shape[-1]), out=out,
                      max_query_len=1 if decode else T, max_seq_len=bt.shape[1] * kc.shape[1])
    ref = R.paged_attention(q, kc, vc, bt, qsl, sl, 1.0 / math.sqrt(q.shape[-1]))
    assert torch.isfinite(out[:t]).all()
    torch.testing.assert_close(out[:t], ref, rtol=2e-5, atol=2e-5)


@needs_triton
def test_padding_tokens_write_no_kv():
    key = torch.randn(6, 2, 32)
    kc = torch.zeros(4, 16, 2, 32)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([3, 17, 40, -1, -1, -1])  # three real tokens, three padding
    K.write_kv_cache(key, key + 1, kc, vc, slots)
    flat_k, flat_v = kc.view(-1, 2, 32), vc.view(-1, 2, 32)
    torch.testing.assert_close(flat_k[slots[:3]], key[:3])
    torch.testing.assert_close(flat_v[slots[:3]], key[:3] + 1)
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    written[slots[:3]] = True
    assert (flat_k[~written] == 0).all() and (flat_v[~written] == 0).all()
