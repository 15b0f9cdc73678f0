"""The paged-attention and KV-cache entry points: shape checks, then the Triton kernels or the
torch reference (``kvray.kernels.dispatch``). They only check shapes, dtypes and devices: no
device reads, no syncs."""
from __future__ import annotations

import torch

from kvray.kernels import reference
from kvray.kernels._checks import check_kv_scales, check_paged_attention, check_write_kv_cache
from kvray.kernels.dispatch import route, triton_impl


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into the paged caches
    [num_blocks, block_size, num_kv_heads, head_dim] at ``slot_mapping`` (int32/int64; slot =
    block_id * block_size + offset; negative slots are skipped). A float8_e4m3fn cache stores
    ``key / k_scale`` and ``value / v_scale`` (float32 [num_kv_heads] each), saturated at +-448."""
    check_write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    use_triton, interpret = route(key.device)
    if not use_triton:
        return reference.write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    triton_impl(interpret).cache.write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                    out: torch.Tensor | None = None, *, max_seq_len: int | None = None,
                    max_query_len: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries (the last q_len_i positions of its seq_lens[i]-long
    context) over its paged K/V. Prefill, chunked prefill over a cached prefix and decode alike.

    ``max_seq_len`` / ``max_query_len`` are optional host-side hints (upper bounds) used only to
    pick tile sizes and the split-KV count; without them the choice comes from the shapes
    (``block_tables.shape[1] * block_size`` bounds the context). Results never depend on them.
    Under CUDA-graph capture pass fixed hints so every replay sees the same launch grid.
    A float8_e4m3fn cache is read as ``k_cache * k_scale`` / ``v_cache * v_scale`` (see write_kv_cache).
    """
    check_paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale, out)
    check_kv_scales(k_cache, k_scale, v_scale)
    if out is None:
        out = torch.empty_like(q)
    use_triton, interpret = route(q.device)
    if not use_triton:
        return reference.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                         softmax_scale, out, k_scale, v_scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    return triton_impl(interpret).attention.paged_attention_triton(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale, out,
        max_seq_len=max_seq_len, max_query_len=max_query_len, k_scale=k_scale, v_scale=v_scale)
