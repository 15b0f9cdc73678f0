"""Anthropic's Messages API (``POST /v1/messages``): the request model, its conversion to a chat
request (which kvray prepares like any chat completion), and Anthropic's error shape.

Supported: ``system`` (a string or text blocks), ``messages`` whose content is a string or
``text``, ``tool_use`` (assistant) and ``tool_result`` (user) blocks, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``stop_sequences``, ``stream``, ``tools`` (custom tools
with an ``input_schema``) and ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``, with
``disable_parallel_tool_use``), ``metadata`` (ignored), and kvray's ``seed`` and ``slo_class``.
A 400 names what is not: images and documents, thinking, server tools, MCP servers, containers.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvray.frontend.body import parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.protocol import ChatCompletionRequest
from kvray.replica.sampling_params import MAX_INT, MAX_STOP_STRINGS, SEED_MAX, SEED_MIN

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error(e: APIError) -> dict:
    """``{"type": "error", "error": {"type", "message"}}`` with Anthropic's error types."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


class ToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int = Field(ge=1, le=MAX_INT)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=MAX_INT)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    # kvray extensions
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    slo_class: str | None = None
    # refused
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    container: Any = None

    def checks(self) -> None:
        if self.thinking and self.thinking.get("type") != "disabled":
            raise APIError(400, "thinking is not supported", param="thinking")
        if self.mcp_servers:
            raise APIError(400, "mcp_servers is not supported", param="mcp_servers")
        if self.container is not None:
            raise APIError(400, "container is not supported", param="container")
        if any(not s for s in self.stop_sequences or ()):
            raise APIError(400, "stop_sequences must be non-empty strings", param="stop_sequences")


def _text(blocks: Any, where: str) -> str:
    """The text of a string or a list of text blocks."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(400, f"{where} must be a string or a list of content blocks")
    parts = []
    for b in blocks:
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise APIError(400, f"{where}: content block of type {kind!r} is not supported here (only text)")
        parts.append(b["text"])
    return "".join(parts)


def _message(m: dict, i: int) -> list[dict]:
    """One Anthropic message as chat messages: tool results become tool messages."""
    where, role, content = f"messages.{i}", m.get("role"), m.get("content")
    if role not in ("user", "assistant"):
        raise APIError(400, f"{where}.role: {role!r} is not 'user' or 'assistant'")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content blocks")
    out, text, calls = [], [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("input"), dict):
                raise APIError(400, f"{where}.content.{j}: a tool_use block needs an object 'input'")
            calls.append({"id": b.get("id"), "type": "function",
                          "function": {"name": b.get("name"), "arguments": json.dumps(b["input"])}})
        elif kind == "tool_result" and role == "user":
            body = b.get("content", "")
            out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                        "content": _text(body, f"{where}.content.{j}.content")})
        else:
            raise APIError(400, f"{where}.content.{j}: content block of type {kind!r} is not supported in a {role} "
                           "message (user: text, tool_result; assistant: text, tool_use)")
    if text or calls or not out:
        out.append({"role": role, "content": "".join(text) if text or not calls else None,
                    **({"tool_calls": calls} if calls else {})})
    return out


def _tool(t: dict, i: int) -> dict:
    if t.get("type") not in (None, "custom") or "input_schema" not in t:
        raise APIError(400, f"tools.{i}: server tool type {t.get('type')!r} is not supported (only custom tools "
                       "with an input_schema)")
    fn = {"name": t.get("name"), "parameters": t["input_schema"]}
    if t.get("description") is not None:
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: ToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice: type 'tool' needs a 'name'")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat request that generates this message."""
    messages = [{"role": "system", "content": _text(req.system, "system")}] if req.system else []
    for i, m in enumerate(req.messages):
        messages += _message(m, i)
    body: dict[str, Any] = {"messages": messages, "stream": bool(req.stream), "model": req.model,
                            "max_tokens": req.max_tokens}
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    choice = _tool_choice(req.tool_choice)
    extra = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "stop": req.stop_sequences,
             "seed": req.seed, "slo_class": req.slo_class, "tool_choice": choice,
             "parallel_tool_calls": False if req.tool_choice and req.tool_choice.disable_parallel_tool_use else None}
    body.update({k: v for k, v in extra.items() if v is not None})
    if choice is not None and not req.tools:
        body.pop("tool_choice")  # Anthropic allows a tool_choice without tools: nothing to choose
    return parse_request(ChatCompletionRequest, body)
