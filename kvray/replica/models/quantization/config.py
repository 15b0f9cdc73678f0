"""Which linear method each layer of a checkpoint gets: read from config.json's
``quantization_config``, or from the engine option ``quantization: fp8`` (quantize on load).

Checkpoint formats kvray loads (anything else is a ``ValueError`` naming the field):

* Hugging Face ``quant_method: "fp8"`` (the Qwen3-*-FP8 layout): e4m3 weights, ``weight_block_size``
  [bn, bk] with one ``weight_scale_inv`` per tile, ``activation_scheme: "dynamic"``; modules in
  ``modules_to_not_convert`` stay unquantized (matched as transformers does: the entry is a
  substring of the module name).
* compressed-tensors ``format: "float-quantized"``: one config group targeting ``Linear``, weights
  ``{type: float, num_bits: 8, strategy: channel | tensor}``, input activations dynamic per token
  or static per tensor (``input_scale``); modules in ``ignore`` (a name, or ``re:<regex>``) stay
  unquantized.

``lm_head`` is never quantized: logits are computed from its weight in the activation dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kvray.replica.models.quantization.base import UNQUANTIZED, LinearMethod
from kvray.replica.models.quantization.fp8 import Fp8BlockMethod, Fp8ChannelMethod

QUANTIZATION_OPTIONS = ("fp8",)
ALWAYS_UNQUANTIZED = ("lm_head",)


@dataclass(frozen=True)
class QuantConfig:
    format: str                   # "fp8", "compressed-tensors" or "quantization=fp8" (on load)
    method: LinearMethod          # of every quantized linear
    ignore: tuple[str, ...] = ()  # module name rules of the unquantized ones
    substring_ignore: bool = False

    def method_for(self, module_name: str) -> LinearMethod:
        if module_name in ALWAYS_UNQUANTIZED or module_name.endswith(tuple("." + n for n in ALWAYS_UNQUANTIZED)):
            return UNQUANTIZED
        for rule in self.ignore:
            if rule.startswith("re:"):
                if re.match(rule[3:], module_name):
                    return UNQUANTIZED
            elif (rule in module_name) if self.substring_ignore else (
                    module_name == rule or module_name.endswith("." + rule)):
                return UNQUANTIZED
        return self.method

    def describe(self) -> str:
        return f"{self.format}: {self.method.describe()}"


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"unsupported quantization_config.{field}={value!r} in config.json: {why}")


def _hf_fp8(qc: dict) -> QuantConfig:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _bad("activation_scheme", scheme, "kvray loads the fp8 format with dynamic activations")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _bad("fmt", fmt, "kvray loads e4m3 weights")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _bad("weight_block_size", block, "kvray loads the fp8 format with block-wise scales, "
                   "weight_block_size: [rows, columns] (e.g. [128, 128])")
    return QuantConfig("fp8", Fp8BlockMethod(tuple(block)), tuple(qc.get("modules_to_not_convert") or ()),
                       substring_ignore=True)


def _check_args(where: str, args, want: dict) -> None:
    if not isinstance(args, dict):
        raise _bad(where, args, "expected a mapping")
    for key, allowed in want.items():
        if args.get(key) not in allowed:
            raise _bad(f"{where}.{key}", args.get(key), f"kvray supports {' or '.join(map(repr, allowed))}")


def _compressed_tensors(qc: dict) -> QuantConfig:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise _bad("format", fmt, "kvray loads compressed-tensors checkpoints in the 'float-quantized' format (FP8)")
    for key in ("kv_cache_scheme",):
        if qc.get(key):
            raise _bad(key, qc[key], "kvray does not load KV-cache scales (use kv_cache_dtype: fp8 instead)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _bad("config_groups", sorted(groups), "kvray loads exactly one config group")
    (name, group), = groups.items()
    where = f"config_groups.{name}"
    if "Linear" not in (group.get("targets") or []):
        raise _bad(f"{where}.targets", group.get("targets"), "kvray loads groups that target 'Linear'")
    if group.get("output_activations"):
        raise _bad(f"{where}.output_activations", group["output_activations"], "output quantization is not supported")
    w = group.get("weights")
    _check_args(f"{where}.weights", w, {"type": ("float",), "num_bits": (8,), "strategy": ("channel", "tensor"),
                                        "dynamic": (False, None), "symmetric": (True, None)})
    a = group.get("input_activations")
    if a is None:
        raise _bad(f"{where}.input_activations", None, "weight-only FP8 is not supported (kvray runs FP8 GEMMs)")
    _check_args(f"{where}.input_activations", a, {"type": ("float",), "num_bits": (8,)})
    if a.get("dynamic"):
        _check_args(f"{where}.input_activations", a, {"strategy": ("token",)})
    else:
        _check_args(f"{where}.input_activations", a, {"strategy": ("tensor",)})
    method = Fp8ChannelMethod(weight_strategy=w["strategy"], static_input=not a.get("dynamic"))
    return QuantConfig("compressed-tensors", method, tuple(qc.get("ignore") or ()))


def quant_config(raw_config: dict, quantization: str | None = None) -> QuantConfig | None:
    """The checkpoint's quantization (config.json's ``quantization_config``), else FP8 on load when
    ``quantization == "fp8"``, else None (unquantized). ValueError on anything unsupported."""
    if quantization not in (None, *QUANTIZATION_OPTIONS):
        raise ValueError(f"invalid engine option quantization={quantization!r}: must be null or 'fp8'")
    qc = raw_config.get("quantization_config")
    if qc is None:
        if quantization == "fp8":
            return QuantConfig("quantization=fp8", Fp8ChannelMethod(quantize_on_load=True))
        return None
    if not isinstance(qc, dict):
        raise _bad("", qc, "expected a mapping")
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _bad("quant_method", method, "kvray loads 'fp8' and 'compressed-tensors' (float-quantized) checkpoints")
