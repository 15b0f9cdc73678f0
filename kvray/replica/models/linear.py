"""``Linear``: ``y = x W^T (+ b)`` whose parameters are made, loaded and applied by a
:class:`~kvray.replica.models.quantization.base.LinearMethod` (unquantized, FP8 per channel, FP8
block-wise), and the fusing of linears that read the same input into one matmul.

A layer's method is given at construction, or else comes from the innermost
``linear_method_scope`` (the loader builds a quantized model inside one), or else is unquantized.
``set_method`` swaps it afterwards, which the loader does for modules a checkpoint leaves
unquantized. Parameter names mirror Hugging Face's (``weight``, ``bias``, ``weight_scale``,
``weight_scale_inv``, ``input_scale``), so checkpoint tensors map one to one.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from kvray.replica.models.quantization.base import UNQUANTIZED, LinearMethod

_SCOPE: list[LinearMethod] = []


@contextmanager
def linear_method_scope(method: LinearMethod | None):
    """Linears built inside (without an explicit method) use ``method`` (None: unquantized)."""
    _SCOPE.append(method or UNQUANTIZED)
    try:
        yield
    finally:
        _SCOPE.pop()


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 method: LinearMethod | None = None):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.params_dtype = dtype
        self.device = device
        self.method: LinearMethod = None  # type: ignore[assignment]
        self.set_method(method or (_SCOPE[-1] if _SCOPE else UNQUANTIZED))

    def set_method(self, method: LinearMethod) -> None:
        """(Re)make the parameters for ``method``, uninitialised: before loading only."""
        for name in list(self._parameters):
            del self._parameters[name]
        self.__dict__.pop("bias", None)
        self.method = method
        method.create_weights(self)
        if "bias" not in self._parameters:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method.describe()}")


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear computing every part (outputs concatenated in order), or None when the parts
    differ in method or bias and cannot share a matmul."""
    first = parts[0]
    if any(p.method != first.method or p.has_bias != first.has_bias or p.in_features != first.in_features
           for p in parts):
        return None
    fused = Linear(first.in_features, sum(p.out_features for p in parts), first.has_bias, first.params_dtype,
                   first.device, method=first.method)
    for name, value in first.method.fuse_params(parts).items():
        if isinstance(value, torch.Tensor):
            getattr(fused, name).data = value
        else:
            setattr(fused, name, value)
    return fused
