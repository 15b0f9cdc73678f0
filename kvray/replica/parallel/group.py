"""The process group of one tensor-parallel engine and the collectives its model runs.

A ``ParallelGroup`` is a ``torch.distributed`` backend object of its own (NCCL for CUDA tensors,
gloo for CPU ones), made from a TCP store that rank 0 hosts on the loopback interface. It is not
registered as torch's default group: the engine may live in a user's process (``kvray.LLM``),
next to the user's own ``torch.distributed`` setup, and several engines may come and go in one
process (tests). Collectives are issued synchronously on the current stream (``asyncOp`` off),
which is what CUDA-graph capture records: the graphs of a tensor-parallel engine replay its
all-reduces and the step-input broadcast like any other kernel.

``SINGLE`` is the group of an engine without tensor parallelism: every collective is a no-op,
so the model code is the same for both.
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# A collective that waits longer than this for a peer fails (gloo) or is aborted (NCCL watchdog).
# A peer that died is noticed long before (the launcher watches the processes); this only bounds a
# peer that hangs alive.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
STORE_HOST = "127.0.0.1"


class ParallelGroup:
    """Rank ``rank`` of ``size``; ``device`` is this rank's device."""

    def __init__(self, rank: int, size: int, device: torch.device, backend=None, store=None):
        self.rank, self.size, self.device = rank, size, device
        self._pg = backend
        self._store = store  # rank 0's server store must outlive the group

    @property
    def distributed(self) -> bool:
        """Whether collectives go through a backend (False only for ``SINGLE``; a one-rank NCCL
        group runs every collective, which is how one GPU tests them)."""
        return self._pg is not None

    @property
    def backend_name(self) -> str:
        return "none" if self._pg is None else self._pg.name()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        if self._pg is not None:
            _wait(self._pg.allreduce([x], _on_current_stream(dist.AllreduceOptions())))
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (in place); returns it."""
        if self._pg is not None:
            opts = _on_current_stream(dist.BroadcastOptions())
            opts.rootRank = 0
            _wait(self._pg.broadcast([x], opts))
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``x`` (same shape), in rank order, on rank 0; None on the others."""
        if self._pg is None:
            return [x]
        opts = dist.GatherOptions()
        opts.rootRank = 0
        out = [[torch.empty_like(x) for _ in range(self.size)]] if self.rank == 0 else []
        _wait(self._pg.gather(out, [x], opts))
        return out[0] if self.rank == 0 else None

    def abort(self) -> None:
        """Make collectives blocked on a dead peer return with an error (best effort)."""
        if self._pg is not None:
            try:
                self._pg.abort()
            except Exception:  # noqa: BLE001 - some backends cannot abort; the caller fails anyway
                logger.debug("process group abort failed", exc_info=True)


def _wait(work) -> None:
    """Wait for a collective's work; a backend running it on the current stream with ``asyncOp``
    off returns none (NCCL in recent torch): the stream orders it already."""
    if work is not None:
        work.wait()


def _on_current_stream(opts):
    """Collective options that run it on the current stream (torch >= 2.7; earlier ones run it on
    the backend's stream, ordered after the current one, which graph capture also records)."""
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False
    return opts


SINGLE = ParallelGroup(0, 1, torch.device("cpu"))
_BUILDING: list[ParallelGroup] = []


@contextmanager
def building(group: ParallelGroup):
    """Layers constructed inside take ``group`` as theirs (``build_group``): the model code names no
    group, the loader builds the model inside this."""
    _BUILDING.append(group)
    try:
        yield group
    finally:
        _BUILDING.pop()


def build_group() -> ParallelGroup:
    """The group of the layers being built (``SINGLE`` outside ``building``)."""
    return _BUILDING[-1] if _BUILDING else SINGLE


def host_store(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (``.port``)."""
    return dist.TCPStore(STORE_HOST, 0, size, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def connect(rank: int, size: int, device: torch.device, store_port: int, store=None,
            timeout_s: float = 120.0) -> ParallelGroup:
    """Join the group: every rank calls this at about the same time (it returns once all have).
    Rank 0 passes the store it hosts; the others connect to its port."""
    if store is None:
        store = dist.TCPStore(STORE_HOST, store_port, size, False, timeout=datetime.timedelta(seconds=timeout_s))
    prefixed = dist.PrefixStore(f"kvray-tp-{store_port}", store)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, named by index (NCCL binds to one)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = COLLECTIVE_TIMEOUT
        backend = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    else:
        backend = dist.ProcessGroupGloo(prefixed, rank, size, COLLECTIVE_TIMEOUT)
    group = ParallelGroup(rank, size, device, backend, store if rank == 0 else None)
    # The first collective sets the communicators up (NCCL does it lazily): never inside a graph capture.
    group.all_reduce(torch.zeros(1, device=device))
    logger.info("tensor-parallel rank %d/%d joined (%s on %s, pid %d)", rank, size, group.backend_name, device,
                os.getpid())
    return group
