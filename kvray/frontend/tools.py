"""Tool calls for chat completions: the model's output in its chat template's tool-call format,
parsed into OpenAI ``tool_calls`` (whole or streamed), and ``tool_choice`` enforced through
structured outputs.

Two template families are known (``template_family`` tells them apart by the chat template):

* ``"hermes"`` (Qwen2.5 / Qwen3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks, anywhere in the output; the text around them is the message content;
* ``"llama3"`` (Llama 3.1 / 3.2 JSON tool calling): the whole output is ``{"name": ...,
  "parameters": {...}}`` (``"arguments"`` accepted too), or several such objects joined by ``;``.

A block whose JSON does not parse, or that names a function not in ``tools``, stays content.
``tool_choice="required"`` and a named function constrain the output with an xgrammar
structural tag, whose argument JSON follows each tool's schema in compact form (no free
whitespace: even a random-weight model comes to an end). ``"none"`` and ``"auto"`` constrain
nothing; with ``"none"`` the tools are still shown to the template (as vLLM does) but the output
is not parsed. This module raises ``ValueError`` only; the protocol layer turns it into a 400.
"""
from __future__ import annotations

import functools
import json
import uuid
from typing import Any, Iterable

from kvray.replica.grammar import build_grammar, compile_error
from kvray.replica.sampling_params import StructuredOutputs

HERMES, LLAMA3 = "hermes", "llama3"
FAMILIES = (HERMES, LLAMA3)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
NO_ARGUMENTS = {"type": "object", "properties": {}}  # a function declared without parameters
# Raw control characters are let through inside strings (xgrammar 0.2.9's rule for a string
# with a maxLength admits them, unless patched as kvray.replica.grammar does); the arguments
# are written back with json.dumps, escaped.
_DECODER = json.JSONDecoder(strict=False)


# ---- tools, schemas, families ---------------------------------------------------------------
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


def template_family(tokenizer_or_template: Any) -> str | None:
    """``"hermes"`` when the chat template renders ``<tool_call>`` blocks, ``"llama3"`` for a
    Llama 3 header template, None otherwise (tools are then rendered but never parsed)."""
    t = tokenizer_or_template
    if not isinstance(t, str):
        t = getattr(t, "chat_template", None)
    if isinstance(t, dict):  # a tokenizer with several named templates
        t = t.get("tool_use") or t.get("default")
    return _family(t) if isinstance(t, str) else None


@functools.lru_cache(maxsize=16)
def _family(template: str) -> str | None:
    if _OPEN in template:
        return HERMES
    if "<|start_header_id|>" in template:
        return LLAMA3
    return None


def choice_name(tool_choice: Any) -> str | None:
    """The function a named ``tool_choice`` forces (a model or the JSON dict), else None."""
    if tool_choice is None or isinstance(tool_choice, str):
        return None
    return _as_dict(tool_choice)["function"]["name"]


def parses_tool_calls(tools: Any, tool_choice: Any) -> bool:
    """Whether the response of a request with these fields goes through the tool-call parser."""
    return bool(tools) and tool_choice != "none"


def response_parser(req: Any, tokenizer: Any) -> "ToolCallStream | None":
    """A fresh parser for the output of this chat request, or None when its output is plain
    content (no tools, tool_choice "none", or a chat template of no known tool-call format)."""
    if not parses_tool_calls(getattr(req, "tools", None), getattr(req, "tool_choice", None)):
        return None
    family = template_family(tokenizer)
    return ToolCallStream(family, req.tools) if family else None


def tool_finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    """The response's ``finish_reason``: ``"tool_calls"`` instead of ``"stop"`` when the output
    held tool calls (``"length"`` and the rest stay)."""
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(obj: Any, names: set[str], keys: tuple[str, ...]) -> dict | None:
    """An OpenAI tool call from a parsed ``{"name": ..., <key>: {...}}``, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments as JSON text
        try:
            args = _DECODER.decode(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag that may be coming)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---- parsing --------------------------------------------------------------------------------
class ToolCallStream:
    """Incremental tool-call parser of one response. ``feed(text)`` takes the next piece of
    output text and returns the OpenAI ``delta`` dicts to send: ``{"content": ...}`` for text,
    and for each tool call ``{"tool_calls": [{"index", "id", "type", "function": {"name",
    "arguments": ""}}]}`` followed by ``{"tool_calls": [{"index", "function": {"arguments"}}]}``.
    ``finish()`` flushes what was held back. A call is held until it is complete, text that may
    begin a ``<tool_call>`` tag until it is told apart, and trailing whitespace until more text
    follows (it is dropped at the end when there were calls). Llama 3 output that starts with
    ``{`` is held to the end. ``calls`` holds the calls found, in order. With ``family=None``
    (a template of no known format) all text passes through as content."""

    def __init__(self, family: str | None, tools: Any):
        if family is not None and family not in FAMILIES:
            raise ValueError(f"unknown tool-call format {family!r} (known: {', '.join(FAMILIES)})")
        self.family = family
        self.names = set(tool_schemas(tools))
        self.calls: list[dict] = []
        self._buf = ""
        self._in_call = False       # hermes: inside a <tool_call> block
        self._json: bool | None = None  # llama3: the output is (maybe) JSON calls; None: not known yet
        self._ws = ""               # held trailing whitespace of the content
        self._out: list[dict] = []

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        self._scan(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        self._scan(final=True)
        if self._ws and not self.calls:
            self._content_out(self._ws)
        self._ws = ""
        return self._take()

    # -- output
    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        if not text:
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        self._content_out(body)

    def _content_out(self, text: str) -> None:
        if not text:
            return
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append({"content": text})

    def _emit_call(self, call: dict) -> None:
        i = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        self._out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                          "function": {"name": fn["name"], "arguments": ""}}]})
        self._out.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})

    # -- scanning
    def _scan(self, final: bool) -> None:
        if self.family is None:  # no known format: everything is content, as it comes
            self._content_out(self._buf)
            self._buf = ""
        elif self.family == HERMES:
            self._scan_hermes(final)
        else:
            self._scan_llama3(final)

    def _scan_hermes(self, final: bool) -> None:
        while True:
            buf = self._buf
            if not self._in_call:
                i = buf.find(_OPEN)
                if i >= 0:
                    self._content(buf[:i])
                    self._buf, self._in_call = buf[i + len(_OPEN):], True
                    continue
                keep = 0 if final else _partial_suffix(buf, _OPEN)
                self._content(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return
            status, call, used = self._hermes_block(buf)
            if status == "wait" and not final:
                return
            if status == "call":
                self._emit_call(call)
            else:  # broken (or never closed): the block is text
                used = used or len(buf)
                self._content(_OPEN + buf[:used])
            self._buf, self._in_call = buf[used:], False

    def _hermes_block(self, body: str) -> tuple[str, dict | None, int]:
        """("call", call, chars used) | ("broken", None, chars used) | ("wait", None, 0) for the
        text after a ``<tool_call>`` tag. Each ``</tool_call>`` in turn may end the block (a JSON
        string may hold the tag); JSON that parses but is no call breaks the block, and so does
        JSON that does not parse when another ``<tool_call>`` follows."""
        p = body.find(_CLOSE)
        while p >= 0:
            end = p + len(_CLOSE)
            try:
                obj = _DECODER.decode(body[:p])
            except ValueError:
                if _OPEN in body[end:]:
                    return "broken", None, end
                p = body.find(_CLOSE, end)
                continue
            call = _call(obj, self.names, ("arguments", "parameters"))
            return ("call", call, end) if call else ("broken", None, end)
        return "wait", None, 0

    def _scan_llama3(self, final: bool) -> None:
        if self._json is None:
            head = self._buf.lstrip()
            if head.startswith(_PYTHON_TAG) or head.startswith("{"):
                self._json = True
            elif head and not (_PYTHON_TAG.startswith(head)):
                self._json = False
            elif not final:
                return  # only whitespace, or what may be the start of <|python_tag|>, so far
        if self._json and not final:
            return
        if self._json:
            calls = _llama3_calls(self._buf, self.names)
            for call in calls or ():
                self._emit_call(call)
            if calls:
                self._buf = ""
        self._content(self._buf)
        self._buf = ""


def _llama3_calls(text: str, names: set[str]) -> list[dict] | None:
    """The calls of an output made only of ``{"name", "parameters"}`` objects joined by ``;``."""
    s = text.strip()
    if s.startswith(_PYTHON_TAG):
        s = s[len(_PYTHON_TAG):]
    dec, pos, calls = _DECODER, 0, []
    while True:
        while pos < len(s) and s[pos].isspace():
            pos += 1
        try:
            obj, pos = dec.raw_decode(s, pos)
        except ValueError:
            return None
        call = _call(obj, names, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        while pos < len(s) and s[pos].isspace():
            pos += 1
        if pos == len(s):
            return calls
        if s[pos] != ";":
            return None
        pos += 1


def parse_tool_calls(text: str, family: str | None, tools: Any) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output: the calls in the OpenAI shape (``id``,
    ``type``, ``function.name``, ``function.arguments`` as JSON text) and the text outside them
    (None when there were calls and nothing but whitespace is left; the whole text when no call
    was found). Exactly what ``ToolCallStream`` streams for the same text."""
    stream = ToolCallStream(family, tools)
    deltas = stream.feed(text) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return (content if content or not stream.calls else None), stream.calls


# ---- enforcing tool_choice ------------------------------------------------------------------
_FORMATS = {  # family -> (begin of one call before the name, between name and arguments, end, separator)
    HERMES: ('<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>", "\n"),
    LLAMA3: ('{"name": ', ', "parameters": ', "}", "; "),
}


@functools.lru_cache(maxsize=256)
def _compact_json_grammar(schema_json: str) -> str:
    """The EBNF of JSON that follows this schema, with no whitespace besides json.dumps's
    ``", "`` and ``": "`` (so a random-weight model cannot emit whitespace forever): the
    engine's own grammar for a json_schema constraint."""
    return str(build_grammar(StructuredOutputs(json_schema=schema_json)))


def tool_constraint(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
                    family: str | None) -> StructuredOutputs | None:
    """The structured-outputs constraint that enforces ``tool_choice``: None for ``"none"``,
    ``"auto"`` and no tool_choice; for ``"required"``, one or more calls (exactly one when
    ``parallel_tool_calls`` is false) of any of ``tools``; for a named function exactly one call
    of it; each call's arguments following that tool's parameters schema. ``ValueError`` when
    it cannot be built (no known family, an unknown name, a schema xgrammar rejects)."""
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    schemas = tool_schemas(tools)
    name = choice_name(tool_choice)
    if name is not None:
        if name not in schemas:
            raise ValueError(f"tool_choice names the function '{name}', which is not in tools")
        schemas, single = {name: schemas[name]}, True
    elif tool_choice == "required":
        single = parallel_tool_calls is False
    else:
        raise ValueError(f"unknown tool_choice {tool_choice!r}")
    if family not in _FORMATS:
        raise ValueError(f"tool_choice={tool_choice if isinstance(tool_choice, str) else 'function'} cannot be "
                         "enforced: this model's chat template has no known tool-call format")
    begin, mid, end, sep = _FORMATS[family]
    tags = []
    for fname, schema in schemas.items():
        try:
            grammar = _compact_json_grammar(json.dumps(schema))
        except ValueError as e:  # GrammarError
            raise ValueError(f"tool '{fname}': its parameters are not a usable JSON schema: {e}") from None
        tags.append({"type": "tag", "begin": begin + json.dumps(fname) + mid,
                     "content": {"type": "grammar", "grammar": grammar}, "end": end})
    text = json.dumps({"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": tags, "separator": sep, "at_least_one": True,
        "stop_after_first": single}})
    why = compile_error(StructuredOutputs(structural_tag=text))
    if why:
        raise ValueError(f"cannot build the tool-call grammar: {why}")
    return StructuredOutputs(structural_tag=text)
