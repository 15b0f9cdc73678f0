"""The tool-call formats kvray reads, how one is chosen for a model, and which one a request's
output is read in.

The app option ``tool_call_parser`` (``kvray.app_config``) names a format, or ``auto`` (the
default: detected from the chat template) or ``none`` (never parse; ``tool_choice="auto"``
returns text). Each format has a streaming parser (``kvray.frontend.tool_parsers``) and, where
it has a grammar of its own, the shape of one call (``CallShape``), which
``kvray.frontend.tool_grammar`` turns into the constraint that enforces ``tool_choice``
``"required"`` or a named function. A format without a shape (pythonic), or no format at all,
is enforced as a JSON array of calls (``JSON_ARRAY``), as vLLM does for every model: so those
two choices work for every model, whatever its template.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from kvray.app_config import TOOL_CALL_PARSERS
from kvray.frontend.tool_calls import forces_calls, parses_tool_calls
from kvray.frontend.tool_list_parsers import JsonArrayStream, Llama3JsonStream, PythonicStream
from kvray.frontend.tool_parsers import HermesStream, Qwen3CoderStream, ToolCallStream, parse_all

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallShape:
    """How one call is written: ``head``, the function name, ``mid``, the arguments, ``end``;
    several calls joined by ``sep``, all between ``open`` and ``close`` (which the grammar lets
    the end of the output stand for). ``args``: "json" (the name JSON-quoted, the arguments an
    object in compact JSON) or "qwen_xml" (the name as is, the arguments as xgrammar's Qwen XML
    parameters)."""

    head: str
    mid: str
    end: str
    sep: str
    open: str = ""
    close: str = ""
    args: str = "json"


@dataclass(frozen=True)
class ToolFormat:
    name: str
    stream: type[ToolCallStream]
    shape: CallShape | None  # None: no grammar of its own (required/named are enforced as JSON_ARRAY)
    # a chat template that holds every string of one of these groups writes this format
    markers: tuple[tuple[str, ...], ...] = field(default=())

    def parser(self, tools: Any) -> ToolCallStream:
        """A fresh parser of one response."""
        return self.stream(tools)

    def detects(self, template: str) -> bool:
        return any(all(m in template for m in group) for group in self.markers)


HERMES = ToolFormat("hermes", HermesStream,
                    CallShape('<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>", "\n"),
                    (("<tool_call>",),))
LLAMA3_JSON = ToolFormat("llama3_json", Llama3JsonStream, CallShape('{"name": ', ', "parameters": ', "}", "; "),
                         (("<|start_header_id|>", "ipython"), ("<|python_tag|>",)))
QWEN3_CODER = ToolFormat("qwen3_coder", Qwen3CoderStream,
                         CallShape("<tool_call>\n<function=", ">\n", "</function>\n</tool_call>", "\n", args="qwen_xml"),
                         (("<tool_call>", "<function=", "<parameter="),))
PYTHONIC = ToolFormat("pythonic", PythonicStream, None, (("[func_name1(",),))
JSON_ARRAY = ToolFormat("json_array", JsonArrayStream,
                        CallShape('{"name": ', ', "parameters": ', "}", ", ", "[", "]"))

FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, QWEN3_CODER, PYTHONIC)}  # the values of tool_call_parser
# the order templates are tried in: a pythonic Llama 3.2 template holds llama3_json's markers too, and
# a Qwen3-Coder one hermes's
_DETECTION_ORDER = (PYTHONIC, QWEN3_CODER, HERMES, LLAMA3_JSON)
if set(FORMATS) != set(TOOL_CALL_PARSERS) - {"auto", "none"}:  # the option and the registry agree
    raise ImportError(f"tool_call_parser values {TOOL_CALL_PARSERS} do not match the formats {sorted(FORMATS)}")


def chat_template_text(tokenizer_or_template: Any) -> str | None:
    """The chat template (the ``tool_use`` one of a tokenizer with several), or None."""
    t = tokenizer_or_template
    if not isinstance(t, (str, dict)):
        t = getattr(t, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("tool_use") or t.get("default")
    return t if isinstance(t, str) else None


@functools.lru_cache(maxsize=16)
def _detect(template: str) -> ToolFormat | None:
    return next((f for f in _DETECTION_ORDER if f.detects(template)), None)


def detect_format(tokenizer_or_template: Any) -> ToolFormat | None:
    """The format the chat template writes tool calls in, or None (no template, or no known
    format in it)."""
    template = chat_template_text(tokenizer_or_template)
    return _detect(template) if template else None


def resolve_tool_format(option: str, tokenizer: Any) -> ToolFormat | None:
    """The model's tool-call format for ``tool_call_parser=option``: the named format, the one
    the chat template writes (``auto``), or None (``none``, or ``auto`` on a template of no known
    format: then ``tool_choice="auto"`` returns text). Says what it chose in the log: called
    once per Router, at startup."""
    if option == "none":
        return None
    if option != "auto":
        if option not in FORMATS:
            raise ValueError(f"tool_call_parser {option!r} is not one of: {', '.join(TOOL_CALL_PARSERS)}")
        return FORMATS[option]
    fmt = detect_format(tokenizer)
    if fmt is None:
        logger.warning("kvray: tool_call_parser auto: the chat template has no known tool-call format, so "
                       "tool_choice=auto returns plain text (tool calls are not parsed); tool_choice=required "
                       "and named functions are still enforced, as a JSON array of calls. Set args.tool_call_parser "
                       "(%s) if the model writes one of those.", ", ".join(FORMATS))
    else:
        logger.info("kvray: tool_call_parser auto: the chat template writes tool calls as %s", fmt.name)
    return fmt


def enforced_format(fmt: ToolFormat | None) -> ToolFormat:
    """The format tool_choice required / a named function constrains the output to."""
    return fmt if fmt is not None and fmt.shape is not None else JSON_ARRAY


def request_format(fmt: ToolFormat | None, tools: Any, tool_choice: Any) -> ToolFormat | None:
    """The format a request's output is read in (None: plain content): none without tools or
    with tool_choice "none"; the enforced one for "required" and a named function; else the
    model's."""
    if not parses_tool_calls(tools, tool_choice):
        return None
    return enforced_format(fmt) if forces_calls(tools, tool_choice) else fmt


def response_parser(req: Any, fmt: ToolFormat | None) -> ToolCallStream | None:
    """A fresh parser for the output of this chat request, or None when it is plain content."""
    found = request_format(fmt, getattr(req, "tools", None), getattr(req, "tool_choice", None))
    return found.parser(req.tools) if found is not None else None


def parse_tool_calls(text: str, fmt: ToolFormat | None, tools: Any) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output in ``fmt`` (None: all content)."""
    return parse_all(fmt.parser(tools) if fmt is not None else ToolCallStream(tools), text)
