"""Triton kernels for the decoder's small per-token ops, fused so a decode step launches a few
kernels per layer instead of dozens: residual add + RMSNorm, per-head RMSNorm + rotary embedding
of q and k (in place), and SiLU-and-multiply. Each has a plain-torch twin in
``kvray.kernels.reference`` with the same signature."""
from __future__ import annotations

import triton
import triton.language as tl


# Sums go through tl.reduce with triton's own combine function rather than the tl.sum helper (a
# @triton.jit function bound to the mode triton was first imported in), so the dispatch can switch
# the interpreter on per call; see triton_attention.py.
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # pragma: no cover - other triton versions
    @triton.jit
    def _sum_combine(a, b):
        return a + b


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, D, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the residual sum is rounded to the activation dtype, as an eager add would be
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.reduce(xf * xf, 0, _sum_combine) / D + eps)
    y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual=None):
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    out = x.new_empty(x2.shape)
    res2 = residual.view(-1, d) if residual is not None else x2
    n = x2.shape[0]
    if n:
        _rms_norm_kernel[(n,)](x2, res2, weight, out, x2.stride(0), res2.stride(0), out.stride(0), d, eps,
                               HAS_RES=residual is not None, BLOCK=_pow2(d), num_warps=4 if d >= 1024 else 1)
    out = out.view(x.shape)
    return (out, residual) if residual is not None else out


@triton.jit
def _qk_norm_rope_kernel(x_ptr, pos_ptr, inv_freq_ptr, w_ptr, stride_t, stride_h, eps,
                         HAS_NORM: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    base = x_ptr + t * stride_t + h * stride_h
    j = tl.arange(0, HALF)
    x1 = tl.load(base + j).to(tl.float32)
    x2 = tl.load(base + HALF + j).to(tl.float32)
    if HAS_NORM:
        inv = 1.0 / tl.sqrt((tl.reduce(x1 * x1, 0, _sum_combine) + tl.reduce(x2 * x2, 0, _sum_combine)) / (2 * HALF) + eps)
        x1 = (x1 * inv).to(x_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + j).to(tl.float32)
        x2 = (x2 * inv).to(x_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + HALF + j).to(tl.float32)
        x1 = x1.to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = x2.to(x_ptr.dtype.element_ty).to(tl.float32)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freq = pos * tl.load(inv_freq_ptr + j)
    c = tl.cos(freq).to(x_ptr.dtype.element_ty).to(tl.float32)
    s = tl.sin(freq).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(base + j, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + j, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty))


def qk_norm_rope_triton(q, k, positions, inv_freq, q_weight, k_weight, eps):
    for x, w in ((q, q_weight), (k, k_weight)):
        t, heads, d = x.shape
        if t:
            _qk_norm_rope_kernel[(t, heads)](x, positions, inv_freq, w if w is not None else x, x.stride(0),
                                             x.stride(1), eps, HAS_NORM=w is not None, HALF=d // 2,
                                             num_warps=1)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x):
    n, two_i = x.shape
    i = two_i // 2
    out = x.new_empty((n, i))
    if n:
        block = min(1024, _pow2(i))
        _silu_mul_kernel[(n, triton.cdiv(i, block))](x, out, x.stride(0), out.stride(0), i, BLOCK=block,
                                                     num_warps=4)
    return out
