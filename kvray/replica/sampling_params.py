"""Per-request sampling options (the shape vLLM users know)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` means greedy.

    ``validate()`` raises ``ValueError`` naming the bad field; the engine calls it on every
    request before the request touches any shared state.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return per token; 0 = only the chosen
    min_tokens: int = 0
    # SLO hints used by deadline-aware scheduling (None = no target).
    slo_class: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: float = 1.0
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop or [])

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if self.temperature is None or not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise bad("temperature", "must be >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1) or self.top_k == 0:
            raise bad("top_k", "must be -1 (disabled) or an integer >= 1")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0 or self.logprobs > 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        for s in self._stop_list:
            if not isinstance(s, str) or not s:
                raise ValueError(f"invalid sampling parameter stop={self.stop!r}: stop strings must be non-empty strings")
        for t in self.stop_token_ids or []:
            if not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", "must be non-negative integers")
        if self.ttft_ms is not None and self.ttft_ms <= 0:
            raise bad("ttft_ms", "must be > 0")
        if self.tpot_ms is not None and self.tpot_ms <= 0:
            raise bad("tpot_ms", "must be > 0")
