"""kvray's Llama / Qwen2 / Qwen3 against transformers on the same checkpoints, and the loader's errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvray.replica.forward_context import ForwardContext, forward_context
from kvray.replica.models import load_config, load_model, load_tokenizer, resolve_dtype, resolve_model
from kvray.replica.models.layers import compute_inv_freq, rope_parameters
from kvray.replica.models.presets import make_checkpoint

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
ATOL = 1e-4


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {name: make_checkpoint(name, root / name) for name in TINY}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    from transformers import AutoModelForCausalLM
    return {name: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
            for name, d in tiny_dirs.items()}


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


class PagedRunner:
    """A minimal stand-in for the model runner: paged caches, shuffled block allocation, and one
    flattened forward call per step."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 16):
        self.model, self.block_size = model, block_size
        for attn in model.attention_layers():
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=model.dtype)
            attn.v_cache = torch.zeros(shape, dtype=model.dtype)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}

    def step(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (seq_id, new token ids, position of the first one). Returns each chunk's logits."""
        ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for seq_id, toks, start in chunks:
            table = self.tables.setdefault(seq_id, [])
            end = start + len(toks)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for p in range(start, end):
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
            ids += toks
            positions += range(start, end)
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(end)
        width = max(len(self.tables[s]) for s, _, _ in chunks)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s, _, _ in chunks]
        ctx = ForwardContext(slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
                             query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             max_query_len=max(len(t) for _, t, _ in chunks), max_seq_len=max(seq_lens))
        with torch.no_grad(), forward_context(ctx):
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))
            logits = self.model.compute_logits(hidden)
        assert hidden.shape == (len(ids), self.model.config.hidden_size)
        assert logits.dtype == torch.float32
        return [logits[qsl[i]:qsl[i + 1]] for i in range(len(chunks))]


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", TINY)
def test_single_sequence_prefill_matches_transformers(name, tiny_dirs, hf_models):
    model, cfg = load_model(tiny_dirs[name], torch.float32, "cpu")
    for n, seed in [(1, 0), (9, 1), (150, 2)]:
        ids = random_ids(n, cfg.vocab_size, seed)
        (ours,) = PagedRunner(model).step([(0, ids, 0)])
        torch.testing.assert_close(ours, hf_logits(hf_models[name], ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_flattened_batch_chunked_prefill_and_decode_match_transformers(name, tiny_dirs, hf_models):
    model, cfg = load_model(tiny_dirs[name], torch.float32, "cpu")
    hf = hf_models[name]
    seqs = [random_ids(n, cfg.vocab_size, 10 + i) for i, n in enumerate([5, 100, 37])]
    runner = PagedRunner(model)
    # step 1: three prefills of different lengths in one flattened call (seq 1 only its first 70)
    out = runner.step([(0, seqs[0], 0), (1, seqs[1][:70], 0), (2, seqs[2], 0)])
    full = [hf_logits(hf, s) for s in seqs]
    torch.testing.assert_close(out[0], full[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], full[1][:70], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], full[2], atol=ATOL, rtol=0)
    # step 2: the rest of seq 1 over its cached prefix (chunked prefill) next to two decodes
    extra = random_ids(2, cfg.vocab_size, 99)
    out = runner.step([(0, [extra[0]], 5), (1, seqs[1][70:], 70), (2, [extra[1]], 37)])
    torch.testing.assert_close(out[0], hf_logits(hf, seqs[0] + [extra[0]])[-1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], full[1][70:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], hf_logits(hf, seqs[2] + [extra[1]])[-1:], atol=ATOL, rtol=0)


def test_llama3_rope_scaling_is_active(tiny_dirs):
    cfg = load_config(tiny_dirs["tiny-llama"])
    params = rope_parameters(cfg)
    assert params["rope_type"] == "llama3" and params["original_max_position_embeddings"] == 64
    scaled = compute_inv_freq(params, 16)
    plain = compute_inv_freq({**params, "rope_type": "default"}, 16)
    # some frequencies are divided by the factor, some blended, the fastest kept
    assert torch.isclose(scaled, plain / 8).sum() >= 2
    assert torch.isclose(scaled, plain).sum() >= 1
    assert (~torch.isclose(scaled, plain) & ~torch.isclose(scaled, plain / 8)).sum() >= 1
    from transformers import AutoModelForCausalLM
    hf_inv = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["tiny-llama"])).model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled, hf_inv.float(), atol=0, rtol=0)


def test_model_interface(tiny_dirs):
    model, cfg = load_model(tiny_dirs["tiny-qwen3"], torch.float32, "cpu")
    layers = model.attention_layers()
    assert len(layers) == cfg.num_hidden_layers
    a = layers[0]
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 16) and a.scaling == 16 ** -0.5
    assert a.k_cache is None and a.v_cache is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    llama, _ = load_model(tiny_dirs["tiny-llama"], torch.float32, "cpu")
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight  # untied
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_load_converts_dtype(tiny_dirs, hf_models):
    model, _ = load_model(tiny_dirs["tiny-qwen2"], torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = random_ids(20, 1024, 5)
    (ours,) = PagedRunner(model).step([(0, ids, 0)])
    import copy
    hf_bf16 = copy.deepcopy(hf_models["tiny-qwen2"]).to(torch.bfloat16)
    ref = hf_logits(hf_bf16, ids).float()
    # bf16 on both sides; our attention accumulates in float32 where transformers stays in bf16,
    # so ~1% rounding differences are expected; a bad conversion or load gives O(1) errors
    assert ((ours - ref).norm() / ref.norm()).item() < 3e-2


def test_resolve_dtype():
    class Cfg:
        dtype = torch.bfloat16
    assert resolve_dtype("auto", Cfg(), "cpu") == torch.float32
    assert resolve_dtype("auto", Cfg(), "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", Cfg(), "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, Cfg(), "cpu") == torch.float16

    class Old:
        torch_dtype = "float16"
    assert resolve_dtype("auto", Old(), torch.device("cuda", 0)) == torch.float16
    with pytest.raises(ValueError, match="int7"):
        resolve_dtype("int7", Cfg(), "cpu")


def test_transformers_sharded_save_loads_and_matches(tiny_dirs, hf_models, tmp_path):
    hf = hf_models["tiny-llama"]
    out = tmp_path / "hf-sharded"
    hf.save_pretrained(str(out), max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    model, _ = load_model(out, torch.float32, "cpu")
    ids = random_ids(80, 1024, 7)
    (ours,) = PagedRunner(model).step([(0, ids, 0)])
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)
    # a tied model saved by transformers (no lm_head.weight in the files) loads too
    out3 = tmp_path / "hf-qwen3"
    hf_models["tiny-qwen3"].save_pretrained(str(out3))
    model3, _ = load_model(out3, torch.float32, "cpu")
    (ours3,) = PagedRunner(model3).step([(0, ids, 0)])
    torch.testing.assert_close(ours3, hf_logits(hf_models["tiny-qwen3"], ids), atol=ATOL, rtol=0)


def test_tokenizer_loads(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["tiny-qwen3"])
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


# ----------------------------------------------------------------------------- loader errors

@pytest.fixture
def broken(tiny_dirs, tmp_path):
    """A fresh copy of a tiny checkpoint to damage."""
    def copy(name: str = "tiny-qwen3"):
        dst = tmp_path / f"broken-{name}"
        shutil.copytree(tiny_dirs[name], dst)
        return dst
    return copy


def _rewrite(file, edit):
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_error_missing_weights(broken):
    d = broken()
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load_model(d, torch.float32, "cpu")


def test_error_unsupported_architecture(broken):
    d = broken()
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel.*Qwen3ForCausalLM"):
        load_model(d, torch.float32, "cpu")


def test_error_missing_config(broken):
    d = broken()
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_model(d, torch.float32, "cpu")


def test_error_missing_tensor(broken):
    d = broken()
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_model(d, torch.float32, "cpu")


def test_error_unexpected_tensor(broken):
    d = broken()
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.mystery\.weight"):
        load_model(d, torch.float32, "cpu")


def test_error_shape_mismatch(broken):
    d = broken()
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.norm\.weight.*\[65\].*\[64\]"):
        load_model(d, torch.float32, "cpu")


def test_error_index_names_missing_shard(broken):
    d = broken("tiny-llama")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors"):
        load_model(d, torch.float32, "cpu")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_safetensors(broken, damage):
    d = broken()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt.*model\.safetensors"):
        load_model(d, torch.float32, "cpu")


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope", torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("./definitely/not/here")


def test_hub_id_from_local_cache_only(tiny_dirs, tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the local HF cache; an uncached one is an error
    (local_files_only: nothing is downloaded)."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    repo = cache / "models--kvray-test--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dirs["tiny-qwen3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("kvray-test/tiny-qwen3") == repo / "snapshots" / commit
    model, _ = load_model("kvray-test/tiny-qwen3", "auto", "cpu")
    assert model.dtype == torch.float32
    with pytest.raises(ValueError, match=r"'kvray-test/absent' does not exist.*Hugging Face cache"):
        resolve_model("kvray-test/absent")


def test_error_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*tiny-qwen3"):
        resolve_model("kvray:nope")
