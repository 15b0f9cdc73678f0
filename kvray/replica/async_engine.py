"""The engine behind an asyncio API, for the serving layer.

The step loop (``kvray.replica.engine_loop``) never runs on the event loop, so HTTP and Ray
Serve work never waits on the GPU. It runs in one of two places:

* ``process=False``: a thread of this process. The loop's host work (scheduling, input
  building, eager kernel launches) then holds this process's GIL for long stretches.
* ``process=True``: a child process of its own (``kvray.replica.engine_process``), with a GIL
  of its own. What the serving replica runs: its event loop then only moves requests and
  tokens, and a reader thread hands it each step's results.

Either way each step's results reach the event loop in one ``call_soon_threadsafe`` batch, and
the engine shortens the process's GIL switch interval (``kvray.gil``), so that hand-off does not
wait out CPython's default 5 ms.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from kvray import tracing
from kvray.gil import shorten_switch_interval
from kvray.records import Command, Delta, EngineStats, Event, Op, RequestSnapshot
from kvray.replica.config import EngineConfig
from kvray.replica.detokenizer import FastDecoder
from kvray.replica.engine_loop import EngineLoop, engine_info
from kvray.replica.engine_process import EngineProcess, EngineProcessError
from kvray.replica.outputs import OutputBuilder, RequestMetrics
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.sequence import validate_prompt

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 1.0


class QueueFull(RuntimeError):
    """The engine's queue is at its limit (``max_queued_requests`` / ``max_queued_prompt_tokens``):
    the request was refused before it touched the engine. Retry later, or elsewhere."""

    def __init__(self, message: str, retry_after_s: float = QUEUE_FULL_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    sink: Callable[[Delta | BaseException], None]


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, start: bool = True, process: bool = False,
                 on_death: Callable[[BaseException], None] | None = None):
        """``on_death(error)`` is called once, on the step loop's side, if the loop dies (after
        every open stream got the error): the serving replica exits then, so Serve replaces it
        at once instead of after several failed health checks."""
        self._on_death = on_death
        self.model_name = config.model
        self.block_size = config.block_size
        self.scheduling_policy = config.scheduling_policy
        self._streams: dict[str, _Stream] = {}
        self._accepting = True
        self._stopped = False
        self._error: BaseException | None = None
        self._requests: list[RequestSnapshot] = []
        self._process = None
        self.engine = None  # the in-process LLMEngine (thread mode only; process mode never imports torch here)
        if start:
            shorten_switch_interval()
        if process:
            self._process = EngineProcess(config, self._on_output, self._fail)
            info = self._process.info
            self._send = self._process.send
        else:
            from kvray.replica.engine import LLMEngine
            self.engine = LLMEngine(config)
            info = engine_info(self.engine)
            self._loop = EngineLoop(self.engine, self._on_output)
            self._send = self._loop.put
            self._thread = threading.Thread(target=self._run_thread, name="kvray-engine", daemon=True)
        self.tokenizer, self.max_model_len = info["tokenizer"], info["max_model_len"]
        self.decoder = FastDecoder.wrap(self.tokenizer)
        self.vocab_size, self.max_num_batched_tokens = info["vocab_size"], info["max_num_batched_tokens"]
        self._stats: EngineStats = info["stats"]
        self.quantization, self.kv_cache_dtype = info["quantization"], info["kv_cache_dtype"]
        self.max_num_seqs = config.max_num_seqs
        self.max_queued_requests = config.max_queued_requests or config.max_num_seqs
        self.max_queued_prompt_tokens = config.max_queued_prompt_tokens or 16 * self.max_num_batched_tokens
        self._num_submitted = 0
        self._in_transit: deque[tuple[int, int]] = deque()  # (submit number, prompt tokens) not yet in stats
        if start and not process:
            self._thread.start()

    # ---- public API --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, arrival_time: float | None = None, delta: bool = False):
        """Yield a RequestOutput each time the request gains tokens; the last one has finished=True.

        With ``delta=True`` each output's ``token_ids`` / ``logprobs`` / ``top_logprobs`` hold only
        what it adds (as ``new_token_ids`` does), and text is not decoded here, except for requests
        with stop strings (cut at the stop string as the engine cuts it). For callers that
        detokenize downstream: no per-step copies."""
        queue: asyncio.Queue = asyncio.Queue()
        metrics = self.submit(request_id, prompt_token_ids, params, queue.put_nowait, prompt, arrival_time)
        out = OutputBuilder(request_id, list(prompt_token_ids), params, self.decoder, metrics, prompt, delta)
        finished = False
        try:
            while not finished:
                deltas = [await queue.get()]
                while not queue.empty():
                    deltas.append(queue.get_nowait())
                o = out.add(deltas)
                if o is not None:
                    finished = o.finished
                    yield o
        finally:
            if not finished:
                self.abort(request_id)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               sink: Callable[[Delta | BaseException], None], prompt: str | None = None,
               arrival_time: float | None = None) -> RequestMetrics:
        """Start a request without a generator: ``sink`` is called on this thread's event loop with
        each step's ``Delta`` of it (the last one has ``finished``), or with the exception that
        ends it. Bad input raises ValueError here, a dead or stopping engine RuntimeError. The
        leanest path for a caller with many streams (the serving replica); ``generate`` is built
        on it."""
        self.check_health()
        if not self._accepting:
            raise RuntimeError("the engine is shutting down and accepts no new requests")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.check()  # validated once: at construction, or here if changed since
        prompt_token_ids = list(prompt_token_ids)
        validate_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)
        self._check_queue(len(prompt_token_ids))
        metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self._streams[request_id] = _Stream(asyncio.get_running_loop(), sink)
        if tracing.ENABLED:
            tracing.trace(request_id, "engine_submit")
        self._send(Command(Op.ADD, request_id, prompt_token_ids, params, metrics.arrival_time, prompt))
        self._num_submitted += 1
        self._in_transit.append((self._num_submitted, len(prompt_token_ids)))
        return metrics

    def queue_depth(self) -> tuple[int, int]:
        """(requests, prompt tokens) waiting for a batch slot: the step loop's latest count plus
        what was submitted since it last reported (which takes free batch slots first)."""
        stats = self._stats
        transit = self._in_transit
        while transit and transit[0][0] <= stats.num_added_total:
            transit.popleft()
        requests = max(stats.num_waiting, stats.num_running + stats.num_waiting + len(transit) - self.max_num_seqs)
        return requests, stats.queued_prefill_tokens + sum(n for _, n in transit)

    def _check_queue(self, prompt_tokens: int) -> None:
        requests, tokens = self.queue_depth()
        if requests >= self.max_queued_requests:
            raise QueueFull(f"the engine's queue is full ({requests} requests waiting, limit "
                            f"max_queued_requests={self.max_queued_requests})")
        if requests and tokens + prompt_tokens > self.max_queued_prompt_tokens:
            raise QueueFull(f"the engine's queue is full ({tokens} prompt tokens waiting, limit "
                            f"max_queued_prompt_tokens={self.max_queued_prompt_tokens})")

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed on the step loop's next turn."""
        if self._stopped or self._error is not None:
            return
        try:
            self._send(Command(Op.ABORT, request_id))
        except RuntimeError:  # the engine process just died: it holds no blocks any more
            pass

    def stats(self) -> EngineStats:
        """The engine statistics as of the latest step."""
        return self._stats

    def request_snapshots(self) -> list[RequestSnapshot]:
        """In-flight requests, as of at most ``engine_loop.REQUEST_SNAPSHOT_S`` ago (for autoscaling)."""
        return self._requests

    def is_alive(self) -> bool:
        if self._error is not None:
            return False
        return self._process.is_alive() if self._process is not None else self._thread.is_alive()

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(_death_message(self._error))
        if not self._stopped and not self.is_alive() and (self._process is not None or self._thread.ident):
            raise RuntimeError("the engine loop is not running")

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout_s``, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._streams and self.is_alive():
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        await asyncio.sleep(0.05)
        self._stopped = True
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._process.stop)
        elif self._thread.ident is not None:
            self._send(Command(Op.STOP))
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ---- the step loop's side (its thread, or the process reader's) -------------------------
    def _run_thread(self) -> None:
        try:
            self._loop.run()
        except BaseException as e:
            logger.exception("engine loop died")
            self._fail(e)

    def _on_output(self, event: Event) -> None:
        if event.requests is not None:
            self._requests = event.requests
        self._stats = event.stats
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, delta in event.deltas:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if isinstance(delta, BaseException) or delta.finished:
                del self._streams[rid]
            by_loop.setdefault(stream.loop, []).append((rid, stream.sink, delta))
        _deliver(by_loop)

    def _fail(self, error: BaseException | None) -> None:
        """The loop is gone: fail every open stream instead of hanging it."""
        if error is None:  # a requested stop
            return
        self._error = error
        err = RuntimeError(_death_message(error))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in list(self._streams):
            stream = self._streams.pop(rid, None)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((rid, stream.sink, err))
        _deliver(by_loop)
        if self._on_death is not None:
            self._on_death(error)


def _death_message(error: BaseException) -> str:
    """What the requests of a dead engine are told. The process's own message says how it died
    ("the engine process died (killed by SIGKILL)"); a loop that raised says what it raised."""
    return str(error) if isinstance(error, EngineProcessError) else f"the engine loop died: {error}"


def _deliver(by_loop: dict) -> None:
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass


def _put_all(items) -> None:
    if tracing.ENABLED:
        for rid, _, delta in items:
            if not isinstance(delta, BaseException) and delta.first_token_time is not None:
                tracing.trace(rid, "engine_delta", first_only=True)
    for _, sink, delta in items:
        try:
            sink(delta)
        except Exception:  # one caller's bug must not starve the others of their tokens
            logger.exception("a request's output sink failed")
