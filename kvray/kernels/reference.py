"""Plain-torch paged attention and KV-cache write: the ground truth and the CPU path.

Same signatures as the Triton kernels in ``kvray.kernels``. Clear rather than fast: each
sequence's context is gathered from its blocks and attended with an explicit causal mask,
accumulating in float32.
"""
from __future__ import annotations

import torch


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` [num_tokens, kv_heads, d] into the paged caches
    [num_blocks, block_size, kv_heads, d] at ``slot_mapping`` (negative slots are skipped)."""
    num_blocks, block_size = k_cache.shape[:2]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` positions of one sequence's context: [seq_len, kv_heads, d]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    q [num_q_tokens, num_heads, d]; sequence i owns q rows query_start_loc[i]:query_start_loc[i+1],
    which are the last q_len_i positions of its seq_lens[i]-long context.
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
