"""Which GPUs a replica sees."""
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
