"""Which GPUs a replica sees, and that they are one per tensor-parallel rank."""
from __future__ import annotations

import os


def pin_replica_gpus() -> list[str]:
    """Call first in a replica's ``__init__``: a replica sees exactly the GPUs Ray assigned it.
    Ray 2.60 sets CUDA_VISIBLE_DEVICES only for actors holding GPUs, so one that asked for none
    would see (and could allocate on) every GPU of its node; hide them. Returns the GPU ids."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return []  # not a Ray actor (a driver, a test): leave the process alone
        ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except Exception:
        return []
    if not ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return ids


def check_replica_gpus(gpu_ids: list[str], tensor_parallel_size: int) -> None:
    """A replica's GPUs must be its tensor-parallel ranks' (one each): a ValueError at startup
    otherwise (``kvray check-config`` finds the same in a config file before deploying it)."""
    n = len(gpu_ids)
    if n and n != tensor_parallel_size:
        raise ValueError(f"this replica holds {n} GPU(s) (Ray assigned {', '.join(gpu_ids)}) but "
                         f"engine.tensor_parallel_size is {tensor_parallel_size}: set the LLMReplica deployment's "
                         f"ray_actor_options.num_gpus to {tensor_parallel_size} (one GPU per rank)")
