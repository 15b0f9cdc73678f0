"""benchmarks/online.py: the trace workload, goodput and min/median, the markdown, and one tiny
engine-direct run on CPU (the GPU runs are in RESULTS.md); offline_throughput.py's --repeat figures."""
import copy
import json
import random
import statistics

import pytest

from benchmarks import online


TRACE_ROWS = [(100, 10), (5000, 2000), (300, 700), (7, 1)]


def _write_trace(path) -> str:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{10 + i:02d}.1234567,{p},{o}" for i, (p, o) in enumerate(TRACE_ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def trace(tmp_path) -> str:
    return _write_trace(tmp_path / "trace.csv")


def _build(rng, lengths, **kw):
    shape = dict(vocab=50, max_model_len=2048, max_prompt=4096, max_output=1024)
    return online.build_requests(rng, lengths, **{**shape, **kw})


def test_lengths_come_from_the_trace_and_respect_the_clips(trace):
    lengths = online.trace_lengths(trace)
    assert lengths == TRACE_ROWS
    reqs = _build(random.Random(1), lengths, n=400)
    got = {(len(r.prompt), r.output_len) for r in reqs}
    # (5000, 2000): the prompt to max_model_len - 1, the output to what is left of max_model_len
    assert got == {(100, 10), (2047, 1), (300, 700), (7, 1)}
    assert all(r.arrival_s == 0.0 and 0 <= min(r.prompt) and max(r.prompt) < 50 for r in reqs)
    assert {r.slo_class for r in reqs} == {"interactive"}
    clipped = _build(random.Random(1), lengths, n=400, max_prompt=256, max_output=64, max_model_len=300)
    got = {(len(r.prompt), r.output_len) for r in clipped}
    assert got == {(100, 10), (256, 44), (7, 1)}
    assert all(len(r.prompt) + r.output_len <= 300 for r in clipped)


def test_poisson_and_bursty_arrivals_have_the_rate_asked_for():
    for shape in (1.0, 0.25):
        reqs = _build(random.Random(3), None, fixed=(4, 2), rate=50.0, duration=200.0, burstiness=shape)
        times = [r.arrival_s for r in reqs]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert times[0] == 0.0 and times == sorted(times) and times[-1] < 200.0
        assert abs(len(reqs) / 10000 - 1) < 0.06
        assert abs(statistics.mean(gaps) / 0.02 - 1) < 0.06
        cv = statistics.pstdev(gaps) / statistics.mean(gaps)
        assert abs(cv - shape ** -0.5) < 0.15  # 1 for Poisson, 2 for gamma shape 0.25


def test_the_same_seed_gives_the_same_workload_and_passes_differ(trace):
    lengths = online.trace_lengths(trace)

    def passes(seed):
        rng = random.Random(seed)
        return [[(r.arrival_s, r.prompt, r.output_len) for r in _build(rng, lengths, rate=20.0, duration=5.0)]
                for _ in range(2)]

    first, second = passes(1)
    assert passes(1) == [first, second]
    assert first != second and passes(2)[0] != first


def test_fixed_lengths_replace_the_trace():
    reqs = _build(random.Random(1), None, fixed=(512, 128), n=5)
    assert [(len(r.prompt), r.output_len) for r in reqs] == [(512, 128)] * 5
    reqs = _build(random.Random(1), None, fixed=(512, 128), n=5, max_model_len=600)
    assert {(len(r.prompt), r.output_len) for r in reqs} == {(512, 88)}


def _run(rate, p, att, tok_s=100.0, ttft=10.0):
    figs = {k: None for k in online.FIGURES}
    figs.update(requests=10, errors=0, tok_s=tok_s, ttft_p50=ttft, tpot_p50=2.0, attainment=att)
    return {"rate": rate, "pass": p, "figures": figs}


def test_goodput_takes_the_highest_rate_whose_median_attainment_reaches_90_percent():
    runs = [_run(10, 0, 1.0), _run(10, 1, 0.95), _run(10, 2, 0.5),   # median 0.95
            _run(20, 0, 0.95), _run(20, 1, 0.85), _run(20, 2, 0.8),  # median 0.85
            _run(40, 0, 0.92), _run(40, 1, 0.90),                    # median 0.91
            _run(80, 0, 0.2), _run(None, 0, None)]
    assert online.goodput(runs) == 40
    assert online.goodput([r for r in runs if r["rate"] in (20, 80)]) is None
    assert online.goodput(runs, threshold=0.93) == 10


def test_min_and_median_over_passes_skip_missing_values():
    runs = [_run(10, 0, 0.9, tok_s=300.0, ttft=30.0), _run(10, 1, 0.7, tok_s=100.0, ttft=10.0),
            _run(10, 2, 1.0, tok_s=200.0, ttft=50.0), _run(None, 0, None, tok_s=1000.0, ttft=None)]
    agg = online.per_load(runs)
    assert list(agg) == ["10", "all"]
    assert agg["10"]["passes"] == 3
    assert agg["10"]["tok_s"] == {"min": 100.0, "median": 200.0}
    assert agg["10"]["ttft_p50"] == {"min": 10.0, "median": 30.0}
    assert agg["10"]["attainment"] == {"min": 0.7, "median": 0.9}
    assert agg["all"]["ttft_p50"] == {"min": None, "median": None}
    assert agg["all"]["tok_s"] == {"min": 1000.0, "median": 1000.0}


def test_each_http_pass_is_compared_with_the_engine_pass_of_its_load():
    engine = [_run(10, 0, 1.0, 200.0, 10.0), _run(10, 1, 0.9, 100.0, 20.0), _run(None, 0, None, 1000.0, None)]
    http = [_run(10, 0, 0.9, 180.0, 15.0), _run(10, 1, 0.9, 110.0, 21.0), _run(None, 0, None, 900.0, None)]
    cmp = online.compare(engine, http)
    first = cmp["passes"][0]
    assert first["tok_s_ratio"] == pytest.approx(0.9) and first["ttft_p50_diff_ms"] == pytest.approx(5.0)
    assert first["attainment_diff_pts"] == pytest.approx(-10.0) and first["tpot_p50_diff_ms"] == 0.0
    assert cmp["passes"][2]["ttft_p50_diff_ms"] is None and cmp["passes"][2]["tok_s_ratio"] == pytest.approx(0.9)
    assert cmp["median"]["10"]["tok_s_ratio"] == pytest.approx(1.0)  # median of 0.9 and 1.1
    assert cmp["median"]["10"]["ttft_p50_diff_ms"] == pytest.approx(3.0)


# ---- one tiny run, engine-direct on CPU ------------------------------------------------------
FAKE_CEILINGS = (2e12, 5e14)  # copy B/s, FLOP/s: the CUDA-only measurement, made up


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    argv = ["--model", "kvray:tiny-qwen3", "--engine-args",
            json.dumps({"device": "cpu", "max_model_len": 512, "num_kv_blocks": 256}),
            "--max-prompt", "256", "--max-output", "32", "--rates", "4", "--duration", "2", "--passes", "2",
            "--all-at-once", "8", "--warmup", "2", "--out", str(out / "run"),
            "--trace", _write_trace(out / "trace.csv")]  # a checkout need not have ../shared/traces
    real_floor = online.floor_setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUT", str(out))
        mp.setattr(online, "floor_setup", lambda model: real_floor(model, FAKE_CEILINGS))
        report = online.main(argv)
    return out, argv, report


def test_tiny_engine_run_completes_every_request_and_reports_every_figure(tiny_run):
    out, argv, report = tiny_run
    saved = json.loads((out / "run.json").read_text())
    assert saved["command"] == report["command"] and saved["args"]["rates"] == "4"
    assert saved["device"] and "commit" in saved and saved["model"] == "kvray:tiny-qwen3"
    assert saved["max_model_len"] == 512
    eng = saved["targets"]["engine"]
    assert [(r["rate"], r["pass"]) for r in eng["runs"]] == [(4.0, 0), (4.0, 1), (None, 0), (None, 1)]
    for r in eng["runs"]:
        s = r["summary"]
        assert s["errors"] == 0 and s["completed"] == s["requests"] == r["figures"]["requests"] > 0, s["first_errors"]
        assert r["figures"]["tok_s"] > 0 and r["figures"]["tpot_p50"] > 0
    rated, at_once = eng["runs"][:2], eng["runs"][2:]
    assert all(r["figures"]["ttft_p99"] >= r["figures"]["ttft_p50"] > 0 for r in rated)
    assert all(0 <= r["figures"]["attainment"] <= 1 for r in rated)
    assert all(r["figures"]["requests"] == 8 and r["figures"]["ttft_p50"] is None for r in at_once)
    assert all(r["floor_tok_s"] > 0 and r["of_floor"] == pytest.approx(r["figures"]["tok_s"] / r["floor_tok_s"])
               for r in at_once)
    assert set(eng["per_load"]) == {"4", "all"} and eng["per_load"]["4"]["passes"] == 2
    assert eng["goodput_rps"] in (None, 4.0) and "comparison" not in saved
    assert saved["ceilings"]["copy_bw"] == FAKE_CEILINGS[0]
    try:
        import matplotlib  # noqa: F401
        assert (out / "run.png").stat().st_size > 0
    except ImportError:
        pass


def test_markdown_has_the_command_the_figures_and_the_comparison(tiny_run):
    out, argv, report = tiny_run
    md = (out / "online_results.md").read_text()
    assert md == online.render_markdown(report)
    assert f"`{report['command']}`" in md and "--all-at-once 8" in md and "kvray:tiny-qwen3" in md
    for r in report["targets"]["engine"]["runs"]:
        assert f"{r['figures']['tok_s']:,.0f}" in md and f"{r['figures']['tpot_p50']:.2f}" in md
    assert "Goodput (engine" in md
    assert f"{report['targets']['engine']['runs'][2]['of_floor']:.1%}" in md
    assert "http / engine" not in md
    both = copy.deepcopy(report)  # a second target with a known difference: the ratio table appears
    http = both["targets"]["http"] = copy.deepcopy(both["targets"]["engine"])
    for r in http["runs"]:
        r["figures"]["tok_s"] *= 0.5
        if r["figures"]["ttft_p50"] is not None:
            r["figures"]["ttft_p50"] += 12.3
    both["comparison"] = online.compare(both["targets"]["engine"]["runs"], http["runs"])
    md2 = online.render_markdown(both)
    assert "**http / engine**" in md2 and "| 4 | 0 | 50.0% | +12.3 |" in md2 and "| 4 | median | 50.0% | +12.3 |" in md2
    assert "| all | 0 | 50.0% | - |" in md2


def test_offline_throughput_repeats_report_min_median_and_every_run():
    from benchmarks import offline_throughput
    s = offline_throughput.repeat_stats([900.0, 1100.0, 1000.0], floor=2000.0)
    assert s["kvray_tok_s"] == s["kvray_tok_s_median"] == 1000.0 and s["kvray_tok_s_min"] == 900.0
    assert s["of_floor_min"] == pytest.approx(0.45) and s["of_floor_median"] == pytest.approx(0.5)
    assert s["kvray_tok_s_repeats"] == [900.0, 1100.0, 1000.0]


def test_rates_with_their_own_passes():
    assert online.parse_rates("25x5, 50,100x2", 1) == [(25.0, 5), (50.0, 1), (100.0, 2)]
