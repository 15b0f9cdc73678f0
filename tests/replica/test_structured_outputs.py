"""Structured outputs in the engine: every sampled token obeys the request's grammar (random
weights, sampled, many seeds), the other requests of the batch are untouched, grammars compile
off the step loop and once per constraint, and a constraint that cannot compile fails only its
own request."""
import json
import re
import time

import jsonschema
import pytest

from kvray import LLM, SamplingParams, StructuredOutputs
from kvray.replica.grammar import GrammarError, build_grammar

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                         "kind": {"enum": ["cat", "dog", "bird"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(request):
    return LLM("kvray:tiny-qwen3", device="cpu", max_num_seqs=8, max_model_len=512, async_scheduling=request.param)


def _structured(**kw) -> StructuredOutputs:
    return StructuredOutputs(**kw)


def test_json_schema_outputs_validate_for_every_seed(llm):
    so = _structured(json_schema=json.dumps(SCHEMA))
    prompts = [[11 + i, 40, 7, 99] for i in range(12)]
    outs = llm.generate(prompts, [SamplingParams(seed=i, max_tokens=300, structured_outputs=so) for i in range(12)],
                        use_tqdm=False)
    texts = set()
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
        texts.add(o.text)
    assert len(texts) > 6  # sampled, not one forced string


def test_json_object_regex_and_choice(llm):
    outs = llm.generate([[5, 6, 7]] * 9, [
        *(SamplingParams(seed=i, max_tokens=200, structured_outputs=_structured(json_object=True)) for i in range(3)),
        *(SamplingParams(seed=i, max_tokens=50, structured_outputs=_structured(regex=r"[0-9]{3}-[a-z]{2,4}"))
          for i in range(3)),
        *(SamplingParams(seed=i, temperature=0.0 if i == 0 else 1.0, max_tokens=50,
                         structured_outputs=_structured(choice=("yes", "no", 'a "quoted" ünïcode')))
          for i in range(3))], use_tqdm=False)
    for o in outs[:3]:  # free-form strings may run to max_tokens: then every token was still allowed
        _assert_allowed(llm, _structured(json_object=True), o.token_ids)
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict), o.text
    for o in outs[3:6]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", o.text), o.text
    for o in outs[6:]:
        assert o.text in ("yes", "no", 'a "quoted" ünïcode') and o.finish_reason == "stop"


def _assert_allowed(llm, so: StructuredOutputs, token_ids: list[int]) -> None:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(llm.engine.grammars.get(so).result())
    for t in token_ids:
        assert matcher.accept_token(t), token_ids


def test_other_requests_of_the_batch_are_untouched(llm):
    plain = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
             SamplingParams(seed=3, max_tokens=24, ignore_eos=True)]
    prompts = [[3, 4, 5, 6], [8, 9, 10]]
    alone = llm.generate(prompts, plain, use_tqdm=False)
    so = _structured(json_schema=json.dumps(SCHEMA))
    mixed = llm.generate(prompts + [[1, 2]] * 3, plain + [SamplingParams(seed=i, max_tokens=300, structured_outputs=so)
                                                          for i in range(3)], use_tqdm=False)
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    for o in mixed[2:]:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_compiled_once_per_constraint_off_the_step_loop(llm):
    schema = dict(SCHEMA, title=f"fresh-{time.monotonic_ns()}")  # a constraint this engine has not seen
    so = _structured(json_schema=json.dumps(schema))
    eng = llm.engine
    seqs = [eng.make_sequence(None, [1, 2, 3], SamplingParams(seed=i, max_tokens=200, structured_outputs=so))
            for i in range(4)]
    assert len({id(s.grammar.future) for s in seqs}) == 1  # one compile for all four
    for s in seqs:
        eng.add_sequence(s)
    assert len(eng._compiling) == 4 or all(s.grammar.matcher is not None for s in seqs)
    while eng.has_unfinished():
        eng.step()
    for s in seqs:
        jsonschema.validate(json.loads(eng.output_text(s)), schema)
    again = eng.make_sequence(None, [1, 2], SamplingParams(max_tokens=5, structured_outputs=so))
    assert again.grammar.future is seqs[0].grammar.future and again.grammar.matcher is not None  # cached: ready


def test_a_bad_constraint_fails_its_request_alone(llm):
    bad = _structured(json_schema='{"type": "no-such-type"}')
    with pytest.raises(GrammarError, match="no-such-type"):
        build_grammar(bad)
    eng = llm.engine
    good = eng.make_sequence(None, [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=8))
    worse = eng.make_sequence(None, [4, 5], SamplingParams(max_tokens=8, structured_outputs=bad))
    eng.add_sequence(good)
    eng.add_sequence(worse)
    while eng.has_unfinished():
        eng.step()
    assert worse.error is not None and "no-such-type" in worse.error and worse.finish_reason == "abort"
    assert good.error is None and good.num_output_tokens == 8
    with pytest.raises(ValueError, match="no-such-type"):  # known bad now: refused at once
        llm.generate([[1, 2]], SamplingParams(structured_outputs=bad), use_tqdm=False)
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=3), use_tqdm=False)[0].finish_reason == "length"


def test_the_constraint_is_checked():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=("a",))
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputs(choice=("a", ""))
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 12}, {"type": "string"}])
def test_json_strings_never_hold_raw_control_characters(llm, schema):
    """JSON forbids unescaped control characters in strings; bounded and unbounded strings alike."""
    import xgrammar as xgr

    so = _structured(json_schema=json.dumps({"type": "object", "properties": {"name": schema}, "required": ["name"]}))
    compiled = llm.engine._grammar_cache().get(so).result()
    for bad in ('{"name": "a\x1a', '{"name": "a\x00', '{"name": "a\n'):
        assert not xgr.GrammarMatcher(compiled).accept_string(bad), repr(bad)
    assert xgr.GrammarMatcher(compiled).accept_string('{"name": "ok ü"}')
