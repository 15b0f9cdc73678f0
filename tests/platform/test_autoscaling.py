"""Unit tests of kvray's autoscaling: the defaults derived from max_num_seqs, the SLO-headroom
policy (alone, and wrapped the way the Serve 2.60 controller wraps every custom policy, which
adds the upscale/downscale delays), and the replica-side load signal."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray")

from ray.serve import autoscaling_policy as serve_policy  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402

from kvray.platform import gpus  # noqa: E402
from kvray.platform.autoscaling import __main__ as cli  # noqa: E402
from kvray.platform.autoscaling import defaults, signal  # noqa: E402
from kvray.platform.autoscaling import (  # noqa: E402
    POLICY_PATH, SLOHeadroomPolicy, apply_autoscaling_defaults, derive_autoscaling_defaults,
    derived_target, fill_serve_config, user_set)
from kvray.records import EngineStats, RequestSnapshot  # noqa: E402
from kvray.slo import SLOTarget  # noqa: E402
from kvray.step_cost import StepCoeffs, StepTimeModel, predict_attainment  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOW = 10_000.0


class Point(SimpleNamespace):
    """Stands for Serve's TimeStampedValue (timestamp, value)."""


def metrics(per_replica: dict[str, dict[str, float]], at: float = NOW) -> dict:
    """{replica: {short metric name: value}} -> Serve's raw_metrics layout."""
    out: dict = {}
    for rid, vals in per_replica.items():
        for name, v in vals.items():
            out.setdefault(f"kvray_{name}", {})[rid] = [Point(timestamp=at - 1.0, value=v * 0.5),
                                                       Point(timestamp=at, value=v)]
    return out


def make_ctx(config: AutoscalingConfig, *, running: int, target: int | None = None, total: float = 0.0,
             queued: float = 0.0, raw: dict | None = None, state: dict | None = None,
             now: float = NOW) -> AutoscalingContext:
    replicas = [f"r{i}" for i in range(running)]
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMReplica", app_name="kvray", current_num_replicas=running,
        target_num_replicas=running if target is None else target, running_replicas=replicas,
        total_num_requests=total, total_queued_requests=queued, aggregated_metrics={}, raw_metrics=raw or {},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state or {}), last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=config)


def cfg(**kw) -> AutoscalingConfig:
    base = dict(min_replicas=1, max_replicas=8, policy={"policy_function": POLICY_PATH})
    return AutoscalingConfig(**{**base, **kw})


def replica_metrics(n: int, *, seqs: int = 8, prefill: float = 0.0, kv: float = 0.1, attain: float = 1.0,
                    slo_reqs: float = 0.0, at: float = NOW) -> dict:
    return metrics({f"r{i}": {"max_num_seqs": seqs, "queued_prefill_tokens": prefill, "kv_usage": kv,
                              "predicted_attainment": attain, "slo_requests": slo_reqs} for i in range(n)}, at=at)


# ---- defaults --------------------------------------------------------------------------------

def test_derived_target_tracks_max_num_seqs():
    assert derived_target(256) == 192
    assert derived_target(64) == 48
    assert derived_target(8) == 6
    assert derived_target(1) == 1
    d = derive_autoscaling_defaults(256)
    assert d["target_ongoing_requests"] == 192
    assert 0 < d["upscale_delay_s"] < d["downscale_delay_s"]
    # the target stays under the replica's max_ongoing_requests (2 x max_num_seqs in build_app)
    assert all(derived_target(s) < 2 * s for s in (1, 2, 8, 256, 1024))


def test_user_keys_win_over_derived_defaults():
    assert apply_autoscaling_defaults(None, 256) is None  # fixed num_replicas: untouched
    out = apply_autoscaling_defaults({"max_replicas": 4, "upscale_delay_s": 1.0}, 64)
    assert out["max_replicas"] == 4 and out["upscale_delay_s"] == 1.0
    assert out["target_ongoing_requests"] == 48 and out["downscale_delay_s"] == defaults.DOWNSCALE_DELAY_S
    # an AutoscalingConfig counts only the keys that were set
    out = apply_autoscaling_defaults(AutoscalingConfig(max_replicas=4, target_ongoing_requests=7), 64)
    assert out["target_ongoing_requests"] == 7 and out["upscale_delay_s"] == defaults.UPSCALE_DELAY_S
    AutoscalingConfig(**out)  # still a valid Serve config


def test_fill_serve_config_only_touches_kvray_autoscaling():
    local = yaml.safe_load((ROOT / "cluster-configs" / "local.yaml").read_text())
    assert fill_serve_config(local) == local  # fixed replicas: nothing to fill
    gpu = yaml.safe_load((ROOT / "cluster-configs" / "gpu.yaml").read_text())
    auto = copy.deepcopy(gpu)
    dep = auto["applications"][0]["deployments"][0]
    assert dep["name"] == "LLMReplica"
    dep.pop("num_replicas", None)
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "downscale_delay_s": 120}
    filled = fill_serve_config(auto)
    ac = filled["applications"][0]["deployments"][0]["autoscaling_config"]
    seqs = gpu["applications"][0]["args"]["engine"]["max_num_seqs"]
    assert ac["target_ongoing_requests"] == derived_target(seqs)
    assert ac["downscale_delay_s"] == 120 and ac["upscale_delay_s"] == defaults.UPSCALE_DELAY_S
    assert auto["applications"][0]["deployments"][0]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "downscale_delay_s": 120}  # input not mutated


def test_cli_prints_the_config_with_defaults_written_out(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "cluster-configs" / "local.yaml").read_text())
    dep = cfg["applications"][0]["deployments"][0]
    dep.pop("num_replicas")
    dep["autoscaling_config"] = {"max_replicas": 3}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main([str(path)]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    ac = out["applications"][0]["deployments"][0]["autoscaling_config"]
    assert ac["max_replicas"] == 3 and ac["target_ongoing_requests"] == 48  # local.yaml: max_num_seqs 64
    assert cli.main([]) == 2


def test_user_set_means_a_value_other_than_serves_default():
    assert not user_set(AutoscalingConfig(max_replicas=3), "target_ongoing_requests")
    assert user_set(AutoscalingConfig(max_replicas=3, target_ongoing_requests=5), "target_ongoing_requests")
    # the controller rebuilds the config from a full dump: the answer must not change
    full = AutoscalingConfig(**AutoscalingConfig(max_replicas=3).model_dump())
    assert not user_set(full, "target_ongoing_requests")
    full = AutoscalingConfig(**AutoscalingConfig(max_replicas=3, target_ongoing_requests=5).model_dump())
    assert user_set(full, "target_ongoing_requests")
    assert not user_set(AutoscalingConfig(target_ongoing_requests=2), "target_ongoing_requests")  # Serve's default


# ---- the policy alone ------------------------------------------------------------------------

def test_target_is_derived_from_reported_max_num_seqs_unless_set():
    policy = SLOHeadroomPolicy()
    c = cfg(max_replicas=3)  # no target_ongoing_requests: derived from max_num_seqs 8 -> 6
    n, state = policy(make_ctx(c, running=1, total=24, raw=replica_metrics(1, seqs=8)))
    assert n == 3 and state["kvray"]["target"] == 6 and state["kvray"]["reason"] == "up: load"
    n, _ = policy(make_ctx(c, running=1, total=10, raw=replica_metrics(1, seqs=8)))
    assert n == 2
    # set by the user: honoured as is
    n, state = policy(make_ctx(cfg(target_ongoing_requests=12), running=1, total=24, raw=replica_metrics(1)))
    assert n == 2 and state["kvray"]["target"] == 12
    # nothing reported yet and no fallback: Serve's own value
    n, state = SLOHeadroomPolicy()(make_ctx(c, running=1, total=5))
    assert state["kvray"]["target"] == 2 and n == 3
    n, state = SLOHeadroomPolicy(max_num_seqs=64)(make_ctx(c, running=1, total=5))
    assert state["kvray"]["target"] == 48 and n == 1


def test_scale_up_on_low_predicted_attainment():
    policy = SLOHeadroomPolicy(attainment_target=0.9)
    c = cfg()
    # load is well under target, but half the in-flight requests are predicted to miss their SLO
    n, state = policy(make_ctx(c, running=2, total=4, raw=replica_metrics(2, attain=0.5, slo_reqs=10)))
    assert n == 3 and state["kvray"]["reason"] == "up: attainment"
    n, _ = policy(make_ctx(c, running=4, total=4, raw=replica_metrics(4, attain=0.3, slo_reqs=10)))
    assert n == 7
    # too few requests with targets to judge: no reaction
    n, _ = policy(make_ctx(c, running=2, total=4, raw=replica_metrics(2, attain=0.0, slo_reqs=1)))
    assert n == 2
    # attainment is weighted by each replica's number of SLO requests
    raw = metrics({"r0": {"predicted_attainment": 0.0, "slo_requests": 1, "max_num_seqs": 8},
                   "r1": {"predicted_attainment": 1.0, "slo_requests": 99, "max_num_seqs": 8}})
    n, state = policy(make_ctx(c, running=2, total=8, raw=raw))
    assert n == 2 and state["kvray"]["attainment"] == pytest.approx(0.99) and state["kvray"]["reason"] == "hold"


def test_decisions_count_the_gpus_of_a_replica():
    """A replica of tensor_parallel_size 2 reports 2 GPUs: three of them are 6 GPUs."""
    policy = SLOHeadroomPolicy(attainment_target=0.9)
    raw = replica_metrics(2, attain=0.5, slo_reqs=10)
    raw.update(metrics({f"r{i}": {"gpus_per_replica": 2} for i in range(2)}))
    n, state = policy(make_ctx(cfg(), running=2, total=4, raw=raw))
    assert n == 3 and state["kvray"]["gpus"] == 6
    n, state = policy(make_ctx(cfg(), running=2, total=4, raw=replica_metrics(2, attain=0.5, slo_reqs=10)))
    assert n == 3 and state["kvray"]["gpus"] == 0  # CPU replicas (or ones that do not say)


def test_scale_up_on_queued_prefill_and_kv_pressure():
    policy = SLOHeadroomPolicy(max_queued_prefill_tokens=4096)
    c = cfg(max_replicas=4)
    n, state = policy(make_ctx(c, running=2, total=2, raw=replica_metrics(2, prefill=6000)))
    assert n == 3 and state["kvray"]["reason"] == "up: prefill"      # ceil(2 * 6000 / 4096)
    n, _ = policy(make_ctx(c, running=2, total=2, raw=replica_metrics(2, prefill=50_000)))
    assert n == 4                                                     # capped at max_replicas
    n, state = policy(make_ctx(c, running=2, total=2, raw=replica_metrics(2, kv=0.99)))
    assert n == 3 and state["kvray"]["reason"] == "up: kv"


def test_hold_in_the_band_and_down_only_with_headroom():
    policy = SLOHeadroomPolicy(downscale_utilization=0.7)
    c = cfg()
    # 3 replicas, target 6: 14 requests need 3; 2 would run at 117% of target -> hold
    n, state = policy(make_ctx(c, running=3, total=14, raw=replica_metrics(3)))
    assert n == 3 and state["kvray"]["reason"] == "hold"
    # 2 requests: 1 replica holds them at 33% of target -> down to 1
    n, state = policy(make_ctx(c, running=3, total=2, raw=replica_metrics(3, attain=0.99, slo_reqs=10)))
    assert n == 1 and state["kvray"]["reason"] == "down: headroom"
    # 5 requests: 2 replicas (42%) -> down by one
    n, _ = policy(make_ctx(c, running=3, total=5, raw=replica_metrics(3)))
    assert n == 2
    # low load but the prefill queue would be long with one replica fewer: hold
    n, _ = policy(make_ctx(c, running=3, total=2, raw=replica_metrics(3, prefill=1500)))
    assert n == 3
    # low load but the SLO is missed: never down (up instead)
    n, _ = policy(make_ctx(c, running=3, total=2, raw=replica_metrics(3, attain=0.8, slo_reqs=10)))
    assert n == 4


def test_min_and_max_replicas_bound_every_decision():
    policy = SLOHeadroomPolicy()
    c = cfg(min_replicas=2, max_replicas=3)
    assert policy(make_ctx(c, running=3, total=0, raw=replica_metrics(3)))[0] == 2
    assert policy(make_ctx(c, running=2, total=500, raw=replica_metrics(2)))[0] == 3
    assert policy(make_ctx(c, running=2, total=0, raw=replica_metrics(2, attain=0.1, slo_reqs=50)))[0] == 3
    # scale to zero only where min_replicas is 0, and only when idle
    z = cfg(min_replicas=0, max_replicas=3)
    assert policy(make_ctx(z, running=1, total=0, raw=replica_metrics(1)))[0] == 0
    assert policy(make_ctx(z, running=1, total=1, raw=replica_metrics(1)))[0] == 1
    # nothing running yet: keep the target (Serve's cold-start path starts the first replica)
    assert policy(make_ctx(z, running=0, target=0, total=0))[0] == 0


def test_load_counts_engine_requests_not_open_channels():
    """Serve's total_num_requests counts every open call, such as the Router's long-lived token
    channel to each replica; replicas report the requests their engines hold."""
    policy = SLOHeadroomPolicy()
    c = cfg()
    raw = metrics({f"r{i}": {"max_num_seqs": 8, "num_running": 0.5, "num_waiting": 0.0} for i in range(3)})
    n, state = policy(make_ctx(c, running=3, total=3 + 1.5, raw=raw))  # 3 channels + 1.5 requests
    assert state["kvray"]["requests"] == pytest.approx(1.5) and n == 1
    # 20 more wait at the Router's handle for a free replica
    n, state = policy(make_ctx(c, running=3, total=30, queued=20, raw=raw))
    assert state["kvray"]["requests"] == pytest.approx(21.5) and n == 4


def test_stale_and_departed_replica_metrics_are_ignored():
    policy = SLOHeadroomPolicy(stale_after_s=30)
    c = cfg()
    old = metrics({"r0": {"queued_prefill_tokens": 50_000, "max_num_seqs": 8}}, at=NOW - 120)
    n, state = policy(make_ctx(c, running=1, total=1, raw=old))
    assert n == 1 and state["kvray"]["target"] == 2  # nothing fresh, nothing remembered
    policy(make_ctx(c, running=1, total=1, raw=replica_metrics(1, seqs=64)))
    n, state = policy(make_ctx(c, running=1, total=1, raw=old))
    assert n == 1 and state["kvray"]["target"] == 48  # the last max_num_seqs reported is remembered
    gone = metrics({"r9": {"queued_prefill_tokens": 50_000, "max_num_seqs": 8}})
    assert policy(make_ctx(c, running=1, total=1, raw=gone))[0] == 1


def test_bad_policy_kwargs_fail_at_once():
    with pytest.raises(ValueError):
        SLOHeadroomPolicy(attainment_target=1.5)
    with pytest.raises(ValueError):
        SLOHeadroomPolicy(max_queued_prefill_tokens=0)


# ---- wrapped as the controller runs it: delays ----------------------------------------------

class _Clock:
    def __init__(self, t: float):
        self.t = t

    def time(self) -> float:
        return self.t


def test_delays_hold_then_act_when_wrapped_like_the_serve_controller(monkeypatch):
    """Serve 2.60 wraps every deployment-level custom policy with its delay/factor logic
    (``_apply_autoscaling_config``, the same call the controller makes)."""
    clock = _Clock(NOW)
    monkeypatch.setattr(serve_policy, "time", clock)
    c = cfg(max_replicas=3, upscale_delay_s=10, downscale_delay_s=60)
    policy = serve_policy._apply_autoscaling_config(SLOHeadroomPolicy())
    state: dict = {}
    target = 1

    def tick(dt: float, total: float, **m) -> int:
        nonlocal state, target
        clock.t += dt
        target, state = policy(make_ctx(c, running=target, total=total, state=state, now=clock.t,
                                        raw=replica_metrics(target, at=clock.t, **m)))
        return target

    assert tick(0, 24) == 1          # pressure starts: wait upscale_delay_s
    assert tick(5, 24) == 1
    assert tick(5, 24) == 3          # 10 s of pressure: up to max_replicas
    assert tick(1, 2) == 3           # headroom starts
    assert tick(30, 2) == 3
    assert tick(1, 14) == 3          # one tick without headroom resets the downscale delay
    assert tick(1, 2) == 3
    assert tick(59, 2) == 3
    assert tick(1, 2) == 1           # 60 s of sustained headroom: down
    assert "kvray" in state          # the policy's own state survives the wrapper


# ---- the replica-side signal -----------------------------------------------------------------

def _model(a=0.01, b=1e-3) -> StepTimeModel:
    return StepTimeModel.fixed_coeffs(StepCoeffs(a=a, b=b, c=0.0, d=0.0))


def test_predicted_attainment_of_waiting_and_running_requests():
    m = _model(b=1e-4)  # 10 ms per step + 0.1 ms per batched token: a 512-token chunk step ~61 ms
    now = 100.0
    assert predict_attainment(m, [], now) == (1.0, 0)
    no_targets = [RequestSnapshot(now, None, 100, 0, 16, None, None)]
    assert predict_attainment(m, no_targets, now) == (1.0, 0)
    reqs = [
        RequestSnapshot(now - 0.1, None, 100, 0, 16, 1.0, 0.1),     # short prompt, first in line: met
        RequestSnapshot(now - 0.1, None, 20000, 0, 16, 1.0, 0.1),   # 20000 prompt tokens: ~2.4 s, missed
        RequestSnapshot(now - 5.0, now - 4.9, 0, 50, 100, 1.0, 0.1),  # running: 0.1 s TTFT, ~80 ms/token: met
        RequestSnapshot(now - 5.0, now - 2.0, 0, 5, 100, 1.0, 0.1),   # running: 3 s TTFT, missed
    ]
    att, n = predict_attainment(m, reqs, now, max_batched_tokens=512)
    assert n == 4 and att == pytest.approx(0.5)
    # the same queue in front of a request that arrived later: it waits behind the 20000 tokens
    late = RequestSnapshot(now, None, 100, 0, 16, 1.0, None)
    att, n = predict_attainment(m, reqs[:2] + [late], now, max_batched_tokens=512)
    assert n == 3 and att == pytest.approx(1 / 3)
    # deadline order: the later but more urgent request goes first and makes it
    urgent = dataclasses.replace(late, deadline=now + 0.5)
    first = [dataclasses.replace(r, deadline=r.arrival + 30) for r in reqs[:2]]
    att, _ = predict_attainment(m, first + [urgent], now, max_batched_tokens=512, deadline_order=True)
    assert att == pytest.approx(2 / 3)


def _fake_engine(requests: list[RequestSnapshot]):
    """What ``replica_autoscaling_stats`` reads of an AsyncLLMEngine: its stats record (with the
    step-cost fit it publishes) and its in-flight request snapshots."""
    stats = EngineStats(num_running=1, num_waiting=1, num_free_blocks=30, num_total_blocks=40,
                        queued_prefill_tokens=64, tokens_in_flight=104, max_num_seqs=16,
                        max_num_batched_tokens=2048, step_coeffs=(0.01, 1e-4, 0.0, 0.0), num_steps=10)
    return SimpleNamespace(stats=lambda: stats, request_snapshots=lambda: list(requests))


def test_replica_autoscaling_stats_are_numbers_serve_accepts():
    now = signal.time.monotonic()
    running = RequestSnapshot(now - 1, now - 0.9, 0, 8, 32, 60.0, 10.0)
    waiting = RequestSnapshot(now - 0.1, None, 64, 0, 32, 60.0, 10.0)
    eng = _fake_engine([running, waiting])
    out = signal.replica_autoscaling_stats(eng)
    assert all(isinstance(v, float) for v in out.values())  # Serve drops non-numeric custom metrics
    assert out[signal.M_MAX_NUM_SEQS] == 16 and out[signal.M_PREFILL] == 64
    assert out[signal.M_KV] == pytest.approx(0.25)
    assert out[signal.M_SLO_REQS] == 2 and out[signal.M_ATTAIN] == 1.0  # generous targets: all met
    # a request already past its TTFT target counts as a miss
    late = RequestSnapshot(now - 5, None, 64, 0, 32, 1.0, 10.0)
    out = signal.replica_autoscaling_stats(_fake_engine([running, late]))
    assert out[signal.M_SLO_REQS] == 2 and out[signal.M_ATTAIN] == pytest.approx(0.5)
    # nothing in flight: load metrics only, nothing to predict
    assert out[signal.M_GPUS] == 0.0 and signal.replica_autoscaling_stats(eng, 2)[signal.M_GPUS] == 2.0
    out = signal.replica_autoscaling_stats(_fake_engine([]))
    assert out[signal.M_SLO_REQS] == 0 and out[signal.M_ATTAIN] == 1.0 and out[signal.M_RUNNING] == 1


def test_the_prediction_uses_the_coefficients_the_engine_published():
    """A replica whose engine measured slow steps predicts misses the default model would not."""
    now = signal.time.monotonic()
    waiting = [RequestSnapshot(now, None, 1000, 0, 32, 1.0, 1.0) for _ in range(4)]
    fast = signal.replica_autoscaling_stats(_fake_engine(waiting))
    assert fast[signal.M_ATTAIN] == 1.0
    slow = _fake_engine(waiting)
    st = dataclasses.replace(slow.stats(), step_coeffs=(0.01, 1e-3, 0.0, 0.0))  # 1 ms per prompt token
    slow.stats = lambda: st
    assert signal.replica_autoscaling_stats(slow)[signal.M_ATTAIN] < 1.0


def test_replica_stats_from_a_real_engine():
    """Guards the engine attributes the request snapshot reads (Sequence, RequestMetrics, scheduler)."""
    from kvray.replica.config import EngineConfig
    from kvray.replica.engine import LLMEngine
    from kvray.replica.sampling_params import SamplingParams

    core = LLMEngine(EngineConfig(model="kvray:tiny-qwen3", device="cpu", max_num_seqs=4, max_model_len=256))
    for i in range(3):
        core.add_sequence(core.make_sequence(f"r{i}", list(range(10, 10 + 20 * (i + 1))),
                                             SamplingParams(max_tokens=8, ignore_eos=True, slo=SLOTarget("t", 60_000, 5_000))))
    core.step()
    eng = SimpleNamespace(stats=core.stats, request_snapshots=core.request_snapshots)
    snaps = core.request_snapshots()
    assert len(snaps) == 3 and all(isinstance(r, RequestSnapshot) for r in snaps)
    assert all(r.ttft_s == 60.0 and r.tpot_s == 5.0 and r.max_tokens == 8 for r in snaps)
    out = signal.replica_autoscaling_stats(eng)
    assert out[signal.M_SLO_REQS] == 3 and 0.0 <= out[signal.M_ATTAIN] <= 1.0
    assert out[signal.M_MAX_NUM_SEQS] == 4 and 0.0 < out[signal.M_KV] <= 1.0


def test_pin_replica_gpus_hides_gpus_from_a_replica_that_asked_for_none(monkeypatch):
    import ray

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert gpus.pin_replica_gpus() == []  # not inside a Ray actor: untouched
    assert gpus.os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"

    def ctx(gpus):
        return SimpleNamespace(get_actor_id=lambda: "actor", get_accelerator_ids=lambda: {"GPU": gpus})

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: ctx(["2"]))
    assert gpus.pin_replica_gpus() == ["2"]  # Ray already narrowed CUDA_VISIBLE_DEVICES to it
    monkeypatch.setattr(ray, "get_runtime_context", lambda: ctx([]))
    assert gpus.pin_replica_gpus() == []
    assert gpus.os.environ["CUDA_VISIBLE_DEVICES"] == ""
