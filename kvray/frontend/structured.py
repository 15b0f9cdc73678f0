"""A request's structured-outputs constraint, from the HTTP body to a ``StructuredOutputs``.

Accepted, on chat and completions alike (at most one of them per request):

* OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``
  (what the openai SDK's ``parse(response_format=PydanticModel)`` sends);
* vLLM's ``structured_outputs`` object: exactly one of ``json`` (a schema, object or JSON text),
  ``json_object`` (true), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF) or
  ``structural_tag`` (xgrammar's JSON);
* vLLM's older fields ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

The constraint is compiled once here, without the vocabulary, so that one the grammar library
cannot handle is a 400 naming the problem before any replica sees it (cached by its text, so a
schema that every request repeats is checked once per Router).
"""
from __future__ import annotations

import json
from typing import Any

from kvray.frontend.errors import APIError
from kvray.replica.grammar import compile_error
from kvray.replica.sampling_params import StructuredOutputs

_VLLM_KEYS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
              "grammar": "grammar", "structural_tag": "structural_tag"}
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs(req) -> StructuredOutputs | None:
    """The request's constraint (None: free text), checked; an APIError 400 if it is bad."""
    found = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _vllm_object(req.structured_outputs)))
    for name, field in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, _make(name, field, value)))
    if len(found) > 1:
        raise APIError(400, f"set one structured-outputs constraint, not {len(found)} ("
                       f"{', '.join(n for n, _ in found)})", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    check(spec, param)
    return spec


def _response_format(rf: dict) -> StructuredOutputs | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema must be an object with a 'schema'",
                           param="response_format")
        schema = js.get("schema", {}) if "schema" in js else js.get("schema_", {})
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON object", param="response_format")
        return _make("response_format", "json_schema", schema)
    raise APIError(400, f"response_format.type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                   param="response_format")


def _vllm_object(obj: dict) -> StructuredOutputs:
    given = [(k, v) for k, v in obj.items() if k in _VLLM_KEYS and v is not None and v is not False]
    if len(given) != 1:
        raise APIError(400, f"structured_outputs must set exactly one of {', '.join(_VLLM_KEYS)}",
                       param="structured_outputs")
    key, value = given[0]
    return _make("structured_outputs", _VLLM_KEYS[key], value)


def _make(param: str, field: str, value: Any) -> StructuredOutputs:
    """One constraint from its JSON value; a 400 for a value of the wrong shape."""
    try:
        if field == "json_schema":
            if isinstance(value, str):
                return StructuredOutputs(json_schema=value)
            if not isinstance(value, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            return StructuredOutputs(json_schema=json.dumps(value))  # key order kept: it is the output's
        if field == "json_object":
            return StructuredOutputs(json_object=value is True)
        if field == "choice":
            if not isinstance(value, list):
                raise ValueError("choice must be a list of strings")
            return StructuredOutputs(choice=tuple(value))
        if field == "structural_tag" and isinstance(value, dict):
            return StructuredOutputs(structural_tag=json.dumps(value, sort_keys=True))
        return StructuredOutputs(**{field: value})
    except ValueError as e:
        raise APIError(400, f"invalid {param}: {str(e).removeprefix('invalid structured outputs: ')}",
                       param=param) from None


def check(spec: StructuredOutputs, param: str) -> None:
    """A 400 naming the problem if the grammar library cannot compile ``spec``."""
    err = compile_error(spec)
    if err is not None:
        raise APIError(400, f"invalid {param}: {err}", param=param, code="invalid_schema")
