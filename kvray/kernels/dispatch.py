"""Which code a kernel call runs, and the Triton modules behind it (their dispatch).

* CUDA tensors run the Triton kernels (``triton_attention``, ``triton_cache``, ``triton_fused``,
  ``triton_fp8``, ``triton_moe``).
* CPU tensors run the plain-torch reference (``kvray.kernels.reference``), unless
  ``TRITON_INTERPRET=1`` is set at call time: then the Triton kernels run under Triton's CPU
  interpreter (how CI tests them).
* ``KVRAY_ATTENTION_BACKEND=reference|triton|auto`` (read at call time) or
  ``set_attention_backend(name)`` (the engine option; wins over the variable) force a path:
  ``reference`` runs the torch code even on CUDA (for debugging), ``triton`` runs the kernels
  on CPU tensors too (under the interpreter).

The Triton modules are loaded lazily, once per mode (compiled / interpreted), so the interpreter
can be switched on per call without re-importing anything and CPU-only installs never import
Triton. Every entry point (``paged``, ``fused``, ``fp8``, ``moe``) asks ``route(device)``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_BACKEND = "KVRAY_ATTENTION_BACKEND"
_override: str | None = None
_impls: dict[bool, types.SimpleNamespace] = {}


def get_override() -> str | None:
    """The backend ``set_attention_backend`` forced (None: $KVRAY_ATTENTION_BACKEND decides)."""
    return _override


def set_attention_backend(name: str | None) -> None:
    """Force ``"reference"`` or ``"triton"`` (or ``"auto"``); ``None`` defers to $KVRAY_ATTENTION_BACKEND."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS} or None, got {name!r}")
    _override = name


def get_attention_backend() -> str:
    name = _override or os.environ.get(ENV_BACKEND) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"${ENV_BACKEND} must be one of {BACKENDS}, got {name!r}")
    return name


def route(device: torch.device) -> tuple[bool, bool]:
    """(use Triton, under the interpreter) for tensors on ``device``."""
    backend = get_attention_backend()
    if backend == "reference":
        return False, False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        return True, interpret
    if device.type == "cpu" and (interpret or backend == "triton"):
        return True, True
    return False, False


def _load(stem: str, interpret: bool) -> types.ModuleType:
    name = f"kvray.kernels._{stem}_{'interpreted' if interpret else 'compiled'}"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), stem + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return mod


def triton_impl(interpret: bool = False) -> types.SimpleNamespace:
    """The Triton modules (``.attention``, ``.cache``) built for one mode. ``triton.jit`` picks the
    interpreter at decoration time from $TRITON_INTERPRET, so each mode gets its own copy of the
    modules, decorated with the variable set accordingly."""
    impl = _impls.get(interpret)
    if impl is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - CPU-only installs without Triton
            raise ImportError("the Triton attention backend needs the `triton` package; "
                              f"use {ENV_BACKEND}=reference") from e
        prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            fp8 = _load("triton_fp8", interpret)  # before triton_cache, which calls its e4m3 rounding
            impl = types.SimpleNamespace(attention=_load("triton_attention", interpret),
                                         cache=_load("triton_cache", interpret),
                                         fused=_load("triton_fused", interpret), fp8=fp8,
                                         moe=_load("triton_moe", interpret))
        finally:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
        _impls[interpret] = impl
    return impl


def compiled_variants() -> int:
    """How many Triton kernel variants this process has compiled (or loaded from Triton's disk
    cache) for the GPU: the number grows only at a first launch of a new specialization, so it
    must not move once the engine has started (every variant is built while CUDA graphs are
    captured)."""
    impl = _impls.get(False)
    if impl is None:
        return 0
    n = 0
    for mod in (impl.attention, impl.cache, impl.fused, impl.fp8, impl.moe):
        for obj in vars(mod).values():
            for cache in (getattr(obj, "device_caches", None) or {}).values():
                n += len(cache[0])
    return n
