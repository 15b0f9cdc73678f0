"""The Router's other APIs without Ray, on scripted replica streams: batched completion prompts,
echo with prompt log-probs, the Responses API, Anthropic Messages, tokenize/detokenize; their
shapes, their 400s in each API's error shape, and admission for every prompt of a request."""
import json

import pytest

from kvray.frontend.prepare import ModelInfo
from kvray.records import TokenBatch
from kvray.replica.models.loader import load_tokenizer, resolve_model
from kvray.router.policy import DISPATCH, REJECT, Decision, RoutingPolicy
from tests.frontend.grammar_shape import calls_of
from tests.frontend.test_serving import FakeStream, body_of, run, serving

TOOL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("kvray:tiny-qwen3"))


def scripted(tok, script):
    """A serving loop whose replica answers each request with ``script(prompt_ids, params)``'s
    batches; ``calls`` records (request id, prompt ids, params, hint)."""
    s, calls, metrics = serving(tok, lambda: None, info=ModelInfo(tok, 4096, 16, len(tok)))  # room for tools

    class Scripted:
        def send(self, hint, ids, params, on_bound=None):
            calls.append((hint.request_id, ids, params, hint))
            return FakeStream(script(ids, params))

    s.sender.client = Scripted()
    return s, calls, metrics


def post(s, kind, body):
    resp = run(s.handle(kind, json.dumps(body).encode() if not isinstance(body, bytes) else body, {}))
    raw = run(body_of(resp))
    return resp.status_code, raw


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines and lines["data"] != "[DONE]":
            out.append((lines.get("event"), json.loads(lines["data"])))
    return out


def text_batches(tok, text, finish="stop", stop_reason=None):
    ids = tok(text).input_ids
    return [TokenBatch(ids[:2]), TokenBatch(ids[2:], finish_reason=finish, stop_reason=stop_reason)]


# ---- completions: batched prompts, echo ------------------------------------------------------
def test_batched_prompts_times_n_in_order_with_usage_that_adds_up(tok):
    prompts = [f"prompt number {i}" for i in range(8)]
    s, calls, _ = scripted(tok, lambda ids, p: [TokenBatch([ids[-1]] * 3, finish_reason="length")])
    status, raw = post(s, "completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "seed": 11})
    out = json.loads(raw)
    assert status == 200 and [c["index"] for c in out["choices"]] == list(range(16))
    ids = [tok(p).input_ids for p in prompts]
    for k, c in enumerate(out["choices"]):  # choice k answers prompt k // 2 (its last token, three times)
        assert c["text"] == tok.decode([ids[k // 2][-1]] * 3)
    assert [c[1] for c in calls] == [ids[k // 2] for k in range(16)]
    assert [c[2].seed for c in calls] == [11, 12] * 8  # each prompt's samples: seed + j
    assert len({c[0] for c in calls}) == 16
    u = out["usage"]
    assert u["prompt_tokens"] == sum(map(len, ids)) and u["completion_tokens"] == 48
    assert u["total_tokens"] == u["prompt_tokens"] + 48


def test_echo_with_logprobs_and_max_tokens_zero(tok):
    def script(ids, params):
        assert params.prompt_logprobs == 2 and params.max_tokens == 1
        plp = [None] + [{t: -0.5 - i, 9: -0.1, 8: -0.2, 7: -3.0} for i, t in enumerate(ids[1:])]
        return [TokenBatch([9], [-0.1], [{9: -0.1, 8: -0.2}], "length", prompt_logprobs=plp)]

    s, calls, _ = scripted(tok, script)
    status, raw = post(s, "completions", {"prompt": "abc def " * 10, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert status == 200 and calls[-1][3].block_hashes == []  # its prompt is computed whole: no prefix hits
    status, raw = post(s, "completions", {"prompt": "abc def", "echo": True, "logprobs": 2, "max_tokens": 0})
    c = json.loads(raw)["choices"][0]
    ids = tok("abc def").input_ids
    assert status == 200 and c["text"] == "abc def" and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["token_logprobs"] == [None] + [-0.5 - i for i in range(len(ids) - 1)]
    assert lp["tokens"] == [tok.decode([t]) for t in ids] and lp["top_logprobs"][0] is None
    # top 2 (ids 9 and 8) and the prompt token itself, per position
    assert all(set(d) == {tok.decode([9]), tok.decode([8]), tok.decode([t])}
               for d, t in zip(lp["top_logprobs"][1:], ids[1:]))
    assert lp["text_offset"][0] == 0 and json.loads(raw)["usage"]["completion_tokens"] == 0
    # with tokens generated: the echo, then the completion, offsets running on
    status, raw = post(s, "completions", {"prompt": "abc def", "echo": True, "logprobs": 2, "max_tokens": 1})
    c = json.loads(raw)["choices"][0]
    assert c["text"] == "abc def" + tok.decode([9]) and c["logprobs"]["token_logprobs"][-1] == -0.1
    assert c["logprobs"]["text_offset"][-1] == len("abc def")
    assert post(s, "completions", {"prompt": "x", "max_tokens": 0})[0] == 400  # 0 only with echo


def test_prompt_logprobs_field_as_vllm(tok):
    def script(ids, params):
        plp = [None] + [{t: -1.0, 5: -0.5} for t in ids[1:]]
        return [TokenBatch([5], finish_reason="length", prompt_logprobs=plp)]

    s, calls, _ = scripted(tok, script)
    status, raw = post(s, "completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1})
    plp = json.loads(raw)["choices"][0]["prompt_logprobs"]
    assert status == 200 and plp[0] is None and calls[0][2].prompt_logprobs == 1
    assert plp[1] == {"5": {"logprob": -0.5, "rank": 1, "decoded_token": tok.decode([5])},
                      "2": {"logprob": -1.0, "rank": None, "decoded_token": tok.decode([2])}}
    assert post(s, "completions", {"prompt": "x", "prompt_logprobs": 21})[0] == 400


def test_every_prompt_is_admitted_and_a_refusal_releases_the_others(tok):
    class SecondRefused(RoutingPolicy):
        name = "second-refused"

        def __init__(self):
            self.n = 0

        def decide(self, request, book, now):
            self.n += 1
            return Decision(REJECT, retry_after_s=1) if self.n == 2 else Decision(DISPATCH, ("r1",))

    s, calls, _ = scripted(tok, lambda ids, p: [TokenBatch([1], finish_reason="length")])
    s.dispatcher.policy = SecondRefused()
    status, raw = post(s, "completions", {"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert status == 429 and not calls
    assert s.dispatcher.book.replicas["r1"].num_ongoing == 0  # the first prompt's reservation is gone
    assert post(s, "completions", {"prompt": ["a", "b"], "max_tokens": 1})[0] == 200


# ---- Responses API ----------------------------------------------------------------------------
def test_responses_plain_and_streamed(tok):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, " the answer"))
    body = {"model": "tiny", "input": "question?", "instructions": "be brief", "max_output_tokens": 7,
            "temperature": 0.5, "metadata": {"k": "v"}}
    status, raw = post(s, "responses", body)
    out = json.loads(raw)
    assert status == 200 and out["object"] == "response" and out["status"] == "completed"
    assert out["output"][0]["content"][0]["text"] == " the answer" and out["metadata"] == {"k": "v"}
    params = calls[0][2]
    assert params.max_tokens == 7 and params.temperature == 0.5
    assert "be brief" in tok.decode(calls[0][1]) and "question?" in tok.decode(calls[0][1])
    assert out["usage"]["input_tokens"] == len(calls[0][1]) and out["usage"]["output_tokens"] == len(
        tok(" the answer").input_ids)
    status, raw = post(s, "responses", {**body, "stream": True})
    events = sse_events(raw)
    assert [e for e, _ in events] == [d["type"] for _, d in events]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    kinds = [e for e, _ in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(d["delta"] for e, d in events if e == "response.output_text.delta") == " the answer"
    assert events[-1][1]["response"]["output"] == [events[-2][1]["item"]]


def test_responses_function_calls_and_length(tok):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, TOOL_TEXT))
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    status, raw = post(s, "responses", {"input": "weather?", "tools": tools, "tool_choice": "required"})
    item = json.loads(raw)["output"][0]
    assert status == 200 and item["type"] == "function_call" and item["name"] == "get_weather"
    assert json.loads(item["arguments"]) == {"city": "Paris", "unit": "c"} and item["call_id"].startswith("call_")
    assert calls[0][2].structured_outputs.kind == "structural_tag"  # required: enforced by the grammar
    tools2 = tools + [{"type": "function", "name": "get_time", "parameters": {"type": "object"}}]
    for choice, parallel, names, single in [("required", False, {"get_weather", "get_time"}, True),
                                            ({"type": "function", "name": "get_time"}, None, {"get_time"}, True),
                                            ("required", None, {"get_weather", "get_time"}, False)]:
        body = {"input": "?", "tools": tools2, "tool_choice": choice,
                **({"parallel_tool_calls": parallel} if parallel is not None else {})}
        assert post(s, "responses", body)[0] == 200
        fmt = json.loads(calls[-1][2].structured_outputs.structural_tag)["format"]
        tags, most = calls_of(fmt)
        assert {t["begin"].split('"name": "')[1].split('"')[0] for t in tags} == names
        assert (most == 1) is single
    assert post(s, "responses", {"input": "?", "tools": tools, "tool_choice": "none"})[0] == 200
    assert calls[-1][2].structured_outputs is None
    status, raw = post(s, "responses", {"input": "weather?", "tools": tools, "stream": True})
    kinds = [e for e, _ in sse_events(raw)]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    # an earlier turn's call and its output go back to the template
    history = [{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny and 21"}]
    assert post(s, "responses", {"input": history, "tools": tools})[0] == 200
    assert "sunny and 21" in tok.decode(calls[-1][1]) and "Oslo" in tok.decode(calls[-1][1])
    s2, _, _ = scripted(tok, lambda ids, p: text_batches(tok, " cut", finish="length"))
    out = json.loads(post(s2, "responses", {"input": "x", "max_output_tokens": 2})[1])
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "web_search_preview"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),  # past the context
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, "text.format"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "missing"}, "tools": [
        {"type": "function", "name": "f"}]}, "tool_choice"),
    ({"input": 3}, "input"),
])
def test_responses_bad_input_is_a_400_naming_the_field(tok, body, param):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, " ok"))
    status, raw = post(s, "responses", body)
    err = json.loads(raw)["error"]
    assert status == 400 and set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert not calls and post(s, "responses", {"input": "x"})[0] == 200


# ---- Anthropic Messages -----------------------------------------------------------------------
def test_messages_plain_streamed_and_stop_reasons(tok):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, " hi there STOP more", finish="length"))
    body = {"model": "tiny", "max_tokens": 9, "system": [{"type": "text", "text": "sys prompt"}], "top_k": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "stop_sequences": ["STOP"]}
    status, raw = post(s, "messages", body)
    out = json.loads(raw)
    assert status == 200 and out["type"] == "message" and out["content"] == [{"type": "text", "text": " hi there "}]
    assert out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == "STOP"
    p = calls[0][2]
    assert p.max_tokens == 9 and p.top_k == 5 and p.stop == ["STOP"] and "sys prompt" in tok.decode(calls[0][1])
    events = sse_events(post(s, "messages", {**body, "stream": True})[1])
    kinds = [e for e, _ in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start" and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert {e for e in kinds[2:-3]} == {"content_block_delta"}
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    s2, _, _ = scripted(tok, lambda ids, p: text_batches(tok, " cut", finish="length"))
    assert json.loads(post(s2, "messages", body)[1])["stop_reason"] == "max_tokens"


def test_messages_tool_use(tok):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, TOOL_TEXT))
    tools = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER}]
    body = {"model": "tiny", "max_tokens": 60, "tools": tools, "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "weather?"}]}
    out = json.loads(post(s, "messages", body)[1])
    assert out["stop_reason"] == "tool_use" and out["content"][0]["type"] == "tool_use"
    assert out["content"][0]["input"] == {"city": "Paris", "unit": "c"} and out["content"][0]["id"].startswith("toolu_")
    assert calls[0][2].structured_outputs.kind == "structural_tag"
    for choice, single in [({"type": "tool", "name": "get_weather"}, True),
                           ({"type": "any", "disable_parallel_tool_use": True}, True), ({"type": "any"}, False)]:
        assert post(s, "messages", {**body, "tool_choice": choice})[0] == 200
        assert (calls_of(json.loads(calls[-1][2].structured_outputs.structural_tag)["format"])[1] == 1) is single
    for choice in ({"type": "none"}, {"type": "auto"}):
        assert post(s, "messages", {**body, "tool_choice": choice})[0] == 200
        assert calls[-1][2].structured_outputs is None
    events = sse_events(post(s, "messages", {**body, "stream": True})[1])
    start = next(d for e, d in events if e == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    args = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta")
    assert json.loads(args) == {"city": "Paris", "unit": "c"}
    history = body["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Rome", "unit": "c"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rainy, 12"}]}]
    assert post(s, "messages", {**body, "messages": history, "tool_choice": {"type": "auto"}})[0] == 200
    assert "rainy, 12" in tok.decode(calls[-1][1]) and "Rome" in tok.decode(calls[-1][1])


@pytest.mark.parametrize("body,status", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 400),  # no model
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, 400),  # no max_tokens
    ({"model": "other", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    ({"model": "tiny", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, 400),
    ({"model": "tiny", "max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": 10},
      "messages": [{"role": "user", "content": "x"}]}, 400),
    ({"model": "tiny", "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "x"}]}, 400),
    (b"{not json", 400),
])
def test_messages_errors_have_anthropics_shape(tok, body, status):
    s, calls, _ = scripted(tok, lambda ids, p: text_batches(tok, " ok"))
    got, raw = post(s, "messages", body)
    out = json.loads(raw)
    assert got == status and out["type"] == "error" and set(out["error"]) == {"type", "message"}, out
    assert out["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    ok = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert not calls and post(s, "messages", ok)[0] == 200


def test_admission_429_on_the_new_routes(tok):
    class Never(RoutingPolicy):
        name = "never"

        def decide(self, request, book, now):
            return Decision(REJECT, retry_after_s=3)

    s, calls, metrics = scripted(tok, lambda ids, p: text_batches(tok, " ok"))
    s.dispatcher.policy = Never()
    resp = run(s.handle("messages", json.dumps({"model": "tiny", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"}]}).encode(), {}))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert json.loads(resp.body)["error"]["type"] == "rate_limit_error"
    resp = run(s.handle("responses", b'{"input": "x"}', {"x-slo-class": "interactive"}))
    assert resp.status_code == 429 and json.loads(resp.body)["error"]["code"] == "slo_unattainable"
    assert metrics.sink.total("kvray_requests_total", endpoint="messages", status="429") == 1
    assert metrics.sink.total("kvray_requests_total", endpoint="responses", status="429") == 1
    assert run(s.handle("responses", b'{"input": "x"}', {"x-slo-class": "gold"})).status_code == 400


# ---- tokenize / detokenize --------------------------------------------------------------------
def test_tokenize_and_detokenize(tok):
    s, _, metrics = scripted(tok, lambda ids, p: [])
    status, raw = post(s, "tokenize", {"prompt": "hello world", "return_token_strs": True})
    out = json.loads(raw)
    assert status == 200 and out["tokens"] == tok("hello world").input_ids and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 4096 and out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    msgs = [{"role": "user", "content": "hi"}]
    chat = json.loads(post(s, "tokenize", {"messages": msgs})[1])
    assert chat["tokens"] == tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                 add_special_tokens=False).input_ids
    assert json.loads(post(s, "detokenize", {"tokens": out["tokens"]})[1]) == {"prompt": "hello world"}
    for kind, bad in [("tokenize", {"prompt": 5}), ("tokenize", {}), ("detokenize", {"tokens": [-1]}),
                      ("detokenize", {"tokens": "abc"}), ("tokenize", {"model": "nope", "prompt": "x"}),
                      ("tokenize", {"messages": []}), ("detokenize", b"[1, 2")]:
        status, raw = post(s, kind, bad)
        assert status in (400, 404) and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert metrics.sink.total("kvray_requests_total", endpoint="tokenize", status="200") == 2
