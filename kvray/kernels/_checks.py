"""Input checks for the kernel entry points: shapes, dtypes and devices only (never a device read,
so they cost no GPU sync and are safe under CUDA-graph capture)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOT_DTYPES = (torch.int32, torch.int64)
FP8 = torch.float8_e4m3fn


def _tensors(**named) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _one_device(**named) -> None:
    items = list(named.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"all tensors must be on one device: {name0} is on {t0.device}, {name} on {t.device}")


def _rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")


def _cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _rank("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _rank("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if k_cache.shape[2] == 0 or k_cache.shape[1] == 0:
        raise ValueError(f"caches need block_size > 0 and num_kv_heads > 0, got shape {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head_dim axis must be contiguous (stride 1)")


def check_write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    _tensors(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _one_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _rank("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    _rank("value", value, 3, "[num_tokens, num_kv_heads, head_dim]")
    _cache_pair(k_cache, v_cache)
    _rank("slot_mapping", slot_mapping, 1, "[num_tokens]")
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    if key.shape[1] != k_cache.shape[2]:
        raise ValueError(f"key has {key.shape[1]} KV heads but the cache has {k_cache.shape[2]}")
    if key.shape[2] != k_cache.shape[3]:
        raise ValueError(f"key head_dim {key.shape[2]} != cache head_dim {k_cache.shape[3]}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    if slot_mapping.dtype not in SLOT_DTYPES:
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.shape[0] > 1 and slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping must be contiguous (stride 1)")
    if not (key.is_floating_point() and value.is_floating_point()):
        raise TypeError(f"key/value must be floating point, got {key.dtype}/{value.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value head_dim axis must be contiguous (stride 1)")


def check_paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale, out) -> None:
    """Raise ValueError/TypeError on bad inputs. This runs once per layer per step, so the common
    case is one flat expression (~a few us); only a failing input takes the detailed path."""
    try:
        dev = q.device
        qs, ks = q.shape, k_cache.shape
        i32 = torch.int32
        ok = (q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == ks
              and k_cache.device == dev and v_cache.device == dev and block_tables.device == dev
              and query_start_loc.device == dev and seq_lens.device == dev
              and (q.dtype == k_cache.dtype or k_cache.dtype == FP8) and v_cache.dtype == k_cache.dtype
              and q.is_floating_point()
              and ks[1] > 0 and ks[2] > 0 and qs[1] % ks[2] == 0 and qs[2] == ks[3]
              and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
              and block_tables.dtype == i32 and query_start_loc.dtype == i32 and seq_lens.dtype == i32
              and block_tables.dim() == 2 and query_start_loc.dim() == 1 and seq_lens.dim() == 1
              and seq_lens.shape[0] == block_tables.shape[0] and query_start_loc.shape[0] == block_tables.shape[0] + 1
              and (block_tables.shape[1] <= 1 or block_tables.stride(1) == 1)
              and (query_start_loc.shape[0] <= 1 or query_start_loc.stride(0) == 1)
              and (seq_lens.shape[0] <= 1 or seq_lens.stride(0) == 1)
              and isinstance(softmax_scale, (int, float))
              and (out is None or (out.device == dev and out.shape == qs and out.dtype == q.dtype
                                   and out.stride(-1) == 1)))
    except (AttributeError, IndexError, TypeError, ZeroDivisionError):
        ok = False
    if not ok:
        _check_paged_attention_detailed(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                        softmax_scale, out)
        raise ValueError("invalid paged_attention inputs")  # pragma: no cover - the detailed checks raise


def _check_paged_attention_detailed(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale,
                                    out) -> None:
    _tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
             query_start_loc=query_start_loc, seq_lens=seq_lens)
    named = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                 query_start_loc=query_start_loc, seq_lens=seq_lens)
    if out is not None:
        _tensors(out=out)
        named["out"] = out
    _one_device(**named)
    _rank("q", q, 3, "[num_q_tokens, num_heads, head_dim]")
    _cache_pair(k_cache, v_cache)
    _rank("block_tables", block_tables, 2, "[num_seqs, max_blocks]")
    _rank("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    _rank("seq_lens", seq_lens, 1, "[num_seqs]")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if not q.is_floating_point():
        raise TypeError(f"q must be floating point, got {q.dtype}")
    if k_cache.dtype != q.dtype and k_cache.dtype != FP8:
        raise TypeError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    for name in ("block_tables", "query_start_loc", "seq_lens"):
        if named[name].dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {named[name].dtype}")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"batch sizes disagree: block_tables {num_seqs} rows, seq_lens {seq_lens.shape[0]}, "
                         f"query_start_loc {query_start_loc.shape[0]} (must be num_seqs + 1)")
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous (stride 1)")
    for name in ("query_start_loc", "seq_lens"):
        if named[name].shape[0] > 1 and named[name].stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride 1)")
    if isinstance(softmax_scale, torch.Tensor) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a Python float, got {type(softmax_scale).__name__}")
    if out is not None:
        if out.shape != q.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"out dtype {out.dtype} != q dtype {q.dtype}")
        if out.stride(-1) != 1:
            raise ValueError("out's head_dim axis must be contiguous (stride 1)")


def check_kv_scales(k_cache: torch.Tensor, k_scale, v_scale) -> None:
    """An FP8 (e4m3) cache needs ``k_scale`` and ``v_scale``: float32 [num_kv_heads] on its device;
    other caches take none."""
    if k_cache.dtype != FP8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are for float8_e4m3fn caches; this cache is {k_cache.dtype}")
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"a float8_e4m3fn KV cache needs {name}: a float32 tensor [num_kv_heads]")
        if s.dtype != torch.float32 or tuple(s.shape) != (k_cache.shape[2],) or s.device != k_cache.device:
            raise ValueError(f"{name} must be float32 of shape [{k_cache.shape[2]}] on {k_cache.device}, "
                             f"got {s.dtype} {tuple(s.shape)} on {s.device}")
        if s.shape[0] > 1 and s.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride 1)")


def check_fp8_gemm(a, a_scale, b, b_scale, a_groups: int, b_scale_shape: tuple[int, int]) -> None:
    """a [M, K] and b [N, K] e4m3, row-major; a_scale float32 [M, a_groups], b_scale float32 of
    ``b_scale_shape``; all on one device."""
    _tensors(a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    _one_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    _rank("a", a, 2, "[M, K]")
    _rank("b", b, 2, "[N, K]")
    if a.dtype != FP8 or b.dtype != FP8:
        raise TypeError(f"a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has K={a.shape[1]} but b has K={b.shape[1]}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("a and b must be row-major (K contiguous)")
    for name, s, shape in (("a_scale", a_scale, (a.shape[0], a_groups)), ("b_scale", b_scale, b_scale_shape)):
        if s.dtype != torch.float32 or tuple(s.shape) != tuple(shape):
            raise ValueError(f"{name} must be float32 of shape {list(shape)}, got {s.dtype} {list(s.shape)}")
        if s.shape[1] > 1 and s.stride(1) != 1:
            raise ValueError(f"{name} must be row-major (stride 1 along K groups)")
