"""The event loop for one point: a router policy, N replicas, one arrival rate."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from benchmarks.sim.replica import ReplicaConfig, SimReplica
from benchmarks.sim.workload import SimRequest, prompt_token_ids
from kvray.records import RoutingHint
from kvray.replica.deadline_policy import DeadlinePolicy
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.scheduling_policy import FCFSPolicy
from kvray.replica.sequence import Sequence
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, QUEUE, make_policy
from kvray.slo import urgency
from kvray.step_cost import DEFAULT_COEFFS, StepCoeffs, StepTimeModel

# name -> (routing policy of the kvray.router registry, its options, replica scheduler)
POLICIES = {
    "round_robin": ("round_robin", {}, "fcfs"),
    "p2c": ("p2c", {}, "fcfs"),
    "least_load": ("least_load", {}, "fcfs"),
    "slo_aware": ("slo_aware", {"mode": "pack"}, "deadline"),
    # ablations
    "slo_aware-spread": ("slo_aware", {"mode": "spread"}, "deadline"),
    "slo_aware+fcfs": ("slo_aware", {"mode": "pack"}, "fcfs"),
    "p2c+deadline": ("p2c", {}, "deadline"),
    "least_load+deadline": ("least_load", {}, "deadline"),
}
DEFAULT_POLICIES = ["round_robin", "p2c", "least_load", "slo_aware"]

ARRIVE, STEP_END, POLL, DELIVER, RECHECK = range(5)
MAX_ATTEMPTS = 3  # the Router's dispatches of one request (kvray.frontend.serving.MAX_ATTEMPTS)


@dataclass
class SimConfig:
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    true_coeffs: StepCoeffs = DEFAULT_COEFFS
    true_model: object | None = None   # anything with predict(batched, context, seqs); None: true_coeffs
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
    refusals: int = 0   # engines that refused it (queue full) before it found a place, or its 429


def make_router(policy: str, cfg: SimConfig, seed: int):
    """The routing policy, built through the registry as the Router builds it."""
    name, options, _ = POLICIES[policy]
    if name in ("p2c", "least_load"):
        options = {**options, "seed": seed}
    if name == "p2c":
        options["max_ongoing_requests"] = cfg.p2c_max_ongoing
    return make_policy(name, **options)


class Cluster:
    def __init__(self, policy: str, num_replicas: int, requests: list[SimRequest], cfg: SimConfig, seed: int = 0):
        router_name, _, sched_name = POLICIES[policy]
        self.cfg = cfg
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        true_model = cfg.true_model or StepTimeModel.fixed_coeffs(cfg.true_coeffs)
        self.replicas = [
            SimReplica(f"r{i}", cfg.replica, DeadlinePolicy() if sched_name == "deadline" else FCFSPolicy(),
                       true_model, clock, cfg.noise, seed=seed * 1000 + i, prior=cfg.true_coeffs)
            for i in range(num_replicas)]
        # The router's book, on the simulator's clock: the same events as in the Router.
        self.book = ReplicaBook(clock=clock)
        self.book.sync({r.rid: None for r in self.replicas})
        self.router = make_router(policy, cfg, seed)
        self.uses_stats = router_name not in ("round_robin", "p2c")
        self.requests = requests
        self.records = [Record(r) for r in requests]
        self.hints: dict[int, RoutingHint] = {}
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
                    self._route(a)
        self.now = min(self.now, self.end)
        return self.records

    def _arrive(self, i: int) -> None:
        req = self.requests[i]
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True, slo=req.slo)
        seq = Sequence(str(req.rid), prompt_token_ids(req), params, self.cfg.replica.block_size, req.arrival)
        self.seqs[i] = seq
        hashes = seq.block_hashes() if self.cfg.replica.enable_prefix_caching else ()
        self.hints[i] = RoutingHint(seq.request_id, req.prompt_len, min(req.max_tokens, self.cfg.decode_estimate_cap),
                                    list(hashes), self.cfg.replica.block_size, req.slo, req.arrival)
        self._route(i)

    def _route(self, i: int) -> bool:
        """Decide request i, as ``kvray.router.dispatch.Dispatcher`` does: on arrival, and for a
        held request whenever a first token or a completion frees capacity, and at its recheck time."""
        hint = self.hints[i]
        d = self.router.decide(hint, self.book, self.now)
        while d.action == DISPATCH:
            self.queued.pop(i, None)
            ri = int(d.route[0][1:])
            if not self.replicas[ri].queue_full(hint.num_prompt_tokens):
                self._dispatch(i, ri, d.cached_tokens)
                return True
            # The engine's queue is full: the Router leaves that replica out and decides again,
            # up to MAX_ATTEMPTS dispatches; a refusal everywhere, or anything but a dispatch
            # after one, is a 429 (kvray.frontend.serving's _dispatch).
            rec = self.records[i]
            rec.refusals += 1
            hint.avoid += (self.replicas[ri].rid,)
            if rec.refusals >= MAX_ATTEMPTS or len(set(hint.avoid)) >= len(self.replicas):
                return self._reject(i)
            d = self.router.decide(hint, self.book, self.now)
            if d.action != DISPATCH:
                return self._reject(i)
        if d.action == QUEUE:
            token = self.queued.get(i, 0) + 1
            self.queued[i] = token
            self._push(max(d.recheck_at, self.now + 1e-6), RECHECK, i, token)
            return False
        return self._reject(i)

    def _reject(self, i: int) -> bool:
        """A 429: counted as a miss."""
        self.queued.pop(i, None)
        self.records[i].rejected = True
        self.open -= 1
        self.seqs.pop(i, None)
        return False

    def _dispatch(self, i: int, ri: int, cached_tokens: int) -> None:
        seq, rec, rep = self.seqs[i], self.records[i], self.replicas[ri]
        rec.replica, rec.dispatched = ri, self.now
        self.book.on_dispatch(self.hints[i], rep.rid, cached_tokens)
        rep.add(seq, rec.req.output_len)
        self._kick(ri)

    def _kick(self, ri: int) -> None:
        dur = self.replicas[ri].start_step(self.now)
        if dur is not None:
            self._push(self.now + dur, STEP_END, ri)

    def _step_end(self, ri: int) -> None:
        rep, book = self.replicas[ri], self.book
        firsts, done = rep.finish_step(self.now)
        now = self.now
        for seq in firsts:
            i = int(seq.request_id)
            self.records[i].first_token = now
            book.on_first_token(seq.request_id)
        for seq in done:
            i = int(seq.request_id)
            rec = self.records[i]
            rec.finished, rec.n_out = now, seq.num_output_tokens
            book.on_finish(seq.request_id, seq.num_output_tokens)
            self.seqs.pop(i, None)
            self.open -= 1
        self._kick(ri)
        if self.queued and (firsts or done):
            self._recheck()

    def _recheck(self) -> None:
        def key(i):
            h = self.hints[i]
            return urgency(h.slo.deadline(h.arrival_time), h.slo.priority, self.now)

        order = sorted(self.queued, key=key)
        for i in order[:self.cfg.recheck_per_event]:
            self._route(i)

    def _poll(self) -> None:
        now = self.now
        snaps = [r.stats(now, self.cfg.decode_estimate_cap) for r in self.replicas]
        if self.cfg.poll_delay_s > 0:
            self._push(now + self.cfg.poll_delay_s, DELIVER, snaps, now)
        else:
            self._deliver(snaps, now)
        self._push(now + self.cfg.poll_interval_s, POLL)

    def _deliver(self, snaps: list, _taken_at: float) -> None:
        for r, s in zip(self.replicas, snaps):
            self.book.update_stats(r.rid, s)

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
        ok = rejected = unserved = 0
        for rec in recs:
            if rec.rejected:
                rejected += 1
                continue
            if rec.first_token is None:
                unserved += 1
                continue
            ttft = rec.first_token - rec.req.arrival
            ttfts.append(ttft)
            tpot = None
            if rec.finished is not None and rec.n_out > 1:
                tpot = (rec.finished - rec.first_token) / (rec.n_out - 1)
                tpots.append(tpot)
            ok += slo.attained(ttft, tpot)
        n = len(recs)
        out[name] = {
            "n": n, "attained": ok, "attainment": ok / n if n else 1.0, "rejected": rejected, "unserved": unserved,
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
