"""One request's state inside the engine."""
from __future__ import annotations

import enum
import time

from kvray.replica.block_hash import hash_block
from kvray.replica.outputs import RequestMetrics
from kvray.replica.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request as the scheduler, block manager and model runner see it.

    ``token_ids`` holds the prompt followed by the generated tokens. ``num_computed_tokens``
    counts the leading tokens whose K/V is already in the paged cache (prefix-cache hits
    included). Each step the scheduler grants a sequence some new tokens to compute; when the
    computed count reaches ``num_tokens`` the runner samples the next token.
    """

    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "params", "status", "num_computed_tokens",
        "block_table", "num_cached_tokens", "finish_reason", "stop_reason", "metrics", "logprobs",
        "top_logprobs", "generator", "detokenizer", "_block_hashes", "block_size", "deadline",
        "prompt", "np_table", "np_src", "error", "grammar", "prompt_logprobs",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 block_size: int, arrival_time: float | None = None, prompt: str | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        # Per prompt position: {prompt token: log-prob, and the top alternatives}; None for the
        # first token (nothing predicts it). Filled in order while the prompt is prefilled.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler
        self.detokenizer = None  # set by the engine when the request has stop strings
        self.grammar = None  # kvray.replica.grammar.GrammarState, for structured outputs
        self._block_hashes: list[int] = []
        self.block_size = block_size
        # Absolute TTFT deadline (monotonic seconds) for deadline-aware policies.
        self.deadline = params.slo.deadline(self.metrics.arrival_time)
        self.prompt = prompt
        # A numpy mirror of block_table kept by the model runner (grown by appends; rebuilt when
        # block_table is replaced, which the block manager does on free).
        self.np_table = None
        self.np_src = None
        self.error: str | None = None  # why the engine failed this request (it then ends as "abort")

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than one token is left to compute (prompt or recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request asked for prompt log-probs and some are still to compute."""
        lps = self.prompt_logprobs
        return lps is not None and len(lps) < self.num_prompt_tokens

    # ---- prefix hashing --------------------------------------------------------------------
    def block_hashes(self) -> list[int]:
        """Chained hashes of every full block of ``token_ids``, extended lazily."""
        bs = self.block_size
        hashes = self._block_hashes
        while (len(hashes) + 1) * bs <= len(self.token_ids):
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, self.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, status={self.status.value})")


def validate_prompt(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError unless the prompt is non-empty, leaves room for a token, and is in the vocabulary."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but this model's context length "
                         f"(max_model_len) is {max_model_len}; leave room for at least one generated token")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size})")
