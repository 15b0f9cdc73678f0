"""SLO-aware replica choice with admission control. Pure Python, no Ray.

Contract (what the Serve adapter calls)
---------------------------------------
::

    policy = SLOAwarePolicy(mode="pack")            # or "spread"
    views = {rid: SLOReplicaState(rid) for rid in replica_ids}   # kvray.router.latency_model
    # on every stats poll:      views[rid].update_stats(stats, taken_at)
    d = policy.choose(request, list(views.values()), now)   # RouteRequest; now = router clock (s)
    if d.action == "dispatch":
        views[d.replica_id].on_dispatch(request.request_id, request.prompt_tokens, request.max_tokens,
                                        request.block_hashes, now, cached_tokens=d.cached_tokens,
                                        deadline=request.deadline, tpot_s=request.slo.tpot_s,
                                        priority=request.slo.priority)
        # then views[rid].on_first_token(id, t) / on_complete(id, t, n_out) as the stream goes
    elif d.action == "queue":
        # hold the request in the router; call choose() again at d.recheck_at at the latest
        # (and preferably whenever a first token or completion frees capacity)
    else:  # "reject"
        # HTTP 429 with header Retry-After: ceil(d.retry_after_s)

``choose`` never mutates its arguments (the adapter applies the ``on_*`` updates). It may be
called with a subset of the replicas, e.g. only the one that just freed capacity, to re-try a
queued request cheaply; a QUEUE/REJECT answer then means "not there", so keep the request's own
timer. ``Decision.recheck_at`` is always before the request's TTFT deadline (``arrival_time +
ttft_ms``); a request re-checked at or after the last moment it could still be served in time
(its deadline minus its own prefill time on an idle replica) is rejected (or dispatched for
``on_infeasible="best_effort"``), so nothing is held past its deadline or dropped silently.
``retry_after_s`` is in ``[0.05, ttft_s]``. A router re-checking several queued requests should
take them in ``urgency(request, now)`` order.

Feasibility of a replica: predicted TTFT <= ``ttft_margin`` x target, where the prediction is
the time already waited + the queued prompt tokens the replica serves first (all of them for an
FCFS replica; for a deadline replica the more urgent ones, stretched by the recent inflow of
higher classes) + the request's uncached prompt tokens, processed in TPOT-safe chunks next to the
running decodes; predicted TPOT with the request added <= the tightest TPOT target there (the
request's own included); a free sequence slot; free KV blocks for prompt + max_tokens. Among
feasible replicas: the longest prefix-cache hit first (at least ``min_prefix_blocks``), then
``mode="pack"``: the busiest (most tokens held) among those where the request starts at once,
so idle replicas can be released, else the least predicted TTFT; ``mode="spread"``: the least
predicted TTFT. With more than ``max_candidates`` replicas only that many are evaluated in full,
picked by cheap keys (shortest prefill queues, longest prefix hits, busiest).

The replica side is ``kvray.replica.deadline_policy.DeadlinePolicy`` (engine option
``scheduling_policy: deadline``); ``SLOReplicaState.scheduler`` tells the policy which one a replica
runs (``stats["scheduling_policy"]`` when reported).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvray.router.latency_model import SLOReplicaState, predict_ttft_s, predict_tpot_s, tpot_safe_chunk

DISPATCH, QUEUE, REJECT = "dispatch", "queue", "reject"


@dataclass(frozen=True)
class SLOClass:
    name: str
    ttft_ms: float
    tpot_ms: float | None = None
    priority: float = 1.0
    on_infeasible: str = "queue"  # "queue" (then reject at the last moment) | "reject" | "best_effort"

    def __post_init__(self) -> None:
        if self.on_infeasible not in ("queue", "reject", "best_effort"):
            raise ValueError(f"SLOClass {self.name!r}: on_infeasible must be queue, reject or best_effort")

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000.0

    @property
    def tpot_s(self) -> float | None:
        return self.tpot_ms / 1000.0 if self.tpot_ms else None


@dataclass
class RouteRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    slo: SLOClass
    arrival_time: float              # router clock, when the request reached the router
    block_hashes: Sequence[int] = ()  # kvray.replica.block_hash.prefix_block_hashes(prompt, block_size)

    @property
    def deadline(self) -> float:
        return self.arrival_time + self.slo.ttft_s


@dataclass(frozen=True)
class Decision:
    action: str                        # DISPATCH | QUEUE | REJECT
    replica_id: str | None = None
    recheck_at: float | None = None    # QUEUE: call choose() again by then
    retry_after_s: float | None = None  # REJECT: seconds for the Retry-After header
    cached_tokens: int = 0             # DISPATCH: prompt tokens believed cached there
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    reason: str = ""


@dataclass
class _Estimate:
    view: SLOReplicaState
    hit_blocks: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float
    tpot_ok: bool
    room: bool
    uncached: int


class SLOAwarePolicy:
    def __init__(self, mode: str = "pack", *, ttft_margin: float = 0.85, tpot_margin: float = 0.95,
                 min_prefix_blocks: int = 1, recheck_interval_s: float = 0.05, min_prefill_tokens: int = 128,
                 pack_wait_s: float = 0.1, max_candidates: int | None = 16):
        if mode not in ("pack", "spread"):
            raise ValueError("mode must be 'pack' or 'spread'")
        self.mode = mode
        self.ttft_margin = ttft_margin
        self.tpot_margin = tpot_margin
        self.min_prefix_blocks = min_prefix_blocks
        self.recheck_interval_s = recheck_interval_s
        self.min_prefill_tokens = min_prefill_tokens
        self.pack_wait_s = pack_wait_s
        self.max_candidates = max_candidates

    # ---- predictions -----------------------------------------------------------------------
    def estimate(self, req: RouteRequest, v: SLOReplicaState, now: float) -> _Estimate:
        stats = v.stats
        bs = stats.get("block_size", 16)
        hit = min(v.prefix_hit_blocks(req.block_hashes), max(0, (req.prompt_tokens - 1) // bs))
        cached = hit * bs
        uncached = req.prompt_tokens - cached
        m = v.model.coeffs
        decodes = v.num_decoding
        ctx = v.context_tokens
        fcfs = v.scheduler == "fcfs"
        own, there = req.slo.tpot_s, v.min_tpot_s()
        target = own if there is None else (there if own is None else min(own, there))
        guard = target * self.tpot_margin if target and not fcfs else None
        chunk = tpot_safe_chunk(m, decodes + 1, ctx + req.prompt_tokens, guard, v.max_num_batched_tokens,
                                self.min_prefill_tokens)
        per_tok = m.predict(decodes + chunk, ctx + chunk, decodes + 1) / chunk
        rate_all, rate_above = v.prefill_rates(now, req.slo.priority)
        # TTFT: the queued work ahead plus the own prompt, slowed down by the share of the
        # prefill capacity that later, higher-priority arrivals take (deadline replicas).
        ahead = v.prefill_ahead_of(req.deadline, req.slo.priority, now)
        ttft = predict_ttft_s(m, ahead, uncached, decodes, ctx, chunk)
        if not fcfs:
            ttft /= 1.0 - min(0.8, rate_above * per_tok)
        # TPOT: a decode step with the request added, stretched by the replica's prefill share;
        # a deadline replica keeps each step within the guard as long as decodes alone fit.
        decode = predict_tpot_s(m, decodes + 1, ctx + req.prompt_tokens, 0)
        rho = min(0.95, (rate_all + v.queued_prefill_tokens / v.rate_window_s) * per_tok)
        tpot = decode / (1.0 - rho)
        if guard is not None:
            tpot = min(tpot, max(decode, guard))
        room = v.num_requests < v.max_num_seqs
        free = v.free_blocks
        if free is not None:
            room = room and free >= -(-(uncached + req.max_tokens) // bs)
        return _Estimate(v, hit, cached, ttft, tpot, target is None or tpot <= target, room, uncached)

    def _feasible(self, req: RouteRequest, e: _Estimate, now: float) -> bool:
        return e.tpot_ok and e.room and (now - req.arrival_time) + e.ttft_s <= self.ttft_margin * req.slo.ttft_s

    @staticmethod
    def _idle_ttft(e: _Estimate) -> float:
        """The request's TTFT on this replica if it were idle (its own prefill only)."""
        return predict_ttft_s(e.view.model.coeffs, 0, e.uncached, 0, 0, e.view.max_num_batched_tokens)

    def _candidates(self, req: RouteRequest, replicas: list[SLOReplicaState]) -> list[SLOReplicaState]:
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
        picked += sorted(replicas, key=lambda v: v.outstanding_tokens, reverse=True)[:n // 4]
        out = list({id(v): v for v in picked}.values())
        for v in by_queue[n // 2:]:
            if len(out) >= n:
                break
            if all(v is not w for w in out):
                out.append(v)
        return out

    # ---- the choice ------------------------------------------------------------------------
    def choose(self, req: RouteRequest, replicas: list[SLOReplicaState], now: float) -> Decision:
        if not replicas:
            return Decision(REJECT, retry_after_s=min(1.0, req.slo.ttft_s), reason="no replicas")
        ests = [self.estimate(req, v, now) for v in self._candidates(req, replicas)]
        feasible = [e for e in ests if self._feasible(req, e, now)]
        if feasible:
            best_hit = max(e.hit_blocks for e in feasible)
            if best_hit >= self.min_prefix_blocks:
                feasible = [e for e in feasible if e.hit_blocks == best_hit]
            return self._dispatch(*self._pick(req, feasible))
        return self._infeasible(req, ests, now)

    def _pick(self, req: RouteRequest, feasible: list[_Estimate]) -> tuple[_Estimate, str]:
        """``pack``: the busiest replica where the request starts at once (predicted TTFT within
        ``pack_wait_s`` of an idle replica's), so idle replicas can be released; when none is
        ready, the least predicted TTFT (never leave a replica idle while others queue).
        ``spread``: always the least predicted TTFT."""
        if self.mode == "pack":
            ready = [e for e in feasible if e.ttft_s <= self._idle_ttft(e) + self.pack_wait_s]
            if ready:
                return max(ready, key=lambda e: (e.view.outstanding_tokens, -e.ttft_s)), "packed"
        return min(feasible, key=lambda e: (e.ttft_s, e.view.outstanding_tokens)), "least predicted TTFT"

    def _dispatch(self, e: _Estimate, reason: str) -> Decision:
        return Decision(DISPATCH, e.view.replica_id, cached_tokens=e.cached_tokens, predicted_ttft_s=e.ttft_s,
                        predicted_tpot_s=e.tpot_s, reason=reason)

    def _infeasible(self, req: RouteRequest, ests: list[_Estimate], now: float) -> Decision:
        slo = req.slo
        ok = [e for e in ests if e.tpot_ok and e.room] or ests
        best = min(ok, key=lambda e: e.ttft_s)
        # Retry-After: how far the best replica is over the TTFT budget, within [0.05, ttft_s].
        excess = (now - req.arrival_time) + best.ttft_s - self.ttft_margin * slo.ttft_s
        retry = min(slo.ttft_s, max(0.05, excess))
        if slo.on_infeasible == "best_effort":
            return self._dispatch(best, "best effort: no replica meets the SLO")
        if slo.on_infeasible == "queue":
            # The last moment a dispatch could still meet the deadline: an idle replica's TTFT.
            idle = self._idle_ttft(best)
            last = req.arrival_time + self.ttft_margin * slo.ttft_s - idle
            if now + 1e-9 < last:
                recheck = min(now + max(self.recheck_interval_s, 0.1 * (last - now)), last)
                return Decision(QUEUE, recheck_at=recheck, retry_after_s=retry, predicted_ttft_s=best.ttft_s,
                                reason="no feasible replica: held in the router")
        return Decision(REJECT, retry_after_s=retry, predicted_ttft_s=best.ttft_s,
                        reason="no replica can meet the SLO in time")


def urgency(req: RouteRequest, now: float) -> float:
    """Order in which a router re-checks queued requests (the replicas' deadline order)."""
    slack = req.deadline - now
    return slack / max(req.slo.priority, 1e-9) if slack >= 0 else math.inf
