"""Continuous batching: each step grants every scheduled sequence a number of new tokens.

The output of a step is essentially ``{sequence: num_new_tokens}``, so decodes (1 token),
chunks of a long prompt and prompts with a cached prefix all go through one mechanism. Each
step:

1. Running sequences, in running order, get ``min(tokens left to compute, budget)`` (prefill
   work also capped by the policy's prefill budget). A sequence that cannot get KV blocks
   makes the policy preempt a victim among the running sequences not yet scheduled this step
   (recompute: its blocks are freed, it returns to the front of the waiting queue, and its
   full blocks mostly survive in the prefix cache). If the victim is the sequence itself it
   sits this step out.
2. If nothing was preempted, waiting sequences are admitted in policy order while
   ``max_num_seqs`` and the token budget allow. A prompt is cut to the remaining budget when
   chunked prefill is on; otherwise it is admitted only if it fits whole.

Every step does work proportional to the running sequences plus the ones it admits.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvray.records import EngineStats, RequestSnapshot
from kvray.replica.block_manager import BlockManager
from kvray.replica.scheduling_policy import FCFSPolicy, SchedulingPolicy
from kvray.replica.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num_new_tokens)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0       # tokens of sequences with more than one token to compute
    num_decode_tokens: int = 0
    num_context_tokens: int = 0       # sum of context lengths after the step (the seq_lens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, policy: SchedulingPolicy | None = None, enable_chunked_prefill: bool = True,
                 *, clock: Callable[[], float] = time.monotonic):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1")
        if block_manager.num_total_blocks * block_manager.block_size < max_model_len:
            raise ValueError(f"the KV pool holds {block_manager.num_total_blocks * block_manager.block_size} tokens, "
                             f"fewer than max_model_len={max_model_len}: one sequence could never fit")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({max_num_batched_tokens}) must be "
                             f">= max_model_len ({max_model_len}), or long prompts could never be admitted")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy or FCFSPolicy()
        self.enable_chunked_prefill = enable_chunked_prefill
        self.clock = clock
        self._waiting: deque[Sequence] = deque()
        self._running: dict[Sequence, None] = {}  # insertion-ordered set: running order
        self._requests: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ---- queues ------------------------------------------------------------------------------
    @property
    def running(self) -> list[Sequence]:
        return list(self._running)

    @property
    def waiting(self) -> deque[Sequence]:
        return self._waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if seq.num_tokens < 1:
            raise ValueError(f"request {seq.request_id!r} has no tokens")
        if seq.num_tokens > self.max_model_len:
            raise ValueError(f"request {seq.request_id!r} has {seq.num_tokens} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id!r} already holds KV state")
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its blocks now. None if unknown/finished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        if seq in self._running:
            del self._running[seq]
        else:
            self._waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.WAITING:  # preempted while its last token was in flight (async scheduling)
            self._waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self._requests.get(seq.request_id) is seq:
            del self._requests[seq.request_id]
        self._running.pop(seq, None)
        self.block_manager.free(seq)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prefill_left, grants = self._prefill_budget(budget, now)
        budget, prefill_left = self._schedule_running(out, budget, prefill_left, grants)  # 1. running sequences
        if not out.preempted:  # 2. admissions
            if not self._running and prefill_left <= 0:
                prefill_left = budget  # nothing runs: a policy may not starve the engine
            self._admit(out, budget, prefill_left, now)
        out.num_decode_tokens = out.num_batched_tokens - out.num_prefill_tokens
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, prefill_left: int,
                          grants: dict[int, int]) -> tuple[int, int]:
        """Grant the running sequences their tokens, in running order (a chunked prefill at most its
        ``grants`` share), preempting where KV blocks run out; returns what is left of the token and
        prefill budgets."""
        bm = self.block_manager
        scheduled = out.scheduled
        order = list(self._running)
        kept: dict[Sequence, None] = {}
        gone: set[int] = set()  # id() of sequences preempted this step
        context = prefill = 0
        for idx, seq in enumerate(order):
            if id(seq) in gone:
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if remaining > 1:
                n = min(n, prefill_left, grants.get(id(seq), 0))
            if n <= 0:
                kept[seq] = None
                continue
            while not bm.allocate_slots(seq, n):
                candidates = [s for s in order[idx:] if id(s) not in gone]
                victim = self.policy.pick_victim(candidates)
                if victim not in candidates:
                    raise RuntimeError(f"policy {type(self.policy).__name__} picked a victim outside the candidates")
                gone.add(id(victim))
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    if not kept and len(candidates) == 1:
                        need = bm.num_blocks_for(seq.num_computed_tokens + n)
                        if need > bm.num_total_blocks:
                            raise RuntimeError(f"request {seq.request_id!r} needs {need} KV blocks, more than the "
                                               f"{bm.num_total_blocks} the pool has")
                    break
            else:
                kept[seq] = None
                scheduled.append((seq, n))
                budget -= n
                context += seq.num_computed_tokens + n
                if remaining > 1:
                    prefill_left -= n
                    prefill += n
        self._running = kept
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        out.num_context_tokens = context
        out.num_prefill_tokens = prefill
        return budget, prefill_left

    def _prefill_budget(self, budget: int, now: float) -> tuple[int, dict[int, int]]:
        """The step's prompt-token budget, and each running chunked prefill's share of it (by
        ``id``), as the policy grants them; what they leave goes to the waiting sequences."""
        prefill = self.policy.prefill_token_budget(self.running, budget, now)
        if prefill < 0:
            raise ValueError(f"policy {type(self.policy).__name__} returned a negative prefill budget")
        prefills = [s for s in self._running if s.num_tokens - s.num_computed_tokens > 1]
        if not prefills:
            return prefill, {}
        slots = self.max_num_seqs - len(self._running)
        shares = self.policy.prefill_grants(prefills, self._waiting if slots > 0 else (), prefill, now, slots)
        return prefill, {id(s): g for s, g in zip(prefills, shares)}

    def _admit(self, out: SchedulerOutput, budget: int, prefill_left: int, now: float) -> None:
        bm = self.block_manager
        waiting = self._waiting
        ordered = self.policy.order_waiting(waiting, now)
        fast = ordered is waiting
        admitted: set[int] = set()
        for seq in (_heads(waiting) if fast else ordered):
            if len(self._running) >= self.max_num_seqs or budget <= 0 or prefill_left <= 0:
                break
            if seq.status is not SequenceStatus.WAITING:
                continue  # a policy listed a sequence twice or one that is not waiting
            computed, num_cached = bm.get_computed_blocks(seq)
            if computed and seq.needs_prompt_logprobs:
                # cached blocks hold K/V but not the hidden states that prompt log-probs come from:
                # use them only for the prefix whose log-probs are known (kvray.replica.prompt_logprobs)
                computed = computed[:(len(seq.prompt_logprobs) - 1) // bm.block_size]
                num_cached = len(computed) * bm.block_size
            remaining = seq.num_tokens - num_cached
            limit = min(budget, prefill_left) if remaining > 1 else budget
            if self.enable_chunked_prefill:
                n = min(remaining, limit)
            elif remaining <= limit:
                n = remaining
            else:
                break
            if not bm.allocate_slots(seq, n, computed):
                break
            seq.num_computed_tokens = num_cached
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self._running[seq] = None
            out.scheduled.append((seq, n))
            out.num_batched_tokens += n
            out.num_context_tokens += num_cached + n
            budget -= n
            if remaining > 1:
                prefill_left -= n
                out.num_prefill_tokens += n
            if fast:
                waiting.popleft()
            else:
                admitted.add(id(seq))
        if admitted:
            self._waiting = deque(s for s in waiting if id(s) not in admitted)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(seq)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Advance each scheduled sequence by its granted tokens and cache its new full blocks."""
        bm = self.block_manager
        for seq, n in output.scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += n
            bm.cache_blocks(seq)

    # ---- what the engine publishes ----------------------------------------------------------
    def stats(self, step_cost) -> EngineStats:
        """The engine's stats record: queues, KV, limits, and the step-cost fit ``step_cost``
        (a ``kvray.step_cost.StepTimeModel``) of the steps run so far."""
        running, waiting, bm = self.running, self._waiting, self.block_manager
        bm_stats = bm.stats()
        tpots = [t for s in running if (t := s.params.slo.tpot_s)] + [t for s in waiting if (t := s.params.slo.tpot_s)]
        return EngineStats(
            num_running=len(running), num_waiting=len(waiting), num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            tokens_in_flight=sum(s.num_tokens for s in running) + sum(s.num_tokens for s in waiting),
            queued_prefill_tokens=sum(s.num_tokens - s.num_computed_tokens for s in waiting)
            + sum(s.num_tokens - s.num_computed_tokens - 1 for s in running if s.is_prefill),
            prefix_hit_rate=bm_stats["prefix_hit_rate"], prefix_hit_tokens=bm_stats["prefix_hit_tokens"],
            prefix_queried_tokens=bm_stats["prefix_queried_tokens"], block_size=bm.block_size,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            scheduling_policy=self.policy.name, min_tpot_s=min(tpots) if tpots else None,
            step_coeffs=step_cost.coeffs.as_tuple(), num_steps=step_cost.num_samples)

    def request_snapshots(self) -> list[RequestSnapshot]:
        """The in-flight requests with their targets (the autoscaler predicts their attainment)."""
        out = []
        for s in list(self.running) + list(self._waiting):
            p, m = s.params, s.metrics
            left = max(0, s.num_tokens - s.num_computed_tokens) if m.first_token_time is None else 0
            out.append(RequestSnapshot(m.arrival_time, m.first_token_time, left, s.num_output_tokens, p.max_tokens,
                                       p.slo.ttft_s, p.slo.tpot_s, s.deadline))
        return out


def _heads(q: deque[Sequence]):
    """Yield the head of ``q`` until it is empty (the caller pops each admitted head)."""
    while q:
        yield q[0]
