"""The dispatcher with the slo_aware policy: admit / hold / refuse, reservations, waking held
requests, and each request's life (``RequestLife``) entering the book once (no Ray)."""
import asyncio

import pytest
from helpers import Clock, stats

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH, REJECT, make_policy
from kvray.slo import SLOTarget

TPOT_MS = 50.0


def replica(running=0, waiting=0, queued=0, tokens=0, max_seqs=4, t=999.0, healthy=True, **engine):
    return stats(t, healthy=healthy, num_running=running, num_waiting=waiting, queued_prefill_tokens=queued,
                 tokens_in_flight=tokens, num_free_blocks=10_000, num_total_blocks=10_000, block_size=16,
                 max_num_seqs=max_seqs, max_num_batched_tokens=2048, scheduling_policy="deadline", **engine)


def hint(rid, cls="interactive", prompt=200, decode=64, arrival=1000.0, on_infeasible="queue"):
    ttft = 500.0 if cls == "interactive" else 10_000.0
    slo = SLOTarget(cls, ttft, TPOT_MS, 2.0 if cls == "interactive" else 1.0, on_infeasible)
    return RoutingHint(rid, prompt, decode, [], 16, slo=slo, arrival_time=arrival)


def dispatcher(clock, replicas: dict, **opts) -> Dispatcher:
    book = ReplicaBook(clock=clock)
    book.sync(replicas)
    return Dispatcher(book, make_policy("slo_aware", **opts), clock=clock)


def admit(d: Dispatcher, h: RoutingHint):
    return asyncio.run(d.life(h).admit())


def requests(d: Dispatcher, rid: str) -> int:
    return d.book.snapshot()[rid]["estimated_requests"]


def test_full_replica_is_avoided_and_the_reservation_leads_the_route():
    d = dispatcher(Clock(), {"a": replica(running=4), "b": replica(running=1, tokens=300)})
    h = hint("r1")
    assert admit(d, h).action == DISPATCH
    assert h.route == ("b", "a")
    assert requests(d, "b") == 2  # the reservation counts before any stats poll


def test_a_burst_of_admissions_sees_its_own_reservations():
    clock = Clock()
    d = dispatcher(clock, {"a": replica(max_seqs=2), "b": replica(max_seqs=2)})  # pack
    placed = []
    for i in range(4):
        h = hint(f"r{i}")
        assert admit(d, h).action == DISPATCH
        placed.append(h.route[0])
    assert sorted(placed) == ["a", "a", "b", "b"] and placed[0] == placed[1]  # packed, then the other
    d2 = dispatcher(clock, {"a": replica(max_seqs=2), "b": replica(max_seqs=2)})
    for i in range(4):
        admit(d2, hint(f"s{i}", on_infeasible="reject"))
    verdict = admit(d2, hint("s4", on_infeasible="reject"))
    assert verdict.action == REJECT and 0.05 <= verdict.retry_after_s <= 0.5  # both full: 429 within the TTFT


def test_per_class_on_infeasible_and_best_effort():
    d = dispatcher(Clock(), {"a": replica(running=4), "b": replica(running=4)})
    assert admit(d, hint("i", "interactive", on_infeasible="reject")).action == REJECT
    assert admit(d, hint("b", "batch", on_infeasible="best_effort")).action == DISPATCH  # the best replica anyway


def test_queued_request_is_admitted_when_capacity_frees():
    clock = Clock()
    d = dispatcher(clock, {"a": replica(max_seqs=1), "b": replica(max_seqs=1)}, recheck_interval_s=0.01)

    async def main():
        h0, h1, h2 = hint("r0"), hint("r1"), hint("r2", "batch")
        life0 = d.life(h0)
        assert (await life0.admit()).action == DISPATCH
        assert (await d.life(h1).admit()).action == DISPATCH
        task = asyncio.ensure_future(d.life(h2).admit())
        await asyncio.sleep(0.05)
        assert not task.done() and d.num_waiting == 1
        life0.finish(10)  # frees a slot on r0's replica: the waiter wakes
        assert (await asyncio.wait_for(task, 1.0)).action == DISPATCH
        assert h2.route[0] == h0.route[0]
        assert d.num_waiting == 0

    asyncio.run(main())


def test_queued_request_is_rejected_before_its_deadline():
    clock = Clock()
    d = dispatcher(clock, {"a": replica(running=4), "b": replica(running=4)}, recheck_interval_s=0.01)

    async def main():
        task = asyncio.ensure_future(d.life(hint("r", arrival=clock.t)).admit())
        for _ in range(200):  # the router clock moves on; nothing frees up
            await asyncio.sleep(0.005)
            clock.t += 0.01
            if task.done():
                break
        verdict = task.result()
        assert verdict.action == REJECT and verdict.retry_after_s is not None
        assert clock.t - 1000.0 < 0.5  # answered before the 500 ms TTFT deadline, not held past it

    asyncio.run(main())


def test_a_life_keeps_the_book_fresh_and_moves_with_the_request():
    d = dispatcher(Clock(), {"a": replica(), "b": replica(), "c": replica()})
    h = hint("r")
    life = d.life(h)
    asyncio.run(life.admit())
    first = h.route[0]
    other = next(r for r in "abc" if r != first)
    life.bound(other)  # the replica that took it: Serve skipped the first choice (at max_ongoing_requests)
    assert requests(d, first) == 0 and requests(d, other) == 1 and life.replica == other
    life.first_token()
    life.first_token()  # once
    assert d.book.replicas[other].num_decoding == 1
    life.finish(5)
    life.finish(5)  # counted once, however many paths end it
    assert requests(d, other) == 0 and d.book.replicas[other].num_decoding == 0
    life.bound(first)  # a late word from a replica: the request has ended, nothing moves
    assert requests(d, first) == 0
    # a retry: the replica that refused it is avoided, the request moves to the new decision
    h2 = hint("r2")
    life2 = d.life(h2)
    asyncio.run(life2.admit())
    failed = life2.replica
    assert life2.retry(failed, full=False) and failed in h2.avoid and life2.replica != failed
    assert requests(d, failed) == 0 and requests(d, life2.replica) == 1
    # the other choices of the request follow it, and do not move it
    follower = d.life(hint("r2-1"))
    assert follower.follow(life2.replica).action == DISPATCH and follower.replica == life2.replica
    assert life2.retry(life2.replica, full=True)  # full there: the third replica is left
    assert not life2.retry(life2.replica, full=True)  # every replica full: the client retries later


def test_unhealthy_replica_gets_nothing_while_another_is_healthy():
    d = dispatcher(Clock(), {"sick": replica(running=3, healthy=False), "ok": replica()})
    h = hint("r")
    admit(d, h)
    assert h.route[0] == "ok"


def test_predictions_use_the_step_fit_the_replica_publishes():
    d = dispatcher(Clock(), {"a": replica(step_coeffs=(0.02, 1e-5, 0.0, 0.0))})
    admit(d, hint("r"))
    a, b, _, _ = d.book.snapshot()["a"]["step_coeffs"]
    assert a == pytest.approx(0.02) and b == pytest.approx(1e-5)


@pytest.mark.parametrize("opts, msg", [
    ({"mode": "nearest"}, "mode"),
    ({"on_infeasible": "drop"}, "on_infeasible"),
    ({"step_coeffs": {"a": 1}}, "step_coeffs"),
    ({"ttft_margn": 0.9}, "ttft_margn"),
    ({"ttft_margin": -1}, "ttft_margin"),
])
def test_bad_options_name_the_problem(opts, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy("slo_aware", **opts)


@pytest.mark.parametrize("policy", ["slo_aware", "least_load"])
def test_without_a_replica_book_the_deployments_own_router_picks(policy):
    """LLMReplica under another request router (Serve's default P2C) never fills the book: the
    Router lets requests through with no route instead of refusing them all."""
    d = Dispatcher(ReplicaBook(clock=Clock()), make_policy(policy), clock=Clock())
    h = hint("r1")
    dec = admit(d, h)
    assert dec.action == DISPATCH and dec.route == () and h.route == ()
    assert d.counts["dispatched"] == 1 and d.book.snapshot() == {}
    d.book.sync({"a": replica()})  # once the book knows replicas, the policy decides again
    h2 = hint("r2")
    assert admit(d, h2).action == DISPATCH and h2.route == ("a",)
