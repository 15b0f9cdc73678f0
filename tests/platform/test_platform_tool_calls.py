"""tool_choice="required" and a named function through the official openai SDK, streamed and not,
for a model of each chat-template family: Hermes style (tiny-qwen3), Llama 3 JSON (tiny-llama),
and a template with no tool section at all (a copy of tiny-qwen3 with plain ChatML). With random
weights only the grammar makes the calls valid: every call's arguments must validate against its
tool's JSON schema, 10 times out of 10.

Each model is served by ``serve run`` as a user starts it (cluster-configs/local.yaml, its model
replaced). To run these tests on another model, add it to MODELS (one line: the real
SmolLM2 preset is ``("kvray:smollm2-135m-instruct", None)``: its ChatML template has no tools).
"""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from serve_app import ServeRun, local_config  # noqa: E402
from tool_models import no_tool_template_checkpoint  # noqa: E402

NO_TOOL_TEMPLATE = "no-tool-template"  # made by the fixture: tiny-qwen3 with a chat template without tools
MODELS = [  # (model, the tool-call format its chat template writes; None: none known)
    ("kvray:tiny-qwen3", "hermes"),
    ("kvray:tiny-llama", "llama3_json"),
    (NO_TOOL_TEMPLATE, None),  # required / named are enforced as a JSON array of calls
    ("kvray:smollm2-135m-instruct", None),  # the real model: a ChatML template with no tool section
]
# sampling per model: the random presets at temperature 1 (any token the grammar allows); the real
# model as its authors recommend (at temperature 1 the 135M model can repeat calls until max_tokens)
SAMPLING = {"kvray:smollm2-135m-instruct": {"temperature": 0.2, "top_p": 0.9}}
NAME = "m"
WARNING = "the chat template has no known tool-call format"

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
           "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
BOOKING = {"type": "object", "additionalProperties": False, "required": ["guests", "when", "vip"],
           "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 8},
                          "when": {"type": "object", "additionalProperties": False, "required": ["day"],
                                   "properties": {"day": {"enum": ["mon", "tue", "wed"]},
                                                  "hour": {"type": "integer", "minimum": 0, "maximum": 23}}},
                          "names": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                          "vip": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "description": "Book a table",
                                           "parameters": BOOKING}},
         {"type": "function", "function": {"name": "ping", "description": "Is the service up?"}}]
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING, "ping": {"type": "object", "properties": {}}}
MESSAGES = [{"role": "user", "content": "Book a table for two on Monday, and tell me the weather in Paris."}]
CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "book_table"}}}


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def app(request, tmp_path_factory):
    model, fmt = request.param
    if model == NO_TOOL_TEMPLATE:
        model = str(no_tool_template_checkpoint(tmp_path_factory.mktemp("ckpt") / "no-tool-template"))
    cfg = local_config()
    kvray_app = cfg["applications"][0]
    kvray_app["args"].update(model=model, served_model_name=NAME)
    kvray_app["args"]["engine"]["max_model_len"] = 4096  # the tiny presets' tokenizers spell the tools out long
    for d in kvray_app["deployments"]:
        d["num_replicas"] = 1
    run = ServeRun(cfg, tmp_path_factory.mktemp("tool-calls"))
    try:
        run.wait_healthy()
        run.tool_format = fmt
        run.sampling = SAMPLING.get(model, {"temperature": 1.0})
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check(calls, named: bool, single: bool):
    assert calls, "no tool calls"
    assert len({c.id for c in calls}) == len(calls)
    if named or single:
        assert len(calls) == 1
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name == "book_table" if named else c.function.name in SCHEMAS
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _request(app, which: str, seed: int) -> dict:
    parallel = seed % 2 == 0  # half of the runs ask for one call at most
    return dict(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice=CHOICES[which], seed=seed,
                max_tokens=1500, parallel_tool_calls=parallel, **app.sampling)


def _ten(one) -> None:
    """``one(seed)`` for seeds 0..9, sent at once as ten clients would (the engine batches them)."""
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(10)))  # re-raises the first failure


@pytest.mark.parametrize("which", CHOICES)
def test_forced_calls_validate_10_of_10(app, client, which):
    def one(seed):
        out = client.chat.completions.create(**_request(app, which, seed))
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert not choice.message.content
        _check(choice.message.tool_calls, which == "named", seed % 2 == 1)
    _ten(one)


@pytest.mark.parametrize("which", CHOICES)
def test_forced_calls_streamed_validate_10_of_10(app, client, which):
    def one(seed):
        finishes = []
        with client.chat.completions.stream(**_request(app, which, seed)) as stream:
            for event in stream:
                if event.type == "chunk":
                    finishes += [c.finish_reason for c in event.chunk.choices if c.finish_reason]
                    assert not any(c.delta.content for c in event.chunk.choices)
            done = stream.get_final_completion()
        assert finishes == ["tool_calls"]
        _check(done.choices[0].message.tool_calls, which == "named", seed % 2 == 1)
    _ten(one)


def test_auto_and_a_round_trip(app, client):
    """tool_choice auto: a template of no known format gives plain text (and the Router said so,
    once, when it started); a conversation with calls and tool results is accepted either way."""
    first = client.chat.completions.create(**{**_request(app, "named", 1), "max_tokens": 200})
    call = first.choices[0].message.tool_calls[0]
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                              "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"booked": True})}]
    again = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=12, seed=3,
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].finish_reason in ("length", "tool_calls")
    if app.tool_format is None:
        assert again.choices[0].message.tool_calls is None and again.choices[0].message.content
        assert app.output.count(WARNING) == 1, app.output[-3000:]
    else:
        assert WARNING not in app.output
