"""FP8 kernels on CPU: the Triton kernels under Triton's interpreter against kvray.kernels.reference
(activation quantization, the block-scaled GEMM, the e4m3 rounding, the FP8 KV-cache write and
attention over an FP8 cache), and their input checks."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import kvray.kernels as K
from kvray.kernels import reference as R

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND", raising=False)
    K.set_attention_backend(None)
    yield
    K.set_attention_backend(None)


def test_e4m3_rounding_matches_torch_cast():
    """Every e4m3 value, the midpoints between neighbours nudged either way, and values past 448:
    the kernel's rounding equals torch's cast (saturated)."""
    grid = torch.arange(0, 256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids * (1 + 1e-3), mids * (1 - 1e-3), torch.tensor([460.0, 1e4, -1e4, 1e-9])])
    x = torch.cat([x, -x]).view(1, -1).clamp(-448, 448)
    row = torch.cat([x, torch.tensor([[448.0]])], dim=1)  # amax 448: the scale is exactly 1
    q, s = K.quant_fp8(row)
    assert float(s) == 1.0
    torch.testing.assert_close(q.float(), R.to_fp8(row).float(), rtol=0, atol=0)


@pytest.mark.parametrize("group", [None, 128, 64])
@pytest.mark.parametrize("shape", [(1, 64), (7, 300), (33, 512)])
def test_quant_fp8_matches_reference(shape, group):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])
    x[0, :] = 0.0  # an all-zero row: scale floor, zeros out
    for dtype in (torch.float32, torch.bfloat16):
        q, s = K.quant_fp8(x.to(dtype), group)
        qr, sr = R.quant_fp8(x.to(dtype), group)
        groups = 1 if group is None else -(-shape[1] // group)
        assert q.dtype == FP8 and q.shape == shape and s.shape == (shape[0], groups) and s.dtype == torch.float32
        torch.testing.assert_close(s, sr, rtol=0, atol=0)
        torch.testing.assert_close(q.float(), qr.float(), rtol=0, atol=0)
        assert not q[0].float().any()
        # dequantized within half an e4m3 step (2^-4 relative) of the input, plus the subnormal step
        deq = q.float() * R.expand_block_scale(s, shape[0], shape[1], (1, group or shape[1]))
        err = (deq - x.to(dtype).float()).abs()
        assert bool((err <= 0.0625 * x.to(dtype).float().abs() + 2 ** -9 * s.max()).all())


@pytest.mark.parametrize("m", [1, 5, 17, 70, 130])
@pytest.mark.parametrize("block", [(128, 128), (1, 128), (128, 64)])
def test_block_gemm_matches_reference(m, block):
    n, k = 272, 320  # neither a multiple of 128: partial tiles on both axes
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    a, a_s = R.quant_fp8(x, block[1])
    nb, kb = -(-n // block[0]), -(-k // block[1])
    b_s = torch.rand(nb, kb, generator=g) * 0.01 + 1e-3
    b = R.to_fp8(w / R.expand_block_scale(b_s, n, k, block))
    for out_dtype in (torch.float32, torch.bfloat16):
        out = K.fp8_block_gemm(a, a_s, b, b_s, block, out_dtype)
        ref = R.fp8_block_gemm(a, a_s, b, b_s, block, out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    # the reference is the dequantized product
    deq = (a.float() * R.expand_block_scale(a_s, m, k, (1, block[1]))) @ (
        b.float() * R.expand_block_scale(b_s, n, k, block)).t()
    torch.testing.assert_close(R.fp8_block_gemm(a, a_s, b, b_s, block, torch.float32), deq)


def test_fp8_gemm_input_checks():
    a, a_s = R.quant_fp8(torch.randn(4, 256), 128)
    b = R.to_fp8(torch.randn(128, 256))
    with pytest.raises(ValueError, match="b_scale must be float32 of shape \\[1, 2\\]"):
        K.fp8_block_gemm(a, a_s, b, torch.ones(2, 2), (128, 128), torch.float32)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        K.fp8_block_gemm(a.float(), a_s, b, torch.ones(1, 2), (128, 128), torch.float32)
    with pytest.raises(ValueError, match="K=256 but b has K=128"):
        K.fp8_block_gemm(a, a_s, b[:, :128], torch.ones(1, 1), (128, 128), torch.float32)
    with pytest.raises(ValueError, match="a_scale"):
        K.fp8_scaled_mm(a, a_s, b, torch.ones(128), torch.float32)  # a_scale must be [M, 1]


def _fp8_batch(q_lens, seq_lens, seed, num_heads=4, num_kv_heads=2, head_dim=32, page=16, dtype=torch.float32):
    """A random paged batch whose K/V were written by the reference FP8 write (per-head scales);
    unused slots hold NaN bytes."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(n_pages) + 3
    nan = torch.tensor(float("nan")).to(FP8).view(torch.uint8)
    k_cache = torch.full((num_blocks, page, num_kv_heads, head_dim), int(nan), dtype=torch.uint8).view(FP8)
    v_cache = k_cache.clone()
    k_scale = torch.rand(num_kv_heads, generator=g) + 0.25
    v_scale = torch.rand(num_kv_heads, generator=g) + 0.25
    perm = torch.randperm(num_blocks - 1, generator=g)
    tables = torch.full((len(seq_lens), max(n_pages) + 1), num_blocks - 1, dtype=torch.int32)
    used, slots = 0, []
    for i, (s, n) in enumerate(zip(seq_lens, n_pages)):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
        slots += [int(tables[i, p // page]) * page + p % page for p in range(s)]
    total = len(slots)
    key = torch.randn(total, num_kv_heads, head_dim, generator=g) * 3
    value = torch.randn(total, num_kv_heads, head_dim, generator=g) * 3
    R.write_kv_cache(key, value, k_cache, v_cache, torch.tensor(slots), k_scale, v_scale)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g).to(dtype)
    return (q, k_cache, v_cache, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32)), (k_scale, v_scale)


@pytest.mark.parametrize("case", [
    ([5, 1, 30], [5, 40, 30]),            # prefill, decode, prefill
    ([1, 1, 1], [300, 17, 520]),          # decode only: split-KV on long contexts
    ([9, 3], [200, 67]),                  # chunked prefill over a cached prefix
])
def test_paged_attention_over_fp8_cache_matches_reference(case):
    batch, (ks, vs) = _fp8_batch(*case, seed=len(case[0]) + sum(case[1]))
    scale = 1 / math.sqrt(batch[0].shape[-1])
    out = K.paged_attention(*batch, scale, k_scale=ks, v_scale=vs)
    ref = R.paged_attention(*batch, scale, k_scale=ks, v_scale=vs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    # the reference reads the cache as fp8 * scale: the same as attention over the dequantized cache
    deq = [c.float() * s.view(1, 1, -1, 1) for c, s in ((batch[1], ks), (batch[2], vs))]
    plain = R.paged_attention(batch[0], deq[0], deq[1], *batch[3:], scale)
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)


def test_write_kv_cache_fp8_matches_reference():
    g = torch.Generator().manual_seed(7)
    num_blocks, page, kvh, d = 6, 16, 3, 24  # head counts and dims that are no powers of two
    key = torch.randn(40, kvh, d, generator=g) * 50   # some values past 448 * scale: saturate
    value = torch.randn(40, kvh, d, generator=g)
    slots = torch.randperm(num_blocks * page, generator=g)[:40]
    slots[3] = -1  # skipped
    k_scale, v_scale = torch.tensor([0.1, 1.0, 2.5]), torch.tensor([0.02, 0.5, 1.0])
    caches = []
    for fn in (K.write_kv_cache, R.write_kv_cache):
        kc = torch.zeros(num_blocks, page, kvh, d, dtype=torch.uint8).view(FP8)
        vc = kc.clone()
        fn(key, value, kc, vc, slots, k_scale, v_scale)
        caches.append((kc.view(torch.uint8), vc.view(torch.uint8)))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    flat = caches[0][0].view(FP8).view(-1, kvh, d).float()
    assert int((flat.abs().sum((1, 2)) > 0).sum()) == 39  # every token but the skipped one
    kept = slots >= 0
    expect = (key[kept] / k_scale.view(1, -1, 1)).clamp(-448, 448).to(FP8).float()
    torch.testing.assert_close(flat[slots[kept]], expect, rtol=0, atol=0)


def test_kv_scale_checks():
    kc = torch.zeros(2, 16, 2, 8, dtype=FP8)
    key = torch.randn(1, 2, 8)
    slot = torch.tensor([0])
    with pytest.raises(TypeError, match="needs k_scale"):
        K.write_kv_cache(key, key, kc, kc.clone(), slot)
    with pytest.raises(ValueError, match=r"k_scale must be float32 of shape \[2\]"):
        K.write_kv_cache(key, key, kc, kc.clone(), slot, torch.ones(3), torch.ones(2))
    plain = torch.zeros(2, 16, 2, 8)
    with pytest.raises(ValueError, match="for float8_e4m3fn caches"):
        K.write_kv_cache(key, key, plain, plain.clone(), slot, torch.ones(2), torch.ones(2))
    q = torch.randn(1, 4, 8)
    args = (torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), 0.3)
    with pytest.raises(TypeError, match="needs v_scale"):
        K.paged_attention(q, kc, kc.clone(), *args, k_scale=torch.ones(2))
