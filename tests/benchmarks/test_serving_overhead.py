"""benchmarks/serving_overhead.py's loads and its paired report (the GPU runs are in RESULTS.md)."""
import argparse

from benchmarks import serving
from benchmarks import serving_overhead as so



def _args(**kw):
    base = dict(concurrency=[64], rates=[48.0], rounds=8, rate_requests=100, input_len="384:640",
                output_len="96:160", warmup=16)
    return argparse.Namespace(**{**base, **kw})


def test_loads_become_serving_arguments():
    a = _args()
    assert so.loads(a) == ["c=64", "rate=48"]
    closed = serving.parser().parse_args(so.load_args(a, "c=64"))
    assert (closed.concurrency, closed.num_requests, closed.request_rate) == (64, 512, None)
    assert closed.input_len == (384, 640) and closed.output_len == (96, 160) and closed.warmup == 16
    opened = serving.parser().parse_args(so.load_args(a, "rate=48"))
    assert (opened.concurrency, opened.num_requests, opened.request_rate) == (None, 100, "48")


def _summary(tok_s, ttft_p50, rps=50.0, e2e_mean=1.0):
    return {"output_tok_s": tok_s, "request_throughput_rps": rps, "e2e_s": {"mean": e2e_mean},
            "ttft_s": {"p50": ttft_p50, "p90": 2 * ttft_p50}}


def test_each_http_pass_is_compared_with_its_own_baseline():
    pairs = [
        {"load": "c=64", "pair": 0, "order": "baseline then http",
         "baseline": _summary(1000, 0.030), "http": _summary(900, 0.040)},   # +10 ms, 90%
        {"load": "c=64", "pair": 1, "order": "http then baseline",
         "baseline": _summary(500, 0.060), "http": _summary(600, 0.062)},    # +2 ms, 120%
        {"load": "c=64", "pair": 2, "order": "baseline then http",
         "baseline": _summary(800, 0.050), "http": _summary(800, 0.045)},    # -5 ms, 100%
        {"load": "rate=48", "pair": 0, "order": "baseline then http",
         "baseline": _summary(700, 0.020), "http": _summary(700, 0.023)},
    ]
    md, stats = so.paired_summary(pairs)
    c64 = stats["c=64"]
    assert abs(c64["ttft_p50_overhead_ms_median"] - 2.0) < 1e-9
    assert [round(x, 6) for x in c64["ttft_p50_overhead_ms_range"]] == [-5.0, 10.0]
    assert abs(c64["throughput_ratio_median"] - 1.0) < 1e-9
    assert abs(stats["rate=48"]["ttft_p50_overhead_ms_median"] - 3.0) < 1e-9
    assert "| c=64 | 3 | 100.0% (90.0% to 120.0%) | +2.0 ms (-5.0 to +10.0) |" in md
    table = so.pairs_table(pairs)
    assert "| c=64 | 1 | http then baseline | 50 | 500 | 600 | 120.0% |" in table  # 50 req/s x 1 s in flight
