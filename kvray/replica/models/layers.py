"""Building blocks of the decoder models: embedding, RMSNorm, rotary embedding, gated MLP and the
paged ``Attention`` module (``Linear`` and its quantization methods live in ``linear`` and
``quantization``; the layers tensor parallelism splits, in ``parallel_layers``).

Parameters are created uninitialised (``torch.empty``) on the target device and dtype: the loader
fills every one of them from the checkpoint and fails loudly if one is missing. Parameter names
mirror Hugging Face's, so checkpoint tensors map one to one.

Numerics follow transformers' reference implementations operation for operation (RMSNorm in
float32 then cast before the weight multiply; rotary tables in float32, cast to the activation
dtype before the rotation), so float32 logits match to rounding and bf16 matches closely.
The forward paths have no host synchronisation and no branching on tensor values, so they can
be captured in CUDA graphs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvray import kernels
from kvray.replica.forward_context import get_forward_context
from kvray.replica.models.linear import Linear, fuse_linears
from kvray.replica.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from kvray.replica.parallel.group import build_group
from kvray.replica.parallel.sharding import even_split, kv_head_range

__all__ = ["Linear", "RMSNorm", "RotaryEmbedding", "GatedMLP", "Attention", "rope_parameters",
           "compute_inv_freq", "apply_rotary"]


def _empty(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))``: normalised in float32, cast back, then scaled (HF's order)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = float(eps)
        self.weight = _empty(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``residual += x`` in place, returns ``(norm(residual), residual)``."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


# ----------------------------------------------------------------------------- rotary embedding

def rope_parameters(config) -> dict:
    """The rope settings of an HF config as one flat dict (``rope_type``, ``rope_theta`` and the
    scaling keys). Works with transformers 5 (``rope_parameters``) and the older
    ``rope_theta`` + ``rope_scaling`` layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        for k, v in scaling.items():
            params.setdefault(k, v)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", None) or 1.0
    if params["rope_type"] == "llama3" and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = config.max_position_embeddings
    return params


SUPPORTED_ROPE_TYPES = ("default", "llama3")


def compute_inv_freq(params: dict, head_dim: int, device=None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] in float32, the way transformers computes them."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; kvray supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(params["rope_theta"])
    dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    inv_freq = 1.0 / (base ** exponent)
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(in_band, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding over the first ``rotary_dim`` channels of each head.

    ``forward(positions)`` returns (cos, sin), each [T, rotary_dim // 2] in float32, computed
    once per model forward and shared by every layer (see :func:`apply_rotary`).
    """

    def __init__(self, params: dict, head_dim: int, device=None):
        super().__init__()
        # computed on the CPU like transformers does, so the tables agree bit for bit
        inv_freq = compute_inv_freq(params, head_dim).to(device)
        self.head_dim = head_dim
        self.rotary_dim = 2 * inv_freq.numel()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate q or k [T, heads, d] by (cos, sin) [T, rotary_dim // 2], in x's dtype."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if rotary_dim == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., : rotary_dim].chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]), dim=-1)


# ----------------------------------------------------------------------------- MLP and attention

class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; under tensor parallelism a rank holds an equal share of the
    intermediate features (gate/up column-parallel, down row-parallel: one all-reduce)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, bias, dtype, device)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, bias, dtype, device)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, dtype, device)

        self.gate_up_proj: Linear | None = None

    def fuse(self) -> None:
        """Replace gate_proj/up_proj by one [2I, H] projection (one matmul instead of two), when
        both are stored alike (same quantization)."""
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache.

    ``k_cache`` / ``v_cache`` ([num_blocks, block_size, num_kv_heads, head_dim]) are plain
    attributes set by the model runner, not parameters or buffers, and so are ``k_scale`` /
    ``v_scale`` (float32 [num_kv_heads], for an FP8 cache only); the paging metadata comes from
    the current :class:`~kvray.replica.forward_context.ForwardContext`.

    Under tensor parallelism ``num_heads`` / ``num_kv_heads`` are this rank's: an equal share of
    the query heads, and of the KV heads (or the one KV head its query heads read, when there
    are fewer KV heads than ranks); q/k/v are column-parallel, o row-parallel (one all-reduce).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 o_bias: bool, qk_norm: bool, rms_norm_eps: float, rotary_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
        group = build_group()
        q0, nq = even_split(num_heads, group.rank, group.size)
        kv0, nkv = kv_head_range(num_kv_heads, group.rank, group.size)
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, head_dim
        self.scaling = head_dim ** -0.5
        d = head_dim
        self.q_proj = ColumnParallelLinear(hidden, num_heads * d, qkv_bias, dtype, device, rows=(q0 * d, nq * d))
        self.k_proj = ColumnParallelLinear(hidden, num_kv_heads * d, qkv_bias, dtype, device, rows=(kv0 * d, nkv * d))
        self.v_proj = ColumnParallelLinear(hidden, num_kv_heads * d, qkv_bias, dtype, device, rows=(kv0 * d, nkv * d))
        self.o_proj = RowParallelLinear(num_heads * d, hidden, o_bias, dtype, device)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(head_dim, rms_norm_eps, dtype, device)
        self.qk_norm = qk_norm
        self.rotary_dim = rotary_dim
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.qkv_proj: Linear | None = None

    def fuse(self) -> None:
        """Replace q/k/v_proj by one qkv projection (one matmul instead of three), when all three are
        stored alike (same quantization)."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: "RotaryEmbedding") -> torch.Tensor:
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([h * d, kvh * d, kvh * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(-1, h, d), k.view(-1, kvh, d), v.view(-1, kvh, d)
        if self.rotary_dim == d:  # one fused pass: per-head norms (Qwen3) and rotary, in place
            kernels.qk_norm_rope(q, k, positions, rotary.inv_freq, self.q_norm.weight if self.qk_norm else None,
                                 self.k_norm.weight if self.qk_norm else None,
                                 self.q_norm.eps if self.qk_norm else 0.0)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            cos, sin = rotary(positions)
            q = apply_rotary(q, cos, sin, self.rotary_dim)
            k = apply_rotary(k, cos, sin, self.rotary_dim)
        if self.k_cache is None:
            raise RuntimeError("Attention.k_cache/v_cache are not set; the model runner must assign the KV cache first")
        ctx = get_forward_context()
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.k_scale, self.v_scale)
        o = kernels.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.query_start_loc,
                                    ctx.seq_lens, self.scaling, max_seq_len=ctx.max_seq_len or None,
                                    max_query_len=ctx.max_query_len or None, k_scale=self.k_scale,
                                    v_scale=self.v_scale)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, qk_norm={self.qk_norm}"
