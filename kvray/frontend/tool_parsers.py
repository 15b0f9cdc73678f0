"""Incremental tool-call parsers: a model's output text in one format, turned into OpenAI chat
``delta`` dicts as it comes, and the same parser over a whole text (``parse_tool_calls``).

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

import ast
from typing import Any

from kvray.frontend.tool_calls import call_from_object, decode_json, make_call, tool_schemas


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag that may be coming)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


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


class JsonCallsStream(ToolCallStream):
    """An output made of JSON call objects ``{"name": ..., "parameters": {...}}`` (``arguments``
    read too), joined by ``SEP``, between ``OPEN`` and ``CLOSE``, after an optional ``PREFIX`` tag.
    Output that does not start that way is content. Each call goes out as soon as its object is
    complete; from the first thing that is not a call on, the rest is content (all of the
    output when no call came before it)."""

    PREFIX, OPEN, SEP, CLOSE = "", "", "", ""
    KEYS = ("parameters", "arguments")

    def __init__(self, tools: Any):
        super().__init__(tools)
        self._mode: str | None = None  # None: not known yet; "calls"; "text"
        self._pos = 0                  # in _buf: where the next item (or separator) starts
        self._item = True              # an item comes next (else a separator or the close)
        self._call_end = 0             # in _buf: the end of the last call
        self._tried = 0                # len(_buf) at the last failed decode of the next item

    def _scan(self, final: bool) -> None:
        if self._mode is None and not self._start(final):
            return
        if self._mode == "text":
            self._content(self._buf)
            self._buf = ""
            return
        while self._mode == "calls" and self._step(final):
            pass

    def _start(self, final: bool) -> bool:
        """Tell calls from text at the start of the output; False: not known yet."""
        head = self._buf.lstrip()
        if self.PREFIX and head.startswith(self.PREFIX):
            head = head[len(self.PREFIX):].lstrip()
        first = self.OPEN or "{"
        if head.startswith(first):
            self._mode = "calls"
            self._pos = len(self._buf) - len(head) + len(self.OPEN)
            return True
        if not final and (not head or (self.PREFIX and self.PREFIX.startswith(head))):
            return False  # only whitespace, or what may be the start of the prefix tag, so far
        self._mode = "text"
        return True

    def _step(self, final: bool) -> bool:
        """Read the next item or separator; False: wait for more text."""
        s = self._buf
        i = _skip_ws(s, self._pos)
        if self._item:
            found = None
            if final or "}" in s[max(self._tried, i):]:  # an object can only end at a "}"
                found = decode_json(s, i)
            if found is None:
                if not final:
                    self._tried = len(s)
                    return False
                return self._broken()
            call = call_from_object(found[0], self.names, self.KEYS)
            if call is None:
                return self._broken()
            self._emit_call(call)
            self._pos = self._call_end = found[1]
            self._item = False
            return True
        if i == len(s):  # the end of the output may end the calls (a missing CLOSE is forgiven)
            if final:
                self._to_text(i)
            return False
        if self.SEP and s.startswith(self.SEP, i):
            self._pos, self._item = i + len(self.SEP), True
            return True
        if self.CLOSE and s.startswith(self.CLOSE, i):
            return self._to_text(i + len(self.CLOSE))
        return self._broken()

    def _broken(self) -> bool:
        """What comes next is not a call: with no call before it, the whole output is text;
        else all from the end of the last call on."""
        return self._to_text(self._call_end)

    def _to_text(self, i: int) -> bool:
        rest = self._buf[i:]
        self._buf, self._mode = "", "text"
        self._content(rest)
        return False


class Llama3JsonStream(JsonCallsStream):
    """Llama 3.1 / 3.2 JSON tool calling: the output is ``{"name": ..., "parameters": {...}}``, or
    several such objects joined by ``;``, after an optional ``<|python_tag|>``."""

    PREFIX, SEP = "<|python_tag|>", ";"


class JsonArrayStream(JsonCallsStream):
    """A JSON array of call objects, ``[{"name": ..., "parameters": {...}}, ...]``: the format kvray
    constrains ``tool_choice`` "required" and named functions to when the model's own format
    has no grammar (as vLLM does for every model)."""

    OPEN, SEP, CLOSE = "[", ",", "]"


class PythonicStream(ToolCallStream):
    """A Python list of calls with keyword arguments, ``[get_weather(city="Paris", days=3),
    ping()]`` (Llama 3.2 pythonic, Llama 4, ToolACE), optionally between ``<|python_start|>`` and
    ``<|python_end|>``. An output that starts with ``[`` is held to its end, then read with
    Python's own parser (literals only: nothing is evaluated); anything else is content."""

    START, END = "<|python_start|>", "<|python_end|>"

    def __init__(self, tools: Any):
        super().__init__(tools)
        self._mode: str | None = None

    def _scan(self, final: bool) -> None:
        if self._mode is None:
            stripped = self._buf.lstrip()
            head = stripped.removeprefix(self.START).lstrip()
            if head.startswith("["):
                self._mode = "calls"
            elif not final and (not head or self.START.startswith(stripped)):
                return  # only whitespace, or what may be the start of the start tag, so far
            else:
                self._mode = "text"
        if self._mode == "calls" and not final:
            return
        calls = _pythonic_calls(self._buf, self.names) if self._mode == "calls" else None
        for call in calls or ():
            self._emit_call(call)
        if not calls:
            self._content(self._buf)
        self._buf, self._mode = "", "text"


def _pythonic_calls(text: str, names: set[str]) -> list[dict] | None:
    s = text.strip().removeprefix(PythonicStream.START).removesuffix(PythonicStream.END).strip()
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return None
        call = make_call(node.func.id, args, names)
        if call is None:
            return None
        calls.append(call)
    return calls


def parse_all(stream: ToolCallStream, text: str) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output through a fresh ``stream``: the calls in
    the OpenAI shape and the text outside them (None when there were calls and nothing but
    whitespace is left; the whole text when no call was found). Exactly what the stream sends
    for the same text, piece by piece."""
    deltas = stream.feed(text) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return (content if content or not stream.calls else None), stream.calls
