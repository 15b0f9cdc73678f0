"""Paged-attention and KV-cache kernels.

Dispatch (filled in by the Triton kernels issue): Triton on CUDA tensors, the plain-torch
reference on CPU tensors, Triton under its CPU interpreter when ``TRITON_INTERPRET=1``.
"""
from kvray.kernels.reference import paged_attention, write_kv_cache

__all__ = ["paged_attention", "write_kv_cache"]
