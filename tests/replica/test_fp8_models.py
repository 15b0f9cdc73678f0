"""FP8 checkpoints on the CPU: both on-disk formats (Hugging Face block-FP8, compressed-tensors
FP8-dynamic / static), written here from random models, give the greedy tokens of transformers
running the dequantized weights in float32; quantize-on-load equals a per-channel reference; fused
projections keep their parts' scales; ignored modules stay unquantized; unsupported schemes are
ValueErrors naming the field or tensor; the FP8 presets are the conversion of their base presets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvray import LLM, SamplingParams
from kvray.replica.models import load_model, presets
from kvray.replica.models.fp8_checkpoint import convert_checkpoint
from kvray.replica.models.linear import Linear, fuse_linears
from kvray.replica.models.quantization import Fp8BlockMethod, Fp8ChannelMethod, UnquantizedMethod
from tests.conftest import hf_greedy, random_prompts

FP8 = torch.float8_e4m3fn


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def dequantize_dir(src: Path, dst: Path) -> Path:
    """An fp32 checkpoint of ``src``'s FP8 weights times their scales (written independently of
    kvray's loader: plain tensor arithmetic on the files)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        out = {}
        for name, x in t.items():
            if name.endswith(("weight_scale", "weight_scale_inv", "input_scale")):
                continue
            stem = name[: -len("weight")]
            if x.dtype == FP8 and stem + "weight_scale_inv" in t:       # 128x128 tiles
                s = t[stem + "weight_scale_inv"].float()
                s = s.repeat_interleave(128, 0)[: x.shape[0]].repeat_interleave(128, 1)[:, : x.shape[1]]
                x = x.float() * s
            elif x.dtype == FP8:                                         # per channel [N, 1] or per tensor
                s = t[stem + "weight_scale"].float()
                x = x.float() * (s.view(-1, 1) if s.numel() > 1 else s.view(()))
            out[name] = x.float()
        save_file(out, str(f))
    idx = dst / "model.safetensors.index.json"
    if idx.exists():
        index = json.loads(idx.read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                               if not k.endswith(("weight_scale", "weight_scale_inv", "input_scale"))}
        idx.write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-base")
    return {name: presets.make_checkpoint(name, root / name) for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3")}


def greedy_equal_to_hf(kvray_model: str, hf_dir: Path, engine_opts: dict | None = None, n_prompts: int = 4):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    llm = LLM(kvray_model, device="cpu", dtype="float32", **(engine_opts or {}))
    prompts = random_prompts(hf.config.vocab_size, [5, 17, 33, 9][:n_prompts], seed=11)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):  # an end-of-sequence id no token has: both run 12 tokens
        ref = hf_greedy(hf, prompt, 12, eos_ids=[hf.config.vocab_size + 1])
        assert out.token_ids == ref, (kvray_model, prompt)
    return llm


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-dynamic"])
def test_fp8_checkpoint_greedy_equals_transformers_on_dequantized_weights(base, fmt, base_dirs, tmp_path):
    fp8_dir = convert_checkpoint(base_dirs[base], tmp_path / "fp8", fmt)
    t = _tensors(fp8_dir)
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == FP8
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert ("model.layers.0.mlp.down_proj.weight_scale_inv" in t) == (fmt == "fp8-block")
    llm = greedy_equal_to_hf(str(fp8_dir), dequantize_dir(fp8_dir, tmp_path / "deq"))
    model = llm.engine.runner.model
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj is not None and attn.qkv_proj.weight.dtype == FP8  # fused, scales and all
    assert isinstance(attn.qkv_proj.method, Fp8BlockMethod if fmt == "fp8-block" else Fp8ChannelMethod)
    assert model.model.layers[1].mlp.gate_up_proj.weight.dtype == FP8
    if not model.tie_word_embeddings:  # the lm_head is never quantized: logits in the activation dtype
        assert model.lm_head.weight.dtype == model.model.norm.weight.dtype != FP8


def test_compressed_tensors_static_per_tensor_scheme_and_ignore(base_dirs, tmp_path):
    """Per-tensor weight scales with static input scales, and one module left unquantized through
    an ``re:`` ignore rule: it loads, fuses (per-tensor scales become per-channel) and matches."""
    src = base_dirs["tiny-llama"]
    dst = tmp_path / "static"
    convert_checkpoint(src, dst, "fp8-dynamic")
    orig = _tensors(src)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        for name in [n for n in t if n.endswith(".weight") and t[n].dtype == FP8]:
            stem = name[: -len("weight")]
            if "down_proj" in name:  # ignored: back to the original float weight, no scale
                t[name] = orig[name]
                del t[stem + "weight_scale"]
                continue
            w = orig[name]
            scale = w.abs().max() / 448.0
            t[name] = (w / scale).clamp(-448, 448).to(FP8)
            t[stem + "weight_scale"] = scale.view(1)
            t[stem + "input_scale"] = torch.tensor([0.05])
        save_file(t, str(f))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    for name in [n for n in list(wm) if n.endswith("weight_scale")]:
        if "down_proj" in name:
            del wm[name]
        else:
            wm[name[: -len("weight_scale")] + "input_scale"] = wm[name]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["weights"]["strategy"] = "tensor"
    group["input_activations"].update(strategy="tensor", dynamic=False)
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*down_proj$"]
    (dst / "config.json").write_text(json.dumps(cfg))
    llm = greedy_equal_to_hf(str(dst), dequantize_dir(dst, tmp_path / "deq"), n_prompts=2)
    layer = llm.engine.runner.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj.method, UnquantizedMethod) and layer.mlp.down_proj.weight.dtype == torch.float32
    qkv = layer.self_attn.qkv_proj
    assert qkv.weight_scale.shape == (qkv.out_features,) and float(qkv.input_scale) == pytest.approx(0.05)


def reference_per_channel(w: torch.Tensor) -> torch.Tensor:
    """What quantize-on-load must compute: per output channel, scale = amax / 448, weights rounded
    to e4m3 (torch's cast), dequantized back."""
    scale = w.abs().amax(1, keepdim=True) / 448.0
    return (w / scale).to(FP8).float() * scale


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-qwen3"])
def test_quantize_on_load_equals_per_channel_reference(base, base_dirs, tmp_path):
    src = base_dirs[base]
    ref_dir = shutil.copytree(src, tmp_path / "ref")
    for f in ref_dir.glob("*.safetensors"):
        t = load_file(str(f))
        save_file({n: reference_per_channel(x) if n.endswith("proj.weight") else x for n, x in t.items()}, str(f))
    llm = greedy_equal_to_hf(str(src), ref_dir, {"quantization": "fp8"}, n_prompts=3)
    runner = llm.engine.runner
    assert "quantized on load" in runner.quantization_name
    # the scales were computed by the weight loader: nothing of the kind is in the checkpoint
    assert "model.layers.0.mlp.down_proj.weight_scale" not in _tensors(src)
    down = runner.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.method.dequantized_weight(down),
                               reference_per_channel(_tensors(src)["model.layers.0.mlp.down_proj.weight"]))


def test_fp8_presets_are_their_base_converted(tmp_path, base_dirs):
    for fmt in ("fp8-block", "fp8-dynamic"):
        preset = presets.make_checkpoint(f"tiny-llama-{fmt}", tmp_path / fmt)
        converted = convert_checkpoint(base_dirs["tiny-llama"], tmp_path / f"conv-{fmt}", fmt)
        a, b = _tensors(preset), _tensors(converted)
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].dtype == b[n].dtype and torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)), n
        assert json.loads((preset / "config.json").read_text()) == json.loads((converted / "config.json").read_text())
        index = json.loads((preset / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(a)
        assert presets.get_preset(f"tiny-llama-{fmt}").version() != presets.get_preset("tiny-llama").version()


@pytest.mark.parametrize("method, outs", [
    (UnquantizedMethod(), [64, 32, 32]),
    (Fp8ChannelMethod(quantize_on_load=True), [64, 32, 32]),
    (Fp8BlockMethod((128, 128)), [256, 128, 128]),   # block-aligned parts: block scales kept
    (Fp8BlockMethod((128, 128)), [200, 72, 72]),     # rows end inside blocks: one scale row per row
])
def test_fused_linear_equals_its_parts(method, outs):
    g = torch.Generator().manual_seed(sum(outs))
    parts = []
    for n in outs:
        lin = Linear(96, n, True, torch.float32, torch.device("cpu"), method=method)
        w = torch.randn(n, 96, generator=g) * 0.1
        if isinstance(method, Fp8BlockMethod):
            from kvray.replica.models.quantization import quantize_blockwise
            lin.weight.data, lin.weight_scale_inv.data = quantize_blockwise(w, (128, 128))
        else:
            lin.weight.weight_loader(lin.weight, w, "w")
        lin.bias.data = torch.randn(n, generator=g)
        method.process_after_loading(lin)
        parts.append(lin)
    fused = fuse_linears(parts)
    x = torch.randn(5, 96, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    if isinstance(method, Fp8BlockMethod):
        assert fused.scale_block == ((128, 128) if outs[0] == 256 else (1, 128))
    mixed = Linear(96, 8, True, torch.float32, torch.device("cpu"))
    assert fuse_linears([parts[0], mixed]) is None or isinstance(method, UnquantizedMethod)


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(quant_method="awq"), "quant_method='awq'"),
    (lambda q: q.update(format="pack-quantized"), "format='pack-quantized'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group"), "weights.strategy='group'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "weights.num_bits=4"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="int"), "weights.type='int'"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations=None), "weight-only"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    (lambda q: q["config_groups"].update(group_1={}), "config_groups"),
])
def test_unsupported_compressed_tensors_schemes_are_errors(edit, match, base_dirs, tmp_path):
    d = convert_checkpoint(base_dirs["tiny-qwen3"], tmp_path / "ct", "fp8-dynamic")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(d, torch.float32, "cpu")


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(activation_scheme="static"), "activation_scheme='static'"),
    (lambda q: q.pop("weight_block_size"), "weight_block_size=None"),
    (lambda q: q.update(fmt="e5m2"), "fmt='e5m2'"),
])
def test_unsupported_hf_fp8_schemes_are_errors(edit, match, base_dirs, tmp_path):
    d = convert_checkpoint(base_dirs["tiny-qwen3"], tmp_path / "hf", "fp8-block")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(d, torch.float32, "cpu")


def test_bad_fp8_tensors_are_errors_naming_them(base_dirs, tmp_path):
    d = convert_checkpoint(base_dirs["tiny-qwen3"], tmp_path / "bad", "fp8-block")
    f = d / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].float()
    save_file(t, str(f))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight.*float32.*float8_e4m3fn"):
        load_model(d, torch.float32, "cpu")
    del t["model.layers.1.mlp.up_proj.weight"]
    t2 = load_file(str(convert_checkpoint(base_dirs["tiny-qwen3"], tmp_path / "bad2", "fp8-block") / "model.safetensors"))
    del t2["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(t2, str(f))
    with pytest.raises(ValueError, match="missing tensor.*o_proj.weight_scale_inv"):
        load_model(d, torch.float32, "cpu")
    with pytest.raises(ValueError, match="quantization='int4'"):
        load_model(base_dirs["tiny-qwen3"], torch.float32, "cpu", quantization="int4")
