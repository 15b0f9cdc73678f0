"""One simulated replica: the real kvray Scheduler + BlockManager, fake tokens, modelled step
times, and the engine's own step-cost fit (published in its stats, as a real engine does)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kvray.records import ReplicaStats
from kvray.replica.block_manager import BlockManager
from kvray.replica.scheduler import Scheduler, SchedulerOutput
from kvray.replica.sequence import Sequence, SequenceStatus
from kvray.step_cost import DEFAULT_COEFFS, StepCoeffs, StepTimeModel


@dataclass
class ReplicaConfig:
    num_blocks: int = 24576          # 393k KV tokens: Llama-3.1-8B in bf16 on an 80 GB H100 at 0.9 utilization
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the engine's default step budget (kvray.replica.engine.DEFAULT_STEP_TOKENS)
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    # The online engine's bounded queue (kvray.replica.config.EngineConfig): a request that would
    # make more requests, or more prompt tokens, wait for a batch slot is refused (429). None: the
    # engine's defaults, max_num_seqs requests and 16 steps' worth of prompt tokens.
    max_queued_requests: int | None = None
    max_queued_prompt_tokens: int | None = None
    # The engine schedules the next step while the current one runs (EngineConfig.async_scheduling):
    # a request that arrives during a step joins the step after the next one.
    async_scheduling: bool = True


class SimReplica:
    """Steps like ``LLMEngine.step``: schedule, "run" for the modelled time, update, sample.

    ``clock`` is the simulator's clock (the Scheduler and the deadline policy read it).
    ``true_model.predict`` gives each step's duration, times lognormal noise of ``noise`` sigma.
    ``step_cost`` is what the engine learns of it (the deadline policy and the router use that).
    """

    def __init__(self, rid: str, cfg: ReplicaConfig, policy, true_model, clock, noise: float = 0.0, seed: int = 0,
                 prior: StepCoeffs = DEFAULT_COEFFS):
        self.rid = rid
        self.cfg = cfg
        self.bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.sched = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len, policy,
                               enable_chunked_prefill=True, clock=clock)
        self.policy = policy
        self.step_cost = StepTimeModel.online(prior)  # a real engine starts from its model shape's recorded fit
        if hasattr(policy, "cost"):
            policy.cost = self.step_cost  # as LLMEngine does
        self.true_model = true_model
        self.noise = noise
        self._rng = random.Random(seed)
        self.busy = False
        self._out: SchedulerOutput | None = None
        self._t0 = 0.0
        self.target_len: dict[str, int] = {}   # request id -> tokens it generates before stopping
        self.busy_time = 0.0
        self._inbox: list[Sequence] = []  # arrived during the step in flight (async: the step after next)
        self._next: list[Sequence] = []   # arrived during the previous step: the next step takes them

    def queue_full(self, prompt_tokens: int) -> bool:
        """Whether the engine refuses a new request of ``prompt_tokens`` (as
        ``AsyncLLMEngine._check_queue`` does: requests waiting for a batch slot, and their prompt
        tokens plus the running prefills' remainders)."""
        cfg, sched = self.cfg, self.sched
        transit = self._inbox + self._next  # submitted, not in the scheduler yet (counted, as the engine does)
        waiting = sched.num_waiting
        requests = max(waiting, sched.num_running + waiting + len(transit) - cfg.max_num_seqs)
        if requests >= (cfg.max_queued_requests or cfg.max_num_seqs):
            return True
        if not requests:
            return False
        tokens = sum(s.num_tokens - s.num_computed_tokens for s in sched.waiting)
        tokens += sum(s.num_tokens - s.num_computed_tokens - 1 for s in sched.running if s.is_prefill)
        tokens += sum(s.num_tokens for s in transit)
        return tokens + prompt_tokens > (cfg.max_queued_prompt_tokens or 16 * cfg.max_num_batched_tokens)

    def add(self, seq: Sequence, output_len: int) -> None:
        self.target_len[seq.request_id] = output_len
        if self.busy and self.cfg.async_scheduling:
            self._inbox.append(seq)  # the next step is scheduled already
        else:
            self.sched.add(seq)

    def start_step(self, now: float) -> float | None:
        """Schedule a step at ``now``; its duration, or None when there is nothing to run."""
        if self.busy:
            return None
        # What arrived during the previous step joins now; what arrived during the last one, the next
        # step (with nothing to run, the engine takes it at once).
        ready, self._next, self._inbox = self._next, self._inbox, []
        if not self.sched.has_unfinished():
            ready, self._next = ready + self._next, []
        for seq in ready:
            self.sched.add(seq)
        if not self.sched.has_unfinished():
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
        self.step_cost.observe(out.num_batched_tokens, out.num_context_tokens, len(out.scheduled), dur)
        return firsts, done

    def stats(self, now: float, decode_cap: int = 512) -> ReplicaStats:
        """What ``LLMReplica.record_routing_stats`` reports: the engine's stats record plus the
        outstanding tokens of its requests (uncached prompt until the first token, then the
        decode budget left, capped as the router caps it)."""
        outstanding = 0
        reqs = list(self.sched.running) + list(self.sched.waiting) + self._inbox + self._next
        for s in reqs:
            prompt = 0 if s.metrics.first_token_time is not None else s.num_prompt_tokens
            outstanding += prompt + max(0, min(s.params.max_tokens, decode_cap) - s.num_output_tokens)
        cfg = self.cfg
        return ReplicaStats(engine=self.sched.stats(self.step_cost), time=now, replica_id=self.rid,
                            outstanding_tokens=outstanding, num_active_requests=len(reqs),
                            max_model_len=cfg.max_model_len, max_queued_requests=cfg.max_queued_requests or
                            cfg.max_num_seqs, max_queued_prompt_tokens=cfg.max_queued_prompt_tokens or
                            16 * cfg.max_num_batched_tokens)
