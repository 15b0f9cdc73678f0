"""FP8 (e4m3) linear layers.

* ``Fp8ChannelMethod``: one float32 scale per output channel (a per-tensor scale is expanded to
  every channel once loaded, so fused layers keep their parts' scales), activations quantized per
  token at run time (``dynamic``) or with the checkpoint's ``input_scale`` (``static``). The GEMM
  is ``torch._scaled_mm`` with row-wise scales (cuBLASLt). ``quantize_on_load``: the checkpoint
  holds bf16/fp32 weights and the weight loader quantizes them (kvray's ``quantization: fp8``).
* ``Fp8BlockMethod``: one scale per ``block`` = (rows, columns) tile of the weight
  (``weight_scale_inv``, the Hugging Face ``quant_method: fp8`` layout), activations quantized per
  token and per ``block[1]`` columns; kvray's Triton block-scaled GEMM.

On CUDA the activations are quantized and the GEMM runs in FP8 (``apply_quantized``). Elsewhere
the weight is dequantized and multiplied in the activation dtype: the CPU reference path, exact
next to transformers running the dequantized weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvray import kernels
from kvray.kernels.reference import FP8, FP8_MAX, expand_block_scale, to_fp8
from kvray.replica.models.quantization.base import LinearMethod, cat_bias, default_weight_loader, new_param


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 [N, K], scale [N] float32) with ``w ~= w_fp8 * scale[:, None]``."""
    scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return to_fp8(w.float() / scale[:, None]), scale


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8, scale [] float32) with ``w ~= w_fp8 * scale``."""
    scale = w.float().abs().amax().clamp_min(1e-12) / FP8_MAX
    return to_fp8(w.float() / scale), scale


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 [N, K], scale [cdiv(N, bn), cdiv(K, bk)] float32): one scale per tile."""
    (n, k), (bn, bk) = w.shape, block
    nb, kb = -(-n // bn), -(-k // bk)
    tiles = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    return to_fp8(w.float() / expand_block_scale(scale, n, k, block)), scale


def _load_scale(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Scales come as [N], [N, 1], [] or [1]: same number of elements as the parameter."""
    if tensor.numel() != param.numel() or tensor.dim() > 2:
        raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {list(tensor.shape)}, "
                         f"the model expects {list(param.shape)} (a scale)")
    param.copy_(tensor.reshape(param.shape).float())


def _load_fp8_weight(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype != FP8:
        raise ValueError(f"tensor {name!r} is {tensor.dtype}; the checkpoint's quantization_config says "
                         "float8_e4m3fn weights")
    default_weight_loader(param, tensor, name)


def _fp8_gpu_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


@dataclass(frozen=True)
class Fp8ChannelMethod(LinearMethod):
    weight_strategy: str = "channel"      # "channel" | "tensor" (as stored)
    static_input: bool = False            # activations: dynamic per token, or the checkpoint's input_scale
    quantize_on_load: bool = False

    name = "fp8"

    def describe(self) -> str:
        w = "per-channel weights quantized on load" if self.quantize_on_load else f"per-{self.weight_strategy} weights"
        return f"fp8 ({w}, {'static per-tensor' if self.static_input else 'dynamic per-token'} activations)"

    def create_weights(self, layer) -> None:
        n, k = layer.out_features, layer.in_features
        if self.quantize_on_load:
            scale = new_param(layer, "weight_scale", (n,), torch.float32, from_checkpoint=False)

            def load_and_quantize(param, tensor, name):
                if tuple(tensor.shape) != (n, k):
                    default_weight_loader(param, tensor, name)  # raises the shape error
                q, s = quantize_per_channel(tensor.to(param.device))
                param.copy_(q)
                scale.copy_(s)

            new_param(layer, "weight", (n, k), FP8, loader=load_and_quantize)
        else:
            new_param(layer, "weight", (n, k), FP8, loader=_load_fp8_weight)
            new_param(layer, "weight_scale", (n,) if self.weight_strategy == "channel" else (1,), torch.float32,
                      loader=_load_scale)
        if self.static_input:
            new_param(layer, "input_scale", (1,), torch.float32, loader=_load_scale)
        if layer.has_bias:
            new_param(layer, "bias", (n,), layer.params_dtype)

    def process_after_loading(self, layer) -> None:
        if layer.weight_scale.numel() != layer.out_features:  # per tensor: the same scale on every channel
            layer.weight_scale = nn.Parameter(layer.weight_scale.data.expand(layer.out_features).contiguous(),
                                              requires_grad=False)

    def dequantized_weight(self, layer) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale[:, None]

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not _fp8_gpu_ok(x):
            return F.linear(x, self.dequantized_weight(layer).to(x.dtype), layer.bias)
        return self.apply_quantized(layer, x)

    def apply_quantized(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The FP8 path: quantize the activations, FP8 GEMM with row-wise scales."""
        x2 = x.reshape(-1, layer.in_features)
        if self.static_input:
            xq = to_fp8(x2.float() / layer.input_scale)
            xs = layer.input_scale.expand(x2.shape[0], 1).contiguous()
        else:
            xq, xs = kernels.quant_fp8(x2)
        out = kernels.fp8_scaled_mm(xq, xs, layer.weight, layer.weight_scale, x.dtype, layer.bias)
        return out.view(*x.shape[:-1], layer.out_features)

    def fuse_params(self, parts: list) -> dict[str, torch.Tensor]:
        fused = {"weight": torch.cat([p.weight.data for p in parts]),
                 "weight_scale": torch.cat([p.weight_scale.data for p in parts]), **cat_bias(parts)}
        if self.static_input:  # one activation, one scale: the largest keeps every part in range
            fused["input_scale"] = torch.stack([p.input_scale.data for p in parts]).amax(0)
        return fused


@dataclass(frozen=True)
class Fp8BlockMethod(LinearMethod):
    block: tuple[int, int] = (128, 128)   # (output rows, input columns) per weight scale

    name = "fp8-block"

    def describe(self) -> str:
        return f"fp8 (block-wise {self.block[0]}x{self.block[1]} weight scales, dynamic per-token-group activations)"

    def create_weights(self, layer) -> None:
        n, k = layer.out_features, layer.in_features
        bn, bk = self.block
        new_param(layer, "weight", (n, k), FP8, loader=_load_fp8_weight)
        scale = new_param(layer, "weight_scale_inv", (-(-n // bn), -(-k // bk)), torch.float32, loader=_load_scale)
        scale.block = self.block  # what one entry covers: a tensor-parallel rank reads whole blocks
        if layer.has_bias:
            new_param(layer, "bias", (n,), layer.params_dtype)
        layer.scale_block = self.block   # (1, bk) once fused from parts whose rows break the blocks

    def dequantized_weight(self, layer) -> torch.Tensor:
        return layer.weight.float() * expand_block_scale(layer.weight_scale_inv, layer.out_features,
                                                         layer.in_features, layer.scale_block)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not _fp8_gpu_ok(x):
            return F.linear(x, self.dequantized_weight(layer).to(x.dtype), layer.bias)
        return self.apply_quantized(layer, x)

    def apply_quantized(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features)
        xq, xs = kernels.quant_fp8(x2, layer.scale_block[1])
        out = kernels.fp8_block_gemm(xq, xs, layer.weight, layer.weight_scale_inv, layer.scale_block, x.dtype)
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)

    def fuse_params(self, parts: list) -> dict[str, torch.Tensor]:
        bn = parts[0].scale_block[0]
        if all(p.out_features % bn == 0 and p.scale_block == parts[0].scale_block for p in parts):
            scales = [p.weight_scale_inv.data for p in parts]
            block = parts[0].scale_block
        else:  # a part ends inside a block: one scale row per output row instead
            scales = [p.weight_scale_inv.data.repeat_interleave(p.scale_block[0], 0)[:p.out_features] for p in parts]
            block = (1, parts[0].scale_block[1])
        return {"weight": torch.cat([p.weight.data for p in parts]), "weight_scale_inv": torch.cat(scales),
                "scale_block": block, **cat_bias(parts)}
