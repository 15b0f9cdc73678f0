"""Quantized linear layers: the method seam (``base``), FP8 methods (``fp8``) and the checkpoint's
quantization config (``config``)."""
from kvray.replica.models.quantization.base import UNQUANTIZED, LinearMethod, UnquantizedMethod, default_weight_loader
from kvray.replica.models.quantization.config import QUANTIZATION_OPTIONS, QuantConfig, quant_config
from kvray.replica.models.quantization.fp8 import (Fp8BlockMethod, Fp8ChannelMethod, quantize_blockwise,
                                                   quantize_per_channel, quantize_per_tensor)

__all__ = ["UNQUANTIZED", "LinearMethod", "UnquantizedMethod", "default_weight_loader", "QUANTIZATION_OPTIONS",
           "QuantConfig", "quant_config", "Fp8BlockMethod", "Fp8ChannelMethod", "quantize_blockwise",
           "quantize_per_channel", "quantize_per_tensor"]
