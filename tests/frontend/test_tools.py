"""Tool calls: the presets' chat templates with tools, the tool-call format of a model (the
tool_call_parser option, detection from the template, the log line), request validation, and
tool_choice enforced by the structural-tag grammar for every format, a template of no known
format included (driven with random allowed tokens, as a random-weight model would). The
parsers themselves: test_tool_parsers.py."""
import asyncio
import json
import random

import jsonschema
import pytest
from tool_models import PLAIN_CHATML, no_tool_template_checkpoint

from kvray.app_config import TOOL_CALL_PARSERS, ConfigError, parse_args
from kvray.frontend import tool_formats as F
from kvray.frontend.body import parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.prepare import ModelInfo, prepare
from kvray.frontend.protocol import ChatCompletionRequest
from kvray.frontend.tool_calls import NO_ARGUMENTS, tool_finish_reason
from kvray.frontend.tool_grammar import MAX_CALLS, tool_constraint
from kvray.replica.models import bpe
from kvray.replica.models.loader import load_tokenizer
from kvray.replica.models.presets import ensure_preset
from kvray.slo import SLOTarget
from tests.frontend.grammar_shape import calls_of

# The templates as they were before tools: rendering without tools must not change by a byte.
OLD_CHATML = PLAIN_CHATML
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
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING, "ping": NO_ARGUMENTS}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(ensure_preset("tiny-qwen3"))


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer(ensure_preset("tiny-llama"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tokenizer whose chat template has no tool section."""
    return load_tokenizer(no_tool_template_checkpoint(tmp_path_factory.mktemp("plain") / "ckpt"))


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
    content, calls = F.parse_tool_calls(block, F.HERMES, TOOLS)
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("ping", {})]
    # arguments given as JSON text render the same; no system message: the tools block stands alone
    assert text == qwen.apply_chat_template(_round_trip(True), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    alone = qwen.apply_chat_template(_round_trip()[1:2], tools=TOOLS[:1], tokenize=False, add_generation_prompt=True)
    assert alone.startswith("<|im_start|>system\n# Tools\n\n") and "Be brief" not in alone
    assert F.detect_format(qwen) is F.HERMES


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
    content, calls = F.parse_tool_calls(reply, F.LLAMA3_JSON, TOOLS)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "ping"]
    # tools in the system turn instead
    sys_ = llama.apply_chat_template(_round_trip()[:2], tools=TOOLS[:1], tokenize=False, add_generation_prompt=True,
                                     tools_in_user_message=False)
    assert "Environment: ipython\n\nYou have access to the following functions." in sys_
    assert sys_.endswith("Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert F.detect_format(llama) is F.LLAMA3_JSON and F.detect_format("{{ messages }}") is None


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


def _prepare(tok, parser="auto", **kw):
    body = json.dumps({"messages": [{"role": "user", "content": "Weather in Paris?"}], **kw}).encode()
    return asyncio.run(prepare("chat", body, {}, 0.0, info=ModelInfo(tok, 4096, 16, len(tok), parser),
                               model_names=["m"], slo_classes={"i": SLOTarget("i", 500, 50)}, default_slo_class="i"))


def _structural(p):
    return json.loads(p.params.structured_outputs.structural_tag)["format"]


@pytest.mark.parametrize("which", ["qwen", "llama", "plain"])
def test_prepare_renders_tools_and_sets_the_constraint(which, request):
    tok = request.getfixturevalue(which)
    no_tools = _prepare(tok)
    assert no_tools.params.structured_outputs is None
    for choice in (None, "none", "auto"):
        p = _prepare(tok, tools=TOOLS, **({"tool_choice": choice} if choice else {}))
        assert p.params.structured_outputs is None
        if which != "plain":  # a template without a tool section shows the model no tools
            assert len(p.prompt_ids) > len(no_tools.prompt_ids) and "get_weather" in tok.decode(p.prompt_ids)
    req = _prepare(tok, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert req.params.structured_outputs.kind == "structural_tag"
    calls = _structural(req)
    if which == "plain":  # no known format: a JSON array of calls, never a 400
        assert calls["type"] == "sequence" and calls["elements"][0] == {"type": "const_string", "value": "["}
        assert calls["elements"][2] == {"type": "optional", "content": {"type": "const_string", "value": "]"}}
    assert calls_of(calls)[1] == 1
    shape = F.enforced_format(F.detect_format(tok)).shape
    named = _prepare(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    tags = calls_of(_structural(named))[0]
    assert [t["begin"] for t in tags] == [shape.head + '"ping"' + shape.mid]
    with pytest.raises(APIError) as e:
        _prepare(tok, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.status == 400 and e.value.param == "tool_choice"


# ---- the model's tool-call format -----------------------------------------------------------
def test_the_option_and_the_registry_agree():
    assert set(TOOL_CALL_PARSERS) == set(F.FORMATS) | {"auto", "none"}
    assert parse_args({"model": "kvray:tiny-qwen3"}).tool_call_parser == "auto"
    for value in TOOL_CALL_PARSERS:
        assert parse_args({"model": "kvray:tiny-qwen3", "tool_call_parser": value}).tool_call_parser == value
    for bad in ("mistral", "", 3, None):
        with pytest.raises(ConfigError) as e:
            parse_args({"model": "kvray:tiny-qwen3", "tool_call_parser": bad})
        assert "args.tool_call_parser" in str(e.value) and "llama3_json" in str(e.value)


# the start of each format's own template (as its models ship it), enough to tell it apart
TEMPLATES = [
    ("{%- if tools %}...<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
     F.HERMES),
    ("reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n"
     "<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>", F.QWEN3_CODER),
    ("<|start_header_id|>system<|end_header_id|>\n\n{%- if tools %}Environment: ipython\n{%- endif %}", F.LLAMA3_JSON),
    ("{{- '<|python_tag|>' + tool_call.name }}", F.LLAMA3_JSON),
    ("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nRespond in the format [func_name1("
     "params_name1=params_value1, params_name2=params_value2...), func_name2(params)]", F.PYTHONIC),
    ("<|header_start|>system<|header_end|>\n\nyou MUST put it in the format of [func_name1(params_name1=params_value1",
     F.PYTHONIC),
    (PLAIN_CHATML, None),
    ("<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>", None),  # Llama 3.0
    ("", None),
]


@pytest.mark.parametrize("template,fmt", TEMPLATES)
def test_detection_from_the_chat_template(template, fmt):
    assert F.detect_format(template) is fmt

    class Tok:
        chat_template = {"default": "x", "tool_use": template}
    assert F.detect_format(Tok()) is (fmt if template else None)


def test_resolve_logs_its_choice_once(qwen, plain, caplog):
    with caplog.at_level("INFO", logger="kvray.frontend.tool_formats"):
        assert F.resolve_tool_format("auto", qwen) is F.HERMES
        assert [r.levelname for r in caplog.records] == ["INFO"] and "hermes" in caplog.text
        caplog.clear()
        info = ModelInfo(plain, 4096, 16, len(plain))  # what a Router builds once, at startup
        assert info.tool_format is None
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "no known tool-call format" in warned[0].getMessage()
        assert "tool_choice=auto returns plain text" in warned[0].getMessage()
        caplog.clear()
        assert F.resolve_tool_format("none", qwen) is None and F.resolve_tool_format("pythonic", qwen) is F.PYTHONIC
        assert ModelInfo(plain, 4096, 16, len(plain), "hermes").tool_format is F.HERMES
        assert not caplog.records  # an explicit choice is not news
    with pytest.raises(ValueError, match="mistral"):
        F.resolve_tool_format("mistral", qwen)


def test_which_format_a_response_is_read_in():
    named = {"type": "function", "function": {"name": "ping"}}
    for fmt in (F.HERMES, F.LLAMA3_JSON, F.QWEN3_CODER, F.PYTHONIC, None):
        assert F.response_parser(_req(), fmt) is None
        assert F.response_parser(_req(tools=TOOLS, tool_choice="none"), fmt) is None
        auto = F.response_parser(_req(tools=TOOLS), fmt)
        assert (auto is None) if fmt is None else isinstance(auto, fmt.stream)
        for choice in ("required", named):  # enforced: the format's own grammar, else a JSON array
            forced = F.request_format(fmt, TOOLS, choice)
            assert forced is (fmt if fmt is not None and fmt.shape is not None else F.JSON_ARRAY)
            assert isinstance(F.response_parser(_req(tools=TOOLS, tool_choice=choice), fmt), forced.stream)
    assert F.response_parser(_req(tools=TOOLS), F.HERMES).names == set(SCHEMAS)
    assert F.parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>', None, TOOLS) == (
        '<tool_call>{"name": "ping"}</tool_call>', [])
    assert tool_finish_reason("stop", True) == "tool_calls"
    assert tool_finish_reason("stop", False) == "stop" and tool_finish_reason("length", True) == "length"


# ---- enforcing tool_choice: random walks through the grammar --------------------------------
@pytest.fixture(scope="module")
def compilers(qwen, llama):
    """Per preset, its tokenizer and an xgrammar compiler over its vocabulary."""
    xgr = pytest.importorskip("xgrammar")
    return {name: (tok, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=1024)))
            for name, tok in (("qwen", qwen), ("llama", llama))}


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


# (the model's format, the preset whose vocabulary generates): every format, and none known
WALKS = [(F.HERMES, "qwen"), (F.LLAMA3_JSON, "llama"), (F.QWEN3_CODER, "qwen"), (F.PYTHONIC, "llama"), (None, "qwen"),
         (None, "llama")]


@pytest.mark.parametrize("fmt,preset", WALKS, ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False),
                                             ({"type": "function", "function": {"name": "book_table"}}, True)])
def test_constraint_random_walks_parse_into_valid_calls(compilers, fmt, preset, choice, parallel):
    tok, compiler = compilers[preset]
    constraint = tool_constraint(TOOLS, choice, parallel, fmt)
    assert constraint.kind == "structural_tag"
    read_as = F.request_format(fmt, TOOLS, choice)
    for seed in range(6):
        ids = _random_walk(compiler, constraint, seed)
        assert ids[-1] == tok.eos_token_id  # ends on the stop token, as the engine would
        text = tok.decode(ids[:-1])
        content, calls = F.parse_tool_calls(text, read_as, TOOLS)
        assert content is None and calls, text
        if parallel is False or isinstance(choice, dict):
            assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0]["function"]["name"] == "book_table"
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        stream = read_as.parser(TOOLS)  # streamed in pieces: the same calls
        deltas = [d for i in range(0, len(text), 5) for d in stream.feed(text[i:i + 5])] + stream.finish()
        assert [d for d in deltas if "content" in d] == []
        assert [tc["function"]["name"] for d in deltas for tc in d["tool_calls"] if "id" in tc] == \
            [c["function"]["name"] for c in calls]
    shape = read_as.shape  # and several calls, one after the other, where they are allowed
    one = shape.head + ('"ping"' + shape.mid + "{}" if shape.args == "json" else "ping" + shape.mid) + shape.end
    import xgrammar as xgr
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(constraint.structural_tag))
    two = matcher.accept_string(shape.open + one + shape.sep + one + shape.close)
    assert two == (parallel is True and choice == "required")
    assert F.parse_tool_calls(shape.open + one + shape.sep + one + shape.close, read_as, TOOLS)[1]


def test_constraint_cases():
    for fmt in (F.HERMES, None):
        assert tool_constraint(TOOLS, "auto", True, fmt) is None
        assert tool_constraint(TOOLS, "none", True, fmt) is None
        assert tool_constraint(TOOLS, None, True, fmt) is None
        assert tool_constraint(None, "required", True, fmt) is None
        with pytest.raises(ValueError, match="not in tools"):
            tool_constraint(TOOLS, {"type": "function", "function": {"name": "zzz"}}, True, fmt)
    a = tool_constraint(TOOLS, "required", True, F.HERMES)
    assert a == tool_constraint(TOOLS, "required", True, F.HERMES)  # same text: the engine's cache hits
    fmt = json.loads(a.structural_tag)["format"]
    tags, most = calls_of(fmt)
    assert most == MAX_CALLS and len(tags) == 3
    # no known format, or one without a grammar of its own: the same JSON array of calls
    assert tool_constraint(TOOLS, "required", True, None) == tool_constraint(TOOLS, "required", True, F.PYTHONIC)
