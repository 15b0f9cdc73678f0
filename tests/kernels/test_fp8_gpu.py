"""FP8 kernels on a GPU with FP8 (compute capability >= 8.9), at real sizes, against
kvray.kernels.reference: activation quantization, torch._scaled_mm with row-wise scales, the Triton
block-scaled GEMM, and paged attention over an FP8 KV cache; each captured in a CUDA graph too.

Run with `pytest -m gpu tests/kernels/test_fp8_gpu.py` on the lent H100/H200.
"""
from __future__ import annotations

import math

import pytest
import torch

import kvray.kernels as K
from kvray.kernels import reference as R

FP8 = torch.float8_e4m3fn
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND", raising=False)
    K.set_attention_backend(None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def graphed(fn):
    """``fn()`` captured in a CUDA graph and replayed: its output."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("m, k", [(1, 4096), (37, 4096), (256, 14336), (2048, 4096)])
@pytest.mark.parametrize("group", [None, 128])
def test_quant_fp8_matches_reference(m, k, group):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 4
    q, s = K.quant_fp8(x, group)
    qr, sr = R.quant_fp8(x, group)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    # GPU division may differ from torch's in the last bit: at most one e4m3 step apart, rarely
    diff = (q.float() - qr.float()).abs() > 0
    assert float(diff.float().mean()) < 1e-3
    deq = q.float() * R.expand_block_scale(s, m, k, (1, group or k))
    assert rel_err(deq, x) < 0.03


@pytest.mark.parametrize("m, n, k", [(1, 6144, 4096), (64, 4096, 4096), (256, 28672, 4096), (2048, 4096, 14336)])
def test_scaled_mm_row_wise_matches_reference(m, n, k):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    from kvray.replica.models.quantization import quantize_per_channel
    wq, ws = quantize_per_channel(w)
    xq, xs = K.quant_fp8(x)
    out = K.fp8_scaled_mm(xq, xs, wq, ws, torch.bfloat16)
    ref = R.fp8_scaled_mm(xq, xs, wq, ws, torch.float32)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    assert rel_err(out, x.float() @ w.float().t()) < 0.05  # FP8 x FP8 against the bf16 product
    assert rel_err(graphed(lambda: K.fp8_scaled_mm(*K.quant_fp8(x), wq, ws, torch.bfloat16)), ref) < 1e-2


@pytest.mark.parametrize("m, n, k", [(1, 6144, 4096), (16, 4096, 4096), (100, 28672, 4096), (2048, 4096, 14336),
                                     (33, 200, 300)])
@pytest.mark.parametrize("block", [(128, 128), (1, 128)])
def test_block_gemm_matches_reference(m, n, k, block):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    from kvray.replica.models.quantization import quantize_blockwise
    wq, ws = quantize_blockwise(w, (128, 128))
    if block == (1, 128):  # the layout of fused layers whose parts end inside a block
        ws = ws.repeat_interleave(128, 0)[:n].contiguous()
    xq, xs = K.quant_fp8(x, 128)
    out = K.fp8_block_gemm(xq, xs, wq, ws, block, torch.bfloat16)
    ref = R.fp8_block_gemm(xq, xs, wq, ws, block, torch.float32)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, x.float() @ w.float().t()) < 0.05
    assert rel_err(graphed(lambda: K.fp8_block_gemm(*K.quant_fp8(x, 128), wq, ws, block, torch.bfloat16)), ref) < 1e-2


def _fp8_paged(q_lens, seq_lens, num_heads=32, num_kv_heads=8, head_dim=128, page=16):
    g = torch.Generator(device=DEV).manual_seed(sum(seq_lens))
    n_pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(n_pages) + 2
    k_cache = torch.empty(num_blocks, page, num_kv_heads, head_dim, dtype=FP8, device=DEV)
    v_cache = torch.empty_like(k_cache)
    k_scale = torch.rand(num_kv_heads, device=DEV, generator=g) + 0.5
    v_scale = torch.rand(num_kv_heads, device=DEV, generator=g) + 0.5
    perm = torch.randperm(num_blocks, device="cpu")
    tables = torch.zeros(len(seq_lens), max(n_pages), dtype=torch.int32)
    slots, used = [], 0
    for i, (s, n) in enumerate(zip(seq_lens, n_pages)):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
        slots += [int(tables[i, p // page]) * page + p % page for p in range(s)]
    key = torch.randn(len(slots), num_kv_heads, head_dim, device=DEV, generator=g).to(torch.bfloat16) * 2
    value = torch.randn(len(slots), num_kv_heads, head_dim, device=DEV, generator=g).to(torch.bfloat16)
    slot_t = torch.tensor(slots, device=DEV)
    K.write_kv_cache(key, value, k_cache, v_cache, slot_t, k_scale, v_scale)
    kr, vr = torch.empty_like(k_cache), torch.empty_like(v_cache)
    kr.copy_(k_cache)
    vr.copy_(v_cache)
    R.write_kv_cache(key, value, kr, vr, slot_t, k_scale, v_scale)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, device=DEV, generator=g).to(torch.bfloat16)
    return (q, k_cache, v_cache, tables.to(DEV), qsl.to(DEV), torch.tensor(seq_lens, dtype=torch.int32, device=DEV)), \
        (k_scale, v_scale), (kr, vr)


@pytest.mark.parametrize("case", [([1] * 64, [1000 + 37 * i for i in range(64)]),   # decode batch (split-KV)
                                  ([512, 1, 1], [512, 3000, 70]),                    # prefill next to decodes
                                  ([256, 300], [2048, 300])])                        # chunk over a cached prefix
def test_paged_attention_over_fp8_cache_matches_reference(case):
    batch, (ks, vs), (kr, vr) = _fp8_paged(*case)
    # the Triton write stores what the reference write stores (up to a rare last-bit division difference)
    assert float((batch[1].view(torch.uint8) != kr.view(torch.uint8)).float().mean()) < 1e-3
    scale = 1 / math.sqrt(batch[0].shape[-1])
    out = K.paged_attention(*batch, scale, max_seq_len=4096, k_scale=ks, v_scale=vs)
    ref = R.paged_attention(batch[0].float(), *batch[1:], scale, k_scale=ks, v_scale=vs)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2
    out_g = graphed(lambda: K.paged_attention(*batch, scale, max_seq_len=4096, k_scale=ks, v_scale=vs))
    assert rel_err(out_g, ref) < 1e-2
