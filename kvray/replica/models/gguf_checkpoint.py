"""GGUF checkpoints (llama.cpp's single-file format), read with the ``gguf`` library.

A GGUF file carries the config (``<arch>.*`` metadata keys), the tokenizer and chat template
(``tokenizer.*``) and the weights, each tensor in its own type. kvray turns it into what a
Hugging Face checkpoint gives the loader:

* :func:`gguf_config` -> the ``config.json`` contents (architecture, shapes, rope, token ids);
* :func:`iter_gguf_tensors` -> ``(transformers name, float32 tensor)`` pairs: every tensor
  dequantized (``gguf.quants.dequantize``) and renamed; for llama-arch files the q/k rows are put
  back in Hugging Face order (llama.cpp's converter interleaves each head's two rotary halves);
* :func:`load_gguf_tokenizer` -> transformers' tokenizer built from the file (``gguf_file=``).

The weights are dequantized at load: a model takes the memory of its engine dtype, not of the
file (a Q4_1 file becomes about 8x its size in float32, 4x in bfloat16). Everything that can be
wrong with a file (not GGUF, truncated, an architecture or tensor type kvray cannot run) is a
``ValueError`` naming the file and the problem, raised by :func:`open_gguf` before any weight is
read.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_SUFFIX = ".gguf"
# GGUF general.architecture -> (transformers architecture, model_type)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                 "qwen3": ("Qwen3ForCausalLM", "qwen3")}
# tensor types kvray dequantizes (each is tested against transformers on files GGUFWriter writes)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# per-layer tensors: GGUF name -> transformers name under model.layers.N.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# general.file_type (llama_ftype) -> the dtype "auto" picks on a GPU; any quantized file: bfloat16
_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX and Path(path).is_file()


def gguf_in_dir(path: Path) -> Path | None:
    """The one ``*.gguf`` file of a directory (None if it has none); ValueError if it has several."""
    files = sorted(p for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
    if len(files) > 1:
        raise ValueError(f"directory {str(path)!r} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                         "name the one to load (kvray loads single-file GGUF checkpoints)")
    return files[0] if files else None


@dataclass(frozen=True)
class GGUFFile:
    """An opened, checked GGUF file: its path, its gguf reader and its architecture key."""
    path: Path
    reader: object  # gguf.GGUFReader
    arch: str

    def value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_value(self, key: str, default=None):
        return self.value(f"{self.arch}.{key}", default)

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read and check a GGUF file's header (cached per file version; the tensors stay on disk,
    memory-mapped). ValueError naming the file for anything kvray cannot load."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {e}") from None
    return _open(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, unknown type id, ...: all "not a GGUF we can read"
        raise ValueError(f"cannot read GGUF file {path!r} (corrupt or truncated): {_reason(e)}") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"GGUF file {path!r} is truncated: tensor {t.name!r} ends at byte "
                             f"{t.data_offset + t.n_bytes}, the file has {size}")
    file = GGUFFile(Path(path), reader, _architecture(reader, path))
    splits = file.value("split.count", 1)
    if splits > 1:
        raise ValueError(f"GGUF file {path!r} is one of {splits} split files; kvray loads single-file GGUF "
                         "checkpoints (merge them first with llama.cpp's gguf-split --merge)")
    bad = {t.name: t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES}
    if bad:
        name, qtype = next(iter(bad.items()))
        raise ValueError(f"GGUF file {path!r}: tensor {name!r} has quantization type {qtype}, which kvray cannot load "
                         f"({len(bad)} tensor(s) of types {', '.join(sorted(set(bad.values())))}); supported types: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return file


def _reason(e: Exception) -> str:
    text = str(e)
    found = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", text)
    if found:
        return f"a tensor has unknown quantization type id {found.group(1)} (not a GGML type this gguf library knows)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _architecture(reader, path: str) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"GGUF file {path!r} has no general.architecture")
    arch = field.contents()
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF file {path!r}: unsupported architecture {arch!r}; kvray runs "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


# ----------------------------------------------------------------------------- config

def _required(f: GGUFFile, key: str):
    value = f.arch_value(key)
    if value is None:
        raise ValueError(f"GGUF file {str(f.path)!r} has no {f.arch}.{key}")
    return value


def _check_rope(f: GGUFFile, head_dim: int) -> None:
    scaling = f.arch_value("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF file {str(f.path)!r}: unsupported rope scaling {f.arch}.rope.scaling.type={scaling!r}")
    if "rope_freqs.weight" in f.tensor_names():
        raise ValueError(f"GGUF file {str(f.path)!r}: unsupported rope scaling (a rope_freqs.weight tensor, "
                         "llama3-style); kvray reads rope scaling from a Hugging Face config.json only")
    rope_dim = f.arch_value("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"GGUF file {str(f.path)!r}: {f.arch}.rope.dimension_count={rope_dim} differs from the "
                         f"head dim {head_dim} (partial rotary embeddings are not supported for {f.arch})")


def _token_ids(f: GGUFFile) -> dict:
    ids = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        value = f.value(f"tokenizer.ggml.{key}")
        if value is not None:
            ids[hf_key] = int(value)
    eos = [int(v) for v in (f.value("tokenizer.ggml.eos_token_id"), f.value("tokenizer.ggml.eot_token_id"))
           if v is not None]
    eos = list(dict.fromkeys(eos))
    if eos:
        ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return ids


def gguf_config(path: str | os.PathLike) -> dict:
    """The Hugging Face ``config.json`` contents that describe the GGUF file's model."""
    f = open_gguf(path)
    arch_name, model_type = ARCHITECTURES[f.arch]
    heads = int(_required(f, "attention.head_count"))
    hidden = int(_required(f, "embedding_length"))
    head_dim = int(f.arch_value("attention.key_length", hidden // heads))
    _check_rope(f, head_dim)
    names = f.tensor_names()
    embed = next(t for t in f.reader.tensors if t.name == "token_embd.weight") if "token_embd.weight" in names else None
    if embed is None:
        raise ValueError(f"GGUF file {str(f.path)!r} has no token_embd.weight tensor")
    bias = "blk.0.attn_q.bias" in names
    cfg = {
        "architectures": [arch_name], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": int(_required(f, "feed_forward_length")),
        "num_hidden_layers": int(_required(f, "block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(f.arch_value("attention.head_count_kv", heads)), "head_dim": head_dim,
        "vocab_size": int(embed.shape[1]), "max_position_embeddings": int(_required(f, "context_length")),
        "rms_norm_eps": float(_required(f, "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(f.arch_value("rope.freq_base", 10000.0)), "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": _FILE_TYPE_DTYPE.get(f.value("general.file_type"), "bfloat16"),
        **_token_ids(f),
    }
    if model_type == "llama":
        cfg.update(attention_bias=bias, mlp_bias="blk.0.ffn_up.bias" in names)
    elif model_type == "qwen3":
        cfg.update(attention_bias=bias)
    if model_type != "llama":
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


# ----------------------------------------------------------------------------- weights

def hf_tensor_name(gguf_name: str) -> str:
    """The transformers name of a GGUF tensor (a name kvray does not know comes back unchanged,
    so the loader reports it as unexpected)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k reordering: within each head its converter stores the rows of the two
    rotary halves interleaved (``r0, r(d/2), r1, r(d/2+1), ...``); Hugging Face keeps them as
    halves. Works for weights [heads*d, in] and biases [heads*d]."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (the inverse of :func:`unpermute_rows`)."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantized(t) -> torch.Tensor:
    from gguf.quants import dequantize
    values = dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if not values.flags.writeable:  # an F32 tensor comes back as the read-only memory map itself
        values = values.copy()
    return torch.from_numpy(values)


def iter_gguf_tensors(path: str | os.PathLike):
    """Yield ``(transformers name, float32 tensor)`` for every tensor of the file, dequantized,
    with llama's q/k rows back in Hugging Face order."""
    f = open_gguf(path)
    heads = int(_required(f, "attention.head_count"))
    kv_heads = int(f.arch_value("attention.head_count_kv", heads))
    for t in f.reader.tensors:
        name = hf_tensor_name(t.name)
        try:
            tensor = _dequantized(t)
        except Exception as e:  # a block layout that does not fit the tensor's shape: a garbled file
            raise ValueError(f"GGUF file {str(f.path)!r}: cannot dequantize tensor {t.name!r} "
                             f"({t.tensor_type.name}): {e}") from None
        if f.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute_rows(tensor, heads)
        elif f.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute_rows(tensor, kv_heads)
        yield name, tensor


# ----------------------------------------------------------------------------- tokenizer

def load_gguf_tokenizer(path: str | os.PathLike):
    """transformers' tokenizer (with the chat template) built from the GGUF file's vocabulary."""
    f = open_gguf(path)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name)
    except Exception as e:  # transformers raises many types for a vocabulary it cannot convert
        raise ValueError(f"cannot build a tokenizer from GGUF file {str(f.path)!r}: {type(e).__name__}: {e}") from None
