"""``slo_aware``: the SLO-aware routing policy with admission control (pure Python, no Ray).

Feasibility of a replica for a request: predicted TTFT <= the TTFT budget, ``ttft_margin`` x
target but at least ``ttft_slack_s`` short of it (room for the error of a prediction), where the
prediction is the time already waited + the queued prompt tokens the replica serves first (all
of them for an FCFS replica; for a deadline replica the more urgent ones and those of lower
classes due before the request's deadline, stretched by the recent inflow of higher classes) +
the request's uncached prompt tokens, processed in TPOT-safe chunks next to the running decodes,
with the replica's own published step-cost fit; predicted TPOT with the request added <= the
tightest TPOT target there (the request's own included); a free sequence slot; room in the
engine's bounded queue (which would refuse it with a 429); free KV blocks for prompt + budgeted
output.

Among feasible replicas: the longest prefix-cache hit first (at least ``min_prefix_blocks``),
then ``mode="pack"``: the busiest (most tokens held) among those where the request starts at
once, so idle replicas can be released, else the least predicted TTFT; ``mode="spread"``: the
least predicted TTFT. With more than ``max_candidates`` replicas only that many are estimated in
full, picked by cheap keys (shortest prefill queues, longest prefix hits, busiest).

When no replica is feasible, the request's SLO class decides (``on_infeasible``): ``queue``
holds it until ``recheck_at`` (always before the last moment it could still meet its TTFT: its
deadline minus its own prefill on an idle replica; at that moment it is refused), ``reject``
refuses at once, ``best_effort`` dispatches to the best replica anyway. ``retry_after_s`` is in
``[0.05, ttft_s]``. The replica side is ``kvray.replica.deadline_policy`` (engine option
``scheduling_policy: deadline``).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, QUEUE, REJECT, Decision, RoutingPolicy, register_policy
from kvray.router.replica_state import RATE_WINDOW_S, ReplicaState
from kvray.slo import urgency
from kvray.step_cost import predict_ttft_s, predict_tpot_s, tpot_safe_chunk

NO_TARGET_S = 1e6  # the TTFT budget of a request without a target


# Steps a busy engine has scheduled beyond the one in progress (async scheduling, kvray's
# default): a request sent now joins the step after them.
ENGINE_LOOKAHEAD = 1


@dataclass
class Estimate:
    replica: ReplicaState
    hit_blocks: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float
    tpot_ok: bool
    room: bool
    uncached: int


@register_policy
class SLOAwarePolicy(RoutingPolicy):
    name = "slo_aware"

    def __init__(self, mode: str = "pack", *, ttft_margin: float = 0.85, ttft_slack_s: float = 0.125,
                 tpot_margin: float = 0.9, min_prefix_blocks: int = 1, recheck_interval_s: float = 0.05,
                 min_prefill_tokens: int = 128, pack_wait_s: float = 0.1, max_candidates: int | None = 16, **unknown):
        moved = {"on_infeasible": "it is set per SLO class: slo_classes.<name>.on_infeasible",
                 "step_coeffs": "each replica publishes the step-cost fit of its engine"}
        for k in unknown:
            raise ValueError(f"slo_aware option {k!r}: " + moved.get(k, "unknown; known: mode, ttft_margin, "
                             "ttft_slack_s, tpot_margin, min_prefix_blocks, recheck_interval_s, min_prefill_tokens, "
                             "pack_wait_s, max_candidates"))
        if mode not in ("pack", "spread"):
            raise ValueError(f"mode={mode!r}: must be 'pack' or 'spread'")
        if not isinstance(ttft_slack_s, (int, float)) or ttft_slack_s < 0:
            raise ValueError(f"ttft_slack_s={ttft_slack_s!r}: must be a number >= 0")
        for name, v in (("ttft_margin", ttft_margin), ("tpot_margin", tpot_margin),
                        ("recheck_interval_s", recheck_interval_s), ("pack_wait_s", pack_wait_s)):
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{name}={v!r}: must be a number > 0")
        self.mode = mode
        self.ttft_margin = ttft_margin
        self.ttft_slack_s = ttft_slack_s
        self.tpot_margin = tpot_margin
        self.min_prefix_blocks = min_prefix_blocks
        self.recheck_interval_s = recheck_interval_s
        self.min_prefill_tokens = min_prefill_tokens
        self.pack_wait_s = pack_wait_s
        self.max_candidates = max_candidates

    # ---- predictions -----------------------------------------------------------------------
    def estimate(self, req: RoutingHint, v: ReplicaState, now: float) -> Estimate:
        e = v.engine
        bs = e.block_size
        hit = min(v.prefix_hit_blocks(req.block_hashes), max(0, (req.num_prompt_tokens - 1) // bs))
        cached = hit * bs
        uncached = req.num_prompt_tokens - cached
        m = v.model
        decodes, ctx = v.num_decoding, v.context_tokens
        fcfs = e.scheduling_policy == "fcfs"
        own, there = req.slo.tpot_s, v.min_tpot_s()
        target = own if there is None else (there if own is None else min(own, there))
        guard = target * self.tpot_margin if target and not fcfs else None
        chunk = tpot_safe_chunk(m, decodes + 1, ctx + req.num_prompt_tokens, guard, e.max_num_batched_tokens,
                                self.min_prefill_tokens)
        per_tok = m.predict(decodes + chunk, ctx + chunk, decodes + 1) / chunk
        rate_all, rate_above = v.prefill_rates(now, req.slo.priority)
        # TTFT: the queued work ahead plus the own prompt, slowed down by the share of the
        # prefill capacity that later, higher-priority arrivals take (deadline replicas).
        deadline = req.slo.deadline(req.arrival_time)
        ahead = v.prefill_ahead_of(urgency(deadline, req.slo.priority, now), deadline, now)
        ttft = predict_ttft_s(m, ahead, uncached, decodes, ctx, chunk,
                              lookahead=ENGINE_LOOKAHEAD if decodes or v.queued_prefill_tokens else 0)
        if not fcfs:
            ttft /= 1.0 - min(0.8, rate_above * per_tok)
        # TPOT: a decode step with the request added, stretched by the replica's prefill share;
        # a deadline replica keeps each step within the guard as long as decodes alone fit.
        decode = predict_tpot_s(m, decodes + 1, ctx + req.num_prompt_tokens, 0)
        rho = min(0.95, (rate_all + v.queued_prefill_tokens / RATE_WINDOW_S) * per_tok)
        tpot = decode / (1.0 - rho)
        if guard is not None:
            tpot = min(tpot, max(decode, guard))
        room = v.num_requests < v.max_num_seqs
        queue_limit = v.stats.max_queued_prompt_tokens  # the engine refuses what would queue more (a 429)
        if queue_limit and v.queued_prefill_tokens + uncached > queue_limit:
            room = False
        free = v.free_blocks
        if free is not None:
            room = room and free >= -(-(uncached + req.decode_estimate) // bs)
        return Estimate(v, hit, cached, ttft, tpot, target is None or tpot <= target, room, uncached)

    def _feasible(self, req: RoutingHint, est: Estimate, now: float) -> bool:
        waited = now - req.arrival_time
        return est.tpot_ok and est.room and waited + est.ttft_s <= self.ttft_budget(req)

    def ttft_budget(self, req: RoutingHint) -> float:
        """The most a request's predicted TTFT (time waited included) may be to be sent."""
        ttft = _ttft_s(req)
        return min(self.ttft_margin * ttft, ttft - self.ttft_slack_s)

    @staticmethod
    def idle_ttft(est: Estimate) -> float:
        """The request's TTFT on this replica if it were idle (its own prefill only)."""
        return predict_ttft_s(est.replica.model, 0, est.uncached, 0, 0, est.replica.engine.max_num_batched_tokens)

    def _candidates(self, req: RoutingHint, replicas: list[ReplicaState]) -> list[ReplicaState]:
        """At most ``max_candidates`` replicas to estimate in full, picked by cheap keys: the
        shortest prefill queues (likely feasible), the longest prefix hits, the busiest
        (packing targets). Keeps a decision O(max_candidates) predictions for large pools."""
        n = self.max_candidates
        if not n or len(replicas) <= n:
            return replicas
        by_queue = sorted(replicas, key=lambda v: v.queued_prefill_tokens)
        picked = by_queue[:n // 2]
        if req.block_hashes:
            hits = sorted(((v.prefix_hit_blocks(req.block_hashes), i) for i, v in enumerate(replicas)), reverse=True)
            picked += [replicas[i] for h, i in hits[:n // 4] if h > 0]
        picked += sorted(replicas, key=lambda v: v.context_tokens, reverse=True)[:n // 4]
        out = list({id(v): v for v in picked}.values())
        for v in by_queue[n // 2:]:
            if len(out) >= n:
                break
            if all(v is not w for w in out):
                out.append(v)
        return out

    # ---- the decision ----------------------------------------------------------------------
    def decide(self, request: RoutingHint, book: ReplicaBook, now: float) -> Decision:
        live = book.live(request.avoid)
        if not live:
            return Decision(REJECT, retry_after_s=min(1.0, _ttft_s(request)), reason="no replicas")
        ests = [self.estimate(request, v, now) for v in self._candidates(request, live)]
        feasible = [e for e in ests if self._feasible(request, e, now)]
        if feasible:
            best_hit = max(e.hit_blocks for e in feasible)
            if best_hit >= self.min_prefix_blocks:
                feasible = [e for e in feasible if e.hit_blocks == best_hit]
            return self._dispatch(*self._pick(feasible), ests)
        return self._infeasible(request, ests, now)

    def _pick(self, feasible: list[Estimate]) -> tuple[Estimate, str]:
        """``pack``: the busiest replica where the request starts at once (predicted TTFT within
        ``pack_wait_s`` of an idle replica's), so idle replicas can be released; when none is
        ready, the least predicted TTFT (never leave a replica idle while others queue).
        ``spread``: always the least predicted TTFT."""
        if self.mode == "pack":
            ready = [e for e in feasible if e.ttft_s <= self.idle_ttft(e) + self.pack_wait_s]
            if ready:
                return max(ready, key=lambda e: (e.replica.context_tokens, -e.ttft_s)), "packed"
        return min(feasible, key=lambda e: (e.ttft_s, e.replica.context_tokens)), "least predicted TTFT"

    @staticmethod
    def _dispatch(best: Estimate, reason: str, ests: list[Estimate]) -> Decision:
        others = sorted((e for e in ests if e is not best), key=lambda e: e.ttft_s)
        return Decision(DISPATCH, (best.replica.replica_id, *(e.replica.replica_id for e in others)),
                        cached_tokens=best.cached_tokens, predicted_ttft_s=best.ttft_s, reason=reason)

    def _infeasible(self, req: RoutingHint, ests: list[Estimate], now: float) -> Decision:
        ok = [e for e in ests if e.tpot_ok and e.room] or ests
        best = min(ok, key=lambda e: e.ttft_s)
        ttft_s = _ttft_s(req)
        # Retry-After: how far the best replica is over the TTFT budget, within [0.05, ttft_s].
        excess = (now - req.arrival_time) + best.ttft_s - self.ttft_budget(req)
        retry = min(ttft_s, max(0.05, excess))
        if req.slo.on_infeasible == "best_effort":
            return self._dispatch(best, "best effort: no replica meets the SLO", ests)
        if req.slo.on_infeasible == "queue":
            # The last moment a dispatch could still meet the deadline: an idle replica's TTFT.
            last = req.arrival_time + self.ttft_budget(req) - self.idle_ttft(best)
            if now + 1e-9 < last:
                recheck = min(now + max(self.recheck_interval_s, 0.1 * (last - now)), last)
                return Decision(QUEUE, recheck_at=recheck, retry_after_s=retry, predicted_ttft_s=best.ttft_s,
                                reason="no feasible replica: held in the router")
        return Decision(REJECT, retry_after_s=retry, predicted_ttft_s=best.ttft_s,
                        reason="no replica can meet the SLO in time")


def _ttft_s(req: RoutingHint) -> float:
    """The request's TTFT target; a request without one is never late."""
    return req.slo.ttft_s or NO_TARGET_S
