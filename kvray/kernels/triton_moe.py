"""Triton fused mixture-of-experts: routing, the sort of tokens by expert, and two grouped GEMMs.

One MoE layer is five launches, none of them with a data-dependent grid or a host sync, so the
whole layer is captured in a CUDA graph:

1. ``_route_count_kernel`` (one program per ``BLOCK_T`` tokens): softmax of the router logits in
   float32, top-k by k rounds of arg-max, optional renormalisation over the k selected; then each
   (token, slot) entry ``f = t * k + j`` takes its rank inside its expert with an atomic add on
   the expert's counter. (With precomputed routing, only the counting runs.)
2. ``_align_kernel``: every expert's segment is padded to a multiple of ``BLOCK_M`` (the tile
   height of the GEMMs); each program recomputes the prefix sum of the padded counts (E values)
   and writes its entries to ``sorted_ids[start(e) + rank]``, the expert of each ``BLOCK_M`` block
   (-1 past the used blocks) and ``expert_end[e] = start(e) + count(e)``. Padding slots hold
   garbage that the GEMMs mask with ``expert_end``, so nothing needs clearing. The buffers are sized
   for the worst case, ``M + min(E, M) * (BLOCK_M - 1)`` slots for ``M = T * k`` entries.
3. ``_gate_up_kernel`` (grid: blocks x I tiles): each program multiplies the gathered rows of its
   block by its expert's gate and up tiles (two accumulators on one A tile) and stores
   ``silu(gate) * up`` per entry into ``act`` [M, I].
4. ``_down_kernel`` (grid: blocks x H tiles): ``act`` rows times the expert's down projection,
   scaled by the entry's routing weight, into ``out_k`` [M, H].
5. ``out_k.view(T, k, H).sum(1)``: the sum over each token's k experts (a torch reduction: no
   atomics, so the result is deterministic).

Blocks past the used ones exit at once, so the worst-case grid costs little. Entries of one
expert share a block, so the expert's weights are read once per block (decode: once per step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.sum / tl.max / tl.cumsum are @triton.jit helpers bound to the mode triton was first imported
# in; tl.reduce / tl.associative_scan with triton's own combine functions work in both, so the
# dispatch can switch the interpreter on per call (see triton_attention.py).
_sum = getattr(tl.standard, "_sum_combine", None)
_max = getattr(tl.standard, "_elementwise_max", None)
_min = getattr(tl.standard, "_elementwise_min", None)
if _sum is None or _max is None or _min is None:  # pragma: no cover - other triton versions
    @triton.jit
    def _sum(a, b):
        return a + b

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min(a, b):
        return tl.minimum(a, b)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# T and M change from step to step: no integer specialization on them (a variant per value class
# would compile while serving). Everything else is fixed by the model.
@triton.jit(do_not_specialize=["T"])
def _route_count_kernel(logits_ptr, w_ptr, ids_ptr, counts_ptr, rank_ptr, T, E, stride_l,
                        TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                        BLOCK_T: tl.constexpr, ROUTE: tl.constexpr, RENORM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    kcols = tl.arange(0, K_POW2)
    kmask = rmask[:, None] & (kcols < TOP_K)[None, :]
    entry = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    if ROUTE:
        cols = tl.arange(0, E_POW2)
        cmask = (cols < E)[None, :]
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                    mask=rmask[:, None] & cmask, other=0.0).to(tl.float32)
        x = tl.where(cmask, x, float("-inf"))
        top = tl.reduce(x, 1, _max)
        denom = tl.reduce(tl.exp(x - top[:, None]), 1, _sum)
        sel_w = tl.full([BLOCK_T, K_POW2], 0.0, tl.float32)
        sel_i = tl.full([BLOCK_T, K_POW2], 0, tl.int32)
        for j in tl.static_range(TOP_K):
            m = tl.reduce(x, 1, _max)
            idx = tl.reduce(tl.where(x == m[:, None], cols[None, :], E_POW2), 1, _min)
            sel_w = tl.where(kcols[None, :] == j, tl.exp(m - top)[:, None], sel_w)
            sel_i = tl.where(kcols[None, :] == j, idx[:, None], sel_i)
            x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
        if RENORM:
            sel_w = sel_w / tl.reduce(sel_w, 1, _sum)[:, None]
        else:
            sel_w = sel_w / denom[:, None]
        tl.store(w_ptr + entry, sel_w, mask=kmask)
        tl.store(ids_ptr + entry, sel_i, mask=kmask)
    else:
        sel_i = tl.load(ids_ptr + entry, mask=kmask, other=0).to(tl.int32)
    valid = kmask & (sel_i >= 0) & (sel_i < E)  # an out-of-range id must never write out of bounds
    rank = tl.atomic_add(counts_ptr + sel_i, 1, mask=valid)
    tl.store(rank_ptr + entry, rank, mask=valid)


@triton.jit(do_not_specialize=["M", "max_blocks"])
def _align_kernel(ids_ptr, rank_ptr, counts_ptr, sorted_ptr, block_expert_ptr, expert_end_ptr, M, E, max_blocks,
                  BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, BCH: tl.constexpr):
    pid = tl.program_id(0)
    ecols = tl.arange(0, E_POW2)
    emask = ecols < E
    cnt = tl.load(counts_ptr + ecols, mask=emask, other=0)
    padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.associative_scan(padded, 0, _sum)   # inclusive prefix sum
    start = pad_end - padded
    if pid == 0:
        tl.store(expert_end_ptr + ecols, start + cnt, mask=emask)
    # this program's entries: sorted_ids[start(e) + rank] = entry
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    m = offs < M
    e = tl.load(ids_ptr + offs, mask=m, other=0)
    m = m & (e >= 0) & (e < E)
    r = tl.load(rank_ptr + offs, mask=m, other=0)
    base = tl.reduce(tl.where(ecols[None, :] == e[:, None], start[None, :], 0), 1, _sum)
    tl.store(sorted_ptr + base + r, offs, mask=m)
    # this program's blocks: the expert whose padded segment holds the block, -1 past the end
    blk = pid * BCH + tl.arange(0, BCH)
    first = blk * BLOCK_M
    total = tl.reduce(padded, 0, _sum)
    owner = tl.reduce(tl.where(pad_end[None, :] <= first[:, None], 1, 0), 1, _sum)
    tl.store(block_expert_ptr + blk, tl.where(first < total, owner, -1), mask=blk < max_blocks)


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, expert_end_ptr, BLOCK_M: tl.constexpr):
    """(expert, entries of the block's rows, row mask) of this program's block; expert -1: unused."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    end = tl.load(expert_end_ptr + tl.maximum(e, 0))
    rmask = slots < end
    entry = tl.load(sorted_ptr + slots, mask=rmask, other=0)
    return e, entry, rmask


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_ptr, block_expert_ptr, expert_end_ptr, H, I,
                    stride_xt, stride_we, stride_wn, stride_am,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    e, entry, rmask = _block_rows(sorted_ptr, block_expert_ptr, expert_end_ptr, BLOCK_M)
    if e < 0:
        return
    token = (entry // TOP_K).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xt + k[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_u = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=nmask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=nmask[None, :], other=0.0)
        else:
            km = k < H - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = act_ptr.dtype.element_ty
    # rounded like the unfused ops: gate and up to the activation dtype, silu(gate) too
    g32 = acc_g.to(dt).to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
    tl.store(act_ptr + entry[:, None].to(tl.int64) * stride_am + n[None, :], act.to(dt),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, expert_end_ptr, H, I,
                 stride_am, stride_we, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    e, entry, rmask = _block_rows(sorted_ptr, block_expert_ptr, expert_end_ptr, BLOCK_M)
    if e < 0:
        return
    row = entry.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + row[:, None] * stride_am + k[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
        else:
            km = k < I - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dt = out_ptr.dtype.element_ty
    weight = tl.load(topk_w_ptr + row, mask=rmask, other=0.0)
    y = acc.to(dt).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + row[:, None] * stride_om + n[None, :], y.to(dt), mask=rmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- launchers

def max_blocks(num_entries: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of ``block_m`` blocks once every expert's entries are padded."""
    return (num_entries + min(num_experts, num_entries) * (block_m - 1)) // block_m


def route_and_align(topk_weights, topk_ids, num_experts: int, block_m: int, logits=None, renormalize=False):
    """Fill topk_weights/topk_ids [T, k] from ``logits`` (when given; else they are the input),
    then sort the entries by expert. Returns (sorted_ids, block_expert, expert_end)."""
    T, top_k = topk_ids.shape
    M = T * top_k
    dev = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(M, dtype=torch.int32, device=dev)
    e_pow2 = _pow2(num_experts)
    block_t = max(1, min(64, 4096 // e_pow2))
    src = logits if logits is not None else topk_ids
    _route_count_kernel[(triton.cdiv(T, block_t),)](
        src, topk_weights, topk_ids, counts, rank, T, num_experts, src.stride(0),
        TOP_K=top_k, K_POW2=_pow2(top_k), E_POW2=e_pow2, BLOCK_T=block_t, ROUTE=logits is not None,
        RENORM=bool(renormalize), num_warps=4)
    nblocks = max_blocks(M, num_experts, block_m)
    sorted_ids = torch.empty(nblocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nblocks, dtype=torch.int32, device=dev)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=dev)
    chunk = max(16, min(1024, 8192 // e_pow2))
    grid = max(triton.cdiv(M, chunk), triton.cdiv(nblocks, chunk), 1)
    _align_kernel[(grid,)](topk_ids, rank, counts, sorted_ids, block_expert, expert_end, M, num_experts, nblocks,
                           BLOCK_M=block_m, E_POW2=e_pow2, CHUNK=chunk, BCH=chunk, num_warps=4)
    return sorted_ids, block_expert, expert_end


def fused_moe_triton(hidden, w13, w2, tile, *, logits=None, top_k=None, renormalize=False,
                     topk_weights=None, topk_ids=None) -> torch.Tensor:
    """The MoE experts of hidden [T, H] (see the module docstring). Routing from ``logits`` [T, E]
    (with ``top_k`` / ``renormalize``), or precomputed ``topk_weights`` float32 / ``topk_ids`` int32 [T, k].
    ``tile``: block_m, block_n, block_k, num_warps, num_stages."""
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    dev = hidden.device
    if logits is not None:
        topk_weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
        topk_ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    top_k = topk_ids.shape[1]
    M = T * top_k
    if T == 0:
        return hidden.new_zeros(0, H)
    bm = tile.block_m
    sorted_ids, block_expert, expert_end = route_and_align(topk_weights, topk_ids, E, bm, logits, renormalize)
    nblocks = block_expert.shape[0]
    ieee = hidden.dtype == torch.float32
    opts = dict(BLOCK_M=bm, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, IEEE=ieee, num_warps=tile.num_warps,
                num_stages=tile.num_stages)
    act = hidden.new_empty(M, inter)
    _gate_up_kernel[(nblocks, triton.cdiv(inter, tile.block_n))](
        hidden, w13, act, sorted_ids, block_expert, expert_end, H, inter,
        hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, EVEN_K=H % tile.block_k == 0, **opts)
    out_k = hidden.new_empty(M, H)
    _down_kernel[(nblocks, triton.cdiv(H, tile.block_n))](
        act, w2, out_k, topk_weights, sorted_ids, block_expert, expert_end, H, inter,
        act.stride(0), w2.stride(0), w2.stride(1), out_k.stride(0),
        EVEN_K=inter % tile.block_k == 0, **opts)
    return out_k.view(T, top_k, H).sum(dim=1) if top_k > 1 else out_k
