"""The ``args`` of the kvray Serve application, validated with pydantic (no Ray at import).

Deployment options (replicas, resources, autoscaling, ``max_ongoing_requests``,
``request_router_config``...) are not here: they stay in the standard Serve config keys under
``deployments:``. Everything here is kvray's own: the model, the engine options, the SLO
classes and the router policy. Unknown keys anywhere are errors naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, create_model, model_validator

from kvray.replica.config import EngineConfig
from kvray.router.policy import make_policy, policy_names
from kvray.slo import CUSTOM_CLASS, ON_INFEASIBLE, SLOTarget


def _engine_args_model() -> type[BaseModel]:
    """A pydantic mirror of EngineConfig (minus ``model``), so the two never drift apart."""
    hints = typing.get_type_hints(EngineConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        fields[f.name] = (hints[f.name], default)
    return create_model("EngineArgs", __config__=ConfigDict(extra="forbid", strict=True), **fields)


EngineArgs = _engine_args_model()


class SLOClassArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_ms: PositiveFloat = Field(description="time-to-first-token target, milliseconds")
    tpot_ms: PositiveFloat = Field(description="time-per-output-token target, milliseconds")
    priority: PositiveFloat = Field(1.0, description="weight of the class for SLO-aware scheduling")
    on_infeasible: str = Field("queue", description="with router.policy slo_aware, when no replica can meet the "
                               "class: queue (hold, refuse once too late), reject (429 at once) or best_effort")

    @model_validator(mode="after")
    def _check(self) -> "SLOClassArgs":
        if self.on_infeasible not in ON_INFEASIBLE:
            raise ValueError(f"on_infeasible {self.on_infeasible!r} is not one of: {', '.join(ON_INFEASIBLE)}")
        return self


class RouterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field("least_load", description="routing policy name (kvray.router.policy registry)")
    policy_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the policy")
    decode_estimate_cap: int = Field(512, ge=1, description="generated tokens budgeted per request when "
                                     "estimating load: min(max_tokens, this)")
    token_channels: bool = Field(True, description="carry tokens from each replica in one multiplexed stream per "
                                 "Router process (false: one stream per request; simpler, slower at high load). Needs kvray's "
                                 "request router on LLMReplica (the default); with another request_router_config, "
                                 "set false")
    stats_period_s: PositiveFloat = Field(0.5, description="default request_routing_stats_period_s of LLMReplica "
                                          "(a request_router_config in the Serve config overrides it)")

    @model_validator(mode="after")
    def _check_policy(self) -> "RouterArgs":
        if self.policy not in policy_names():
            raise ValueError(f"router.policy {self.policy!r} is not one of: {', '.join(policy_names())}")
        if "on_infeasible" in self.policy_options:
            raise ValueError("router.policy_options.on_infeasible: it is set per class now, "
                             "slo_classes.<name>.on_infeasible")
        try:
            make_policy(self.policy, **self.policy_options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"router.policy_options: {e}") from None
        return self


# The values of args.tool_call_parser: a format name (kvray.frontend.tool_formats reads each), "auto"
# (detected from the chat template) or "none" (tool_choice=auto returns text).
TOOL_CALL_PARSERS = ("auto", "none", "hermes", "llama3_json", "qwen3_coder", "pythonic")

API_KEY_ENV = "KVRAY_API_KEY"
_DEFAULT_SLO = {"interactive": {"ttft_ms": 500.0, "tpot_ms": 50.0}, "batch": {"ttft_ms": 10000.0, "tpot_ms": 200.0}}


class AppArgs(BaseModel):
    """``args:`` of ``import_path: kvray.platform:build_app``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="checkpoint directory, GGUF file, hub id, or kvray:<preset>")
    served_model_name: str | None = Field(None, description="the model name clients send; default: `model`")
    engine: EngineArgs = Field(default_factory=EngineArgs, description="kvray.replica.config.EngineConfig options")
    slo_classes: dict[str, SLOClassArgs] = Field(
        default_factory=lambda: {k: SLOClassArgs(**v) for k, v in _DEFAULT_SLO.items()})
    default_slo_class: str | None = Field(None, description="class of requests that name none; must be a key of "
                                          "slo_classes (default: the first class)")
    router: RouterArgs = Field(default_factory=RouterArgs)
    tool_call_parser: Literal[TOOL_CALL_PARSERS] = Field(
        "auto", description="how tool calls are read from the model's output with tool_choice auto: auto (the "
        "format the chat template writes; plain text when it has none), none (never), or a format name. "
        "tool_choice required and named functions work with any value (docs/tool-calls.md)")
    stream_interval_ms: float = Field(0.0, ge=0.0, description="replicas merge token batches of a stream until "
                                      "this long since the last send (0: send every engine step)")
    graceful_shutdown_timeout_s: PositiveFloat = Field(30.0, description="when Serve stops a Router or an LLMReplica "
                                                       "(scale-down, update, shutdown), how long its running requests "
                                                       "may go on; then each ends with a server_shutdown error "
                                                       "(docs/shutdown.md)")
    max_request_body_bytes: int = Field(16 * 2**20, ge=1024, description="larger request bodies get a 413 before "
                                        "they are parsed")
    api_keys: list[str] = Field(default_factory=list, description="accepted `Authorization: Bearer` keys; with "
                                "none here, in $KVRAY_API_KEY or in api_keys_file, the API is open")
    api_keys_file: str | None = Field(None, description="a file with one accepted API key per line (a mounted "
                                      "Kubernetes Secret, say); read when the Router starts")
    metrics_require_api_key: bool = Field(False, description="GET /metrics needs the API key too (default: open "
                                          "to Prometheus scrapers); /health is always open")

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if not self.slo_classes:
            raise ValueError("slo_classes must define at least one class")
        if CUSTOM_CLASS in self.slo_classes:
            raise ValueError(f"slo_classes: {CUSTOM_CLASS!r} is reserved for requests with explicit x-slo-* headers")
        if self.default_slo_class is None:
            self.default_slo_class = next(iter(self.slo_classes))
        elif self.default_slo_class not in self.slo_classes:
            raise ValueError(f"default_slo_class {self.default_slo_class!r} is not a key of slo_classes "
                             f"({', '.join(self.slo_classes)})")
        if self.served_model_name is None:
            self.served_model_name = self.model
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("api_keys: each key must be a non-empty string without surrounding spaces")
        self.engine_config()  # the engine's own checks (ranges, choices), with its messages
        return self

    def resolved_api_keys(self) -> list[str]:
        """Every accepted API key: ``api_keys``, ``$KVRAY_API_KEY`` (comma-separated) and the lines
        of ``api_keys_file``. Empty: no key is needed."""
        keys = list(self.api_keys)
        keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
        if self.api_keys_file:
            try:
                with open(self.api_keys_file) as f:
                    keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as e:
                raise ConfigError(f"args.api_keys_file: cannot read {self.api_keys_file!r}: {e}") from None
        return keys

    def engine_options(self) -> dict[str, Any]:
        return self.engine.model_dump(exclude_unset=True)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, **self.engine_options())

    def slo_targets(self) -> dict[str, SLOTarget]:
        return {k: SLOTarget(k, v.ttft_ms, v.tpot_ms, v.priority, v.on_infeasible) for k, v in self.slo_classes.items()}


class ConfigError(ValueError):
    """Bad application args; the message names every offending field, ``problems`` lists them."""

    def __init__(self, headline: str, problems: list[str] | None = None):
        self.problems = problems or [headline]
        super().__init__(headline + "".join("\n  " + p for p in problems or []))


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after",))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (not allowed here)"
    return f"args.{loc}: {msg}" if loc else f"args: {msg}"


def parse_args(args: dict | AppArgs | None) -> AppArgs:
    """Validate application args; raises ConfigError listing each bad field as ``args.<path>: why``."""
    if isinstance(args, AppArgs):
        return args
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"kvray application args must be a mapping, got {type(args).__name__}")
    try:
        return AppArgs.model_validate(args)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError("invalid kvray application args:", lines) from None
