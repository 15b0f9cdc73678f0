"""Mixture-of-experts entry points, their dispatch and the per-shape tile table.

``fused_moe(hidden, w13, w2, router_logits, top_k, renormalize)`` computes a sparse MoE block's
experts (routing included); ``fused_experts`` takes precomputed routing; ``moe_route`` is the
routing alone. Dispatch follows the other kernels (``kvray.kernels``): Triton on CUDA tensors
(``triton_moe``), the plain-torch reference on CPU tensors unless ``TRITON_INTERPRET=1``.

Tiles. The GEMMs' tile (``MoeTile``) depends on how many rows each expert gets: at decode sizes a
block holds a few tokens and the kernel streams weights (short, wide tiles); at prefill sizes it
is a dense grouped GEMM (tall tiles). ``DEFAULT_TILES`` maps the mean rows per expert to a tile.
On CUDA the first call for a (shape, token bucket) outside CUDA-graph capture times a few
candidate tiles around the default on synthetic uniform routing with the layer's own weights and
keeps the fastest (``$KVRAY_MOE_AUTOTUNE=0`` turns this off). The engine runs every step shape
once before capturing its graph, so all of this (and every compile) happens at startup; a call
under capture uses the tuned tile or the default, never times anything.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from kvray.kernels import dispatch
from kvray.kernels import reference

logger = logging.getLogger(__name__)

ENV_AUTOTUNE = "KVRAY_MOE_AUTOTUNE"


@dataclass(frozen=True)
class MoeTile:
    block_m: int       # rows of a block (entries of one expert); the align step pads to it
    block_n: int       # output columns per program (gate and up each, for the first GEMM)
    block_k: int
    num_warps: int
    num_stages: int


# (max mean rows per expert, tile) for 16-bit activations, first match wins
DEFAULT_TILES: tuple[tuple[float, MoeTile], ...] = (
    (4, MoeTile(16, 64, 128, 4, 4)),
    (16, MoeTile(16, 128, 64, 4, 4)),
    (48, MoeTile(32, 128, 64, 4, 4)),
    (128, MoeTile(64, 128, 64, 4, 3)),
    (float("inf"), MoeTile(128, 128, 64, 8, 3)),
)
FP32_TILE = MoeTile(32, 64, 32, 4, 2)
_tuned: dict[tuple, MoeTile] = {}


def default_tile(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype) -> MoeTile:
    if dtype == torch.float32:
        return FP32_TILE
    rows = num_tokens * top_k / num_experts
    return next(tile for limit, tile in DEFAULT_TILES if rows <= limit)


def token_bucket(num_tokens: int) -> int:
    """Tiles are chosen per power-of-two bucket of the token count."""
    return 1 << max(0, (num_tokens - 1).bit_length())


def _key(hidden, w13, top_k) -> tuple:
    return (tuple(w13.shape), top_k, hidden.dtype, str(hidden.device), token_bucket(hidden.shape[0]))


def tuned_tiles() -> dict[tuple, MoeTile]:
    """The tiles chosen so far: (w13 shape, top_k, dtype, device, token bucket) -> tile."""
    return dict(_tuned)


# ----------------------------------------------------------------------------- checks

def _check(hidden, w13, w2, second, top_k, second_name: str) -> None:
    for name, t in (("hidden", hidden), ("w13", w13), ("w2", w2), (second_name, second)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"all tensors must be on one device: hidden is on {hidden.device}, {name} on {t.device}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(hidden.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    E, two_i, H = w13.shape
    if H != hidden.shape[1] or two_i % 2 or tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"inconsistent MoE shapes: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)} "
                         f"(must be [E, 2I, H]), w2 {tuple(w2.shape)} (must be [E, H, I])")
    if not hidden.is_floating_point() or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"hidden, w13 and w2 must share one float dtype, got {hidden.dtype}, {w13.dtype}, {w2.dtype}")
    if hidden.stride(-1) != 1 or not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("hidden rows and the expert weights w13 / w2 must be contiguous")
    if second.dim() != 2 or second.shape[0] != hidden.shape[0]:
        raise ValueError(f"{second_name} must be [T, ...] with T = {hidden.shape[0]}, got {tuple(second.shape)}")
    if not 1 <= int(top_k) <= E:
        raise ValueError(f"top_k must be in [1, {E}] (the number of experts), got {top_k}")


# ----------------------------------------------------------------------------- entry points

def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int32 [T, k]) of router_logits [T, E]; see
    ``reference.moe_route``."""
    if router_logits.dim() != 2 or not 1 <= int(top_k) <= router_logits.shape[1]:
        raise ValueError(f"router_logits must be [T, E] with 1 <= top_k <= E, got {tuple(router_logits.shape)}, "
                         f"top_k={top_k}")
    use_triton, interpret = dispatch.route(router_logits.device)
    if not use_triton:
        return reference.moe_route(router_logits, top_k, renormalize)
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T:
        _impl(interpret).route_and_align(weights, ids, E, 16, logits=router_logits.contiguous(),
                                         renormalize=renormalize)
    return weights, ids


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int,
              renormalize: bool) -> torch.Tensor:
    """``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over each token's top-k experts e, with
    the routing of :func:`moe_route`. hidden [T, H]; w13 [E, 2I, H] (gate rows then up rows);
    w2 [E, H, I]; router_logits [T, E]. Returns [T, H] in hidden's dtype."""
    _check(hidden, w13, w2, router_logits, top_k, "router_logits")
    if router_logits.shape[1] != w13.shape[0]:
        raise ValueError(f"router_logits has {router_logits.shape[1]} experts, w13 has {w13.shape[0]}")
    use_triton, interpret = dispatch.route(hidden.device)
    if not use_triton:
        return reference.fused_moe(hidden, w13, w2, router_logits, top_k, renormalize)
    tile = _tile(hidden, w13, w2, int(top_k), interpret)
    return _impl(interpret).fused_moe_triton(hidden, w13, w2, tile, logits=router_logits.contiguous(),
                                             top_k=int(top_k), renormalize=renormalize)


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """:func:`fused_moe` with precomputed routing: topk_weights float32 [T, k], topk_ids int32
    [T, k] in [0, E) (ids out of range are an error on the reference path and contribute garbage,
    never an out-of-bounds write, on the Triton path, which cannot check them without a sync)."""
    _check(hidden, w13, w2, topk_ids, topk_ids.shape[-1] if topk_ids.dim() == 2 else 1, "topk_ids")
    if topk_weights.shape != topk_ids.shape or topk_ids.dtype != torch.int32 or topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32 and topk_ids int32, both [T, k]; got {topk_weights.dtype} "
                        f"{tuple(topk_weights.shape)} and {topk_ids.dtype} {tuple(topk_ids.shape)}")
    use_triton, interpret = dispatch.route(hidden.device)
    if not use_triton:
        return reference.fused_experts(hidden, w13, w2, topk_weights, topk_ids)
    tile = _tile(hidden, w13, w2, topk_ids.shape[1], interpret)
    return _impl(interpret).fused_moe_triton(hidden, w13, w2, tile, topk_weights=topk_weights.contiguous(),
                                             topk_ids=topk_ids.contiguous())


def _impl(interpret: bool):
    return dispatch.triton_impl(interpret).moe


# ----------------------------------------------------------------------------- tile choice

def _tile(hidden, w13, w2, top_k: int, interpret: bool) -> MoeTile:
    key = _key(hidden, w13, top_k)
    tile = _tuned.get(key)
    if tile is not None:
        return tile
    tile = default_tile(token_bucket(hidden.shape[0]), w13.shape[0], top_k, hidden.dtype)
    if (interpret or hidden.device.type != "cuda" or os.environ.get(ENV_AUTOTUNE, "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return tile
    _tuned[key] = tile = autotune(hidden, w13, w2, top_k, tile)
    return tile


def candidates(base: MoeTile) -> list[MoeTile]:
    """The default tile and a few neighbours (block_m halved / doubled, the other N/K shape, more warps)."""
    out = [base, replace(base, block_n=base.block_k, block_k=base.block_n),
           replace(base, num_warps=8 if base.num_warps == 4 else 4)]
    if base.block_m > 16:
        out.append(replace(base, block_m=base.block_m // 2))
    if base.block_m < 128:
        out.append(replace(base, block_m=base.block_m * 2))
    return list(dict.fromkeys(out))


@torch.inference_mode()
def autotune(hidden, w13, w2, top_k: int, base: MoeTile, reps: int = 5) -> MoeTile:
    """The fastest of :func:`candidates` for this shape, timed with CUDA events on uniform random
    routing of ``token_bucket(T)`` random tokens through the layer's own weights."""
    T = token_bucket(hidden.shape[0])
    E = w13.shape[0]
    g = torch.Generator(device=hidden.device).manual_seed(0)
    x = torch.randn(T, hidden.shape[1], device=hidden.device, dtype=hidden.dtype, generator=g)
    logits = torch.randn(T, E, device=hidden.device, generator=g)
    impl = _impl(False)
    best, best_t = base, float("inf")
    for tile in candidates(base):
        run = lambda: impl.fused_moe_triton(x, w13, w2, tile, logits=logits, top_k=top_k)  # noqa: E731
        try:
            run()  # compile
        except Exception as e:  # a candidate that does not fit (shared memory, registers) is skipped
            logger.debug("MoE tile %s failed: %s", tile, e)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / reps
        if t < best_t:
            best, best_t = tile, t
    logger.info("MoE tile for %d tokens, w13 %s, top-%d: %s (%.1f us)", T, tuple(w13.shape), top_k, best, best_t * 1e3)
    return best
