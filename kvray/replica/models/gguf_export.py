"""Write a GGUF checkpoint as a Hugging Face safetensors checkpoint directory: config.json,
generation_config.json, the tokenizer files (with the chat template) and model.safetensors.

The weights are the dequantized values, in float32 (exactly what kvray computes with when it
loads the GGUF in float32), under transformers' names, so kvray and transformers both load the
directory. ``kvray make-checkpoint --preset smollm2-135m-instruct --out DIR`` runs this."""
from __future__ import annotations

import os
from pathlib import Path

from kvray.replica.models.gguf_checkpoint import gguf_config, iter_gguf_tensors, load_gguf_tokenizer


def write_hf_checkpoint(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert ``gguf_file`` into ``out_dir`` (created if needed); returns ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**gguf_config(gguf_file), "torch_dtype": "float32"}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.save_pretrained(str(out_dir))
    GenerationConfig(**{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
                     ).save_pretrained(str(out_dir))
    load_gguf_tokenizer(gguf_file).save_pretrained(str(out_dir))
    tensors = {name: t.contiguous() for name, t in iter_gguf_tensors(gguf_file)}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
