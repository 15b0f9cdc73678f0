"""SLOAwarePolicy.choose on hand-built replica states, admission control and baselines."""
import copy

import pytest

from kvray.router.baselines import PowerOfTwoChoicesPolicy, RoundRobinPolicy
from kvray.router.latency_model import DEFAULT_COEFFS, SLOReplicaState, StepTimeModel
from kvray.router.slo_policy import DISPATCH, QUEUE, REJECT, RouteRequest, SLOAwarePolicy, SLOClass

INTERACTIVE = SLOClass("interactive", ttft_ms=500, tpot_ms=50, priority=2.0)
BATCH = SLOClass("batch", ttft_ms=10_000, tpot_ms=200, priority=1.0)


def view(rid, running=0, waiting=0, queued=0, tokens=0, free=10_000, max_seqs=256, tpot_s=None):
    v = SLOReplicaState(rid, model=StepTimeModel.fixed_coeffs(DEFAULT_COEFFS))
    v.update_stats({"num_running": running, "num_waiting": waiting, "queued_prefill_tokens": queued,
                    "tokens_in_flight": tokens, "num_free_blocks": free, "num_total_blocks": 20_000,
                    "block_size": 16, "max_num_seqs": max_seqs, "max_num_batched_tokens": 8192}, taken_at=0.0)
    if tpot_s:  # a running request of ours with this TPOT target
        v.on_dispatch(f"{rid}-running", 100, 100, (), 0.0, tpot_s=tpot_s)
        v.on_first_token(f"{rid}-running", 0.0)
    return v


def req(slo=INTERACTIVE, prompt=1000, hashes=(), arrival=1.0, rid="q"):
    return RouteRequest(rid, prompt, 256, slo, arrival, list(hashes))


def test_prefix_hit_preferred():
    a, b = view("a", running=2, tokens=4000), view("b", running=4, tokens=9000)
    hashes = list(range(100, 160))
    a.on_dispatch("old", 1000, 10, hashes, 0.0)
    a.on_first_token("old", 0.0)
    a.on_complete("old", 0.0)
    d = SLOAwarePolicy().choose(req(prompt=1000, hashes=hashes), [b, a], 1.0)
    assert d.action == DISPATCH and d.replica_id == "a" and d.cached_tokens == 60 * 16
    # Without the prefix, packing would have picked the busier replica.
    assert SLOAwarePolicy().choose(req(prompt=1000), [b, a], 1.0).replica_id == "b"


def test_packs_onto_busiest_feasible_replica_and_spread_option():
    idle, mid, busy = view("idle"), view("mid", running=10, tokens=20_000), view("busy", running=30, tokens=60_000)
    d = SLOAwarePolicy(mode="pack").choose(req(), [idle, mid, busy], 1.0)
    assert (d.action, d.replica_id) == (DISPATCH, "busy")
    d = SLOAwarePolicy(mode="spread").choose(req(), [busy, mid, idle], 1.0)
    assert (d.action, d.replica_id) == (DISPATCH, "idle")
    # A replica with a queue is not packed onto while another can start the request at once.
    queued = view("queued", running=30, queued=6000, tokens=90_000)
    d = SLOAwarePolicy(mode="pack").choose(req(), [idle, queued], 1.0)
    assert d.replica_id == "idle"


def test_tpot_protection_excludes_a_replica():
    # 700 decodes: one more makes a step last > 50 ms, breaking the running requests' TPOT.
    crowded = view("crowded", running=700, tokens=700 * 600, max_seqs=1024, tpot_s=0.05)
    other = view("other", running=20, tokens=20_000)
    pol = SLOAwarePolicy(mode="pack")
    e = pol.estimate(req(), crowded, 1.0)
    assert not e.tpot_ok and e.tpot_s > 0.05
    d = pol.choose(req(), [crowded, other], 1.0)
    assert (d.action, d.replica_id) == (DISPATCH, "other")
    # A batch request (200 ms TPOT) would still be fine there for itself, but the running
    # interactive requests' 50 ms target is what counts.
    d = pol.choose(req(BATCH), [crowded], 1.0)
    assert d.action != DISPATCH


def test_infeasible_interactive_is_queued_then_rejected_before_its_deadline():
    full = [view(f"r{i}", running=50, queued=40_000, tokens=200_000) for i in range(2)]
    def state():
        return [(v.num_requests, v.queued_prefill_tokens, dict(v.inflight), list(v._events)) for v in full]

    before = copy.deepcopy(state())
    pol = SLOAwarePolicy()
    r = req(arrival=1.0)
    now = 1.0
    decisions = []
    while True:
        d = pol.choose(r, full, now)
        decisions.append(d)
        if d.action != QUEUE:
            break
        assert now < d.recheck_at < r.deadline
        now = d.recheck_at
    assert decisions[0].action == QUEUE
    assert d.action == REJECT and now < r.deadline
    assert 0 < d.retry_after_s <= INTERACTIVE.ttft_s
    assert state() == before  # choose() mutates nothing


def test_admission_control_by_class():
    busy = [view(f"r{i}", running=40, queued=30_000, tokens=150_000) for i in range(2)]
    pol = SLOAwarePolicy()
    # The interactive request cannot get its first token within 500 ms anywhere...
    assert pol.choose(req(INTERACTIVE), busy, 1.0).action == QUEUE
    # ...an interactive class configured to reject gets 429 at once...
    reject_cls = SLOClass("strict", ttft_ms=500, tpot_ms=50, priority=2.0, on_infeasible="reject")
    d = pol.choose(req(reject_cls), busy, 1.0)
    assert d.action == REJECT and 0 < d.retry_after_s <= 0.5
    # ...a best-effort class is sent to the quickest replica anyway...
    be = SLOClass("be", ttft_ms=500, tpot_ms=50, on_infeasible="best_effort")
    assert pol.choose(req(be), busy, 1.0).action == DISPATCH
    # ...while a batch request (10 s TTFT) is admitted at once.
    d = pol.choose(req(BATCH), busy, 1.0)
    assert d.action == DISPATCH and d.predicted_ttft_s < 10


def test_waiting_in_the_router_counts_against_the_deadline():
    v = view("r0", running=10, queued=6000, tokens=30_000)
    pol = SLOAwarePolicy()
    assert pol.choose(req(arrival=1.0), [v], 1.0).action == DISPATCH
    assert pol.choose(req(arrival=1.0), [v], 1.4).action != DISPATCH  # 400 ms already spent


def test_no_replicas_or_seq_slots_or_kv():
    pol = SLOAwarePolicy()
    assert pol.choose(req(), [], 0.0).action == REJECT
    full_slots = view("a", running=256, max_seqs=256)
    no_kv = view("b", free=10)
    d = pol.choose(req(), [full_slots, no_kv], 1.0)
    assert d.action == QUEUE


def test_baselines():
    vs = [view(f"r{i}") for i in range(3)]
    rr = RoundRobinPolicy()
    assert [rr.choose(req(), vs, 0).replica_id for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    vs[0].on_dispatch("x", 10, 10, (), 0.0)
    vs[1].on_dispatch("y", 10, 10, (), 0.0)
    p2c = PowerOfTwoChoicesPolicy(seed=1)
    picks = {p2c.choose(req(), vs, 0).replica_id for _ in range(30)}
    assert "r2" in picks  # the idle replica wins whenever it is drawn
    capped = PowerOfTwoChoicesPolicy(max_ongoing_requests=1)
    assert capped.choose(req(), vs, 0).replica_id == "r2"
    vs[2].on_dispatch("z", 10, 10, (), 0.0)
    assert capped.choose(req(), vs, 0).action == QUEUE


@pytest.mark.parametrize("mode", ["pack", "spread"])
def test_bad_arguments(mode):
    SLOAwarePolicy(mode=mode)
    with pytest.raises(ValueError):
        SLOAwarePolicy(mode="random")
    with pytest.raises(ValueError):
        SLOClass("x", 100, 10, on_infeasible="drop")
