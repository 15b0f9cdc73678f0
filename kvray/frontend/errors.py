"""The OpenAI error shape: ``APIError`` (a status, and ``{"error": {message, type, param,
code}}``), and a pydantic validation error turned into one that names the field. Every
generation API answers in this shape unless it has its own (``kvray.frontend.api``)."""
from __future__ import annotations

from pydantic import ValidationError


class APIError(Exception):
    """An error returned to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_DEFAULT_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                  429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "StreamOptions", "TextPart", "ChatMessage",
              "ToolChoiceFunction"}


def _is_union_tag(part: str) -> bool:
    return part in _TYPE_TAGS or part.startswith(("list[", "dict[", "function-", "literal[", "tuple["))


def validation_error(e: ValidationError) -> APIError:
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ())]
    # pydantic names union members in the location (e.g. "prompt.str"); keep the request path
    path = ".".join(p for p in loc if not _is_union_tag(p))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errs) - 1} more error(s))" if len(errs) > 1 else ""
    if first.get("type") == "missing":
        return APIError(400, f"missing required field '{path}'", param=path or None, code="missing_required_parameter")
    return APIError(400, f"invalid value for '{path}': {msg}{more}", param=path.split(".")[0] if path else None,
                    code="invalid_type" if first.get("type", "").endswith("_type") else "invalid_value")
