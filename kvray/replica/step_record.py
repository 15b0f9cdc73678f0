"""The engine's records of its steps: one launched (its device work queued, its results not read
yet) and one completed (what the step-cost model learns from)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvray.replica.prompt_logprobs import PromptLogprobs
from kvray.replica.sampler import SampleResult
from kvray.replica.scheduler import SchedulerOutput
from kvray.replica.sequence import Sequence


@dataclass
class StepRecord:
    """One engine step, as the step-cost model learns from it. ``duration_s`` runs from its
    launch, or from the previous step's end if that is later (async steps overlap), to its end."""

    t_end: float
    duration_s: float
    num_batched_tokens: int
    num_context_tokens: int
    num_seqs: int


@dataclass
class Launched:
    """A step whose device work is queued."""

    out: SchedulerOutput
    sample_seqs: list[Sequence]      # the sequences it samples, one row of ``result`` each
    result: SampleResult | None      # None when it samples nothing (only prompt chunks)
    t_launch: float
    prompt_lp: PromptLogprobs | None = None  # prompt log-probs it computes


def can_look_ahead(step: Launched) -> bool:
    """The next step can be launched before this one's tokens are read: they are a tensor to
    gather from (a sampler that hands back host lists, like a test's stand-in, runs synchronously)."""
    return step.result is None or isinstance(step.result.token_ids, torch.Tensor)
