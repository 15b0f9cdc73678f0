"""Whether a model splits over ``tensor_parallel_size`` ranks, from its config alone: the engine
checks it before starting the other ranks, and ``kvray check-config`` before deploying."""
from __future__ import annotations

from pathlib import Path

from kvray.replica.models.loader import PRESET_PREFIX, load_config
from kvray.replica.models.moe import moe_spec
from kvray.replica.parallel.sharding import check_tensor_parallel


def check_model_splits(hf_config, size: int) -> None:
    """A ValueError naming the config field when the model cannot be split over ``size`` ranks
    (its heads, its MLP, and a mixture-of-experts model's expert width)."""
    spec = moe_spec(hf_config)
    width = None
    if spec is not None:
        width = ("moe_intermediate_size" if hasattr(hf_config, "moe_intermediate_size") else "intermediate_size",
                 spec.intermediate)
    check_tensor_parallel(hf_config, size, width)


def tensor_parallel_problem(model: str, size: int) -> str | None:
    """Why ``model`` cannot be split over ``size`` ranks, where this machine can read its config
    without fetching or generating anything (a built-in random-weight preset, a local checkpoint);
    None if it can, or if its config is elsewhere (a hub id, a path on the cluster's nodes)."""
    if size == 1:
        return None
    try:
        if model.startswith(PRESET_PREFIX):
            from kvray.replica.models.presets import PRESETS, hf_config
            name = model[len(PRESET_PREFIX):]
            if name not in PRESETS:
                return None  # a real preset: its config comes with its download
            config = hf_config(name)
        elif Path(model).expanduser().exists():
            config = load_config(model)
        else:
            return None
        check_model_splits(config, size)
    except ValueError as e:
        return str(e)
    return None
