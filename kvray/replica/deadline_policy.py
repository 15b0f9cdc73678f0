"""Deadline-aware scheduling: admit by weighted TTFT slack, size prefill to keep TPOT targets.

``DeadlinePolicy`` (registered as ``"deadline"``; FCFS stays the default) answers the three
questions of ``kvray.replica.scheduling_policy``:

* **order_waiting** — tiers, then keys:
  0. sequences that already produced tokens (preempted, recomputing): highest class first,
     then arrival — their TPOT clock is running;
  1. sequences whose TTFT deadline is still ahead: by slack / priority (``deadline - now``
     divided by ``params.slo.priority``): earliest deadline first, weighted by class;
  2. sequences without a TTFT target: by ``arrival + default_ttft_s``, in with tier 1's
     deadlines;
  3. sequences already past their TTFT deadline: by deadline (they have missed; serving them
     before on-time ones would make those miss too — they are still served, never dropped).
  The waiting queue is scanned once (O(waiting)) and yielded lazily from a heap.
* **prefill_token_budget** — for each running decode with a TPOT target ``T`` that produced
  ``k`` tokens since its first at ``t1`` and may produce ``r`` more, the step may take
  ``T + bank / min(r, bank_horizon)`` seconds, ``bank = T * (k - 1) - (now - t1)`` (slack
  banked so far against the mean-TPOT target, spent over the next few tokens; a negative bank
  shortens the step so the mean recovers). The budget is the largest prompt chunk whose step, with all running
  decodes, the cost model predicts within the tightest such limit (times ``safety``), at least
  ``min_prefill_tokens``. O(running).
* **prefill_grants** — the step's prefill budget goes to running chunked prefills and waiting
  sequences (as many as there are free batch slots) together, in the order of the admission
  key above: a running prefill gets its share when its turn comes, and what waiting sequences
  rank for is left to their admission. So an urgent prompt starts at the next step instead of
  after a long (or less urgent) prompt's remaining chunks. O((waiting + running) log).
* **pick_victim** — the lowest priority first; among those, the most slack (latest
  deadline), then the newest.

Cost model: ``kvray.step_cost.StepTimeModel``, the engine's own (``LLMEngine`` hands the policy
the model it fits from every step it runs: ``cost``); on its own the policy predicts with the
model's prior.
"""
from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

from kvray.replica.scheduling_policy import SchedulingPolicy, register_policy
from kvray.slo import urgency
from kvray.step_cost import StepTimeModel

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Iterator

    from kvray.replica.sequence import Sequence


class DeadlinePolicy(SchedulingPolicy):
    name = "deadline"

    def __init__(self, cost_model=None, *, default_ttft_s: float = 30.0, safety: float = 0.9,
                 min_prefill_tokens: int = 128, bank_horizon: int = 16):
        self.cost = cost_model if cost_model is not None else StepTimeModel()
        self.default_ttft_s = default_ttft_s
        self.safety = safety
        self.min_prefill_tokens = min_prefill_tokens
        self.bank_horizon = bank_horizon

    # ---- admission order -------------------------------------------------------------------
    def _key(self, seq: Sequence, now: float) -> tuple[int, float]:
        prio = seq.params.slo.priority
        if seq.num_output_tokens > 0:
            return (0, -prio * 1e12 + seq.metrics.arrival_time)
        if seq.deadline is None:  # no target: a deadline default_ttft_s after arrival, at weight 1
            return (1, urgency(seq.metrics.arrival_time + self.default_ttft_s, 1.0, now))
        return (1, urgency(seq.deadline, prio, now))

    def order_waiting(self, waiting: deque[Sequence], now: float) -> Iterator[Sequence]:
        if len(waiting) <= 1:
            return iter(waiting)
        key = self._key
        heap = [(key(s, now), i, s) for i, s in enumerate(waiting)]
        heapq.heapify(heap)
        return _drain(heap)

    def prefill_grants(self, prefills: list[Sequence], waiting, prefill_budget: int, now: float,
                       free_slots: int) -> list[int]:
        key = self._key
        items = [(key(s, now), 0, i, s) for i, s in enumerate(prefills)]
        items += [(key(s, now), 1, i, s) for i, s in enumerate(waiting)]
        items.sort(key=lambda x: x[:3])
        grants, left, slots = [0] * len(prefills), prefill_budget, free_slots
        for _, waits, i, s in items:
            if left <= 0:
                break
            if waits:
                if slots <= 0:
                    continue
                slots -= 1
            g = min(s.num_tokens - s.num_computed_tokens, left)
            if not waits:
                grants[i] = g
            left -= g
        return grants

    # ---- preemption ------------------------------------------------------------------------
    def pick_victim(self, candidates: list[Sequence]) -> Sequence:
        def rank(s: Sequence):
            p = s.params.slo.priority
            deadline = s.deadline if s.deadline is not None else s.metrics.arrival_time + self.default_ttft_s
            return (p, -deadline, -s.metrics.arrival_time)

        return min(candidates, key=rank)

    # ---- prefill budget --------------------------------------------------------------------
    def prefill_token_budget(self, running: list[Sequence], max_num_batched_tokens: int, now: float) -> int:
        limit = math.inf
        num_decodes = 0
        context = 0
        horizon = self.bank_horizon
        for s in running:
            n_tok = len(s.token_ids)
            n_out = n_tok - s.num_prompt_tokens
            if n_out <= 0 or n_tok - s.num_computed_tokens > 1:
                continue  # still prefilling (or recomputing)
            num_decodes += 1
            context += n_tok
            p = s.params
            target = p.slo.tpot_s
            t1 = s.metrics.first_token_time
            if not target or t1 is None:
                continue
            left = max(1, min(horizon, p.max_tokens - n_out))
            bank = target * (n_out - 1) - (now - t1)
            allowed = target + bank / left
            if allowed < limit:
                limit = allowed
        if limit is math.inf:
            return max_num_batched_tokens
        cost = self.cost
        base = cost.predict(num_decodes, context, num_decodes + 1)
        per_tok = (cost.predict(num_decodes + 1000, context + 1000, num_decodes + 1) - base) / 1000.0
        if per_tok <= 0:
            return max_num_batched_tokens
        n = int((limit * self.safety - base) / per_tok)
        return max(min(self.min_prefill_tokens, max_num_batched_tokens), min(max_num_batched_tokens, n))


def _drain(heap: list) -> Iterator[Sequence]:
    while heap:
        yield heapq.heappop(heap)[2]


register_policy("deadline", DeadlinePolicy)
