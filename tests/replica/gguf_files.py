"""Write small GGUF files for the tests with the ``gguf`` library's own GGUFWriter, the way
llama.cpp's converter lays them out: names from gguf's TensorNameMap, llama's q/k rows interleaved
per head, 1-D tensors in F32 and every matrix in the requested type, the tokenizer (a preset's
byte-level BPE, with its chat template) in the ``tokenizer.ggml.*`` keys.

Nothing here comes from kvray's GGUF reader: the tests load these files with kvray and with
transformers and compare the two."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# tiny shapes of each architecture; qwen3's head_dim differs from hidden/heads as in the real models
ARCH_CONFIGS = {
    "llama": dict(hidden=64, ffn=192, layers=2, heads=4, kv_heads=2, head_dim=16, theta=10000.0, eps=1e-5),
    "qwen2": dict(hidden=64, ffn=192, layers=2, heads=4, kv_heads=2, head_dim=16, theta=1000000.0, eps=1e-6),
    "qwen3": dict(hidden=64, ffn=192, layers=2, heads=4, kv_heads=2, head_dim=128, theta=1000000.0, eps=1e-6),
}
HF_CONFIG = {
    "llama": ("llama", dict(attention_bias=False, mlp_bias=False)),
    "qwen2": ("qwen2", dict()),
    "qwen3": ("qwen3", dict(attention_bias=False)),
}
VOCAB = 1024
CONTEXT = 4096
# general.file_type (llama.cpp's llama_ftype) of a file whose matrices are of the type
FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}


def hf_config(arch: str, tie: bool):
    from transformers import AutoConfig
    c = ARCH_CONFIGS[arch]
    model_type, extra = HF_CONFIG[arch]
    return AutoConfig.for_model(model_type, hidden_size=c["hidden"], intermediate_size=c["ffn"],
                                num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], vocab_size=VOCAB,
                                max_position_embeddings=CONTEXT, rms_norm_eps=c["eps"], rope_theta=c["theta"],
                                tie_word_embeddings=tie, **extra)


def random_weights(arch: str, tie: bool, seed: int) -> dict[str, torch.Tensor]:
    """transformers' parameter names and shapes for the config, random values: matrices N(0, 0.2²)
    (large enough that greedy tokens are not near-ties), norms 1 + 0.1·N(0, 1), biases 0.1·N(0, 1)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch, tie))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        x = torch.randn(tuple(p.shape), generator=gen)
        out[name] = 1 + 0.1 * x if name.endswith("norm.weight") else (0.1 * x if p.dim() == 1 else 0.2 * x)
    return out


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's reordering of llama q/k rows (each head's rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(arch: str) -> dict:
    import tempfile

    from kvray.replica.models.bpe import LLAMA3_TOKENIZER, QWEN_TOKENIZER, write_tokenizer
    spec = LLAMA3_TOKENIZER if arch == "llama" else QWEN_TOKENIZER
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(spec, Path(d), model_max_length=CONTEXT)
        tok = json.loads((Path(d) / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == VOCAB and [vocab[t] for t in tokens] == list(range(VOCAB))
    specials = set(spec.special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {"spec": spec, "tokens": tokens, "types": [3 if t in specials else 1 for t in tokens], "merges": merges}


def write_gguf(path: Path, arch: str, qtype: str, seed: int = 0, tie: bool = False) -> Path:
    """A random tiny ``arch`` model as a GGUF file whose matrices are of type ``qtype``."""
    import gguf
    from gguf import GGMLQuantizationType as T
    c = ARCH_CONFIGS[arch]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{qtype}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_block_count(c["layers"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_vocab_size(VOCAB)
    tok = _tokenizer_fields(arch)
    spec = tok["spec"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    if spec.bos_token:
        w.add_bos_token_id(spec.token_id(spec.bos_token))
    w.add_eos_token_id(spec.token_id(spec.eos_token))
    w.add_pad_token_id(spec.token_id(spec.pad_token))
    w.add_add_bos_token(spec.add_bos)
    w.add_chat_template(spec.chat_template)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c["layers"])
    kind = T[qtype]
    for hf_name, value in random_weights(arch, tie, seed).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = value.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_cpp_permute(data, c["heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_cpp_permute(data, c["kv_heads"])
        if data.ndim == 1 or kind == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.add_file_type(FILE_TYPES.get(qtype, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
