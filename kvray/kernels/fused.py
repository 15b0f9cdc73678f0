"""The fused per-token ops of the decoder (RMSNorm, q/k norm with rotary embedding, SiLU-and-mul):
the Triton kernels or the torch reference, by the same routing as the attention kernels
(``kvray.kernels.dispatch``)."""
from __future__ import annotations

import torch

from kvray.kernels import reference
from kvray.kernels.dispatch import route, triton_impl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x's last axis; with ``residual``, ``residual += x`` (in place) first and
    ``(normed, residual)`` is returned."""
    use_triton, interpret = route(x.device)
    if not use_triton:
        return reference.rms_norm(x, weight, eps, residual)
    return triton_impl(interpret).fused.rms_norm_triton(x, weight, eps, residual)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 1e-6) -> None:
    """In place: optional per-head RMSNorm of q [T, H, d] / k [T, KVH, d], then full-head rotary embedding."""
    use_triton, interpret = route(q.device)
    if not use_triton or q.shape[-1] % 2 or q.shape[-1] & (q.shape[-1] - 1):
        return reference.qk_norm_rope(q, k, positions, inv_freq, q_weight, k_weight, eps)
    triton_impl(interpret).fused.qk_norm_rope_triton(q, k, positions, inv_freq, q_weight, k_weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    use_triton, interpret = route(x.device)
    if not use_triton:
        return reference.silu_and_mul(x)
    return triton_impl(interpret).fused.silu_and_mul_triton(x)
