"""The APIs beside chat completions, through their official clients, against ``serve run`` of
``cluster-configs/local.yaml`` (random weights): the Responses API (openai SDK), Anthropic
Messages (anthropic SDK), echo with prompt log-probs (checked against transformers' teacher-
forced log-probs of the same checkpoint) and lm-eval-harness's ``local-completions`` scoring a
multiple-choice task, batched prompts, tokenize/detokenize, ``/v1/models/{id}``; API keys,
SLO classes and metrics on every new route; bad input answered in each API's error shape.

The config differs from local.yaml in three places, each for a check: one replica (a prefix
cache hit is known to be there), a 64-token step budget (prompts longer than one prefill
chunk) and an API key."""
import json
import re

import jsonschema
import pytest
import requests
import torch

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from serve_app import ServeRun, local_config, metric, wait_until  # noqa: E402

NAME, KEY, CHUNK = "tiny-qwen3", "test-key-apis", 64
AUTH = {"Authorization": f"Bearer {KEY}"}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}}
PET = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "age"],
       "properties": {"name": {"type": "string", "maxLength": 10}, "kind": {"enum": ["cat", "dog"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 30}}}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg = local_config()
    kv = cfg["applications"][0]
    kv["args"]["engine"]["max_num_batched_tokens"] = CHUNK
    kv["args"]["api_keys"] = [KEY]
    next(d for d in kv["deployments"] if d["name"] == "LLMReplica")["num_replicas"] = 1
    run = ServeRun(cfg, tmp_path_factory.mktemp("apis"), fast_metrics=True)
    try:
        run.wait_healthy()
        yield run.url
    finally:
        run.stop()


@pytest.fixture(scope="module")
def oai(app):
    return openai.OpenAI(base_url=app + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(app):
    return anthropic.Anthropic(base_url=app, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from kvray.replica.models.loader import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(f"kvray:{NAME}"), dtype=torch.float32).eval()


@torch.inference_mode()
def teacher_forced(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] log-probs: row i predicts token i + 1."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


# ---- Responses API ----------------------------------------------------------------------------
def test_responses_plain_and_streamed(oai):
    r = oai.responses.create(model=NAME, input="Say hello.", instructions="Be brief.", max_output_tokens=12,
                             temperature=0.7)
    assert r.object == "response" and r.status in ("completed", "incomplete") and isinstance(r.output_text, str)
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    events = list(oai.responses.create(model=NAME, input="Count to five.", max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    order = r"response\.created response\.in_progress response\.output_item\.added response\.content_part\.added " \
            r"(response\.output_text\.delta )*response\.output_text\.done response\.content_part\.done " \
            r"response\.output_item\.done response\.(completed|incomplete)"
    assert re.fullmatch(order, " ".join(kinds)), kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # the SDK's accumulator (it wants response.completed: a schema that ends before max_output_tokens)
    with oai.responses.stream(model=NAME, input="A pet?", max_output_tokens=200, text={"format": {
            "type": "json_schema", "name": "pet", "schema": PET, "strict": True}}) as stream:
        done = stream.get_final_response()
    assert done.usage.output_tokens > 0
    jsonschema.validate(json.loads(done.output_text), PET)


def test_responses_json_schema(oai):
    for seed in range(3):
        r = oai.responses.create(model=NAME, input="A pet as JSON.", max_output_tokens=200,
                                 text={"format": {"type": "json_schema", "name": "pet", "schema": PET, "strict": True}},
                                 extra_body={"seed": seed})
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), PET)


def test_responses_tools_required(oai):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER,
              "strict": True}]
    for seed in range(3):
        r = oai.responses.create(model=NAME, input="Weather in Paris?", tools=tools, tool_choice="required",
                                 max_output_tokens=200, extra_body={"seed": seed})
        calls = [o for o in r.output if o.type == "function_call"]
        assert r.status == "completed" and calls and calls[0].name == "get_weather", r.output
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # the next turn: the call and its output go back as input items
    nxt = oai.responses.create(model=NAME, max_output_tokens=8, tools=tools, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert nxt.status in ("completed", "incomplete")


# ---- Anthropic Messages -----------------------------------------------------------------------
def test_messages_plain_and_streamed(claude):
    m = claude.messages.create(model=NAME, max_tokens=12, system="Be brief.",
                               messages=[{"role": "user", "content": "Say hello."}])
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 12
    with claude.messages.stream(model=NAME, max_tokens=12, extra_body={"temperature": 0.5, "top_k": 20},
                                messages=[{"role": "user", "content": "Count to five."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_messages_tools_any(claude):
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
    for seed in range(3):
        m = claude.messages.create(model=NAME, max_tokens=200, tools=tools, tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body={"seed": seed})
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", m
        jsonschema.validate(uses[0].input, WEATHER)
    with claude.messages.stream(model=NAME, max_tokens=200, tools=tools, tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    jsonschema.validate(next(b for b in final.content if b.type == "tool_use").input, WEATHER)


# ---- prompt log-probs, batched prompts, lm-eval -----------------------------------------------
def test_echoed_prompt_logprobs_are_the_teacher_forced_ones(app, hf):
    """A 150-token prompt (three prefill chunks), echoed with its log-probs: without a prefix
    cache hit, then with the whole prompt in the cache (it is recomputed: same values)."""
    prompt = torch.randint(0, hf.config.vocab_size - 8, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = teacher_forced(hf, prompt)

    def echo(**extra):
        body = {"model": NAME, "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0, "prompt_logprobs": 3,
                **extra}
        r = requests.post(app + "/v1/completions", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def cached() -> int:
        r = requests.post(app + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1},
                          headers=AUTH, timeout=120)
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    outs = [echo()]
    assert cached() == 144  # that prompt's full blocks are in the cache now: the next echo has a hit to skip
    outs.append(echo())
    for out in outs:
        c = out["choices"][0]
        assert out["usage"] == {"prompt_tokens": 150, "completion_tokens": 0, "total_tokens": 150,
                                "prompt_tokens_details": {"cached_tokens": 0}}
        lps = c["logprobs"]["token_logprobs"]
        assert lps[0] is None and len(lps) == 150
        want = ref.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(lps[1:]), want, atol=1e-4, rtol=0)
        plp = c["prompt_logprobs"]
        for i in range(1, 150):  # the top 3 by token id, and the prompt token
            top_v, top_i = ref[i - 1].topk(3)
            got = {int(t): v["logprob"] for t, v in plp[i].items()}
            assert set(got) == set(top_i.tolist()) | {prompt[i]}
            assert all(abs(got[t] - ref[i - 1, t].item()) < 1e-4 for t in got)
            assert max(c["logprobs"]["top_logprobs"][i].values()) == pytest.approx(top_v[0].item(), abs=1e-4)


def test_batched_prompts_8_times_n_2(oai, app):
    prompts = [f"Prompt {i}: the colour of the sky is" for i in range(8)]
    out = oai.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=3, echo=True, temperature=1.0, seed=7,
                                 extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(16))
    for k, c in enumerate(out.choices):
        assert c.text.startswith(prompts[k // 2]) and c.finish_reason == "length"
    counts = [requests.post(app + "/tokenize", json={"prompt": p}, headers=AUTH, timeout=30).json()["count"]
              for p in prompts]
    assert out.usage.prompt_tokens == sum(counts) and out.usage.completion_tokens == 16 * 3
    assert out.usage.total_tokens == sum(counts) + 48
    again = oai.completions.create(model=NAME, prompt=prompts[3], n=2, max_tokens=3, echo=True, seed=7,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [out.choices[6].text, out.choices[7].text]  # seeds replay per prompt


def test_lm_eval_local_completions_scores_a_multiple_choice_task(app, hf, tmp_path, monkeypatch):
    """lm-eval-harness's ``local-completions`` model (remote tokenizer, batches of 3 prompts)
    scores a 6-question task written here; every log-likelihood it got is the teacher-forced one."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [{"question": f"Question {i}: which word comes next after {w}?", "choices": ["red", "green", "blue"],
             "answer": i % 3} for i, w in enumerate(["apple", "grass", "sky", "rose", "leaf", "sea"])]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "kvray_mc.yaml").write_text(
        "task: kvray_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = lm_eval.simple_evaluate(
        model="local-completions", tasks=["kvray_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"base_url={app}/v1/completions,model={NAME},auth_token={KEY},batch_size=3,max_retries=1",
        log_samples=True)
    acc = res["results"]["kvray_mc"]["acc,none"]
    samples = res["samples"]["kvray_mc"]
    assert len(samples) == 6 and 0.0 <= acc <= 1.0
    tok = hf_tokenizer()
    right = 0
    for s in samples:
        ref = []
        for (context, continuation), (ll, _greedy) in zip(s["arguments"], [r[0] for r in s["resps"]]):
            ctx = tok(context, add_special_tokens=False).input_ids
            ids = ctx + tok(continuation, add_special_tokens=False).input_ids
            lp = teacher_forced(hf, ids)
            want = sum(lp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids)))
            assert abs(ll - want) < 1e-3, (ll, want)
            ref.append(want)
        right += max(range(3), key=lambda i: ref[i]) == s["doc"]["answer"]
    assert acc == pytest.approx(right / 6)


def hf_tokenizer():
    from kvray.replica.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(f"kvray:{NAME}"))


# ---- tokenize, models, keys, SLO classes, errors, metrics -------------------------------------
def test_tokenize_detokenize_and_models_retrieve(app, oai):
    r = requests.post(app + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}, headers=AUTH)
    out = r.json()
    assert r.status_code == 200 and out["count"] == len(out["tokens"]) and len(out["token_strs"]) == out["count"]
    back = requests.post(app + "/detokenize", json={"tokens": out["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "hello world"}
    chat = requests.post(app + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert chat.status_code == 200 and chat.json()["count"] > out["count"]
    model = oai.models.retrieve(NAME)
    assert model.id == NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    info = requests.get(app + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] and info["model_max_length"] == 2048


ROUTES = [("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2}),
          ("POST", "/v1/messages", {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
          ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
          ("GET", f"/v1/models/{NAME}", None), ("GET", "/tokenizer_info", None)]


def anthropic_shaped(r) -> bool:
    body = r.json()
    return body.get("type") == "error" and set(body["error"]) == {"type", "message"}


def openai_shaped(r) -> bool:
    return set(r.json().get("error", {})) == {"message", "type", "param", "code"}


def test_api_keys_slo_classes_and_metrics_on_every_new_route(app):
    for method, path, body in ROUTES:
        r = requests.request(method, app + path, json=body, timeout=60)
        assert r.status_code == 401, path
        assert anthropic_shaped(r) if path == "/v1/messages" else openai_shaped(r), r.text
        ok = requests.request(method, app + path, json=body, headers=AUTH, timeout=60)
        assert ok.status_code == 200, (path, ok.text)
    r = requests.post(app + "/v1/messages", json=ROUTES[1][2], headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200  # Anthropic's clients send the key this way
    for _, path, body in ROUTES[:2]:
        assert requests.post(app + path, json=body, headers={**AUTH, "x-slo-class": "batch"}).status_code == 200
        bad = requests.post(app + path, json=body, headers={**AUTH, "x-slo-class": "gold"})
        assert bad.status_code == 400 and (anthropic_shaped(bad) if "messages" in path else openai_shaped(bad))
    counted = [(e, "200") for e in ("responses", "messages", "tokenize", "detokenize")] + [
        ("messages", "400"), ("responses", "400"), ("messages", "401")]
    for endpoint, status in counted:
        wait_until(lambda: metric(app, "kvray_requests_total", headers=AUTH, endpoint=endpoint, status=status) >= 1,
                   60, f"no {status} counted for {endpoint}")


BAD = [("/v1/responses", b"{nope", openai_shaped), ("/v1/responses", {"input": "x", "store": True}, openai_shaped),
       ("/v1/responses", {"input": "x", "previous_response_id": "resp_x"}, openai_shaped),
       ("/v1/responses", {"input": "x", "tools": [{"type": "file_search"}]}, openai_shaped),
       ("/v1/responses", {"input": [{"role": "robot", "content": "x"}]}, openai_shaped),
       ("/v1/messages", {"model": NAME, "messages": []}, anthropic_shaped),
       ("/v1/messages", {"model": NAME, "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
        anthropic_shaped),
       ("/v1/messages", b"[]", anthropic_shaped), ("/tokenize", {"prompt": ["a"]}, openai_shaped),
       ("/detokenize", {"tokens": [10 ** 9]}, openai_shaped),
       ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "max_tokens": -1}, openai_shaped),
       ("/v1/completions", {"model": NAME, "prompt": [[1, 2], []]}, openai_shaped)]


def test_bad_input_is_a_4xx_in_each_apis_shape_and_the_app_keeps_serving(app, oai, claude):
    for path, body, shaped in BAD:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        r = requests.post(app + path, headers={**AUTH, "content-type": "application/json"}, timeout=60, **kw)
        assert 400 <= r.status_code < 500 and shaped(r), (path, body, r.status_code, r.text)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=NAME, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 3})
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=NAME, input="x", background=True)
    assert oai.responses.create(model=NAME, input="still there?", max_output_tokens=3).usage.output_tokens > 0
    assert claude.messages.create(model=NAME, max_tokens=3, messages=[{"role": "user", "content": "x"}]).usage
