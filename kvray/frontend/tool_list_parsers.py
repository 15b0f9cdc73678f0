"""Tool-call parsers of the formats whose whole output is a list of calls: JSON objects joined
by a separator (llama3_json; json_array, the format kvray enforces when a model has none of its
own) and Python calls (pythonic). Output that does not start as such a list is content, passed
on as it comes. The stream protocol: ``kvray.frontend.tool_parsers``.
"""
from __future__ import annotations

import ast
from typing import Any

from kvray.frontend.tool_calls import call_from_object, decode_json, make_call
from kvray.frontend.tool_parsers import ToolCallStream


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


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
