"""What an HTTP API plugs into the Router's serving loop (``kvray.frontend.serving``).

The loop does what every generation route shares: load shedding, the SLO class, admission by
the routing policy (dispatch, hold or 429), dispatch and retries, the token streams, request
metrics and the end of a request. An ``API`` does the rest: its request (parsed, validated and
converted into a ``Prepared`` engine request), its response body, its stream of events, and its
error shape. APIs answered by the Router itself, without a replica (tokenize), set ``local``
and implement ``answer``.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response

from kvray.frontend.choice import RequestState
from kvray.frontend.errors import APIError
from kvray.frontend.prepare import Prepared, Served
from kvray.frontend.sse import DONE, sse

# (choice index, (new text, OpenAI log-probs object or None, finished)), as the choices' batches come
Outputs = AsyncIterator[tuple[int, tuple[str, dict | None, bool]]]


class API:
    kind: str = ""       # the route's label in the request metrics
    local: bool = False  # answered by the Router alone

    async def prepare(self, body: bytes, headers, t0: float, served: Served) -> Prepared:
        raise NotImplementedError

    def streams(self, p: Prepared) -> bool:
        return bool(p.req.stream)

    def body(self, req: RequestState, texts: list[str], lps: list[list[dict]]) -> dict:
        """The whole response: ``texts[k]`` / ``lps[k]`` are choice ``k``'s text and log-probs parts."""
        raise NotImplementedError

    def events(self, req: RequestState, outputs: Outputs) -> AsyncIterator[bytes]:
        """The response as a stream of SSE events, to its normal end."""
        raise NotImplementedError

    async def answer(self, body: bytes, served: Served) -> Any:
        """The JSON answer of a ``local`` API."""
        raise NotImplementedError

    # ---- errors (OpenAI's shape unless an API has its own) ------------------------------------
    def error_body(self, e: APIError) -> dict:
        return e.body()

    def error_response(self, e: APIError) -> Response:
        return JSONResponse(self.error_body(e), status_code=e.status, headers=e.headers)

    def stream_error(self, e: APIError, req: RequestState) -> bytes:
        """The events that end a stream that failed after it started."""
        return sse(e.body()) + DONE
