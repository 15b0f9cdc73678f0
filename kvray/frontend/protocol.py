"""The OpenAI HTTP API's requests (pydantic models) and its small response shapes (usage, the
model list); the error shape is ``kvray.frontend.errors``, reading a body ``kvray.frontend.body``.

Requests are validated strictly (a wrong JSON type is a 400, never coerced); fields the API
defines but kvray does not support are rejected with a 400 naming them, unknown fields are
ignored (as clients send vendor extras). Responses are built as plain dicts: the streaming
path is hot.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvray.frontend.errors import APIError
from kvray.replica.grammar import compile_error
from kvray.replica.sampling_params import (
    MAX_INT,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    SEED_MAX,
    SEED_MIN,
    StructuredOutputs,
)

MAX_N = 16  # choices per request


# ---- requests -----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(1, ge=-MAX_INT, le=MAX_INT)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kvray / vLLM-style extensions
    top_k: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    min_tokens: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=1024)
    slo_class: str | None = None
    prompt_logprobs: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)  # vLLM's: per prompt token, with top-k
    # structured outputs (read by kvray.frontend.structured): OpenAI's response_format, and
    # vLLM's structured_outputs object and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def common_checks(self) -> None:
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n={self.n} must be in [1, {MAX_N}]", param="n")
        if self.temperature is not None and not (0.0 <= self.temperature <= 2.0):
            raise APIError(400, f"temperature={self.temperature} must be in [0, 2]", param="temperature")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise APIError(400, f"top_p={self.top_p} must be in (0, 1]", param="top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        if self.top_k is not None and (self.top_k == 0 or self.top_k < -1):
            raise APIError(400, f"top_k={self.top_k} must be -1 or >= 1", param="top_k")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise APIError(400, f"min_tokens={self.min_tokens} must be >= 0", param="min_tokens")
        if self.stop_token_ids and any(not 0 <= t <= MAX_INT for t in self.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {MAX_INT}]", param="stop_token_ids")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs={self.prompt_logprobs} must be in [0, {MAX_LOGPROBS}]",
                           param="prompt_logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=-MAX_INT, le=MAX_INT)
    logprobs: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    suffix: str | None = None

    def checks(self) -> None:
        self.common_checks()
        if self.max_tokens is not None and self.max_tokens < (0 if self.echo else 1):
            raise APIError(400, f"max_tokens={self.max_tokens} must be >= 1 (0 only with echo)", param="max_tokens")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise APIError(400, f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of={self.best_of} is not supported (only 1)", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (None: no arguments)
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str = ""  # JSON text, as the API sends it (a tool_choice names only the function)


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionCall


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None           # tool messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise APIError(400, f"message content part of type {p.type!r} is not supported (only text)",
                               param="messages")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    max_completion_tokens: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = True
    # extensions
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None

    def checks(self) -> None:
        self.common_checks()
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise APIError(400, f"{name}={v} must be >= 1", param=name)
        if self.top_logprobs is not None:
            if not (0 <= self.top_logprobs <= MAX_LOGPROBS):
                raise APIError(400, f"top_logprobs={self.top_logprobs} must be in [0, {MAX_LOGPROBS}]",
                               param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs is not supported with stream=true", param="prompt_logprobs")
        self.tool_checks()

    def tool_checks(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        for dup in (n for i, n in enumerate(names) if n in names[:i]):
            raise APIError(400, f"tools: the function name '{dup}' appears more than once", param="tools")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise APIError(400, "tool_choice is only allowed when tools are specified", param="tool_choice")
        if isinstance(choice, ToolChoiceFunction) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not in tools",
                           param="tool_choice")
        for t in self.tools or ():
            if t.function.parameters is not None:
                why = compile_error(StructuredOutputs(json_schema=json.dumps(t.function.parameters)))
                if why:
                    raise APIError(400, f"tool '{t.function.name}': its parameters are not a usable JSON schema: "
                                   f"{why}", param="tools", code="invalid_value")
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages may carry tool_calls", param="messages")
            for c in m.tool_calls or ():
                if not _is_json_object(c.function.arguments):
                    raise APIError(400, f"messages[{i}]: the arguments of tool call '{c.function.name}' are not a "
                                   "JSON object", param="messages")

    @property
    def tool_choice_mode(self) -> str:
        """"none" | "auto" | "required" | "function" (a named function: see ``tool_choice``)."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return "function" if isinstance(self.tool_choice, ToolChoiceFunction) else self.tool_choice

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def models_list(names: list[str], created: int | None = None) -> dict:
    created = created or int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "kvray"}
                                       for n in names]}
