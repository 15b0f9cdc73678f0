"""The typed records that cross kvray's process and deployment seams (a leaf module above
``kvray.slo`` only: no Ray, no torch). Each has one producer:

* ``EngineStats``: the engine's step loop (``LLMEngine.stats``), read by the serving replica, the
  router, the autoscaler and the metrics. It carries the engine's fitted step-cost coefficients,
  so nobody refits them.
* ``ReplicaStats``: ``LLMReplica.record_routing_stats``, which Serve broadcasts to the routers.
* ``RequestSnapshot``: the engine's in-flight requests, for the autoscaler's attainment prediction
  (it travels beside ``EngineStats``, never inside it).
* ``Delta``: what one engine step added to a request (engine process -> replica process).
* ``TokenBatch``, ``Refusal``, ``Bound``: what a replica streams to the Router for a request (the
  token-stream protocol: ``kvray.platform.token_streams`` and ``kvray.frontend.replica_client``).
* ``RoutingHint``: what the Router tells the request router and the replica about a request,
  with its ``kvray.slo.SLOTarget`` (the one record of a request's latency targets, which its
  ``SamplingParams`` carry on to the engine).
* ``Command`` and ``Event``: the messages between a replica and its engine process.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvray.slo import NO_SLO, SLOTarget


@dataclass(frozen=True)
class EngineStats:
    """The engine as of its latest step."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    tokens_in_flight: int = 0          # context tokens of the running and waiting requests
    queued_prefill_tokens: int = 0     # prompt tokens still to compute
    prefix_hit_rate: float = 0.0
    prefix_hit_tokens: int = 0         # prompt tokens found in the prefix cache, since the start
    prefix_queried_tokens: int = 0     # prompt tokens looked up there
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduling_policy: str = "fcfs"
    min_tpot_s: float | None = None    # the tightest TPOT target among the requests there
    step_coeffs: tuple[float, float, float, float] | None = None  # a, b, c, d of kvray.step_cost, fitted
    num_steps: int = 0
    num_added_total: int = 0           # requests the step loop has taken in (admitted or refused)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


ROUTING_STATS_KEY = "kvray"  # LLMReplica.record_routing_stats() returns {ROUTING_STATS_KEY: ReplicaStats}


@dataclass(frozen=True)
class ReplicaStats:
    """One serving replica: its engine's stats plus what the replica itself counts. ``time`` is
    the wall clock when it was taken (the router folds in its own events up to then)."""

    engine: EngineStats
    time: float
    replica_id: str = ""
    healthy: bool = True
    outstanding_tokens: int = 0        # uncached prompt + budgeted decode tokens of its requests
    num_active_requests: int = 0
    num_requests_total: int = 0
    num_aborted_total: int = 0
    num_channels: int = 0
    max_model_len: int = 0
    max_queued_requests: int = 0
    max_queued_prompt_tokens: int = 0  # the engine refuses a request that would queue more prompt tokens (0: unknown)
    started_at: float = 0.0
    first_token_at: float | None = None

    @property
    def capacity(self) -> int:
        """Requests the replica admits: its batch slots plus its queue limit."""
        return self.engine.max_num_seqs + self.max_queued_requests


@dataclass(frozen=True)
class RequestSnapshot:
    """One in-flight request, as the autoscaler's attainment prediction needs it (monotonic clock)."""

    arrival: float
    first_token: float | None      # None: still waiting for its first token
    prefill_left: int              # prompt tokens not yet computed
    num_output: int
    max_tokens: int
    ttft_s: float | None           # targets (None: no target)
    tpot_s: float | None
    deadline: float | None = None  # absolute TTFT deadline (deadline-ordered replicas)


@dataclass
class Delta:
    """What one step added to a request."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    num_preemptions: int = 0
    queue_time_s: float | None = None  # on the first batch: from the engine's receipt to the first step
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on the first batch, when asked for


@dataclass
class TokenBatch:
    """New tokens of one request, as a replica streams them to the Router."""

    ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None   # set on the last batch
    stop_reason: str | int | None = None
    cached_tokens: int = 0
    # per prompt token, {token id: log-prob} of it and its top alternatives (None for the first):
    # on the first batch of a request with SamplingParams.prompt_logprobs
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @classmethod
    def of(cls, d: Delta) -> "TokenBatch":
        return cls(d.new_token_ids, d.new_logprobs, d.new_top_logprobs, d.finish_reason if d.finished else None,
                   d.stop_reason if d.finished else None, d.num_cached_tokens, d.prompt_logprobs)

    def merge(self, later: "TokenBatch") -> "TokenBatch":
        """This batch followed by ``later``: the tokens and log-probs of both, the rest of ``later``."""
        def cat(a, b):
            return a + b if a is not None and b is not None else b

        return TokenBatch(self.ids + later.ids, cat(self.logprobs, later.logprobs),
                          cat(self.top_logprobs, later.top_logprobs), later.finish_reason, later.stop_reason,
                          later.cached_tokens, self.prompt_logprobs or later.prompt_logprobs)


@dataclass(frozen=True)
class Refusal:
    """A replica refused a request before it produced anything: ``status`` 400 (bad input), 429
    (its queue is full; retry after ``retry_after_s``, or elsewhere) or 503 (it cannot serve)."""

    status: int
    message: str
    retry_after_s: float | None = None
    replica_id: str | None = None


@dataclass(frozen=True)
class Bound:
    """The replica took the request (its batches follow, in the request's own stream or through
    the caller's token channel); or, first on a token channel, the replica the channel reached."""

    replica_id: str


@dataclass
class RoutingHint:
    """What the Router knows about a request when a replica is picked for it; the ``hint=``
    keyword of the ``LLMReplica.generate`` handle call, read there by the request router."""

    request_id: str
    num_prompt_tokens: int
    # Generated tokens the router budgets for this request: min(max_tokens, the policy's cap).
    decode_estimate: int
    # Chained hashes of the prompt's full KV blocks (kvray.replica.block_hash).
    block_hashes: list[int] = field(default_factory=list)
    block_size: int = 16
    slo: SLOTarget = NO_SLO  # the request's targets (the same record its SamplingParams carries)
    arrival_time: float = 0.0  # wall clock (time.time()) when the router received the request
    # The replicas to try, best first, as the routing policy decided (the request router follows it).
    route: tuple[str, ...] = ()
    # Route to exactly this replica or nowhere (the Router's token channels). None: the route decides.
    pin_replica: str | None = None
    # Replicas not to route to: they refused this request or failed it before its first token.
    avoid: tuple[str, ...] = ()

    def cost(self, cached_blocks: int = 0) -> int:
        """Outstanding tokens this request adds to a replica where ``cached_blocks`` prefix blocks hit."""
        uncached = max(0, self.num_prompt_tokens - cached_blocks * self.block_size)
        return uncached + self.decode_estimate


def hint_from_call(args, kwargs) -> RoutingHint | None:
    """Find the hint in a handle call's arguments (the request router sees args/kwargs only)."""
    h = kwargs.get("hint") if kwargs else None
    if isinstance(h, RoutingHint):
        return h
    for a in args or ():
        if isinstance(a, RoutingHint):
            return a
    return None


class Op(enum.Enum):
    """What a replica asks of its engine's step loop."""

    ADD = "add"        # a request: request_id, prompt_token_ids, params, arrival_time, prompt
    ABORT = "abort"    # request_id
    STOP = "stop"


@dataclass
class Command:
    op: Op
    request_id: str | None = None
    prompt_token_ids: list[int] | None = None
    params: Any = None                 # kvray.SamplingParams
    arrival_time: float | None = None
    prompt: str | None = None


class EventKind(enum.Enum):
    """What an engine process tells its replica."""

    READY = "ready"    # info: the engine is loaded (tokenizer, limits, first stats)
    OUT = "out"        # one step's deltas, stats and (now and then) request snapshots
    ERROR = "error"    # text: the engine failed to load, or its loop died


@dataclass
class Event:
    kind: EventKind
    deltas: list[tuple[str, Delta | BaseException]] = field(default_factory=list)
    stats: EngineStats | None = None
    requests: list[RequestSnapshot] | None = None
    info: dict | None = None
    text: str | None = None
