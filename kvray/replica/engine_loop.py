"""The engine's step loop, as the serving engine runs it: in a thread, or in its own process.

``EngineLoop`` owns an ``LLMEngine``. Other threads hand it messages (``put``): a new request
``("add", request_id, prompt_token_ids, params, arrival_time, prompt)``, ``("abort", request_id)``
or ``("stop",)``. Between steps it takes them in, runs one step, and hands everything that step
produced to its ``emit(deltas, stats)`` callback: ``deltas`` is a list of ``(request_id, Delta)``
and ``stats`` the engine's statistics (``step_times`` holds only the steps since the last
emit; ``requests``, the in-flight requests for the autoscaling prediction, is refreshed at most
every ``REQUEST_SNAPSHOT_S``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvray import tracing
from kvray.replica.sequence import Sequence

if TYPE_CHECKING:  # the step loop's module stays light: the serving replica unpickles its Delta
    from kvray.replica.engine import LLMEngine

REQUEST_SNAPSHOT_S = 0.1


@dataclass
class Delta:
    """What one step added to a request."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float] | None] | None = None
    engine_text: str | None = None  # the engine's own text, for requests with stop strings
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    num_preemptions: int = 0


def request_states(engine: LLMEngine) -> list[tuple]:
    """In-flight requests as ``kvray.platform.autoscaling.ReqState`` fields (monotonic clock)."""
    sched = engine.scheduler
    states = []
    for s in list(sched.running) + list(sched.waiting):
        p, m = s.params, s.metrics
        left = max(0, s.num_tokens - s.num_computed_tokens) if m.first_token_time is None else 0
        states.append((m.arrival_time, m.first_token_time, left, s.num_output_tokens, p.max_tokens,
                       p.ttft_ms / 1000.0 if p.ttft_ms else None, p.tpot_ms / 1000.0 if p.tpot_ms else None,
                       s.deadline))
    return states


def engine_info(engine: LLMEngine) -> dict:
    """What the serving side needs of a loaded engine: its tokenizer, limits and first stats."""
    return {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "max_num_batched_tokens": engine.max_num_batched_tokens, "stats": engine.stats()}


class EngineLoop:
    def __init__(self, engine: LLMEngine, emit):
        self.engine = engine
        self._emit = emit
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._sent: dict[str, int] = {}  # request id -> output tokens already emitted
        self._last_step_t = 0.0
        self._last_snapshot = 0.0
        self._num_added = 0  # "add" messages taken in (admitted or refused): the queue limit counts on it

    def put(self, msg: tuple) -> None:
        with self._cond:
            self._inbox.append(msg)
            self._cond.notify()

    def run(self) -> None:
        """Step until a ``("stop",)`` message; exceptions propagate (the caller reports them)."""
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_unfinished():
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
            deltas: list = []
            for msg in inbox:
                if msg[0] == "add":
                    _, rid, prompt_ids, params, arrival, prompt = msg
                    self._num_added += 1
                    if tracing.ENABLED:
                        tracing.trace(rid, "engine_add")
                    try:
                        seq = engine.make_sequence(rid, prompt_ids, params, arrival, prompt)
                        engine.add_sequence(seq)
                    except Exception as e:  # noqa: BLE001 - the front end validates first; refuse just this one
                        deltas.append((rid, e if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__}: {e}")))
                        continue
                    self._sent[rid] = 0
                elif msg[0] == "abort":
                    seq = engine.abort(msg[1])
                    if seq is not None:
                        self._collect(seq, deltas)
                elif msg[0] == "stop":
                    return
            if engine.has_unfinished():
                for seq in engine.step():
                    self._collect(seq, deltas)
            if tracing.ENABLED:
                self._trace_first_tokens(deltas)
            self._emit(deltas, self._stats())

    @staticmethod
    def _trace_first_tokens(deltas: list) -> None:
        now = time.monotonic()
        for rid, d in deltas:
            if isinstance(d, Delta) and d.first_token_time is not None:
                tracing.trace(rid, "engine_first_token", d.first_token_time, first_only=True)
                tracing.trace(rid, "engine_emit", now, first_only=True)

    def _stats(self) -> dict:
        stats = self.engine.stats()
        stats["num_added_total"] = self._num_added
        stats["step_times"] = [r for r in stats["step_times"] if r[0] > self._last_step_t]
        if stats["step_times"]:
            self._last_step_t = stats["step_times"][-1][0]
        now = time.monotonic()
        if now - self._last_snapshot >= REQUEST_SNAPSHOT_S:
            self._last_snapshot = now
            stats["requests"] = request_states(self.engine)
        return stats

    def _collect(self, seq: Sequence, deltas: list) -> None:
        rid = seq.request_id
        if rid not in self._sent:
            return
        if seq.error is not None:  # the engine failed this request (it carried on without it)
            del self._sent[rid]
            deltas.append((rid, RuntimeError(f"the engine failed this request: {seq.error}")))
            return
        k0, n = self._sent[rid], seq.num_output_tokens
        finished = seq.is_finished
        if finished:
            del self._sent[rid]
        else:
            self._sent[rid] = n
        deltas.append((rid, Delta(
            new_token_ids=seq.token_ids[seq.num_prompt_tokens + k0:], finished=finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            new_logprobs=seq.logprobs[k0:n] if seq.logprobs is not None else None,
            new_top_logprobs=seq.top_logprobs[k0:n] if seq.top_logprobs is not None else None,
            engine_text=seq.detokenizer.text if seq.detokenizer is not None else None,
            num_cached_tokens=seq.num_cached_tokens, first_token_time=seq.metrics.first_token_time,
            num_preemptions=seq.metrics.num_preemptions)))
