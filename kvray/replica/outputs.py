"""What the engine hands back for a request, and how the async engine builds it from the step
loop's deltas (``OutputBuilder``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvray.records import Delta
from kvray.replica.detokenizer import TextStream
from kvray.replica.sampling_params import SamplingParams


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The state of one request.

    ``token_ids`` and ``text`` are everything generated so far; ``new_token_ids`` /
    ``new_text`` are what this output adds to the previous one of the same request (the
    streaming delta). ``finish_reason`` is one of ``"stop"``, ``"length"``, ``"abort"`` once
    ``finished`` is true.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[float] | None = None  # log-prob of each generated token
    top_logprobs: list[dict[int, float]] | None = None  # per token: the top-n alternatives
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    prompt: str | None = None
    # per prompt token: {token: log-prob} of it and the top alternatives (None for the first);
    # with SamplingParams.prompt_logprobs, else None
    prompt_logprobs: list[dict[int, float] | None] | None = None


class OutputBuilder:
    """One request's ``Delta``s (what the step loop sends) -> its ``RequestOutput``s, for
    ``AsyncLLMEngine.generate``: cumulative, or with ``delta`` only what each output adds (no
    per-step copies). The text comes from a ``TextStream`` (the engine's and the Router's one
    stop-string path); with ``delta`` and no stop strings there is no text (the caller
    detokenizes downstream)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, decoder,
                 metrics: RequestMetrics, prompt: str | None, delta: bool):
        self.request_id, self.prompt_token_ids, self.metrics, self.prompt = request_id, prompt_token_ids, metrics, prompt
        self.delta = delta
        self.text = None if delta and not params.stop_strings else \
            TextStream(decoder, prompt_token_ids, params.stop_strings)
        self.want_logprobs, self.want_tops = params.logprobs is not None, bool(params.logprobs)
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if self.want_logprobs else None
        self.tops: list | None = [] if self.want_tops else None
        self.prompt_logprobs = None  # on the first delta, when asked for

    def add(self, deltas: list[Delta | BaseException]) -> RequestOutput | None:
        """The output for the deltas that came together (None when they add nothing and the
        request goes on). Raises the exception a delta carries (the request failed)."""
        new_ids: list[int] = []
        new_lps = [] if self.want_logprobs else None
        new_tops = [] if self.want_tops else None
        for d in deltas:
            if isinstance(d, BaseException):
                raise d
            new_ids.extend(d.new_token_ids)
            self.prompt_logprobs = d.prompt_logprobs or self.prompt_logprobs
            if new_lps is not None and d.new_logprobs:
                new_lps.extend(d.new_logprobs)
                if new_tops is not None:
                    new_tops.extend(d.new_top_logprobs)
        last = deltas[-1]
        finished = last.finished
        m = self.metrics
        m.first_token_time, m.num_preemptions = last.first_token_time, last.num_preemptions
        if finished:
            m.finished_time = time.monotonic()
        new_text = self.text.add(new_ids, finished) if self.text is not None else ""
        if not new_ids and not new_text and not finished:
            return None
        if self.delta:
            ids, lps, tops, text = new_ids, new_lps, new_tops, new_text
        else:
            self.tokens.extend(new_ids)
            if new_lps is not None:
                self.logprobs.extend(new_lps)
            if new_tops is not None:
                self.tops.extend(new_tops)
            t = self.text  # what has been sent: stop strings hold back the end of it while running
            ids, text = list(self.tokens), t.text if t.sent == len(t.text) else t.text[:t.sent]
            lps = list(self.logprobs) if self.logprobs is not None else None
            tops = list(self.tops) if self.tops is not None else None
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids, token_ids=ids, text=text,
            finished=finished, finish_reason=last.finish_reason if finished else None,
            stop_reason=last.stop_reason if finished else None, logprobs=lps, top_logprobs=tops,
            num_cached_tokens=last.num_cached_tokens, metrics=m, new_token_ids=new_ids, new_text=new_text,
            prompt=self.prompt, prompt_logprobs=self.prompt_logprobs)
