"""The fused MoE kernels compiled on a CUDA GPU: bf16 / fp16 / fp32 against the float32 torch
reference at real layer shapes (Qwen3-30B-A3B's, a Mixtral-like one), the routing kernel, the
layer captured in a CUDA graph, and the tile autotune (a tile per token bucket, nothing compiled
afterwards).

Run with `pytest -m gpu tests/kernels/test_moe_gpu.py` on the lent H100/H200.
"""
from __future__ import annotations

import pytest
import torch

import kvray.kernels as K
from kvray.kernels import moe
from kvray.kernels import reference as R

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
QWEN3_30B = (128, 2048, 768, 8)  # experts, hidden, expert width, top-k


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KVRAY_ATTENTION_BACKEND", raising=False)
    K.set_attention_backend(None)


def layer(T, E, H, I, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, H, device=DEV, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=DEV, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEV, generator=g) / I ** 0.5).to(dtype)
    logits = torch.randn(T, E, device=DEV, generator=g).to(dtype)
    return x, w13, w2, logits


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("T,E,H,I,k", [(1, *QWEN3_30B[:3], 8), (64, *QWEN3_30B[:3], 8), (1000, *QWEN3_30B[:3], 8),
                                       (37, 8, 1024, 1792, 2), (300, 60, 512, 256, 4)])
def test_bf16_experts_match_float32_reference(T, E, H, I, k):
    x, w13, w2, logits = layer(T, E, H, I, seed=T + E)
    weights, ids = R.moe_route(logits, k, True)
    got = K.fused_experts(x, w13, w2, weights, ids)
    want = R.fused_experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.float32, 1e-5)])
def test_fp16_and_fp32(dtype, tol):
    x, w13, w2, logits = layer(200, 32, 512, 384, dtype=dtype, seed=3)
    got = K.fused_moe(x, w13, w2, logits, 4, False)
    want = R.fused_moe(x.float(), w13.float(), w2.float(), logits, 4, False)
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("renorm", [False, True])
def test_routing_kernel(renorm):
    _, _, _, logits = layer(513, 128, 8, 8, seed=4)
    w, ids = K.moe_route(logits, 8, renorm)
    rw, rids = R.moe_route(logits, 8, renorm)
    # bf16 logits tie often: compare the selected logit values (largest first), not the ids
    picked = logits.float().gather(1, ids.long())
    torch.testing.assert_close(picked, logits.float().gather(1, rids.long()), rtol=0, atol=0)
    assert (ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all()  # k distinct experts
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def test_layer_in_a_cuda_graph_matches_eager_and_compiles_nothing_more():
    E, H, I, k = QWEN3_30B
    x, w13, w2, logits = layer(64, E, H, I, seed=5)
    K.fused_moe(x, w13, w2, logits, k, True)  # warm-up outside capture: tunes and compiles
    torch.cuda.synchronize()
    before = K.compiled_variants()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe(x, w13, w2, logits, k, True)
    fresh_x, _, _, fresh_logits = layer(64, E, H, I, seed=6)
    x.copy_(fresh_x)
    logits.copy_(fresh_logits)
    graph.replay()
    torch.cuda.synchronize()
    want = K.fused_moe(x, w13, w2, logits, k, True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the same kernels and tile: bit for bit
    assert rel_err(out, R.fused_moe(x.float(), w13.float(), w2.float(), logits, k, True)) < 1e-2
    assert K.compiled_variants() == before


def test_autotune_picks_a_tile_per_bucket_then_never_compiles():
    E, H, I, k = 64, 1024, 512, 4
    x, w13, w2, logits = layer(512, E, H, I, seed=7)
    for t in (1, 16, 100, 512):
        K.fused_moe(x[:t], w13, w2, logits[:t], k, True)
    tuned = {key[-1]: tile for key, tile in moe.tuned_tiles().items() if key[0] == (E, 2 * I, H)}
    assert sorted(tuned) == [1, 16, 128, 512]
    for bucket, tile in tuned.items():
        assert tile in moe.candidates(moe.default_tile(bucket, E, k, torch.bfloat16))
    torch.cuda.synchronize()
    before = K.compiled_variants()
    for t in (1, 9, 16, 77, 128, 300, 511):  # token counts of the tuned buckets: tuned tiles, no compile
        out = K.fused_moe(x[:t], w13, w2, logits[:t], k, True)
        assert rel_err(out, R.fused_moe(x[:t].float(), w13.float(), w2.float(), logits[:t], k, True)) < 1e-2
    assert K.compiled_variants() == before
