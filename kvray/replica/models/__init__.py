"""Decoder models (Llama, Qwen2, Qwen3; Qwen3-MoE, Mixtral), the checkpoint loader and the built-in presets."""
from kvray.replica.models.decoder import DecoderForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from kvray.replica.models.layers import Attention
from kvray.replica.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from kvray.replica.models.registry import MODEL_REGISTRY
from kvray.replica.models.loader import (load_config, load_model, load_tokenizer, resolve_dtype, resolve_model)
from kvray.replica.models.presets import PRESETS, ensure_preset, get_preset, make_checkpoint

__all__ = [
    "Attention", "DecoderForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "MODEL_REGISTRY",
    "load_config", "load_model", "load_tokenizer", "resolve_dtype", "resolve_model",
    "PRESETS", "ensure_preset", "get_preset", "make_checkpoint",
]
