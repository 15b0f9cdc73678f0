"""The engine behind an asyncio API, for the serving layer.

A dedicated thread runs the step loop, so the event loop (HTTP, Ray Serve) never waits on
the GPU. Requests and aborts reach that thread through a locked inbox; each step's results go
back to the event loop in one ``call_soon_threadsafe`` batch.

The step loop's host work (scheduling, input building, eager kernel launches) holds the GIL for
long stretches. With CPython's default 5 ms switch interval, every wake-up of the event loop
thread (a new HTTP or Serve request, a token batch to forward) can wait that long for it, and
one request needs many such wake-ups; the engine lowers the process's switch interval to
``GIL_SWITCH_INTERVAL_S`` when it starts its thread.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

from kvray.replica.config import EngineConfig
from kvray.replica.detokenizer import IncrementalDetokenizer
from kvray.replica.engine import LLMEngine
from kvray.replica.outputs import RequestOutput
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.sequence import Sequence

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class _Delta:
    """What one step added to a request (built on the engine thread)."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float] | None] | None = None
    engine_text: str | None = None  # the engine's own text, for requests with stop strings
    num_cached_tokens: int = 0


@dataclass
class _Stream:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent_tokens: int = 0
    done: bool = False
    pending: list = field(default_factory=list)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, start: bool = True):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.block_size = config.block_size
        self.model_name = config.model
        self._lock = threading.Condition()
        self._new: list[_Stream] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._stop = False
        self._accepting = True
        self._error: BaseException | None = None
        self._stats: dict = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvray-engine", daemon=True)
        if start:
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
            self._thread.start()

    # ---- public API --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, arrival_time: float | None = None, delta: bool = False):
        """Yield a RequestOutput each time the request gains tokens; the last one has finished=True.

        With ``delta=True`` each output's ``token_ids`` / ``logprobs`` / ``top_logprobs`` hold only
        what it adds (as ``new_token_ids`` does), and text is not decoded here, except for requests
        with stop strings, whose ``new_text`` is the engine's own (cut at the stop string). For
        callers that detokenize downstream, such as the serving router: no per-step copies."""
        self.check_health()
        if not self._accepting:
            raise RuntimeError("the engine is shutting down and accepts no new requests")
        with self._lock:
            if request_id in self._streams or any(s.seq.request_id == request_id for s in self._new):
                raise ValueError(f"request id {request_id!r} is already in use")
        seq = self.engine.make_sequence(request_id, list(prompt_token_ids), params, arrival_time, prompt)
        stream = _Stream(seq, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._new.append(stream)
            self._lock.notify()
        detok = None if seq.detokenizer is not None or delta else IncrementalDetokenizer(self.tokenizer,
                                                                                          seq.prompt_token_ids)
        stop_hold = max((len(s) for s in params.stop_strings), default=1) - 1
        tokens: list[int] = []
        logprobs = [] if params.logprobs is not None else None
        tops = [] if params.logprobs else None
        text_sent = ""
        finished = False
        try:
            while not finished:
                deltas = [await stream.queue.get()]
                while not stream.queue.empty():
                    deltas.append(stream.queue.get_nowait())
                new_ids: list[int] = []
                new_lps = [] if logprobs is not None else None
                new_tops = [] if tops is not None else None
                for d in deltas:
                    if isinstance(d, BaseException):
                        raise d
                    new_ids.extend(d.new_token_ids)
                    if new_lps is not None and d.new_logprobs:
                        new_lps.extend(d.new_logprobs)
                        if new_tops is not None:
                            new_tops.extend(d.new_top_logprobs)
                last = deltas[-1]
                finished = last.finished
                if detok is not None:
                    detok.add(new_ids)
                    if finished:
                        detok.flush()
                    text = detok.text
                elif last.engine_text is not None:  # stop strings: held back by the longest one until the end
                    text = last.engine_text
                    if not finished and stop_hold:
                        text = text[:max(len(text_sent), len(text) - stop_hold)]
                else:
                    text = ""
                new_text = text[len(text_sent):]
                text_sent = text
                if not new_ids and not new_text and not finished:
                    continue
                if delta:
                    out_ids, out_lps, out_tops, out_text = new_ids, new_lps, new_tops, new_text
                else:
                    tokens.extend(new_ids)
                    if new_lps is not None:
                        logprobs.extend(new_lps)
                    if new_tops is not None:
                        tops.extend(new_tops)
                    out_ids, out_text = list(tokens), text
                    out_lps = list(logprobs) if logprobs is not None else None
                    out_tops = list(tops) if tops is not None else None
                yield RequestOutput(
                    request_id=request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=out_ids,
                    text=out_text, finished=finished, finish_reason=last.finish_reason if finished else None,
                    stop_reason=last.stop_reason if finished else None, logprobs=out_lps, top_logprobs=out_tops,
                    num_cached_tokens=last.num_cached_tokens, metrics=seq.metrics,
                    new_token_ids=new_ids, new_text=new_text, prompt=prompt)
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed on the engine thread's next turn."""
        with self._lock:
            self._aborts.append(request_id)
            self._lock.notify()

    def stats(self) -> dict:
        """The latest engine statistics (a snapshot taken by the engine thread after each step)."""
        return dict(self._stats)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine loop died: {self._error!r}")
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stop:
            raise RuntimeError("the engine loop thread is not running")

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout_s``, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self._streams or self._new) and self.is_alive():
            await asyncio.sleep(0.05)
        with self._lock:
            for rid in list(self._streams):
                self._aborts.append(rid)
            self._lock.notify()
        await asyncio.sleep(0.05)
        with self._lock:
            self._stop = True
            self._lock.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._new and not self._aborts and not self.engine.has_unfinished():
                        self._lock.wait()
                    if self._stop:
                        break
                    new, self._new = self._new, []
                    aborts, self._aborts = self._aborts, []
                for stream in new:
                    self._streams[stream.seq.request_id] = stream
                    self.engine.add_sequence(stream.seq)
                out: dict[asyncio.AbstractEventLoop, list] = {}
                for rid in aborts:
                    self._abort_now(rid, out)
                if self.engine.has_unfinished():
                    for seq in self.engine.step():
                        self._collect(seq, out)
                self._stats = self.engine.stats()
                self._deliver(out)
        except BaseException as e:  # the loop is dead: fail every stream instead of hanging it
            logger.exception("engine loop died")
            self._error = e
            err = RuntimeError(f"the engine loop died: {e!r}")
            for stream in list(self._streams.values()) + self._new:
                try:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
                except RuntimeError:
                    pass
            self._streams.clear()

    def _abort_now(self, rid: str, out: dict) -> None:
        stream = self._streams.get(rid)
        seq = self.engine.abort(rid)
        if stream is not None and seq is not None:
            self._collect(stream.seq, out)

    def _collect(self, seq: Sequence, out: dict) -> None:
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        n = seq.num_output_tokens
        new_ids = seq.token_ids[seq.num_prompt_tokens + stream.sent_tokens:]
        k0 = stream.sent_tokens
        stream.sent_tokens = n
        finished = seq.is_finished
        delta = _Delta(
            new_token_ids=new_ids, finished=finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            new_logprobs=seq.logprobs[k0:n] if seq.logprobs is not None else None,
            new_top_logprobs=seq.top_logprobs[k0:n] if seq.top_logprobs is not None else None,
            engine_text=seq.detokenizer.text if seq.detokenizer is not None else None,
            num_cached_tokens=seq.num_cached_tokens)
        out.setdefault(stream.loop, []).append((stream.queue, delta))
        if finished:
            self._streams.pop(seq.request_id, None)

    @staticmethod
    def _deliver(out: dict) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass


def _put_all(items) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)
