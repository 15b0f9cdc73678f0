"""Built-in ``kvray:<name>`` presets: deterministic random-weight checkpoints in the Hugging Face
layout (config.json, generation_config.json, model.safetensors or shards plus
model.safetensors.index.json, and a real BPE tokenizer with a chat template).

Weights: the tensor names and shapes are those of the model's checkpoint layout for the config
(built on the meta device, so nothing is allocated: the parameters themselves, or one tensor per
expert and projection for MoE models, as save_pretrained writes them; tests check that transformers
loads them); each tensor is drawn from a
``torch.Generator`` seeded from the preset seed and the tensor's name, straight in the preset's
dtype, one tensor at a time. Matrices are N(0, 0.02²); RMSNorm weights 1 + 0.1·N(0, 1), so a loader
that ignored them would be caught; biases 0.1·N(0, 1).

``ensure_preset`` generates a preset once into ``$KVRAY_CACHE_DIR`` (default
``~/.cache/kvray/presets``) under ``<name>-<version>``; the version hashes the preset's whole
definition, so changing a preset invalidates old caches. Generation writes to a temporary
directory and renames it into place, so racing processes are safe.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kvray.replica.models import fp8_checkpoint
from kvray.replica.models.bpe import LLAMA3_TOKENIZER, QWEN_TOKENIZER, TokenizerSpec, write_tokenizer
from kvray.replica.models.cache import kvray_cache_dir

GENERATOR_VERSION = 1  # bump when the weight-generation code changes


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict                  # config.json contents, minus the token ids (filled from the tokenizer)
    tokenizer: TokenizerSpec
    max_shard_size: int | None = None   # bytes; None writes a single model.safetensors
    seed: int = 0
    quant: str | None = None      # an FP8 checkpoint format of kvray.replica.models.fp8_checkpoint

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config["torch_dtype"])

    def version(self) -> str:
        blob = json.dumps({"generator": GENERATOR_VERSION, "config": self.config, "seed": self.seed,
                           "max_shard_size": self.max_shard_size, "tokenizer": self.tokenizer.fingerprint(),
                           **({"quant": self.quant} if self.quant else {})}, sort_keys=True)
        return f"v{GENERATOR_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _tiny(arch: str, model_type: str, **overrides) -> dict:
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_size": 64, "intermediate_size": 192,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "attention_dropout": 0.0, "initializer_range": 0.2, "torch_dtype": "float32", "use_cache": True}
    cfg.update(overrides)
    return cfg


_QWEN_EXTRA = {"use_sliding_window": False, "sliding_window": None}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny-llama", "2-layer Llama, GQA 4/2, llama3 rope scaling (original context 64), untied, 3 shards",
           _tiny("LlamaForCausalLM", "llama", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                 rope_theta=10000.0, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
           LLAMA3_TOKENIZER, max_shard_size=400_000, seed=1),
    Preset("tiny-qwen2", "2-layer Qwen2, GQA 4/2, q/k/v bias, untied",
           _tiny("Qwen2ForCausalLM", "qwen2", rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
                 max_window_layers=2, **_QWEN_EXTRA),
           QWEN_TOKENIZER, seed=2),
    Preset("tiny-qwen3", "2-layer Qwen3, GQA 4/2, q/k RMSNorm, tied embeddings",
           _tiny("Qwen3ForCausalLM", "qwen3", rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True,
                 attention_bias=False, max_window_layers=2, **_QWEN_EXTRA),
           QWEN_TOKENIZER, seed=3),
    Preset("qwen3-0.6b", "Qwen3-0.6B shapes (28 layers, hidden 1024, vocab 151936), bf16, random weights",
           {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
            "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "rope_theta": 1000000.0,
            "rope_scaling": None, "tie_word_embeddings": True, "max_window_layers": 28, "initializer_range": 0.02,
            "torch_dtype": "bfloat16", "use_cache": True, **_QWEN_EXTRA},
           QWEN_TOKENIZER, max_shard_size=1_000_000_000, seed=4),
    Preset("llama-3.2-1b", "Llama-3.2-1B shapes (16 layers, hidden 2048, vocab 128256), bf16, random weights",
           {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": True, "initializer_range": 0.02, "pretraining_tp": 1,
            "torch_dtype": "bfloat16", "use_cache": True},
           LLAMA3_TOKENIZER, max_shard_size=1_000_000_000, seed=5),
    # ---- mixture of experts (docs/moe.md) ----
    Preset("tiny-qwen3-moe", "3-layer Qwen3-MoE, 8 experts top-4 (no renormalisation), dense layer 0, GQA 4/2, q/k RMSNorm",
           _tiny("Qwen3MoeForCausalLM", "qwen3_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=4,
                 moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
                 rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
                 router_aux_loss_coef=0.001, output_router_logits=False, **_QWEN_EXTRA),
           QWEN_TOKENIZER, seed=6),
    Preset("tiny-mixtral", "2-layer Mixtral, 4 experts top-2, GQA 4/2, untied",
           _tiny("MixtralForCausalLM", "mixtral", intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                 rms_norm_eps=1e-5, rope_theta=1000000.0, rope_scaling=None, sliding_window=None,
                 tie_word_embeddings=False, router_jitter_noise=0.0, router_aux_loss_coef=0.001,
                 output_router_logits=False),
           LLAMA3_TOKENIZER, seed=7),
    Preset("qwen3-30b-a3b", "Qwen3-30B-A3B shapes (48 layers, hidden 2048, 128 experts top-8 of width 768, vocab "
           "151936), bf16, random weights (~61 GB)",
           {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
            "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
            "max_position_embeddings": 40960, "max_window_layers": 48, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "rope_theta": 1000000.0, "rope_scaling": None,
            "tie_word_embeddings": False, "initializer_range": 0.02, "router_aux_loss_coef": 0.001,
            "output_router_logits": False, "torch_dtype": "bfloat16", "use_cache": True, **_QWEN_EXTRA},
           QWEN_TOKENIZER, max_shard_size=1_000_000_000, seed=8),
]}

# ---- the 8B reference model and FP8 variants (issue 26) -------------------------------------------
# ``<base>-fp8-block`` / ``<base>-fp8-dynamic``: the base preset's weights (same seed, same names, so
# the same values), linear layers written in the Hugging Face block-FP8 / compressed-tensors
# FP8-dynamic format (kvray.replica.models.fp8_checkpoint).
_LLAMA_31_8B = Preset(
    "llama-3.1-8b", "Llama-3.1-8B shapes (32 layers, hidden 4096, GQA 32/8, vocab 128256, untied), bf16, random "
    "weights", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                "tie_word_embeddings": False, "initializer_range": 0.02, "pretraining_tp": 1,
                "torch_dtype": "bfloat16", "use_cache": True},
    LLAMA3_TOKENIZER, max_shard_size=1_000_000_000, seed=6)
PRESETS[_LLAMA_31_8B.name] = _LLAMA_31_8B
for _base, _fmt in [("tiny-llama", "fp8-block"), ("tiny-llama", "fp8-dynamic"), ("tiny-qwen3", "fp8-block"),
                    ("tiny-qwen3", "fp8-dynamic"), ("llama-3.1-8b", "fp8-block"), ("llama-3.1-8b", "fp8-dynamic")]:
    _b = PRESETS[_base]
    PRESETS[f"{_base}-{_fmt}"] = dataclasses.replace(
        _b, name=f"{_base}-{_fmt}", description=f"{_base} in {_fmt} ({fp8_checkpoint.describe(_fmt)})", quant=_fmt)


def get_preset(name: str) -> Preset:
    name = name.removeprefix("kvray:")
    if name not in PRESETS:
        from kvray.replica.models.real_presets import REAL_PRESETS
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join([*PRESETS, *REAL_PRESETS])}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- files

def token_ids(preset: Preset) -> dict:
    """bos / eos / pad ids as written to config.json and generation_config.json."""
    tok = preset.tokenizer
    if tok.family == "qwen":
        eot = tok.token_id("<|endoftext|>")
        return {"config": {"bos_token_id": eot, "eos_token_id": tok.token_id("<|im_end|>"), "pad_token_id": eot},
                "generation": {"bos_token_id": eot, "eos_token_id": [tok.token_id("<|im_end|>"), eot],
                               "pad_token_id": eot}}
    bos = tok.token_id("<|begin_of_text|>")
    eos = [tok.token_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    return {"config": {"bos_token_id": bos, "eos_token_id": eos},
            "generation": {"bos_token_id": bos, "eos_token_id": eos}}


def config_dict(preset: Preset) -> dict:
    # a deep copy: transformers edits nested dicts (rope_scaling) of the kwargs it is given
    quant = {"quantization_config": fp8_checkpoint.quantization_config(preset.quant)} if preset.quant else {}
    return copy.deepcopy(dict(sorted({**preset.config, **token_ids(preset)["config"], **quant}.items())))


def hf_config(preset: Preset | str):
    """The transformers config object of a preset (no files written)."""
    from transformers import AutoConfig
    preset = get_preset(preset) if isinstance(preset, str) else preset
    cfg = config_dict(preset)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _meta_model(preset: Preset):
    """kvray's model for the preset's config on the meta device (no memory, no transformers import)."""
    from kvray.replica.models.registry import MODEL_REGISTRY
    cfg = types.SimpleNamespace(**config_dict(preset))
    return MODEL_REGISTRY[cfg.architectures[0]](cfg, dtype=preset.dtype, device=torch.device("meta"))


def parameter_shapes(preset: Preset | str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of kvray's model for the config. The names and shapes are
    transformers' (tests check this for every preset; MoE experts stacked as in transformers 5);
    a tied lm_head.weight is left out."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    return {name: tuple(p.shape) for name, p in _meta_model(preset).named_parameters()}


def checkpoint_shapes(preset: Preset | str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of what the checkpoint holds: the model's ``checkpoint_layout`` (the
    parameters themselves for dense models; one tensor per expert and projection for MoE models,
    as save_pretrained writes them). A tied lm_head.weight is left out, as save_pretrained does."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model = _meta_model(preset)
    params = dict(model.named_parameters())
    return {name: tuple((params[s.param][s.index] if s.index else params[s.param]).shape)
            for name, s in model.checkpoint_layout().items()}


def _tensor_seed(preset: Preset, name: str) -> int:
    digest = hashlib.sha256(f"kvray-preset:{preset.seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_tensor(preset: Preset, name: str, shape: tuple[int, ...], chunk: int = 1 << 22) -> torch.Tensor:
    """The deterministic value of one tensor, drawn in float32 chunks and stored in the preset dtype.
    The values depend only on the preset seed and the name (any chunk size that is a multiple of
    16 draws the same numbers), so tensors can be generated in any order, in parallel."""
    gen = torch.Generator().manual_seed(_tensor_seed(preset, name))
    out = torch.empty(shape, dtype=preset.dtype)
    flat = out.view(-1)
    if name.endswith("norm.weight"):
        scale, offset = 0.1, 1.0
    elif len(shape) == 1:
        scale, offset = 0.1, 0.0
    else:
        scale, offset = float(preset.config.get("initializer_range", 0.02)), 0.0
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        flat[start:start + n] = torch.randn(n, generator=gen).mul_(scale).add_(offset)
    return out


def _plan_shards(preset: Preset, shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    itemsize = torch.empty((), dtype=preset.dtype).element_size()
    shards, current, size = [], [], 0
    for name in sorted(shapes):
        nbytes = itemsize * int(torch.Size(shapes[name]).numel())
        if current and preset.max_shard_size is not None and size + nbytes > preset.max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def _generate(preset: Preset, names: list[str], shapes: dict[str, tuple[int, ...]], workers: int
              ) -> dict[str, torch.Tensor]:
    """The shard's tensors as the checkpoint stores them (FP8 presets: their linear weights
    quantized in the preset's format, with their scales)."""
    # one generator per tensor, so threads (torch releases the GIL) cannot change the values
    if workers <= 1:
        tensors = {n: make_tensor(preset, n, shapes[n]) for n in names}
    else:
        with ThreadPoolExecutor(workers) as pool:
            tensors = dict(zip(names, pool.map(lambda n: make_tensor(preset, n, shapes[n]), names)))
    if preset.quant:
        tensors = fp8_checkpoint.quantize_tensors(preset.quant, tensors,
                                                  fp8_checkpoint.linear_weight_names(preset.config))
    return tensors


def _write_weights(preset: Preset, out_dir: Path) -> None:
    """The weights, one shard per task: with many shards (the big presets), up to one shard per
    core is generated and written at once, each by its own thread, so drawing the numbers and
    writing the files overlap (memory: about two shards per thread)."""
    from safetensors.torch import save_file
    shapes = checkpoint_shapes(preset)
    shards = _plan_shards(preset, shapes)
    cores = os.cpu_count() or 1
    if len(shards) == 1:
        tensors = _generate(preset, shards[0], shapes, min(8, cores))
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    parallel = max(1, min(cores, 16, len(shards)))

    def write(i: int) -> dict[str, int]:
        tensors = _generate(preset, shards[i], shapes, 1 if parallel > 1 else min(8, cores))
        save_file(tensors, str(out_dir / files[i]), metadata={"format": "pt"})
        return {name: t.numel() * t.element_size() for name, t in tensors.items()}  # scales of FP8 presets too

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1 if parallel > 1 else intra_op)  # the shards are the parallelism: no oversubscription
    try:
        with ThreadPoolExecutor(parallel) as pool:
            written = list(pool.map(write, range(len(shards))))
    finally:
        torch.set_num_threads(intra_op)
    weight_map = {name: files[i] for i, sizes in enumerate(written) for name in sizes}
    total = sum(sum(sizes.values()) for sizes in written)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_checkpoint(preset: Preset | str, out_dir: str | os.PathLike) -> Path:
    """Write the preset's checkpoint into ``out_dir`` (created if needed) and return it."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config_dict(preset))
    _write_json(out_dir / "generation_config.json", token_ids(preset)["generation"])
    write_tokenizer(preset.tokenizer, out_dir, model_max_length=preset.config["max_position_embeddings"])
    _write_weights(preset, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- cache

def cache_root() -> Path:
    return kvray_cache_dir() / "presets"


def preset_cache_dir(name: str) -> Path:
    preset = get_preset(name)
    return cache_root() / f"{preset.name}-{preset.version()}"


def ensure_preset(name: str) -> Path:
    """The cache directory of preset ``name``, generating it first if needed (atomically)."""
    final = preset_cache_dir(name)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        make_checkpoint(name, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
