"""The hardware floor of MoE models: a decode step reads the dense weights and only the experts its
batch routes to, and FLOPs count the active parameters (benchmarks/offline_throughput.decode_weights,
also behind online.py's all-at-once floor)."""
import torch

from benchmarks import offline_throughput as ot
from kvray.replica.models import presets
from kvray.replica.models.moe import moe_spec


def _bytes(name):
    return 2 * sum(torch.Size(s).numel() for s in presets.parameter_shapes(name).values())


def test_dense_models_read_all_weights_every_step():
    cfg, wb = presets.hf_config("qwen3-0.6b"), _bytes("qwen3-0.6b")
    assert ot.decode_weights(cfg, [5, 9, 3], wb) == (9 * wb, wb / 2)


def test_moe_reads_the_touched_experts_and_computes_with_the_active_ones():
    cfg, wb = presets.hf_config("qwen3-30b-a3b"), _bytes("qwen3-30b-a3b")
    spec = moe_spec(cfg)
    expert = 2 * 3 * 2048 * 768
    dense = wb - 48 * 128 * expert
    assert 3.0e9 < dense < 3.1e9  # embeddings, head, attention, norms, routers
    one, active = ot.decode_weights(cfg, [1], wb)
    assert one == dense + 48 * 8 * expert  # a single token reads its 8 experts per layer
    assert active == (dense + 48 * 8 * expert) / 2 and 3.3e9 < active < 3.4e9  # "A3B"
    b64, _ = ot.decode_weights(cfg, [1] * 64, wb)
    assert b64 == dense + 48 * expert * spec.expected_active_experts(64) and 0.9 * wb < b64 < wb
    # the batch shrinks as requests finish: 4 requests of 1, 2, 3, 4 tokens -> steps of 4, 3, 2, 1 tokens
    ragged, _ = ot.decode_weights(cfg, [1, 2, 3, 4], wb)
    assert ragged == sum(dense + 48 * expert * spec.expected_active_experts(b) for b in (4, 3, 2, 1))


def test_floor_uses_them():
    cfg, wb = presets.hf_config("qwen3-30b-a3b"), _bytes("qwen3-30b-a3b")
    prompts, outs = [[0] * 512] * 256, [256] * 256
    moe = ot.floor_tok_s(cfg, prompts, outs, 4e12, 8e14, wb)
    weights, active = ot.decode_weights(cfg, outs, wb)
    assert moe["floor_flops_s"] > (2 * active * 256 * 768) / 8e14 and weights < 256 * wb
    assert moe["floor_tok_s"] == 256 * 256 / max(moe["floor_bytes_s"], moe["floor_flops_s"])
