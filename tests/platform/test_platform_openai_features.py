"""Structured outputs, tool calls and n > 1 through the official openai SDK, against
``serve run cluster-configs/local.yaml`` as the README starts it (random weights: only the
grammar makes the outputs valid)."""
import json
import time
from typing import Literal

import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from serve_app import ServeRun, local_config, wait_until  # noqa: E402

NAME = "tiny-qwen3"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int
    kind: Literal["cat", "dog", "bird"]
    vaccinated: bool
    tags: list[Literal["small", "loud", "old"]] = Field(max_length=3)


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
           "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer"}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 8}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    run = ServeRun(local_config(), tmp_path_factory.mktemp("openai-features"))
    try:
        run.wait_healthy()
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0, timeout=120)


# ---- structured outputs ----------------------------------------------------------------------
def test_parse_with_a_pydantic_model_for_20_seeds(client):
    for seed in range(20):
        done = client.chat.completions.parse(model=NAME, messages=MESSAGES, response_format=Pet, seed=seed,
                                             max_tokens=400)
        msg = done.choices[0].message
        assert isinstance(msg.parsed, Pet), msg.content
        assert done.choices[0].finish_reason == "stop"


def test_parse_streamed_for_20_seeds(client):
    for seed in range(20):
        with client.chat.completions.stream(model=NAME, messages=MESSAGES, response_format=Pet, seed=seed,
                                            max_tokens=400) as stream:
            done = stream.get_final_completion()
        assert isinstance(done.choices[0].message.parsed, Pet), done.choices[0].message.content


def test_json_object_regex_and_choice_on_completions(client):
    out = client.completions.create(model=NAME, prompt="a JSON object:", max_tokens=300, seed=1,
                                    extra_body={"response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop":  # free-form strings may run long with random weights
        assert isinstance(json.loads(out.choices[0].text), dict)
    out = client.completions.create(model=NAME, prompt="a code:", max_tokens=30, seed=2,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}})
    assert len(out.choices[0].text) == 7 and out.choices[0].text[2] == "-", out.choices[0].text
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=30, seed=3,
                                         extra_body={"guided_choice": ["sunny", "rainy", "snow"]})
    assert out.choices[0].message.content in ("sunny", "rainy", "snow")


# ---- tool calls ------------------------------------------------------------------------------
def _check_calls(calls, only: str | None = None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id
        assert c.function.name in SCHEMAS and (only is None or c.function.name == only)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", range(5))
def test_tool_choice_required_returns_valid_calls(client, seed):
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         seed=seed, max_tokens=400)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)


def test_tool_choice_required_streamed(client):
    for seed in range(5):
        stream = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                seed=seed, max_tokens=400, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for tc in ch.delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    entry["id"] = tc.id or entry["id"]
                    if tc.function is not None:
                        entry["name"] += tc.function.name or ""
                        entry["arguments"] += tc.function.arguments or ""
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            assert entry["id"] and entry["name"] in SCHEMAS
            jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_named_tool_choice_and_a_tool_round_trip(client):
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, seed=7, max_tokens=400,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = out.choices[0].message.tool_calls
    _check_calls(calls, only="get_time")
    call = calls[0]
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                              "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"time": "12:00"})}]
    again = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=8, seed=1)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, seed=1)
    assert not none.choices[0].message.tool_calls


# ---- n > 1 -----------------------------------------------------------------------------------
def _prefix_hit_tokens(app) -> int:
    replicas = requests.get(app.url + "/v1/kvray/replicas", timeout=10).json()["replicas"]
    return sum((r["stats"] or {}).get("engine", {}).get("prefix_hit_tokens", 0) for r in replicas.values())


def _settled(read, timeout_s: float = 20.0) -> int:
    value, deadline = read(), time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(1.0)
        again = read()
        if again == value:
            return value
        value = again
    raise AssertionError("the replicas' prefix stats kept changing")


def test_n_3_choices_share_one_prefill(app, client):
    prompt = " ".join(f"word{i}" for i in range(150))  # a prompt no other test sends
    before = _settled(lambda: _prefix_hit_tokens(app))  # the earlier tests' hits have been published
    out = client.completions.create(model=NAME, prompt=prompt, n=3, max_tokens=8, seed=5,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 24 and out.usage.total_tokens == out.usage.prompt_tokens + 24
    n_prompt = out.usage.prompt_tokens
    assert len({c.text for c in out.choices}) > 1  # seeds 5, 6, 7: different samples
    block = 16
    full = (n_prompt - 1) // block * block  # the full blocks before the last prompt token
    # the two later choices found the whole prompt but its last partial block cached: computed once
    wait_until(lambda: _prefix_hit_tokens(app) - before >= 2 * full, 20,
               f"prefix hits {_prefix_hit_tokens(app) - before}, expected >= {2 * full}")
    assert _settled(lambda: _prefix_hit_tokens(app)) - before <= 2 * n_prompt


def test_n_2_streamed_chat(client):
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, n=2, max_tokens=6, seed=1, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text = {0: "", 1: ""}
    finished, usage = set(), None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and all(text.values())
    assert usage.completion_tokens == 12


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}}}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}, "tool_choice"),
    ({"n": 0}, "n"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
])
def test_bad_input_is_a_400_in_the_openai_shape(app, body, param):
    r = requests.post(app.url + "/v1/chat/completions", timeout=30,
                      json={"model": NAME, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"], err
