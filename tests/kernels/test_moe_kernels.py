"""The fused MoE kernels (kvray.kernels.triton_moe) against the plain-torch reference, under Triton's
CPU interpreter on fresh random inputs: routing, the sort by expert, and the two grouped GEMMs, with
experts that get no token, one expert that gets several blocks, top-k from 1 to 8, renormalisation
on and off, and several tiles. (The interpreter's tl.dot is wrong for bfloat16 in this Triton, so
the 16-bit case here is float16; bfloat16 is covered on the GPU in test_moe_gpu.py.)"""
import pytest
import torch

from kvray import kernels
from kvray.kernels import moe, reference
from kvray.kernels.moe import MoeTile

SMALL = MoeTile(16, 16, 16, 1, 1)
WIDE = MoeTile(32, 64, 32, 1, 1)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def impl():
    return kernels.triton_impl(True).moe


def layer(T, E, H, I, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    logits = torch.randn(T, E, generator=g)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), logits


def close(got, want, tol=1e-5):
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("T,E,k,renorm", [(1, 4, 1, True), (7, 8, 2, True), (33, 16, 4, False), (20, 60, 6, True),
                                          (5, 128, 8, False), (70, 3, 3, True)])
def test_route_matches_reference(T, E, k, renorm):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k))
    w, ids = kernels.moe_route(logits, k, renorm)
    rw, rids = reference.moe_route(logits, k, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)  # distinct random logits: the same experts, largest first
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    if renorm:
        torch.testing.assert_close(w.sum(-1), torch.ones(T), rtol=1e-5, atol=1e-5)
    else:
        assert (w.sum(-1) < 1).all()


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("T,E,k,used", [(3, 16, 2, None), (50, 8, 2, [1, 6]), (40, 5, 1, [2]), (9, 64, 8, None)])
def test_align_places_every_entry_once_in_its_experts_blocks(T, E, k, used, block_m):
    g = torch.Generator().manual_seed(T + E)
    if used is None:  # k distinct experts per token, as routing gives
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    else:  # only the experts in `used` get entries
        ids = torch.tensor(used)[torch.randint(0, len(used), (T, k), generator=g)].to(torch.int32)
    weights = torch.rand(T, k, generator=g)
    sorted_ids, block_expert, expert_end = impl().route_and_align(weights, ids, E, block_m)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat.long(), minlength=E)
    assert block_expert.shape[0] == impl().max_blocks(T * k, E, block_m)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        if e < 0:
            assert all(x < 0 for x in block_expert[b:].tolist())  # unused blocks only at the end
            break
        rows = [s for s in range(b * block_m, (b + 1) * block_m) if s < expert_end[e]]
        entries = sorted_ids[rows].long()
        assert (flat[entries] == e).all()
        seen += entries.tolist()
    assert sorted(seen) == list(range(T * k))  # every (token, slot) entry exactly once
    used_blocks = int((block_expert >= 0).sum())
    assert used_blocks == int(((counts + block_m - 1) // block_m).sum())
    assert not any(counts[e] == 0 and e in block_expert.tolist() for e in range(E))  # empty experts own no block


@pytest.mark.parametrize("T,E,H,I,k", [(1, 4, 32, 16, 1), (5, 16, 64, 32, 2), (33, 8, 48, 40, 4), (12, 6, 64, 96, 6),
                                       (3, 32, 16, 48, 8)])
@pytest.mark.parametrize("tile", [SMALL, WIDE], ids=["16x16x16", "32x64x32"])
def test_fused_experts_match_reference(T, E, H, I, k, tile):
    x, w13, w2, logits = layer(T, E, H, I, seed=T * 7 + k)
    weights, ids = reference.moe_route(logits, k, renormalize=k > 2)
    want = reference.fused_experts(x, w13, w2, weights, ids)
    got = impl().fused_moe_triton(x, w13, w2, tile, topk_weights=weights, topk_ids=ids)
    close(got, want)
    assert len(ids.unique()) < E or T * k >= E  # small batches leave experts without tokens


def test_one_expert_with_many_blocks_and_most_experts_empty():
    T, E, H, I, k = 45, 12, 32, 32, 2
    x, w13, w2, _ = layer(T, E, H, I, seed=3)
    ids = torch.stack([torch.full((T,), 4), torch.full((T,), 9)], dim=1).to(torch.int32)
    ids[::5, 1] = 0
    weights = torch.rand(T, k, generator=torch.Generator().manual_seed(4))
    want = reference.fused_experts(x, w13, w2, weights, ids)
    close(impl().fused_moe_triton(x, w13, w2, SMALL, topk_weights=weights, topk_ids=ids), want)  # expert 4: 3 blocks
    close(kernels.fused_experts(x, w13, w2, weights, ids), want)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (17, 8, 4), (40, 16, 1), (9, 20, 5)])
def test_fused_moe_with_routing_matches_reference(T, E, k, renorm):
    x, w13, w2, logits = layer(T, E, 64, 32, seed=E + k)
    want = reference.fused_moe(x, w13, w2, logits, k, renorm)
    close(kernels.fused_moe(x, w13, w2, logits, k, renorm), want)
    close(impl().fused_moe_triton(x, w13, w2, SMALL, logits=logits, top_k=k, renormalize=renorm), want)


def test_float16():
    x, w13, w2, logits = layer(21, 8, 64, 48, seed=5, dtype=torch.float16)
    got = kernels.fused_moe(x, w13, w2, logits.half(), 2, True)
    want = reference.fused_moe(x.float(), w13.float(), w2.float(), logits.half().float(), 2, True)
    assert got.dtype == torch.float16
    close(got, want, tol=3e-3)


def test_zero_tokens():
    x, w13, w2, logits = layer(0, 4, 32, 16, seed=1)
    assert kernels.fused_moe(x, w13, w2, logits, 2, True).shape == (0, 32)


def test_cpu_tensors_without_the_interpreter_run_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(moe, "_impl", lambda interpret: pytest.fail("Triton used for CPU tensors"))
    x, w13, w2, logits = layer(6, 8, 32, 16, seed=2)
    torch.testing.assert_close(kernels.fused_moe(x, w13, w2, logits, 3, False),
                               reference.fused_moe(x, w13, w2, logits, 3, False), rtol=0, atol=0)


def test_bad_inputs_are_clear_errors():
    x, w13, w2, logits = layer(4, 8, 32, 16, seed=3)
    with pytest.raises(ValueError, match="top_k"):
        kernels.fused_moe(x, w13, w2, logits, 9, True)
    with pytest.raises(ValueError, match="w2"):
        kernels.fused_moe(x, w13, w2[:, :, :8], logits, 2, True)
    with pytest.raises(ValueError, match="router_logits has 7 experts"):
        kernels.fused_moe(x, w13, w2, logits[:, :7], 2, True)
    with pytest.raises(TypeError, match="dtype"):
        kernels.fused_moe(x, w13.half(), w2, logits, 2, True)
    with pytest.raises(TypeError, match="int32"):
        kernels.fused_experts(x, w13, w2, torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 8\)"):
        reference.fused_experts(x, w13, w2, torch.rand(4, 2), torch.full((4, 2), 8, dtype=torch.int32))


def test_tile_table():
    tiles = [moe.default_tile(t, 128, 8, torch.bfloat16) for t in (1, 64, 512, 4096)]
    assert [t.block_m for t in tiles] == sorted(t.block_m for t in tiles) and tiles[0].block_m == 16
    assert tiles[-1].block_m == 128
    assert moe.default_tile(64, 8, 2, torch.float32) == moe.FP32_TILE
    assert [moe.token_bucket(t) for t in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    cands = moe.candidates(tiles[1])
    assert cands[0] == tiles[1] and len(cands) == len(set(cands)) >= 3
    # off CUDA nothing is timed or remembered: the default tile of the token bucket
    x, w13, w2, _ = layer(5, 8, 32, 16, seed=1)
    assert moe._tile(x, w13, w2, 2, interpret=True) == moe.default_tile(8, 8, 2, torch.float32)
    assert moe.tuned_tiles() == {}
