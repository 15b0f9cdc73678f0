"""Triton paged attention: one kernel for prefill, chunked prefill over a cached prefix and decode.

Layout of the work
------------------
* A program owns one tile of ``BLOCK_Q`` consecutive query tokens of one sequence, for all the
  query heads of one KV head (GQA): its ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows are
  (token, head-in-group) pairs, so every K/V tile it loads is shared by the whole group.
* Programs are laid out on a "virtual" q-block axis without host knowledge of the per-sequence
  query lengths: sequence ``i`` owns virtual blocks ``[qsl[i] // BLOCK_Q + i, qsl[i+1] // BLOCK_Q
  + i + 1)``, which is at least ``cdiv(q_len_i, BLOCK_Q)`` of them; a program finds its sequence by
  a binary search over ``query_start_loc`` and exits if its block is past the sequence's queries.
  The grid is therefore ``num_tokens // BLOCK_Q + num_seqs`` q-blocks, known on the host (with
  ``BLOCK_Q == 1``, the decode tiles, simply one block per token: ``num_tokens``).
* Block tables are read inside the kernel: key ``n`` of a sequence lives in page
  ``block_table[n // PAGE]`` at offset ``n % PAGE``.
* The key loop is split in two: tiles every row of the program may see (no mask) and the
  causal diagonal (masked). Online softmax in float32, in base 2.
* Split-KV (flash decoding): with ``SPLIT`` the third grid axis cuts each sequence's keys into
  ``num_splits`` chunks (a multiple of ``BLOCK_N`` each, sized per sequence from its length); each
  program writes a normalised partial output and its log-sum-exp to float32 scratch and
  ``_combine_kernel`` merges them. Works for any query length, so the choice is purely a shape
  heuristic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Reductions go through tl.reduce with triton's own combine functions rather than tl.max / tl.sum:
# those are @triton.jit functions decorated when triton is imported, so they only work under the
# interpreter if TRITON_INTERPRET=1 was set before that import, while tl.reduce is patched by the
# interpreter at run time and recognises these combine functions (numpy fast path). This lets the
# dispatch switch the interpreter on per call. tl.zeros is avoided for the same reason.
_max_combine = getattr(tl.standard, "_elementwise_max", None)
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _max_combine is None or _sum_combine is None:  # pragma: no cover - other triton versions
    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b


# Runtime integers that change from step to step must not be specialized on (Triton compiles a
# variant for an int == 1 and for one divisible by 16): every variant would be a compile while
# serving. The strides stay specialized: they are fixed by the model and the engine's buffers.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    bt_ptr, qsl_ptr, sl_ptr, ks_ptr, vs_ptr,
    qk_scale, num_seqs, num_kv_heads,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_osplit,
    stride_lt, stride_lsplit,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = pid % num_kv_heads
    vblk = pid // num_kv_heads

    # -- which sequence owns virtual q-block `vblk`: largest i with qsl[i] // BLOCK_Q + i <= vblk
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if BLOCK_Q == 1:
            first = tl.load(qsl_ptr + mid)
        else:
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= vblk, mid, lo)
        hi = tl.where(first <= vblk, hi, mid - 1)
    seq = lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if BLOCK_Q == 1:
        local = vblk - q_start
    else:
        local = vblk - (q_start // BLOCK_Q + seq)
    n_qblk = (q_len + BLOCK_Q - 1) // BLOCK_Q
    if local >= n_qblk:
        return
    qblk = n_qblk - 1 - local          # heaviest (latest) causal tiles are launched first
    seq_len = tl.load(sl_ptr + seq)
    ctx = seq_len - q_len               # cached prefix length; query j sits at position ctx + j
    tok0 = qblk * BLOCK_Q

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_PAD
    hig = rows % GROUP_PAD
    if BLOCK_M == BLOCK_Q * GROUP_PAD:
        row_ok = (tok < q_len) & (hig < GROUP)
    else:  # padded tile (e.g. decode with a small group): rows past BLOCK_Q tokens are idle
        row_ok = (tok < q_len) & (hig < GROUP) & (rows < BLOCK_Q * GROUP_PAD)
    head = kvh * GROUP + hig
    q_pos = ctx + tok
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if KV_FP8:  # K/V are stored divided by their KV head's scale: fold it into the logits / output
        qk_scale = qk_scale * tl.load(ks_ptr + kvh)
        v_scale = tl.load(vs_ptr + kvh)

    # -- key range of this program
    min_pos = ctx + tok0
    max_pos = ctx + tl.minimum(tok0 + BLOCK_Q, q_len) - 1
    k_lo = tl.full([], 0, tl.int32)
    k_hi = max_pos + 1
    if SPLIT:
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        per = (seq_len + n_split - 1) // n_split
        per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        k_lo = split * per
        k_hi = tl.minimum(k_hi, k_lo + per)
    full_hi = tl.minimum(min_pos + 1, k_hi)
    full_end = k_lo + tl.maximum(full_hi - k_lo, 0) // BLOCK_N * BLOCK_N

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_head = kvh.to(tl.int64) * stride_kh
    v_head = kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D_PAD], 0.0, tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # -- tiles every row sees: no masks
    for start in range(k_lo, full_end, BLOCK_N):
        kn = start + offs_n
        page = tl.load(bt_row + kn // PAGE).to(tl.int64)
        slot = (kn % PAGE).to(tl.int64)
        k_rows = page * stride_kb + slot * stride_ks + k_head
        v_rows = page * stride_vb + slot * stride_vs + v_head
        if D_PAD == HEAD_DIM:
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :])
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :])
        else:
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        if KV_FP8:  # through float32: exact, and the interpreter's direct float8 -> bfloat16 cast is wrong
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # -- the causal diagonal (and the end of the context / of the split): masked
    for start in range(full_end, k_hi, BLOCK_N):
        kn = start + offs_n
        n_ok = kn < k_hi
        page = tl.load(bt_row + kn // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = (kn % PAGE).to(tl.int64)
        k_rows = page * stride_kb + slot * stride_ks + k_head
        v_rows = page * stride_vb + slot * stride_vs + v_head
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:  # through float32: exact, and the interpreter's direct float8 -> bfloat16 cast is wrong
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = n_ok[None, :] & (kn[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # fully masked rows stay at zero
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    if KV_FP8:
        o = o * v_scale
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        split64 = tl.program_id(1).to(tl.int64)
        tl.store(o_ptr + split64 * stride_osplit + o_rows[:, None] + offs_d[None, :], o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        l_rows = (q_start + tok).to(tl.int64) * stride_lt + head
        tl.store(lse_ptr + split64 * stride_lsplit + l_rows, lse, mask=row_ok)
    else:
        tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    part_ptr, lse_ptr, o_ptr, num_splits, num_heads,
    stride_pt, stride_ph, stride_psplit, stride_lt, stride_lsplit, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    t = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < num_splits
    lse = tl.load(lse_ptr + sp.to(tl.int64) * stride_lsplit + t * stride_lt + h, mask=sp_ok, other=float("-inf"))
    m = tl.reduce(lse, 0, _max_combine)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    offs_d = tl.arange(0, D_PAD)
    ptrs = part_ptr + sp.to(tl.int64)[:, None] * stride_psplit + t * stride_pt + h * stride_ph + offs_d[None, :]
    part = tl.load(ptrs, mask=sp_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    o = tl.reduce(part * w[:, None], 0, _sum_combine) / tl.reduce(w, 0, _sum_combine)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------- host side

_SM_COUNT: dict[int, int] = {}
INTERPRETER_SMS = 4          # pretend size of the "GPU" under TRITON_INTERPRET (exercises split-KV)
MIN_SPLIT_KEYS = 128         # fewest keys worth one split-KV program
MAX_SPLITS = 32
SPLIT_BELOW_WAVES = 2        # split-KV only when the grid has fewer programs than this many per SM...
SPLIT_TARGET_WAVES = 4       # ...and then split to at most this many programs per SM


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _num_sms(device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


SMEM_BUDGET = 160 * 1024      # bytes of shared memory the tiles may plan for (H100/H200: 227 KB)


@functools.lru_cache(maxsize=4096)
def pick_config(num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int,
                max_query_len: int | None, max_seq_len: int, num_sms: int, elem_size: int = 2) -> dict:
    """Tile sizes, warps and split count from host-known ints only (no device reads)."""
    gp = _next_pow2(group)
    d_pad = _next_pow2(head_dim)
    if max_query_len is None:   # an upper bound if every sequence has >= 1 query; only tiles depend on it
        max_query_len = 1 if num_tokens <= num_seqs else num_tokens - num_seqs + 1
    if max_query_len <= 1:
        block_q, block_m = 1, max(16, gp)
    else:                # H200 sweep: 64-row tiles (4 warps) beat 128-row ones (8 warps) by 5-7% at 4k tokens
        block_m = 16 if max_query_len * gp <= 16 else 64
        block_q = max(1, block_m // gp)
        block_m = max(block_m, block_q * gp)
    decode_like = block_m <= 16 or max_query_len <= 1
    block_n = 64 if d_pad <= 128 else 32
    if decode_like:      # H200 sweep: 2 warps beat 4 by 10-20% on bandwidth-bound decode
        num_warps, num_stages = 2, 3
    else:
        num_warps, num_stages = 4, (3 if d_pad <= 128 else 2)
    while num_stages > 2 or block_n > 16:    # Q tile + pipelined K/V tiles must fit in shared memory
        if (block_m + 2 * num_stages * block_n) * d_pad * elem_size <= SMEM_BUDGET:
            break
        if num_stages > 2:
            num_stages -= 1
        else:
            block_n //= 2
    q_blocks = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    progs = max(1, q_blocks * num_kv_heads)
    num_splits = 1
    # Split-KV when the grid is too small to fill the GPU and the context is long next to the queries
    # (decode, or a short chunk over a long cached prefix; never plain prefill).
    if (progs < SPLIT_BELOW_WAVES * num_sms and max_seq_len >= 2 * MIN_SPLIT_KEYS
            and max_seq_len >= 4 * max_query_len):
        num_splits = max(1, min(SPLIT_TARGET_WAVES * num_sms // progs, max_seq_len // MIN_SPLIT_KEYS, MAX_SPLITS))
    if num_splits > 1 and decode_like:
        # H200 sweep (CUDA graphs): with <= 256 keys per split, one or two 128-key tiles, 4 warps and no
        # software pipelining (less shared memory, more programs per SM) win by ~15%; longer splits keep
        # 64-key tiles, 2 warps.
        per = -(-max_seq_len // num_splits)
        if per <= 256 and elem_size * d_pad <= 256:
            block_n, num_warps, num_stages = 128, 4, 1
        else:
            num_stages = 2
    return dict(block_q=block_q, block_m=block_m, block_n=block_n, num_warps=num_warps,
                num_stages=num_stages, num_splits=num_splits)   # cached: callers must not mutate it


def paged_attention_triton(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, softmax_scale,
                           out, *, max_seq_len=None, max_query_len=None, config=None, k_scale=None, v_scale=None):
    """Launch the kernels. Inputs are validated by the caller (kvray.kernels). ``config`` overrides
    any of pick_config's keys (tests and the benchmark sweep use it). An FP8 cache comes with its
    per-KV-head scales ``k_scale`` / ``v_scale``."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * page
    cfg = pick_config(num_tokens, num_seqs, num_kv_heads, group, head_dim, max_query_len, max_seq_len,
                      _num_sms(q.device), q.element_size())
    if config:
        cfg = dict(cfg, **config)
        if "block_q" not in config and "block_m" in config:
            cfg["block_q"] = max(1, cfg["block_m"] // _next_pow2(group))
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_q, block_m = cfg["block_q"], cfg["block_m"]
    gp = _next_pow2(group)
    if block_m < block_q * gp or block_m < 16:
        raise ValueError(f"bad config {cfg}: block_m must be >= 16 and >= block_q * {gp}")
    d_pad = _next_pow2(head_dim)
    q_blocks = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    splits = int(cfg["num_splits"])
    ieee = q.dtype == torch.float32
    common = dict(GROUP=group, GROUP_PAD=gp, HEAD_DIM=head_dim, D_PAD=d_pad, PAGE=page,
                  BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], IEEE=ieee, KV_FP8=k_scale is not None,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    qk_scale = float(softmax_scale) * LOG2E
    scales = (k_scale, v_scale) if k_scale is not None else (seq_lens, seq_lens)  # unread without FP8
    args = (block_tables, query_start_loc, seq_lens, *scales, qk_scale, num_seqs, num_kv_heads,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    if splits <= 1:
        _paged_attn_kernel[(q_blocks * num_kv_heads, 1)](
            q, k_cache, v_cache, out, out, *args,
            out.stride(0), out.stride(1), 0, 0, 0, block_tables.stride(0), SPLIT=False, **common)
        return out
    part = torch.empty((splits, num_tokens, num_heads, d_pad), dtype=torch.float32, device=q.device)
    lse = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
    _paged_attn_kernel[(q_blocks * num_kv_heads, splits)](
        q, k_cache, v_cache, part, lse, *args,
        part.stride(1), part.stride(2), part.stride(0), lse.stride(1), lse.stride(0), block_tables.stride(0),
        SPLIT=True, **common)
    _combine_kernel[(num_tokens * num_heads,)](
        part, lse, out, splits, num_heads,
        part.stride(1), part.stride(2), part.stride(0), lse.stride(1), lse.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=max(2, _next_pow2(splits)),
        num_warps=4 if d_pad * splits >= 2048 else 2)
    return out
