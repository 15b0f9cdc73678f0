"""Built-in presets: determinism, the CLI, the tokenizer, the cache, and the full-size shapes."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvray.cli import main as cli_main
from kvray.replica.models import bpe, load_config, load_model, load_tokenizer, presets, resolve_model
from kvray.replica.models.registry import MODEL_REGISTRY


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for f in a.iterdir():
        if f.suffix == ".json":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "kvray"  # the installed console script
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kvray.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_cli_make_checkpoint_is_deterministic_and_loads(tmp_path):
    """One checkpoint written in this process, one by the console script in a fresh process
    (fresh tokenizer training, fresh hash seeds): identical tensors and tokenizer."""
    here = presets.make_checkpoint("tiny-qwen3", tmp_path / "a")
    proc = _cli("make-checkpoint", "--preset", "tiny-qwen3", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    there = tmp_path / "b"
    _assert_same_checkpoint(here, there)
    model, cfg = load_model(there, torch.float32, "cpu")
    assert type(model).__name__ == "Qwen3ForCausalLM" and cfg.tie_word_embeddings
    tok = load_tokenizer(there)
    assert len(tok) == cfg.vocab_size == 1024


def test_sharded_preset_is_deterministic(tmp_path):
    a = presets.make_checkpoint("tiny-llama", tmp_path / "a")
    b = presets.make_checkpoint("tiny-llama", tmp_path / "b")
    _assert_same_checkpoint(a, b)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3 and all((a / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(a).values())
    # retraining the tokenizer from scratch gives the same tokenizer.json
    fresh = bpe._trained_json.__wrapped__(bpe.LLAMA3_TOKENIZER)
    assert fresh == (a / "tokenizer.json").read_text(encoding="utf-8")


def test_checkpoint_layout_and_weight_init(tmp_path):
    d = presets.make_checkpoint("tiny-qwen2", tmp_path / "q2")
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"]:
        assert (d / f).is_file(), f
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    t = _tensors(d)
    assert "lm_head.weight" in t and "model.layers.0.self_attn.q_proj.bias" in t  # untied, qkv bias
    assert "model.layers.0.self_attn.o_proj.bias" not in t
    norm = t["model.layers.0.input_layernorm.weight"]
    assert 0.05 < norm.std() < 0.2 and abs(norm.mean() - 1) < 0.05
    std = json.loads((d / "config.json").read_text())["initializer_range"]  # matrices are N(0, range^2)
    assert abs(t["model.layers.0.mlp.up_proj.weight"].std() - std) < 0.1 * std
    assert t["model.layers.0.self_attn.k_proj.bias"].abs().max() > 0.05
    # the transformers model class loads it with no missing or unexpected keys
    from transformers import AutoModelForCausalLM
    _, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


TEXTS = [
    "Hello, world! The quick brown fox.",
    "héllo wörld — Straße, naïve café",
    "日本語のテキストと中文 한국어",
    "emoji 🚀🔥 and a ZWJ sequence 👩‍💻 plus 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_tokenizer_round_trip_and_chat_template(name, tmp_path):
    d = presets.make_checkpoint(name, tmp_path / name)
    tok = load_tokenizer(d)
    cfg = load_config(d)
    gen = json.loads((d / "generation_config.json").read_text())
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
        # byte-level pieces of a multi-byte character decode back when joined, not one by one
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)).replace(tok.bos_token or "", "") == text
    assert len(tok("hello world hello world")["input_ids"]) < len("hello world hello world") // 2  # merges learned
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 👋"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == rendered
    if name == "tiny-qwen3":
        assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there 👋<|im_end|>\n"
                            "<|im_start|>assistant\n")
        im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        assert ids.count(im_start) == 3 and ids.count(im_end) == 2
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
        assert cfg.eos_token_id == tok.eos_token_id
        assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
        assert tok("abc")["input_ids"][0] != tok.convert_tokens_to_ids("<|endoftext|>")  # no bos added
    else:
        assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nHi there 👋<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok("abc")["input_ids"][0] == tok.bos_token_id  # llama 3 prepends <|begin_of_text|>
        assert tok.eos_token == "<|eot_id|>"
        eos = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
        assert cfg.eos_token_id == eos == gen["eos_token_id"]
    for special in tok.all_special_ids:
        assert special < cfg.vocab_size


def test_resolve_model_generates_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = presets.make_checkpoint
    monkeypatch.setattr(presets, "make_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("kvray:tiny-qwen3"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    path = results[0]
    assert path.parent == tmp_path / "cache" / "presets"
    assert path.name == f"tiny-qwen3-{presets.get_preset('tiny-qwen3').version()}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left behind
    assert 1 <= len(calls) <= 2
    # cached: no generation on later calls
    monkeypatch.setattr(presets, "make_checkpoint", lambda *a, **k: pytest.fail("regenerated a cached preset"))
    assert resolve_model("kvray:tiny-qwen3") == path
    model, _ = load_model("kvray:tiny-qwen3", torch.float32, "cpu")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    # a changed preset definition lands in a different directory
    monkeypatch.setattr(presets, "GENERATOR_VERSION", presets.GENERATOR_VERSION + 1000)
    assert presets.preset_cache_dir("tiny-qwen3") != path


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("KVRAY_CACHE_DIR", raising=False)
    d = presets.preset_cache_dir("kvray:tiny-llama")
    assert d.parent == Path.home() / ".cache" / "kvray" / "presets" and d.name.startswith("tiny-llama-v")


def test_cli_presets_and_errors(tmp_path, capsys):
    assert cli_main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in presets.PRESETS:
        assert f"kvray:{name}" in listed
    assert cli_main(["make-checkpoint", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert cli_main(["make-checkpoint", "--preset", "tiny-qwen3", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_written_names_are_transformers_names(name):
    """What a preset writes (kvray's parameter names) is exactly what transformers' model class
    for the same config expects (tied lm_head left out, as save_pretrained does)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(presets.hf_config(name))
    assert {n: tuple(p.shape) for n, p in hf.named_parameters()} == presets.parameter_shapes(name)


FULL_SIZE = {
    # name: (architecture, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied, theta, max pos, params)
    "qwen3-0.6b": ("Qwen3ForCausalLM", 1024, 3072, 28, 16, 8, 128, 151936, True, 1e6, 40960, 596_049_920),
    "llama-3.2-1b": ("LlamaForCausalLM", 2048, 8192, 16, 32, 8, 64, 128256, True, 500000.0, 131072, 1_235_814_400),
    "llama-3.1-8b": ("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, False, 500000.0, 131072, 8_030_261_248),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 2048, 6144, 48, 32, 4, 128, 151936, False, 1e6, 40960, 30_532_122_624),
}
LLAMA3_ROPE_FACTOR = {"llama-3.2-1b": 32.0, "llama-3.1-8b": 8.0}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_preset_shapes(name):
    arch, hidden, inter, layers, heads, kv, hd, vocab, tied, theta, max_pos, n_params = FULL_SIZE[name]
    preset = presets.get_preset(name)
    cfg = presets.hf_config(preset)
    assert cfg.architectures == [arch]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (hidden, inter, layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (heads, kv, hd)
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.max_position_embeddings) == (vocab, tied, max_pos)
    assert preset.dtype == torch.bfloat16
    from kvray.replica.models.layers import rope_parameters
    rope = rope_parameters(cfg)
    assert rope["rope_theta"] == theta
    if name in LLAMA3_ROPE_FACTOR:
        assert (rope["rope_type"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                rope["original_max_position_embeddings"]) == ("llama3", LLAMA3_ROPE_FACTOR[name], 1.0, 4.0, 8192)
    else:
        assert rope["rope_type"] == "default"
    shapes = presets.parameter_shapes(preset)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == n_params
    ours = MODEL_REGISTRY[arch](cfg, dtype=torch.bfloat16, device=torch.device("meta"))
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == shapes
    # several shards, each under the size limit, and every special token id inside the vocab
    assert len(presets._plan_shards(preset, shapes)) >= 2
    ids = presets.token_ids(preset)
    for v in [*ids["config"].values(), *ids["generation"].values()]:
        assert all(0 <= i < vocab for i in (v if isinstance(v, list) else [v]))


def test_make_tensor_is_per_name_and_chunk_independent():
    p = presets.get_preset("tiny-qwen3")
    a = presets.make_tensor(p, "model.layers.0.mlp.up_proj.weight", (192, 64))
    b = presets.make_tensor(p, "model.layers.0.mlp.up_proj.weight", (192, 64))
    c = presets.make_tensor(p, "model.layers.1.mlp.up_proj.weight", (192, 64))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # drawing in smaller chunks (a multiple of 16) gives the same values as the default chunking
    d = presets.make_tensor(p, "model.layers.0.mlp.up_proj.weight", (192, 64), chunk=1024)
    assert torch.equal(a, d)


def test_fp8_variants_share_their_base_and_declare_their_format():
    for base in ("tiny-llama", "tiny-qwen3", "llama-3.1-8b"):
        b = presets.get_preset(base)
        for fmt, method in (("fp8-block", "fp8"), ("fp8-dynamic", "compressed-tensors")):
            p = presets.get_preset(f"{base}-{fmt}")
            assert (p.config, p.seed, p.tokenizer, p.quant) == (b.config, b.seed, b.tokenizer, fmt)
            assert presets.config_dict(p)["quantization_config"]["quant_method"] == method
            assert presets.parameter_shapes(p) == presets.parameter_shapes(b)  # quantized on write, same names
