"""What the engine hands back for a request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The state of one request.

    ``token_ids`` and ``text`` are everything generated so far; ``new_token_ids`` /
    ``new_text`` are what this output adds to the previous one of the same request (the
    streaming delta). ``finish_reason`` is one of ``"stop"``, ``"length"``, ``"abort"`` once
    ``finished`` is true.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[float] | None = None  # log-prob of each generated token
    top_logprobs: list[dict[int, float]] | None = None  # per token: the top-n alternatives
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    prompt: str | None = None
    # per prompt token: {token: log-prob} of it and the top alternatives (None for the first);
    # with SamplingParams.prompt_logprobs, else None
    prompt_logprobs: list[dict[int, float] | None] | None = None
