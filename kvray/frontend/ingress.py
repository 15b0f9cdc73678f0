"""The ``Router`` deployment: kvray's HTTP ingress (FastAPI through ``serve.ingress``), a thin
shim over ``kvray.frontend.serving``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses``,
``POST /v1/messages`` (Anthropic), ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``,
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (the kvray series of every process on this node, from its Ray
metrics agent: ``kvray.metrics``) and ``GET /v1/kvray/replicas`` (the router's
view of each LLMReplica: latest stats and load estimate, for operators and tests). Here: the
API key check, the body-size limit, and the wiring: the Router's ``Dispatcher`` (routing policy
and replica book, which the request-router plug-in of the LLMReplica handle feeds with Serve's
replica set: ``kvray.router.replica_set``), its ``ReplicaClient`` (the token streams from the
replicas), and its drain when Serve stops it or a replica
(``kvray.frontend.drain``; ``GET /health`` answers 503 while it drains). The tokenizer comes from
a replica (``model_info``), so the Router never loads or downloads the model itself.
"""

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from kvray.app_config import AppArgs, parse_args
from kvray.frontend.apis import error_response
from kvray.frontend.drain import Drain, watch_replica_stop
from kvray.frontend.errors import APIError, error_body
from kvray.frontend.prepare import ModelInfo
from kvray.frontend.protocol import models_list
from kvray.frontend.replica_client import ReplicaClient
from kvray.frontend.serving import OpenAIServing
from kvray.frontend.tokenize import tokenizer_info
from kvray.gil import shorten_switch_interval
from kvray.metrics import RouterMetrics, scrape_node
from kvray.router.book import ReplicaBook
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import make_policy
from kvray.router.replica_set import feed

logger = logging.getLogger(__name__)

fastapi_app = FastAPI(title="kvray", docs_url=None, redoc_url=None, openapi_url=None)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        msg = f"no route {request.method} {request.url.path}"
    return JSONResponse(error_body(msg, "invalid_request_error"), status_code=exc.status_code)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(error_body(f"invalid request: {exc.errors()[:1]}"), status_code=400)


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def jsonable(x):
    """Records (dataclasses) as JSON-ready dicts, inside dicts and lists too."""
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _warn_if_exposed() -> None:
    """Log a warning when Serve's HTTP listener binds a non-loopback address and no API key is set."""
    try:
        from ray.serve.context import _get_global_client
        host = _get_global_client().http_config.host
    except Exception:  # not inside Serve, or the controller cannot say
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        logger.warning("kvray serves on %s with no API key: anyone who can reach this address can use the model. "
                       "Set args.api_keys, args.api_keys_file or $KVRAY_API_KEY, or bind 127.0.0.1.", host)


FAST_INGRESS = "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1"


def _warn_if_slow_ingress(args: AppArgs) -> None:
    """Serve's Python proxy in front of a GPU engine costs throughput and tail latency
    (docs/deploy.md, "Which ingress"); say so where the user sees it, with the command that avoids it."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" or args.engine.device == "cpu":
        return
    logger.warning("kvray: requests pass through Ray Serve's Python proxy, which kept 60%% of the engine's "
                   "throughput at 50 req/s on an H200. Start Ray (ray start, serve run) with %s for HAProxy "
                   "in front of Routers that serve HTTP themselves.", FAST_INGRESS)


@serve.ingress(fastapi_app)
class Router:
    drain: Drain | None = None  # set before anything in __init__ can fail: Serve calls __del__ after a failed start
    _stop_watch = None

    def __init__(self, llm: DeploymentHandle, args: dict):
        shorten_switch_interval()  # SSE for hundreds of streams on one event loop, beside Serve's own
        self.args: AppArgs = parse_args(args)
        self._llm = llm
        ctx = serve.get_replica_context()
        # the replica book: fed with Serve's replica set by the request-router plug-in (once serving)
        self._replica_set = feed(ctx.app_name, llm.deployment_name)
        router = self.args.router
        self.dispatcher = Dispatcher(ReplicaBook(), make_policy(router.policy, **(router.policy_options or {})))
        self.client = ReplicaClient(llm, router.token_channels)
        self.metrics = RouterMetrics(self.args.served_model_name, ctx.replica_id.unique_id)
        self.serving: OpenAIServing | None = None
        self.drain = Drain(self.args.graceful_shutdown_timeout_s, self.dispatcher.book, self.client.close_unlisted)
        self._ready_lock: asyncio.Lock | None = None
        self._started = time.time()
        self._api_keys = [k.encode() for k in self.args.resolved_api_keys()]
        if not self._api_keys:
            _warn_if_exposed()
        _warn_if_slow_ingress(self.args)

    # ---- access ----------------------------------------------------------------------------------
    def _denied(self, request: Request, kind: str = "completions") -> Response | None:
        """None if the request may pass: no keys are configured, or it carries one of them (as
        ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as Anthropic's clients send it)."""
        if not self._api_keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = (token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")).encode()
        if given and any(hmac.compare_digest(given, k) for k in self._api_keys):
            return None
        msg = ("Incorrect API key provided." if given else
               "You didn't provide an API key: send it as 'Authorization: Bearer YOUR_KEY'.")
        return error_response(kind, APIError(401, msg, type="invalid_request_error", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"}))

    # ---- startup -------------------------------------------------------------------------------
    async def _ensure_ready(self, timeout_s: float | None = None) -> OpenAIServing:
        if self.serving is not None:
            return self.serving
        if self._stop_watch is None:  # from the first request on: Serve's replica set of this deployment
            try:
                self._stop_watch = watch_replica_stop(self.drain.begin, self.drain.resume)
            except Exception:  # noqa: BLE001 - serve anyway; only the drain on a stop is lost
                logger.exception("kvray: cannot follow this deployment's replica set: the Router will not drain "
                                 "when Serve stops it")
                self._stop_watch = False
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
            self._replica_set.subscribe(asyncio.get_running_loop(), self.dispatcher.book.sync)
        async with self._ready_lock:
            if self.serving is None:
                call = self._llm.model_info.remote()
                info = await (asyncio.wait_for(call, timeout_s) if timeout_s else call)
                a = self.args
                names = [a.served_model_name] + ([a.model] if a.model != a.served_model_name else [])
                self.serving = OpenAIServing(
                    info=ModelInfo(info["tokenizer"], info["max_model_len"], info["block_size"], info["vocab_size"],
                                   tool_call_parser=a.tool_call_parser, quantization=info.get("quantization"),
                                   kv_cache_dtype=info.get("kv_cache_dtype", ""),
                                   kv_cache_tokens=info.get("kv_cache_tokens", 0)),
                    model_names=names, slo_classes=a.slo_targets(), default_slo_class=a.default_slo_class,
                    decode_estimate_cap=a.router.decode_estimate_cap, client=self.client, metrics=self.metrics,
                    dispatcher=self.dispatcher, drain=self.drain)
        return self.serving

    async def _serve(self, kind: str, request: Request) -> Response:
        denied = self._denied(request, kind)
        if denied is not None:
            self.metrics.request_done(endpoint=kind, status=401, slo_class="none")
            return denied
        try:
            body = await self._read_body(request)
        except asyncio.CancelledError:  # the client left while sending the body: it counts too
            self.metrics.request_done(endpoint=kind, status=499, slo_class="none")
            raise
        if body is None:
            self.metrics.request_done(endpoint=kind, status=413, slo_class="none")
            limit = self.args.max_request_body_bytes
            return error_response(kind, APIError(413, f"the request body is larger than {limit} bytes "
                                                 "(max_request_body_bytes)", code="request_too_large"))
        try:
            serving = await self._ensure_ready()
        except Exception as e:
            logger.exception("model info unavailable")
            self.metrics.request_done(endpoint=kind, status=503, slo_class="none")
            return error_response(kind, APIError(503, f"the model is not ready: {type(e).__name__}"))
        return await serving.handle(kind, body, request.headers)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None as soon as it is known to exceed ``max_request_body_bytes`` (from its
        Content-Length, or while it streams in): nothing that large is buffered whole or parsed."""
        limit = self.args.max_request_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return None
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    # ---- routes --------------------------------------------------------------------------------
    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", request)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @fastapi_app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self._serve("responses", request)

    @fastapi_app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        return await self._serve("messages", request)

    @fastapi_app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._serve("tokenize", request)

    @fastapi_app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._serve("detokenize", request)

    @fastapi_app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Response:
        return self._denied(request) or JSONResponse(tokenizer_info((await self._ensure_ready()).info))

    @fastapi_app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        listed = await self.models(request)
        names = [self.args.served_model_name, self.args.model]
        if listed.status_code != 200 or model_id not in names:
            return listed if listed.status_code != 200 else JSONResponse(error_body(
                f"The model '{model_id}' does not exist", param="model", code="model_not_found"), status_code=404)
        return JSONResponse({**json.loads(listed.body)["data"][0], "id": model_id})

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        body = models_list([self.args.served_model_name], int(self._started))
        try:  # like vLLM, say how long a context is; kvray also gives the vocabulary size and KV cache
            info = (await self._ensure_ready(timeout_s=5.0)).info
            body["data"][0].update(max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                                   quantization=info.quantization, kv_cache_dtype=info.kv_cache_dtype,
                                   kv_cache_tokens=info.kv_cache_tokens)
        except Exception:
            pass
        return JSONResponse(body)

    @fastapi_app.get("/health")
    async def health(self) -> Response:
        if self.drain.draining:
            return JSONResponse(error_body("shutting down", "server_shutdown", code="draining"), status_code=503)
        try:
            await self._ensure_ready(timeout_s=5.0)
        except Exception as e:
            return JSONResponse(error_body(f"not ready: {type(e).__name__}", "service_unavailable"), status_code=503)
        return JSONResponse({"status": "ok", "model": self.args.served_model_name})

    @fastapi_app.get("/metrics")
    async def metrics_endpoint(self, request: Request) -> Response:
        denied = self._denied(request) if self.args.metrics_require_api_key else None
        if denied is not None:
            return denied
        try:
            text = await asyncio.to_thread(scrape_node)
        except Exception as e:  # noqa: BLE001 - the node's metrics agent is down or not there
            return JSONResponse(error_body(f"the node's Ray metrics endpoint did not answer: {type(e).__name__}: {e}",
                                           "service_unavailable"), status_code=503)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @fastapi_app.get("/v1/kvray/replicas")
    async def replicas(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        body = {"time": time.time(), "replicas": self.dispatcher.book.snapshot(), "policy": self.dispatcher.snapshot()}
        return JSONResponse(jsonable(body))

    def __del__(self):
        if self._stop_watch:
            self._stop_watch.stop()
        if self.drain is not None:
            self.drain.close()
