"""Writing FP8 checkpoints: the linear weights of an unquantized checkpoint's tensors quantized
into one of the two on-disk formats kvray loads (the FP8 presets and the tests use this; no test
needs a download).

* ``fp8-block``: Hugging Face ``quant_method: "fp8"``: e4m3 weights, one float32
  ``weight_scale_inv`` per 128x128 tile (the name is historical: the weight is ``weight_fp8 *
  weight_scale_inv``), dynamic activations; ``lm_head`` left out (``modules_to_not_convert``).
* ``fp8-dynamic``: compressed-tensors ``float-quantized``: e4m3 weights, one float32
  ``weight_scale`` [N, 1] per output channel, dynamic per-token activations; ``ignore: [lm_head]``.

Which tensors are linear weights comes from kvray's model for the config (built on the meta
device): every ``Linear`` but ``lm_head``.
"""
from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import torch

from kvray.replica.models.linear import Linear
from kvray.replica.models.quantization import quantize_blockwise, quantize_per_channel

FORMATS = ("fp8-block", "fp8-dynamic")
BLOCK = (128, 128)


def quantization_config(fmt: str) -> dict:
    """config.json's ``quantization_config`` for ``fmt``."""
    if fmt == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(BLOCK), "modules_to_not_convert": ["lm_head"]}
    if fmt == "fp8-dynamic":
        fp8 = {"type": "float", "num_bits": 8, "symmetric": True, "group_size": None, "block_structure": None,
               "actorder": None, "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "output_activations": None,
                    "weights": {**fp8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                    "input_activations": {**fp8, "strategy": "token", "dynamic": True, "observer": None}}}}
    raise ValueError(f"unknown FP8 checkpoint format {fmt!r}; one of {', '.join(FORMATS)}")


def describe(fmt: str) -> str:
    return {"fp8-block": "HF fp8, 128x128 block scales", "fp8-dynamic": "compressed-tensors FP8-dynamic, "
            "per-channel scales"}[fmt]


def linear_weight_names(config: dict) -> set[str]:
    """Names of the weights the formats quantize, for a config.json dict."""
    from kvray.replica.models.registry import MODEL_REGISTRY, MODEL_TYPE_TO_ARCH
    arch = next((a for a in config.get("architectures") or [] if a in MODEL_REGISTRY),
                MODEL_TYPE_TO_ARCH.get(config.get("model_type")))
    if arch is None:
        raise ValueError(f"unsupported architecture {config.get('architectures')}; kvray supports "
                         f"{', '.join(sorted(MODEL_REGISTRY))}")
    cfg = types.SimpleNamespace(**config)
    model = MODEL_REGISTRY[arch](cfg, dtype=torch.bfloat16, device=torch.device("meta"))
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"}


def quantize_tensors(fmt: str, tensors: dict[str, torch.Tensor], linear_weights: set[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with each linear weight replaced by its e4m3 weight and scale(s)."""
    out = {}
    for name, t in tensors.items():
        if name not in linear_weights:
            out[name] = t
            continue
        prefix = name[: -len("weight")]
        if fmt == "fp8-block":
            out[name], out[prefix + "weight_scale_inv"] = quantize_blockwise(t, BLOCK)
        elif fmt == "fp8-dynamic":
            q, scale = quantize_per_channel(t)
            out[name], out[prefix + "weight_scale"] = q, scale[:, None].contiguous()
        else:
            quantization_config(fmt)  # raises
    return out


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fmt: str) -> Path:
    """Write ``src`` (an unquantized safetensors checkpoint directory) to ``dst`` in ``fmt``: the
    same files, its linear weights quantized and config.json's ``quantization_config`` set."""
    from safetensors.torch import load_file, save_file
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"checkpoint {str(src)!r} is already quantized")
    names = linear_weight_names(config)
    dst.mkdir(parents=True, exist_ok=True)
    index = None
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = quantize_tensors(fmt, load_file(str(f)), names)
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            index = json.loads(f.read_text())
        elif f.is_file() and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    if index is not None:  # the scales live in the shard of their weight
        wm = index["weight_map"]
        for name in [n for n in wm if n in names]:
            wm[name[: -len("weight")] + ("weight_scale_inv" if fmt == "fp8-block" else "weight_scale")] = wm[name]
        index["weight_map"] = dict(sorted(wm.items()))
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config["quantization_config"] = quantization_config(fmt)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
