"""``tool_choice`` "required" and named functions, enforced: the structured-outputs constraint
(an xgrammar structural tag) that makes the output one or more calls of the request's tools in
the enforced format (``kvray.frontend.tool_formats.enforced_format``), each call's arguments
following its tool's parameters schema, in compact JSON (no free whitespace: even a
random-weight model comes to an end) or, for qwen3_coder, as Qwen XML parameters. It is built
for every model: a template of no known format is enforced as a JSON array of calls.

``ValueError`` (the protocol layer's 400) only for what the request got wrong: a named function
not in ``tools``, a parameters schema the grammar library cannot compile.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from kvray.frontend.tool_calls import choice_name, tool_schemas
from kvray.frontend.tool_formats import ToolFormat, enforced_format
from kvray.replica.grammar import build_grammar, compile_error
from kvray.replica.sampling_params import StructuredOutputs


MAX_CALLS = 8  # calls in one response at most (parallel_tool_calls); documented in docs/tool-calls.md


@functools.lru_cache(maxsize=256)
def _compact_json_grammar(schema_json: str) -> str:
    """The EBNF of JSON that follows this schema, with no whitespace besides json.dumps's
    ``", "`` and ``": "``: the engine's own grammar for a json_schema constraint."""
    return str(build_grammar(StructuredOutputs(json_schema=schema_json)))


def _arguments(name: str, schema: dict, style: str) -> dict:
    """The structural-tag content of one tool's arguments."""
    if style == "qwen_xml":  # at most one whitespace character in a row: even a random model comes to an end
        return {"type": "json_schema", "json_schema": schema, "style": "qwen_xml", "max_whitespace_cnt": 1}
    try:
        return {"type": "grammar", "grammar": _compact_json_grammar(json.dumps(schema))}
    except ValueError as e:  # GrammarError
        raise ValueError(f"tool '{name}': its parameters are not a usable JSON schema: {e}") from None


def tool_constraint(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
                    fmt: ToolFormat | None) -> StructuredOutputs | None:
    """The constraint that enforces ``tool_choice`` on a model whose tool-call format is ``fmt``
    (None: none known): None for ``"none"``, ``"auto"`` and no tool_choice; for ``"required"``
    one to ``MAX_CALLS`` calls (exactly one when ``parallel_tool_calls`` is false) of any of ``tools``;
    for a named function exactly one call of it."""
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
    shape = enforced_format(fmt).shape
    tags = [{"type": "tag", "begin": shape.head + (json.dumps(fname) if shape.args == "json" else fname) + shape.mid,
             "content": _arguments(fname, schema, shape.args), "end": shape.end} for fname, schema in schemas.items()]
    call = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    # one call, then (unless single) up to MAX_CALLS - 1 more after separators: a model that keeps
    # repeating calls (small real models do, even at low temperature) ends at the bound, not at max_tokens
    calls = call if single else {"type": "sequence", "elements": [call, {
        "type": "repeat", "min": 0, "max": MAX_CALLS - 1,
        "content": {"type": "sequence", "elements": [{"type": "const_string", "value": shape.sep}, call]}}]}
    if shape.open:  # a list: its close is optional, as the end of the output closes it too (the parser
        # reads both): with EOS allowed after every call, as in the other formats, even a random-weight
        # model stops (one that must find the close bracket among all the continuations runs on)
        calls = {"type": "sequence", "elements": [{"type": "const_string", "value": shape.open}, calls, {
            "type": "optional", "content": {"type": "const_string", "value": shape.close}}]}
    spec = StructuredOutputs(structural_tag=json.dumps({"type": "structural_tag", "format": calls}))
    why = compile_error(spec)
    if why:
        raise ValueError(f"cannot build the tool-call grammar: {why}")
    return spec
