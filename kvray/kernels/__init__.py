"""kvray's kernels: paged attention, KV-cache writes, the decoder's fused ops, FP8 GEMMs and the
fused MoE, each a Triton kernel with a plain-torch reference of the same signature
(``kvray.kernels.reference``). This is their public face; the entry points live in ``paged``,
``fused``, ``fp8`` and ``moe``, and which code a call runs in ``dispatch`` (CUDA tensors: Triton;
CPU tensors: the reference, or Triton's interpreter under ``TRITON_INTERPRET=1``;
``KVRAY_ATTENTION_BACKEND`` / ``set_attention_backend`` force one). Signatures and rules:
docs/kernels.md.
"""
from kvray.kernels import reference
from kvray.kernels.dispatch import compiled_variants, get_attention_backend, set_attention_backend, triton_impl
from kvray.kernels.fp8 import fp8_block_gemm, fp8_scaled_mm, quant_fp8
from kvray.kernels.fused import qk_norm_rope, rms_norm, silu_and_mul
from kvray.kernels.moe import fused_experts, fused_moe, moe_route
from kvray.kernels.paged import paged_attention, write_kv_cache

__all__ = ["paged_attention", "write_kv_cache", "rms_norm", "qk_norm_rope", "silu_and_mul", "quant_fp8",
           "fp8_scaled_mm", "fp8_block_gemm", "fused_moe", "fused_experts", "moe_route", "set_attention_backend",
           "get_attention_backend", "reference", "triton_impl", "compiled_variants"]
