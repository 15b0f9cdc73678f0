"""Triton FP8 kernels: dynamic activation quantization and the block-scaled FP8 GEMM.

* ``quant_fp8_triton(x, group_size)``: e4m3 quantization of each row of ``x`` [M, K], one scale per
  row (``group_size=None``: per token) or per ``group_size`` consecutive elements of a row (per
  token group, the activations of block-scaled checkpoints), ``scale = amax / 448``. One program
  per (row, group): the whole quantization of a step's activations is one launch.
* ``fp8_block_gemm_triton(a, a_scale, b, b_scale, block, out_dtype)``: ``out = (a * a_scale) @
  (b * b_scale)^T`` with ``a`` [M, K] e4m3 scaled per (row, K-group), ``b`` [N, K] e4m3 (the
  weight as stored) scaled per (block_n rows, block_k columns). The K tile equals ``block_k``, so
  each tile's partial product is scaled once, in float32, by its row and column scales.

``to_e4m3`` rounds to the e4m3 grid in float32 before the cast (round to nearest even on the
mantissa, the subnormal grid below 2^-6), so the cast itself is exact: the GPU's cast and Triton's
CPU interpreter (whose float8 cast can halve values that round up to a power of two) then agree
with ``torch.Tensor.to(torch.float8_e4m3fn)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
_max_combine = getattr(tl.standard, "_elementwise_max", None)
if _max_combine is None:  # pragma: no cover - other triton versions
    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)


@triton.jit
def to_e4m3(x):
    """float32 -> float8e4nv, clamped to +-448, rounded to nearest even."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576   # keep 3 mantissa bits (0xFFF00000)
    normal = bits.to(tl.float32, bitcast=True)
    sub = (tl.abs(x) + 24576.0) - 24576.0  # 1.5 * 2^14: rounds to a multiple of 2^-9, ties to even
    sub = tl.where(x < 0, -sub, sub)       # keeps the sign of values that round to zero
    y = tl.where(tl.abs(x) < 0.015625, sub, normal)
    return y.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["K"])
def _quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    g0 = grp * GROUP
    amax = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, GROUP, BLOCK):
        offs = g0 + start + tl.arange(0, BLOCK)
        ok = (offs < K) & (start + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.reduce(amax, 0, _max_combine), 1e-10) / 448.0
    tl.store(s_ptr + row * stride_s + grp, scale)
    inv = 1.0 / scale
    for start in range(0, GROUP, BLOCK):
        offs = g0 + start + tl.arange(0, BLOCK)
        ok = (offs < K) & (start + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, to_e4m3(x * inv), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                       stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                       SCALE_BN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n                       # grouped order: neighbouring programs share B tiles
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_rows = b_ptr + offs_n[:, None] * stride_bn
    as_rows = as_ptr + offs_m * stride_asm
    bs_rows = bs_ptr + (offs_n // SCALE_BN) * stride_bsn
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k = kt * BLOCK_K + offs_k
        k_ok = k < K
        a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        sa = tl.load(as_rows + kt, mask=m_ok, other=0.0)
        sb = tl.load(bs_rows + kt, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- host side

def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def quant_fp8_triton(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [M, K], scale [M, G] float32) with G = 1 (per token) or cdiv(K, group_size)."""
    m, k = x.shape
    group = k if group_size is None else int(group_size)
    num_groups = -(-k // group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block = min(_next_pow2(group), 4096)
    _quant_fp8_kernel[(m, num_groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                                       GROUP=group, BLOCK=block, num_warps=4 if block >= 1024 else 1)
    return q, s


def pick_gemm_config(m: int) -> dict:
    """Tiles by the number of rows (decode batches are small: narrow N tiles give more programs)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def fp8_block_gemm_triton(a, a_scale, b, b_scale, block: tuple[int, int], out_dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs are validated by the caller (kvray.kernels). ``block`` = (scale rows, scale columns) of
    ``b_scale``; ``a_scale`` has one column per ``block[1]`` of K."""
    m, k = a.shape
    n = b.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    cfg = pick_gemm_config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _block_gemm_kernel[grid](a, a_scale, b, b_scale, out, m, n, k,
                             a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0), out.stride(0),
                             SCALE_BN=int(block[0]), BLOCK_K=int(block[1]), GROUP_M=8, **cfg)
    return out
