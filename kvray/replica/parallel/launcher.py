"""Rank 0's handle on the other ranks of a tensor-parallel engine.

Rank 0 (the process that runs the engine: the serving replica's engine process, or the process
of a ``kvray.LLM``) hosts the rendezvous store and starts ranks ``1..N-1`` as child processes
(``python -m kvray.replica.parallel.worker``), each on its own device (``cuda:r`` of the GPUs the
process sees, which Ray set to the replica's; or the CPU). Each has a control socket to rank 0:

* ``call(name, *args)``: every rank runs ``ModelRunner.<name>(*args)`` (profile the memory,
  allocate the KV cache, capture the graphs...) while rank 0 runs its own; ``replies()`` then
  collects their results (their collectives pair with rank 0's);
* ``send_step(header)``: one small host message per step (``StepHeader``), after which the ranks
  run the step's forward; its inputs come by broadcast (``StepInputBuilder.share``).

A thread per rank waits on its process. When one dies unasked, ``failure`` says which and how,
the process-wide handler runs (``lifecycle.on_rank_death``: the serving engine process reports
and exits at once), and the group is aborted so a collective blocked on the dead rank returns;
the engine's next step raises ``RankFailure``.
"""
from __future__ import annotations

import logging
import pickle
import threading
import time
import weakref
from dataclasses import dataclass, replace
from multiprocessing.connection import wait

import torch

from kvray.replica.parallel.group import host_store
from kvray.replica.parallel.lifecycle import RankFailure, exit_status, rank_death_handler, spawn

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 900.0  # the slowest rank's model load and graph capture
STOP_TIMEOUT_S = 10.0
# control messages (the first byte)
STEP, CALL, STOP = b"S", b"C", b"Q"
WORKER_MODULE = "kvray.replica.parallel.worker"


@dataclass
class WorkerSpec:
    """What a rank process is told when it starts (pickled over its socket)."""

    config: object            # the engine's EngineConfig
    model_path: str
    dtype: torch.dtype
    device: str
    rank: int
    size: int
    store_port: int
    parent_pid: int


class _Shared:
    """What the watcher threads and the finalizer share with the handle (never the handle itself,
    so that an engine dropped without ``close`` is collected and its ranks stopped)."""

    def __init__(self):
        self.failure: str | None = None
        self.stopping = False
        self.group = None  # rank 0's group, aborted when a rank dies


class RankProcesses:
    """Ranks 1..N-1, started at once (each loads its shard while rank 0 loads its own)."""

    def __init__(self, spec: WorkerSpec, devices: list[torch.device]):
        self.size = spec.size
        self.store = host_store(spec.size, STARTUP_TIMEOUT_S)
        self._shared = _Shared()
        self.procs, self.conns = [], []
        for rank in range(1, spec.size):
            proc, conn = spawn(WORKER_MODULE)
            conn.send(replace(spec, rank=rank, device=str(devices[rank]), store_port=self.store.port))
            self.procs.append(proc)
            self.conns.append(conn)
            threading.Thread(target=_watch, args=(rank, proc, self._shared), name=f"kvray-rank{rank}-watch",
                             daemon=True).start()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self._shared)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def failure(self) -> str | None:
        return self._shared.failure

    def watch_group(self, group) -> None:
        """Abort ``group`` (rank 0's) when a rank dies, so that no collective waits on it."""
        self._shared.group = group

    def check(self) -> None:
        if self.failure is not None:
            raise RankFailure(self.failure)

    def fail(self, error: BaseException) -> RankFailure:
        """The RankFailure behind ``error`` (raised by a collective or a send): the rank that died,
        once its watcher has seen it (a moment after the collective noticed), else ``error``."""
        deadline = time.monotonic() + 2.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return RankFailure(self.failure or f"a tensor-parallel collective failed: {type(error).__name__}: {error}")

    # ---- messages ----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:
            raise self.fail(e) from None

    def send_step(self, message: bytes) -> None:
        """A step's header (and what else its ranks need to know of it) to every rank."""
        self._send(STEP + message)

    def call(self, name: str, *args) -> None:
        """Every rank runs ``ModelRunner.<name>(*args)``; collect the results with ``replies``."""
        self._send(CALL + pickle.dumps((name, args)))

    def replies(self, what: str = "") -> list:
        """One reply per rank (rank order), waiting for as long as they take while they live.
        A rank that failed raises (RuntimeError with its error; RankFailure if it died)."""
        out: dict[int, object] = {}
        pending = dict(enumerate(self.conns))
        while pending:
            self.check()
            for conn in wait(list(pending.values()), timeout=0.5):
                i = next(k for k, c in pending.items() if c is conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError) as e:
                    raise self.fail(e) from None
                del pending[i]
                if status != "ok":
                    raise RuntimeError(f"tensor-parallel rank {i + 1} failed{' ' + what if what else ''}: {value}")
                out[i] = value
        return [out[i] for i in range(len(self.conns))]

    def stop(self) -> None:
        """Ask every rank to exit and wait for them (killed after ``STOP_TIMEOUT_S``)."""
        self._finalizer()


def _watch(rank: int, proc, shared: _Shared) -> None:
    code = proc.wait()
    if shared.stopping:
        return
    message = f"tensor-parallel rank {rank} (pid {proc.pid}) died {exit_status(code)}"
    if shared.failure is None:
        shared.failure = message
    logger.error(message)
    handler = rank_death_handler()
    if handler is not None:
        handler(message)
    if shared.group is not None:
        shared.group.abort()


def _stop(procs, conns, shared: _Shared) -> None:
    shared.stopping = True
    for conn in conns:
        try:
            conn.send_bytes(STOP)
        except OSError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - TimeoutExpired: it does not listen any more
            proc.kill()
            proc.wait()
    for conn in conns:
        conn.close()
