"""The event loop for one point: a router policy, N replicas, one arrival rate."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from benchmarks.sim.replica import ReplicaConfig, SimReplica
from benchmarks.sim.workload import SimRequest, prompt_token_ids
from kvray.replica.deadline_policy import DeadlinePolicy
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.scheduling_policy import FCFSPolicy
from kvray.replica.sequence import Sequence
from kvray.router.baselines import LeastLoadPolicy, PowerOfTwoChoicesPolicy, RoundRobinPolicy
from kvray.router.latency_model import DEFAULT_COEFFS, SLOReplicaState, StepCoeffs, StepTimeModel
from kvray.router.slo_policy import DISPATCH, QUEUE, RouteRequest, SLOAwarePolicy, urgency

# policy name -> (router, replica scheduler)
POLICIES = {
    "round-robin": ("round-robin", "fcfs"),
    "p2c": ("p2c", "fcfs"),
    "least-load": ("least-load", "fcfs"),
    "slo-aware": ("slo-pack", "deadline"),
    # ablations
    "slo-aware-spread": ("slo-spread", "deadline"),
    "slo-router+fcfs": ("slo-pack", "fcfs"),
    "p2c+deadline": ("p2c", "deadline"),
    "least-load+deadline": ("least-load", "deadline"),
}
DEFAULT_POLICIES = ["round-robin", "p2c", "least-load", "slo-aware"]

ARRIVE, STEP_END, POLL, DELIVER, RECHECK = range(5)


@dataclass
class SimConfig:
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    true_coeffs: StepCoeffs = DEFAULT_COEFFS
    noise: float = 0.05            # lognormal sigma of step times around the model
    poll_interval_s: float = 0.1   # routing-stats poll period (the router's staleness)
    poll_delay_s: float = 0.0      # extra delivery delay of a poll
    warmup_frac: float = 0.1       # arrivals in the first fraction are not measured
    drain_s: float = 30.0          # stop this long after the last arrival
    p2c_max_ongoing: int | None = None
    decode_estimate_cap: int = 512
    recheck_per_event: int = 8


@dataclass
class Record:
    req: SimRequest
    replica: int = -1
    dispatched: float | None = None
    first_token: float | None = None
    finished: float | None = None
    n_out: int = 0
    rejected: bool = False


def make_router(name: str, clock, cfg: SimConfig, seed: int):
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "p2c":
        return PowerOfTwoChoicesPolicy(seed=seed, max_ongoing_requests=cfg.p2c_max_ongoing)
    if name == "least-load":
        return LeastLoadPolicy(clock, decode_estimate_cap=cfg.decode_estimate_cap,
                               block_size=cfg.replica.block_size, seed=seed)
    if name in ("slo-pack", "slo-spread"):
        return SLOAwarePolicy(mode="pack" if name == "slo-pack" else "spread")
    raise ValueError(f"unknown router {name!r}")


class Cluster:
    def __init__(self, policy: str, num_replicas: int, requests: list[SimRequest], cfg: SimConfig, seed: int = 0):
        router_name, sched_name = POLICIES[policy]
        self.cfg = cfg
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        true_model = StepTimeModel.fixed_coeffs(cfg.true_coeffs)
        self.replicas = [
            SimReplica(f"r{i}", cfg.replica, DeadlinePolicy() if sched_name == "deadline" else FCFSPolicy(),
                       true_model, clock, cfg.noise, seed=seed * 1000 + i)
            for i in range(num_replicas)]
        self.views = [SLOReplicaState(r.rid, max_num_batched_tokens=cfg.replica.max_num_batched_tokens,
                                 scheduler=sched_name)
                      for r in self.replicas]
        self.router = make_router(router_name, clock, cfg, seed)
        noop = lambda *a: None  # noqa: E731
        self._on_stats = getattr(self.router, "on_stats", noop)
        self._on_dispatch = getattr(self.router, "on_dispatch", noop)
        self._on_complete = getattr(self.router, "on_complete", noop)
        self.uses_stats = router_name not in ("round-robin", "p2c")
        self.requests = requests
        self.records = [Record(r) for r in requests]
        self.route_reqs: dict[int, RouteRequest] = {}
        self.seqs: dict[int, Sequence] = {}
        self.queued: dict[int, int] = {}   # rid -> recheck token
        self._heap: list = []
        self._n = 0
        self.open = len(requests)

    # ---- events ----------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a=None, b=None) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, a, b))

    def run(self) -> list[Record]:
        for i, r in enumerate(self.requests):
            self._push(r.arrival, ARRIVE, i)
        last_arrival = self.requests[-1].arrival if self.requests else 0.0
        self.end = last_arrival + self.cfg.drain_s
        if self.uses_stats:
            self._push(0.0, POLL)
        heap = self._heap
        while heap and self.open > 0:
            t, _, kind, a, b = heapq.heappop(heap)
            if t > self.end:
                break
            self.now = t
            if kind == STEP_END:
                self._step_end(a)
            elif kind == ARRIVE:
                self._arrive(a)
            elif kind == POLL:
                self._poll()
            elif kind == DELIVER:
                self._deliver(a, b)
            elif kind == RECHECK:
                if self.queued.get(a) == b:
                    self._route(a, None)
        self.now = min(self.now, self.end)
        return self.records

    def _arrive(self, i: int) -> None:
        req = self.requests[i]
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True, slo_class=req.slo.name,
                                ttft_ms=req.slo.ttft_ms, tpot_ms=req.slo.tpot_ms, priority=req.slo.priority)
        seq = Sequence(str(req.rid), prompt_token_ids(req), params, self.cfg.replica.block_size, req.arrival)
        self.seqs[i] = seq
        hashes = seq.block_hashes() if self.cfg.replica.enable_prefix_caching else ()
        self.route_reqs[i] = RouteRequest(seq.request_id, req.prompt_len, req.max_tokens, req.slo, req.arrival, hashes)
        self._route(i, None)

    def _route(self, i: int, only: int | None) -> bool:
        """Ask the router about request i (over all replicas, or only replica ``only``)."""
        rreq = self.route_reqs[i]
        views = self.views if only is None else [self.views[only]]
        d = self.router.choose(rreq, views, self.now)
        if d.action == DISPATCH:
            self.queued.pop(i, None)
            self._dispatch(i, int(d.replica_id[1:]), d.cached_tokens)
            return True
        if only is not None:
            return False
        if d.action == QUEUE:
            token = self.queued.get(i, 0) + 1
            self.queued[i] = token
            self._push(max(d.recheck_at, self.now + 1e-6), RECHECK, i, token)
            return False
        self.queued.pop(i, None)  # rejected (429): counted as a miss
        rec = self.records[i]
        rec.rejected = True
        self.open -= 1
        self.seqs.pop(i, None)
        return False

    def _dispatch(self, i: int, ri: int, cached_tokens: int) -> None:
        rreq, seq, rec = self.route_reqs[i], self.seqs[i], self.records[i]
        rec.replica, rec.dispatched = ri, self.now
        slo = rreq.slo
        self.views[ri].on_dispatch(rreq.request_id, rreq.prompt_tokens, rreq.max_tokens, rreq.block_hashes, self.now,
                                   cached_tokens=cached_tokens, deadline=rreq.deadline, tpot_s=slo.tpot_s,
                                   priority=slo.priority)
        self._on_dispatch(rreq, self.views[ri].replica_id, self.now)
        rep = self.replicas[ri]
        rep.add(seq, rec.req.output_len)
        self._kick(ri)

    def _kick(self, ri: int) -> None:
        dur = self.replicas[ri].start_step(self.now)
        if dur is not None:
            self._push(self.now + dur, STEP_END, ri)

    def _step_end(self, ri: int) -> None:
        rep, view = self.replicas[ri], self.views[ri]
        firsts, done = rep.finish_step(self.now)
        now = self.now
        for seq in firsts:
            i = int(seq.request_id)
            self.records[i].first_token = now
            view.on_first_token(seq.request_id, now)
        for seq in done:
            i = int(seq.request_id)
            rec = self.records[i]
            rec.finished, rec.n_out = now, seq.num_output_tokens
            view.on_complete(seq.request_id, now, seq.num_output_tokens)
            self._on_complete(seq.request_id, now)
            self.seqs.pop(i, None)
            self.open -= 1
        self._kick(ri)
        if self.queued and (firsts or done):
            self._recheck(ri)

    def _recheck(self, ri: int) -> None:
        order = sorted(self.queued, key=lambda i: urgency(self.route_reqs[i], self.now))
        for i in order[:self.cfg.recheck_per_event]:
            self._route(i, ri)

    def _poll(self) -> None:
        now = self.now
        snaps = [r.stats(now, self.cfg.decode_estimate_cap) for r in self.replicas]
        if self.cfg.poll_delay_s > 0:
            self._push(now + self.cfg.poll_delay_s, DELIVER, snaps, now)
        else:
            self._deliver(snaps, now)
        self._push(now + self.cfg.poll_interval_s, POLL)

    def _deliver(self, snaps: list[dict], taken_at: float) -> None:
        for v, s in zip(self.views, snaps):
            v.update_stats(s, taken_at)
            self._on_stats(v.replica_id, s, self.now)

    # ---- results ---------------------------------------------------------------------------
    def for_unfinished(self) -> None:
        """Requests still running at the cut-off: judge them on what they did so far."""
        for i, seq in list(self.seqs.items()):
            rec = self.records[i]
            if rec.finished is None and rec.first_token is not None:
                rec.n_out = seq.num_output_tokens
                rec.finished = self.end


def summarize(records: list[Record], measure_from: float) -> dict:
    """Per class: attainment (TTFT and TPOT both met; rejected and unserved count as misses)."""
    by: dict[str, list] = {}
    for rec in records:
        if rec.req.arrival < measure_from:
            continue
        by.setdefault(rec.req.slo.name, []).append(rec)
    out = {}
    for name, recs in sorted(by.items()):
        slo = recs[0].req.slo
        ttfts, tpots = [], []
        ok = rejected = 0
        for rec in recs:
            if rec.rejected:
                rejected += 1
                continue
            if rec.first_token is None:
                continue
            ttft = rec.first_token - rec.req.arrival
            ttfts.append(ttft)
            tpot = None
            if rec.finished is not None and rec.n_out > 1:
                tpot = (rec.finished - rec.first_token) / (rec.n_out - 1)
                tpots.append(tpot)
            if ttft * 1000 <= slo.ttft_ms and (tpot is None or tpot * 1000 <= slo.tpot_ms):
                ok += 1
        n = len(recs)
        out[name] = {
            "n": n, "attained": ok, "attainment": ok / n if n else 1.0, "rejected": rejected,
            "ttft_p50": _pct(ttfts, 50), "ttft_p90": _pct(ttfts, 90), "ttft_p99": _pct(ttfts, 99),
            "tpot_p50": _pct(tpots, 50), "tpot_p90": _pct(tpots, 90), "tpot_p99": _pct(tpots, 99),
        }
    return out


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


def run_point(policy: str, num_replicas: int, requests: list[SimRequest], cfg: SimConfig, duration_s: float,
              seed: int = 0) -> dict:
    cl = Cluster(policy, num_replicas, requests, cfg, seed)
    cl.run()
    cl.for_unfinished()
    classes = summarize(cl.records, cfg.warmup_frac * duration_s)
    busy = sum(r.busy_time for r in cl.replicas) / max(1e-9, num_replicas * max(cl.now, 1e-9))
    preempt = sum(r.sched.num_preemptions for r in cl.replicas)
    return {"classes": classes, "min_attainment": min((c["attainment"] for c in classes.values()), default=1.0),
            "num_requests": len(requests), "sim_time_s": cl.now, "utilization": busy, "preemptions": preempt}
