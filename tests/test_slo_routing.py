"""The ``slo_aware`` platform policy (kvray.router.slo_routing): admit/queue/reject, reservations,
rank order and lifecycle bookkeeping, on hand-built replica views (no Ray)."""
import asyncio

import pytest

from kvray.router.hints import RoutingHint
from kvray.router.load_book import ReplicaStats, ReplicaView
from kvray.router.policy import make_policy

TPOT_MS = 50.0


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def stats(running=0, waiting=0, queued=0, tokens=0, max_seqs=4, t=999.0, healthy=True):
    return ReplicaStats.from_dict({
        "time": t, "num_running": running, "num_waiting": waiting, "queued_prefill_tokens": queued,
        "tokens_in_flight": tokens, "num_free_blocks": 10_000, "num_total_blocks": 10_000, "block_size": 16,
        "max_num_seqs": max_seqs, "max_num_batched_tokens": 2048, "scheduling_policy": "deadline",
        "healthy": healthy})


def views(**by_id):
    return [ReplicaView(rid, 0, 0, 0, s, 0.0) for rid, s in by_id.items()]


def hint(rid, cls="interactive", prompt=200, decode=64, arrival=1000.0):
    ttft = 500.0 if cls == "interactive" else 10_000.0
    return RoutingHint(rid, prompt, decode, [], 16, slo_class=cls, ttft_ms=ttft, tpot_ms=TPOT_MS,
                       priority=2.0 if cls == "interactive" else 1.0, arrival_time=arrival)


def policy(clock, **opts):
    return make_policy("slo_aware", clock=clock, **opts)


def test_full_replica_is_avoided_and_reservation_leads_the_rank():
    clock = Clock()
    pol = policy(clock)
    vs = views(a=stats(running=4), b=stats(running=1, tokens=300))
    assert pol.admit(hint("r1"), vs) == (True, None)
    assert pol.rank(hint("r1"), vs) == ["b", "a"]
    assert pol.snapshot()["b"]["requests"] == 2  # the reservation counts before any stats poll


def test_a_burst_of_admissions_sees_its_own_reservations():
    clock = Clock()
    pol = policy(clock)  # pack: the busiest replica that can start the request at once
    vs = views(a=stats(max_seqs=2), b=stats(max_seqs=2))
    placed = []
    for i in range(4):
        assert pol.admit(hint(f"r{i}"), vs) == (True, None)
        placed.append(pol.rank(hint(f"r{i}"), vs)[0])
    assert sorted(placed) == ["a", "a", "b", "b"] and placed[0] == placed[1]  # packed, then the other
    pol2 = policy(clock, on_infeasible="reject")
    for i in range(4):
        pol2.admit(hint(f"s{i}"), vs)
    ok, retry = pol2.admit(hint("s4"), vs)
    assert ok is False and 0.05 <= retry <= 0.5  # both full: 429 with a Retry-After within the TTFT


def test_per_class_on_infeasible_and_best_effort():
    clock = Clock()
    full = views(a=stats(running=4), b=stats(running=4))
    pol = policy(clock, on_infeasible={"interactive": "reject", "batch": "best_effort"})
    assert pol.admit(hint("i", "interactive"), full)[0] is False
    assert pol.admit(hint("b", "batch"), full) == (True, None)  # sent anyway, to the best replica


def test_queued_request_is_admitted_when_capacity_frees():
    clock = Clock()
    pol = policy(clock, recheck_interval_s=0.01)
    vs = views(a=stats(max_seqs=1), b=stats(max_seqs=1))

    async def main():
        assert pol.admit(hint("r0"), vs) == (True, None)
        assert pol.admit(hint("r1"), vs) == (True, None)
        first = pol.rank(hint("r0"), vs)[0]
        verdict = pol.admit(hint("r2", "batch"), lambda: vs)
        assert asyncio.iscoroutine(verdict)
        task = asyncio.ensure_future(verdict)
        await asyncio.sleep(0.05)
        assert not task.done() and pol.num_waiting == 1
        pol.on_finish(hint("r0"), 10, 200, 0.0)  # frees a slot on r0's replica: the waiter wakes
        assert await asyncio.wait_for(task, 1.0) == (True, None)
        assert pol.rank(hint("r2", "batch"), vs)[0] == first
        assert pol.num_waiting == 0

    asyncio.run(main())


def test_queued_request_is_rejected_before_its_deadline():
    clock = Clock()
    pol = policy(clock, recheck_interval_s=0.01)
    vs = views(a=stats(running=4), b=stats(running=4))

    async def main():
        verdict = pol.admit(hint("r", arrival=clock.t), lambda: vs)
        task = asyncio.ensure_future(verdict)
        for _ in range(200):  # the router clock moves on; nothing frees up
            await asyncio.sleep(0.005)
            clock.t += 0.01
            if task.done():
                break
        ok, retry = task.result()
        assert ok is False and retry is not None
        assert clock.t - 1000.0 < 0.5  # answered before the 500 ms TTFT deadline, not held past it

    asyncio.run(main())


def test_lifecycle_keeps_the_state_fresh_and_moves_reservations():
    clock = Clock()
    pol = policy(clock)
    vs = views(a=stats(), b=stats())
    pol.admit(hint("r"), vs)
    first = pol.rank(hint("r"), vs)[0]
    other = "b" if first == "a" else "a"
    pol.on_dispatch(hint("r"), other)  # Serve skipped the first choice (at max_ongoing_requests)
    snap = pol.snapshot()
    assert snap[first]["requests"] == 0 and snap[other]["requests"] == 1
    pol.on_first_token(hint("r"), 0.0)
    assert pol.snapshot()[other]["decoding"] == 1
    pol.on_complete("r")
    pol.on_finish(hint("r"), 5, 200, 0.0)  # both ends report it: counted once
    assert pol.snapshot()[other]["requests"] == 0


def test_unhealthy_replica_gets_nothing_while_another_is_healthy():
    clock = Clock()
    pol = policy(clock)
    vs = views(sick=stats(running=3, healthy=False), ok=stats())
    pol.admit(hint("r"), vs)
    assert pol.rank(hint("r"), vs)[0] == "ok"


def test_step_records_refine_the_prior():
    clock = Clock()
    pol = policy(clock, step_coeffs={"a": 0.001, "b": 0.0, "c": 0.0, "d": 0.0})
    recs = [(float(i), 0.02 + 1e-5 * n, n, 1000, 1) for i, n in enumerate([1, 64, 256, 512, 1024] * 4)]
    s = stats()
    s.raw["step_times"] = recs
    pol.admit(hint("r"), views(a=s))
    a, b, _, _ = pol.snapshot()["a"]["step_coeffs"]
    assert a == pytest.approx(0.02, rel=0.2) and b == pytest.approx(1e-5, rel=0.3)


@pytest.mark.parametrize("opts, msg", [
    ({"mode": "nearest"}, "mode"),
    ({"on_infeasible": "drop"}, "on_infeasible"),
    ({"on_infeasible": {"interactive": "wait"}}, "on_infeasible"),
    ({"step_coeffs": {"a": 1}}, "step_coeffs"),
    ({"step_coeffs": {"a": -1, "b": 0, "c": 0, "d": 0}}, "step_coeffs"),
    ({"ttft_margn": 0.9}, "ttft_margn"),
])
def test_bad_options_name_the_problem(opts, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy("slo_aware", **opts)
