"""The slo_aware policy's decisions on hand-built replica books (no Ray): feasibility, packing,
TPOT protection, holding and refusing what no replica can serve in time, and the baselines."""
import copy
import dataclasses

import pytest
from helpers import Clock, hint, stats

from kvray.router.baselines import PowerOfTwoChoicesPolicy, RoundRobinPolicy
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, QUEUE, REJECT
from kvray.router.slo_aware import SLOAwarePolicy
from kvray.slo import SLOTarget
from kvray.step_cost import DEFAULT_COEFFS

INTERACTIVE = SLOTarget("interactive", ttft_ms=500, tpot_ms=50, priority=2.0)
BATCH = SLOTarget("batch", ttft_ms=10_000, tpot_ms=200, priority=1.0)


def book_of(*replicas):
    """A book holding these replicas, each ``(id, dict of view() options)``, in that order."""
    book = ReplicaBook(clock=Clock(0.0))
    for rid, opts in replicas:
        tpot_s = opts.pop("tpot_s", None)
        book.update_stats(rid, stats(
            -1.0, num_running=opts.get("running", 0), num_waiting=opts.get("waiting", 0),
            queued_prefill_tokens=opts.get("queued", 0), tokens_in_flight=opts.get("tokens", 0),
            num_free_blocks=opts.get("free", 10_000), num_total_blocks=20_000, block_size=16,
            max_num_seqs=opts.get("max_seqs", 256), max_num_batched_tokens=8192, scheduling_policy="deadline",
            step_coeffs=DEFAULT_COEFFS.as_tuple()))
        if tpot_s:  # a running request of ours with this TPOT target
            book.on_dispatch(hint(100, 100, rid=f"{rid}-running", slo=SLOTarget("t", None, tpot_s * 1000)), rid)
            book.on_first_token(f"{rid}-running")
    return book


def view(rid, **opts):
    return rid, opts


def req(slo=INTERACTIVE, prompt=1000, hashes=(), arrival=1.0, rid="q"):
    return hint(prompt, 256, rid=rid, hashes=list(hashes), slo=slo, arrival_time=arrival)


def choose(pol, request, book, now):
    return pol.decide(request, book, now)


def test_prefix_hit_preferred():
    book = book_of(view("b", running=4, tokens=9000), view("a", running=2, tokens=4000))
    hashes = list(range(100, 160))
    book.on_dispatch(hint(1000, 10, rid="old", hashes=hashes), "a")
    book.on_first_token("old")
    book.on_finish("old")
    d = choose(SLOAwarePolicy(), req(prompt=1000, hashes=hashes), book, 1.0)
    assert d.action == DISPATCH and d.route[0] == "a" and d.cached_tokens == 60 * 16
    # Without the prefix, packing would have picked the busier replica.
    assert choose(SLOAwarePolicy(), req(prompt=1000), book, 1.0).route[0] == "b"


def test_packs_onto_busiest_feasible_replica_and_spread_option():
    book = book_of(view("idle"), view("mid", running=10, tokens=20_000), view("busy", running=30, tokens=60_000))
    d = choose(SLOAwarePolicy(mode="pack"), req(), book, 1.0)
    assert (d.action, d.route[0]) == (DISPATCH, "busy")
    d = choose(SLOAwarePolicy(mode="spread"), req(), book, 1.0)
    assert (d.action, d.route[0]) == (DISPATCH, "idle")
    # A replica with a queue is not packed onto while another can start the request at once.
    book = book_of(view("idle"), view("queued", running=30, queued=6000, tokens=90_000))
    assert choose(SLOAwarePolicy(mode="pack"), req(), book, 1.0).route[0] == "idle"


def test_tpot_protection_excludes_a_replica():
    # 700 decodes: one more makes a step last > 50 ms, breaking the running requests' TPOT.
    book = book_of(view("crowded", running=700, tokens=700 * 600, max_seqs=1024, tpot_s=0.05),
                   view("other", running=20, tokens=20_000))
    pol = SLOAwarePolicy(mode="pack")
    e = pol.estimate(req(), book.replicas["crowded"], 1.0)
    assert not e.tpot_ok and e.tpot_s > 0.05
    d = choose(pol, req(), book, 1.0)
    assert (d.action, d.route[0]) == (DISPATCH, "other")
    # A batch request (200 ms TPOT) would still be fine there for itself, but the running
    # interactive requests' 50 ms target is what counts.
    crowded_only = book_of(view("crowded", running=700, tokens=700 * 600, max_seqs=1024, tpot_s=0.05))
    assert choose(pol, req(BATCH), crowded_only, 1.0).action != DISPATCH


def test_infeasible_interactive_is_queued_then_rejected_before_its_deadline():
    book = book_of(*(view(f"r{i}", running=50, queued=40_000, tokens=200_000) for i in range(2)))

    def state():
        return [(v.num_requests, v.queued_prefill_tokens, dict(v.inflight), list(v._events))
                for v in book.replicas.values()]

    before = copy.deepcopy(state())
    pol = SLOAwarePolicy()
    r = req(arrival=1.0)
    deadline = 1.0 + INTERACTIVE.ttft_s
    now = 1.0
    decisions = []
    while True:
        d = choose(pol, r, book, now)
        decisions.append(d)
        if d.action != QUEUE:
            break
        assert now < d.recheck_at < deadline
        now = d.recheck_at
    assert decisions[0].action == QUEUE
    assert d.action == REJECT and now < deadline
    assert 0 < d.retry_after_s <= INTERACTIVE.ttft_s
    assert state() == before  # deciding mutates nothing


def test_admission_control_by_class():
    book = book_of(*(view(f"r{i}", running=40, queued=30_000, tokens=150_000) for i in range(2)))
    pol = SLOAwarePolicy()
    # The interactive request cannot get its first token within 500 ms anywhere...
    assert choose(pol, req(INTERACTIVE), book, 1.0).action == QUEUE
    # ...an interactive class configured to reject gets 429 at once...
    strict = SLOTarget("strict", ttft_ms=500, tpot_ms=50, priority=2.0, on_infeasible="reject")
    d = choose(pol, req(strict), book, 1.0)
    assert d.action == REJECT and 0 < d.retry_after_s <= 0.5
    # ...a best-effort class is sent to the quickest replica anyway...
    be = SLOTarget("be", ttft_ms=500, tpot_ms=50, on_infeasible="best_effort")
    assert choose(pol, req(be), book, 1.0).action == DISPATCH
    # ...while a batch request (10 s TTFT) is admitted at once.
    d = choose(pol, req(BATCH), book, 1.0)
    assert d.action == DISPATCH and d.predicted_ttft_s < 10


def test_waiting_in_the_router_counts_against_the_deadline():
    book = book_of(view("r0", running=10, queued=6000, tokens=30_000))
    pol = SLOAwarePolicy()
    assert choose(pol, req(arrival=1.0), book, 1.0).action == DISPATCH
    assert choose(pol, req(arrival=1.0), book, 1.4).action != DISPATCH  # 400 ms already spent


def test_a_replica_whose_engine_queue_would_refuse_is_not_used():
    """The engine refuses (429) a request that would queue more prompt tokens than its limit: the
    policy sends it elsewhere, or holds it in the router, instead of into that refusal."""
    def with_limit(book, rid, limit):
        st = book.replicas[rid].stats
        book.update_stats(rid, dataclasses.replace(st, time=st.time + 1, max_queued_prompt_tokens=limit))
        return book

    pol = SLOAwarePolicy(mode="pack")
    book = with_limit(book_of(view("full", running=30, queued=30_000, tokens=90_000), view("other", running=1)),
                      "full", 32_768)
    assert choose(pol, req(BATCH, prompt=4000), book, 1.0).route[0] == "other"
    alone = with_limit(book_of(view("full", running=30, queued=30_000, tokens=90_000)), "full", 32_768)
    assert choose(pol, req(BATCH, prompt=4000), alone, 1.0).action == QUEUE  # batch can wait for room
    assert choose(pol, req(BATCH, prompt=2000), alone, 1.0).action == DISPATCH  # this one fits the queue
    unknown = book_of(view("full", running=30, queued=30_000, tokens=90_000))  # limit not reported: not checked
    assert choose(pol, req(BATCH, prompt=4000), unknown, 1.0).action == DISPATCH


def test_no_replicas_or_seq_slots_or_kv():
    pol = SLOAwarePolicy()
    assert choose(pol, req(), ReplicaBook(), 0.0).action == REJECT
    book = book_of(view("a", running=256, max_seqs=256), view("b", free=10))
    assert choose(pol, req(), book, 1.0).action == QUEUE


def test_baselines():
    book = book_of(*(view(f"r{i}") for i in range(3)))
    rr = RoundRobinPolicy()
    assert [choose(rr, req(), book, 0).route[0] for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    book.on_dispatch(hint(10, 10, rid="x"), "r0")
    book.on_dispatch(hint(10, 10, rid="y"), "r1")
    p2c = PowerOfTwoChoicesPolicy(seed=1)
    picks = {choose(p2c, req(), book, 0).route[0] for _ in range(30)}
    assert "r2" in picks  # the idle replica wins whenever it is drawn
    capped = PowerOfTwoChoicesPolicy(max_ongoing_requests=1)
    assert choose(capped, req(), book, 0).route[0] == "r2"
    book.on_dispatch(hint(10, 10, rid="z"), "r2")
    assert choose(capped, req(), book, 0).action == QUEUE


@pytest.mark.parametrize("mode", ["pack", "spread"])
def test_bad_arguments(mode):
    SLOAwarePolicy(mode=mode)
    with pytest.raises(ValueError):
        SLOAwarePolicy(mode="random")
    with pytest.raises(ValueError):
        SLOTarget("x", 100, 10, on_infeasible="drop")


def test_the_ttft_budget_keeps_a_margin_and_a_fixed_slack():
    pol = SLOAwarePolicy()
    assert pol.ttft_budget(req(INTERACTIVE)) == pytest.approx(0.5 - 0.125)  # the slack binds on 500 ms
    assert pol.ttft_budget(req(BATCH)) == pytest.approx(0.85 * 10.0)        # the margin on 10 s
    assert SLOAwarePolicy(ttft_slack_s=0).ttft_budget(req(INTERACTIVE)) == pytest.approx(0.425)
    # 280 ms already waited in the router: a replica predicted to need ~120 ms more is over budget
    book = book_of(view("r0", running=10, queued=1000, tokens=30_000))
    est = pol.estimate(req(arrival=1.0), book.replicas["r0"], 1.28)
    assert 0.375 < 0.28 + est.ttft_s < 0.425
    assert choose(pol, req(arrival=1.0), book, 1.28).action == QUEUE
    assert choose(SLOAwarePolicy(ttft_slack_s=0), req(arrival=1.0), book, 1.28).action == DISPATCH
    with pytest.raises(ValueError, match="ttft_slack_s"):
        SLOAwarePolicy(ttft_slack_s=-1)
