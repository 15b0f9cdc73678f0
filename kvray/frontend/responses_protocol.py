"""OpenAI's Responses API (``POST /v1/responses``), stateless: the request model and its
conversion to a chat request, which kvray then prepares like any chat completion (template,
tools, structured outputs, SLO class).

Supported: ``input`` as a string or a list of items (messages with text content, and the
``function_call`` / ``function_call_output`` items of earlier turns), ``instructions`` (a system
message first), ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (``text``,
``json_object``, ``json_schema``), function ``tools`` with ``tool_choice`` (auto, required,
none, or a named function) and ``parallel_tool_calls``, ``stream``, ``metadata`` (echoed), and
kvray's ``top_k``, ``seed`` and ``slo_class``. What needs stored state or tools kvray does not
run is a 400 naming the field: ``previous_response_id``, ``store: true``, ``background``,
``conversation``, ``prompt``, built-in tools, non-empty ``include``, ``top_logprobs``,
``max_tool_calls``, ``truncation: auto``, and input that is not text (images, files).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvray.frontend.body import parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.protocol import ChatCompletionRequest
from kvray.replica.sampling_params import MAX_INT, SEED_MAX, SEED_MIN

_TEXT_PARTS = ("input_text", "output_text", "text")
# chat-request names in error messages -> the Responses API's
RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


class TextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    format: dict[str, Any] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    # kvray / vLLM-style extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_INT)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    slo_class: str | None = None
    # refused unless unset (stateful, or not run by kvray)
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    truncation: Literal["auto", "disabled"] | None = None

    def checks(self) -> None:
        refused = {"previous_response_id": "stored responses are not kept (kvray's Responses API is stateless)",
                   "conversation": "stored conversations are not kept (kvray's Responses API is stateless)",
                   "prompt": "stored prompt templates are not supported", "max_tool_calls": "it is not supported"}
        for name, why in refused.items():
            if getattr(self, name) is not None:
                raise APIError(400, f"{name} is not supported: {why}; send the whole input instead", param=name)
        if self.store:
            raise APIError(400, "store=true is not supported: kvray's Responses API is stateless (send store: false)",
                           param="store")
        if self.background:
            raise APIError(400, "background mode is not supported", param="background")
        if self.include:
            raise APIError(400, f"include {self.include} is not supported", param="include")
        if self.top_logprobs:
            raise APIError(400, "top_logprobs is not supported", param="top_logprobs")
        if self.truncation == "auto":
            raise APIError(400, "truncation='auto' is not supported (a prompt too long for the context is a 400)",
                           param="truncation")
        if self.top_k == 0:
            raise APIError(400, "top_k=0 must be -1 or >= 1", param="top_k")


def _function_tool(t: dict, i: int) -> dict:
    kind = t.get("type")
    if kind != "function":
        raise APIError(400, f"tools[{i}]: built-in tool type {kind!r} is not supported (only 'function' tools)",
                       param="tools")
    if not isinstance(t.get("name"), str):
        raise APIError(400, f"tools[{i}]: a function tool needs a 'name'", param="tools")
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, f"tool_choice {json.dumps(choice)[:200]} is not supported (only 'none', 'auto', "
                   "'required' or {'type': 'function', 'name': ...})", param="tool_choice")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param="input")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: content part of type {kind!r} is not supported (only text)",
                           param="input")
        parts.append(part["text"])
    return "".join(parts)


def _messages(req: ResponsesRequest) -> list[dict]:
    """The input items as chat messages (function calls join the assistant message before them)."""
    out: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}: role {role!r} is not one of user, assistant, system, developer",
                               param="input")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":  # else: the assistant's text, then its calls
                last = {"role": "assistant", "content": None}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"), where)})
        else:
            raise APIError(400, f"{where}: input item of type {kind!r} is not supported (only message, "
                           "function_call, function_call_output)", param="input")
    return out


def _response_format(fmt: dict | None) -> dict | None:
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {"type": fmt["type"]}  # json_object, or a type the chat path names in its 400


def renamed(e: APIError) -> APIError:
    """An error of the chat path in the Responses API's names."""
    msg = e.message
    for old, new in RENAMED.items():
        msg = msg.replace(f"'{old}", f"'{new}").replace(f"{old}=", f"{new}=").replace(f"invalid {old}", f"invalid {new}")
    param = RENAMED.get(e.param, e.param) if e.param else None
    return APIError(e.status, msg, type=e.type, param=param, code=e.code, headers=e.headers)


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that generates this response."""
    body = {"messages": _messages(req), "stream": bool(req.stream)}
    if req.tools:
        body["tools"] = [_function_tool(t, i) for i, t in enumerate(req.tools)]
    extra = {"model": req.model, "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
             "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed, "slo_class": req.slo_class,
             "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
             "response_format": _response_format(req.text.format if req.text else None)}
    body.update({k: v for k, v in extra.items() if v is not None})
    try:
        return parse_request(ChatCompletionRequest, body)
    except APIError as e:
        raise renamed(e) from None
