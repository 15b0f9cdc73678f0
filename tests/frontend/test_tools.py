"""Tool calls: the presets' chat templates with tools, the tool-call parsers (whole and streamed),
request validation, and tool_choice enforced by the structural-tag grammar (driven with random
allowed tokens, as a random-weight model would)."""
import asyncio
import json
import random

import jsonschema
import pytest

from kvray.frontend import tools as T
from kvray.frontend.prepare import ModelInfo, prepare
from kvray.frontend.protocol import APIError, ChatCompletionRequest, parse_request
from kvray.replica.models import bpe
from kvray.replica.models.loader import load_tokenizer
from kvray.replica.models.presets import ensure_preset
from kvray.slo import SLOTarget

# The templates as they were before tools: rendering without tools must not change by a byte.
OLD_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
OLD_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"]}
BOOKING = {"type": "object", "properties": {
    "guests": {"type": "integer", "minimum": 1, "maximum": 9},
    "names": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "when": {"type": "object", "properties": {"day": {"type": "string", "enum": ["mon", "tue"]},
                                              "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
             "required": ["day", "hour"]},
    "vip": {"type": "boolean"}}, "required": ["guests", "names", "when", "vip"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "parameters": BOOKING}},
         {"type": "function", "function": {"name": "ping"}}]
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING, "ping": T.NO_ARGUMENTS}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(ensure_preset("tiny-qwen3"))


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer(ensure_preset("tiny-llama"))


# ---- templates ------------------------------------------------------------------------------
PLAIN = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 👋"}],
    [{"role": "developer", "content": " padded \n"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n\n"}],
    [{"role": "assistant", "content": ""}, {"role": "user", "content": "x", "name": "bob"}],
]


@pytest.mark.parametrize("which", ["qwen", "llama"])
@pytest.mark.parametrize("gen", [True, False])
def test_templates_without_tools_render_as_before(which, gen, request):
    tok = request.getfixturevalue(which)
    old = OLD_CHATML if which == "qwen" else OLD_LLAMA3
    assert tok.chat_template == (bpe.CHATML_TEMPLATE if which == "qwen" else bpe.LLAMA3_TEMPLATE)
    for msgs in PLAIN:
        new = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert new == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=old)
        assert new == tok.apply_chat_template(msgs, tools=None, tokenize=False, add_generation_prompt=gen)


def _round_trip(args_as_text=False):
    args = {"city": "Paris", "unit": "c"}
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps(args) if args_as_text else args}},
                {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "pong"},
            {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}]


def test_chatml_template_with_tools(qwen):
    text = qwen.apply_chat_template(_round_trip(), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    head = ("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
            "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
    assert text.startswith(head)
    listing = text[len(head):text.index("\n</tools>")].split("\n")
    assert [json.loads(t) for t in listing] == TOOLS
    assert ('</tools>\n\nFor each function call, return a json object with function name and arguments within '
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n') in text
    assert text.count("<|im_start|>system") == 1
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\npong\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\nIt is 21 C.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n")
    # the assistant's calls render exactly as the parser reads them back
    block = text[text.index("<|im_start|>assistant\n") + 22:text.index("<|im_end|>", text.index("<tool_call>\n{\"name\": \"get"))]
    content, calls = T.parse_tool_calls(block, T.HERMES, TOOLS)
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("ping", {})]
    # arguments given as JSON text render the same; no system message: the tools block stands alone
    assert text == qwen.apply_chat_template(_round_trip(True), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    alone = qwen.apply_chat_template(_round_trip()[1:2], tools=TOOLS[:1], tokenize=False, add_generation_prompt=True)
    assert alone.startswith("<|im_start|>system\n# Tools\n\n") and "Be brief" not in alone
    assert T.template_family(qwen) == T.HERMES


def test_llama3_template_with_tools(llama):
    text = llama.apply_chat_template(_round_trip()[:5], tools=TOOLS[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n"
                           "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following "
                           "functions, please respond with a JSON for a function call with its proper arguments that "
                           "best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                           "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n")
    assert json.dumps(TOOLS[0], indent=4) + "\n\nWeather?<|eot_id|>" in text
    assert text.endswith(
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris", '
        '"unit": "c"}}; {"name": "ping", "parameters": {}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\npong<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    reply = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    content, calls = T.parse_tool_calls(reply, T.LLAMA3, TOOLS)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "ping"]
    # tools in the system turn instead
    sys_ = llama.apply_chat_template(_round_trip()[:2], tools=TOOLS[:1], tokenize=False, add_generation_prompt=True,
                                     tools_in_user_message=False)
    assert "Environment: ipython\n\nYou have access to the following functions." in sys_
    assert sys_.endswith("Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert T.template_family(llama) == T.LLAMA3 and T.template_family("{{ messages }}") is None


# ---- parsing --------------------------------------------------------------------------------
HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "unit": "c"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "book_table", "arguments": {"guests": 2, "names": ["</tool_call>"], '
               '"when": {"day": "mon", "hour": 9}, "vip": false}}\n</tool_call>\n')
LLAMA_TEXT = '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}; {"name": "ping", "arguments": {}}'


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_hermes():
    content, calls = T.parse_tool_calls(HERMES_TEXT, T.HERMES, TOOLS)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Köln", "unit": "c"}),
                             ("book_table", {"guests": 2, "names": ["</tool_call>"], "when": {"day": "mon", "hour": 9},
                                             "vip": False})]
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) == 29
        int(c["id"][5:], 16)
    assert calls[0]["function"]["arguments"] == '{"city": "Köln", "unit": "c"}'
    assert T.parse_tool_calls("no calls here  \n", T.HERMES, TOOLS) == ("no calls here  \n", [])
    assert T.parse_tool_calls("\n", T.HERMES, TOOLS) == ("\n", [])
    for bad in ['<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # unknown tool
                '<tool_call>\n{"name": "ping", "arguments": {oops}\n</tool_call>',  # not JSON
                '<tool_call>\n{"name": "ping", "arguments": [1]}\n</tool_call>',  # arguments not an object
                'x <tool_call>\n{"name": "ping", "arguments": {}}']:  # never closed
        assert T.parse_tool_calls(bad, T.HERMES, TOOLS) == (bad, [])
    broken_then_good = ('<tool_call>{bad}</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    content, calls = T.parse_tool_calls(broken_then_good, T.HERMES, TOOLS)
    assert content == "<tool_call>{bad}</tool_call>" and _calls(calls) == [("ping", {})]
    assert T.parse_tool_calls("a <tool_c b", T.HERMES, TOOLS) == ("a <tool_c b", [])
    assert T.parse_tool_calls("<tool_call>\n" + '{"name": "ping"}' + "\n</tool_call>", T.HERMES, TOOLS)[1]


def test_parse_llama3():
    content, calls = T.parse_tool_calls(LLAMA_TEXT, T.LLAMA3, TOOLS)
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo", "unit": "f"}), ("ping", {})]
    content, calls = T.parse_tool_calls('<|python_tag|>{"name": "ping", "parameters": "{}"}', T.LLAMA3, TOOLS)
    assert content is None and _calls(calls) == [("ping", {})]
    for text in ["Hello there.", '{"answer": 42}', '{"name": "nope", "parameters": {}}', LLAMA_TEXT + " and more",
                 '{"name": "ping", "parameters": {}', "  ", ""]:
        assert T.parse_tool_calls(text, T.LLAMA3, TOOLS) == (text, [])


def _stream(text, family, cuts):
    s = T.ToolCallStream(family, TOOLS)
    deltas, prev = [], 0
    for c in list(cuts) + [len(text)]:
        deltas += s.feed(text[prev:c])
        prev = c
    return deltas + s.finish(), s


def _aggregate(deltas):
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and len(d) == 1
        content += d.get("content", "")
        for tc in d.get("tool_calls", ()):
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, [(c["name"], c["arguments"]) for c in calls.values()]


@pytest.mark.parametrize("family,text", [(T.HERMES, HERMES_TEXT), (T.LLAMA3, LLAMA_TEXT),
                                         (T.HERMES, "plain <tool text with < and <tool_call and an end \n"),
                                         (T.LLAMA3, " plain answer, not a call"),
                                         (T.HERMES, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>x'),
                                         (T.HERMES, '<tool_call>\n{"name": "bad"}\n</tool_call> tail')])
def test_streaming_matches_whole_parse_at_every_split(family, text):
    content, calls = T.parse_tool_calls(text, family, TOOLS)
    want = (content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    rng = random.Random(0)
    splits = [[i] for i in range(len(text) + 1)] + [[i, j] for i in range(0, len(text), 3) for j in (i + 1, i + 7)
                                                     if j <= len(text)]
    splits += [sorted(rng.sample(range(len(text) + 1), min(len(text), 12))) for _ in range(20)]
    splits.append(list(range(1, len(text))))  # one character at a time
    for cuts in splits:
        deltas, s = _stream(text, family, cuts)
        assert _aggregate(deltas) == want, cuts
        if calls:  # the tags never leak out as content
            assert not any("tool_call" in d.get("content", "") for d in deltas)
    assert s.has_tool_calls == bool(calls)


def test_stream_holds_back_a_partial_tag():
    s = T.ToolCallStream(T.HERMES, TOOLS)
    assert s.feed("Hi <tool_") == [{"content": "Hi"}]  # the space waits: it may end the content
    assert s.feed("call>\n{\"name\": \"ping\", ") == []
    header, args = s.feed('"arguments": {}}\n</tool_call>')
    assert header["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    assert header["tool_calls"][0]["index"] == 0 and header["tool_calls"][0]["type"] == "function"
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert s.feed("\n") == [] and s.finish() == [] and s.calls[0]["id"] == header["tool_calls"][0]["id"]
    s = T.ToolCallStream(T.HERMES, TOOLS)
    assert s.feed("a <b") == [{"content": "a <b"}] and s.feed("<tool") == [] and s.finish() == [{"content": "<tool"}]


def test_finish_reason_and_family_none():
    assert T.tool_finish_reason("stop", True) == "tool_calls"
    assert T.tool_finish_reason("stop", False) == "stop" and T.tool_finish_reason("length", True) == "length"
    s = T.ToolCallStream(None, TOOLS)
    assert s.feed("<tool_c") == [{"content": "<tool_c"}] and s.finish() == []
    assert T.parses_tool_calls(TOOLS, "auto") and not T.parses_tool_calls(TOOLS, "none")
    assert not T.parses_tool_calls(None, "auto")


def test_response_parser(qwen, llama):
    assert T.response_parser(_req(), qwen) is None
    assert T.response_parser(_req(tools=TOOLS, tool_choice="none"), qwen) is None
    p = T.response_parser(_req(tools=TOOLS), qwen)
    assert p.family == T.HERMES and p.names == set(SCHEMAS)
    assert T.response_parser(_req(tools=TOOLS, tool_choice="required"), llama).family == T.LLAMA3

    class NoTools:
        chat_template = "{{ messages }}"
    assert T.response_parser(_req(tools=TOOLS), NoTools()) is None


# ---- validation -----------------------------------------------------------------------------
def _req(**kw):
    body = {"messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_request(ChatCompletionRequest, body)


@pytest.mark.parametrize("kw,param,words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed"),
    ({"tool_choice": {"type": "function", "function": {"name": "ping"}}}, "tool_choice", "only allowed"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", ""),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(unclosed"}}}}}]}, "tools", "tool 'f'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools",
     "tool 'f'"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", ""),
])
def test_bad_tool_requests_are_400(kw, param, words):
    with pytest.raises(APIError) as e:
        _req(**kw)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_tool_messages_validate():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "pong"}]
    r = parse_request(ChatCompletionRequest, {"messages": msgs, "tools": TOOLS})
    assert r.messages[1].tool_calls[0].function.name == "ping" and r.messages[2].tool_call_id == "c1"
    assert r.tool_choice_mode == "auto" and _req().tool_choice_mode == "none"
    assert _req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}}).tool_choice_mode == \
        "function"
    for bad in ['{"a": ', "[1]", ""]:
        m = [msgs[0], {**msgs[1], "tool_calls": [{"id": "c", "type": "function",
                                                   "function": {"name": "ping", "arguments": bad}}]}]
        with pytest.raises(APIError, match="not a JSON object"):
            parse_request(ChatCompletionRequest, {"messages": m})
    with pytest.raises(APIError, match="only assistant"):
        parse_request(ChatCompletionRequest, {"messages": [{**msgs[1], "role": "user"}]})


def _prepare(tok, **kw):
    body = json.dumps({"messages": [{"role": "user", "content": "Weather in Paris?"}], **kw}).encode()
    return asyncio.run(prepare("chat", body, {}, 0.0, info=ModelInfo(tok, 4096, 16, len(tok)), model_names=["m"],
                               slo_classes={"i": SLOTarget("i", 500, 50)}, default_slo_class="i"))


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_prepare_renders_tools_and_sets_the_constraint(which, request):
    tok = request.getfixturevalue(which)
    plain = _prepare(tok)
    assert plain.params.structured_outputs is None
    for choice in (None, "none", "auto"):
        p = _prepare(tok, tools=TOOLS, **({"tool_choice": choice} if choice else {}))
        assert p.params.structured_outputs is None and len(p.prompt_ids) > len(plain.prompt_ids)
        assert "get_weather" in tok.decode(p.prompt_ids)
    req = _prepare(tok, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).params.structured_outputs
    assert req.kind == "structural_tag" and json.loads(req.structural_tag)["format"]["stop_after_first"] is True
    named = _prepare(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    tags = json.loads(named.params.structured_outputs.structural_tag)["format"]["tags"]
    assert [t["begin"] for t in tags] == [T._FORMATS[T.template_family(tok)][0] + '"ping"' +
                                          T._FORMATS[T.template_family(tok)][1]]
    with pytest.raises(APIError) as e:
        _prepare(tok, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.status == 400 and e.value.param == "tool_choice"


# ---- enforcing tool_choice: random walks through the grammar --------------------------------
@pytest.fixture(scope="module")
def compilers(qwen, llama):
    """Per family, its preset's tokenizer and an xgrammar compiler over its vocabulary."""
    xgr = pytest.importorskip("xgrammar")
    return {fam: (tok, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=1024)))
            for fam, tok in ((T.HERMES, qwen), (T.LLAMA3, llama))}


def _random_walk(compiler, constraint, seed, max_steps=3000):
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(constraint.structural_tag))
    bitmask = xgr.allocate_token_bitmask(1, 1024)
    rng, ids = random.Random(seed), []
    for _ in range(max_steps):
        if matcher.is_terminated():
            return ids
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].tolist()
        allowed = [i for i in range(1024) if (words[i >> 5] >> (i & 31)) & 1]
        tok = rng.choice(allowed)
        assert matcher.accept_token(tok)
        ids.append(tok)
    pytest.fail(f"seed {seed}: the grammar did not terminate within {max_steps} tokens")


@pytest.mark.parametrize("family", [T.HERMES, T.LLAMA3])
@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False),
                                             ({"type": "function", "function": {"name": "book_table"}}, True)])
def test_constraint_random_walks_parse_into_valid_calls(compilers, family, choice, parallel):
    tok, compiler = compilers[family]
    constraint = T.tool_constraint(TOOLS, choice, parallel, family)
    assert constraint.kind == "structural_tag"
    counts = []
    for seed in range(6):
        ids = _random_walk(compiler, constraint, seed)
        assert ids[-1] == tok.eos_token_id  # ends on the stop token, as the engine would
        text = tok.decode(ids[:-1])
        content, calls = T.parse_tool_calls(text, family, TOOLS)
        assert content is None and calls, text
        if parallel is False or isinstance(choice, dict):
            assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0]["function"]["name"] == "book_table"
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        assert _aggregate(_stream(text, family, range(1, len(text), 5))[0])[1] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        counts.append(len(calls))
    if parallel is True and choice == "required":
        assert max(counts) > 1  # several calls, one after the other


def test_constraint_cases():
    assert T.tool_constraint(TOOLS, "auto", True, T.HERMES) is None
    assert T.tool_constraint(TOOLS, "none", True, T.HERMES) is None
    assert T.tool_constraint(TOOLS, None, True, T.HERMES) is None
    assert T.tool_constraint(None, "required", True, T.HERMES) is None
    with pytest.raises(ValueError, match="no known tool-call format"):
        T.tool_constraint(TOOLS, "required", True, None)
    with pytest.raises(ValueError, match="not in tools"):
        T.tool_constraint(TOOLS, {"type": "function", "function": {"name": "zzz"}}, True, T.HERMES)
    a = T.tool_constraint(TOOLS, "required", True, T.HERMES)
    assert a == T.tool_constraint(TOOLS, "required", True, T.HERMES)  # same text: the engine's cache hits
    fmt = json.loads(a.structural_tag)["format"]
    assert fmt["at_least_one"] is True and fmt["stop_after_first"] is False and len(fmt["tags"]) == 3
