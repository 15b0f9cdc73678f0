"""Triton KV-cache write: scatter each token's K/V rows (all KV heads) into its cache slot. An
FP8 cache gets ``k / k_scale`` (one float32 scale per KV head), rounded to e4m3 (``to_e4m3``)."""
from __future__ import annotations

import importlib
import sys

import triton
import triton.language as tl

# The e4m3 rounding of triton_fp8, from the copy built for the same mode (compiled / interpreted:
# kvray.kernels.triton_impl loads triton_fp8 first, under a name that says the mode); a plain
# import of this module takes the plain import of triton_fp8.
_fp8 = sys.modules.get(__name__.replace("triton_cache", "triton_fp8"))
to_e4m3 = (_fp8 if _fp8 is not None else importlib.import_module("kvray.kernels.triton_fp8")).to_e4m3


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, H_PAD).to(tl.int64)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        ks = tl.load(ks_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
        vs = tl.load(vs_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
        kq = to_e4m3(k.to(tl.float32) / ks)
        vq = to_e4m3(v.to(tl.float32) / vs)
    else:
        kq = k.to(kc_ptr.dtype.element_ty)
        vq = v.to(vc_ptr.dtype.element_ty)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d, kq, mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d, vq, mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Launch one program per token. Inputs are validated by the caller (kvray.kernels); an FP8
    cache comes with its scales."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    h_pad, d_pad = _next_pow2(num_kv_heads), _next_pow2(head_dim)
    elems = h_pad * d_pad
    num_warps = 1 if elems <= 512 else 2 if elems <= 1024 else 4 if elems <= 4096 else 8
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        k_scale if k_scale is not None else slot_mapping, v_scale if v_scale is not None else slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=d_pad, PAGE=k_cache.shape[1],
        FP8=k_scale is not None, num_warps=num_warps)
