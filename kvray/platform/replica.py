"""``LLMReplica``: one kvray engine per Serve replica (one per GPU).

* ``generate`` streams token batches (a streaming DeploymentHandle call from the Router): each
  item is a small dict ``{"ids", "lp", "top", "finish", "stop_reason", "cached"}``, or
  ``{"error", "status"}`` as the only item when the engine refuses the request.
* ``record_routing_stats`` is polled by the Serve controller and broadcast to the routers:
  the engine's stats plus the replica's outstanding-token count and a wall-clock ``time``.
* ``check_health`` raises once the engine loop died, so Serve replaces the replica.
* Shutdown: Serve first drains in-flight calls (up to the deployment's
  ``graceful_shutdown_timeout_s``); ``__del__`` then stops the engine, letting what is left
  finish for up to ``graceful_shutdown_timeout_s`` of the app args before aborting it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from kvray.replica.sampling_params import SamplingParams
from kvray.router.hints import RoutingHint

logger = logging.getLogger(__name__)


class _Active:
    __slots__ = ("prompt", "decode_budget", "generated", "started")

    def __init__(self, prompt: int, decode_budget: int):
        self.prompt = prompt
        self.decode_budget = decode_budget
        self.generated = 0
        self.started = False

    def outstanding(self) -> int:
        return (0 if self.started else self.prompt) + max(0, self.decode_budget - self.generated)


class LLMReplica:
    def __init__(self, model: str, engine_options: dict | None = None, shutdown_timeout_s: float = 30.0,
                 stream_interval_ms: float = 0.0):
        from kvray.replica.async_engine import AsyncLLMEngine  # torch & co. load here, not at import
        from kvray.replica.config import EngineConfig

        self.engine = AsyncLLMEngine(EngineConfig(model=model, **(engine_options or {})))
        self._shutdown_timeout_s = shutdown_timeout_s
        self._interval_s = max(0.0, stream_interval_ms) / 1000.0
        self._active: dict[str, _Active] = {}
        self._num_requests = 0
        self._num_aborted = 0  # streams that ended before the engine finished them (caller gone)
        try:
            from ray import serve
            self._replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests)
            self._replica_id = "local"

    async def model_info(self) -> dict:
        """What the Router needs before it can tokenize: the tokenizer itself and the limits."""
        tok = self.engine.tokenizer
        return {"tokenizer": tok, "max_model_len": self.engine.max_model_len,
                "block_size": self.engine.block_size, "model": self.engine.model_name,
                "vocab_size": getattr(self.engine.engine, "vocab_size", len(tok)),
                "replica_id": self._replica_id}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       hint: RoutingHint | None = None):
        budget = hint.decode_estimate if hint is not None else params.max_tokens
        active = _Active(len(prompt_token_ids), budget)
        self._active[request_id] = active
        self._num_requests += 1
        agen = None
        finished = False
        try:
            try:
                agen = self.engine.generate(request_id, prompt_token_ids, params)
                out = await agen.__anext__()
            except ValueError as e:  # bad input: refused before touching the engine state
                finished = True
                yield {"error": str(e), "status": 400}
                return
            except RuntimeError as e:  # shutting down, or the engine loop died
                finished = True
                yield {"error": str(e), "status": 503}
                return
            active.started = True
            pending = None
            last_yield = 0.0
            while True:
                batch = _batch(out)
                active.generated += len(batch["ids"])
                if pending is not None:
                    batch = _merge(pending, batch)
                    pending = None
                now = time.monotonic()
                if out.finished:
                    finished = True
                    yield batch
                    return
                if self._interval_s and last_yield and now - last_yield < self._interval_s:
                    pending = batch
                else:
                    last_yield = now
                    yield batch
                out = await agen.__anext__()
        finally:
            self._active.pop(request_id, None)
            if agen is not None:
                if not finished:
                    self._num_aborted += 1
                    self.engine.abort(request_id)  # the caller went away (or an error): free the blocks now
                try:
                    await agen.aclose()
                except Exception:  # pragma: no cover
                    pass

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats()
        stats["time"] = time.time()
        stats["outstanding_tokens"] = sum(a.outstanding() for a in self._active.values())
        stats["num_active_requests"] = len(self._active)
        stats["num_requests_total"] = self._num_requests
        stats["num_aborted_total"] = self._num_aborted
        stats["healthy"] = self.engine.is_alive()
        stats["max_model_len"] = self.engine.max_model_len
        stats["replica_id"] = self._replica_id
        return stats

    async def stats(self) -> dict:
        """The same dict as routing stats, on demand (one replica, whichever the handle picks)."""
        return self.record_routing_stats()

    def check_health(self) -> None:
        self.engine.check_health()

    async def __del__(self):
        try:
            await self.engine.shutdown(timeout_s=self._shutdown_timeout_s)
        except Exception:  # pragma: no cover
            logger.exception("engine shutdown failed")


def _batch(out) -> dict:
    ids = list(out.new_token_ids)
    lp = top = None
    if out.logprobs is not None:
        k = len(ids)
        lp = out.logprobs[-k:] if k else []
        if out.top_logprobs is not None:
            top = out.top_logprobs[-k:] if k else []
    return {"ids": ids, "lp": lp, "top": top, "finish": out.finish_reason if out.finished else None,
            "stop_reason": out.stop_reason if out.finished else None, "cached": out.num_cached_tokens}


def _merge(a: dict, b: dict) -> dict:
    out = dict(b)
    out["ids"] = a["ids"] + b["ids"]
    if a["lp"] is not None and b["lp"] is not None:
        out["lp"] = a["lp"] + b["lp"]
    if a["top"] is not None and b["top"] is not None:
        out["top"] = a["top"] + b["top"]
    return out
