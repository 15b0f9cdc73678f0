"""The engine's step loop, as the serving engine runs it: in a thread, or in its own process.

``EngineLoop`` owns an ``LLMEngine``. Other threads hand it ``kvray.records.Command``s (``put``):
add a request, abort one, or stop. Between steps it takes them in, runs one step, and hands
what that step produced to its ``emit(event)`` callback: an ``Event`` of kind ``OUT`` with the
``(request_id, Delta)`` of every request the step touched (or the exception that ended one),
the engine's ``EngineStats``, and, at most every ``REQUEST_SNAPSHOT_S``, the in-flight requests
for the autoscaler.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from kvray import tracing
from kvray.records import Command, Delta, Event, EventKind, Op
from kvray.replica.sequence import Sequence

if TYPE_CHECKING:  # the step loop's module stays light: the serving replica unpickles its records
    from kvray.replica.engine import LLMEngine

REQUEST_SNAPSHOT_S = 0.1


def engine_info(engine: LLMEngine) -> dict:
    """What the serving side needs of a loaded engine: its tokenizer, limits and first stats."""
    return {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "max_num_batched_tokens": engine.max_num_batched_tokens, "stats": engine.stats(),
            "quantization": engine.runner.quantization_name, "kv_cache_dtype": engine.runner.kv_cache_dtype_name}


class EngineLoop:
    def __init__(self, engine: LLMEngine, emit):
        self.engine = engine
        self._emit = emit
        self._cond = threading.Condition()
        self._inbox: list[Command] = []
        self._sent: dict[str, int] = {}  # request id -> output tokens already emitted
        self._last_snapshot = 0.0
        self._num_added = 0  # requests taken in (admitted or refused): the queue limit counts on it

    def put(self, cmd: Command) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    def run(self) -> None:
        """Step until a STOP command; exceptions propagate (the caller reports them)."""
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_unfinished():
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
            deltas: list = []
            for cmd in inbox:
                if cmd.op is Op.ADD:
                    self._add(cmd, deltas)
                elif cmd.op is Op.ABORT:
                    seq = engine.abort(cmd.request_id)
                    if seq is not None:
                        self._collect(seq, deltas)
                elif cmd.op is Op.STOP:
                    return
            if engine.has_unfinished():
                for seq in engine.step():
                    self._collect(seq, deltas)
            if tracing.ENABLED:
                self._trace_first_tokens(deltas)
            self._emit(self._event(deltas))

    def _add(self, cmd: Command, deltas: list) -> None:
        rid = cmd.request_id
        self._num_added += 1
        if tracing.ENABLED:
            tracing.trace(rid, "engine_add")
        try:
            seq = self.engine.make_sequence(rid, cmd.prompt_token_ids, cmd.params, cmd.arrival_time, cmd.prompt)
            self.engine.add_sequence(seq)
        except Exception as e:  # noqa: BLE001 - the front end validates first; refuse just this one
            deltas.append((rid, e if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__}: {e}")))
            return
        self._sent[rid] = 0

    def _event(self, deltas: list) -> Event:
        stats = dataclasses.replace(self.engine.stats(), num_added_total=self._num_added)
        now = time.monotonic()
        requests = None
        if now - self._last_snapshot >= REQUEST_SNAPSHOT_S:
            self._last_snapshot = now
            requests = self.engine.request_snapshots()
        return Event(EventKind.OUT, deltas=deltas, stats=stats, requests=requests)

    @staticmethod
    def _trace_first_tokens(deltas: list) -> None:
        now = time.monotonic()
        for rid, d in deltas:
            if isinstance(d, Delta) and d.first_token_time is not None:
                tracing.trace(rid, "engine_first_token", d.first_token_time, first_only=True)
                tracing.trace(rid, "engine_emit", now, first_only=True)

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
            num_cached_tokens=seq.num_cached_tokens, first_token_time=seq.metrics.first_token_time,
            num_preemptions=seq.metrics.num_preemptions, queue_time_s=_queue_time(seq) if k0 == 0 else None,
            prompt_logprobs=seq.prompt_logprobs if k0 == 0 else None)))


def _queue_time(seq) -> float | None:
    m = seq.metrics
    return None if m.first_scheduled_time is None else max(0.0, m.first_scheduled_time - m.arrival_time)
