"""From an HTTP body to an engine request: parse and validate the OpenAI request, resolve its SLO
class, tokenize the prompt (chat: through the chat template), check it against the context
length, and build its ``SamplingParams`` and ``RoutingHint``. Everything that can be wrong
with a request is an ``APIError`` (400/404) from here, before any replica sees it."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from kvray.frontend.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_json, parse_request
from kvray.frontend.structured import structured_outputs
from kvray.frontend.tool_calls import new_call_id, tool_dicts
from kvray.frontend.tool_formats import ToolFormat, resolve_tool_format
from kvray.frontend.tool_grammar import tool_constraint
from kvray.records import RoutingHint
from kvray.replica.block_hash import prefix_block_hashes
from kvray.replica.sampling_params import SEED_MAX, SamplingParams
from kvray.slo import SLOError, SLOTarget, resolve_slo

INLINE_TOKENIZE_CHARS = 16384  # longer prompts are tokenized (and chat-templated) off the event loop


@dataclass
class ModelInfo:
    tokenizer: Any
    max_model_len: int
    block_size: int
    vocab_size: int
    tool_call_parser: str = "auto"  # args.tool_call_parser
    quantization: str | None = None   # how the weights are stored, in words (None: as the checkpoint's dtype)
    kv_cache_dtype: str = ""
    kv_cache_tokens: int = 0          # KV capacity of one replica

    def __post_init__(self) -> None:
        # the model's tool-call format (None: tool_choice=auto gives text), chosen (and logged) once
        self.tool_format: ToolFormat | None = resolve_tool_format(self.tool_call_parser, self.tokenizer)
        # The most characters one token can stand for (vocabulary strings hold at least one
        # character per character of text): a prompt of more than max_model_len * this many
        # characters cannot fit, and is refused without being tokenized. x2 for normalizers.
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self.max_token_chars = 2 * max((len(t) for t in vocab), default=64)

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_model_len * self.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {num_chars} characters, more than that many tokens can hold.",
                           param=param, code="context_length_exceeded")


@dataclass
class Prepared:
    """A validated request, ready to be routed."""

    kind: str  # "completions" | "chat"
    req: Any   # the parsed CompletionRequest / ChatCompletionRequest
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: SLOTarget
    t0: float  # time.monotonic() when the HTTP handler got it
    n: int = 1  # choices

    def child(self, index: int) -> "Prepared":
        """Choice ``index`` (> 0) of an ``n > 1`` request: its own request id, and its own seed
        when the request has one (seed + index), so that the choices differ but replay."""
        seed = self.params.seed
        if seed is not None:
            seed = seed + index if seed + index <= SEED_MAX else seed - index
        return dataclasses.replace(self, rid=f"{self.rid}-{index}", params=dataclasses.replace(self.params, seed=seed))

    def hint(self, block_size: int, decode_estimate_cap: int) -> RoutingHint:
        slo = self.slo
        return RoutingHint(request_id=self.rid, num_prompt_tokens=len(self.prompt_ids),
                           decode_estimate=min(self.params.max_tokens, decode_estimate_cap),
                           block_hashes=prefix_block_hashes(self.prompt_ids, block_size), block_size=block_size,
                           slo_class=slo.name, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, priority=slo.priority,
                           on_infeasible=slo.on_infeasible,
                           # when the HTTP handler got it (parsing and tokenizing count against the TTFT)
                           arrival_time=time.time() - (time.monotonic() - self.t0))


async def prepare(kind: str, body: bytes, headers, t0: float, *, info: ModelInfo, model_names: list[str],
                  slo_classes: dict[str, SLOTarget], default_slo_class: str) -> Prepared:
    req = parse_request(CompletionRequest if kind == "completions" else ChatCompletionRequest, parse_json(body))
    if req.model is not None and req.model not in model_names:
        raise APIError(404, f"The model '{req.model}' does not exist. Served: {', '.join(model_names)}",
                       param="model", code="model_not_found")
    try:
        slo = resolve_slo(slo_classes, default_slo_class, header_class=headers.get("x-slo-class"),
                          body_class=req.slo_class, header_ttft_ms=headers.get("x-slo-ttft-ms"),
                          header_tpot_ms=headers.get("x-slo-tpot-ms"))
    except SLOError as e:
        raise APIError(400, str(e), param=e.param) from None
    constraint = await _off_loop_if(len(body), lambda: structured_outputs(req))
    if kind == "chat" and req.tools:  # tool_choice "required" / a named function: a constraint of its own
        constraint = await _off_loop_if(len(body), lambda: _tool_outputs(req, info, constraint))
    prompt_ids = await (_completion_prompt(req, info) if kind == "completions" else _chat_prompt(req, info))
    n = len(prompt_ids)
    limit = info.max_model_len
    if n == 0:
        raise APIError(400, "the prompt is empty", param="prompt" if kind == "completions" else "messages")
    if n >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has {n} "
                       "tokens; no room is left for the completion.", param="messages" if kind == "chat"
                       else "prompt", code="context_length_exceeded")
    if kind == "completions":
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        mt_param = "max_tokens"
    else:
        max_tokens = req.requested_max_tokens
        mt_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = limit - n
    if n + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                       param=mt_param, code="context_length_exceeded")
    logprobs = req.logprobs if kind == "completions" else ((req.top_logprobs or 0) if req.logprobs else None)
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos), seed=req.seed, logprobs=logprobs, min_tokens=req.min_tokens or 0,
            slo_class=slo.name, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, priority=slo.priority,
            structured_outputs=constraint)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
    return Prepared(kind, req, rid, prompt_ids, params, slo, t0, n=req.n or 1)


async def _completion_prompt(req: CompletionRequest, info: ModelInfo) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts (a list of several prompts) are not supported; send one "
                           "prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        info.check_prompt_chars(len(prompt), "prompt")
        return await _off_loop_if(len(prompt), lambda: list(info.tokenizer(prompt).input_ids))
    vocab = info.vocab_size
    for t in prompt:
        if t < 0 or t >= vocab:
            raise APIError(400, f"prompt token id {t} is outside the vocabulary [0, {vocab})", param="prompt")
    return list(prompt)


def _tool_outputs(req: ChatCompletionRequest, info: ModelInfo, other):
    """The constraint that enforces the request's tool_choice (None for none/auto), or ``other``
    (the response_format one) when there is none; both at once is a 400."""
    try:
        tool = tool_constraint(req.tools, req.tool_choice, req.parallel_tool_calls, info.tool_format)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    if tool is not None and other is not None:
        raise APIError(400, f"tool_choice={req.tool_choice_mode!r} cannot be combined with a structured-outputs "
                       "constraint (response_format / structured_outputs / guided_*)", param="tool_choice")
    return tool if tool is not None else other


def _message(m) -> dict:
    """A request message as the chat template sees it: ``tool_calls`` with their arguments as
    objects (as Hugging Face templates expect), ``tool_call_id`` on tool messages."""
    d = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id or new_call_id(), "type": "function",
                            "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


async def _chat_prompt(req: ChatCompletionRequest, info: ModelInfo) -> list[int]:
    messages = [_message(m) for m in req.messages]
    tools = tool_dicts(req.tools) or None  # shown to the template for tool_choice "none" too, as vLLM does
    chars = sum(len(m["content"]) + sum(len(c["function"]["name"]) + len(json.dumps(c["function"]["arguments"]))
                                        for c in m.get("tool_calls", ())) for m in messages)
    chars += len(json.dumps(tools)) if tools else 0
    info.check_prompt_chars(chars, "messages")
    tok = info.tokenizer
    extra = {"tools": tools} if tools else {}

    def render() -> list[int]:
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt is not False,
                                           **extra, **(req.chat_template_kwargs or {}))
            return list(tok(text, add_special_tokens=False).input_ids)
        except Exception as e:  # no template, a template that rejects these messages, bad kwargs...
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None

    return await _off_loop_if(chars, render)


async def _off_loop_if(num_chars: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` inline for short text; in a worker thread for long text, so that tokenizing a large
    prompt never stalls the event loop that streams every other request's tokens (the
    tokenizers library releases the GIL while it works)."""
    if num_chars <= INLINE_TOKENIZE_CHARS:
        return fn()
    return await asyncio.to_thread(fn)
