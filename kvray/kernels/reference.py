"""Plain-torch paged attention, KV-cache write, fused decoder ops and FP8 GEMMs: the ground truth
and the CPU path.

Same signatures as the Triton kernels in ``kvray.kernels``. Clear rather than fast: each
sequence's context is gathered from its blocks and attended with an explicit causal mask,
accumulating in float32.

FP8 is e4m3 (``torch.float8_e4m3fn``, largest value 448). An FP8 KV cache stores ``k / k_scale``
with one float32 scale per KV head (``k_scale`` [num_kv_heads]; equal entries: per tensor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float -> e4m3, saturating at +-448 (the cast itself would make NaN of larger values)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _head_scale(scale: torch.Tensor | None) -> torch.Tensor | float:
    return 1.0 if scale is None else scale.float().view(1, -1, 1)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Scatter ``key``/``value`` [num_tokens, kv_heads, d] into the paged caches
    [num_blocks, block_size, kv_heads, d] at ``slot_mapping`` (negative slots are skipped). FP8
    caches store ``key / k_scale`` and ``value / v_scale`` (scales [kv_heads] float32)."""
    num_blocks, block_size = k_cache.shape[:2]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    if k_cache.dtype == FP8:
        key = to_fp8(key.float() / _head_scale(k_scale))
        value = to_fp8(value.float() / _head_scale(v_scale))
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    for flat, x in ((k_flat, key), (v_flat, value)):
        x = x.to(flat.dtype)
        if flat.dtype == FP8:  # CPU index ops have no float8 kernels: move the bytes
            flat, x = flat.view(torch.uint8), x.view(torch.uint8)
        flat.index_copy_(0, slots, x)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` positions of one sequence's context: [seq_len, kv_heads, d]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    raw = cache.view(torch.uint8) if cache.dtype == FP8 else cache
    blocks = raw.index_select(0, block_table[:num_blocks].long()).view(cache.dtype)
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                    out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    q [num_q_tokens, num_heads, d]; sequence i owns q rows query_start_loc[i]:query_start_loc[i+1],
    which are the last q_len_i positions of its seq_lens[i]-long context. FP8 caches are read as
    ``k_cache * k_scale`` and ``v_cache * v_scale``.
    """
    num_heads, _head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len).float()      # [S, kvh, d]
        v = gather_kv(v_cache, block_tables[i], seq_len).float()
        if k_cache.dtype == FP8:
            k, v = k * _head_scale(k_scale), v * _head_scale(v_scale)
        qi = q[q_start:q_end].float()                                   # [L, h, d]
        k = k.repeat_interleave(group, dim=1)                           # [S, h, d]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("lhd,shd->hls", qi, k) * softmax_scale    # [h, L, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] > q_pos[:, None]                          # [L, S]
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hls,shd->lhd", probs, v)
        out[q_start:q_end] = o.to(out.dtype)
    return out


# ---- the decoder's small fused ops (see kvray.kernels.triton_fused) ---------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``weight * norm(x)`` (normalised in float32, cast back, then scaled). With ``residual``:
    ``residual += x`` first (in place) and ``(norm(residual), residual)`` is returned."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y, residual) if residual is not None else y


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float) -> None:
    """In place on q [T, H, d] and k [T, KVH, d]: optional per-head RMSNorm, then rotate-half
    rotary embedding over the full head dim at ``positions`` (inverse frequencies in float32)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    for x, w in ((q, q_weight), (k, k_weight)):
        y = rms_norm(x, w, eps) if w is not None else x
        c, s = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
        y1, y2 = y.chunk(2, dim=-1)
        x.copy_(torch.cat((y1 * c - y2 * s, y2 * c + y1 * s), dim=-1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for x [N, 2I]."""
    g, u = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


# ---- FP8 GEMMs (see kvray.kernels.triton_fp8) -------------------------------------------------

def quant_fp8(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic e4m3 quantization of each row of x [M, K]: (x_fp8 [M, K], scale [M, G] float32),
    ``scale = amax / 448`` per row (``group_size=None``, G = 1) or per ``group_size`` elements."""
    m, k = x.shape
    group = k if group_size is None else int(group_size)
    num_groups = -(-k // group)
    xg = F.pad(x.float(), (0, num_groups * group - k)).view(m, num_groups, group)
    scale = xg.abs().amax(-1).clamp_min(1e-10) / FP8_MAX
    q = to_fp8(xg * (1.0 / scale)[..., None]).view(m, num_groups * group)[:, :k]
    return q.contiguous(), scale


def fp8_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale[:, None])^T (+ bias)``: a [M, K] e4m3 with a_scale [M, 1],
    b [N, K] e4m3 (a weight as stored) with b_scale [N] float32."""
    out = (a.float() * a_scale.float()) @ (b.float() * b_scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A [cdiv(rows, bn), cdiv(cols, bk)] block-scale grid as one scale per element [rows, cols]."""
    bn, bk = block
    return scale.float().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)^T``: a [M, K] e4m3 with a_scale [M, cdiv(K, block[1])] (one
    scale per row and K-group), b [N, K] e4m3 with b_scale [cdiv(N, block[0]), cdiv(K, block[1])]."""
    (m, k), n = a.shape, b.shape[0]
    a_deq = a.float() * expand_block_scale(a_scale, m, k, (1, block[1]))
    b_deq = b.float() * expand_block_scale(b_scale, n, k, block)
    return (a_deq @ b_deq.t()).to(out_dtype)
# ---- mixture of experts (see kvray.kernels.triton_moe) -----------------------------------------

def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of router_logits [T, E]: softmax over all E in float32, the k largest
    probabilities (largest first), divided by their sum when ``renormalize`` (which equals a
    softmax over the k selected logits). Returns (weights float32 [T, k], expert ids int32 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
    e = topk_ids[t, j]; hidden [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
    Matmuls in the activation dtype, the weighting and the sum over the k experts in float32."""
    num_experts = w13.shape[0]
    if topk_ids.numel() and not bool(((topk_ids >= 0) & (topk_ids < num_experts)).all()):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}) (the number of experts in w13)")
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()
    for e in flat_ids.unique().tolist():
        token, slot = (topk_ids.long() == e).nonzero(as_tuple=True)
        act = silu_and_mul(hidden[token] @ w13[e].t())
        y = (act @ w2[e].t()).float() * topk_weights[token, slot, None].float()
        out.index_add_(0, token, y)
    return out.to(hidden.dtype)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int,
              renormalize: bool) -> torch.Tensor:
    """A sparse MoE block's experts: :func:`moe_route`, then :func:`fused_experts`."""
    weights, ids = moe_route(router_logits, top_k, renormalize)
    return fused_experts(hidden, w13, w2, weights, ids)
