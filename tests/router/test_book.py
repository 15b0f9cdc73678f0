"""The replica book: a snapshot plus this router's own events since, never counted twice; prefix
memory; the requests' lifecycle; and what the SLO-aware estimates read from it."""
import pytest
from helpers import Clock, hint, stats

from kvray.router.book import ReplicaBook
from kvray.slo import SLOTarget, urgency
from kvray.step_cost import StepCoeffs


def loads(book):
    return {rid: st.load for rid, st in book.replicas.items()}


def test_dispatch_and_completion_are_counted_at_once():
    book = ReplicaBook(clock=Clock())
    book.sync({"a": None, "b": None})
    book.on_dispatch(hint(100, 50, rid="k1"), "a")
    assert loads(book) == {"a": 150, "b": 0}
    book.on_finish("k1")
    assert loads(book) == {"a": 0, "b": 0}
    book.on_finish("k1")  # twice is harmless
    book.on_finish("unknown")
    # a request refused by "a" and then sent to "b": it moves, and ends once, at "b"
    book.on_dispatch(hint(10, 10, rid="k2"), "a")
    book.on_dispatch(hint(10, 10, rid="k2"), "b")
    assert loads(book) == {"a": 0, "b": 20}
    book.on_finish("k2")
    assert loads(book) == {"a": 0, "b": 0}


def test_snapshot_plus_dispatches_since_never_double_counts():
    clock = Clock(1000.0)
    book = ReplicaBook(clock=clock)
    book.on_dispatch(hint(100, 100, rid="old"), "a")  # t=1000
    clock.t = 1001.0
    # the replica's snapshot at t=1000.5 already counts "old" (and 300 tokens from other routers)
    book.update_stats("a", stats(1000.5, outstanding=500))
    assert book.replicas["a"].load == 500
    clock.t = 1002.0
    book.on_dispatch(hint(10, 10, rid="new"), "a")  # after the snapshot: added on top
    assert book.replicas["a"].load == 520
    book.on_finish("old")  # counted in the snapshot: subtracted from it
    assert book.replicas["a"].load == 320
    book.on_finish("new")
    assert book.replicas["a"].load == 300
    # a newer snapshot replaces the estimate; completions before it are not subtracted again
    clock.t = 1003.0
    book.update_stats("a", stats(1002.5, outstanding=250))
    assert book.replicas["a"].load == 250
    book.update_stats("a", stats(1001.0, outstanding=9999))  # stale broadcast: ignored
    assert book.replicas["a"].load == 250


def test_completion_before_a_late_snapshot_is_subtracted():
    clock = Clock(1000.0)
    book = ReplicaBook(clock=clock)
    book.on_dispatch(hint(100, 0, rid="x"), "a")  # t=1000
    clock.t = 1002.0
    book.on_finish("x")  # t=1002
    # a snapshot taken at 1001 (x still running there) arrives after x completed
    clock.t = 1003.0
    book.update_stats("a", stats(1001.0, outstanding=100))
    assert book.replicas["a"].load == 0


def test_sync_drops_gone_replicas_and_keeps_typed_stats():
    book = ReplicaBook()
    book.sync({"a": stats(1.0, num_free_blocks=10, num_total_blocks=40), "b": None})
    book.on_dispatch(hint(rid="k"), "b")
    book.sync({"a": None})
    assert book.replica_ids() == ["a"]
    book.on_finish("k")
    snap = book.snapshot()
    assert snap["a"]["stats"].engine.num_free_blocks == 10 and snap["a"]["stats"].engine.kv_usage == pytest.approx(0.75)


def test_prefix_memory_predicts_hits():
    book = ReplicaBook()
    book.sync({"a": None, "b": None})
    toks = list(range(64))
    book.on_dispatch(hint(tokens=toks, rid="k"), "a")
    same_prefix = toks[:48] + [999] * 16
    h = hint(tokens=same_prefix)
    assert book.replicas["a"].prefix_hit_blocks(h.block_hashes) == 3
    assert book.replicas["b"].prefix_hit_blocks(h.block_hashes) == 0
    # the cost of a dispatch discounts the predicted cached blocks
    book.on_finish("k")
    book.on_dispatch(hint(tokens=same_prefix, decode=0, rid="k2"), "a")
    assert book.replicas["a"].load == 16


def test_counts_between_polls():
    clock = Clock(1.5)
    book = ReplicaBook(clock=clock)
    book.update_stats("r0", stats(1.0, num_running=2, num_waiting=1, queued_prefill_tokens=500, tokens_in_flight=3000,
                                  num_free_blocks=100, num_total_blocks=200, block_size=16))
    v = book.replicas["r0"]
    book.on_dispatch(hint(800, 100, rid="a", arrival_time=1.5, slo=SLOTarget("i", 500, 50, 2.0)), "r0")
    assert v.num_requests == 4 and v.queued_prefill_tokens == 1300 and v.context_tokens == 3800
    assert v.free_blocks == 100 - 800 // 16
    assert v.min_tpot_s() == 0.05
    clock.t = 1.7
    book.on_first_token("a")
    assert v.queued_prefill_tokens == 500 and v.num_decoding == 3
    # A poll taken after the first token already contains it: the deltas before it are folded in.
    book.update_stats("r0", stats(1.8, num_running=3, num_waiting=0, queued_prefill_tokens=0, tokens_in_flight=3900,
                                  num_free_blocks=100, num_total_blocks=200, block_size=16))
    assert v.queued_prefill_tokens == 0 and v.num_requests == 3
    clock.t = 2.5
    book.on_finish("a", 50)
    assert v.num_ongoing == 0 and v.min_tpot_s() is None
    assert v.num_requests == 2 and v.context_tokens == 3900 - 850


def test_prefix_lru_and_who_goes_first_on_a_deadline_replica():
    book = ReplicaBook(clock=Clock(0.0))
    book.update_stats("r0", stats(-1.0, num_total_blocks=4))  # the LRU holds at most the replica's pool
    v = book.replicas["r0"]
    book.on_dispatch(hint(100, 10, rid="x", hashes=[1, 2, 3]), "r0")
    assert v.prefix_hit_blocks([1, 2, 3, 9]) == 3
    book.on_dispatch(hint(100, 10, rid="y", hashes=[7, 8]), "r0")
    assert len(v._prefix) == 4 and v.prefix_hit_blocks([1, 2]) == 0  # oldest hashes evicted
    book = ReplicaBook(clock=Clock(0.0))
    book.update_stats("r1", stats(-1.0, scheduling_policy="deadline"))
    book.on_dispatch(hint(4000, 10, rid="batch", arrival_time=0.0, slo=SLOTarget("b", 10_000, None, 1.0)), "r1")
    book.on_dispatch(hint(1000, 10, rid="inter", arrival_time=0.0, slo=SLOTarget("i", 500, None, 2.0)), "r1")
    v = book.replicas["r1"]
    # A new interactive request (deadline 0.6) waits only for the earlier interactive one...
    assert v.prefill_ahead_of(urgency(0.6, 2.0, 0.1), 0.6, 0.1) == 1000
    # ...a new batch request for both; an FCFS replica serves everything queued first.
    assert v.prefill_ahead_of(urgency(10.5, 1.0, 0.1), 10.5, 0.1) == 5000
    # A batch request due before a new interactive one's deadline passes it as its slack runs out
    # (slack / priority shrinks twice as fast for weight 1 as for weight 2): it counts as ahead.
    book.on_dispatch(hint(3000, 10, rid="due", arrival_time=-9.55, slo=SLOTarget("b", 10_000, None, 1.0)), "r1")
    assert v.prefill_ahead_of(urgency(0.6, 2.0, 0.1), 0.6, 0.1) == 1000 + 3000
    assert urgency(0.45, 1.0, 0.1) > urgency(0.6, 2.0, 0.1)  # although it ranks after it now
    book.update_stats("r1", stats(0.0, scheduling_policy="fcfs", queued_prefill_tokens=8000))
    assert v.prefill_ahead_of(urgency(0.6, 2.0, 0.1), 0.6, 0.1) == 8000


def test_the_replica_reports_other_routers_tpot_targets_and_its_step_fit():
    book = ReplicaBook()
    book.update_stats("r", stats(1.0, min_tpot_s=0.02, step_coeffs=(1e-3, 2e-5, 0.0, 0.0)))
    v = book.replicas["r"]
    assert v.min_tpot_s() == pytest.approx(0.02)  # no request of this router is there: the replica's own report
    assert v.model.coeffs == StepCoeffs(1e-3, 2e-5, 0.0, 0.0) and v.model.fixed  # the published fit, not refitted


def test_a_replica_serve_stops_drains_in_the_book():
    """A replica that leaves Serve's replica set while this router has requests there stays, as
    draining: no route goes there, its requests still count, and it leaves with the last one."""
    from kvray.router.least_load import LeastLoadPolicy
    from kvray.router.policy import route_from

    clock = Clock(1000.0)
    book = ReplicaBook(clock=clock)
    book.sync({"a": stats(max_queued=4, max_num_seqs=4), "b": stats(max_queued=4, max_num_seqs=4),
               "idle": stats(max_queued=4, max_num_seqs=4)})
    book.on_dispatch(hint(10, 10, rid="k1"), "a")
    book.on_dispatch(hint(10, 10, rid="k2"), "a")
    assert book.capacity() == 24
    clock.t = 1001.0
    book.sync({"b": stats(max_queued=4, max_num_seqs=4)})  # Serve stops "a" and "idle"
    assert "idle" not in book.replicas and book.draining() == [("a", 1001.0)]
    assert [s.replica_id for s in book.live()] == ["b"] and book.replica_ids() == ["b"]
    assert route_from(book.replicas["b"], book, lambda s: s.load) == ("b",)
    assert LeastLoadPolicy().decide(hint(500, 500, rid="new"), book, clock()).route == ("b",)
    assert book.capacity() == 8 and book.replicas["a"].num_ongoing == 2
    book.on_finish("k1")
    assert book.draining() == [("a", 1001.0)]
    book.on_finish("k2")
    assert book.draining() == [] and "a" not in book.replicas
    # a draining replica listed again (it was not stopped after all) takes requests again
    book.on_dispatch(hint(10, 10, rid="k3"), "b")
    book.sync({})
    assert book.draining() == [("b", 1001.0)]
    book.sync({"b": None})
    assert book.draining() == [] and book.replica_ids() == ["b"]
