"""The router simulator: workload building, one cluster run, and a --quick sweep."""
import json
import os

import pytest

from benchmarks import router_sim
from benchmarks.sim import report
from benchmarks.sim.cluster import Cluster, SimConfig, run_point
from benchmarks.sim.replica import ReplicaConfig
from benchmarks.sim.workload import DEFAULT_TRACES, build_requests, load_trace, merged_trace


def test_workload(traces):
    tr = merged_trace(traces)
    assert len(tr) == 1200 and tr[0].t == 0 and all(a.t <= b.t for a, b in zip(tr, tr[1:]))
    reqs = build_requests(tr, rate=50, duration_s=20, seed=3, cv=2.0, max_model_len=2048, max_tokens=256)
    assert 700 < len(reqs) < 1300
    assert all(r.prompt_len <= 2046 and 1 <= r.output_len <= r.max_tokens <= 256 for r in reqs)
    assert {r.slo.name for r in reqs} == {"interactive", "batch"}
    assert all((r.source == "conv") == (r.slo.name == "interactive") for r in reqs)
    again = build_requests(tr, rate=50, duration_s=20, seed=3, cv=2.0, max_model_len=2048, max_tokens=256)
    assert [(r.arrival, r.prompt_len) for r in again] == [(r.arrival, r.prompt_len) for r in reqs]
    replay = build_requests(tr, rate=25, duration_s=10, seed=3, arrivals="trace")
    assert 150 < len(replay) < 350
    mixed = build_requests(tr, rate=50, duration_s=10, seed=3, interactive_frac=0.2)
    share = sum(r.slo.name == "interactive" for r in mixed) / len(mixed)
    assert 0.1 < share < 0.3


@pytest.mark.skipif(not os.path.exists(DEFAULT_TRACES["code"]), reason="Azure traces not present")
def test_reads_the_azure_traces():
    rows = load_trace(DEFAULT_TRACES["code"], "code")
    assert len(rows) > 1000 and rows[0].prompt > 0


@pytest.mark.parametrize("policy", ["round_robin", "p2c", "least_load", "slo_aware"])
def test_cluster_serves_everything_at_low_load(traces, policy):
    tr = merged_trace(traces)
    reqs = build_requests(tr, rate=6, duration_s=15, seed=1, max_model_len=4096)
    cfg = SimConfig(replica=ReplicaConfig(num_blocks=2048, max_model_len=4096))
    cl = Cluster(policy, 2, reqs, cfg)
    recs = cl.run()
    assert cl.open == 0
    assert all(r.finished is not None and r.n_out == r.req.output_len for r in recs)
    assert all(r.first_token >= r.req.arrival for r in recs)
    for rep in cl.replicas:  # every KV block back in the pool
        assert not rep.sched.has_unfinished()
        assert rep.bm.num_free_blocks == rep.bm.num_total_blocks
        rep.bm.check_invariants()
    res = run_point(policy, 2, reqs, cfg, 15)
    assert res["min_attainment"] >= 0.9


def test_goodput_and_results_md(tmp_path):
    pts = [{"rate": r, "min_attainment": a} for r, a in ((10, 1.0), (20, 0.95), (30, 0.7), (40, 0.92))]
    assert report.goodput(pts) == 20
    assert report.goodput([{"rate": 5, "min_attainment": 0.5}]) == 0.0
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Someone else's section\nkeep me\n")
    report.update_results_md(str(md), "gamma", "## Router simulation\nv1\n")
    report.update_results_md(str(md), "gamma", "## Router simulation\nv2\n")
    text = md.read_text()
    assert "keep me" in text and "v2" in text and "v1" not in text and text.count("router_sim:gamma:begin") == 1


def test_quick_sweep(traces, tmp_path):
    out = str(tmp_path / "quick")
    payload = router_sim.main(["--quick", "--jobs", "1", "--out", out, "--code-trace", traces["code"],
                               "--conv-trace", traces["conv"], "--max-model-len", "4096", "--num-blocks", "4096"])
    saved = json.load(open(out + ".json"))
    assert saved["goodput"] == payload["goodput"]
    curves = payload["curves"]["2"]
    assert set(curves) == {"round_robin", "p2c", "least_load", "slo_aware"}
    for pol, pts in curves.items():
        att = [p["min_attainment"] for p in pts]
        assert all(0.0 <= a <= 1.0 for a in att)
        assert att[0] >= 0.9, pol  # light load: (almost) everything meets its SLO
        assert min(att) < 0.9 and att[-1] <= att[0], pol  # and the heaviest load tried does not
        assert all(b <= a + 0.1 for a, b in zip(att, att[1:])), pol  # monotone up to noise
    g = payload["goodput"]["2"]
    assert g["slo_aware"] >= g["p2c"] > 0
