"""Paged-attention, KV-cache and fused decoder kernels, with their dispatch; the FP8 GEMM entry
points come from ``kvray.kernels.fp8`` and the fused MoE ones from ``kvray.kernels.moe``.

* CUDA tensors run the Triton kernels (``triton_attention``, ``triton_cache``, ``triton_fused``,
  ``triton_fp8``; per-channel FP8 GEMMs run ``torch._scaled_mm``, cuBLASLt).
* CPU tensors run the plain-torch reference (``kvray.kernels.reference``), unless
  ``TRITON_INTERPRET=1`` is set at call time: then the Triton kernels run under Triton's CPU
  interpreter (how CI tests them).
* ``KVRAY_ATTENTION_BACKEND=reference|triton|auto`` (read at call time) or
  ``set_attention_backend(name)`` (the engine option; wins over the variable) force a path:
  ``reference`` runs the torch code even on CUDA (for debugging), ``triton`` runs the kernels
  on CPU tensors too (under the interpreter).

The Triton modules are loaded lazily, once per mode (compiled / interpreted), so the interpreter
can be switched on per call without re-importing anything and CPU-only installs never import
Triton. The entry points only check shapes, dtypes and devices: no device reads, no syncs.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

from kvray.kernels import reference
from kvray.kernels._checks import check_kv_scales, check_paged_attention, check_write_kv_cache

__all__ = ["paged_attention", "write_kv_cache", "rms_norm", "qk_norm_rope", "silu_and_mul", "quant_fp8",
           "fp8_scaled_mm", "fp8_block_gemm", "fused_moe", "fused_experts", "moe_route", "set_attention_backend",
           "get_attention_backend", "reference", "triton_impl", "compiled_variants"]

BACKENDS = ("auto", "triton", "reference")
ENV_BACKEND = "KVRAY_ATTENTION_BACKEND"
_override: str | None = None
_impls: dict[bool, types.SimpleNamespace] = {}


def set_attention_backend(name: str | None) -> None:
    """Force ``"reference"`` or ``"triton"`` (or ``"auto"``); ``None`` defers to $KVRAY_ATTENTION_BACKEND."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS} or None, got {name!r}")
    _override = name


def get_attention_backend() -> str:
    name = _override or os.environ.get(ENV_BACKEND) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"${ENV_BACKEND} must be one of {BACKENDS}, got {name!r}")
    return name


def _route(device: torch.device) -> tuple[bool, bool]:
    """(use Triton, under the interpreter) for tensors on ``device``."""
    backend = get_attention_backend()
    if backend == "reference":
        return False, False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        return True, interpret
    if device.type == "cpu" and (interpret or backend == "triton"):
        return True, True
    return False, False


def _load(stem: str, interpret: bool) -> types.ModuleType:
    name = f"kvray.kernels._{stem}_{'interpreted' if interpret else 'compiled'}"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), stem + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return mod


def triton_impl(interpret: bool = False) -> types.SimpleNamespace:
    """The Triton modules (``.attention``, ``.cache``) built for one mode. ``triton.jit`` picks the
    interpreter at decoration time from $TRITON_INTERPRET, so each mode gets its own copy of the
    modules, decorated with the variable set accordingly."""
    impl = _impls.get(interpret)
    if impl is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - CPU-only installs without Triton
            raise ImportError("the Triton attention backend needs the `triton` package; "
                              f"use {ENV_BACKEND}=reference") from e
        prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            fp8 = _load("triton_fp8", interpret)  # before triton_cache, which calls its e4m3 rounding
            impl = types.SimpleNamespace(attention=_load("triton_attention", interpret),
                                         cache=_load("triton_cache", interpret),
                                         fused=_load("triton_fused", interpret), fp8=fp8,
                                         moe=_load("triton_moe", interpret))
        finally:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
        _impls[interpret] = impl
    return impl


def compiled_variants() -> int:
    """How many Triton kernel variants this process has compiled (or loaded from Triton's disk
    cache) for the GPU: the number grows only at a first launch of a new specialization, so it
    must not move once the engine has started (every variant is built while CUDA graphs are
    captured)."""
    impl = _impls.get(False)
    if impl is None:
        return 0
    n = 0
    for mod in (impl.attention, impl.cache, impl.fused, impl.fp8, impl.moe):
        for obj in vars(mod).values():
            for cache in (getattr(obj, "device_caches", None) or {}).values():
                n += len(cache[0])
    return n


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into the paged caches
    [num_blocks, block_size, num_kv_heads, head_dim] at ``slot_mapping`` (int32/int64; slot =
    block_id * block_size + offset; negative slots are skipped). A float8_e4m3fn cache stores
    ``key / k_scale`` and ``value / v_scale`` (float32 [num_kv_heads] each), saturated at +-448."""
    check_write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    use_triton, interpret = _route(key.device)
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
    use_triton, interpret = _route(q.device)
    if not use_triton:
        return reference.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                         softmax_scale, out, k_scale, v_scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    return triton_impl(interpret).attention.paged_attention_triton(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale, out,
        max_seq_len=max_seq_len, max_query_len=max_query_len, k_scale=k_scale, v_scale=v_scale)


# ---- fused per-token ops of the decoder (same routing as the attention kernels) ----------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x's last axis; with ``residual``, ``residual += x`` (in place) first and
    ``(normed, residual)`` is returned."""
    use_triton, interpret = _route(x.device)
    if not use_triton:
        return reference.rms_norm(x, weight, eps, residual)
    return triton_impl(interpret).fused.rms_norm_triton(x, weight, eps, residual)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 1e-6) -> None:
    """In place: optional per-head RMSNorm of q [T, H, d] / k [T, KVH, d], then full-head rotary embedding."""
    use_triton, interpret = _route(q.device)
    if not use_triton or q.shape[-1] % 2 or q.shape[-1] & (q.shape[-1] - 1):
        return reference.qk_norm_rope(q, k, positions, inv_freq, q_weight, k_weight, eps)
    triton_impl(interpret).fused.qk_norm_rope_triton(q, k, positions, inv_freq, q_weight, k_weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    use_triton, interpret = _route(x.device)
    if not use_triton:
        return reference.silu_and_mul(x)
    return triton_impl(interpret).fused.silu_and_mul_triton(x)


# the FP8 GEMM and MoE entry points (their dispatch lives in kvray.kernels.fp8 and kvray.kernels.moe)
from kvray.kernels.fp8 import fp8_block_gemm, fp8_scaled_mm, quant_fp8  # noqa: E402
from kvray.kernels.moe import fused_experts, fused_moe, moe_route  # noqa: E402
