"""SLO-aware replica choice with admission control. Pure Python, no Ray.

Contract (what the Serve adapter calls)
---------------------------------------
::

    policy = SLOAwarePolicy(mode="pack")            # or "spread"
    views = {rid: ReplicaView(rid) for rid in replica_ids}   # kvray.router.latency_model
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

``choose`` never mutates its arguments. ``Decision.recheck_at`` is always before the request's
TTFT deadline (``arrival_time + ttft_ms``); a request re-checked at or after the last moment it
could still be served in time is rejected (or dispatched for ``on_infeasible="best_effort"``),
so nothing is held past its deadline or dropped silently. ``retry_after_s`` is in
``[0.05, ttft_s]``.

Feasibility of a replica: predicted TTFT (time already waited + queued prompt tokens of more
urgent requests + the request's uncached prompt tokens, processed in TPOT-safe chunks next to the
running decodes) <= ``ttft_margin`` x target; predicted TPOT with the request added <= the
tightest TPOT target there (the request's own included); a free sequence slot; enough free KV
blocks for prompt + max_tokens. Among feasible replicas: the longest prefix-cache hit first
(when at least ``min_prefix_blocks``), then the busiest (``mode="pack"``: most outstanding
tokens, so idle replicas can be released) or the least busy (``mode="spread"``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvray.router.latency_model import ReplicaView, predict_ttft_s, predict_tpot_s, tpot_safe_chunk

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
    view: ReplicaView
    hit_blocks: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float
    tpot_ok: bool
    room: bool
    idle_ttft_s: float


class SLOAwarePolicy:
    def __init__(self, mode: str = "pack", *, ttft_margin: float = 0.85, tpot_margin: float = 0.95,
                 min_prefix_blocks: int = 1, recheck_interval_s: float = 0.05, min_prefill_tokens: int = 128,
                 pack_wait_s: float = 0.1, class_affinity: bool = True):
        if mode not in ("pack", "spread"):
            raise ValueError("mode must be 'pack' or 'spread'")
        self.mode = mode
        self.ttft_margin = ttft_margin
        self.tpot_margin = tpot_margin
        self.min_prefix_blocks = min_prefix_blocks
        self.recheck_interval_s = recheck_interval_s
        self.min_prefill_tokens = min_prefill_tokens
        self.pack_wait_s = pack_wait_s
        self.class_affinity = class_affinity

    # ---- predictions -----------------------------------------------------------------------
    def estimate(self, req: RouteRequest, v: ReplicaView, now: float) -> _Estimate:
        bs = int(v.stats.get("block_size", 16))
        hit = min(v.prefix_hit_blocks(req.block_hashes), max(0, (req.prompt_tokens - 1) // bs))
        cached = hit * bs
        uncached = req.prompt_tokens - cached
        model = v.model
        decodes = v.num_decoding
        ctx = v.context_tokens
        fcfs = v.scheduler == "fcfs"
        targets = [t for t in (v.min_tpot_s(), req.slo.tpot_s) if t]
        tpot_target = min(targets) if targets else None
        guard = tpot_target * self.tpot_margin if tpot_target and not fcfs else None
        max_chunk = v.max_num_batched_tokens
        chunk = tpot_safe_chunk(model, decodes + 1, ctx + req.prompt_tokens, guard, max_chunk, self.min_prefill_tokens)
        per_tok = model.predict(decodes + chunk, ctx + chunk, decodes + 1) / chunk
        # TTFT: the queued work ahead plus the own prompt, slowed down by the share of the
        # prefill capacity that later, higher-priority arrivals take (deadline replicas).
        ahead = v.prefill_ahead_of(req.deadline, req.slo.priority, now)
        ttft = predict_ttft_s(model, ahead, uncached, decodes, ctx, chunk)
        if not fcfs:
            rho_hp = min(0.8, v.prefill_rate(now, above=req.slo.priority) * per_tok)
            ttft /= 1.0 - rho_hp
        # TPOT: a decode step with the request added, stretched by the replica's prefill share;
        # a deadline replica keeps each step within the guard as long as decodes alone fit.
        decode = predict_tpot_s(model, decodes + 1, ctx + req.prompt_tokens, 0)
        rho = min(0.95, (v.prefill_rate(now) + v.queued_prefill_tokens / max(1.0, v.rate_window_s)) * per_tok)
        tpot = decode / (1.0 - rho)
        if guard is not None:
            tpot = min(tpot, max(decode, guard))
        tpot_ok = tpot_target is None or tpot <= tpot_target
        room = v.num_requests < v.max_num_seqs
        free = v.free_blocks
        if free is not None:
            room = room and free >= -(-(uncached + req.max_tokens) // bs)
        idle = predict_ttft_s(model, 0, uncached, 0, 0, max_chunk)
        return _Estimate(v, hit, cached, ttft, tpot, tpot_ok, room, idle)

    def _feasible(self, req: RouteRequest, e: _Estimate, now: float) -> bool:
        return e.tpot_ok and e.room and (now - req.arrival_time) + e.ttft_s <= self.ttft_margin * req.slo.ttft_s

    # ---- the choice ------------------------------------------------------------------------
    def choose(self, req: RouteRequest, replicas: list[ReplicaView], now: float) -> Decision:
        if not replicas:
            return Decision(REJECT, retry_after_s=min(1.0, req.slo.ttft_s), reason="no replicas")
        ests = [self.estimate(req, v, now) for v in replicas]
        feasible = [e for e in ests if self._feasible(req, e, now)]
        if feasible:
            best_hit = max(e.hit_blocks for e in feasible)
            if best_hit >= self.min_prefix_blocks:
                feasible = [e for e in feasible if e.hit_blocks == best_hit]
            return self._dispatch(*self._pick(req, feasible))
        return self._infeasible(req, ests, now)

    def _pick(self, req: RouteRequest, feasible: list[_Estimate]) -> tuple[_Estimate, str]:
        """Among feasible replicas: "home" ones first (running the request's TPOT class, or no
        TPOT-bound work), then "guests" (a tighter class runs there: fine for this request),
        then "intruder" ones (only looser classes run there: this request would cap their step
        size for its whole decode). Within a tier: pack onto the busiest replica where the
        request starts at once; when none is ready, the least predicted TTFT (work-conserving).
        A ready guest beats a home replica with a queue. ``class_affinity=False``: one tier."""
        ready = lambda es: [e for e in es if e.ttft_s <= e.idle_ttft_s + self.pack_wait_s]  # noqa: E731
        busiest = lambda es: max(es, key=lambda e: (e.view.outstanding_tokens, -e.ttft_s))  # noqa: E731
        quickest = lambda es: min(es, key=lambda e: (e.ttft_s, e.view.outstanding_tokens))  # noqa: E731
        if self.mode == "spread":
            return quickest(feasible), "spread: least predicted TTFT"
        if not self.class_affinity:
            tiers = [feasible]
        else:
            groups = [self._group(req, e) for e in feasible]
            tiers = [[e for e, g in zip(feasible, groups) if g in gs] for gs in ((0, 1), (2,), (3,))]
            tiers = [t for t in tiers if t]
        first = tiers[0]
        r = ready(first)
        if r:
            return busiest(r), "packed"
        for t in tiers[1:]:
            r = ready(t)
            if r:
                return busiest(r), "packed (other class)"
        return quickest(first), "least predicted TTFT"

    @staticmethod
    def _group(req: RouteRequest, e: _Estimate) -> int:
        """0: the replica already runs this TPOT class; 1: it runs nothing with a target;
        2: it runs a tighter class; 3: it runs only looser classes (this request would cap them)."""
        own, there = req.slo.tpot_s, e.view.min_tpot_s()
        if there is None or own is None:
            return 1
        if abs(there - own) < 1e-9:
            return 0
        return 2 if there < own else 3

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
            v = best.view
            idle = predict_ttft_s(v.model, 0, req.prompt_tokens - best.cached_tokens, 0, 0, v.max_num_batched_tokens)
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
