"""GGUF checkpoints: files that gguf's GGUFWriter writes from random tiny models, in every tensor
type kvray supports and each architecture it runs, load in kvray and in transformers with equal
greedy tokens; broken files are ValueErrors naming the file and the problem, which
``kvray check-config`` reports before deploy."""
from __future__ import annotations

import re
import struct

import pytest
import torch
import yaml
from gguf_files import ARCH_CONFIGS, llama_cpp_permute, write_gguf

from kvray import LLM, SamplingParams
from kvray.replica.models import gguf_checkpoint as gc
from kvray.replica.models.loader import load_config, load_model, resolve_model
from tests.conftest import hf_greedy, random_prompts

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
CASES = [(arch, qtype) for arch in ARCH_CONFIGS for qtype in TYPES]


def _tied(arch: str, qtype: str) -> bool:
    return (TYPES.index(qtype) + len(arch)) % 2 == 0  # half the files tied, half with output.weight


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_greedy_tokens_equal_transformers(arch, qtype, tmp_path):
    from transformers import AutoModelForCausalLM
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", arch, qtype, seed=len(arch) + TYPES.index(qtype),
                      tie=_tied(arch, qtype))
    assert gc.open_gguf(path).reader.tensors[1].tensor_type.name in (qtype, "F32")
    llm = LLM(str(path), device="cpu", max_model_len=256, num_kv_blocks=32)
    assert llm.engine.hf_config.tie_word_embeddings == _tied(arch, qtype)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = random_prompts(1000, [2, 23, 70], seed=TYPES.index(qtype))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 10, llm.engine.eos_token_ids), (arch, qtype, len(prompt))


def test_llama_rows_are_put_back_in_hugging_face_order():
    w = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 4))
    assert not torch.equal(permuted, w)
    assert torch.equal(gc.unpermute_rows(permuted, 4), w)
    assert torch.equal(gc.permute_rows(w, 4), permuted)
    bias = torch.arange(32.0)
    assert torch.equal(gc.unpermute_rows(torch.from_numpy(llama_cpp_permute(bias.numpy(), 2)), 2), bias)


def test_config_tokenizer_and_chat_template_come_from_the_metadata(tmp_path):
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", "Q8_0", tie=True)
    cfg = load_config(path)
    assert cfg.architectures == ["Qwen3ForCausalLM"] and cfg.head_dim == 128 and cfg.num_key_value_heads == 2
    assert cfg.hidden_size == 64 and cfg.vocab_size == 1024 and cfg.tie_word_embeddings
    llm = LLM(str(path), device="cpu", max_model_len=128, num_kv_blocks=16)
    tok = llm.engine.tokenizer
    assert tok.convert_ids_to_tokens(sorted(llm.engine.eos_token_ids)) == ["<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), text


def test_a_directory_holding_one_gguf_loads_it(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "qwen2", "F16")
    assert resolve_model(tmp_path) == path
    model, cfg = load_model(tmp_path, torch.float32)
    assert cfg.architectures == ["Qwen2ForCausalLM"] and model.model.layers[0].self_attn is not None
    write_gguf(tmp_path / "other.gguf", "qwen2", "F32")
    with pytest.raises(ValueError, match="holds 2 GGUF files .*model.gguf, other.gguf.*name the one"):
        resolve_model(tmp_path)


def test_bf16_engine_dtype_dequantizes_to_bf16(tmp_path):
    path = write_gguf(tmp_path / "l.gguf", "llama", "Q4_0")
    fp32, _ = load_model(path, torch.float32)
    bf16, _ = load_model(path, torch.bfloat16)
    a, b = fp32.model.layers[1].mlp.down_proj.weight, bf16.model.layers[1].mlp.down_proj.weight
    assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
    assert load_config(path).torch_dtype in ("bfloat16", torch.bfloat16)  # what "auto" picks on a GPU


# ---- broken files ---------------------------------------------------------------------------

def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of a tensor's type id in the header: u64 name length, name, u32 n_dims, u64 dims, u32 type."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


def _unknown_type(tmp_path):
    path = write_gguf(tmp_path / "unknown-type.gguf", "llama", "Q8_0")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _tensor_type_offset(bytes(data), "blk.0.attn_q.weight"), 99)
    path.write_bytes(bytes(data))
    return path, r"unknown-type\.gguf.*unknown quantization type id 99"


def _unsupported_type(tmp_path):
    return write_gguf(tmp_path / "mxfp4.gguf", "qwen2", "MXFP4"), \
        r"mxfp4\.gguf.*tensor 'token_embd\.weight' has quantization type MXFP4, which kvray cannot load.*supported types: F32"


def _truncated(tmp_path):
    path = write_gguf(tmp_path / "truncated.gguf", "qwen3", "Q4_1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, r"truncated\.gguf.*(corrupt or truncated|is truncated)"


def _header_cut(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", "qwen3", "F16")
    path.write_bytes(path.read_bytes()[:300])
    return path, r"cannot read GGUF file .*cut\.gguf.* \(corrupt or truncated\)"


def _not_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a gguf file" * 100)
    return path, r"garbage\.gguf.* \(corrupt or truncated\): ValueError: GGUF magic invalid"


def _unsupported_arch(tmp_path):
    import gguf
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, r"gemma\.gguf.*unsupported architecture 'gemma'; kvray runs llama, qwen2, qwen3"


BROKEN = [_unknown_type, _unsupported_type, _truncated, _header_cut, _not_gguf, _unsupported_arch]


@pytest.mark.parametrize("make", BROKEN, ids=[f.__name__.strip("_") for f in BROKEN])
def test_a_broken_gguf_is_a_value_error_naming_the_file_and_problem(make, tmp_path):
    path, pattern = make(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_model(path, torch.float32)
    with pytest.raises(ValueError, match=pattern):
        LLM(str(path), device="cpu")


@pytest.mark.parametrize("make", BROKEN, ids=[f.__name__.strip("_") for f in BROKEN])
def test_check_config_reports_a_broken_gguf(make, tmp_path, capsys):
    pytest.importorskip("ray")
    from kvray.cli import main
    from tests.serve_app import local_config
    path, pattern = make(tmp_path)
    cfg = local_config()
    cfg["applications"][0]["args"]["model"] = str(path)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "applications[0] (kvray): args.model: " in err
    assert re.search(pattern, err), err


def test_check_config_accepts_a_good_gguf_and_names_an_unknown_preset(tmp_path, capsys):
    pytest.importorskip("ray")
    from kvray.cli import main
    from tests.serve_app import local_config
    cfg = local_config()
    cfg["applications"][0]["args"]["model"] = str(write_gguf(tmp_path / "ok.gguf", "llama", "Q4_1"))
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(config)]) == 0
    cfg["applications"][0]["args"]["model"] = "kvray:smollm3-7b"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(config)]) == 1
    assert "args.model: unknown preset 'smollm3-7b'; known presets: " in capsys.readouterr().err
