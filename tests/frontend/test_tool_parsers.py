"""The tool-call parsers of each format: whole outputs, the same outputs streamed in pieces cut
anywhere (the same calls and content as the whole parse), and malformed model output, which is
content and never an exception."""
import json
import random

import pytest

from kvray.frontend import tool_formats as F
from kvray.frontend.tool_calls import make_call
from kvray.frontend.tool_parsers import ToolCallStream, parse_all

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "ping"}},
         {"type": "function", "function": {"name": "typed", "parameters": {"type": "object", "properties": {
             "s": {"type": "string"}, "e": {"enum": ["7", "8"]}, "c": {"const": "true"},
             "o": {"type": ["string", "null"]}, "i": {"type": "integer"}, "b": {"type": "boolean"}}}}}]
FORMATS = {"hermes": F.HERMES, "llama3_json": F.LLAMA3_JSON, "qwen3_coder": F.QWEN3_CODER, "pythonic": F.PYTHONIC,
           "json_array": F.JSON_ARRAY}

BOOKING = {"guests": 2, "names": ["</tool_call>", "a;b"], "when": {"day": "mon", "hour": 9}, "vip": False}
# format -> (output, the calls in it, the content around them)
GOOD = {
    "hermes": [
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "unit": "c"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "book_table", "arguments": ' + json.dumps(BOOKING) + '}\n</tool_call>\n',
         [("get_weather", {"city": "Köln", "unit": "c"}), ("book_table", BOOKING)], "Let me check."),
        ('<tool_call>{"name": "ping"}</tool_call> and <tool_call>\n{"name": "ping", "parameters": "{}"}\n</tool_call>',
         [("ping", {}), ("ping", {})], " and"),
    ],
    "qwen3_coder": [
        ("I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork \n</parameter>\n"
         "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=book_table>\n"
         "<parameter=guests>\n2\n</parameter>\n<parameter=names>\n[\"</tool_call>\", \"a;b\"]\n</parameter>\n"
         "<parameter=when>\n{\"day\": \"mon\", \"hour\": 9}\n</parameter>\n<parameter=vip>\nFalse\n</parameter>\n"
         "</function>\n</tool_call>", [("get_weather", {"city": "New\nYork ", "unit": "c"}), ("book_table", BOOKING)],
         "I will look."),
        ("<tool_call><function=ping></function></tool_call>", [("ping", {})], None),
        ("<tool_call>\n<function=book_table>\n<parameter=note>\nnot json\n</parameter>\n<parameter=n>\n"
         "null\n</parameter>\n</function>\n</tool_call>", [("book_table", {"note": "not json", "n": None})], None),
        # by the schema: strings stay text (digits too), a nullable string may be null, others are JSON
        ("<tool_call>\n<function=typed>\n<parameter=s>\n123\n</parameter>\n<parameter=e> 7 </parameter>\n"
         "<parameter=c>\ntrue\n</parameter>\n<parameter=o>\nNone\n</parameter>\n<parameter=i>\n-4\n</parameter>\n"
         "<parameter=b>\nTrue\n</parameter>\n</function>\n</tool_call>",
         [("typed", {"s": "123", "e": "7", "c": "true", "o": None, "i": -4, "b": True})], None),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}; {"name": "ping", "arguments": {}}',
         [("get_weather", {"city": "Oslo", "unit": "f"}), ("ping", {})], None),
        ('<|python_tag|>{"name": "ping", "parameters": "{}"}', [("ping", {})], None),
        (' \n{"name": "book_table", "parameters": ' + json.dumps(BOOKING) + "}\n", [("book_table", BOOKING)], None),
        ('{"name": "ping", "parameters": {}} and then some text', [("ping", {})], " and then some text"),
    ],
    "pythonic": [
        ('[get_weather(city="Köln", unit=\'c\'), ping()]', [("get_weather", {"city": "Köln", "unit": "c"}),
                                                           ("ping", {})], None),
        ("<|python_start|>[book_table(guests=2, names=['</tool_call>', 'a;b'], when={'day': 'mon', 'hour': 9}, "
         "vip=False)]<|python_end|>", [("book_table", BOOKING)], None),
        ("\n[book_table(x=None, y=(1, 2.5), z=-3)]", [("book_table", {"x": None, "y": [1, 2.5], "z": -3})], None),
    ],
    "json_array": [
        ('[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}, {"name": "ping", "parameters": {}}]',
         [("get_weather", {"city": "Rome", "unit": "c"}), ("ping", {})], None),
        ('[{"name": "book_table", "arguments": ' + json.dumps(BOOKING) + "}]", [("book_table", BOOKING)], None),
        ('[{"name": "ping", "parameters": {}}', [("ping", {})], None),  # cut before the close: the call stands
        ('[{"name": "ping", "parameters": {}}] trailing words', [("ping", {})], " trailing words"),
    ],
}
# outputs that hold no call: all of each is content, exactly as written
NOT_CALLS = {
    "hermes": ["no calls here  \n", "\n", "a <tool_c b", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
               '<tool_call>\n{"name": "ping", "arguments": {oops}\n</tool_call>',
               '<tool_call>\n{"name": "ping", "arguments": [1]}\n</tool_call>',
               'x <tool_call>\n{"name": "ping", "arguments": {}}', "<tool_call>" + "[" * 50000 + "</tool_call>"],
    "qwen3_coder": ["<tool_call>\n<function=nope>\n</function>\n</tool_call>",
                    "<tool_call>\n<function=ping>\n<parameter=a>1</parameter> junk\n</function>\n</tool_call>",
                    "<tool_call>\n<function=ping>\n<parameter=a>1\n</function>\n</tool_call>",
                    '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', "<tool_call><function=ping>",
                    "text <function=ping></function>"],
    "llama3_json": ["Hello there.", '{"answer": 42}', '{"name": "nope", "parameters": {}}', "  ", "",
                    '{"name": "ping", "parameters": {}', '{"name": "ping", "parameters": {"x": NaN}}',
                    '<|python_tag|>', '<|python_ta', '{"name": "ping", "parameters": ' + "[" * 50000,
                    '{"name": "ping", "parameters": "{not json}"}'],
    "pythonic": ["Sure: [ping()]", "[get_weather(city=x)]", "[nope()]", '[get_weather("Paris")]', "[1, 2]", "[]",
                 '[get_weather(city="a"', "[ping(x={1, 2})]", "[ping(x=1e999)]", "[ping(**kw)]", "[ping()] + [ping()]",
                 "[os.system('ls')]", "[" * 20000, "[ping(x=__import__('os'))]", "<|python_start|>"],
    "json_array": ["[]", '[{"name": "nope", "parameters": {}}]', "[1]", "plain", '[{"name": "ping", "parameters": 1}]',
                   "[" * 50000, '{"name": "ping", "parameters": {}}'],
}


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _aggregate(deltas):
    """What a client puts together from the deltas: (content, [(name, arguments text)])."""
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and len(d) == 1
        content += d.get("content", "")
        for tc in d.get("tool_calls", ()):
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["function"]["arguments"] == "" and tc["type"] == "function"
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, [(c["name"], c["arguments"]) for c in calls.values()]


def _streamed(fmt, text, cuts):
    s = fmt.parser(TOOLS)
    deltas, prev = [], 0
    for c in list(cuts) + [len(text)]:
        deltas += s.feed(text[prev:c])
        prev = c
    return deltas + s.finish(), s


def _splits(text, rng):
    n = len(text)
    out = [[i] for i in range(0, n + 1, max(1, n // 60))] + [list(range(1, n))]  # one character at a time
    out += [sorted(rng.sample(range(n + 1), min(n, 12))) for _ in range(15)]
    return out


@pytest.mark.parametrize("name,case", [(n, i) for n, cases in GOOD.items() for i in range(len(cases))])
def test_whole_output_calls(name, case):
    text, want, content = GOOD[name][case]
    got_content, calls = parse_all(FORMATS[name].parser(TOOLS), text)
    assert _calls(calls) == want and got_content == content
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) == 29
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("name", FORMATS)
def test_no_call_is_content_exactly(name):
    for text in NOT_CALLS[name]:
        assert parse_all(FORMATS[name].parser(TOOLS), text) == (text, []), text[:80]


@pytest.mark.parametrize("name,text", [(n, t) for n, cases in GOOD.items() for t, _, _ in cases] +
                         [(n, t) for n, texts in NOT_CALLS.items() for t in texts if len(t) < 200])
def test_streaming_matches_the_whole_parse_at_every_split(name, text):
    fmt = FORMATS[name]
    content, calls = parse_all(fmt.parser(TOOLS), text)
    want = (content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for cuts in _splits(text, random.Random(len(text))):
        deltas, s = _streamed(fmt, text, cuts)
        assert _aggregate(deltas) == want, cuts
        assert s.has_tool_calls == bool(calls)
        if calls:  # the call syntax never leaks out as content
            assert not any(m in d.get("content", "") for d in deltas for m in ("<tool_call>", '"name"', "ping("))


def test_calls_go_out_as_soon_as_complete():
    s = F.HERMES.parser(TOOLS)
    assert s.feed("Hi <tool_") == [{"content": "Hi"}]  # the space waits: it may end the content
    assert s.feed('call>\n{"name": "ping", ') == []
    header, args = s.feed('"arguments": {}}\n</tool_call>')
    assert header["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert s.feed("\n") == [] and s.finish() == [] and s.calls[0]["id"] == header["tool_calls"][0]["id"]
    s = F.HERMES.parser(TOOLS)
    assert s.feed("a <b") == [{"content": "a <b"}] and s.feed("<tool") == [] and s.finish() == [{"content": "<tool"}]
    for fmt, first, rest in [(F.JSON_ARRAY, '[{"name": "ping", "parameters": {}}', ', {"name": "ping"'),
                             (F.LLAMA3_JSON, '{"name": "ping", "parameters": {}}', '; {"name": "ping"')]:
        s = fmt.parser(TOOLS)
        assert s.feed(first[:-1]) == []
        assert len(s.feed(first[-1:])) == 2 and s.feed(rest) == []  # the first call, before the second is known
        assert s.finish() == [{"content": rest}] and len(s.calls) == 1  # the second never closed: text
    s = F.PYTHONIC.parser(TOOLS)
    assert s.feed("[ping(), ") == [] and s.feed("ping()]") == [] and len(s.finish()) == 4  # held to the end
    s = F.LLAMA3_JSON.parser(TOOLS)
    assert s.feed("  ") == [] and s.feed("Hello") == [{"content": "  Hello"}]  # told apart: text flows


def test_plain_stream_and_make_call():
    s = ToolCallStream(TOOLS)
    assert s.feed("<tool_c") == [{"content": "<tool_c"}] and s.feed(" ") == [{"content": " "}] and s.finish() == []
    assert make_call("ping", " {} ", {"ping"})["function"]["arguments"] == "{}"
    for name, args in [("nope", {}), ("ping", "[]"), ("ping", "{} x"), ("ping", 3), ("ping", {"x": float("nan")}),
                       ("ping", {"x": {1, 2}}), (None, {})]:
        assert make_call(name, args, {"ping"}) is None


FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=ping>", "</function>", "<parameter=a>", "</parameter>", "\n", " ", "{", "}", "[", "]", "(", ")", '"', "'", ",", ";", ":", "=",
             '"name"', '"arguments"', '"parameters"', "ping", "get_weather", "<|python_tag|>", "<|python_start|>",
             "true", "None", "1", "x", "é", "\\", "\x00"]


@pytest.mark.parametrize("name", FORMATS)
def test_random_malformed_output_never_raises(name):
    """Random mixes of the formats' syntax: parsed whole and streamed alike, without an error,
    and when no call is found the content is the text as written."""
    fmt, rng = FORMATS[name], random.Random(hash(name) % 1000)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 30)))
        content, calls = parse_all(fmt.parser(TOOLS), text)
        if not calls:
            assert content == text
        want = (content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 6)))
        assert _aggregate(_streamed(fmt, text, cuts)[0]) == want
