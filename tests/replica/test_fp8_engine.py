"""FP8 in the engine on the CPU: the FP8 KV cache doubles the tokens a budget holds, runs the
Triton kernels (interpreted) to the reference's tokens, and stays close to the unquantized model
(benchmarks/fp8_quality.py on a tiny preset); the options are checked in EngineConfig, the Serve
config and check-config; a GPU without FP8 is a clear error."""
from __future__ import annotations

import pytest
import torch
import yaml

from kvray import LLM, SamplingParams
from kvray.app_config import ConfigError, parse_args
from kvray.cli import main as cli_main
from kvray.replica.config import EngineConfig
from kvray.replica.engine_loop import engine_info
from kvray.replica.model_runner import fp8_support_error
from tests.conftest import random_prompts


def test_fp8_kv_cache_doubles_capacity_and_is_reported():
    base = LLM("kvray:tiny-qwen3", device="cpu", dtype="bfloat16", cpu_kv_cache_gib=0.01)
    fp8 = LLM("kvray:tiny-qwen3", device="cpu", dtype="bfloat16", cpu_kv_cache_gib=0.01, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.kv_bytes_per_block() * 2 == base.engine.runner.kv_bytes_per_block()
    assert fp8.engine.block_manager.num_total_blocks == 2 * base.engine.block_manager.num_total_blocks
    info = engine_info(fp8.engine)
    assert info["kv_cache_dtype"] == "float8_e4m3fn" and info["quantization"] is None
    assert engine_info(base.engine)["kv_cache_dtype"] == "bfloat16"
    q = LLM("kvray:tiny-qwen3", device="cpu", cpu_kv_cache_gib=0.01, quantization="fp8")
    assert "per-channel" in engine_info(q.engine)["quantization"]


def test_fp8_kv_cache_triton_kernels_match_reference_in_the_engine(monkeypatch):
    """The whole engine (prefill, chunked prefill, decode) over an FP8 cache: the interpreted Triton
    write and attention give the reference path's greedy tokens."""
    prompts = random_prompts(1024, [7, 40, 3], seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    opts = dict(device="cpu", kv_cache_dtype="fp8", num_kv_blocks=64, max_num_batched_tokens=32, max_model_len=256)
    ref = LLM("kvray:tiny-llama", attention_backend="reference", **opts).generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri = LLM("kvray:tiny-llama", attention_backend="triton", **opts).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in tri] == [o.token_ids for o in ref]


def test_quality_script_on_a_tiny_preset():
    from benchmarks.fp8_quality import run
    result = run("kvray:tiny-llama", 3, 12, "cpu", ["fp8-weights", "fp8-kv"])
    assert result["reference_self_check"] == 1.0
    for name, stats in result["variants"].items():
        assert stats["tokens"] == 36
        # a tiny random model has near-flat logits, so FP8 rounding flips some top-1 choices; a broken
        # scale or cache read flips nearly all of them (1/1024 by chance)
        assert stats["top1_agreement"] >= 0.5, (name, stats)
        assert 0 < stats["mean_abs_logprob_diff"] < 0.5, (name, stats)


def test_fp8_support_error():
    assert fp8_support_error(["kv_cache_dtype=fp8"], (9, 0), "H100") is None
    assert fp8_support_error(["kv_cache_dtype=fp8"], (8, 9), "L4") is None
    assert fp8_support_error([], (7, 0), "V100") is None
    msg = fp8_support_error(["quantization (fp8)", "kv_cache_dtype=fp8"], (8, 0), "NVIDIA A100-SXM4-80GB")
    assert "quantization (fp8) and kv_cache_dtype=fp8 needs a GPU with FP8 support" in msg
    assert "A100-SXM4-80GB has compute capability 8.0" in msg


@pytest.mark.parametrize("field, value", [("quantization", "int8"), ("quantization", "FP8"),
                                          ("kv_cache_dtype", "fp16"), ("kv_cache_dtype", "e5m2")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"invalid engine option {field}="):
        EngineConfig(model="kvray:tiny-qwen3", **{field: value})
    with pytest.raises(ConfigError, match=field):
        parse_args({"model": "kvray:tiny-qwen3", "engine": {field: value}})


def test_serve_config_and_check_config_accept_fp8(tmp_path, capsys):
    a = parse_args({"model": "kvray:llama-3.1-8b", "engine": {"quantization": "fp8", "kv_cache_dtype": "fp8"}})
    cfg = a.engine_config()
    assert cfg.quantization == "fp8" and cfg.fp8_kv_cache
    doc = {"applications": [{"name": "kvray", "route_prefix": "/", "import_path": "kvray.platform:build_app",
                             "args": {"model": "kvray:tiny-qwen3", "engine": {"quantization": "fp8",
                                                                               "kv_cache_dtype": "fp8"}}}]}
    path = tmp_path / "fp8.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli_main(["check-config", str(path)]) == 0
    doc["applications"][0]["args"]["engine"]["kv_cache_dtype"] = "int4"
    path.write_text(yaml.safe_dump(doc))
    assert cli_main(["check-config", str(path)]) == 1
    assert "kv_cache_dtype" in capsys.readouterr().err
