"""``LLMReplica``: the Serve deployment of one kvray engine (on ``engine.tensor_parallel_size`` GPUs
of one node, which ``ray_actor_options.num_gpus`` reserves).

It starts the engine (``AsyncLLMEngine(process=True)``: the step loop runs in a child process,
so this process's event loop only moves requests and tokens) and streams its requests' tokens
to the Routers (``generate`` and ``channel``: the token-stream protocol of
``kvray.platform.token_streams``). Also: ``model_info`` (the tokenizer and limits, for the
Router), ``record_routing_stats`` (polled by the Serve controller and broadcast to the routers:
a ``ReplicaStats``, the engine's stats plus what the streams count and a wall-clock ``time``),
``record_autoscaling_stats`` (``kvray.platform.autoscaling``), ``check_health`` (raises once the
engine loop died, so Serve replaces the replica) and shutdown. When Serve stops a replica it
routes nothing new to it and waits for its open calls; the Routers end their requests still
running there after the app's ``graceful_shutdown_timeout_s`` and close their channels
(``kvray.frontend.drain``), so the calls end and Serve calls ``__del__``, which stops the engine
(what little is left may finish for up to that timeout) and its process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from kvray.metrics import MemorySink, ReplicaMetrics
from kvray.platform.token_streams import TokenStreams
from kvray.records import ROUTING_STATS_KEY, ReplicaStats

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 1.0  # after the engine died: time for the error to reach every open stream, then exit
METRICS_PERIOD_S = 1.0  # how often the engine gauges (kvray.metrics) are set


def _exit_soon(error: BaseException) -> None:
    """The engine is gone and this replica can serve nothing more: report unhealthy from now on
    (``check_health`` raises), and exit the process after ``EXIT_GRACE_S``, so the controller sees
    the actor die and starts a replacement at its next health check instead of waiting for
    several failed ones. Requests sent here meanwhile get a 503, which the Router retries on
    another replica."""
    logger.error("the engine died (%s): this replica exits in %.1f s so Serve replaces it", error, EXIT_GRACE_S)
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


class LLMReplica(TokenStreams):
    # set before anything in __init__ can fail: Serve calls __del__ on a replica whose start failed
    engine = None
    _metrics_task: asyncio.Task | None = None

    def __init__(self, model: str, engine_options: dict | None = None, shutdown_timeout_s: float = 30.0,
                 stream_interval_ms: float = 0.0, served_model_name: str | None = None):
        from kvray.platform.gpus import check_replica_gpus, pin_replica_gpus
        gpu_ids = pin_replica_gpus()  # before torch touches CUDA: a replica sees only the GPUs Ray gave it
        from kvray.replica.async_engine import AsyncLLMEngine  # the engine process loads torch, not this one
        from kvray.replica.config import EngineConfig

        config = EngineConfig(model=model, **(engine_options or {}))
        check_replica_gpus(gpu_ids, config.tensor_parallel_size)
        self._num_gpus = len(gpu_ids)

        try:
            from ray import serve
            replica_id, in_serve = serve.get_replica_context().replica_id.unique_id, True
        except Exception:  # outside Serve (tests)
            replica_id, in_serve = "local", False
        # with tensor_parallel_size N the engine process is rank 0 and starts ranks 1..N-1 on the
        # replica's other GPUs (CUDA_VISIBLE_DEVICES, which the engine process inherits)
        self.engine = AsyncLLMEngine(config, process=True, on_death=_exit_soon if in_serve else None)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._started_at = time.time()  # wall clock: when this replica's engine was ready
        metrics = ReplicaMetrics(served_model_name or model, replica_id, None if in_serve else MemorySink())
        super().__init__(replica_id, metrics, stream_interval_ms)

    async def model_info(self) -> dict:
        """What the Router needs before it can tokenize: the tokenizer itself and the limits."""
        self._ensure_metrics_task()
        tok = self.engine.tokenizer
        stats = self.engine.stats()
        return {"tokenizer": tok, "max_model_len": self.engine.max_model_len,
                "block_size": self.engine.block_size, "model": self.engine.model_name,
                "vocab_size": self.engine.vocab_size, "quantization": self.engine.quantization,
                "kv_cache_dtype": self.engine.kv_cache_dtype,
                "kv_cache_tokens": stats.num_total_blocks * stats.block_size,
                "replica_id": self._replica_id}

    # ---- stats, health, shutdown ---------------------------------------------------------------
    def _ensure_metrics_task(self) -> None:
        """The engine gauges, set every ``METRICS_PERIOD_S`` from the replica's event loop."""
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(self._update_metrics())

    async def _update_metrics(self) -> None:
        while True:
            try:
                self.metrics.update(self.engine.stats())
            except Exception:  # noqa: BLE001 - a metrics hiccup must not end the loop
                logger.exception("could not update the replica's metrics")
            await asyncio.sleep(METRICS_PERIOD_S)

    def record_autoscaling_stats(self) -> dict:
        """Load signal for kvray's SLO-headroom autoscaling policy (Serve pushes it to the controller)."""
        from kvray.platform.autoscaling.signal import replica_autoscaling_stats
        return replica_autoscaling_stats(self.engine, self._num_gpus)

    async def record_routing_stats(self) -> dict:
        # async: it runs on the replica's event loop, with the request coroutines (a sync method
        # would run on Serve's thread pool, racing them)
        self._ensure_metrics_task()
        return {ROUTING_STATS_KEY: self.stats()}

    def stats(self) -> ReplicaStats:
        engine = self.engine
        return ReplicaStats(
            engine=engine.stats(), time=time.time(), replica_id=self._replica_id, healthy=engine.is_alive(),
            max_model_len=engine.max_model_len, max_queued_requests=engine.max_queued_requests,
            max_queued_prompt_tokens=engine.max_queued_prompt_tokens, started_at=self._started_at,
            **self.stream_stats())

    def check_health(self) -> None:
        self.engine.check_health()

    async def __del__(self):
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self.engine is None:  # the engine never started: nothing to stop
            return
        try:
            await self.engine.shutdown(timeout_s=self._shutdown_timeout_s)
        except Exception:  # pragma: no cover
            logger.exception("engine shutdown failed")
