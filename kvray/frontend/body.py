"""Reading a request body: JSON (strictly: not JSON, not UTF-8, a lone surrogate, numbers out of
range, nesting past ``MAX_JSON_DEPTH`` are each a 400), then a request model
(``parse_request``: pydantic, then the model's own ``checks``)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from kvray.frontend.errors import APIError, validation_error

MAX_JSON_DEPTH = 32  # deeper bodies get a 400 before any model validation recurses into them


def parse_json(body: bytes) -> Any:
    """The request body as JSON, or an APIError 400: not JSON, not UTF-8, a lone surrogate
    (text no tokenizer can encode), numbers out of range, nesting deeper than MAX_JSON_DEPTH."""
    try:
        obj = _loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    check_json_values(obj)
    return obj


def check_json_values(obj: Any) -> None:
    """Walk a parsed body once (iteratively: no recursion): depth limit, and every string (keys
    too) must be encodable as UTF-8 (the stdlib parser lets lone surrogates through)."""
    stack = [(obj, 1, "")]
    while stack:
        x, depth, path = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, f"invalid text at '{path or 'body'}': it is not valid Unicode (a lone "
                                   "surrogate?)", param=path.split(".")[0] or None, code="invalid_value") from None
            continue
        if not isinstance(x, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                           param=path.split(".")[0] or None, code="invalid_json")
        items = x.items() if isinstance(x, dict) else enumerate(x)
        for k, v in items:
            if isinstance(k, str):
                stack.append((k, depth, path))
            stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))


try:
    import orjson

    _loads = orjson.loads  # rejects lone surrogates, NaN and out-of-range numbers itself; no recursion limit
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads


def parse_request(model_cls: type[BaseModel], obj: Any) -> BaseModel:
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = model_cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
    req.checks()
    return req
