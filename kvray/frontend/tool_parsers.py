"""Incremental tool-call parsers: a model's output text in one format, turned into OpenAI chat
``delta`` dicts as it comes, and the same parser over a whole text (``parse_all``). Here the
base and the formats of tagged blocks amid text (hermes, qwen3_coder); the formats whose whole
output is a list of calls (llama3_json, json_array, pythonic) are in ``tool_list_parsers``.

``feed(text)`` takes the next piece of output and returns the deltas to send: ``{"content":
...}`` for text, and for each tool call ``{"tool_calls": [{"index", "id", "type", "function":
{"name", "arguments": ""}}]}`` followed by ``{"tool_calls": [{"index", "function":
{"arguments"}}]}``. ``finish()`` flushes what was held back. A call goes out once it is complete;
text that may still become a call is held until it is told apart; trailing whitespace of the
content waits for more text (and is dropped at the end when there were calls).

Output that is not a well-formed call of one of the request's tools (bad JSON or Python, an
unknown function, arguments that are no object) is content: a parser never raises on what a
model wrote.
"""
from __future__ import annotations

import re
from typing import Any

from kvray.frontend.tool_calls import call_from_object, decode_json, make_call, tool_schemas


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag that may be coming)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """The base: everything is content, passed on as it comes (a request whose output is never
    parsed for calls). Subclasses read one format in ``_scan``."""

    def __init__(self, tools: Any):
        self.names = set(tool_schemas(tools))
        self.calls: list[dict] = []
        self._buf = ""   # text not yet told apart
        self._ws = ""    # held trailing whitespace of the content
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

    def _scan(self, final: bool) -> None:
        self._content_out(self._buf)
        self._buf = ""

    # -- output
    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        """Content, its trailing whitespace held back."""
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


class HermesStream(ToolCallStream):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks anywhere in the
    output (Qwen2.5, Qwen3, Hermes); the text around them is content. A block whose body is not
    a call stays content, tags and all."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, tools: Any):
        super().__init__(tools)
        self._in_call = False

    def _body(self, body: str) -> tuple[bool, dict | None]:
        """``(parsed, call)`` for the text between the tags: parsed False when it is not even
        JSON (a later close tag may end the block), call None when it parses but is no call."""
        body = body.strip()
        found = decode_json(body)
        if found is None or found[1] != len(body):
            return False, None
        return True, call_from_object(found[0], self.names, ("arguments", "parameters"))

    def _scan(self, final: bool) -> None:
        while True:
            buf = self._buf
            if not self._in_call:
                i = buf.find(self.OPEN)
                if i >= 0:
                    self._content(buf[:i])
                    self._buf, self._in_call = buf[i + len(self.OPEN):], True
                    continue
                keep = 0 if final else _partial_suffix(buf, self.OPEN)
                self._content(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return
            status, call, used = self._block(buf)
            if status == "wait" and not final:
                return
            if status == "call":
                self._emit_call(call)
            else:  # broken (or never closed): the block is text
                used = used or len(buf)
                self._content(self.OPEN + buf[:used])
            self._buf, self._in_call = buf[used:], False

    def _block(self, body: str) -> tuple[str, dict | None, int]:
        """("call", call, chars used) | ("broken", None, chars used) | ("wait", None, 0) for the
        text after an open tag. Each close tag in turn may end the block (a JSON string may
        hold the tag); a body that parses but is no call breaks the block, and so does one that
        does not parse when another open tag follows."""
        p = body.find(self.CLOSE)
        while p >= 0:
            end = p + len(self.CLOSE)
            parsed, call = self._body(body[:p])
            if not parsed:
                if self.OPEN in body[end:]:
                    return "broken", None, end
                p = body.find(self.CLOSE, end)
                continue
            return ("call", call, end) if call else ("broken", None, end)
        return "wait", None, 0


class Qwen3CoderStream(HermesStream):
    """Qwen3-Coder's XML calls (Qwen3.5 and Qwen3.6 write them too): ``<tool_call>`` blocks, as in
    hermes, each holding ``<function=NAME>``, then ``<parameter=KEY>\\nVALUE\\n</parameter>`` per
    argument, then ``</function>``. A value is text: a string parameter (by the tool's schema)
    takes it as written (less one whitespace character at each end, the template's line
    breaks); any other value is read as JSON (Python's True/False/None too), else kept as text."""

    _FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>", re.DOTALL)
    _PARAM = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>\s*", re.DOTALL)

    def __init__(self, tools: Any):
        super().__init__(tools)
        self._schemas = tool_schemas(tools)

    def _body(self, body: str) -> tuple[bool, dict | None]:
        m = self._FUNCTION.fullmatch(body.strip())
        if m is None:
            return False, None
        name, inner, pos, args = m.group(1).strip(), m.group(2), 0, {}
        props = (self._schemas.get(name) or {}).get("properties")
        props = props if isinstance(props, dict) else {}
        while pos < len(inner):
            p = self._PARAM.match(inner, pos)
            if p is None:
                return (True, None) if inner[pos:].strip() else (True, make_call(name, args, self.names))
            args[p.group(1).strip()] = _xml_value(p.group(2), props.get(p.group(1).strip()))
            pos = p.end()
        return True, make_call(name, args, self.names)


_PY_LITERALS = {"True": True, "False": False, "None": None}


def _xml_value(raw: str, schema: Any) -> Any:
    text = raw[1:] if raw[:1].isspace() else raw
    text = text[:-1] if text[-1:].isspace() else text
    schema = schema if isinstance(schema, dict) else {}
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types is not None else []
    if "null" in types and text.strip() in ("null", "None"):
        return None
    if _is_string(schema, types):
        return text
    found = decode_json(text.strip())
    if found is not None and found[1] == len(text.strip()):
        return found[0]
    return _PY_LITERALS.get(text.strip(), text)


def _is_string(schema: dict, types: list) -> bool:
    if types:
        return "string" in types
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    return bool(values) and all(isinstance(v, str) for v in values)


def parse_all(stream: ToolCallStream, text: str) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output through a fresh ``stream``: the calls in
    the OpenAI shape and the text outside them (None when there were calls and nothing but
    whitespace is left; the whole text when no call was found). Exactly what the stream sends
    for the same text, piece by piece."""
    deltas = stream.feed(text) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return (content if content or not stream.calls else None), stream.calls
