"""From an HTTP body to an engine request: parse and validate the OpenAI request, resolve its SLO
class, tokenize the prompt (chat: through the chat template), check it against the context
length, and build its ``SamplingParams`` and ``RoutingHint``. Everything that can be wrong
with a request is an ``APIError`` (400/404) from here, before any replica sees it.

The other APIs (Responses, Anthropic Messages) convert their request to a chat request and
come in through ``prepare_parsed``. A completions request may carry several prompts (``prompt``
as a list of strings or token lists): one ``Prepared`` holds them all, and ``choice(k)`` is
choice ``k`` of the response (prompt ``k // n``, sample ``k % n``)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from kvray.frontend.body import parse_json, parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.protocol import ChatCompletionRequest, CompletionRequest
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
    n: int = 1  # choices per prompt
    model: str = ""  # the model name responses carry
    more_prompts: list[list[int]] = dataclasses.field(default_factory=list)  # batched prompts after the first
    echo: list[str] | None = None  # completions with echo: the text of each prompt
    output: bool = True  # False: echo with max_tokens 0 (the one token the engine makes is not shown)
    source: Any = None  # the request as its own API sent it (Responses, Messages)

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt_ids, *self.more_prompts]

    @property
    def num_choices(self) -> int:
        return self.n * (1 + len(self.more_prompts))

    def choice(self, k: int) -> "Prepared":
        """Choice ``k`` of the response, a request of its own: prompt ``k // n``, its own request
        id (but choice 0), and its own seed when the request has one (seed + ``k % n``), so that
        the choices of one prompt differ but replay."""
        if k == 0:
            return dataclasses.replace(self, more_prompts=[], echo=self.echo[:1] if self.echo else None)
        i, j = divmod(k, self.n)
        seed = self.params.seed
        if seed is not None and j:
            seed = seed + j if seed + j <= SEED_MAX else seed - j
        return dataclasses.replace(self, rid=f"{self.rid}-{k}", prompt_ids=self.prompts[i], more_prompts=[],
                                   echo=self.echo[i:i + 1] if self.echo else None,
                                   params=dataclasses.replace(self.params, seed=seed))

    def hint(self, block_size: int, decode_estimate_cap: int) -> RoutingHint:
        # a request with prompt log-probs computes its whole prompt: no prefix-cache hit to route by
        hashes = prefix_block_hashes(self.prompt_ids, block_size) if self.params.prompt_logprobs is None else []
        return RoutingHint(request_id=self.rid, num_prompt_tokens=len(self.prompt_ids),
                           decode_estimate=min(self.params.max_tokens, decode_estimate_cap),
                           block_hashes=hashes, block_size=block_size, slo=self.slo,
                           # when the HTTP handler got it (parsing and tokenizing count against the TTFT)
                           arrival_time=time.time() - (time.monotonic() - self.t0))


@dataclass
class Served:
    """What every request is checked against: the model and the SLO classes."""

    info: ModelInfo
    model_names: list[str]
    slo_classes: dict[str, SLOTarget]
    default_slo_class: str


MAX_CHOICES_PER_REQUEST = 256  # batched prompts x n


async def prepare(kind: str, body: bytes, headers, t0: float, *, info: ModelInfo, model_names: list[str],
                  slo_classes: dict[str, SLOTarget], default_slo_class: str) -> Prepared:
    req = parse_request(CompletionRequest if kind == "completions" else ChatCompletionRequest, parse_json(body))
    return await prepare_parsed(kind, req, len(body), headers, t0,
                                Served(info, model_names, slo_classes, default_slo_class))


async def prepare_parsed(kind: str, req, body_len: int, headers, t0: float, served: Served) -> Prepared:
    """``req``: a parsed CompletionRequest (``kind`` "completions") or ChatCompletionRequest."""
    info, names = served.info, served.model_names
    if req.model is not None and req.model not in names:
        raise APIError(404, f"The model '{req.model}' does not exist. Served: {', '.join(names)}",
                       param="model", code="model_not_found")
    try:
        slo = resolve_slo(served.slo_classes, served.default_slo_class, header_class=headers.get("x-slo-class"),
                          body_class=req.slo_class, header_ttft_ms=headers.get("x-slo-ttft-ms"),
                          header_tpot_ms=headers.get("x-slo-tpot-ms"))
    except SLOError as e:
        raise APIError(400, str(e), param=e.param) from None
    constraint = await off_loop_if(body_len, lambda: structured_outputs(req))
    if kind == "chat" and req.tools:  # tool_choice "required" / a named function: a constraint of its own
        constraint = await off_loop_if(body_len, lambda: _tool_outputs(req, info, constraint))
    prompts = await (_completion_prompts(req, info) if kind == "completions" else chat_prompt(req, info))
    if len(prompts) * (req.n or 1) > MAX_CHOICES_PER_REQUEST:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n or 1} choices is more than "
                       f"{MAX_CHOICES_PER_REQUEST} choices in one request", param="prompt")
    max_tokens = max(_max_tokens(kind, req, len(ids), info.max_model_len) for ids in prompts)
    echo = req.echo if kind == "completions" else False
    logprobs = req.logprobs if kind == "completions" else ((req.top_logprobs or 0) if req.logprobs else None)
    prompt_logprobs = max((k for k in (req.prompt_logprobs, logprobs if echo else None) if k is not None),
                          default=None)
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max(1, max_tokens), stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos), seed=req.seed, logprobs=logprobs, min_tokens=req.min_tokens or 0,
            slo=slo, structured_outputs=constraint, prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
    texts = _echo_texts(req, prompts, info) if echo else None
    return Prepared(kind, req, rid, prompts[0], params, slo, t0, n=req.n or 1, model=req.model or names[0],
                    more_prompts=prompts[1:], echo=texts, output=max_tokens > 0)


def _max_tokens(kind: str, req, n: int, limit: int) -> int:
    """The request's max_tokens for a prompt of ``n`` tokens (checked against the context length)."""
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
    return max_tokens


def _echo_texts(req: CompletionRequest, prompts: list[list[int]], info: ModelInfo) -> list[str]:
    """The text each prompt is echoed as: the prompt string as sent, or its tokens decoded."""
    given = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) \
        else [req.prompt]
    return [g if isinstance(g, str) else info.tokenizer.decode(ids, skip_special_tokens=False)
            for g, ids in zip(given, prompts)]


async def _completion_prompts(req: CompletionRequest, info: ModelInfo) -> list[list[int]]:
    """The token ids of each prompt: one, or several (a list of strings or token lists)."""
    prompt = req.prompt
    batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    out = []
    for item in (prompt if batched else [prompt]):
        out.append(await _completion_prompt(item, info))
    return out


async def _completion_prompt(prompt: str | list[int], info: ModelInfo) -> list[int]:
    if isinstance(prompt, str):
        info.check_prompt_chars(len(prompt), "prompt")
        return await off_loop_if(len(prompt), lambda: list(info.tokenizer(prompt).input_ids))
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


async def chat_prompt(req: ChatCompletionRequest, info: ModelInfo) -> list[list[int]]:
    messages = [_message(m) for m in req.messages]
    tools = tool_dicts(req.tools) or None  # shown to the template for tool_choice "none" too, as vLLM does
    chars = sum(len(m["content"]) + sum(len(c["function"]["name"]) + len(json.dumps(c["function"]["arguments"]))
                                        for c in m.get("tool_calls", ())) for m in messages)
    chars += len(json.dumps(tools)) if tools else 0
    info.check_prompt_chars(chars, "messages")
    tok = info.tokenizer
    extra = {"tools": tools} if tools else {}

    def render() -> list[list[int]]:
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt is not False,
                                           **extra, **(req.chat_template_kwargs or {}))
            return [list(tok(text, add_special_tokens=False).input_ids)]
        except Exception as e:  # no template, a template that rejects these messages, bad kwargs...
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None

    return await off_loop_if(chars, render)


async def off_loop_if(num_chars: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` inline for short text; in a worker thread for long text, so that tokenizing a large
    prompt never stalls the event loop that streams every other request's tokens (the
    tokenizers library releases the GIL while it works)."""
    if num_chars <= INLINE_TOKENIZE_CHARS:
        return fn()
    return await asyncio.to_thread(fn)
