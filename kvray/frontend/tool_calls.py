"""The vocabulary of tool calls that the parsers, the format registry and the grammars share:
the request's tools as plain dicts and schemas, what its ``tool_choice`` asks for, and one
OpenAI ``tool_calls`` entry built from what a model wrote.

Nothing here raises on model output: text that is not a call gives None.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Iterable

NO_ARGUMENTS = {"type": "object", "properties": {}}  # a function declared without parameters
# Raw control characters are let through inside strings (xgrammar's rule for a string with a
# maxLength admits them, unless patched as kvray.replica.grammar does; and models write them);
# the arguments are written back with json.dumps, escaped.
_DECODER = json.JSONDecoder(strict=False)


def _as_dict(x: Any) -> dict:
    return x.model_dump(exclude_none=True) if hasattr(x, "model_dump") else dict(x)


def tool_dicts(tools: Iterable[Any] | None) -> list[dict]:
    """The tools in the OpenAI shape ``{"type": "function", "function": {...}}`` as plain dicts
    (unset fields left out): what the chat template is given."""
    return [_as_dict(t) for t in tools or ()]


def tool_schemas(tools: Iterable[Any] | None) -> dict[str, dict]:
    """Function name -> its parameters schema (``NO_ARGUMENTS`` when it declares none)."""
    out = {}
    for t in tool_dicts(tools):
        fn = t.get("function") or {}
        params = fn.get("parameters")
        out[fn["name"]] = params if params is not None else NO_ARGUMENTS
    return out


def choice_name(tool_choice: Any) -> str | None:
    """The function a named ``tool_choice`` forces (a model or the JSON dict), else None."""
    if tool_choice is None or isinstance(tool_choice, str):
        return None
    return _as_dict(tool_choice)["function"]["name"]


def forces_calls(tools: Any, tool_choice: Any) -> bool:
    """Whether the request's output must be tool calls: ``"required"`` or a named function."""
    return bool(tools) and (tool_choice == "required" or choice_name(tool_choice) is not None)


def parses_tool_calls(tools: Any, tool_choice: Any) -> bool:
    """Whether the response of a request with these fields may hold tool calls."""
    return bool(tools) and tool_choice != "none"


def tool_finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    """The response's ``finish_reason``: ``"tool_calls"`` instead of ``"stop"`` when the output
    held tool calls (``"length"`` and the rest stay)."""
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def decode_json(text: str, pos: int = 0) -> tuple[Any, int] | None:
    """``(value, end)`` of the JSON value at ``text[pos:]``, or None where there is none (also
    for nesting too deep for the decoder: a model's output never raises)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def make_call(name: Any, args: Any, names: set[str]) -> dict | None:
    """An OpenAI tool call of function ``name`` with arguments ``args`` (an object, or JSON text
    of one: some models send that), or None when the name is not one of ``names`` or the
    arguments are no object."""
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(args, str):
        found = decode_json(args.strip())
        if found is None or found[1] != len(args.strip()):
            return None
        args = found[0]
    if not isinstance(args, dict):
        return None
    try:
        text = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # a value JSON cannot hold (NaN; pythonic output: a set...)
        return None
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def call_from_object(obj: Any, names: set[str], keys: tuple[str, ...]) -> dict | None:
    """An OpenAI tool call from a parsed ``{"name": ..., <key>: {...}}`` (the first of ``keys``
    present holds the arguments; none: no arguments), or None."""
    if not isinstance(obj, dict):
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    return make_call(obj.get("name"), args, names)
