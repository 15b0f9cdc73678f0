"""Bad input raises a clear ValueError, and requests already in flight are unaffected."""
import asyncio
import json
import shutil

import pytest

from kvray import LLM, SamplingParams
from kvray.replica.async_engine import AsyncLLMEngine
from kvray.replica.config import EngineConfig
from kvray.replica.models.loader import resolve_model
from tests.conftest import random_prompts

BAD_PARAMS = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(seed=2**80), "seed"),
    (dict(seed=-2**64), "seed"),
    (dict(top_k=2**40), "top_k"),
    (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=50, max_tokens=10), "min_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
]


@pytest.mark.parametrize("kw,name", BAD_PARAMS)
def test_sampling_params_refuse_out_of_range_values(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def _mutated(kw: dict) -> SamplingParams:
    """Valid params changed afterwards: the engine must still refuse them (a changed field marks
    them unchecked, and the engine validates unchecked params at its door)."""
    p = SamplingParams()
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request):
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128), process=request.param == "process")
    yield eng
    asyncio.run(eng.shutdown(timeout_s=1))


async def _collect(engine, rid, prompt, params):
    last = None
    async for out in engine.generate(rid, prompt, params):
        last = out
    return last


def test_bad_requests_fail_cleanly_while_a_stream_runs(engine):
    vocab = engine.vocab_size
    good = random_prompts(vocab, [20], seed=1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def main():
        reference = await _collect(engine, "ref", good, params)
        healthy = asyncio.create_task(_collect(engine, "healthy", good, params))
        await asyncio.sleep(0)
        errors = []
        cases = [([], None, "empty"), (list(range(1, 129)), None, "context length"),
                 ([vocab + 10], None, "vocabulary")]
        cases += [(good, _mutated(kw), name) for kw, name in BAD_PARAMS]
        for i, (prompt, p, needle) in enumerate(cases):
            with pytest.raises(ValueError, match=needle):
                async for _ in engine.generate(f"bad-{i}", prompt, p or params):
                    pass
            errors.append(needle)
        out = await healthy
        return reference, out, errors

    reference, out, errors = asyncio.run(main())
    assert len(errors) == 3 + len(BAD_PARAMS)
    assert out.finished and out.finish_reason == "length"
    assert out.token_ids == reference.token_ids
    engine.check_health()


def test_params_are_validated_once_per_request(monkeypatch):
    """Construction validates; the engine's doors (the async engine's submit, then the engine's
    make_sequence, one after the other in thread mode) re-validate only params changed since."""
    calls = []
    real = SamplingParams.validate
    monkeypatch.setattr(SamplingParams, "validate", lambda self: (calls.append(1), real(self))[1])
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        assert len(calls) == 1
        out = asyncio.run(_collect(eng, "once", [1, 2, 3], params))
        assert len(out.token_ids) == 3 and len(calls) == 1
        params.max_tokens = 2  # changed after construction: validated again at the door, once
        out = asyncio.run(_collect(eng, "again", [1, 2, 3], params))
        assert len(out.token_ids) == 2 and len(calls) == 2
    finally:
        asyncio.run(eng.shutdown(timeout_s=1))


def test_offline_generate_rejects_before_running_anything():
    llm = LLM("kvray:tiny-qwen2", max_model_len=64)
    with pytest.raises(ValueError, match="prompt 1: .*context length"):
        llm.generate([[1, 2, 3], list(range(1, 80))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].token_ids) >= 1


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny-gpt9"):
        LLM("kvray:tiny-gpt9")


def test_bad_engine_options():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="kvray:tiny-qwen3", block_size=7)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="kvray:tiny-qwen3", gpu_memory_utilization=1.5)
    with pytest.raises(TypeError):
        EngineConfig(model="kvray:tiny-qwen3", max_num_seq=4)  # misspelt option


def test_broken_checkpoint_directories(tmp_path):
    src = resolve_model("kvray:tiny-llama")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(src, no_weights)
    for f in no_weights.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(no_weights))
    unsupported = tmp_path / "unsupported"
    shutil.copytree(src, unsupported)
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    cfg["model_type"] = "mamba"
    (unsupported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM|mamba"):
        LLM(str(unsupported))
    with pytest.raises(ValueError, match="does not exist|not found|no such"):
        LLM(str(tmp_path / "nowhere"))
