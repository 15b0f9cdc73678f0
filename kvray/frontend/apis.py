"""The HTTP APIs the Router serves, by the ``kind`` its routes pass to the serving loop."""
from __future__ import annotations

from starlette.responses import Response

from kvray.frontend.api import API
from kvray.frontend.errors import APIError
from kvray.frontend.messages import MESSAGES
from kvray.frontend.openai_api import CHAT, COMPLETIONS
from kvray.frontend.responses import RESPONSES
from kvray.frontend.tokenize import DETOKENIZE, TOKENIZE

API_BY_KIND: dict[str, API] = {api.kind: api for api in (COMPLETIONS, CHAT, RESPONSES, MESSAGES, TOKENIZE, DETOKENIZE)}


def error_response(kind: str, e: APIError) -> Response:
    """``e`` in the error shape of the API ``kind`` (OpenAI's for routes of no API)."""
    return API_BY_KIND.get(kind, COMPLETIONS).error_response(e)
