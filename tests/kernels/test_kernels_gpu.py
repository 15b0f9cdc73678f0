"""kvray.kernels on a CUDA GPU: the compiled Triton kernels at real sizes against a float32 torch
reference (relative error ||out - ref|| / ||ref|| <= 1e-2), every output element written.

Run with `pytest -m gpu tests/test_kernels_gpu.py` on the lent H100/H200.
"""
from __future__ import annotations

import math

import pytest
import torch

import kvray.kernels as K
from kvray.kernels import reference as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND", raising=False)
    K.set_attention_backend(None)


def make_batch(q_lens, seq_lens, num_heads=16, num_kv_heads=8, head_dim=128, page=16,
               dtype=torch.bfloat16, seed=0):
    """Random paged batch on the GPU: shuffled pages, NaN in every slot past a context and in the
    block that unused table entries point at."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    n_pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(n_pages) + 4
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, device=DEV).to(dtype)
    v_cache = torch.randn(shape, generator=g, device=DEV).to(dtype)
    nan_block = num_blocks - 1
    k_cache[nan_block] = float("nan")
    v_cache[nan_block] = float("nan")
    perm = torch.randperm(num_blocks - 1, device="cpu")
    block_tables = torch.full((len(seq_lens), max(n_pages) + 2), nan_block, dtype=torch.int32)
    used = 0
    for i, (s, n) in enumerate(zip(seq_lens, n_pages)):
        block_tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
        if s % page:
            last = int(block_tables[i, n - 1])
            k_cache[last, s % page:] = float("nan")
            v_cache[last, s % page:] = float("nan")
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g, device=DEV).to(dtype)
    return (q, k_cache, v_cache, block_tables.to(DEV), qsl.to(DEV),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEV))


def check(batch, tol=1e-2, **kw):
    q = batch[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.full_like(q, float("nan"))
    res = K.paged_attention(*batch, scale, out=out, **kw)
    assert res is out
    ref = R.paged_attention(q.float(), batch[1].float(), batch[2].float(), *batch[3:], scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "unwritten or NaN output elements"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= tol, f"relative error {rel:.2e} > {tol}"
    return rel


MIXED = ([1] * 12 + [300, 77, 1, 513], [700, 1, 16, 17, 2048, 33, 64, 65, 1000, 15, 129, 300] + [300, 900, 31, 1500])
DECODE = ([1] * 48, [int(x) for x in torch.randint(1, 3000, (48,), generator=torch.Generator().manual_seed(0))])


@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_bf16_shapes(kind, head_dim, page):
    q_lens, seq_lens = MIXED if kind == "mixed" else DECODE
    check(make_batch(q_lens, seq_lens, head_dim=head_dim, page=page, seed=head_dim + page))


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios(group):
    kvh = 8 if group < 8 else 4
    check(make_batch(*MIXED, num_heads=group * kvh, num_kv_heads=kvh, seed=group))
    check(make_batch(*DECODE, num_heads=group * kvh, num_kv_heads=kvh, seed=group), max_query_len=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    check(make_batch(*MIXED, dtype=dtype, seed=3))
    check(make_batch(*DECODE, dtype=dtype, seed=4))


def test_prefill_long_and_prefix_chunks():
    check(make_batch([4096], [4096], seed=5))                          # one long prompt
    check(make_batch([2048, 1024, 1], [2048, 3072, 4000], seed=6))     # chunk over a cached prefix


def test_split_kv_long_context():
    attn = K.triton_impl(False).attention
    batch = make_batch([1], [8192], seed=7)
    cfg = attn.pick_config(1, 1, 8, 2, 128, 1, 8192, attn._num_sms(batch[0].device))
    assert cfg["num_splits"] > 1
    check(batch, max_seq_len=8192, max_query_len=1)
    check(make_batch([1, 1, 1, 1], [8000, 5, 700, 129], seed=8), max_seq_len=8192, max_query_len=1)
    check(make_batch([16, 3], [6000, 100], seed=9))                    # split-KV with several queries


def test_write_kv_cache_gpu():
    g = torch.Generator(device=DEV).manual_seed(10)
    k_cache = torch.randn(64, 16, 8, 128, generator=g, device=DEV).to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    n = 300
    key = torch.randn(n, 8, 128, generator=g, device=DEV).to(torch.bfloat16)
    value = torch.randn(n, 8, 128, generator=g, device=DEV).to(torch.bfloat16)
    slots = torch.randperm(64 * 16, device=DEV)[:n]
    slots[::7] = -1
    for dt in (torch.int32, torch.int64):
        kc, vc, ek, ev = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        K.write_kv_cache(key, value, kc, vc, slots.to(dt))
        R.write_kv_cache(key, value, ek, ev, slots.to(dt))
        assert torch.equal(kc, ek) and torch.equal(vc, ev)


def test_cuda_graph_capture_and_replay():
    """Write + attention captured in a CUDA graph (no host syncs), replayed on new data."""
    batch = make_batch([1] * 8, [100, 200, 300, 400, 17, 1, 1000, 63], seed=11)
    q, k_cache, v_cache, bt, qsl, seq_lens = batch
    key = torch.randn(8, 8, 128, device=DEV, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.zeros(8, dtype=torch.int64, device=DEV)
    out = torch.empty_like(q)
    hints = dict(max_seq_len=1024, max_query_len=1)

    def step():
        K.write_kv_cache(key, value, k_cache, v_cache, slots)
        K.paged_attention(q, k_cache, v_cache, bt, qsl, seq_lens, 0.1, out=out, **hints)

    def set_inputs(lens):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        pos = seq_lens.long() - 1
        slots.copy_(bt.long().gather(1, (pos // 16)[:, None])[:, 0] * 16 + pos % 16)
        q.normal_()
        key.normal_()
        value.normal_()

    set_inputs([100, 200, 300, 400, 17, 1, 1000, 63])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()                                                          # warm up (compile) off-graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([99, 150, 301, 380, 16, 1, 999, 64], [1, 2, 3, 4, 5, 2, 7, 8]):  # new token <= old len + 1
        set_inputs(lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = R.paged_attention(q.float(), k_cache.float(), v_cache.float(), bt, qsl, seq_lens, 0.1)
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() <= 1e-2


def test_reference_override_on_cuda(monkeypatch):
    calls = []
    real = R.paged_attention
    monkeypatch.setattr(R, "paged_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = make_batch([1, 2], [10, 20], seed=12)
    monkeypatch.setenv("KVRAY_ATTENTION_BACKEND", "reference")
    K.paged_attention(*batch, 0.1)
    assert calls == [1]
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND")
    K.paged_attention(*batch, 0.1)
    assert calls == [1]


@pytest.mark.parametrize("kind,pad_tokens,pad_seqs", [("mixed", 300, 240), ("decode", 16, 16)])
def test_padded_to_a_graph_bucket(kind, pad_tokens, pad_seqs):
    """A step padded to its CUDA-graph bucket, launched with the bucket's worst-case hints, as the
    graphs run it: padding tokens owned by no sequence, padding sequences without queries."""
    q, kc, vc, bt, qsl, sl = make_batch(*(MIXED if kind == "mixed" else DECODE), seed=3)
    t, b = q.shape[0], bt.shape[0]
    qp = torch.cat([q, torch.full((pad_tokens, *q.shape[1:]), float("nan"), device=DEV, dtype=q.dtype)])
    btp = torch.cat([bt, torch.zeros(pad_seqs, bt.shape[1], dtype=bt.dtype, device=DEV)])
    qslp = torch.cat([qsl, torch.full((pad_seqs,), t, dtype=qsl.dtype, device=DEV)])
    slp = torch.cat([sl, torch.zeros(pad_seqs, dtype=sl.dtype, device=DEV)])
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.full_like(qp, float("nan"))
    K.paged_attention(qp, kc, vc, btp, qslp, slp, scale, out=out, max_query_len=1 if kind == "decode" else t + pad_tokens,
                      max_seq_len=4096)
    ref = R.paged_attention(q.float(), kc.float(), vc.float(), bt, qsl, sl, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out[:t]).all()
    rel = ((out[:t].float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, rel
