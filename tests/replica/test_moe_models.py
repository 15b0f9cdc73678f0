"""Qwen3-MoE and Mixtral against transformers on the same checkpoints (float32, CPU): logits of
prefill, chunked prefill and decode, and greedy tokens through the engine. The variants cover
top-k from 1 to 4, norm_topk_prob on and off, a dense first layer (mlp_only_layers) and dense
layers from decoder_sparse_step, GQA 4/2 and 4/1. Also the per-expert checkpoint layout, the
loader's errors, the kernels inside the model under the Triton interpreter, and the preset shapes."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvray import LLM, SamplingParams
from kvray.replica.models import load_model, presets
from kvray.replica.models.layers import GatedMLP
from kvray.replica.models.moe import SparseMoeBlock, moe_spec
from tests.conftest import hf_greedy
from tests.replica.test_models import ATOL, PagedRunner, hf_logits, random_ids

VARIANTS = {
    "tiny-qwen3-moe": ("tiny-qwen3-moe", {}),  # top-4 of 8, no renormalisation, layer 0 dense
    "qwen3-moe-renorm-step2": ("tiny-qwen3-moe", {"norm_topk_prob": True, "num_experts_per_tok": 2,
                                                  "mlp_only_layers": [], "decoder_sparse_step": 2,
                                                  "num_key_value_heads": 1}),  # layer 1 sparse only, GQA 4/1
    "qwen3-moe-top1": ("tiny-qwen3-moe", {"norm_topk_prob": True, "num_experts_per_tok": 1}),
    "tiny-mixtral": ("tiny-mixtral", {}),  # top-2 of 4
    "mixtral-top3": ("tiny-mixtral", {"num_local_experts": 6, "num_experts_per_tok": 3}),
}


def variant(name: str) -> presets.Preset:
    base, overrides = VARIANTS[name]
    p = presets.get_preset(base)
    return dataclasses.replace(p, name=name, config={**p.config, **overrides})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: presets.make_checkpoint(variant(name), root / name) for name in VARIANTS}


@pytest.fixture(scope="module")
def hf_models(dirs):
    from transformers import AutoModelForCausalLM
    out = {}
    for name, d in dirs.items():
        model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info  # the names transformers expects
        out[name] = model.eval()
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_chunked_prefill_and_decode_logits_match_transformers(name, dirs, hf_models):
    model, cfg = load_model(dirs[name], torch.float32, "cpu")
    hf = hf_models[name]
    seqs = [random_ids(n, cfg.vocab_size, 20 + i) for i, n in enumerate([3, 90, 41])]
    runner = PagedRunner(model)
    out = runner.step([(0, seqs[0], 0), (1, seqs[1][:50], 0), (2, seqs[2], 0)])
    full = [hf_logits(hf, s) for s in seqs]
    torch.testing.assert_close(out[0], full[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], full[1][:50], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], full[2], atol=ATOL, rtol=0)
    extra = random_ids(2, cfg.vocab_size, 7)
    out = runner.step([(0, [extra[0]], 3), (1, seqs[1][50:], 50), (2, [extra[1]], 41)])
    torch.testing.assert_close(out[0], hf_logits(hf, seqs[0] + [extra[0]])[-1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], full[1][50:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], hf_logits(hf, seqs[2] + [extra[1]])[-1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "qwen3-moe-renorm-step2", "tiny-mixtral", "mixtral-top3"])
def test_greedy_tokens_match_transformers(name, dirs, hf_models):
    llm = LLM(str(dirs[name]), max_model_len=256, max_num_batched_tokens=64)  # chunked prefill too
    eos = llm.engine.eos_token_ids
    rng = random.Random(len(name))
    prompts = [[rng.randrange(llm.engine.vocab_size) for _ in range(n)] for n in (1, 7, 30, 64, 100, 150)]
    new = [24, 16, 24, 8, 24, 20]
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n) for n in new], use_tqdm=False)
    for i, (o, p, n) in enumerate(zip(outs, prompts, new)):
        assert o.token_ids == hf_greedy(hf_models[name], p, n, eos), f"prompt {i} (len {len(p)})"


def test_sparse_and_dense_layers_and_stacked_expert_weights(dirs):
    model, cfg = load_model(dirs["tiny-qwen3-moe"], torch.float32, "cpu")
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [GatedMLP, SparseMoeBlock, SparseMoeBlock]  # mlp_only_layers=[0]
    step2, _ = load_model(dirs["qwen3-moe-renorm-step2"], torch.float32, "cpu")
    assert [type(layer.mlp) for layer in step2.model.layers] == [GatedMLP, SparseMoeBlock, GatedMLP]
    blk = model.model.layers[2].mlp
    assert (blk.top_k, blk.renormalize) == (4, False) and step2.model.layers[1].mlp.renormalize
    disk = load_file(str(dirs["tiny-qwen3-moe"] / "model.safetensors"))
    for e in (0, 5, 7):
        prefix = f"model.layers.2.mlp.experts.{e}"
        torch.testing.assert_close(blk.experts.gate_up_proj[e, :32], disk[f"{prefix}.gate_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(blk.experts.gate_up_proj[e, 32:], disk[f"{prefix}.up_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(blk.experts.down_proj[e], disk[f"{prefix}.down_proj.weight"], rtol=0, atol=0)
    mixtral, _ = load_model(dirs["tiny-mixtral"], torch.float32, "cpu")
    disk = load_file(str(dirs["tiny-mixtral"] / "model.safetensors"))
    gate = mixtral.model.layers[1].mlp
    torch.testing.assert_close(gate.gate.weight, disk["model.layers.1.block_sparse_moe.gate.weight"], rtol=0, atol=0)
    torch.testing.assert_close(gate.experts.gate_up_proj[3, 96:], disk["model.layers.1.block_sparse_moe.experts.3.w3.weight"],
                               rtol=0, atol=0)


def _edit(src, dst, tensors=None, config=None):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    t = load_file(str(src / "model.safetensors"))
    save_file(tensors(t) if tensors else t, str(dst / "model.safetensors"))
    if config:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_loader_and_config_errors_name_the_tensor_or_field(dirs, tmp_path):
    src = dirs["tiny-qwen3-moe"]
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    gone = _edit(src, tmp_path / "a", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(gone, torch.float32, "cpu")
    bad = _edit(src, tmp_path / "b", lambda t: {**t, name: t[name][:16]})
    with pytest.raises(ValueError, match="shape mismatch for tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        load_model(bad, torch.float32, "cpu")
    extra = _edit(src, tmp_path / "c", lambda t: {**t, "model.layers.1.mlp.experts.8.up_proj.weight": t[name].clone()})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*experts\.8\.up_proj"):
        load_model(extra, torch.float32, "cpu")
    with pytest.raises(ValueError, match="'num_experts_per_tok' \\(9\\) exceeds"):
        load_model(_edit(src, tmp_path / "d", config={"num_experts_per_tok": 9}), torch.float32, "cpu")
    with pytest.raises(ValueError, match="'mlp_only_layers'"):
        load_model(_edit(src, tmp_path / "e", config={"mlp_only_layers": [5]}), torch.float32, "cpu")
    with pytest.raises(ValueError, match="'sliding_window'"):
        load_model(_edit(dirs["tiny-mixtral"], tmp_path / "f", config={"sliding_window": 64}), torch.float32, "cpu")


def test_kernels_inside_the_model_under_the_interpreter(dirs, hf_models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # attention, norms and the fused MoE all in Triton
    for name in ("qwen3-moe-renorm-step2", "mixtral-top3"):
        model, cfg = load_model(dirs[name], torch.float32, "cpu")
        model.fuse_projections()
        ids = random_ids(19, cfg.vocab_size, 3)
        (ours,) = PagedRunner(model).step([(0, ids, 0)])
        torch.testing.assert_close(ours, hf_logits(hf_models[name], ids), atol=ATOL, rtol=0)


def test_expected_active_experts_matches_random_routing():
    spec = moe_spec(presets.hf_config("qwen3-30b-a3b"))
    assert (spec.num_experts, spec.top_k, spec.intermediate, spec.renormalize) == (128, 8, 768, True)
    assert spec.sparse_layers == tuple(range(48))
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8, 64, 256):
        distinct = [len(torch.rand(batch, 128, generator=g).argsort(1)[:, :8].unique()) for _ in range(200)]
        assert abs(sum(distinct) / 200 - spec.expected_active_experts(batch)) < 0.02 * spec.expected_active_experts(batch)
    assert spec.expected_active_experts(1) == 8 and 127 < spec.expected_active_experts(256) <= 128
    assert moe_spec(presets.hf_config("qwen3-0.6b")) is None


def test_qwen3_30b_a3b_checkpoint_names_are_the_real_ones():
    shapes = presets.checkpoint_shapes("qwen3-30b-a3b")
    assert shapes["model.layers.0.mlp.gate.weight"] == (128, 2048)
    assert shapes["model.layers.0.mlp.experts.0.gate_proj.weight"] == (768, 2048)
    assert shapes["model.layers.47.mlp.experts.127.up_proj.weight"] == (768, 2048)
    assert shapes["model.layers.47.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert shapes["model.layers.5.self_attn.q_norm.weight"] == (128,)
    assert len(shapes) == 48 * (128 * 3 + 1 + 4 + 2 + 2) + 3  # experts, router, q/k/v/o, q/k norm, 2 norms; embed, norm, head
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 30_532_122_624
