"""Load programs, their per-window judgement, the engine's bounded queue in the simulator, the
split step model, overload_sim (predicted and predicted-vs-measured) and the HTTP program client."""
import asyncio
import json
import math
import random

import pytest

from benchmarks import overload_sim, program_http
from benchmarks.sim import program as prog
from benchmarks.sim.cluster import Cluster, SimConfig
from benchmarks.sim.replica import ReplicaConfig
from benchmarks.sim.steps import SplitStepModel, fit_split, split_model, true_model
from benchmarks.sim.workload import CLASSES, SimRequest, merged_trace
from kvray.step_cost import StepCoeffs

G = 10.0


def test_program_windows_and_requests(traces):
    phases = prog.overload_program(G, window_s=10, overload_s=12, settle_s=6, gap_s=2, burst_s=10)
    labels = [(ph.label, ph.rate, ph.duration_s) for ph in phases]
    assert labels[:4] == [("0.7x", 7.0, 10), ("burst", 70.0, 10), ("after burst", 7.0, 10), ("", 0.0, 2)]
    assert ("", 15.0, 6) in labels and ("1.5x", 15.0, 12) in labels and ("1x", 10.0, 10) in labels
    assert labels[-1] == ("2x", 20.0, 12)  # no pause after the last window
    assert prog.window_durations(phases) == {"0.7x": 10, "burst": 10, "after burst": 10, "1x": 10, "1.5x": 12,
                                             "2x": 12}
    reqs = prog.program_requests(merged_trace(traces), phases, seed=3, max_model_len=4096)
    assert [r.rid for r, _ in reqs] == list(range(len(reqs)))
    assert all(a[0].arrival <= b[0].arrival for a, b in zip(reqs, reqs[1:]))
    assert all(r.max_tokens == r.output_len and r.prompt_len <= 4094 for r, _ in reqs)
    burst = [r for r, w in reqs if w == "burst"]
    assert 500 < len(burst) < 900 and all(10 <= r.arrival < 20 for r in burst)
    settle = [r for r, w in reqs if w == ""]  # the settling seconds before the windows above 1x
    assert settle and all(r.arrival >= 32 for r in settle)
    again = prog.program_requests(merged_trace(traces), phases, seed=3, max_model_len=4096)
    assert [(r.arrival, r.prompt_len, w) for r, w in again] == [(r.arrival, r.prompt_len, w) for r, w in reqs]
    with pytest.raises(ValueError, match="goodput"):
        prog.overload_program(0)


def test_windows_count_429s_and_timeouts_as_misses():
    phases = [prog.Phase("w", 4.0, 2.0), prog.Phase("", 0.0, 1.0)]
    O = prog.Outcome
    outcomes = [O(0, "w", "interactive", 0.0, "ok", ttft=0.1, tpot=0.02, n_out=10),
                O(1, "w", "interactive", 0.1, "ok", ttft=0.6, tpot=0.02, n_out=10),   # TTFT missed
                O(2, "w", "interactive", 0.2, "ok", ttft=0.2, tpot=0.06, n_out=10),   # TPOT missed
                O(3, "w", "interactive", 0.3, "rejected"),
                O(4, "w", "interactive", 0.4, "timeout"),
                O(5, "w", "batch", 0.5, "ok", ttft=5.0, tpot=None, n_out=1),
                O(6, "", "batch", 2.5, "ok", ttft=0.1, tpot=0.01, n_out=5)]  # a pause: not judged
    w = prog.summarize_windows(outcomes, phases, CLASSES)["w"]
    i, b = w["classes"]["interactive"], w["classes"]["batch"]
    assert (i["n"], i["attained"], i["rejected"], i["timeouts"]) == (5, 1, 1, 1)
    assert i["attainment"] == pytest.approx(0.2) and b["attainment"] == 1.0
    assert w["goodput_rps"] == pytest.approx(2 / 2.0) and w["min_attainment"] == pytest.approx(0.2)
    assert i["ttft_p50"] == pytest.approx(0.2) and i["ttft_p99"] == pytest.approx(0.6)
    windows = {"1x": {"rate": 10, "min_attainment": 0.95}, "1.5x": {"rate": 15, "min_attainment": 0.85},
               "2x": {"rate": 20, "min_attainment": 0.1}}
    assert prog.crossing(windows, ["1x", "1.5x", "2x"]) == pytest.approx(12.5)
    assert prog.crossing({"1x": {"rate": 10, "min_attainment": 0.5}}, ["1x"]) == 0.0
    assert prog.crossing({"1x": {"rate": 10, "min_attainment": 0.95}}, ["1x"]) == 10


def _burst(n, prompt=1500, output=20):
    return [SimRequest(i, 0.001 * i, prompt, output, output, CLASSES["batch"], "code") for i in range(n)]


def test_a_full_engine_queue_refuses_and_slo_aware_holds_instead():
    """The simulated engine refuses what would queue more than max_queued_prompt_tokens (a 429,
    as the online engine does); the SLO-aware router holds a batch request until there is room."""
    cfg = SimConfig(replica=ReplicaConfig(num_blocks=4096, max_model_len=4096, max_num_batched_tokens=512,
                                          max_queued_prompt_tokens=6000, enable_prefix_caching=False),
                    true_coeffs=StepCoeffs(5e-3, 2e-5, 0.0, 0.0), noise=0.0, drain_s=60.0)
    fcfs = Cluster("least_load", 1, _burst(40), cfg)
    fcfs.run()
    refused = [r for r in fcfs.records if r.rejected]
    assert refused and all(r.refusals == 1 for r in refused)  # one replica: refused once, then a 429
    assert all(r.finished is not None for r in fcfs.records if not r.rejected)
    slo = Cluster("slo_aware", 1, _burst(40), cfg)
    slo.run()
    assert not any(r.refusals for r in slo.records)  # it never sends a request into a full queue
    assert all(r.finished is not None for r in slo.records)  # and serves all within the 10 s
    assert len(refused) > 5


def test_split_model_fits_decode_and_mixed_steps_apart():
    rng = random.Random(0)
    decode, mixed = StepCoeffs(6e-3, 0.0, 4e-8, 2e-5), StepCoeffs(2e-3, 2e-5, 3e-8, 0.0)
    rows = []
    for _ in range(600):
        seqs = rng.randint(1, 256)
        ctx = seqs * rng.randint(100, 3000)
        batched = seqs if rng.random() < 0.5 else seqs + rng.randint(64, 2048)
        c = decode if batched == seqs else mixed
        rows.append((batched, ctx, seqs, c.predict(batched, ctx, seqs) * math.exp(rng.gauss(0, 0.02))))
    split = fit_split(rows)
    assert split["decode"]["steps"] + split["mixed"]["steps"] == 600
    assert split["p90_rel_err"] < 0.05 and split["mixed"]["b"] == pytest.approx(2e-5, rel=0.05)
    model = split_model(split)
    assert isinstance(model, SplitStepModel)
    assert model.predict(100, 100_000, 100) == pytest.approx(decode.predict(100, 100_000, 100), rel=0.05)
    assert model.predict(1100, 100_000, 100) == pytest.approx(mixed.predict(1100, 100_000, 100), rel=0.05)


def test_true_model_from_a_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"a": 1e-3, "b": 1e-5, "c": 0.0, "d": 0.0}))
    assert true_model(str(f), "linear").predict(100, 0, 1) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="no split fit"):
        true_model(str(f), "split")
    with pytest.raises(ValueError, match="linear' or 'split"):
        true_model(str(f), "cubic")


def _quick(traces, out, *extra):
    return overload_sim.main(["--goodput", "6", "--window", "6", "--overload", "6", "--settle", "2", "--gap", "1",
                              "--burst", "3", "--drain", "5", "--max-model-len", "4096", "--num-blocks", "4096",
                              "--code-trace", traces["code"], "--conv-trace", traces["conv"], "--out", str(out),
                              *extra])


def test_overload_sim_predicts_and_compares_with_a_measurement(traces, tmp_path):
    pred = _quick(traces, tmp_path / "pred")
    w = pred["windows"]["linear"]
    assert set(w) == {"slo_aware", "p2c", "least_load"}
    assert set(w["p2c"]) == {"0.7x", "burst", "after burst", "1x", "1.5x", "2x"}
    assert w["slo_aware"]["0.7x"]["min_attainment"] >= 0.9  # light load: everything on time
    assert sum(c["rejected"] for c in w["slo_aware"]["burst"]["classes"].values()) > 0  # the burst is shed
    md = (tmp_path / "pred.md").read_text()
    assert "**Overload** (predicted" in md and "| 1.5x |" in md
    # The simulator's own outcomes as a "measurement": the comparison finds no error.
    cfg = overload_sim.sim_config(overload_sim.coeffs_file("llama-3.1-8b"), "linear",
                                  ReplicaConfig(max_model_len=4096, num_blocks=4096, enable_prefix_caching=False), 5.0)
    ns = type("A", (), dict(levels="1,1.5,2", window=6.0, overload=6.0, settle=2.0, gap=1.0, burst=3.0,
                            burst_factor=10.0, burst_base=0.7))
    phases = overload_sim.make_program(ns, 6.0)
    labelled = prog.program_requests(merged_trace(traces), phases, seed=0, cv=1.0, max_model_len=4096)
    measured = {"goodput": 6.0, "num_kv_blocks": 4096, "device": "the simulator",
                "program_args": {"levels": "1,1.5,2", "window": 6.0, "overload": 6.0, "settle": 2.0, "gap": 1.0,
                                 "burst": 3.0, "burst_factor": 10.0, "burst_base": 0.7, "drain": 5.0, "cv": 1.0,
                                 "seed": 0, "max_model_len": 4096},
                "policies": {p: {"outcomes": prog.outcomes_to_json(prog.simulate(p, labelled, cfg))}
                             for p in ("slo_aware", "p2c")}}
    for pol in ("slo_aware", "p2c"):  # two runs of the same program (two commands on the GPU), merged
        one = dict(measured, policies={pol: measured["policies"][pol]})
        (tmp_path / f"{pol}.json").write_text(json.dumps(one))
    both = _quick(traces, tmp_path / "fid", "--measured", str(tmp_path / "slo_aware.json"),
                  str(tmp_path / "p2c.json"))
    assert set(both["measured"]) == {"slo_aware", "p2c"}
    assert both["measured"]["p2c"] == both["windows"]["linear"]["p2c"]
    md = (tmp_path / "fid.md").read_text()
    assert "| slo_aware | 1x | measured |" in md and "linear: yes" in md
    other = dict(measured, goodput=7.0)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different programs"):
        _quick(traces, tmp_path / "bad", "--measured", str(tmp_path / "p2c.json"), str(tmp_path / "other.json"))


class _FakeKvray:
    """An OpenAI-style streaming server: request 0 streams 3 one-token chunks 20 ms apart, request
    1 gets a 429, request 2 streams a token and then stalls past the cut-off, request 3 never
    answers."""

    def __init__(self):
        from aiohttp import web

        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.completions)
        self.bodies = []

    async def models(self, request):
        from aiohttp import web
        return web.json_response({"data": [{"id": "fake", "vocab_size": 50}]})

    async def completions(self, request):
        from aiohttp import web
        body = await request.json()
        self.bodies.append((request.headers.get("x-slo-class"), body))
        kind = len(body["prompt"])
        if kind == 11:
            return web.json_response({"error": {"message": "busy"}}, status=429)
        if kind == 13:
            await asyncio.sleep(30)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(3):
            chunk = {"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": [-0.1]}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.02 if kind == 10 else 30)
        await resp.write(b"data: [DONE]\n\n")
        return resp


def test_the_http_client_judges_requests_like_the_simulator():
    from aiohttp.test_utils import TestServer

    fake = _FakeKvray()
    reqs = [(SimRequest(i, 0.05 * i, 10 + i, 3, 3, CLASSES["interactive" if i % 2 else "batch"], "x"), "w")
            for i in range(4)]

    async def go():
        async with TestServer(fake.app) as server:
            return await program_http.play(str(server.make_url("")), reqs, drain_s=0.5, seed=1)

    ok, rejected, partial, silent = asyncio.run(go())
    assert ok.status == "ok" and ok.n_out == 3 and 0 < ok.ttft < 0.2 and 0.015 < ok.tpot < 0.1
    assert rejected.status == "rejected" and rejected.ttft is None
    assert partial.status == "ok" and partial.n_out == 1 and partial.tpot is None  # judged on what it got
    assert silent.status == "timeout"
    cls, body = fake.bodies[0]
    assert cls == "batch" and body["max_tokens"] == 3 and body["ignore_eos"] and body["stream"]
    assert all(0 <= t < 50 for t in body["prompt"]) and len(body["prompt"]) == 10


def test_routing_gpu_program_end_to_end_on_cpu(traces, tmp_path, monkeypatch):
    """The single-GPU program through HAProxy and the Router, with a tiny CPU engine: every policy
    deploys, every request ends as an outcome, and the comparison with the simulator is written."""
    import socket

    from benchmarks import routing_gpu

    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):  # set by main: restored after
        monkeypatch.setenv(var, "1")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coeffs = tmp_path / "tiny.json"  # the tiny engine on a CPU: ~0.1 s a step
    coeffs.write_text(json.dumps({"a": 0.05, "b": 2e-4, "c": 0.0, "d": 1e-3, "device": "cpu", "source": "test"}))
    out = tmp_path / "out"
    record = routing_gpu.main([
        "--program", "--replicas", "1", "--gpus-per-replica", "0", "--cpus-per-replica", "1", "--router-replicas", "1",
        "--router-cpus", "0.5", "--model", "kvray:tiny-qwen3", "--engine", '{"device": "cpu"}', "--max-model-len",
        "1024", "--policies", "slo_aware", "p2c", "--coeffs", str(coeffs), "--goodput", "1.0", "--window", "3",
        "--overload", "3", "--settle", "1", "--gap", "1", "--burst", "2", "--drain", "4", "--port", str(port),
        "--code-trace", traces["code"], "--conv-trace", traces["conv"], "--compare-sim", "--out", str(out)])
    saved = json.loads((out / "routing_program.json").read_text())
    assert set(saved["policies"]) == {"slo_aware", "p2c"} and saved["goodput"] == 1.0
    n = len(prog.program_requests(merged_trace(traces), [prog.Phase(**ph) for ph in saved["phases"]],
                                  max_model_len=1024))
    for pol, got in saved["policies"].items():
        outcomes = prog.outcomes_from_json(got["outcomes"])
        assert len(outcomes) == n and {o.status for o in outcomes} <= {"ok", "rejected", "timeout"}, pol
        assert sum(o.status == "ok" for o in outcomes) >= n // 2, pol
        assert all(o.ttft is not None and o.ttft > 0 for o in outcomes if o.status == "ok")
    assert record["num_kv_blocks"] and (out / "fidelity.md").exists()
    assert "| p2c | 1x | measured |" in (out / "fidelity.md").read_text()


def test_step_model_check_prints_the_known_figures(traces, capsys, tmp_path):
    from benchmarks import step_model_check

    coeffs = tmp_path / "coeffs.json"  # 6.5 ms + 21 us x 704 tokens + 35 ns x 192,512 context tokens = 28.0 ms
    coeffs.write_text(json.dumps({"a": 0.0065, "b": 2.1e-05, "c": 3.5e-08, "d": 0.0}))
    step_model_check.main(["--coeffs", str(coeffs), "--conv-trace", traces["conv"], "--rates", "4", "--duration", "10"])
    out = capsys.readouterr().out
    assert "step of 192 decodes (1,000-token contexts) + a 512-token chunk: 28.0 ms" in out
    tok_s = float(out.split("offline workload B: ")[1].split()[0])
    assert 5000 < tok_s < 12000
    assert "| 4 | 100.0% |" in out
