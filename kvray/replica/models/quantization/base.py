"""The seam between a linear layer and how its weights are stored: a ``LinearMethod`` makes the
layer's parameters, says how each one is loaded from a checkpoint tensor, prepares them once all
are loaded, computes ``y = x W^T (+ b)``, and concatenates the parameters of layers that are fused
into one matmul (q/k/v, gate/up).

Each parameter carries its own ``weight_loader(param, tensor, name)``: the checkpoint loader hands
it the tensor of the same name and it checks and copies (or converts) it. Tensor-parallel sharding
fits here later: a loader that narrows the tensor to its rank's rows or columns first. A parameter
that no checkpoint tensor fills (computed by another parameter's loader, such as the scales of
weights quantized on load) has ``from_checkpoint = False``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy ``tensor`` into ``param`` (same shape), converting its dtype."""
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {list(tensor.shape)}, "
                         f"the model (from config.json) expects {list(param.shape)}")
    param.copy_(tensor)


def new_param(layer: nn.Module, name: str, shape, dtype: torch.dtype, loader=default_weight_loader,
              from_checkpoint: bool = True) -> nn.Parameter:
    """Register an uninitialised parameter ``name`` on ``layer`` with its weight loader."""
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=layer.device), requires_grad=False)
    p.weight_loader = loader
    p.from_checkpoint = from_checkpoint
    layer.register_parameter(name, p)
    return p


class LinearMethod:
    """Interface; methods are immutable values (equal methods may share a fused matmul)."""

    name = "abstract"

    def create_weights(self, layer) -> None:
        """Register the layer's parameters (``layer.in_features``, ``out_features``, ``has_bias``,
        ``params_dtype``, ``device`` say what it is)."""
        raise NotImplementedError

    def process_after_loading(self, layer) -> None:
        """Called once, after every parameter is loaded."""

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fuse_params(self, parts: list) -> dict[str, torch.Tensor]:
        """The parameters of one layer computing all of ``parts`` (same input, outputs concatenated)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def cat_bias(parts: list) -> dict[str, torch.Tensor]:
    return {"bias": torch.cat([p.bias.data for p in parts])} if parts[0].bias is not None else {}


@dataclass(frozen=True)
class UnquantizedMethod(LinearMethod):
    """Weights in the activation dtype: ``F.linear``."""

    name = "unquantized"

    def create_weights(self, layer) -> None:
        new_param(layer, "weight", (layer.out_features, layer.in_features), layer.params_dtype)
        if layer.has_bias:
            new_param(layer, "bias", (layer.out_features,), layer.params_dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def fuse_params(self, parts: list) -> dict[str, torch.Tensor]:
        return {"weight": torch.cat([p.weight.data for p in parts]), **cat_bias(parts)}


UNQUANTIZED = UnquantizedMethod()
