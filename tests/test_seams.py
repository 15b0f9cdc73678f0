"""What crosses the engine -> replica -> router seam: the engine produces each field the router
reads (the tightest TPOT target, its step-cost fit), and the routing broadcast stays the same
size however many requests are in flight (no per-request list rides in it)."""
import dataclasses
import pickle
import time

import pytest

from kvray.records import EngineStats, ReplicaStats, RoutingHint
from kvray.replica.config import EngineConfig
from kvray.replica.engine import LLMEngine
from kvray.replica.sampling_params import SamplingParams
from kvray.router.book import ReplicaBook
from kvray.router.slo_aware import SLOAwarePolicy
from kvray.slo import NO_SLO, SLOTarget


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="kvray:tiny-qwen3", device="cpu", max_num_seqs=64, max_model_len=256,
                                  num_kv_blocks=1024))


def add(engine, n: int, tpot_ms: float | None, start: int = 0) -> None:
    for i in range(start, start + n):
        engine.add_sequence(engine.make_sequence(f"q{i}", [5 + i % 50] * 12, SamplingParams(
            max_tokens=40, ignore_eos=True, slo=SLOTarget("t", 60_000, tpot_ms) if tpot_ms else NO_SLO)))


def replica_stats(engine) -> ReplicaStats:
    return ReplicaStats(engine=engine.stats(), time=time.time(), replica_id="r0")


def test_the_router_reads_the_tpot_target_and_step_fit_the_engine_produces(engine):
    add(engine, 2, 80.0)
    add(engine, 1, 30.0, start=2)
    add(engine, 1, None, start=3)
    for _ in range(12):
        engine.step()
    s = engine.stats()
    assert s.min_tpot_s == 0.030
    assert s.num_steps >= 12 and s.step_coeffs == engine.step_cost.coeffs.as_tuple()

    book = ReplicaBook()
    book.update_stats("r0", replica_stats(engine))
    v = book.replicas["r0"]
    assert v.min_tpot_s() == pytest.approx(0.030)  # another router's request: only the engine knows it
    assert v.model.coeffs.as_tuple() == s.step_coeffs  # the engine's fit, not a router-side refit
    # and the SLO-aware policy protects that target: a request without one is still held to it
    new = RoutingHint("new", 100, 16, arrival_time=time.time())
    est = SLOAwarePolicy().estimate(new, v, time.time())
    assert est.tpot_ok == (est.tpot_s <= 0.030)
    slow = dataclasses.replace(s, step_coeffs=(0.05, 0.0, 0.0, 0.0))  # 50 ms steps: the 30 ms target breaks
    book.update_stats("r0", ReplicaStats(engine=slow, time=time.time() + 1, replica_id="r0"))
    assert not SLOAwarePolicy().estimate(new, v, time.time()).tpot_ok
    untargeted = dataclasses.replace(slow, min_tpot_s=None)
    book.update_stats("r0", ReplicaStats(engine=untargeted, time=time.time() + 2, replica_id="r0"))
    assert SLOAwarePolicy().estimate(new, v, time.time()).tpot_ok
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
    assert engine.stats().min_tpot_s is None


def test_the_routing_broadcast_has_no_per_request_list(engine):
    for f in dataclasses.fields(EngineStats) + dataclasses.fields(ReplicaStats):
        assert not any(t in str(f.type) for t in ("list", "dict", "set", "Sequence")), f
    empty = len(pickle.dumps(replica_stats(engine)))
    add(engine, 60, 50.0, start=100)
    engine.step()
    busy = replica_stats(engine)
    assert busy.engine.num_running + busy.engine.num_waiting == 60
    assert len(pickle.dumps(busy)) <= empty + 64  # a few wider integers, not 60 entries
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
