"""The application config model, the OpenAI request models, and build_app's deployment defaults."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from kvray.app_config import AppArgs, ConfigError, EngineArgs, parse_args
from kvray.frontend.body import parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.protocol import ChatCompletionRequest, CompletionRequest
from kvray.replica.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_derived_fields():
    a = parse_args({"model": "kvray:tiny-qwen3"})
    assert a.served_model_name == "kvray:tiny-qwen3"
    assert a.default_slo_class == "interactive" and set(a.slo_classes) == {"interactive", "batch"}
    assert a.router.policy == "least_load"
    assert a.engine_options() == {}
    assert a.engine_config() == EngineConfig(model="kvray:tiny-qwen3")


def test_engine_args_mirror_engine_config():
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    assert set(EngineArgs.model_fields) == names
    a = parse_args({"model": "m", "engine": {"max_num_seqs": 64, "max_model_len": 512, "enable_prefix_caching": False}})
    assert a.engine_options() == {"max_num_seqs": 64, "max_model_len": 512, "enable_prefix_caching": False}


@pytest.mark.parametrize("args, names", [
    ({"model": "m", "bogus_key": 1}, "args.bogus_key"),
    ({"model": "m", "engine": {"max_num_seqz": 3}}, "args.engine.max_num_seqz"),
    ({"model": "m", "engine": {"max_num_seqs": "64"}}, "args.engine.max_num_seqs"),
    ({"model": "m", "engine": {"block_size": 17}}, "block_size"),
    ({"model": "m", "engine": {"scheduling_policy": "lottery"}}, "scheduling_policy"),
    ({"model": "m", "default_slo_class": "gold"}, "default_slo_class"),
    ({"model": "m", "slo_classes": {"a": {"ttft_ms": 0, "tpot_ms": 5}}}, "args.slo_classes.a.ttft_ms"),
    ({"model": "m", "slo_classes": {"a": {"ttft_ms": 1, "tpot_ms": 5, "extra": 1}}}, "args.slo_classes.a.extra"),
    ({"model": "m", "slo_classes": {}}, "slo_classes"),
    ({"model": "m", "slo_classes": {"custom": {"ttft_ms": 1, "tpot_ms": 1}}}, "custom"),
    ({"model": "m", "router": {"policy": "slo"}}, "router.policy"),
    ({"model": "m", "router": {"policy_options": {"nope": 1}}}, "router.policy_options"),
    ({"model": "m", "router": {"poliy": "least_load"}}, "args.router.poliy"),
    ({"model": "m", "graceful_shutdown_timeout_s": -1}, "args.graceful_shutdown_timeout_s"),
    ({"engine": {}}, "args.model"),
    ({"model": ""}, "args.model"),
])
def test_bad_args_name_the_field(args, names):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert names in str(e.value)


def test_args_must_be_a_mapping():
    with pytest.raises(ConfigError):
        parse_args(["model"])
    assert isinstance(parse_args(AppArgs(model="m")), AppArgs)


def test_cluster_configs_validate():
    from ray.serve.schema import ServeDeploySchema

    for name, gpus in (("local.yaml", 0), ("gpu.yaml", 1)):
        cfg = yaml.safe_load((ROOT / "cluster-configs" / name).read_text())
        ServeDeploySchema.model_validate(cfg)
        app = cfg["applications"][0]
        assert app["import_path"] == "kvray.platform:build_app"
        parse_args(app["args"])
        deps = {d["name"]: d for d in app["deployments"]}
        assert set(deps) == {"LLMReplica", "Router"}
        assert deps["LLMReplica"]["ray_actor_options"]["num_gpus"] == gpus
    local = yaml.safe_load((ROOT / "cluster-configs" / "local.yaml").read_text())["applications"][0]
    assert local["args"]["model"] == "kvray:smollm2-135m-instruct" and local["deployments"][0]["num_replicas"] == 2


def test_build_app_sets_overridable_defaults():
    pytest.importorskip("ray")
    from kvray.platform.app import build_app, replica_options
    from kvray.router.serve_router import KVRayRequestRouter

    a = parse_args({"model": "m", "engine": {"max_num_seqs": 32}, "router": {"stats_period_s": 2}})
    opts = replica_options(a)
    # the engine's batch + its bounded queue (default max_num_seqs) + token-channel room: the engine's own
    # queue limit answers (429) before Serve would hold a request at the handle
    assert opts["max_ongoing_requests"] == 32 + 32 + 32 and "num_replicas" not in opts and "autoscaling_config" not in opts
    assert replica_options(parse_args({"model": "m", "engine": {"max_num_seqs": 32, "max_queued_requests": 8}}))[
        "max_ongoing_requests"] == 32 + 8 + 32
    rc = opts["request_router_config"]
    assert rc.get_request_router_class().__name__ == KVRayRequestRouter.__name__
    assert not rc.request_router_kwargs  # the Router decides every route: the plug-in takes no policy
    assert rc.request_routing_stats_period_s == 2
    assert build_app({"model": "m"}) is not None
    with pytest.raises(ConfigError, match="args.nope"):
        build_app({"model": "m", "nope": 1})


# ---- OpenAI request models ----------------------------------------------------------------------
@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "0"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stream": "true"}, 400, "stream"),
    ({"prompt": {"a": 1}}, 400, "prompt"),
    ({}, 400, "prompt"),
])
def test_completion_request_errors(body, status, param):
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, body)
    assert (e.value.status, e.value.param) == (status, param)
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_request_errors(body, param):
    with pytest.raises(APIError) as e:
        parse_request(ChatCompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param


def test_requests_accept_what_clients_send():
    r = parse_request(CompletionRequest, {"model": "m", "prompt": [[1, 2, 3]], "temperature": 0, "top_p": 1,
                                          "stream": True, "stream_options": {"include_usage": True}, "seed": 3,
                                          "stop": "x", "frequency_penalty": 0, "user": "u", "unknown_extra": 1})
    assert r.include_usage and r.prompt == [[1, 2, 3]]
    c = parse_request(ChatCompletionRequest, {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                      {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2})
    assert c.requested_max_tokens == 7 and c.messages[1].text() == "ab"
    with pytest.raises(APIError):
        parse_request(CompletionRequest, ["not", "an", "object"])
