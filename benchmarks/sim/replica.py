"""One simulated replica: the real kvray Scheduler + BlockManager, fake tokens, modelled step times."""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from kvray.replica.block_manager import BlockManager
from kvray.replica.scheduler import Scheduler, SchedulerOutput
from kvray.replica.sequence import Sequence, SequenceStatus

STEP_HISTORY = 64


@dataclass
class ReplicaConfig:
    num_blocks: int = 16384          # 262k KV tokens (Qwen3-0.6B on an 80 GB GPU holds more)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # the engine's default with chunked prefill
    max_model_len: int = 8192
    enable_prefix_caching: bool = True


class SimReplica:
    """Steps like ``LLMEngine.step``: schedule, "run" for the modelled time, update, sample.

    ``clock`` is the simulator's clock (the Scheduler and the deadline policy read it).
    ``true_model.predict`` gives each step's duration, times lognormal noise of ``noise`` sigma.
    """

    def __init__(self, rid: str, cfg: ReplicaConfig, policy, true_model, clock, noise: float = 0.0, seed: int = 0):
        self.rid = rid
        self.cfg = cfg
        self.bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.sched = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len, policy,
                               enable_chunked_prefill=True, clock=clock)
        self.policy = policy
        self.true_model = true_model
        self.noise = noise
        self._rng = random.Random(seed)
        self.busy = False
        self._out: SchedulerOutput | None = None
        self._t0 = 0.0
        self.history: deque = deque(maxlen=STEP_HISTORY)
        self.target_len: dict[str, int] = {}   # request id -> tokens it generates before stopping
        self.busy_time = 0.0

    def add(self, seq: Sequence, output_len: int) -> None:
        self.target_len[seq.request_id] = output_len
        self.sched.add(seq)

    def start_step(self, now: float) -> float | None:
        """Schedule a step at ``now``; its duration, or None when there is nothing to run."""
        if self.busy or not self.sched.has_unfinished():
            return None
        out = self.sched.schedule()
        if out.is_empty:
            return None
        dur = self.true_model.predict(out.num_batched_tokens, out.num_context_tokens, len(out.scheduled))
        if self.noise:
            dur *= math.exp(self._rng.gauss(-0.5 * self.noise ** 2, self.noise))
        self.busy = True
        self._out = out
        self._t0 = now
        return dur

    def finish_step(self, now: float) -> tuple[list[Sequence], list[Sequence]]:
        """End the running step: (sequences that got their first token, sequences that finished)."""
        out = self._out
        self._out = None
        self.busy = False
        self.sched.update_after_step(out)
        dur = now - self._t0
        self.busy_time += dur
        firsts: list[Sequence] = []
        done: list[Sequence] = []
        max_len = self.cfg.max_model_len
        running = SequenceStatus.RUNNING
        target = self.target_len
        for seq, _ in out.scheduled:
            toks = seq.token_ids
            if seq.num_computed_tokens != len(toks) or seq.status is not running:
                continue
            toks.append(0)
            m = seq.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                firsts.append(seq)
            n_out = len(toks) - seq.num_prompt_tokens
            if n_out >= target[seq.request_id] or n_out >= seq.params.max_tokens or len(toks) >= max_len:
                seq.metrics.finished_time = now
                self.sched.finish(seq, "length")
                del self.target_len[seq.request_id]
                done.append(seq)
        self.history.append((now, dur, out.num_batched_tokens, out.num_context_tokens, len(out.scheduled)))
        observe = getattr(self.policy, "observe_step", None)
        if observe is not None:  # what the engine does once it calls the policy's hook
            observe(dur, out.num_batched_tokens, out.num_context_tokens, len(out.scheduled))
        return firsts, done

    def stats(self, now: float, decode_cap: int = 512) -> dict:
        """``LLMEngine.stats()`` keys plus the platform replica's routing extras."""
        sched = self.sched
        running, waiting = sched.running, sched.waiting
        tokens = queued = outstanding = 0
        for s in running:
            tokens += s.num_tokens
            left = s.num_tokens - s.num_computed_tokens
            if left > 1:
                queued += left - 1
            budget = min(s.params.max_tokens, decode_cap)
            outstanding += (0 if s.metrics.first_token_time is not None else s.num_prompt_tokens) \
                + max(0, budget - s.num_output_tokens)
        for s in waiting:
            tokens += s.num_tokens
            queued += s.num_tokens - s.num_computed_tokens
            budget = min(s.params.max_tokens, decode_cap)
            outstanding += (0 if s.metrics.first_token_time is not None else s.num_prompt_tokens) \
                + max(0, budget - s.num_output_tokens)
        return {
            "num_running": len(running),
            "num_waiting": len(waiting),
            "num_free_blocks": self.bm.num_free_blocks,
            "num_total_blocks": self.bm.num_total_blocks,
            "tokens_in_flight": tokens,
            "queued_prefill_tokens": queued,
            "prefix_hit_rate": 0.0,
            "step_times": list(self.history),
            "block_size": self.cfg.block_size,
            "max_num_seqs": self.cfg.max_num_seqs,
            "max_num_batched_tokens": self.cfg.max_num_batched_tokens,
            "time": now,
            "outstanding_tokens": outstanding,
            "num_active_requests": len(running) + len(waiting),
            "healthy": True,
            "scheduling_policy": getattr(self.policy, "name", "fcfs"),
        }
