"""One choice of a request: the replica's token batches of one sequence, turned into text and
log-probs as they come (stop strings cut by ``kvray.replica.detokenizer.TextStream``, the
engine's own path; TTFT and inter-token gaps measured); and the request as the serving loop
holds it while its choices' tokens come back (``RequestState``). What a choice adds is
API-neutral: text, OpenAI-shaped log-probs and tool-call deltas, which each API's module
(``openai_api``, ``responses``, ``messages``) turns into its own shapes. A choice only turns
batches into output: the serving loop reports its first token and its gaps (to the request's
``RequestLife`` and the metrics)."""
from __future__ import annotations

import time

from kvray.frontend.errors import APIError
from kvray.frontend.logprobs import TokenStrings, chat_logprobs, completion_logprobs
from kvray.frontend.prepare import Prepared
from kvray.frontend.protocol import usage
from kvray.frontend.tool_calls import tool_finish_reason
from kvray.frontend.tool_formats import ToolFormat, parse_tool_calls, request_format
from kvray.records import Refusal, TokenBatch
from kvray.replica.detokenizer import TextStream


class Choice:
    """The state of one sequence while its tokens come back. ``p`` is the request as prepared
    for this choice (its own request id and seed when ``n > 1``); ``decoder`` detokenizes,
    ``strings`` names tokens for log-probs, ``tool_format`` is the model's tool-call format."""

    def __init__(self, index: int, p: Prepared, decoder, strings: TokenStrings, tool_format: ToolFormat | None):
        self.index = index
        self.p = p
        self.stream = None  # the replica's RequestStream, once dispatched (the serving loop's)
        self.life = None    # its RequestLife in the replica book, once admitted (the serving loop's)
        # chat (and the APIs converted to chat) with tools: the output goes through the parser of its
        # tool-call format
        req = p.req
        self.tool_format = request_format(tool_format, req.tools, req.tool_choice) if p.kind != "completions" else None
        self.tools = self.tool_format.parser(req.tools) if self.tool_format is not None else None
        self.text = TextStream(decoder, p.prompt_ids, p.params.stop_strings)
        self.strings = strings
        self.gap: float | None = None  # seconds since the previous tokens, when the latest batch had some (not the first)
        self.new_first = False  # the latest batch brought the first tokens
        self.num_generated = 0
        self.cached = 0
        self.finish_reason: str | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.text_offset = len(p.echo[0]) if p.echo else 0  # generated tokens' offsets follow the echo
        self.engine_finished = False
        self.stop_reason: str | int | None = None  # the stop string or token the engine stopped at
        self.prompt_logprobs: list[dict[int, float] | None] | None = None  # from the first batch, when asked

    def add(self, batch: TokenBatch | Refusal) -> tuple[str, dict | None, bool]:
        """One replica batch -> (new text, logprobs object or None, finished)."""
        if isinstance(batch, Refusal):
            raise APIError(batch.status, batch.message)
        ids = batch.ids
        if batch.prompt_logprobs is not None:
            self.prompt_logprobs = batch.prompt_logprobs
        self.gap, self.new_first = None, False
        if ids:
            now = time.monotonic()
            self.num_generated += len(ids) if self.p.output else 0
            if self.t_first is None:
                self.t_first, self.new_first = now, True
            else:
                self.gap = now - self.t_last
            self.t_last = now
        self.cached = batch.cached_tokens or self.cached
        finish = batch.finish_reason
        if finish is not None:
            self.engine_finished = True
            self.stop_reason = batch.stop_reason
        if not self.p.output:  # echo with max_tokens 0: the prompt is all there is
            self.finish_reason = finish and "length"
            return "", None, finish is not None
        text = self.text.add(ids, finish is not None)
        if self.text.stop_string is not None:
            finish = "stop"
        if finish is not None:
            self.finish_reason = finish
        lp = None
        if self.p.params.logprobs is not None and ids and batch.logprobs is not None:
            if self.p.kind == "completions":
                lp, self.text_offset = completion_logprobs(self.strings, ids, batch.logprobs, batch.top_logprobs,
                                                           self.text_offset)
            else:
                lp = chat_logprobs(self.strings, ids, batch.logprobs, batch.top_logprobs)
        return text, lp, finish is not None

    # ---- what the client gets ---------------------------------------------------------------
    def deltas(self, text: str, finished: bool) -> list[dict]:
        """The chat ``delta`` objects for new text (none when there is nothing to send yet):
        content, or with tools the tool calls' deltas (a call goes out once it is complete)."""
        if self.tools is None:
            return [{"content": text}] if text else []
        out = self.tools.feed(text) if text else []
        return out + self.tools.finish() if finished else out

    def reason(self, finish_reason: str | None) -> str | None:
        """``"tool_calls"`` instead of ``"stop"`` when the output held tool calls."""
        if self.tools is None or finish_reason is None:
            return finish_reason
        return tool_finish_reason(finish_reason, self.tools.has_tool_calls)

    def message(self, text: str) -> tuple[str | None, list[dict], str | None]:
        """The whole output as ``(content, OpenAI tool_calls, finish_reason)``: with tools, the
        stream's parser over the whole text (the same calls either way)."""
        if self.tools is None:
            return text, [], self.finish_reason
        content, calls = parse_tool_calls(text, self.tool_format, self.p.req.tools)
        return content, calls, tool_finish_reason(self.finish_reason, bool(calls))

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did."""
        s = self.text.stop_string or self.stop_reason
        return s if isinstance(s, str) else None

    def tpot(self) -> float | None:
        if self.num_generated > 1 and self.t_first is not None and self.t_last is not None:
            return (self.t_last - self.t_first) / (self.num_generated - 1)
        return None


class RequestState:
    """One request while its choices' tokens come back (counted once, whichever path ends it)."""

    def __init__(self, p: Prepared, choices: list[Choice], predicted_ttft_s: float | None):
        self.p = p
        self.choices = choices
        self.predicted_ttft_s = predicted_ttft_s
        self.closed = False
        self.num_events = 0  # events streamed so far (for the APIs that number them)

    @property
    def num_prompt_tokens(self) -> int:  # each prompt once, whatever n is
        return sum(len(ids) for ids in self.p.prompts)

    @property
    def num_generated(self) -> int:
        return sum(c.num_generated for c in self.choices)

    @property
    def num_cached(self) -> int:  # the first choice of each prompt
        return sum(c.cached for c in self.choices[::self.p.n])

    def usage(self) -> dict:
        return usage(self.num_prompt_tokens, self.num_generated, self.num_cached)

    def close_streams(self) -> None:
        for c in self.choices:
            if c.stream is not None:  # not finished there: the client is gone, an error, or a stop string seen here
                c.stream.close(abort=not c.engine_finished)
